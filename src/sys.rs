//! The system calls std does not offer, in one place, on `rustix`: `SEEK_DATA`/`SEEK_HOLE`,
//! hole punching and range zeroing (`fallocate`), a block device's size and discard
//! (`ioctl`), `RWF_NOWAIT` positional reads and writes, `copy_file_range`, `flock`,
//! `O_DIRECT` toggling, a process's existence, writeback hints (`sync_file_range`, which
//! rustix lacks), and the directory sync that makes a new name durable. Callers get
//! `io::Error`s that keep the raw `errno`, so each decides what `EINVAL` or `EOPNOTSUPP`
//! means to it.
//!
//! Must never: hide an error (every failure reaches the caller, except the documented
//! hints: `preallocate`, the writeback hints, and `read_nowait`/`write_nowait` answering
//! "nothing done"), or touch a descriptor it was not lent.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, FlockOperation, OFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};
use rustix::ioctl::{opcode, Getter, Setter};

/// Where the next data (`SEEK_DATA`) starts at or after `at`: `None` when there is none
/// before the end of the file (`ENXIO`). It moves the descriptor's shared offset, which
/// tinylag never uses (all its I/O is positional).
pub(crate) fn seek_data(file: &File, at: u64) -> io::Result<Option<u64>> {
    seek(file, SeekFrom::Data(at))
}

/// Where the next hole (`SEEK_HOLE`) starts at or after `at` (the end of the file counts as
/// one): `None` only when `at` is past the end (`ENXIO`).
pub(crate) fn seek_hole(file: &File, at: u64) -> io::Result<Option<u64>> {
    seek(file, SeekFrom::Hole(at))
}

fn seek(file: &File, whence: SeekFrom) -> io::Result<Option<u64>> {
    if let SeekFrom::Data(at) | SeekFrom::Hole(at) = whence {
        // The kernel takes a signed offset; refuse what would wrap rather than pass it on.
        to_off_t(at)?;
    }
    match rustix::fs::seek(file, whence) {
        Ok(found) => Ok(Some(found)),
        Err(Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// `fallocate(PUNCH_HOLE | KEEP_SIZE)`: the range becomes a hole (reads as zeroes in a
/// file; on a block device, a discard that guarantees zeroes).
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// `fallocate(ZERO_RANGE | KEEP_SIZE)`: the range reads as zeroes (block devices insist on
/// `KEEP_SIZE`; files accept it and it is what tinylag means).
pub(crate) fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
}

/// Reserves `0..len` of `file` and extends it to `len` (`fallocate` mode 0). A hint: a file
/// system without `fallocate` just extends the file as it is written, so errors are ignored.
pub(crate) fn preallocate(file: &File, len: u64) {
    let _ = fallocate(file, FallocateFlags::empty(), 0, len);
}

fn fallocate(file: &File, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    // The kernel takes signed offsets; refuse what would wrap rather than pass it on.
    to_off_t(offset)?;
    to_off_t(len)?;
    Ok(rustix::fs::fallocate(file, flags, offset, len)?)
}

/// The size of a block device in bytes (`ioctl(BLKGETSIZE64)`).
pub(crate) fn block_device_size(file: &File) -> io::Result<u64> {
    // `_IOR(0x12, 114, u64)`; `opcode::read` encodes the direction bits for the target.
    const BLKGETSIZE64: rustix::ioctl::Opcode = opcode::read::<u64>(0x12, 114);
    // SAFETY: BLKGETSIZE64 writes exactly one u64 into the getter's buffer.
    let size = unsafe { rustix::ioctl::ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }?;
    Ok(size)
}

/// Discards `offset..offset + len` of a block device (`ioctl(BLKDISCARD)`): its content
/// becomes unspecified.
pub(crate) fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    // `_IO(0x12, 119)`, which (for historical reasons) still reads a `[u64; 2]`.
    const BLKDISCARD: rustix::ioctl::Opcode = opcode::none(0x12, 119);
    // SAFETY: BLKDISCARD reads a `[start, len]` pair of u64 from the setter's buffer and
    // writes nothing back.
    unsafe { rustix::ioctl::ioctl(file, Setter::<BLKDISCARD, [u64; 2]>::new([offset, len])) }?;
    Ok(())
}

/// `preadv2(RWF_NOWAIT)`: reads what the page cache holds without waiting. Returns the bytes
/// read: 0 when it would wait, on any error, or when the file system cannot tell (the
/// caller reads the rest the ordinary way, which reports real errors).
pub(crate) fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> usize {
    if to_off_t(offset).is_err() {
        return 0;
    }
    let len = buf.len();
    rustix::io::preadv2(
        file,
        &mut [IoSliceMut::new(buf)],
        offset,
        ReadWriteFlags::NOWAIT,
    )
    .unwrap_or(0)
    .min(len)
}

/// `pwritev2(RWF_NOWAIT)`: writes what the page cache takes without waiting. Returns the
/// bytes written (0 when it would wait or on any error), or `None` when the file system
/// cannot write without waiting at all (`EOPNOTSUPP`); the caller writes the rest the
/// ordinary way, which also reports real errors.
pub(crate) fn write_nowait(file: &File, buf: &[u8], offset: u64) -> Option<usize> {
    if to_off_t(offset).is_err() {
        return Some(0);
    }
    match rustix::io::pwritev2(file, &[IoSlice::new(buf)], offset, ReadWriteFlags::NOWAIT) {
        Ok(n) => Some(n.min(buf.len())),
        Err(Errno::OPNOTSUPP) => None,
        Err(_) => Some(0),
    }
}

/// One `copy_file_range` of up to `len` bytes at `offset` in both files; returns the bytes
/// moved (0 at the source's end).
pub(crate) fn copy_file_range(
    src: &File,
    dst: &File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let (mut off_in, mut off_out) = (offset, offset);
    Ok(rustix::fs::copy_file_range(
        src,
        Some(&mut off_in),
        dst,
        Some(&mut off_out),
        len,
    )?)
}

/// An exclusive `flock` taken without waiting (`EWOULDBLOCK` when another holds it).
pub(crate) fn lock_exclusive(file: &File) -> io::Result<()> {
    Ok(rustix::fs::flock(
        file,
        FlockOperation::NonBlockingLockExclusive,
    )?)
}

/// Turns `O_DIRECT` on or off for `file`'s open file description.
pub(crate) fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(file.as_fd())?;
    let wanted = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    Ok(rustix::fs::fcntl_setfl(file, wanted)?)
}

