//! File or block-device target: positional I/O on the primary disk (see mod.rs).
//!
//! A regular file or a block device is served through [`BlockDevice`] by one type per I/O
//! engine ([`IoEngine`]), each running reads, writes and flushes its own way:
//! [`UringFileDevice`](super::uring_file::UringFileDevice) on an io_uring per device
//! (`block::uring`: submitted by the requesting task, completed on the runtime, no thread
//! hand-off), [`SyncFileDevice`](super::sync_file::SyncFileDevice) with
//! `pread`/`pwrite`/`fdatasync` on one shared descriptor run on the blocking pool, so the
//! async frontends never stall. [`open`] picks the type [`FileOptions::engine`] names.
//! This file holds what both share ([`FileTarget`]): opening and checking the target, the
//! page-cache fast paths, trim, write-zeroes and allocation. The one exception to "the
//! engine does the I/O": where the file system cannot take a buffered write with
//! `RWF_NOWAIT` (ext4), a write of at most 64 KiB is a `pwrite` on the calling thread
//! ([`FileOptions::inline_writes`]), backing off to the engine for a while after one that
//! took over 2 ms (50 ms after an isolated slow write, doubling up to a second while they
//! keep coming). Trim punches holes (files) or discards (block devices) and write-zeroes
//! asks the kernel to zero a range (falling back to writing zeroes); both are rare and run
//! on the blocking pool with either engine. With `O_DIRECT` every transfer goes through a
//! page-aligned bounce buffer. The system calls themselves are in `crate::sys`.
//!
//! Must never: touch bytes outside `0..size` (every request is range-checked first),
//! write through a read-only device, report a FUA write or a flush as done before
//! `fdatasync` has returned, or hold the calling thread with more than one slow inline
//! write per pause.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::allocation::{self, Allocation, Extent};
use super::buffers::{BufferPool, MIN_RECYCLED};
use super::engine::IoEngine;
use super::sync_file::SyncFileDevice;
use super::uring::Buffer;
use super::uring_file::UringFileDevice;
use super::{check_range, BlockDevice, BlockError, DeviceInfo};
use crate::{aligned, sys};

/// Memory alignment `O_DIRECT` transfers get: a page satisfies every logical block size the
/// device may have (512 or 4096) and the page alignment some drivers want.
const DIRECT_ALIGN: usize = aligned::PAGE_ALIGN;

/// Largest buffer used when write-zeroes has to fall back to writing zeroes, so a
/// multi-gigabyte request never allocates more than this.
const ZERO_CHUNK: usize = 1 << 20;

/// Largest buffered write [`FileOptions::inline_writes`] runs on the calling thread.
pub const INLINE_WRITE_MAX: usize = 64 << 10;
/// An inline write slower than this (the page cache throttling dirty data, a file system
/// lock) sends writes back to the engine for a pause.
const INLINE_SLOW: Duration = Duration::from_millis(2);
/// The pause after an isolated slow inline write. Most are isolated: a runtime thread
/// preempted in the middle of a `pwrite` on a busy machine, or one wait for the file
/// system's journal commit that a local journal's segment fsync forced. A fixed pause of a
/// second after each (as before) sent a quarter to a third of a loaded 8-second
/// `bench/profile.sh` run's writes through the engine, at about twice the CPU per write.
const INLINE_PAUSE_MIN: Duration = Duration::from_millis(50);
/// The longest pause: a slow write within a second after the previous pause ended doubles
/// the pause up to this, so sustained throttling by the page cache still holds a runtime
/// thread for one write per second, after a handful of shorter pauses.
const INLINE_PAUSE_MAX: Duration = Duration::from_secs(1);
/// The environment variable that turns [`FileOptions::inline_writes`] off (`off`), for
/// measuring what it saves.
pub const INLINE_WRITES_ENV: &str = "TINYLAG_INLINE_WRITES";

/// Opens `path` (a regular file or a block device) with `options`, on the engine
/// `options.engine` names.
pub fn open(path: &Path, options: FileOptions) -> Result<Arc<dyn BlockDevice>, FileError> {
    Ok(match options.engine {
        IoEngine::Threads => Arc::new(SyncFileDevice::open(path, options)?),
        IoEngine::Uring => Arc::new(UringFileDevice::open(path, options)?),
    })
}

