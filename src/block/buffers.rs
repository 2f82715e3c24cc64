//! Large transfer buffers, recycled: a bounded shelf of page-aligned buffers that earlier
//! requests gave back, for NBD write payloads and file reads of [`MIN_RECYCLED`] bytes or
//! more, instead of a fresh allocation per request.
//!
//! A fresh 1 MiB allocation is memory the allocator maps and unmaps per request: every page
//! of it faults (and is zeroed by the kernel) while the data is copied in, and the unmap
//! flushes it again. Profiled under fio 1 MiB writes, that was about 60 % of
//! `serve --no-journal`'s CPU. A recycled buffer has its pages mapped already.
//!
//! A filled buffer becomes a [`Bytes`] ([`BufferPool::lend`], through [`Bytes::from_owner`])
//! that shows exactly the bytes the request filled, and goes back on the shelf when the last
//! clone is dropped: after the device's write, after the journal has encoded the record that
//! shares it, or after a read reply has been sent. Buffers are `O_DIRECT`-aligned
//! ([`AlignedBuf`]), so a direct-I/O file takes them without a bounce copy.
//!
//! Must never: show bytes a request did not fill (callers lend a buffer only once its first
//! `len` bytes were all written by this request; [`BufferPool::lend`] shows those alone);
//! hold more than its limit of idle buffers; hand one buffer to two requests at once (a
//! buffer is on the shelf only while nothing refers to it).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytes::Bytes;

use crate::aligned::{self, AlignedBuf};

/// Transfers at least this long use recycled buffers; smaller ones come from the allocator,
/// whose per-thread caches serve them without new mappings.
pub(crate) const MIN_RECYCLED: usize = 64 << 10;
/// Most bytes of idle buffers the process-wide shelf keeps (one maximum-size NBD payload).
pub(crate) const SHELF_BYTES: usize = 32 << 20;
/// A buffer is its request's length rounded up to a whole number of these (pages), and
/// serves only requests that round to the same size: a lent buffer holds less than one page
/// more than its request shows (as much as the allocator's own rounding of a large
/// allocation), so the journal pool's accounting of the records sharing it stays true.
const GRANULE: usize = 4096;

/// A bounded shelf of idle buffers. Cheap to clone (shared).
#[derive(Clone)]
pub(crate) struct BufferPool {
    shelf: Arc<Mutex<Shelf>>,
}

impl std::fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shelf = self.lock();
        f.debug_struct("BufferPool")
            .field("idle", &shelf.idle.len())
            .field("bytes", &shelf.bytes)
            .field("limit", &shelf.limit)
            .finish()
    }
}

/// # Invariants
/// `bytes` is the sum of the lengths of `idle`, and at most `limit`.
struct Shelf {
    /// Oldest first; a buffer put back goes to the back and is taken from there first (its
    /// pages are the most likely to be in the CPU's caches).
    idle: VecDeque<AlignedBuf>,
    bytes: usize,
    limit: usize,
}

impl BufferPool {
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

    /// The pool the whole process shares.
    pub(crate) fn shared() -> &'static BufferPool {
        static SHARED: OnceLock<BufferPool> = OnceLock::new();
        SHARED.get_or_init(|| BufferPool::new(SHELF_BYTES))
    }

    /// A buffer of `len` bytes rounded up to whole pages: an idle one of that size, else a
    /// new one. Its content is whatever an earlier request left in it.
    pub(crate) fn take(&self, len: usize) -> AlignedBuf {
        let size = len.max(1).div_ceil(GRANULE) * GRANULE;
        {
            let mut shelf = self.lock();
            if let Some(i) = shelf.idle.iter().rposition(|b| b.len() == size) {
                if let Some(buffer) = shelf.idle.remove(i) {
                    shelf.bytes -= buffer.len();
                    return buffer;
                }
            }
        }
        aligned::zeroed(size)
    }

    /// `buffer[..len]` as [`Bytes`]; the buffer comes back to this pool when the last
    /// clone is dropped. The caller has written all of `buffer[..len]` for this request.
    pub(crate) fn lend(&self, buffer: AlignedBuf, len: usize) -> Bytes {
        aligned::lend(buffer, len, self.clone())
    }

    fn lock(&self) -> MutexGuard<'_, Shelf> {
        // Every step under the lock leaves the shelf consistent.
        crate::sync::lock(&self.shelf)
    }

    /// Idle buffers and their bytes.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> (usize, usize) {
        let shelf = self.lock();
        (shelf.idle.len(), shelf.bytes)
    }
}

impl aligned::Shelf for BufferPool {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Takes a buffer for `len` bytes, fills them with `byte` and lends them.
    fn filled(pool: &BufferPool, len: usize, byte: u8) -> Bytes {
        let mut buffer = pool.take(len);
        buffer.as_mut_slice()[..len].fill(byte);
        pool.lend(buffer, len)
    }

    #[test]
    fn a_lent_buffer_shows_its_bytes_and_comes_back_after_the_last_clone() {
        let pool = BufferPool::new(SHELF_BYTES);
        let first = filled(&pool, MIB, 0xaa);
        let first_ptr = first.as_ptr();
        assert_eq!(first_ptr as usize % 4096, 0, "buffers are page-aligned");
        drop(first);
        assert_eq!(pool.idle(), (1, MIB));
        // A request a few sectors shorter reuses the buffer and shows only its own length.
        let second = filled(&pool, MIB - 1536, 0xbb);
        assert_eq!(second.as_ptr(), first_ptr, "the buffer was not reused");
        assert_eq!(second.len(), MIB - 1536);
        assert!(second.iter().all(|&b| b == 0xbb));
        assert_eq!(pool.idle(), (0, 0));
        // Clones keep it lent; only the last one gives it back.
        let clone = second.slice(10..20);
        drop(second);
        assert_eq!(pool.idle(), (0, 0));
        drop(clone);
        assert_eq!(pool.idle(), (1, MIB));
        // A request a page shorter takes a new buffer rather than pin a larger one.
        let small = filled(&pool, MIB - GRANULE, 1);
        assert_ne!(small.as_ptr(), first_ptr);
        drop(small);
        assert_eq!(pool.idle(), (2, 2 * MIB - GRANULE));
        // The buffer of the request's size is taken, though another came back later.
        assert_eq!(filled(&pool, MIB, 2).as_ptr(), first_ptr);
    }

    #[test]
    fn the_shelf_keeps_at_most_its_limit() {
        let pool = BufferPool::new(3 * MIB);
        let lent: Vec<Bytes> = (0..5).map(|_| filled(&pool, MIB, 7)).collect();
        assert_eq!(pool.idle(), (0, 0), "five buffers lent at once");
        drop(lent);
        assert_eq!(pool.idle(), (3, 3 * MIB));
        // A buffer larger than the whole shelf is freed, not kept.
        drop(filled(&pool, 4 * MIB, 0));
        assert_eq!(pool.idle(), (3, 3 * MIB));
        // A new size evicts the oldest buffers to make room.
        drop(filled(&pool, 2 * MIB, 0));
        assert_eq!(pool.idle(), (2, 3 * MIB));
    }
}
