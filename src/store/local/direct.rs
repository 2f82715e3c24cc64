//! Writing a new object's bytes around the page cache (`O_DIRECT`).
//!
//! A journal segment is written once and read back by replay agents, usually on another
//! machine or much later. Copying it into the page cache was a third of `serve`'s CPU under
//! 1 MiB writes (the copy itself, then writeback by kernel threads and reclaim), and those
//! dirty pages queued behind and in front of the primary's own writeback. So a large object
//! is written with `O_DIRECT`:
//!
//! - the file is preallocated (`fallocate`), so the writes land inside the file's size: ext4
//!   then neither extends the file per write nor puts it on its orphan list;
//! - the whole blocks of the data go straight from memory to the device: from the caller's
//!   buffer when it is page-aligned (the segment builder's buffers are), else through a
//!   page-aligned bounce buffer kept per thread, [`BOUNCE_LEN`] at a time;
//! - the last partial block (`O_DIRECT` needs whole blocks) is written through the page
//!   cache after `O_DIRECT` is switched off again, so the file never holds padding.
//!
//! The caller's fsync then flushes the device's cache and commits the file's metadata:
//! durability still rests on that fsync, as on the buffered path.
//!
//! Falls back to buffered writes (the caller's path) when the file system refuses `O_DIRECT`
//! (tmpfs before Linux 6.6, some FUSE and network file systems), and mid-object when a
//! direct write is refused (`EINVAL`: a device whose blocks are larger than [`ALIGN`]); the
//! bytes already written stay, the rest goes through the page cache.
//!
//! Must never: leave bytes past the object's length, return success before every byte was
//! handed to the kernel, or keep more than one bounce buffer per thread.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::aligned::{self, AlignedBuf, PAGE_ALIGN};
use crate::sys;

/// Memory, offset and length alignment used for direct writes: the page size, which is at
/// least the logical block size of every device that matters here.
pub(crate) const ALIGN: usize = PAGE_ALIGN;
/// Objects smaller than this are written through the page cache: a direct write would save
/// little and small objects (heads, positions, marks) are read back soon.
pub(crate) const DIRECT_MIN: usize = 256 << 10;
/// Size of the per-thread bounce buffer for data that is not page-aligned in memory.
const BOUNCE_LEN: usize = 4 << 20;
/// Largest single direct write from the caller's buffer: big enough that the kernel splits
/// it into many device requests in flight at once, small enough to bound one call.
const DIRECT_CHUNK: usize = 32 << 20;

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// How the bytes of an object reached the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Every whole block went around the page cache (the tail, if any, through it).
    Direct,
    /// The file system refused `O_DIRECT` before anything was written; nothing was written.
    Refused,
    /// Direct writes stopped part-way; the bytes from `from` on are still to be written
    /// through the page cache.
    RefusedAt { from: usize },
}

/// Writes the whole blocks of `data` to the new, empty `file` with `O_DIRECT`, and its last
/// partial block through the page cache. Returns [`Written::Refused`] (nothing written) or
/// [`Written::RefusedAt`] when the file system will not do direct writes, so the caller can
/// write the rest the usual way.
pub(crate) fn write_new(file: &File, data: &[u8]) -> io::Result<Written> {
    preallocate(file, data.len());
    if sys::set_direct(file, true).is_err() {
        return Ok(Written::Refused);
    }
    let whole = data.len() / ALIGN * ALIGN;
    let result = if data.as_ptr().align_offset(ALIGN) == 0 {
        write_from_caller(file, &data[..whole])
    } else {
        write_through_bounce(file, &data[..whole])
    };
    // Whatever happened, the descriptor goes back to buffered mode for the tail and the
    // caller's fallback.
    let switched_back = sys::set_direct(file, false);
    let done = result?;
    switched_back?;
    if done < whole {
        return Ok(Written::RefusedAt { from: done });
    }
    if whole < data.len() {
        file.write_all_at(&data[whole..], whole as u64)?;
    }
    Ok(Written::Direct)
}