/// Creates a sparse regular file of `size` bytes at `path`, refusing to overwrite
/// anything already there. The file and its directory entry are synced before return.
pub fn create_sparse(path: &Path, size: u64) -> Result<(), FileError> {
    let create_err = |source| FileError::Create {
        path: path.to_owned(),
        size,
        source,
    };
    let file = match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(FileError::AlreadyExists {
                path: path.to_owned(),
            })
        }
        Err(e) => return Err(create_err(e)),
    };
    file.set_len(size).map_err(create_err)?;
    file.sync_all().map_err(create_err)?;
    // The new name must survive a crash too, or `init` could report a primary that
    // vanishes on reboot.
    sys::sync_parent(path).map_err(create_err)?;
    Ok(())
}

/// How a file target is opened ([`open`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Logical block size advertised to clients: 512 or 4096.
    pub block_size: u32,
    /// Open the file read-only; writes, trims and write-zeroes fail with
    /// [`BlockError::ReadOnly`].
    pub read_only: bool,
    /// Open with `O_DIRECT` (bypass the page cache). Requests must then be aligned to
    /// `block_size`.
    pub direct: bool,
    /// Buffered reads and writes first try `preadv2`/`pwritev2` with `RWF_NOWAIT` on the
    /// calling thread: what the page cache can serve without waiting costs a copy instead
    /// of a hand-off to the blocking pool (about three times the IOPS for 4 KiB requests);
    /// the rest (a cache miss, writeback pressure, a file system without NOWAIT) goes to
    /// the blocking pool (or the ring) as before. Writes stop trying after the first
    /// `EOPNOTSUPP` (ext4 cannot do buffered `RWF_NOWAIT` writes). Ignored with `direct`.
    pub nowait_fast_path: bool,
    /// Once `RWF_NOWAIT` writes turned out unsupported, buffered writes of at most
    /// [`INLINE_WRITE_MAX`] bytes are a plain `pwrite` on the calling thread: a copy into
    /// the page cache, where the engine would cost a hand-off to a kernel worker (io_uring
    /// punts every buffered write ext4 cannot do without waiting) or to the blocking pool,
    /// and a completion wake-up: about half the CPU of a 4 KiB write in the profile
    /// (bench/profile/). A write that takes longer than [`INLINE_SLOW`] (the kernel
    /// throttling dirty pages) sends writes back to the engine for a pause ([`INLINE_PAUSE_MIN`]
    /// to [`INLINE_PAUSE_MAX`]), so the calling thread is held up by at most one slow write
    /// per pause. Ignored with `direct`;
    /// `TINYLAG_INLINE_WRITES=off` turns it off.
    pub inline_writes: bool,
    /// What runs reads, writes and flushes ([`super::engine::select`] picks it for `serve`).
    /// [`IoEngine::Uring`] needs a tokio runtime at [`open`].
    pub engine: IoEngine,
}

impl FileOptions {
    /// Read-write, buffered, with the given logical block size.
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            read_only: false,
            direct: false,
            nowait_fast_path: true,
            inline_writes: true,
            engine: IoEngine::Threads,
        }
    }
}

