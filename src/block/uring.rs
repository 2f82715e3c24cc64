//! The io_uring engine of the file target: one ring per device, shared by every task that
//! does I/O on it, with no thread of its own.
//!
//! A task submits its operation itself (one `io_uring_enter` under the ring's mutex) and
//! looks at the completion queue at once: what the kernel finished inline (a read the page
//! cache holds) costs no wake-up at all. What the kernel finishes later (a buffered write it
//! hands to its own workers, an `fdatasync`) signals an eventfd registered with the ring; a
//! reaper task on the runtime waits for it and reaps every completion queued by then in one
//! pass, waking each waiting task. (Not `IORING_REGISTER_EVENTFD_ASYNC`: recent kernels post
//! a worker's completion from the submitting thread's task work, which that flag treats as
//! inline and never signals.) So a burst of
//! completions costs one wake-up of the runtime, not one per request, and no request
//! crosses to another user thread.
//!
//! Buffers: every operation's buffer ([`Buffer`]) is moved into its slot and given back with
//! the completion. A waiting future that is dropped leaves its slot *abandoned*: the buffer
//! stays alive until the kernel's completion has been reaped.
//!
//! Must never: free or move a buffer the kernel may still use (slots own them until their
//! completion is reaped; dropping the ring waits for every operation in flight); close the
//! file while an operation on it may be in flight (the ring holds the file); hold the
//! ring's mutex across an await.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use crate::aligned::AlignedBuf;

/// Submission queue entries. Entries leave the queue at every submit, so only a submit the
/// kernel refused (`EAGAIN`/`EBUSY`) can leave more than one waiting.
const SQ_ENTRIES: u32 = 256;
/// Completion queue entries: room for every request the NBD connections may have in
/// flight before the kernel has to keep completions on its overflow list.
const CQ_ENTRIES: u32 = 4096;

/// An `eventfd(2)`, non-blocking.
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes two integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Resets the counter; `WouldBlock` when it was already zero.
    fn drain(&self) -> io::Result<()> {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a local u64.
        let n = unsafe { libc::read(self.raw(), (&mut value as *mut u64).cast(), 8) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Adds one to the counter (wakes whoever waits on it).
    fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a local u64. A full counter (EAGAIN) is still a
        // pending signal, which is all this is for.
        unsafe { libc::write(self.raw(), (&one as *const u64).cast(), 8) };
    }
}

/// The eventfd as the reaper's `AsyncFd` sees it (shared with the ring, which signals it
/// when it is dropped so that the reaper ends).
struct Watched(Arc<EventFd>);

impl AsRawFd for Watched {
    fn as_raw_fd(&self) -> RawFd {
        self.0.raw()
    }
}

/// The memory an operation transfers, kept alive by its slot until the kernel is done.
pub(crate) enum Buffer {
    /// No data (fdatasync).
    None,
    /// A write's source, shared with the caller (no copy).
    Shared(Bytes),
    /// A buffered read's destination.
    Owned(Vec<u8>),
    /// An `O_DIRECT` transfer's aligned bounce buffer.
    Aligned(AlignedBuf),
}

impl Buffer {
    /// The bytes a read may fill (none for `None` and `Shared`).
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Buffer::None | Buffer::Shared(_) => &mut [],
            Buffer::Owned(v) => v,
            Buffer::Aligned(a) => a.as_mut_slice(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buffer::None => 0,
            Buffer::Shared(b) => b.len(),
            Buffer::Owned(v) => v.len(),
            Buffer::Aligned(a) => a.as_slice().len(),
        }
    }
}

/// One operation submitted and not yet given back to its future.
struct Slot {
    /// The CQE's result once reaped.
    result: Option<i32>,
    waker: Option<std::task::Waker>,
    /// The future is gone: drop the slot when the completion arrives.
    abandoned: bool,
    buffer: Buffer,
}

struct State {
    ring: IoUring,
    slots: Slab<Slot>,
}

