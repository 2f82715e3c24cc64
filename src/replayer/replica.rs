//! The replica image a replay agent writes: a regular file (sparse, created on first start)
//! or a block device, behind the small synchronous [`ReplicaTarget`] trait.
//!
//! The agent calls a target from tokio's blocking pool, one hop per batch rather than one per
//! record, which is why this trait is synchronous and separate from the async
//! [`crate::block::BlockDevice`] the frontends serve.
//!
//! Must never: touch bytes outside `0..size`; let two agents write one replica (an exclusive
//! `flock` is held for as long as the target is open); report `sync` as done before
//! `fdatasync` returned.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::sys::{self, block_device_size, is_unsupported, lock_exclusive, sync_parent};

use super::uring::RingReader;

/// Largest single write: zero buffers when a file system can neither punch holes nor zero
/// ranges, and pieces of large records.
const ZERO_CHUNK: usize = 1 << 20;

/// What the agent needs from a replica image. All offsets are in bytes and inside `0..size`
/// (callers check; implementations may assume it).
pub trait ReplicaTarget: Send + Sync + fmt::Debug {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// A display name for messages (the path).
    fn describe(&self) -> String;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Deallocates a range; it reads as zeroes afterwards (a DISCARD).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeroes (a WRITE_ZEROES).
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// True when the range is known to read as zeroes without reading it (a hole in a
    /// sparse file); false when it holds data or the target cannot tell.
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    /// The first extent holding data that ends after `offset` (it may start before it), or
    /// `None` when only holes follow. A target that cannot tell says everything from
    /// `offset` to the end is data.
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        Ok((offset < self.size()).then(|| offset..self.size()))
    }
    /// Fills each buffer from its offset, as [`read_at`](Self::read_at) one after another
    /// would; a target may read them in parallel.
    fn read_many(&self, reads: &mut [(u64, Vec<u8>)]) -> io::Result<()> {
        reads
            .iter_mut()
            .try_for_each(|(offset, buf)| self.read_at(*offset, buf))
    }
}