/// Every way opening or creating a file target fails. Each names the path involved.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The logical block size is neither 512 nor 4096.
    #[error("invalid block size {block_size}: expected 512 or 4096")]
    BadBlockSize { block_size: u32 },
    /// The file or device could not be opened.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The io_uring engine could not be set up for the file.
    #[error("cannot set up io_uring for {path}: {source}")]
    IoEngine {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `fstat` on the opened file failed.
    #[error("cannot stat {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path is neither a regular file nor a block device (a directory, a pipe, …).
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    /// The `BLKGETSIZE64` ioctl failed on a block device.
    #[error("cannot read the size of block device {path}: {source}")]
    DeviceSize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The size is not a whole number of logical blocks, so the last bytes could never be
    /// addressed by an aligned client.
    #[error("size {size} of {path} is not a multiple of the block size {block_size}")]
    SizeNotBlockMultiple {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    /// [`create_sparse`] found something already at the path.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists { path: PathBuf },
    /// Creating, sizing or syncing a new sparse file failed.
    #[error("cannot create {path} with {size} bytes: {source}")]
    Create {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
}

/// Whether the target is a plain file or a block device; trim differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Regular,
    BlockDevice,
}

/// What every engine's device shares: the opened file and what was learnt about it, the
/// request checks, the page-cache fast paths, and the rare requests (trim, write-zeroes,
/// allocation) that run on the blocking pool whatever the engine.
///
/// # Invariants
/// - `info.size` is a multiple of `info.block_size`, fixed at open.
/// - `info.read_only` ⇔ the descriptor was opened without write access.
/// - With `direct`, every transfer buffer handed to the kernel is `DIRECT_ALIGN`-aligned.
#[derive(Debug)]
pub(super) struct FileTarget {
    pub(super) file: Arc<File>,
    path: PathBuf,
    kind: Kind,
    pub(super) direct: bool,
    /// Try the page cache without waiting first (see [`FileOptions::nowait_fast_path`]).
    nowait: bool,
    /// Writes try `RWF_NOWAIT` too: cleared the first time the file system answers that it
    /// cannot (ext4 buffered writes), so that it costs one system call, once.
    nowait_writes: AtomicBool,
    /// Small writes without `RWF_NOWAIT` run inline (see [`FileOptions::inline_writes`]).
    inline: InlineWrites,
    pub(super) info: DeviceInfo,
}

/// Where a read stands after [`FileTarget::begin_read`].
pub(super) enum ReadStart {
    /// Nothing is left to read: the bytes to answer with.
    Done(Bytes),
    /// The engine reads `buffer[done..len]` from `offset + done`, then hands the buffer to
    /// [`FileTarget::finish_read`].
    Rest {
        buffer: Buffer,
        done: usize,
        len: usize,
    },
}

impl FileTarget {
    /// Opens `path` (a regular file or a block device) with `options`; the engine is the
    /// caller's to set up.
    pub(super) fn open(path: &Path, options: FileOptions) -> Result<Self, FileError> {
        let block_size = options.block_size;
        if block_size != 512 && block_size != 4096 {
            return Err(FileError::BadBlockSize { block_size });
        }
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(path).map_err(|source| FileError::Open {
            path: path.to_owned(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| FileError::Stat {
            path: path.to_owned(),
            source,
        })?;
        let file_type = meta.file_type();
        let (kind, size) = if file_type.is_file() {
            (Kind::Regular, meta.len())
        } else if file_type.is_block_device() {
            let size = sys::block_device_size(&file).map_err(|source| FileError::DeviceSize {
                path: path.to_owned(),
                source,
            })?;
            (Kind::BlockDevice, size)
        } else {
            return Err(FileError::NotFileOrBlockDevice {
                path: path.to_owned(),
            });
        };
        if size % u64::from(block_size) != 0 {
            return Err(FileError::SizeNotBlockMultiple {
                path: path.to_owned(),
                size,
                block_size,
            });
        }
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
            kind,
            direct: options.direct,
            nowait: options.nowait_fast_path && !options.direct,
            nowait_writes: AtomicBool::new(options.nowait_fast_path && !options.direct),
            inline: InlineWrites::new(
                options.inline_writes
                    && !options.direct
                    && std::env::var(INLINE_WRITES_ENV).as_deref() != Ok("off"),
            ),
            info: DeviceInfo {
                size,
                block_size,
                read_only: options.read_only,
                supports_trim: true,
                supports_write_zeroes: true,
                // One descriptor serves every connection, so one fdatasync covers all.
                flush_covers_all_connections: true,
            },
        })
    }

    /// Refuses writes on a read-only device and checks the range; the common prologue
    /// of every modifying request.
    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.info.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.info.size)
    }

    /// `O_DIRECT` rejects unaligned transfers with a bare `EINVAL`; say what was wrong.
    fn check_direct_alignment(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let bs = u64::from(self.info.block_size);
        if self.direct && (offset % bs != 0 || len % bs != 0) {
            return Err(BlockError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: request {offset}+{len} is not aligned to the block size {bs}, \
                     which O_DIRECT requires",
                    self.path.display()
                ),
            )));
        }
        Ok(())
    }

    /// Runs blocking file work on the blocking pool.
    pub(super) async fn blocking<T, F>(&self, work: F) -> Result<T, BlockError>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> io::Result<T> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        crate::sync::blocking(
            move || work(&file).map_err(BlockError::Io),
            |join| {
                BlockError::Io(io::Error::other(format!(
                    "blocking I/O task failed: {join}"
                )))
            },
        )
        .await
    }

    /// A read's checks, its buffer, and what the page cache gives without waiting.
    pub(super) fn begin_read(&self, offset: u64, len: u32) -> Result<ReadStart, BlockError> {
        check_range(offset, u64::from(len), self.info.size)?;
        self.check_direct_alignment(offset, u64::from(len))?;
        if len == 0 {
            return Ok(ReadStart::Done(Bytes::new()));
        }
        let len = len as usize;
        // Large and direct reads land in a recycled aligned buffer: no fresh mapping to
        // fault in per request, and no bounce copy for O_DIRECT. Only its first `len`
        // bytes are shown, and only once this read has filled all of them.
        let mut buffer = if self.direct || len >= MIN_RECYCLED {
            Buffer::Aligned(BufferPool::shared().take(len))
        } else {
            Buffer::Owned(vec![0u8; len])
        };
        let mut done = 0;
        if self.nowait {
            done = sys::read_nowait(&self.file, &mut buffer.as_mut_slice()[..len], offset);
        }
        if done == len {
            return Self::finish_read(buffer, len).map(ReadStart::Done);
        }
        Ok(ReadStart::Rest { buffer, done, len })
    }

    /// The first `len` bytes of a read's filled `buffer`, as the answer.
    pub(super) fn finish_read(buffer: Buffer, len: usize) -> Result<Bytes, BlockError> {
        match buffer {
            Buffer::Aligned(aligned) => Ok(BufferPool::shared().lend(aligned, len)),
            Buffer::Owned(v) => Ok(Bytes::from(v)),
            Buffer::None | Buffer::Shared(_) => Err(BlockError::Io(io::Error::other(
                "a read's buffer came back changed",
            ))),
        }
    }

    /// A write's checks and what the calling thread writes itself (the page cache without
    /// waiting, or an inline write). `None`: nothing is left to do. `Some(done)`: the engine
    /// writes `data[done..]` at `offset + done`, then syncs with `fua`.
    pub(super) fn begin_write(
        &self,
        offset: u64,
        data: &Bytes,
        fua: bool,
    ) -> Result<Option<usize>, BlockError> {
        let len = data.len() as u64;
        self.check_write(offset, len)?;
        self.check_direct_alignment(offset, len)?;
        if data.is_empty() {
            return Ok(None);
        }
        let mut done = 0;
        if self.nowait_writes.load(Ordering::Relaxed) {
            match sys::write_nowait(&self.file, data, offset) {
                Some(n) => done = n,
                None => self.nowait_writes.store(false, Ordering::Relaxed),
            }
            if done == data.len() && !fua {
                return Ok(None);
            }
        }
        // Only where RWF_NOWAIT writes are unsupported: where they work, a write they could
        // not take is one that would wait, and that belongs to the engine.
        if done == 0
            && data.len() <= INLINE_WRITE_MAX
            && !self.nowait_writes.load(Ordering::Relaxed)
            && self.inline.now()
        {
            let started = Instant::now();
            let written = self.file.write_all_at(data, offset);
            self.inline.took(started.elapsed());
            written.map_err(BlockError::Io)?;
            if !fua {
                return Ok(None);
            }
            // Only the flush is left for the engine.
            done = data.len();
        }
        Ok(Some(done))
    }

    /// Whether a flush has anything to do: nothing was written through a read-only
    /// descriptor, and fdatasync would only cost time.
    pub(super) fn flush_needed(&self) -> bool {
        !self.info.read_only
    }

    pub(super) async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let kind = self.kind;
        self.blocking(move |file| {
            let result = match kind {
                Kind::Regular => sys::punch_hole(file, offset, len),
                Kind::BlockDevice => sys::discard(file, offset, len),
            };
            match result {
                // Trim is a hint: a filesystem or device that cannot discard keeps the
                // data, which is a correct (if less thrifty) outcome.
                Err(e) if sys::is_unsupported(&e) => Ok(()),
                other => other,
            }
        })
        .await
    }

    pub(super) async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        self.check_direct_alignment(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let kind = self.kind;
        self.blocking(move |file| {
            let zeroed = match sys::zero_range(file, offset, len) {
                Ok(()) => true,
                Err(e) if sys::is_unsupported(&e) => false,
                Err(e) => return Err(e),
            };
            // A punched hole reads back as zeroes in a regular file (not on a device,
            // where discard may leave old data).
            let zeroed = zeroed
                || (kind == Kind::Regular
                    && match sys::punch_hole(file, offset, len) {
                        Ok(()) => true,
                        Err(e) if sys::is_unsupported(&e) => false,
                        Err(e) => return Err(e),
                    });
            if !zeroed {
                write_zero_chunks(file, offset, len)?;
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn has_data(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        check_range(offset, len, self.info.size)?;
        if len == 0 {
            return Ok(false);
        }
        let extents = self.allocation(offset, len, 1).await?;
        Ok(!matches!(
            extents.first(),
            Some(Extent { len: hole, allocation: Allocation::Hole }) if *hole >= len
        ))
    }

    pub(super) async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.info.size)?;
        if matches!(self.kind, Kind::BlockDevice) || len == 0 {
            // A block device knows no holes (discarded blocks may read as anything).
            return Ok(vec![Extent {
                len,
                allocation: Allocation::Data,
            }]);
        }
        let block = u64::from(self.info.block_size);
        self.blocking(move |file| allocation::seek_extents(file, offset, len, block, max_extents))
            .await
    }
}

/// When small buffered writes run on the calling thread (see [`FileOptions::inline_writes`]).
#[derive(Debug)]
struct InlineWrites {
    enabled: bool,
    /// The moment [`FileTarget::open`] ran; pauses are counted from it.
    epoch: Instant,
    /// Nanoseconds after `epoch` before which writes go to the engine.
    paused_until: AtomicU64,
    /// The last pause's length in nanoseconds (0 before the first).
    pause: AtomicU64,
}

impl InlineWrites {
    fn new(enabled: bool) -> Self {
        Self {
            enabled,
            epoch: Instant::now(),
            paused_until: AtomicU64::new(0),
            pause: AtomicU64::new(0),
        }
    }

    /// Whether a write may run inline now.
    fn now(&self) -> bool {
        if !self.enabled {
            return false;
        }
        let until = self.paused_until.load(Ordering::Relaxed);
        until == 0 || self.epoch.elapsed().as_nanos() as u64 >= until
    }

    /// Notes how long an inline write took; a slow one pauses inline writes. Two threads
    /// noting slow writes at once may each set a pause: either is a valid one.
    fn took(&self, elapsed: Duration) {
        if elapsed > INLINE_SLOW {
            let now = self.epoch.elapsed().as_nanos() as u64;
            let (min, max) = (
                INLINE_PAUSE_MIN.as_nanos() as u64,
                INLINE_PAUSE_MAX.as_nanos() as u64,
            );
            let ended = self.paused_until.load(Ordering::Relaxed);
            let last = self.pause.load(Ordering::Relaxed);
            // Soon after the last pause ended: the slowness goes on, pause longer.
            let pause = if ended != 0 && now < ended.saturating_add(max) {
                (last * 2).clamp(min, max)
            } else {
                min
            };
            self.pause.store(pause, Ordering::Relaxed);
            self.paused_until.store(now + pause, Ordering::Relaxed);
            tracing::debug!(
                micros = elapsed.as_micros() as u64,
                pause_ms = pause / 1_000_000,
                "a write on the calling thread was slow; writes go to the I/O engine for a while"
            );
        }
    }
}

/// Whether `data` starts on a [`DIRECT_ALIGN`] boundary, so `O_DIRECT` can take it as it
/// is (recycled NBD payloads do; the length is checked against the block size apart).
pub(super) fn is_aligned(data: &[u8]) -> bool {
    data.as_ptr() as usize % DIRECT_ALIGN == 0
}

/// Writes `len` zero bytes at `offset` in chunks of at most [`ZERO_CHUNK`], from an
/// aligned buffer so the same path works with `O_DIRECT`.
fn write_zero_chunks(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let chunk = len.min(ZERO_CHUNK as u64) as usize;
    let zeroes = aligned::zeroed(chunk);
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(dir: &tempfile::TempDir, size: u64, options: FileOptions) -> Arc<dyn BlockDevice> {
        let path = dir.path().join("disk.img");
        if !path.exists() {
            create_sparse(&path, size).expect("create");
        }
        open(&path, options).expect("open")
    }

    #[tokio::test]
    async fn write_read_trim_zeroes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 1 << 20, FileOptions::new(512));
        assert_eq!(dev.info().size, 1 << 20);
        dev.write(4096, Bytes::from(vec![0xab; 8192]), false)
            .await
            .unwrap();
        assert_eq!(dev.read(4096, 8192).await.unwrap(), vec![0xab; 8192]);
        dev.write_zeroes(4096, 4096, true).await.unwrap();
        assert_eq!(dev.read(4096, 4096).await.unwrap(), vec![0; 4096]);
        assert_eq!(dev.read(8192, 4096).await.unwrap(), vec![0xab; 4096]);
        dev.trim(8192, 4096).await.unwrap();
        // A punched hole in a regular file reads as zeroes.
        assert_eq!(dev.read(8192, 4096).await.unwrap(), vec![0; 4096]);
        dev.flush().await.unwrap();
    }

    #[tokio::test]
    async fn out_of_range_requests_touch_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device(&dir, 8192, FileOptions::new(512));
        let err = dev
            .write(7680, Bytes::from(vec![1; 1024]), false)
            .await
            .unwrap_err();
        assert!(matches!(err, BlockError::OutOfRange { .. }), "{err}");
        assert!(matches!(
            dev.read(u64::MAX - 10, 512).await.unwrap_err(),
            BlockError::OutOfRange { .. }
        ));
        assert!(matches!(
            dev.trim(8192, 1).await.unwrap_err(),
            BlockError::OutOfRange { .. }
        ));
        assert!(matches!(
            dev.write_zeroes(0, 8193, false).await.unwrap_err(),
            BlockError::OutOfRange { .. }
        ));
        assert_eq!(
            std::fs::read(dir.path().join("disk.img")).unwrap(),
            vec![0; 8192]
        );
    }

    #[tokio::test]
    async fn read_only_device_refuses_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let dev = open(
            &path,
            FileOptions {
                read_only: true,
                ..FileOptions::new(4096)
            },
        )
        .unwrap();
        assert!(dev.info().read_only);
        for err in [
            dev.write(0, Bytes::from(vec![1; 4096]), false)
                .await
                .unwrap_err(),
            dev.trim(0, 4096).await.unwrap_err(),
            dev.write_zeroes(0, 4096, false).await.unwrap_err(),
        ] {
            assert!(matches!(err, BlockError::ReadOnly), "{err}");
        }
        assert_eq!(dev.read(0, 4096).await.unwrap(), vec![7; 4096]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7; 4096]);
    }

    #[tokio::test]
    async fn direct_io_uses_aligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 1 << 20).unwrap();
        let options = FileOptions {
            direct: true,
            ..FileOptions::new(4096)
        };
        let dev = match open(&path, options) {
            Ok(dev) => dev,
            // tmpfs has no O_DIRECT; nothing to test there.
            Err(FileError::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("skipping: the temp directory's filesystem refuses O_DIRECT");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        dev.write(8192, Bytes::from(vec![0x5a; 4096 * 3]), true)
            .await
            .unwrap();
        assert_eq!(
            dev.read(8192, 4096 * 3).await.unwrap(),
            vec![0x5a; 4096 * 3]
        );
        dev.write_zeroes(8192, 4096, false).await.unwrap();
        assert_eq!(dev.read(8192, 4096).await.unwrap(), vec![0; 4096]);
        let err = dev.read(100, 4096).await.unwrap_err();
        assert!(err.to_string().contains("O_DIRECT"), "{err}");
    }

    #[test]
    fn create_sparse_refuses_to_overwrite_and_open_checks_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 1 << 30).unwrap();
        // Sparse: a gigabyte of size, (almost) no blocks.
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 30);
        assert!(std::os::unix::fs::MetadataExt::blocks(&meta) < 1024);
        assert!(matches!(
            create_sparse(&path, 4096),
            Err(FileError::AlreadyExists { .. })
        ));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 30);

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            open(&odd, FileOptions::new(512)),
            Err(FileError::SizeNotBlockMultiple { size: 1000, .. })
        ));
        assert!(matches!(
            open(&path, FileOptions::new(1024)),
            Err(FileError::BadBlockSize { block_size: 1024 })
        ));
        // Read-only, so that open(2) itself succeeds on the directory and the type
        // check is what refuses it.
        let read_only = FileOptions {
            read_only: true,
            ..FileOptions::new(512)
        };
        assert!(matches!(
            open(dir.path(), read_only),
            Err(FileError::NotFileOrBlockDevice { .. })
        ));
    }

    /// A slow inline write sends writes to the engine for a pause, then they come back.
    #[test]
    fn a_slow_inline_write_pauses_inline_writes() {
        let inline = InlineWrites::new(true);
        assert!(inline.now());
        inline.took(INLINE_SLOW / 2);
        assert!(inline.now(), "a fast write changes nothing");
        inline.took(INLINE_SLOW * 2);
        assert!(!inline.now(), "paused after a slow write");
        // As if the pause had started long ago.
        inline.paused_until.store(1, Ordering::Relaxed);
        assert!(inline.now(), "back after the pause");
        assert!(!InlineWrites::new(false).now());
    }

    /// An isolated slow write pauses for the shortest pause; slow writes that keep coming
    /// right after each pause double it up to the longest.
    #[test]
    fn pauses_grow_while_slow_writes_keep_coming() {
        let mut inline = InlineWrites::new(true);
        // Opened a minute ago, so "long after a pause" can be set up without waiting.
        inline.epoch = Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or(inline.epoch);
        let pause = |i: &InlineWrites| Duration::from_nanos(i.pause.load(Ordering::Relaxed));
        inline.took(INLINE_SLOW * 2);
        assert_eq!(pause(&inline), INLINE_PAUSE_MIN, "an isolated slow write");
        let mut expected = INLINE_PAUSE_MIN;
        for _ in 0..8 {
            // As if the pause had just ended, then the next inline write was slow again.
            let now = inline.epoch.elapsed().as_nanos() as u64;
            inline.paused_until.store(now, Ordering::Relaxed);
            inline.took(INLINE_SLOW * 2);
            expected = (expected * 2).min(INLINE_PAUSE_MAX);
            assert_eq!(pause(&inline), expected);
        }
        assert_eq!(expected, INLINE_PAUSE_MAX);
        // Long after the last pause ended: isolated again.
        inline.paused_until.store(1, Ordering::Relaxed);
        inline.took(INLINE_SLOW * 2);
        assert_eq!(pause(&inline), INLINE_PAUSE_MIN);
    }

    /// Inline writes (the default) and writes through either engine see the same bytes,
    /// FUA included.
    #[tokio::test]
    async fn inline_writes_agree_with_the_engines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 1 << 20).unwrap();
        let inline = open(&path, FileOptions::new(4096)).unwrap();
        let pooled = open(
            &path,
            FileOptions {
                inline_writes: false,
                ..FileOptions::new(4096)
            },
        )
        .unwrap();
        for (at, len, fua) in [(0u64, 4096usize, false), (65536, INLINE_WRITE_MAX, true)] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
            inline
                .write(at, Bytes::from(data.clone()), fua)
                .await
                .unwrap();
            assert_eq!(pooled.read(at, len as u32).await.unwrap(), data);
            let other: Vec<u8> = data.iter().map(|b| b ^ 0xff).collect();
            pooled
                .write(at, Bytes::from(other.clone()), fua)
                .await
                .unwrap();
            assert_eq!(inline.read(at, len as u32).await.unwrap(), other);
        }
    }

    /// The page-cache fast path and the blocking path see the same bytes, whichever wrote.
    #[tokio::test]
    async fn nowait_fast_path_agrees_with_the_blocking_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 1 << 20).unwrap();
        let fast = open(&path, FileOptions::new(4096)).unwrap();
        let slow = open(
            &path,
            FileOptions {
                nowait_fast_path: false,
                inline_writes: false,
                ..FileOptions::new(4096)
            },
        )
        .unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        fast.write(4096, Bytes::from(data.clone()), false)
            .await
            .unwrap();
        assert_eq!(slow.read(4096, 65536).await.unwrap(), data);
        slow.write(131072, Bytes::from(data.clone()), true)
            .await
            .unwrap();
        assert_eq!(fast.read(131072, 65536).await.unwrap(), data);
        // A hole reads as zeroes either way.
        assert!(fast
            .read(512 << 10, 4096)
            .await
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }

    /// A device on the io_uring engine, or `None` (and a note) where io_uring is refused.
    fn uring_device(path: &Path, direct: bool) -> Option<UringFileDevice> {
        if let Err(reason) = crate::block::engine::probe_uring() {
            eprintln!("skipping: {reason}");
            return None;
        }
        // Writes through the ring itself, not inline on the calling thread.
        let options = FileOptions {
            direct,
            engine: IoEngine::Uring,
            inline_writes: false,
            ..FileOptions::new(4096)
        };
        match UringFileDevice::open(path, options) {
            Ok(dev) => Some(dev),
            Err(FileError::Open { source, .. })
                if direct && source.raw_os_error() == Some(libc::EINVAL) =>
            {
                eprintln!("skipping: the temp directory's filesystem refuses O_DIRECT");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_uring_engine_needs_a_runtime() {
        if crate::block::engine::probe_uring().is_err() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 1 << 20).unwrap();
        let options = FileOptions {
            engine: IoEngine::Uring,
            ..FileOptions::new(4096)
        };
        let err = UringFileDevice::open(&path, options).unwrap_err();
        assert!(matches!(err, FileError::IoEngine { .. }), "{err}");
        assert!(err.to_string().contains("tokio runtime"), "{err}");
    }

    /// io_uring and the thread pool see the same bytes, whichever wrote, buffered and
    /// with O_DIRECT, with FUA and flush.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recycled_read_buffers_show_only_what_the_read_filled() {
        const MIB: u64 = 1 << 20;
        let pattern: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
        for (engine, direct, nowait) in [
            (IoEngine::Threads, false, true),
            (IoEngine::Threads, false, false),
            (IoEngine::Threads, true, false),
            (IoEngine::Uring, false, true),
            (IoEngine::Uring, true, false),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            let mut content = pattern.clone();
            content.resize(4 * MIB as usize, 0xee);
            std::fs::write(&path, &content).unwrap();
            let device: Arc<dyn BlockDevice> = if engine == IoEngine::Uring {
                match uring_device(&path, direct) {
                    Some(device) => Arc::new(device),
                    None => continue,
                }
            } else {
                let options = FileOptions {
                    direct,
                    nowait_fast_path: nowait,
                    ..FileOptions::new(4096)
                };
                match open(&path, options) {
                    Ok(device) => device,
                    Err(FileError::Open { source, .. })
                        if direct && source.raw_os_error() == Some(libc::EINVAL) =>
                    {
                        continue;
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            let case = format!("{engine} direct={direct} nowait={nowait}");
            // Recycled buffers go round: each read shows its own bytes and length only.
            for _ in 0..3 {
                let first = device.read(0, MIB as u32).await.unwrap();
                assert!(first == pattern[..MIB as usize], "{case}");
                drop(first);
                // Buffered: seven sectors short, so the 1 MiB buffer is reused with a stale
                // tail past the end. O_DIRECT needs whole blocks: a page short.
                let short = if direct { MIB - 4096 } else { MIB - 3584 };
                let second = device.read(2 * MIB, short as u32).await.unwrap();
                assert_eq!(second.len() as u64, short, "{case}");
                assert!(second.iter().all(|&b| b == 0xee), "{case}");
                let small = device.read(MIB, 4096).await.unwrap();
                assert!(small == pattern[MIB as usize..][..4096], "{case}");
            }
            // A read the file cannot fill (shrunk behind the device's back) is an error,
            // never a buffer whose tail an earlier read left behind.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(3 * MIB + 4096)
                .unwrap();
            let err = device.read(3 * MIB, MIB as u32).await.unwrap_err();
            assert!(
                matches!(&err, BlockError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof),
                "{case}: {err}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_agrees_with_the_threads_engine() {
        for direct in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("disk.img");
            create_sparse(&path, 4 << 20).unwrap();
            let Some(ring) = uring_device(&path, direct) else {
                continue;
            };
            assert_eq!(ring.engine(), IoEngine::Uring);
            let threads = SyncFileDevice::open(&path, FileOptions::new(4096)).unwrap();
            assert_eq!(threads.engine(), IoEngine::Threads);
            let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 13 % 251) as u8).collect();
            ring.write(8192, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            assert_eq!(threads.read(8192, 1 << 20).await.unwrap(), data);
            threads
                .write(2 << 20, Bytes::from(data.clone()), false)
                .await
                .unwrap();
            threads.flush().await.unwrap();
            assert_eq!(ring.read(2 << 20, 1 << 20).await.unwrap(), data);
            ring.write(0, Bytes::from(vec![9u8; 4096]), true)
                .await
                .unwrap();
            ring.flush().await.unwrap();
            assert_eq!(threads.read(0, 4096).await.unwrap(), vec![9u8; 4096]);
            // Trim and write-zeroes (blocking pool with either engine) still work.
            ring.write_zeroes(0, 4096, false).await.unwrap();
            assert_eq!(ring.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
            // Reads past the end are refused before the ring sees them.
            assert!(matches!(
                ring.read(4 << 20, 4096).await.unwrap_err(),
                BlockError::OutOfRange { .. }
            ));
        }
    }

    /// Many tasks at once on one ring: every write lands, every completion reaches its
    /// own task.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_completes_many_concurrent_requests() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 8 << 20).unwrap();
        let Some(dev) = uring_device(&path, false) else {
            return;
        };
        let dev = Arc::new(dev);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..1024u64 {
            let dev = Arc::clone(&dev);
            tasks.spawn(async move {
                let block = vec![(i % 251) as u8 + 1; 4096];
                dev.write(i * 4096, Bytes::from(block.clone()), i % 64 == 0)
                    .await
                    .unwrap();
                assert_eq!(dev.read(i * 4096, 4096).await.unwrap(), block);
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let file = std::fs::read(&path).unwrap();
        for i in 0..1024usize {
            assert!(file[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == (i % 251) as u8 + 1));
        }
    }

    /// A request whose future is dropped mid-flight keeps its buffer until the kernel is
    /// done; the device goes on serving and closes cleanly.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_engine_survives_dropped_requests() {
        use std::future::Future;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        create_sparse(&path, 8 << 20).unwrap();
        let Some(dev) = uring_device(&path, false) else {
            return;
        };
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for i in 0..64u64 {
            let mut write = Box::pin(dev.write(i << 16, Bytes::from(vec![7u8; 1 << 16]), true));
            let _ = write.as_mut().poll(&mut cx);
            drop(write);
            let mut read = Box::pin(dev.read(i << 16, 1 << 16));
            let _ = read.as_mut().poll(&mut cx);
            drop(read);
        }
        dev.write(0, Bytes::from(vec![3u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(dev.read(0, 4096).await.unwrap(), vec![3u8; 4096]);
        drop(dev);
    }
}
