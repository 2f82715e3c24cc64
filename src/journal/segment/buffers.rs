//! Segment buffers: page-aligned, and reused from one segment to the next.
//!
//! A segment is encoded into one buffer of about the segment size, which lives until the
//! segment is uploaded. Two things about that buffer cost a journal writer under large writes
//! more than encoding does:
//!
//! - alignment: a page-aligned buffer is written by the local store with `O_DIRECT` straight
//!   from memory (no copy into the page cache and no bounce buffer);
//! - freshness: a new multi-megabyte allocation is new pages, so every one of its pages
//!   faults and is zeroed by the kernel once written, and is unmapped again when freed (a
//!   profile of `serve` under 1 MiB writes showed a quarter of its CPU there). A
//!   [`BufferRecycler`] keeps a few finished buffers for the next segments instead.
//!
//! Must never: hand out a buffer that still holds a previous segment's bytes as part of a new
//! one (a recycled buffer is emptied; the builder only ever reads what it wrote), or keep
//! more than its `keep` idle buffers.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::aligned::{self, AlignedBuf, PAGE_ALIGN};

/// A small free list of segment buffers, shared by a writer's builders and the segments
/// they produced (a finished segment gives its buffer back when its last `Bytes` is dropped).
#[derive(Clone, Debug)]
pub struct BufferRecycler {
    free: Arc<Mutex<Vec<AlignedBuf>>>,
    keep: usize,
}

impl BufferRecycler {
    /// A recycler that keeps at most `keep` idle buffers (0: nothing is reused).
    pub fn new(keep: usize) -> Self {
        BufferRecycler {
            free: Arc::new(Mutex::new(Vec::with_capacity(keep))),
            keep,
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: an idle one when there is
    /// one large enough, else a new one.
    pub(crate) fn take(&self, capacity: usize) -> AlignedBuf {
        let reused = {
            let mut free = crate::sync::lock(&self.free);
            let fits = free.iter().rposition(|b| b.capacity() >= capacity);
            fits.map(|i| free.swap_remove(i))
        };
        match reused {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            None => AlignedBuf::with_capacity(PAGE_ALIGN, capacity),
        }
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        crate::sync::lock(&self.free).len()
    }

    /// `buf` as the bytes of a finished segment; the buffer comes back here when they are
    /// dropped.
    pub(crate) fn wrap(&self, buf: AlignedBuf) -> Bytes {
        let len = buf.len();
        aligned::lend(buf, len, self.clone())
    }
}

impl aligned::Shelf for BufferRecycler {
    fn give_back(&self, mut buf: AlignedBuf) {
        let mut free = crate::sync::lock(&self.free);
        if free.len() < self.keep {
            buf.clear();
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_the_segment_is_dropped() {
        let recycler = BufferRecycler::new(2);
        let mut buf = recycler.take(1 << 20);
        buf.extend_from_slice(b"segment one");
        let ptr = buf.as_ptr();
        let bytes = recycler.wrap(buf);
        let copy = bytes.clone();
        assert_eq!(&copy[..], b"segment one");
        drop(bytes);
        assert_eq!(recycler.idle(), 0, "a clone still holds it");
        drop(copy);
        assert_eq!(recycler.idle(), 1);
        let again = recycler.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr, "the same memory is reused");
        assert!(again.is_empty(), "and it starts empty");
        assert_eq!(again.as_ptr().align_offset(PAGE_ALIGN), 0);
    }

    #[test]
    fn keeps_at_most_keep_and_only_large_enough_ones() {
        let recycler = BufferRecycler::new(1);
        let a = recycler.wrap(recycler.take(4096));
        let b = recycler.wrap(recycler.take(4096));
        drop((a, b));
        assert_eq!(recycler.idle(), 1);
        let big = recycler.take(1 << 20);
        assert!(
            big.capacity() >= 1 << 20,
            "a small idle buffer is not handed out"
        );
        assert_eq!(recycler.idle(), 1);
        assert_eq!(BufferRecycler::new(0).idle(), 0);
    }
}