/// One io_uring serving one file.
///
/// # Invariants
/// - Every submitted entry's `user_data` is the key of a live slot, and that slot owns the
///   buffer the entry points into until its completion is reaped.
/// - `file` outlives every operation (the ring drains them before it is dropped).
pub(crate) struct Ring {
    state: Mutex<State>,
    signal: Arc<EventFd>,
    file: Arc<File>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// Sets up a ring for `file` and starts its reaper on the current tokio runtime.
    pub(crate) fn new(file: Arc<File>) -> io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the io_uring engine needs a tokio runtime to complete requests on")
        })?;
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        let signal = Arc::new(EventFd::new()?);
        ring.submitter().register_eventfd(signal.raw())?;
        let watched = {
            let _entered = runtime.enter();
            // SAFETY: `Watched` holds the eventfd's owner, so the descriptor stays open and
            // the same for as long as the AsyncFd lives.
            unsafe {
                AsyncFd::register_with_interest(
                    Watched(Arc::clone(&signal)),
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| e.into_parts().1)?
        };
        let ring = Arc::new(Ring {
            state: Mutex::new(State {
                ring,
                slots: Slab::new(),
            }),
            signal,
            file,
        });
        runtime.spawn(reap_when_signalled(watched, Arc::downgrade(&ring)));
        Ok(ring)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every await-free step; a panic elsewhere while it
        // was held leaves nothing half-done that matters here.
        crate::sync::lock(&self.state)
    }

    /// Writes `buffer[from..]` at `offset`; returns the bytes written and the buffer.
    pub(crate) async fn write(
        self: &Arc<Self>,
        buffer: Buffer,
        from: usize,
        offset: u64,
    ) -> io::Result<(usize, Buffer)> {
        let ptr: *const u8 = match &buffer {
            Buffer::None => return Ok((0, buffer)),
            Buffer::Shared(b) => b.as_ptr(),
            Buffer::Owned(v) => v.as_ptr(),
            Buffer::Aligned(a) => a.as_slice().as_ptr(),
        };
        let len = transfer_len(&buffer, from)?;
        // SAFETY: `from <= len(buffer)` (checked by transfer_len); the slot keeps the
        // buffer, whose heap memory does not move with it, until the completion is reaped.
        let entry = opcode::Write::new(
            types::Fd(self.file.as_raw_fd()),
            unsafe { ptr.add(from) },
            len,
        )
        .offset(offset)
        .build();
        let (n, buffer) = self.run(entry, buffer).await?;
        Ok((n as usize, buffer))
    }

    /// Reads into `buffer[from..end]` from `offset`; returns the bytes read and the buffer.
    pub(crate) async fn read(
        self: &Arc<Self>,
        mut buffer: Buffer,
        from: usize,
        end: usize,
        offset: u64,
    ) -> io::Result<(usize, Buffer)> {
        let ptr: *mut u8 = match &mut buffer {
            Buffer::None => return Ok((0, buffer)),
            Buffer::Shared(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "cannot read into a shared buffer",
                ))
            }
            Buffer::Owned(v) => v.as_mut_ptr(),
            Buffer::Aligned(a) => a.as_mut_slice().as_mut_ptr(),
        };
        let len = transfer_len(&buffer, from)?;
        if end < from || end - from > len as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read ends past its buffer",
            ));
        }
        let len = (end - from) as u32;
        // SAFETY: as in `write`; the buffer is exclusively owned by the slot meanwhile.
        let entry = opcode::Read::new(
            types::Fd(self.file.as_raw_fd()),
            unsafe { ptr.add(from) },
            len,
        )
        .offset(offset)
        .build();
        let (n, buffer) = self.run(entry, buffer).await?;
        Ok((n as usize, buffer))
    }

    /// `fdatasync` of the file.
    pub(crate) async fn sync_data(self: &Arc<Self>) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(self.file.as_raw_fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        self.run(entry, Buffer::None).await.map(|_| ())
    }

    /// Submits `entry`, which points into `buffer` (or nowhere), and waits for it.
    async fn run(
        self: &Arc<Self>,
        entry: squeue::Entry,
        buffer: Buffer,
    ) -> io::Result<(u32, Buffer)> {
        let (result, buffer) = Completion {
            ring: Arc::clone(self),
            unsubmitted: Some((entry, buffer)),
            key: 0,
            finished: false,
        }
        .await?;
        if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else {
            Ok((result as u32, buffer))
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Operations whose futures were dropped may still be in flight: wait for them, so
        // their buffers (and the file) are not freed under the kernel.
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        while !state.slots.is_empty() {
            if state.ring.submit_and_wait(1).is_err() {
                // Cannot wait: leak the buffers rather than free memory the kernel may
                // still write to.
                std::mem::forget(std::mem::take(&mut state.slots));
                break;
            }
            reap(state);
        }
        // Ends the reaper.
        self.signal.signal();
    }
}

/// The bytes from `from` to the end of `buffer`, as the u32 an SQE carries.
fn transfer_len(buffer: &Buffer, from: usize) -> io::Result<u32> {
    let len = buffer.len().checked_sub(from).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "transfer starts past its buffer",
        )
    })?;
    u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "transfer over 4 GiB"))
}

