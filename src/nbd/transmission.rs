//! The transmission phase: reads requests, runs each on the device (on the reader's task
//! when it completes at once, else as a task of its own) and writes replies in
//! completion order through one writer.
//!
//! Replies are simple unless the client negotiated structured replies; then a READ is
//! answered with one content chunk (`NBD_REPLY_TYPE_OFFSET_HOLE` when the data read is all
//! zeroes, else `OFFSET_DATA`), every error with an `NBD_REPLY_TYPE_ERROR` chunk carrying a
//! message, and other successes with a simple reply (the spec allows it for replies without
//! payload). `NBD_CMD_BLOCK_STATUS` needs negotiated metadata contexts and gets one
//! `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per context, each of at most `MAX_STATUS_EXTENTS`
//! descriptors within the range asked for.
//!
//! Memory is bounded per connection and across connections: a request is admitted only
//! once it holds one of `MAX_IN_FLIGHT_REQUESTS` request permits and, for READ, WRITE and
//! BLOCK_STATUS, as many byte permits as its payload or largest reply (out of
//! `MAX_IN_FLIGHT_BYTES`) and as many bytes of the server-wide
//! [`BufferBudget`](super::budget::BufferBudget). Permits travel with the reply and are
//! released once the writer has sent it, so a client that stops reading replies stops
//! being read from.
//!
//! A device may ask for its reads to be confirmed before they are sent (a time view beside
//! a running replay agent, `BlockDevice::read_to_confirm`): the writer asks once per batch of
//! replies, and reads again what is not confirmed.
//!
//! Must never: call the device for a request it rejected (bad flags, misaligned, out of
//! range, read-only, oversized, block status without contexts); send read data the device
//! asked to confirm before it confirmed it; send a reply for
//! `NBD_CMD_DISC`; send data after an error header; send a simple reply to a READ once
//! structured replies are negotiated, or a structured one before; let an error on one
//! request end the connection unless the byte stream can no longer be parsed (bad magic,
//! unreadable write payload); leave a request unanswered, even when the device call panics
//! (the client would wait for that handle forever, and the kernel's client hangs the disk).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::task::{self, Waker};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::budget::{Held, Holder};
use super::handshake::Session;
use super::meta::{Context, Selected};
use super::payload::{self, PayloadError};
use super::protocol::*;
use super::stop_requested;
use crate::block::allocation::Allocation;
use crate::block::buffers::BufferPool;
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo, ReadTicket};

/// Requests admitted but not yet answered, per connection. Deep enough for fio's
/// `iodepth=32` and qemu's 16 with room to spare.
const MAX_IN_FLIGHT_REQUESTS: usize = 128;
/// Payload bytes (write data held, read data produced) admitted but not yet answered,
/// per connection. At least one maximum-size request must fit.
const MAX_IN_FLIGHT_BYTES: usize = 4 * MAX_PAYLOAD as usize;

/// Every way a connection ends abnormally during transmission.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransmissionError {
    /// Reading from or writing to the client failed.
    #[error("connection failed during transmission: {0}")]
    Io(#[source] io::Error),
    /// A request header did not start with the request magic: the stream is out of sync.
    #[error("request header has magic {magic:#010x} instead of 0x25609513")]
    BadRequestMagic { magic: u32 },
    /// A WRITE carried more payload than the server accepts; it was answered with an
    /// error, but its payload cannot be skipped sensibly, so the connection is closed.
    #[error("write of {length} bytes exceeds the {MAX_PAYLOAD}-byte payload limit")]
    OversizedWrite { length: u32 },
    /// The client hung up in the middle of a write payload; the write was not applied.
    #[error("client disconnected after {received} of {length} payload bytes of a write")]
    TruncatedWrite { received: usize, length: u32 },
}

/// How a connection ended cleanly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    ClientClosed,
    /// The server is shutting down.
    Shutdown,
}

/// One decoded, validated operation.
enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// What a successful operation produced.
enum Done {
    Nothing,
    Data(Bytes),
    /// Per selected context: its ID and (length, status flags) descriptors.
    Status(Vec<(u32, Vec<(u32, u32)>)>),
}

/// Why a request was refused before it reached the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rejection {
    errno: u32,
    /// For the client's human (sent in a structured error chunk).
    why: &'static str,
}

fn reject(errno: u32, why: &'static str) -> Rejection {
    Rejection { errno, why }
}

/// A reply on its way to the writer, with the permits it releases once sent.
struct Reply {
    handle: u64,
    body: Body,
    /// A read whose data the device must confirm before it goes out.
    confirm: Option<ToConfirm>,
    _permits: Permits,
}

/// What the writer needs to check a read's data, and to read it again if the device does
/// not confirm it.
struct ToConfirm {
    ticket: ReadTicket,
    offset: u64,
    len: u32,
    structured: bool,
}

/// The bytes of one reply.
enum Body {
    /// A simple reply header (built by the writer) and, after a successful read, the data.
    Simple { error: u32, data: Option<Bytes> },
    /// Structured reply chunks, complete and in order (read data as its own part after
    /// its chunk's header, never copied).
    Chunks(Vec<Bytes>),
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    /// The payload's bytes in the server-wide budget.
    _buffered: Option<Held>,
}