/// Writes `data` (page-aligned, whole blocks) in place; returns how many bytes went out
/// before a direct write was refused (all of them when none was).
fn write_from_caller(file: &File, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        let end = data.len().min(done + DIRECT_CHUNK);
        match write_direct_at(file, &data[done..end], done) {
            Ok(n) => done += n,
            Err(e) if refused(&e) => return Ok(done),
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Copies `data` (whole blocks, any alignment) through this thread's bounce buffer.
fn write_through_bounce(file: &File, data: &[u8]) -> io::Result<usize> {
    BOUNCE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let bounce = slot.get_or_insert_with(|| aligned::zeroed(BOUNCE_LEN));
        let mut done = 0;
        for piece in data.chunks(BOUNCE_LEN) {
            let staged = &mut bounce[..piece.len()];
            staged.copy_from_slice(piece);
            let mut sent = 0;
            while sent < staged.len() {
                match write_direct_at(file, &staged[sent..], done + sent) {
                    Ok(n) => sent += n,
                    Err(e) if refused(&e) => return Ok(done + sent),
                    Err(e) => return Err(e),
                }
            }
            done += piece.len();
        }
        Ok(done)
    })
}

/// One direct `pwrite`. A short write that ends mid-block is counted in whole blocks only,
/// so the next write starts aligned again and rewrites the partial block.
fn write_direct_at(file: &File, data: &[u8], offset: usize) -> io::Result<usize> {
    loop {
        match file.write_at(data, offset as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if n % ALIGN == 0 || n == data.len() => return Ok(n),
            // A direct write that stopped mid-block: keep the whole blocks, and let the next
            // write (at an aligned offset again) redo the partial one.
            Ok(n) if n >= ALIGN => return Ok(n / ALIGN * ALIGN),
            Ok(_) => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// `EINVAL` from a direct write: the device wants larger blocks (or the file system changed
/// its mind); the rest goes through the page cache.
fn refused(err: &io::Error) -> bool {
    err.raw_os_error() == Some(libc::EINVAL)
}

/// Reserves `len` bytes for `file` and sets its size (a hint: a file system without
/// `fallocate` just extends the file as it is written).
fn preallocate(file: &File, len: usize) {
    sys::preallocate(file, len as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, OpenOptions};

    fn new_file(dir: &std::path::Path, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Any length, aligned or not in memory, gives exactly the bytes back and no padding.
    #[test]
    fn exact_bytes_for_any_length_and_alignment() {
        let dir = tempfile::tempdir().unwrap();
        let lengths = [
            0,
            1,
            ALIGN - 1,
            ALIGN,
            ALIGN + 1,
            DIRECT_MIN,
            BOUNCE_LEN + 3 * ALIGN + 17,
        ];
        for (i, &len) in lengths.iter().enumerate() {
            let data = pattern(len);
            let mut aligned = AlignedBuf::with_capacity(ALIGN, len.max(1));
            aligned.extend_from_slice(&data);
            // An unaligned view of the same bytes: one byte into a longer buffer.
            let mut shifted = vec![0u8; len + 1];
            shifted[1..].copy_from_slice(&data);
            for (kind, bytes) in [("aligned", &aligned[..]), ("unaligned", &shifted[1..])] {
                let name = format!("{i}-{kind}");
                let file = new_file(dir.path(), &name);
                let how = write_new(&file, bytes).unwrap();
                match how {
                    Written::Direct => {}
                    Written::Refused => file.write_all_at(bytes, 0).unwrap(),
                    Written::RefusedAt { from } => {
                        file.write_all_at(&bytes[from..], from as u64).unwrap()
                    }
                }
                drop(file);
                assert_eq!(
                    fs::read(dir.path().join(&name)).unwrap(),
                    data,
                    "{name}: {how:?}"
                );
            }
        }
    }

    /// On ext4 (this project's CI) the direct path is really taken, so the test above does
    /// not pass through the fallback alone.
    #[test]
    fn ext4_takes_the_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let stat = rustix::fs::statfs(dir.path()).unwrap();
        const EXT4_SUPER_MAGIC: i64 = 0xEF53;
        if stat.f_type as i64 != EXT4_SUPER_MAGIC {
            eprintln!("skipped: the temporary directory is not on ext4");
            return;
        }
        let mut data = AlignedBuf::with_capacity(ALIGN, DIRECT_MIN);
        data.extend_from_slice(&pattern(DIRECT_MIN));
        let file = new_file(dir.path(), "f");
        assert_eq!(write_new(&file, &data).unwrap(), Written::Direct);
        assert_eq!(
            write_new(&new_file(dir.path(), "g"), &pattern(DIRECT_MIN + 1)).unwrap(),
            Written::Direct
        );
    }

    /// The descriptor is back in buffered mode afterwards, so the caller's fsync and any
    /// fallback writes behave as before.
    #[test]
    fn leaves_the_descriptor_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), "f");
        write_new(&file, &pattern(3 * ALIGN + 5)).unwrap();
        let flags = rustix::fs::fcntl_getfl(&file).unwrap();
        assert!(!flags.contains(rustix::fs::OFlags::DIRECT));
    }
}
