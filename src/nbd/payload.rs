//! Write payload buffers, recycled: a large WRITE's payload is read into a buffer taken from
//! a bounded shelf of buffers earlier requests gave back, instead of a fresh allocation.
//!
//! A fresh 1 MiB allocation is memory the allocator maps and unmaps per request: every page
//! of it faults (and is zeroed by the kernel) while the socket's bytes are copied in, and
//! the unmap flushes it again. Profiled under fio 1 MiB writes, that was about 60 % of
//! `serve --no-journal`'s CPU. A recycled buffer has its pages mapped already.
//!
//! A buffer handed out becomes the write's [`Bytes`] (through [`Bytes::from_owner`]) and
//! goes back on the shelf when the last clone is dropped: after the device's write, or after
//! the journal has encoded the record that shares it. Buffers are `O_DIRECT`-aligned
//! ([`AlignedBuf`]), so a direct-I/O target can write them without a bounce copy.
//!
//! Must never: expose bytes beyond what this request's payload filled (the `Bytes` covers
//! exactly the payload; a payload cut short is an error and its buffer is never shown to
//! anyone); hold more than [`SHELF_BYTES`] of idle buffers; hand one buffer to two
//! requests at once (a buffer is on the shelf only while no `Bytes` refers to it).

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::block::file::AlignedBuf;

/// Payloads at least this long are read into recycled buffers; smaller ones come from the
/// allocator, whose per-thread caches serve them without new mappings.
pub(crate) const MIN_RECYCLED: usize = 64 << 10;
/// Most bytes of idle buffers the process-wide shelf keeps (one maximum-size payload).
pub(crate) const SHELF_BYTES: usize = super::protocol::MAX_PAYLOAD as usize;
/// New buffers are a whole number of these (pages). An idle buffer serves any payload it
/// holds with at most a quarter of it to spare, so that payloads of nearly the same length
/// share buffers and a small payload does not pin a large one.
const GRANULE: usize = 4096;

/// Every way reading a payload fails.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PayloadError {
    /// The stream ended before the payload was complete.
    #[error("stream ended after {received} of {length} payload bytes")]
    Truncated { received: usize, length: usize },
    /// Reading from the stream, or allocating a buffer, failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// A bounded shelf of idle payload buffers. Cheap to clone (shared).
#[derive(Clone)]
pub(crate) struct PayloadPool {
    shelf: Arc<Mutex<Shelf>>,
}

/// # Invariants
/// `bytes` is the sum of the lengths of `idle`, and at most `limit`.
struct Shelf {
    /// Oldest first; a buffer put back goes to the back and is taken from there first
    /// (its pages are the most likely to be in the CPU's caches).
    idle: VecDeque<AlignedBuf>,
    bytes: usize,
    limit: usize,
}

impl PayloadPool {
    /// A pool whose shelf keeps at most `limit` bytes of idle buffers.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            shelf: Arc::new(Mutex::new(Shelf {
                idle: VecDeque::new(),
                bytes: 0,
                limit,
            })),
        }
    }

    /// The pool every NBD connection of this process shares.
    pub(crate) fn shared() -> &'static PayloadPool {
        static SHARED: OnceLock<PayloadPool> = OnceLock::new();
        SHARED.get_or_init(|| PayloadPool::new(SHELF_BYTES))
    }

    /// Reads exactly `length` payload bytes from `reader` (never more: the next request's
    /// header may follow in the stream).
    pub(crate) async fn read<R: AsyncRead + Unpin>(
        &self,
        reader: &mut R,
        length: usize,
    ) -> Result<Bytes, PayloadError> {
        if length < MIN_RECYCLED {
            return read_fresh(reader, length).await;
        }
        let mut buffer = self.take(length)?;
        let mut filled = 0;
        while filled < length {
            match reader.read(&mut buffer.as_mut_slice()[filled..length]).await {
                Ok(0) => {
                    // The buffer's old and partial content is not handed out: back it goes.
                    self.give_back(buffer);
                    return Err(PayloadError::Truncated {
                        received: filled,
                        length,
                    });
                }
                Ok(n) => filled += n,
                Err(e) => {
                    self.give_back(buffer);
                    return Err(PayloadError::Io(e));
                }
            }
        }
        Ok(Bytes::from_owner(Lent {
            buffer: Some(buffer),
            length,
            pool: self.clone(),
        }))
    }

    /// An idle buffer that fits `length` with at most a quarter to spare, or a new one.
    fn take(&self, length: usize) -> io::Result<AlignedBuf> {
        let size = length.div_ceil(GRANULE) * GRANULE;
        let fits = |b: &AlignedBuf| b.len() >= size && b.len() - size <= size / 4;
        {
            let mut shelf = self.lock();
            if let Some(i) = shelf.idle.iter().rposition(fits) {
                let size = shelf.idle[i].len();
                if let Some(buffer) = shelf.idle.remove(i) {
                    shelf.bytes -= size;
                    return Ok(buffer);
                }
            }
        }
        AlignedBuf::zeroed(size)
    }

    /// Puts `buffer` on the shelf, making room by dropping the oldest idle buffers; one
    /// larger than the whole shelf is simply freed.
    fn give_back(&self, buffer: AlignedBuf) {
        let size = buffer.len();
        let mut shelf = self.lock();
        if size > shelf.limit {
            return;
        }
        while shelf.bytes + size > shelf.limit {
            match shelf.idle.pop_front() {
                Some(old) => shelf.bytes -= old.len(),
                None => break,
            }
        }
        shelf.bytes += size;
        shelf.idle.push_back(buffer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shelf> {
        // Every step under the lock leaves the shelf consistent.
        self.shelf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle buffers and their bytes (for tests).
    #[cfg(test)]
    fn idle(&self) -> (usize, usize) {
        let shelf = self.lock();
        (shelf.idle.len(), shelf.bytes)
    }
}

/// A recycled buffer lent to one payload: the owner behind the payload's [`Bytes`], which
/// puts the buffer back on the shelf when the last clone is dropped.
struct Lent {
    /// `Some` until dropped.
    buffer: Option<AlignedBuf>,
    /// The payload's length: the only bytes the `Bytes` shows.
    length: usize,
    pool: PayloadPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.buffer
            .as_ref()
            .map_or(&[][..], |b| &b.as_slice()[..self.length])
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool.give_back(buffer);
        }
    }
}