/// Serves `export` on an established connection until the client disconnects, the
/// stream breaks, or `shutdown` turns true. In-flight requests always finish and their
/// replies are written (if the client is still there) before this returns.
pub(crate) async fn serve_export<R, W>(
    reader: R,
    writer: W,
    session: Session,
    shutdown: watch::Receiver<bool>,
    peer: &str,
    buffers: &Holder,
) -> Result<Ending, TransmissionError>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let (tx, rx) = mpsc::unbounded_channel();
    // Asked once per connection: only a device that wants its reads confirmed costs the
    // writer a look at each batch.
    let confirmer = session
        .export
        .device
        .reads_to_confirm()
        .then(|| Arc::clone(&session.export.device));
    let reads_to_confirm = confirmer.is_some();
    let reading = read_requests(
        reader,
        session,
        tx,
        shutdown,
        peer,
        buffers,
        reads_to_confirm,
    );
    let writing = write_replies(writer, rx, confirmer, peer);
    tokio::pin!(reading, writing);
    tokio::select! {
        read = &mut reading => {
            // The reader's sender is gone; the writer drains what the in-flight tasks
            // still send and then ends.
            let written = writing.await;
            let ending = read?;
            written.map_err(TransmissionError::Io)?;
            Ok(ending)
        }
        written = &mut writing => {
            // Replies can no longer be delivered; reading on would only pile up work.
            written.map_err(TransmissionError::Io)?;
            Err(TransmissionError::Io(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "reply writer stopped",
            )))
        }
    }
}

async fn read_requests<R>(
    mut reader: R,
    session: Session,
    tx: mpsc::UnboundedSender<Reply>,
    mut shutdown: watch::Receiver<bool>,
    peer: &str,
    buffers: &Holder,
    reads_to_confirm: bool,
) -> Result<Ending, TransmissionError>
where
    R: AsyncRead + Unpin,
{
    let export = session.export;
    let structured = session.structured;
    let contexts: Arc<[Selected]> = session.contexts.into();
    let info = export.device.info();
    // The largest block status reply: one full chunk per context.
    let status_reply_bound = contexts.len() * (CHUNK_HEADER_LEN + 4 + 8 * MAX_STATUS_EXTENTS);
    // Shared by every request task for its log lines, without a copy per request.
    let peer_tag: Arc<str> = Arc::from(peer);
    let request_permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS));
    let byte_permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES));
    // One wait for the shutdown for the whole connection, not one per request: a new wait
    // registers with the watch channel and a dropped one unregisters, both under its lock
    // (3% of the CPU of 4 KiB writes in the profile, bench/profile/). Both selects below
    // return once it is ready, so it is never polled after that.
    let stop = stop_requested(&mut shutdown);
    tokio::pin!(stop);
    loop {
        let mut raw = [0u8; REQUEST_LEN];
        tokio::select! {
            biased;
            _ = &mut stop => return Ok(Ending::Shutdown),
            read = read_header(&mut reader, &mut raw) => match read {
                Ok(true) => {}
                Ok(false) => return Ok(Ending::ClientClosed),
                Err(e) => return Err(TransmissionError::Io(e)),
            },
        }
        let request = Request::decode(&raw);
        if request.magic != REQUEST_MAGIC {
            return Err(TransmissionError::BadRequestMagic {
                magic: request.magic,
            });
        }
        if request.command == CMD_DISC {
            return Ok(Ending::Disconnect);
        }
        let request_permit = Arc::clone(&request_permits)
            .acquire_owned()
            .await
            .map_err(semaphore_closed)?;

        let is_write = request.command == CMD_WRITE;
        if is_write && request.length > MAX_PAYLOAD {
            let permits = Permits {
                _request: request_permit,
                _bytes: None,
                _buffered: None,
            };
            let rejection = reject(EINVAL, "write longer than the maximum payload");
            let _ = tx.send(rejected(request.handle, structured, rejection, permits));
            return Err(TransmissionError::OversizedWrite {
                length: request.length,
            });
        }
        let payload_bytes = match request.command {
            CMD_WRITE => request.length,
            CMD_READ if request.length <= MAX_PAYLOAD => request.length,
            CMD_BLOCK_STATUS => status_reply_bound as u32,
            _ => 0,
        };
        let (byte_permit, buffered) = if payload_bytes > 0 {
            let permit = Arc::clone(&byte_permits)
                .acquire_many_owned(payload_bytes)
                .await
                .map_err(semaphore_closed)?;
            // Waits while the server as a whole holds too much (this connection among the
            // heaviest): no further request is read from this client meanwhile. A client
            // that never takes its replies may wait here for good, so a shutdown ends the
            // wait (the request was not started; nothing is answered).
            let held = tokio::select! {
                biased;
                _ = &mut stop => return Ok(Ending::Shutdown),
                held = buffers.acquire(u64::from(payload_bytes)) => held,
            };
            (Some(permit), Some(held))
        } else {
            (None, None)
        };
        let permits = Permits {
            _request: request_permit,
            _bytes: byte_permit,
            _buffered: buffered,
        };

        // The payload must be consumed even if the write is then rejected, or the next
        // header would be read from the middle of it.
        let payload = if is_write {
            Some(read_payload(&mut reader, request.length).await?)
        } else {
            None
        };

        let op = match validate(&request, &info, structured, !contexts.is_empty()) {
            Ok(op) => op,
            Err(rejection) => {
                tracing::debug!(
                    peer,
                    export = %export.name,
                    command = request.command,
                    offset = request.offset,
                    length = request.length,
                    flags = request.flags,
                    errno = rejection.errno,
                    why = rejection.why,
                    "rejected NBD request"
                );
                let _ = tx.send(rejected(request.handle, structured, rejection, permits));
                continue;
            }
        };

        let device = Arc::clone(&export.device);
        let contexts = Arc::clone(&contexts);
        let tx = tx.clone();
        let peer = Arc::clone(&peer_tag);
        let handle = request.handle;
        let command = request.command;
        let read_at = request.offset;
        let read_len = request.length;
        let mut running = Box::pin(async move {
            // A panic inside the device is a bug, but the client is still owed a reply. The
            // device's own state is its business: a lock it held is poisoned and later calls
            // get that error, so unwinding past it here cannot make them see a torn state.
            let run = std::panic::AssertUnwindSafe(execute(
                device.as_ref(),
                &contexts,
                op,
                payload,
                reads_to_confirm,
            ));
            let mut confirm = None;
            let outcome = run.catch_unwind().await.map(|ran| {
                ran.map(|(done, ticket)| {
                    confirm = ticket.map(|ticket| ToConfirm {
                        ticket,
                        offset: read_at,
                        len: read_len,
                        structured,
                    });
                    done
                })
            });
            let body = outcome_body(outcome, handle, structured, read_at, command, &peer);
            // The writer is gone only if the connection broke; nobody to tell then.
            let _ = tx.send(Reply {
                handle,
                body,
                confirm,
                _permits: permits,
            });
        });
        // A write the page cache takes completes in its first poll (the inline `pwrite`),
        // so it runs here, on the reader's task: a task of its own per request cost a
        // spawn, and a wake-up of the other runtime thread to steal it, with no gain (0.58
        // context switches per request in bench/profile/). Only a request that has to
        // wait (an engine completion, the range lock, the journal's pool) becomes a task.
        // The no-op waker is never relied on: the spawned task's first poll registers its
        // own, and every future on this path takes the newest waker on each poll.
        if running
            .as_mut()
            .poll(&mut task::Context::from_waker(Waker::noop()))
            .is_pending()
        {
            tokio::spawn(running);
        }
    }
}