/// `io_uring_enter` for what is queued, retrying on EINTR.
fn submit(ring: &IoUring) -> io::Result<usize> {
    loop {
        match ring.submit() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Refusals after which the entries stay queued and a later submit takes them.
fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY))
}

/// Moves every queued completion into its slot and wakes its future (or drops an
/// abandoned slot).
fn reap(state: &mut State) {
    let State { ring, slots } = state;
    for cqe in ring.completion() {
        let key = cqe.user_data() as usize;
        let Some(slot) = slots.get_mut(key) else {
            continue;
        };
        if slot.abandoned {
            slots.remove(key);
        } else {
            slot.result = Some(cqe.result());
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    }
}

/// Waits on the ring's eventfd and reaps after each signal; ends when the ring is gone.
async fn reap_when_signalled(watched: AsyncFd<Watched>, ring: Weak<Ring>) {
    loop {
        let mut guard = match watched.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!(error = %e, "io_uring completion signal failed");
                return;
            }
        };
        // Reset the counter; readiness is cleared when it reads as empty.
        while let Ok(result) = guard.try_io(|fd| fd.get_ref().0.drain()) {
            if let Err(e) = result {
                tracing::error!(error = %e, "reading the io_uring eventfd failed");
                return;
            }
        }
        let Some(ring) = ring.upgrade() else {
            return;
        };
        let mut state = ring.lock();
        reap(&mut state);
        if !state.ring.submission().is_empty() {
            let _ = submit(&state.ring);
        }
    }
}

/// One operation: submitted at its first poll, then the wait for its slot's completion.
/// Submitting, looking for an inline completion and registering the waker take the ring's
/// mutex once together (as two steps it was a contended lock twice per request in the
/// profile of 4 KiB writes: bench/profile/).
struct Completion {
    ring: Arc<Ring>,
    /// The entry and its buffer until the first poll submits them.
    unsubmitted: Option<(squeue::Entry, Buffer)>,
    /// The slot, once submitted.
    key: usize,
    finished: bool,
}

impl Completion {
    /// Moves the buffer into a new slot and hands the entry to the kernel.
    fn submit(state: &mut State, entry: squeue::Entry, buffer: Buffer) -> io::Result<usize> {
        let key = state.slots.insert(Slot {
            result: None,
            waker: None,
            abandoned: false,
            buffer,
        });
        let entry = entry.user_data(key as u64);
        // SAFETY: the entry's pointers stay valid (see the struct invariants of `Ring`).
        let mut pushed = unsafe { state.ring.submission().push(&entry).is_ok() };
        if !pushed {
            // Entries a refused submit left behind: try to hand them over first.
            let _ = submit(&state.ring);
            // SAFETY: as above.
            pushed = unsafe { state.ring.submission().push(&entry).is_ok() };
        }
        if !pushed {
            state.slots.remove(key);
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "io_uring submission queue full",
            ));
        }
        if let Err(e) = submit(&state.ring) {
            // The entry stays queued: the next submit (this operation's poll, or the
            // reaper's) hands it over.
            if !is_transient(&e) {
                tracing::warn!(error = %e, "io_uring submit failed; will retry");
            }
        }
        Ok(key)
    }
}

impl Future for Completion {
    type Output = io::Result<(i32, Buffer)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut state = this.ring.lock();
        if let Some((entry, buffer)) = this.unsubmitted.take() {
            match Completion::submit(&mut state, entry, buffer) {
                Ok(key) => this.key = key,
                Err(e) => {
                    this.finished = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        reap(&mut state);
        let slot = &mut state.slots[this.key];
        if let Some(result) = slot.result {
            let slot = state.slots.remove(this.key);
            this.finished = true;
            return Poll::Ready(Ok((result, slot.buffer)));
        }
        match &slot.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        if !state.ring.submission().is_empty() {
            // A submit was refused: try again, and come back soon if it still is.
            let _ = submit(&state.ring);
            if !state.ring.submission().is_empty() {
                cx.waker().wake_by_ref();
            }
        }
        Poll::Pending
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.finished || self.unsubmitted.is_some() {
            // Done, or never handed to the kernel (the buffer is simply dropped).
            return;
        }
        let mut state = self.ring.lock();
        let slot = &mut state.slots[self.key];
        if slot.result.is_some() {
            state.slots.remove(self.key);
        } else {
            slot.abandoned = true;
            slot.waker = None;
        }
    }
}
