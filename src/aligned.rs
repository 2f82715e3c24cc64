//! Page-aligned byte buffers (on the `aligned-vec` crate): what `O_DIRECT` writes and
//! io_uring transfers take straight from memory, without a bounce copy. The primary's
//! transfer buffers, the journal's segment buffers and the local store's bounce buffer are
//! all this one type.
//!
//! Must never: expose bytes that were not initialised (every constructor here zeroes).

use aligned_vec::{AVec, ConstAlign};
use bytes::Bytes;

/// The alignment: a page, which covers the logical block size of every disk `O_DIRECT`
/// meets here.
pub(crate) const PAGE_ALIGN: usize = 4096;

/// A growable byte buffer whose start is page-aligned.
pub(crate) type AlignedBuf = AVec<u8, ConstAlign<PAGE_ALIGN>>;

/// `len` zero bytes in a new page-aligned buffer.
pub(crate) fn zeroed(len: usize) -> AlignedBuf {
    let mut buf = AlignedBuf::with_capacity(PAGE_ALIGN, len);
    grow_zeroed(&mut buf, len);
    buf
}

/// A new page-aligned copy of `data` (one `memcpy`).
pub(crate) fn copied(data: &[u8]) -> AlignedBuf {
    let mut buf = AlignedBuf::with_capacity(PAGE_ALIGN, data.len());
    buf.extend_from_slice(data);
    buf
}

/// Extends `buf` to `len` bytes with zeroes (nothing when it is that long already).
/// `AVec::resize` writes one byte per step, which costs more than the zstd call it prepares
/// for a 1 MiB payload; this is one `memset`.
pub(crate) fn grow_zeroed(buf: &mut AlignedBuf, len: usize) {
    let old = buf.len();
    if len <= old {
        return;
    }
    buf.reserve(len - old);
    // SAFETY: `reserve` made room for `len` bytes; `write_bytes` initializes `old..len`
    // before `set_len` exposes them, and u8 has no invalid bit patterns.
    unsafe {
        buf.as_mut_ptr().add(old).write_bytes(0, len - old);
        buf.set_len(len);
    }
}

/// Where a lent buffer goes back to: a pool of idle buffers.
pub(crate) trait Shelf: Send + Sync + 'static {
    /// Takes `buffer` back (keeps it for reuse, or frees it).
    fn give_back(&self, buffer: AlignedBuf);
}

/// `buffer[..len]` as [`Bytes`]; `buffer` goes back to `shelf` when the last clone is
/// dropped. The caller has written all of `buffer[..len]`: nothing else is shown.
pub(crate) fn lend<S: Shelf>(buffer: AlignedBuf, len: usize, shelf: S) -> Bytes {
    let len = len.min(buffer.len());
    Bytes::from_owner(Lent {
        buffer: Some(buffer),
        len,
        shelf,
    })
}

/// The owner behind a lent buffer's [`Bytes`].
struct Lent<S: Shelf> {
    /// `Some` until dropped.
    buffer: Option<AlignedBuf>,
    /// The only bytes the `Bytes` shows.
    len: usize,
    shelf: S,
}

impl<S: Shelf> AsRef<[u8]> for Lent<S> {
    fn as_ref(&self) -> &[u8] {
        self.buffer.as_ref().map_or(&[][..], |b| &b[..self.len])
    }
}

impl<S: Shelf> Drop for Lent<S> {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.shelf.give_back(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_grow_with_zeroes() {
        for len in [0, 1, 4095, 4096, 1 << 20] {
            let buf = zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % PAGE_ALIGN, 0, "{len}");
            assert!(buf.iter().all(|&b| b == 0), "{len}");
        }
        let mut buf = zeroed(3);
        buf.as_mut_slice().fill(7);
        grow_zeroed(&mut buf, 10_000);
        assert_eq!(&buf[..3], &[7, 7, 7]);
        assert!(buf[3..].iter().all(|&b| b == 0));
        assert_eq!(buf.as_ptr() as usize % PAGE_ALIGN, 0);
        grow_zeroed(&mut buf, 5);
        assert_eq!(buf.len(), 10_000, "never shrinks");
        let copy = copied(b"unaligned source");
        assert_eq!(&copy[..], b"unaligned source");
        assert_eq!(copy.as_ptr() as usize % PAGE_ALIGN, 0);
    }
}