/// The reply to a device call's outcome: its result, or EIO for a panic (a bug in the
/// device, but the client is still owed a reply). Failures are logged with `peer`.
fn outcome_body(
    outcome: std::thread::Result<Result<Done, BlockError>>,
    handle: u64,
    structured: bool,
    offset: u64,
    command: u16,
    peer: &str,
) -> Body {
    match outcome {
        Ok(Ok(done)) => success(handle, structured, offset, done),
        Ok(Err(e)) => {
            let errno = errno_of(&e, command);
            tracing::warn!(%peer, command, errno, error = %e, "NBD request failed");
            failure(handle, structured, errno, message_of(errno))
        }
        Err(panic) => {
            let what = panic_text(panic.as_ref());
            tracing::error!(%peer, command, panic = what, "NBD request panicked; answered EIO");
            failure(handle, structured, EIO, message_of(EIO))
        }
    }
}

/// The message a panic carried, for the log line that replaces the lost task's.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(not a string)"
    }
}

/// The semaphores live as long as the reader and nobody closes them; should that ever
/// change, the connection ends with an error rather than a panic.
fn semaphore_closed(_: tokio::sync::AcquireError) -> TransmissionError {
    TransmissionError::Io(io::Error::other("in-flight limit semaphore closed"))
}

/// Reads one request header. `Ok(false)` means the client closed the connection
/// cleanly before the first byte.
async fn read_header<R: AsyncRead + Unpin>(
    reader: &mut R,
    raw: &mut [u8; REQUEST_LEN],
) -> io::Result<bool> {
    let first = reader.read(&mut raw[..]).await?;
    if first == 0 {
        return Ok(false);
    }
    reader.read_exact(&mut raw[first..]).await?;
    Ok(true)
}

async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: u32,
) -> Result<Bytes, TransmissionError> {
    payload::read_payload(BufferPool::shared(), reader, length as usize)
        .await
        .map_err(|e| match e {
            PayloadError::Truncated { received, .. } => {
                TransmissionError::TruncatedWrite { received, length }
            }
            PayloadError::Io(e) => TransmissionError::Io(e),
        })
}

/// Checks a request against the export and what the connection negotiated, before
/// anything touches the device.
fn validate(
    request: &Request,
    info: &DeviceInfo,
    structured: bool,
    has_contexts: bool,
) -> Result<Op, Rejection> {
    let command = request.command;
    let allowed_flags = match command {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        // The spec asks servers to accept FUA on every command.
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        // Unknown commands (CACHE, RESIZE, …) were never advertised.
        _ => return Err(reject(EINVAL, "unknown command")),
    };
    // The spec asks for EINVAL on flags not documented for the command (FAST_ZERO was
    // never advertised, DF only with structured replies).
    if request.flags & !allowed_flags != 0 {
        return Err(reject(EINVAL, "a command flag not valid for this command"));
    }
    let fua = request.flags & CMD_FLAG_FUA != 0;
    if command == CMD_FLUSH {
        // Offset and length are reserved for FLUSH; clients zero them, we ignore them.
        return Ok(Op::Flush);
    }
    if command == CMD_BLOCK_STATUS && !has_contexts {
        return Err(reject(
            EINVAL,
            "block status needs a metadata context (NBD_OPT_SET_META_CONTEXT)",
        ));
    }
    let modifies = !matches!(command, CMD_READ | CMD_BLOCK_STATUS);
    if modifies && info.read_only {
        return Err(reject(
            errno_of(&BlockError::ReadOnly, command),
            "the export is read-only",
        ));
    }
    if modifies {
        let supported = match command {
            CMD_TRIM => info.supports_trim,
            CMD_WRITE_ZEROES => info.supports_write_zeroes,
            _ => true,
        };
        if !supported {
            return Err(reject(
                errno_of(
                    &BlockError::NotSupported("not advertised for this export"),
                    command,
                ),
                "command not advertised for this export",
            ));
        }
    }
    let offset = request.offset;
    let len = u64::from(request.length);
    if let Err(e) = check_range(offset, len, info.size) {
        return Err(reject(
            errno_of(&e, command),
            "the request reaches past the end of the export",
        ));
    }
    if command == CMD_BLOCK_STATUS {
        // Block status may be unaligned (the spec discusses unaligned queries); only an
        // empty one has no answer.
        if request.length == 0 {
            return Err(reject(EINVAL, "block status of zero bytes"));
        }
        return Ok(Op::BlockStatus {
            offset,
            len: request.length,
            req_one: request.flags & CMD_FLAG_REQ_ONE != 0,
        });
    }
    let block = u64::from(info.block_size);
    if offset % block != 0 || len % block != 0 {
        // Below the advertised minimum block size.
        return Err(reject(
            EINVAL,
            "offset or length is not a multiple of the minimum block size",
        ));
    }
    Ok(match command {
        CMD_READ => {
            if request.length > MAX_PAYLOAD {
                // Neither reply may carry more than the advertised maximum payload.
                return Err(reject(EINVAL, "read longer than the maximum payload"));
            }
            Op::Read {
                offset,
                len: request.length,
            }
        }
        CMD_WRITE => Op::Write { offset, fua },
        CMD_TRIM => Op::Trim { offset, len, fua },
        _ => Op::WriteZeroes { offset, len, fua },
    })
}