/// Whether process `pid` exists in this PID namespace (signal 0: nothing is sent; `EPERM`
/// means it exists but belongs to someone else).
pub(crate) fn process_exists(pid: i32) -> bool {
    // Not 0 (our own process group) nor negative (a group): one process, or none.
    if pid <= 0 {
        return false;
    }
    let Some(pid) = rustix::process::Pid::from_raw(pid) else {
        return false;
    };
    matches!(
        rustix::process::test_kill_process(pid),
        Ok(()) | Err(Errno::PERM)
    )
}

/// Starts writeback of `offset..offset+len` of `file` without waiting: a hint (rustix has no
/// `sync_file_range`), so errors are ignored; durability still needs an fsync.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; `file` keeps the fd open.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Writes out and waits for every dirty page of `file`, without a file-system journal
/// commit: a hint like [`start_writeback`] (the fsync after it is what makes data durable).
pub(crate) fn wait_writeback(file: &File) {
    // SAFETY: as in start_writeback; offset 0 and length 0 mean the whole file.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
}

/// Syncs the directory holding `path`, so a name just created or renamed there survives a
/// crash.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Whether `e` says the file system or device does not offer the operation (a hint such as
/// trim may then be skipped, a zeroing written out).
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// `v` as the kernel's signed `off_t`, or an `InvalidInput` error naming it.
pub(crate) fn to_off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset or length {v} does not fit in off_t"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The calls agree with what the file holds: data and holes found where written and
    /// punched, a range zeroed reads as zeroes, a wrapped offset refused.
    #[test]
    fn seek_punch_and_zero_agree_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(&[7u8; 65536], 1 << 20).unwrap();
        match seek_data(&file, 0) {
            // A file system without SEEK_DATA (EINVAL) has nothing to check here.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return,
            found => assert_eq!(found.unwrap(), Some(1 << 20)),
        }
        assert_eq!(seek_hole(&file, 1 << 20).unwrap(), Some((1 << 20) + 65536));
        assert_eq!(seek_data(&file, 2 << 20).unwrap(), None);
        assert_eq!(seek_hole(&file, 8 << 20).unwrap(), None);
        punch_hole(&file, 1 << 20, 4096).unwrap();
        assert_eq!(seek_data(&file, 0).unwrap(), Some((1 << 20) + 4096));
        match zero_range(&file, (1 << 20) + 4096, 4096) {
            Err(e) if is_unsupported(&e) => {}
            other => other.unwrap(),
        }
        let mut buf = vec![1u8; 8192];
        file.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(
            punch_hole(&file, u64::MAX, 1).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        sync_parent(&path).unwrap();
    }

    #[test]
    fn nowait_reads_and_writes_agree_with_plain_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .unwrap();
        file.write_all_at(&[3u8; 8192], 0).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = read_nowait(&file, &mut buf, 4096);
        assert!(buf[..n].iter().all(|&b| b == 3), "{n}");
        if let Some(n) = write_nowait(&file, &[9u8; 4096], 0) {
            let mut back = vec![0u8; n];
            file.read_exact_at(&mut back, 0).unwrap();
            assert!(back.iter().all(|&b| b == 9));
        }
        assert_eq!(read_nowait(&file, &mut buf, u64::MAX), 0);
    }

    #[test]
    fn a_process_exists_until_it_is_reaped() {
        assert!(process_exists(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        child.wait().unwrap();
        assert!(!process_exists(pid));
        assert!(!process_exists(0));
        assert!(!process_exists(-1));
    }

    #[test]
    fn a_second_exclusive_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let first = File::open(&path).unwrap();
        let second = File::open(&path).unwrap();
        lock_exclusive(&first).unwrap();
        assert_eq!(
            lock_exclusive(&second).unwrap_err().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
    }
}