/// Reads a small payload into a new allocation, straight into uninitialised capacity.
async fn read_fresh<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: usize,
) -> Result<Bytes, PayloadError> {
    let mut buf = BytesMut::with_capacity(length);
    let mut limited = reader.take(length as u64);
    while buf.len() < length {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(PayloadError::Truncated {
                received: buf.len(),
                length,
            });
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    async fn read(pool: &PayloadPool, stream: &[u8], length: usize) -> Result<Bytes, PayloadError> {
        let mut reader = stream;
        pool.read(&mut reader, length).await
    }

    #[tokio::test]
    async fn a_recycled_buffer_shows_only_its_own_payload() {
        let pool = PayloadPool::new(SHELF_BYTES);
        let first = read(&pool, &vec![0xaa; MIB], MIB).await.unwrap();
        let first_ptr = first.as_ptr();
        drop(first);
        assert_eq!(pool.idle(), (1, MIB));
        // A slightly shorter payload reuses the buffer, and shows only its own bytes:
        // nothing of the previous request past its end.
        let stream: Vec<u8> = (0..MIB - GRANULE).map(|i| i as u8).collect();
        let second = read(&pool, &stream, MIB - GRANULE).await.unwrap();
        assert_eq!(second.as_ptr(), first_ptr, "the buffer was not reused");
        assert_eq!(second.len(), MIB - GRANULE);
        assert_eq!(&second[..], &stream[..]);
        assert_eq!(pool.idle(), (0, 0));
        drop(second);
        assert_eq!(pool.idle(), (1, MIB));
        // Much shorter payloads take new buffers rather than pin a large one.
        let small = read(&pool, &stream[..MIB / 2], MIB / 2).await.unwrap();
        assert_ne!(small.as_ptr(), first_ptr);
        assert_eq!(pool.idle(), (1, MIB));
        drop(small);
        let second = read(&pool, &stream, MIB - GRANULE).await.unwrap();
        assert_eq!(second.as_ptr(), first_ptr, "the most recent fitting buffer is reused");
        // Clones keep it lent; only the last one gives it back.
        assert_eq!(pool.idle(), (1, MIB / 2));
        let clone = second.slice(10..20);
        drop(second);
        assert_eq!(pool.idle(), (1, MIB / 2));
        drop(clone);
        assert_eq!(pool.idle(), (2, MIB + MIB / 2));
    }

    #[tokio::test]
    async fn the_reader_stops_at_the_payload() {
        let pool = PayloadPool::new(SHELF_BYTES);
        for length in [4096, MIN_RECYCLED, MIB] {
            let mut stream = vec![1u8; length];
            stream.extend_from_slice(b"next header");
            let mut reader = &stream[..];
            let payload = pool.read(&mut reader, length).await.unwrap();
            assert!(payload.iter().all(|&b| b == 1));
            assert_eq!(reader, b"next header");
        }
    }

    #[tokio::test]
    async fn a_truncated_payload_is_an_error_and_shows_nothing() {
        let pool = PayloadPool::new(SHELF_BYTES);
        drop(read(&pool, &vec![0xbb; MIB], MIB).await.unwrap());
        for length in [4096, MIB] {
            match read(&pool, &vec![0xcc; length / 2], length).await {
                Err(PayloadError::Truncated { received, length: l }) => {
                    assert_eq!((received, l), (length / 2, length));
                }
                other => panic!("expected Truncated, got {other:?}"),
            }
        }
        // The buffer went back to the shelf, and the next payload overwrites it whole.
        assert_eq!(pool.idle(), (1, MIB));
        let next = read(&pool, &vec![0xdd; MIB], MIB).await.unwrap();
        assert!(next.iter().all(|&b| b == 0xdd));
    }

    #[tokio::test]
    async fn the_shelf_keeps_at_most_its_limit() {
        let pool = PayloadPool::new(3 * MIB);
        let lent: Vec<Bytes> = read_many(&pool, 5).await;
        assert_eq!(pool.idle(), (0, 0), "five buffers lent at once");
        drop(lent);
        assert_eq!(pool.idle(), (3, 3 * MIB));
        // A buffer larger than the whole shelf is freed, not kept.
        drop(read(&pool, &vec![0; 4 * MIB], 4 * MIB).await.unwrap());
        assert_eq!(pool.idle(), (3, 3 * MIB));
        // A new size class evicts the oldest buffers to make room.
        drop(read(&pool, &vec![0; 2 * MIB], 2 * MIB).await.unwrap());
        assert_eq!(pool.idle(), (2, 3 * MIB));
    }

    /// Reads `n` 1 MiB payloads and keeps them all.
    async fn read_many(pool: &PayloadPool, n: usize) -> Vec<Bytes> {
        let stream = vec![7u8; MIB];
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(read(pool, &stream, MIB).await.unwrap());
        }
        out
    }
}