/// The one place device errors become NBD error values.
fn errno_of(error: &BlockError, command: u16) -> u32 {
    match error {
        // The spec: ENOSPC for writes past the end, EINVAL for reads and trims.
        BlockError::OutOfRange { .. } if command == CMD_WRITE => ENOSPC,
        BlockError::OutOfRange { .. } => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::NotSupported(_) => EINVAL,
        BlockError::Io(e) => match e.raw_os_error() {
            // The spec asks for EDQUOT and EFBIG to be reported as ENOSPC.
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
            Some(libc::EOVERFLOW) => EOVERFLOW,
            _ => EIO,
        },
    }
}

/// A short sentence for an error chunk, by NBD error value (device errors are not shown
/// to clients: they may name server paths).
fn message_of(errno: u32) -> &'static str {
    match errno {
        EPERM => "operation not permitted",
        EIO => "I/O error on the server",
        ENOSPC => "no space left on the server's device",
        EOVERFLOW => "value too large",
        _ => "invalid request",
    }
}

/// Runs a validated operation; with `reads_to_confirm` (the device's
/// [`BlockDevice::reads_to_confirm`]), a read's data may come with a ticket the device wants
/// confirmed before it is sent.
async fn execute(
    device: &dyn BlockDevice,
    contexts: &[Selected],
    op: Op,
    payload: Option<Bytes>,
    reads_to_confirm: bool,
) -> Result<(Done, Option<ReadTicket>), BlockError> {
    let done = match op {
        Op::Read { len: 0, .. } => Ok(Done::Data(Bytes::new())),
        Op::Read { offset, len } if reads_to_confirm => {
            let (data, ticket) = device.read_to_confirm(offset, len).await?;
            return Ok((Done::Data(data), ticket));
        }
        Op::Read { offset, len } => device.read(offset, len).await.map(Done::Data),
        Op::Write { offset, fua } => {
            let data = payload.unwrap_or_default();
            if data.is_empty() {
                return Ok((Done::Nothing, None));
            }
            device
                .write(offset, data, fua)
                .await
                .map(|()| Done::Nothing)
        }
        Op::Flush => device.flush().await.map(|()| Done::Nothing),
        Op::Trim { len: 0, .. } | Op::WriteZeroes { len: 0, .. } => Ok(Done::Nothing),
        Op::Trim { offset, len, fua } => {
            device.trim(offset, len).await?;
            if fua {
                // The trait's trim has no FUA; a flush gives the same guarantee.
                device.flush().await?;
            }
            Ok(Done::Nothing)
        }
        Op::WriteZeroes { offset, len, fua } => device
            .write_zeroes(offset, len, fua)
            .await
            .map(|()| Done::Nothing),
        Op::BlockStatus {
            offset,
            len,
            req_one,
        } => {
            let max = if req_one { 1 } else { MAX_STATUS_EXTENTS };
            let len = u64::from(len);
            let mut chunks = Vec::with_capacity(contexts.len());
            for selected in contexts {
                let extents: Vec<(u64, u32)> = match &selected.context {
                    Context::Allocation => device
                        .allocation(offset, len, max)
                        .await?
                        .into_iter()
                        .map(|e| {
                            let status = match e.allocation {
                                Allocation::Data => 0,
                                Allocation::Zero => STATE_ZERO,
                                Allocation::Hole => STATE_HOLE | STATE_ZERO,
                            };
                            (e.len, status)
                        })
                        .collect(),
                    Context::Dirty(bitmap) => bitmap
                        .extents(offset, len, max)
                        .into_iter()
                        .map(|(l, dirty)| (l, if dirty { STATE_DIRTY } else { 0 }))
                        .collect(),
                };
                chunks.push((selected.id, descriptors(extents, len, max)));
            }
            Ok(Done::Status(chunks))
        }
    };
    done.map(|done| (done, None))
}

/// Block status descriptors from a source's extents, held to what the protocol promises
/// whatever the source returned: each nonzero, together within `len` (so each fits 32
/// bits), at most `max`, and at least one (a source that answered nothing is reported as
/// status 0, "data, not known zero", which is always true).
fn descriptors(extents: Vec<(u64, u32)>, len: u64, max: usize) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(extents.len().min(max));
    let mut left = len;
    for (l, status) in extents {
        if left == 0 || out.len() >= max {
            break;
        }
        let l = l.min(left);
        if l == 0 {
            continue;
        }
        left -= l;
        out.push((l as u32, status));
    }
    if out.is_empty() {
        out.push((len as u32, 0));
    }
    out
}

/// The reply to a request refused before it reached the device.
fn rejected(handle: u64, structured: bool, rejection: Rejection, permits: Permits) -> Reply {
    Reply {
        handle,
        body: failure(handle, structured, rejection.errno, rejection.why),
        confirm: None,
        _permits: permits,
    }
}

/// An error reply: a structured error chunk with `why` once negotiated, else a simple
/// reply with the error value.
fn failure(handle: u64, structured: bool, errno: u32, why: &str) -> Body {
    if structured {
        Body::Chunks(vec![Bytes::from(error_chunk(handle, errno, why))])
    } else {
        Body::Simple {
            error: errno,
            data: None,
        }
    }
}