/// Every way opening or creating a replica fails; each names the path.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The file or device could not be opened.
    #[error("cannot open replica {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating the sparse replica file failed.
    #[error("cannot create replica {path} of {size} bytes: {source}")]
    Create {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    /// The path is a directory, a pipe or something else that cannot hold an image.
    #[error("replica {path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    /// The replica has another size than the journal's device.
    #[error("replica {path} is {found} bytes but the journal's device is {expected} bytes; use another replica path")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// Another process (another replay agent) holds the replica.
    #[error("replica {path} is in use by another process (it holds an exclusive lock on it)")]
    Locked { path: PathBuf },
    /// Reading the size or taking the lock failed.
    #[error("cannot inspect replica {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A replica in a regular file or on a block device.
///
/// # Invariants
/// - The descriptor holds an exclusive `flock` for the life of the value.
/// - `size` is the journal's device size (files: exactly; block devices: at least).
#[derive(Debug)]
pub struct ReplicaFile {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    /// The io_uring for [`ReplicaTarget::read_many`], set up on first use; `None` inside
    /// when the process reads with `pread` (see [`super::uring::engine`]).
    ring: OnceLock<Option<RingReader>>,
}

impl ReplicaFile {
    /// Opens the replica at `path`, creating a sparse file of `size` bytes if nothing is
    /// there. Returns whether it was created.
    ///
    /// The file is sized and fsync'd under a temporary name and then linked into place, so a
    /// crash never leaves a replica of the wrong size behind.
    pub fn open_or_create(path: &Path, size: u64) -> Result<(ReplicaFile, bool), ReplicaError> {
        let created = if path.exists() {
            false
        } else {
            let create = |source| ReplicaError::Create {
                path: path.to_owned(),
                size,
                source,
            };
            let temp = sibling(path, ".creating");
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&temp)
                .map_err(create)?;
            file.set_len(size).map_err(create)?;
            file.sync_all().map_err(create)?;
            drop(file);
            let linked = std::fs::hard_link(&temp, path);
            let _ = std::fs::remove_file(&temp);
            match linked {
                Ok(()) => {
                    sync_parent(path).map_err(create)?;
                    true
                }
                // Another process created it in the meantime: use theirs (the lock decides).
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(create(e)),
            }
        };
        Ok((Self::open(path, size)?, created))
    }

    /// Opens an existing replica of the device's `size`.
    pub fn open(path: &Path, size: u64) -> Result<ReplicaFile, ReplicaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| ReplicaError::Open {
                path: path.to_owned(),
                source,
            })?;
        let inspect = |source| ReplicaError::Inspect {
            path: path.to_owned(),
            source,
        };
        lock_exclusive(&file).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                ReplicaError::Locked {
                    path: path.to_owned(),
                }
            } else {
                inspect(e)
            }
        })?;
        let meta = file.metadata().map_err(inspect)?;
        let (found, block_device) = if meta.file_type().is_file() {
            (meta.len(), false)
        } else if meta.file_type().is_block_device() {
            (block_device_size(&file).map_err(inspect)?, true)
        } else {
            return Err(ReplicaError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        };
        // A block device (a partition, an LV) may be larger than the image it holds; a file
        // of another size is another image.
        if found != size && !(block_device && found > size) {
            return Err(ReplicaError::SizeMismatch {
                path: path.to_owned(),
                found,
                expected: size,
            });
        }
        Ok(ReplicaFile {
            file,
            path: path.to_owned(),
            size,
            block_device,
            ring: OnceLock::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_zero_chunks(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; len.min(ZERO_CHUNK as u64) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Tries the fallocate modes in order, then falls back to writing zeroes.
    fn zero_with(&self, modes: &[ZeroMode], offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        for mode in modes {
            let zeroed = match mode {
                ZeroMode::PunchHole => sys::punch_hole(&self.file, offset, len),
                ZeroMode::ZeroRange => sys::zero_range(&self.file, offset, len),
            };
            match zeroed {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        self.write_zero_chunks(offset, len)
    }
}

/// The two ways `fallocate` makes a range read as zeroes (both keep the size).
#[derive(Clone, Copy)]
enum ZeroMode {
    PunchHole,
    ZeroRange,
}

impl ReplicaTarget for ReplicaFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        // 1 MiB at a time: multi-megabyte writes(2) are much slower on some kernels (see the
        // local store).
        let mut at = offset;
        for chunk in data.chunks(ZERO_CHUNK) {
            self.file.write_all_at(chunk, at)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        // On a block device PUNCH_HOLE is a discard that guarantees zeroes, so the replica
        // reads like a primary file whose hole was punched.
        self.zero_with(&[ZeroMode::PunchHole, ZeroMode::ZeroRange], offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_with(&[ZeroMode::ZeroRange, ZeroMode::PunchHole], offset, len)
    }

    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if self.block_device || len == 0 {
            return Ok(len == 0);
        }
        match sys::seek_data(&self.file, offset) {
            Ok(Some(data)) => Ok(data >= offset.saturating_add(len)),
            // No data at or after `offset`.
            Ok(None) => Ok(true),
            // A file system without SEEK_DATA: cannot tell.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn read_many(&self, reads: &mut [(u64, Vec<u8>)]) -> io::Result<()> {
        match self.ring.get_or_init(RingReader::new) {
            Some(ring) => ring.read_many(self.file.as_raw_fd(), reads),
            None => reads
                .iter_mut()
                .try_for_each(|(offset, buf)| self.file.read_exact_at(buf, *offset)),
        }
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        if offset >= self.size {
            return Ok(None);
        }
        if self.block_device {
            return Ok(Some(offset..self.size));
        }
        let data = match sys::seek_data(&self.file, offset) {
            Ok(Some(data)) => data,
            Ok(None) => return Ok(None),
            // A file system without SEEK_DATA: cannot tell.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return Ok(Some(offset..self.size))
            }
            Err(e) => return Err(e),
        };
        // Data at `data` means a hole (or the end) after it: ENXIO cannot happen here.
        let hole = sys::seek_hole(&self.file, data)?
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENXIO))?;
        Ok(Some(data..hole.min(self.size)))
    }
}

/// `<path><suffix>` in the same directory.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A replica in memory, for unit tests of the agent and recovery.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct MemoryReplica {
    data: std::sync::Mutex<Vec<u8>>,
    /// Ranges known to be holes (punched and never written since); only a hint.
    holes: std::sync::Mutex<Vec<std::ops::Range<u64>>>,
}

#[cfg(test)]
impl MemoryReplica {
    pub(crate) fn new(size: u64) -> Self {
        MemoryReplica {
            data: std::sync::Mutex::new(vec![0; size as usize]),
            holes: std::sync::Mutex::new(std::iter::once(0..size).collect()),
        }
    }

    pub(crate) fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    fn forget_holes(&self, offset: u64, len: u64) {
        let end = offset + len;
        let mut holes = self.holes.lock().unwrap();
        let mut kept = Vec::new();
        for h in holes.drain(..) {
            if h.end <= offset || h.start >= end {
                kept.push(h);
            } else {
                if h.start < offset {
                    kept.push(h.start..offset);
                }
                if h.end > end {
                    kept.push(end..h.end);
                }
            }
        }
        *holes = kept;
    }
}

#[cfg(test)]
impl ReplicaTarget for MemoryReplica {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn describe(&self) -> String {
        "memory replica".into()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, src: &[u8]) -> io::Result<()> {
        self.forget_holes(offset, src.len() as u64);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + src.len()].copy_from_slice(src);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)?;
        self.holes.lock().unwrap().push(offset..offset + len);
        Ok(())
    }
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.forget_holes(offset, len);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn is_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        let end = offset + len;
        Ok(self
            .holes
            .lock()
            .unwrap()
            .iter()
            .any(|h| h.start <= offset && h.end >= end))
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<Range<u64>>> {
        let size = self.size();
        let holes = self.holes.lock().unwrap();
        let mut at = offset;
        while let Some(h) = holes.iter().find(|h| h.start <= at && at < h.end) {
            at = h.end;
        }
        if at >= size {
            return Ok(None);
        }
        let end = holes
            .iter()
            .filter(|h| h.start > at)
            .map(|h| h.start)
            .min()
            .unwrap_or(size);
        Ok(Some(at..end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_sparse_then_reopened_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let (replica, created) = ReplicaFile::open_or_create(&path, 1 << 20).unwrap();
        assert!(created);
        assert!(replica.is_hole(0, 1 << 20).unwrap());
        assert!(matches!(
            ReplicaFile::open(&path, 1 << 20),
            Err(ReplicaError::Locked { .. })
        ));
        drop(replica);
        let (replica, created) = ReplicaFile::open_or_create(&path, 1 << 20).unwrap();
        assert!(!created);
        drop(replica);
        let err = ReplicaFile::open(&path, 2 << 20).unwrap_err();
        assert!(matches!(err, ReplicaError::SizeMismatch { .. }), "{err}");
        assert!(err.to_string().contains("r.img"), "{err}");
    }

    #[test]
    fn writes_holes_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.img");
        let (r, _) = ReplicaFile::open_or_create(&path, 1 << 20).unwrap();
        r.write_at(4096, &[7u8; 8192]).unwrap();
        assert!(!r.is_hole(4096, 4096).unwrap());
        assert!(
            !r.is_hole(0, 8192).unwrap(),
            "a range reaching data is not a hole"
        );
        assert!(r.is_hole(65536, 4096).unwrap());
        let mut reads = vec![(0u64, vec![1u8; 4096]), (4096, vec![0u8; 8192])];
        r.read_many(&mut reads).unwrap();
        assert!(reads[0].1.iter().all(|&b| b == 0));
        assert!(reads[1].1.iter().all(|&b| b == 7));
        let data = r.next_data(0).unwrap().expect("data after 0");
        assert!(data.start <= 4096 && data.end >= 12288, "{data:?}");
        assert_eq!(r.next_data(65536).unwrap(), None);
        r.punch_hole(4096, 4096).unwrap();
        r.zero_range(8192, 100).unwrap();
        let mut buf = vec![1u8; 12288];
        r.read_at(0, &mut buf).unwrap();
        assert!(buf[..8192 + 100].iter().all(|&b| b == 0));
        assert!(buf[8192 + 100..].iter().all(|&b| b == 7));
        r.sync().unwrap();
    }

    #[test]
    fn directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = ReplicaFile::open(dir.path(), 4096).unwrap_err();
        assert!(
            matches!(
                err,
                ReplicaError::NotFileOrBlockDevice { .. } | ReplicaError::Open { .. }
            ),
            "{err}"
        );
    }
}