/// The reply to a successful request (`offset`: where a read started).
fn success(handle: u64, structured: bool, offset: u64, done: Done) -> Body {
    match done {
        Done::Nothing => Body::Simple {
            error: 0,
            data: None,
        },
        Done::Data(data) if !structured => Body::Simple {
            error: 0,
            data: Some(data),
        },
        // A chunk must describe at least one byte: an empty read is only "done".
        Done::Data(data) if data.is_empty() => Body::Chunks(vec![Bytes::copy_from_slice(
            &chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0),
        )]),
        Done::Data(data) if is_zero(&data) => Body::Chunks(vec![Bytes::copy_from_slice(
            &offset_hole(REPLY_FLAG_DONE, handle, offset, data.len() as u32),
        )]),
        // The data is in hand, so no error can follow: the content chunk is the last.
        Done::Data(data) => Body::Chunks(vec![
            Bytes::copy_from_slice(&offset_data_header(
                REPLY_FLAG_DONE,
                handle,
                offset,
                data.len() as u32,
            )),
            data,
        ]),
        Done::Status(chunks) => {
            let last = chunks.len().saturating_sub(1);
            Body::Chunks(
                chunks
                    .into_iter()
                    .enumerate()
                    .map(|(i, (id, descriptors))| {
                        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
                        Bytes::from(block_status_chunk(flags, handle, id, &descriptors))
                    })
                    .collect(),
            )
        }
    }
}

/// Whether every byte is zero: such a read goes out as a hole chunk (12 bytes instead of
/// the data). Compares 64 bytes at a time; data that is not zero usually stops it at once.
fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    let whole = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0);
    whole && chunks.remainder().iter().all(|&b| b == 0)
}

/// Most replies gathered into one vectored write.
const MAX_REPLY_BATCH: usize = 64;

/// Writes replies as they arrive: everything queued by then goes out in one vectored write
/// (headers and read data side by side, no copy of the data), and the writer is flushed
/// whenever no further reply is queued, so a burst of completions costs one system call.
/// With `confirmer` (a device whose reads need confirming), its reads are confirmed once per
/// batch, before the batch is written.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    confirmer: Option<Arc<dyn BlockDevice>>,
    peer: &str,
) -> io::Result<()> {
    let mut batch = Vec::with_capacity(MAX_REPLY_BATCH);
    while rx.recv_many(&mut batch, MAX_REPLY_BATCH).await > 0 {
        if let Some(device) = &confirmer {
            confirm_reads(device.as_ref(), &mut batch, peer).await;
        }
        write_batch(&mut writer, &batch).await?;
        // Sent: the permits go back to the reader.
        batch.clear();
        if rx.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    // Ends a TLS session with close_notify (plain sockets just send FIN a little early);
    // the client may already be gone, which is fine.
    let _ = writer.shutdown().await;
    Ok(())
}

/// Asks the device once whether the batch's reads that need it may go out as read (every
/// one of them completed before its reply was queued, so before this check); if not, reads
/// each of them again through [`BlockDevice::read`], which checks on its own.
async fn confirm_reads(device: &dyn BlockDevice, batch: &mut [Reply], peer: &str) {
    let Some(oldest) = batch
        .iter()
        .filter_map(|r| r.confirm.as_ref().map(|c| c.ticket))
        .min()
    else {
        return;
    };
    if device.confirm_reads(oldest) {
        return;
    }
    for reply in batch.iter_mut() {
        let Some(c) = reply.confirm.take() else {
            continue;
        };
        let again = std::panic::AssertUnwindSafe(device.read(c.offset, c.len));
        let outcome = again.catch_unwind().await.map(|read| read.map(Done::Data));
        reply.body = outcome_body(
            outcome,
            reply.handle,
            c.structured,
            c.offset,
            CMD_READ,
            peer,
        );
    }
}

/// Writes `replies` (headers, and read data after each) with as few writes as the writer
/// takes. Simple reply headers live on the stack; the slice list is one allocation per
/// batch (not per reply). The writer is the connection's `BufWriter`: a batch smaller than
/// its buffer is copied into it (headers of write replies, a few small reads: one system
/// call for several batches while replies keep coming), a larger one goes to the socket as
/// it is.
async fn write_batch<W: AsyncWrite + Unpin>(writer: &mut W, replies: &[Reply]) -> io::Result<()> {
    for chunk in replies.chunks(MAX_REPLY_BATCH) {
        let mut headers = [[0u8; SIMPLE_REPLY_LEN]; MAX_REPLY_BATCH];
        for (header, reply) in headers.iter_mut().zip(chunk) {
            if let Body::Simple { error, .. } = reply.body {
                *header = simple_reply(error, reply.handle);
            }
        }
        let mut slices = Vec::with_capacity(2 * chunk.len());
        for (reply, header) in chunk.iter().zip(&headers) {
            match &reply.body {
                Body::Simple { data, .. } => {
                    slices.push(io::IoSlice::new(header));
                    if let Some(data) = data.as_ref().filter(|d| !d.is_empty()) {
                        slices.push(io::IoSlice::new(data));
                    }
                }
                Body::Chunks(parts) => {
                    slices.extend(parts.iter().map(|p| io::IoSlice::new(p)));
                }
            }
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let n = writer.write_vectored(rest).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    use super::*;
    use crate::nbd::test_device::{Reads, ReadsOnly};

    fn info(read_only: bool) -> DeviceInfo {
        DeviceInfo {
            size: 1 << 20,
            block_size: 512,
            read_only,
            supports_trim: true,
            supports_write_zeroes: true,
            flush_covers_all_connections: true,
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            magic: REQUEST_MAGIC,
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    fn errno(r: Request, read_only: bool) -> u32 {
        match validate(&r, &info(read_only), false, false) {
            Ok(_) => 0,
            Err(e) => e.errno,
        }
    }

    #[test]
    fn validation_picks_the_spec_errors() {
        assert_eq!(errno(req(CMD_READ, 0, 0, 4096), false), 0);
        assert_eq!(errno(req(CMD_READ, 0, 1 << 20, 512), false), EINVAL);
        assert_eq!(errno(req(CMD_WRITE, 0, 1 << 20, 512), false), ENOSPC);
        assert_eq!(errno(req(CMD_WRITE, 0, u64::MAX - 511, 512), false), ENOSPC);
        assert_eq!(
            errno(req(CMD_TRIM, 0, (1 << 20) - 512, 1024), false),
            EINVAL
        );
        assert_eq!(errno(req(CMD_READ, 0, 100, 512), false), EINVAL);
        assert_eq!(errno(req(CMD_WRITE, 0, 0, 100), false), EINVAL);
        assert_eq!(errno(req(CMD_WRITE, 0, 0, 512), true), EPERM);
        assert_eq!(errno(req(CMD_TRIM, 0, 0, 512), true), EPERM);
        assert_eq!(errno(req(CMD_WRITE_ZEROES, 0, 0, 512), true), EPERM);
        assert_eq!(errno(req(CMD_READ, 0, 0, 512), true), 0);
        assert_eq!(errno(req(7, 0, 0, 512), false), EINVAL);
        assert_eq!(
            errno(req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), false),
            EINVAL
        );
        assert_eq!(
            errno(
                req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, 0, 512),
                false
            ),
            0
        );
        assert_eq!(errno(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), false), 0);
        assert_eq!(errno(req(CMD_READ, 1 << 2, 0, 512), false), EINVAL);
        // Block status: only with contexts; within the export; may be unaligned.
        assert_eq!(errno(req(CMD_BLOCK_STATUS, 0, 0, 512), false), EINVAL);
        let status = |r: Request| match validate(&r, &info(true), true, true) {
            Ok(_) => 0,
            Err(e) => e.errno,
        };
        assert_eq!(
            status(req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20)),
            0
        );
        assert_eq!(status(req(CMD_BLOCK_STATUS, 0, 100, 7)), 0);
        assert_eq!(status(req(CMD_BLOCK_STATUS, 0, 1 << 20, 512)), EINVAL);
        assert_eq!(status(req(CMD_BLOCK_STATUS, 0, 0, 0)), EINVAL);
        assert_eq!(status(req(CMD_BLOCK_STATUS, CMD_FLAG_DF, 0, 512)), EINVAL);
        // DF only once structured replies were negotiated.
        assert_eq!(status(req(CMD_READ, CMD_FLAG_DF, 0, 512)), 0);
        assert_eq!(errno(req(CMD_READ, CMD_FLAG_DF, 0, 512), false), EINVAL);
    }

    #[test]
    fn descriptors_stay_within_the_request() {
        assert_eq!(
            descriptors(vec![(100, 1), (0, 2), (1000, 3)], 600, 10),
            [(100, 1), (500, 3)]
        );
        assert_eq!(descriptors(vec![(100, 1), (100, 2)], 600, 1), [(100, 1)]);
        assert_eq!(descriptors(vec![], 600, 10), [(600, 0)]);
        assert!(is_zero(&[0; 1000]));
        let mut late = vec![0u8; 1000];
        late[999] = 1;
        assert!(!is_zero(&late));
        late[999] = 0;
        late[3] = 1;
        assert!(!is_zero(&late));
    }

    /// A device whose reads wait at a gate, counting how many are inside at once.
    struct GatedDevice {
        gate: Semaphore,
        inside: std::sync::atomic::AtomicUsize,
        max_inside: std::sync::atomic::AtomicUsize,
        /// Reads at offset 0 wait for this; reads elsewhere open it unless `held`.
        slow: tokio::sync::Notify,
        /// Only the test opens `slow` (the read at offset 0 waits for it).
        held: bool,
        data: Bytes,
    }

    impl GatedDevice {
        fn new(gate_permits: usize) -> Arc<ReadsOnly<Self>> {
            Arc::new(ReadsOnly(Self {
                gate: Semaphore::new(gate_permits),
                inside: Default::default(),
                max_inside: Default::default(),
                slow: tokio::sync::Notify::new(),
                held: false,
                data: Bytes::from(vec![0x5a; MAX_PAYLOAD as usize]),
            }))
        }

        /// A device whose read at offset 0 waits until the test opens `slow`.
        fn held() -> Arc<ReadsOnly<Self>> {
            let mut device = Arc::into_inner(Self::new(1000)).expect("only handle");
            device.0.held = true;
            Arc::new(device)
        }
    }

    #[async_trait::async_trait]
    impl Reads for GatedDevice {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                size: 1 << 30,
                ..info(false)
            }
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
            let now = self.inside.fetch_add(1, SeqCst) + 1;
            self.max_inside.fetch_max(now, SeqCst);
            if offset == 0 {
                self.slow.notified().await;
            } else if !self.held {
                self.slow.notify_one();
            }
            self.gate.acquire().await.expect("gate").forget();
            self.inside.fetch_sub(1, SeqCst);
            Ok(self.data.slice(..len as usize))
        }
    }

    type Client = tokio::io::DuplexStream;

    type Started = (
        Client,
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<Ending, TransmissionError>>,
    );

    /// Starts `serve_export` on one end of an in-memory pipe; returns the client end.
    fn start(device: Arc<ReadsOnly<GatedDevice>>) -> Started {
        start_in(device, super::super::BufferBudget::default())
    }

    /// [`start`], sharing `budget` with whoever else holds it.
    fn start_in<D: BlockDevice + 'static>(
        device: Arc<D>,
        budget: super::super::BufferBudget,
    ) -> Started {
        let (client, server) = tokio::io::duplex(4 << 20);
        let (reader, writer) = tokio::io::split(server);
        let export = Arc::new(super::super::Export {
            name: "gated".into(),
            description: String::new(),
            device,
        });
        let session = Session {
            export,
            structured: false,
            contexts: Vec::new(),
        };
        let (stop, shutdown) = watch::channel(false);
        let buffers = budget.holder();
        let task = tokio::spawn(async move {
            serve_export(reader, writer, session, shutdown, "test", &buffers).await
        });
        (client, stop, task)
    }

    async fn send_read(client: &mut Client, handle: u64, offset: u64, length: u32) {
        let r = req(CMD_READ, 0, offset, length);
        let r = Request { handle, ..r };
        client.write_all(&r.encode()).await.unwrap();
    }

    /// Reads one reply and its `len` data bytes; returns the handle.
    async fn recv_read(client: &mut Client, len: usize) -> u64 {
        let mut header = [0u8; SIMPLE_REPLY_LEN];
        client.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&header[4..8], &[0, 0, 0, 0], "error field");
        let mut data = vec![0u8; len];
        client.read_exact(&mut data).await.unwrap();
        assert!(data.iter().all(|&b| b == 0x5a));
        u64::from_be_bytes(header[8..16].try_into().unwrap())
    }

    /// A device whose reads at offset 0 panic, as a bug in a device would.
    struct PanickingDevice;

    #[async_trait::async_trait]
    impl Reads for PanickingDevice {
        fn info(&self) -> DeviceInfo {
            info(false)
        }
        async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
            assert_ne!(offset, 0, "a bug in the device");
            Ok(Bytes::from(vec![0x5a; len as usize]))
        }
    }

    /// A device whose bytes all read as its version, like a time view's replica that a
    /// replay agent changes: a read at offset 4096 is followed at once by a change (the
    /// version goes up), so its data must not be sent unconfirmed.
    #[derive(Default)]
    struct Changing {
        version: AtomicU64,
        confirms: AtomicU64,
        /// Reads through `read`: the frontend's reads again.
        plain_reads: AtomicU64,
    }

    #[async_trait::async_trait]
    impl Reads for Changing {
        fn info(&self) -> DeviceInfo {
            info(true)
        }
        async fn read(&self, _: u64, len: u32) -> Result<Bytes, BlockError> {
            self.plain_reads.fetch_add(1, SeqCst);
            Ok(Bytes::from(vec![
                self.version.load(SeqCst) as u8;
                len as usize
            ]))
        }
        fn reads_to_confirm(&self) -> bool {
            true
        }
        async fn read_to_confirm(
            &self,
            offset: u64,
            len: u32,
        ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
            let version = self.version.load(SeqCst);
            let data = Bytes::from(vec![version as u8; len as usize]);
            if offset == 4096 {
                self.version.fetch_add(1, SeqCst);
            }
            Ok((data, Some(ReadTicket(version))))
        }
        fn confirm_reads(&self, oldest: ReadTicket) -> bool {
            self.confirms.fetch_add(1, SeqCst);
            oldest.0 == self.version.load(SeqCst)
        }
    }

    /// A read the device does not confirm goes out read again (the bytes after the change),
    /// never as first read; one the device confirms goes out as read, with no second read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_the_device_does_not_confirm_is_read_again_before_it_is_sent() {
        /// One reply's handle and the one byte value its data holds.
        async fn reply(client: &mut Client, len: usize) -> (u64, u8) {
            let mut header = [0u8; SIMPLE_REPLY_LEN];
            client.read_exact(&mut header).await.unwrap();
            assert_eq!(&header[4..8], &[0, 0, 0, 0], "error field");
            let mut data = vec![0u8; len];
            client.read_exact(&mut data).await.unwrap();
            assert!(data.iter().all(|&b| b == data[0]), "one version per read");
            (
                u64::from_be_bytes(header[8..16].try_into().unwrap()),
                data[0],
            )
        }
        let device = Arc::new(ReadsOnly(Changing::default()));
        let (mut client, _stop, _task) =
            start_in(Arc::clone(&device), super::super::BufferBudget::default());
        send_read(&mut client, 1, 0, 512).await;
        assert_eq!(
            reply(&mut client, 512).await,
            (1, 0),
            "confirmed: sent as read"
        );
        assert_eq!(device.plain_reads.load(SeqCst), 0);
        send_read(&mut client, 2, 4096, 512).await;
        assert_eq!(
            reply(&mut client, 512).await,
            (2, 1),
            "unconfirmed: the bytes after the change"
        );
        assert_eq!(device.plain_reads.load(SeqCst), 1);
        send_read(&mut client, 3, 0, 512).await;
        assert_eq!(reply(&mut client, 512).await, (3, 1));
        assert_eq!(device.plain_reads.load(SeqCst), 1);
        assert_eq!(device.confirms.load(SeqCst), 3, "one check per batch");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_device_call_gets_an_eio_reply_and_the_connection_goes_on() {
        let (mut client, _stop, _task) = start_in(
            Arc::new(ReadsOnly(PanickingDevice)),
            super::super::BufferBudget::default(),
        );
        send_read(&mut client, 7, 0, 512).await;
        let mut header = [0u8; SIMPLE_REPLY_LEN];
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            client.read_exact(&mut header),
        )
        .await
        .expect("a reply to the request whose device call panicked")
        .unwrap();
        assert_eq!(&header[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(header[4..8].try_into().unwrap()), EIO);
        assert_eq!(u64::from_be_bytes(header[8..16].try_into().unwrap()), 7);
        // The same connection still serves the next request.
        send_read(&mut client, 8, 512, 512).await;
        assert_eq!(recv_read(&mut client, 512).await, 8);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_go_out_in_completion_order() {
        let device = GatedDevice::held();
        let (mut client, _stop, _task) = start(Arc::clone(&device));
        // Request 1 cannot finish until the client has request 2's reply: a server that
        // answered in request order would hang here. (Opening request 1 from inside request
        // 2's read raced: both could then finish, in either order.)
        send_read(&mut client, 1, 0, 512).await;
        send_read(&mut client, 2, 512, 512).await;
        let replies = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let a = recv_read(&mut client, 512).await;
            device.slow.notify_one();
            let b = recv_read(&mut client, 512).await;
            (a, b)
        })
        .await
        .expect("replies");
        assert_eq!(replies, (2, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_flight_requests_and_bytes_are_bounded() {
        for (count, len, limit) in [
            (300u64, 4096u32, MAX_IN_FLIGHT_REQUESTS),
            (10, MAX_PAYLOAD, MAX_IN_FLIGHT_BYTES / MAX_PAYLOAD as usize),
        ] {
            let device = GatedDevice::new(0);
            let (mut client, _stop, _task) = start(Arc::clone(&device));
            for h in 0..count {
                send_read(&mut client, h, 4096 * (h + 1), len).await;
            }
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while device.inside.load(SeqCst) < limit {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "requests never arrived"
                );
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            // Give an unbounded server the chance to admit more than it should.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            assert_eq!(device.max_inside.load(SeqCst), limit);
            device.gate.add_permits(count as usize);
            let mut seen = Vec::new();
            for _ in 0..count {
                seen.push(recv_read(&mut client, len as usize).await);
            }
            seen.sort();
            assert_eq!(seen, (0..count).collect::<Vec<_>>());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_in_flight_requests() {
        let device = GatedDevice::new(0);
        let (mut client, stop, task) = start(Arc::clone(&device));
        send_read(&mut client, 7, 4096, 512).await;
        while device.inside.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        stop.send(true).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !task.is_finished(),
            "returned with a request still in flight"
        );
        device.gate.add_permits(1);
        assert_eq!(recv_read(&mut client, 512).await, 7);
        let ending = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("serve_export returned")
            .unwrap()
            .unwrap();
        assert_eq!(ending, Ending::Shutdown);
        // And the server closed its end.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_ends_a_wait_for_buffer_memory() {
        let budget = super::super::BufferBudget::new(super::super::MIN_MAX_BUFFERED).unwrap();
        // Another connection holds the whole shared part (3/4 of the cap).
        let other = budget.holder();
        let _full = other.acquire(48 << 20).await;
        let device = GatedDevice::new(1);
        let (mut client, stop, task) = start_in(Arc::clone(&device), budget.clone());
        send_read(&mut client, 1, 4096, 2 << 20).await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while budget.status().throttled == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the read never waited"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        let ending = tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("serve_export returned")
            .unwrap()
            .unwrap();
        assert_eq!(ending, Ending::Shutdown);
        // The read never reached the device, and the connection gave back all it held.
        assert_eq!(
            device.max_inside.load(std::sync::atomic::Ordering::SeqCst),
            0
        );
        assert_eq!(
            (budget.status().held, budget.status().throttled),
            (48 << 20, 0)
        );
    }

    /// Takes at most 7 bytes per write: every slice boundary and partial write happens.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(7);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_reply_batch_goes_out_whole_and_in_order() {
        let permits = Arc::new(Semaphore::new(1000));
        let mut replies = Vec::new();
        let mut expected = Vec::new();
        // More than one batch's worth, so the chunking is exercised too.
        for handle in 0..(MAX_REPLY_BATCH as u64 + 10) {
            let body = match handle % 4 {
                0 => Body::Simple {
                    error: 0,
                    data: Some(Bytes::from(vec![handle as u8; 5 + handle as usize])),
                },
                1 => Body::Simple {
                    error: EIO,
                    data: None,
                },
                2 => Body::Simple {
                    error: 0,
                    data: Some(Bytes::new()),
                },
                _ => success(
                    handle,
                    true,
                    4096,
                    Done::Data(Bytes::from(vec![7u8; handle as usize])),
                ),
            };
            match &body {
                Body::Simple { error, data } => {
                    expected.extend_from_slice(&simple_reply(*error, handle));
                    if let Some(d) = data {
                        expected.extend_from_slice(d);
                    }
                }
                Body::Chunks(parts) => {
                    expected.extend_from_slice(&offset_data_header(
                        REPLY_FLAG_DONE,
                        handle,
                        4096,
                        handle as u32,
                    ));
                    expected.extend_from_slice(&vec![7u8; handle as usize]);
                    assert_eq!(parts.len(), 2);
                }
            }
            replies.push(Reply {
                handle,
                body,
                confirm: None,
                _permits: Permits {
                    _request: Arc::clone(&permits).acquire_owned().await.unwrap(),
                    _bytes: None,
                    _buffered: None,
                },
            });
        }
        let mut out = Trickle(Vec::new());
        write_batch(&mut out, &replies).await.unwrap();
        assert_eq!(out.0, expected);
    }

    #[test]
    fn io_errors_map_to_nbd_values() {
        let io = |code| BlockError::Io(io::Error::from_raw_os_error(code));
        assert_eq!(errno_of(&io(libc::EIO), CMD_WRITE), EIO);
        assert_eq!(errno_of(&io(libc::EDQUOT), CMD_WRITE), ENOSPC);
        assert_eq!(errno_of(&io(libc::EFBIG), CMD_WRITE), ENOSPC);
        assert_eq!(errno_of(&io(libc::EBADF), CMD_READ), EIO);
        assert_eq!(errno_of(&BlockError::ReadOnly, CMD_TRIM), EPERM);
    }
}
