//! The file target on the io_uring engine ([`IoEngine::Uring`]): reads, writes and flushes
//! that the page cache cannot serve at once go through one ring per device
//! (`super::uring`), submitted by the requesting task and completed on the runtime, with
//! no hand-off to another thread. Trim, write-zeroes and allocation are rare and run on the
//! blocking pool as on the thread engine (`super::file::FileTarget`, shared by both).
//!
//! Must never: open without a tokio runtime to complete on (refused at open), or report a
//! FUA write or a flush as done before the ring's `fdatasync` has completed.

use std::io;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::allocation::Extent;
use super::file::{is_aligned, FileError, FileOptions, FileTarget, ReadStart};
use super::uring::{Buffer, Ring};
use super::{BlockDevice, BlockError, DeviceInfo};
use crate::aligned;

/// A regular file or block device served through an io_uring.
#[derive(Debug)]
pub(crate) struct UringFileDevice {
    target: FileTarget,
    ring: Arc<Ring>,
}

impl UringFileDevice {
    /// Opens `path` (a regular file or a block device) with `options` (its `engine` is not
    /// looked at: this type is the io_uring engine). Needs a tokio runtime: the ring's
    /// completions are reaped on it.
    pub(crate) fn open(path: &Path, options: FileOptions) -> Result<Self, FileError> {
        let target = FileTarget::open(path, options)?;
        let ring = Ring::new(Arc::clone(&target.file)).map_err(|source| FileError::IoEngine {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self { target, ring })
    }

    /// The engine running this device's reads, writes and flushes (the tests check which
    /// engine `open` picked).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> super::engine::IoEngine {
        super::engine::IoEngine::Uring
    }
}

// The second half of this impl (trim, write_zeroes, has_data, allocation) is the same
// one-line delegations to `FileTarget` as `SyncFileDevice`'s: the two engines differ only in
// how read, write and flush reach the file, and everything else is `FileTarget`'s, once.
#[async_trait]
impl BlockDevice for UringFileDevice {
    fn info(&self) -> DeviceInfo {
        self.target.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let (buffer, done, len) = match self.target.begin_read(offset, len)? {
            ReadStart::Done(bytes) => return Ok(bytes),
            ReadStart::Rest { buffer, done, len } => (buffer, done, len),
        };
        let buffer = uring_read(&self.ring, buffer, done, len, offset).await?;
        FileTarget::finish_read(buffer, len)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let Some(done) = self.target.begin_write(offset, &data, fua)? else {
            return Ok(());
        };
        uring_write(
            &self.ring,
            offset + done as u64,
            data.slice(done..),
            fua,
            self.target.direct,
        )
        .await
        .map_err(BlockError::Io)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        if !self.target.flush_needed() {
            return Ok(());
        }
        self.ring.sync_data().await.map_err(BlockError::Io)
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.target.trim(offset, len).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        self.target.write_zeroes(offset, len, fua).await
    }

    async fn has_data(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        self.target.has_data(offset, len).await
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        self.target.allocation(offset, len, max_extents).await
    }
}

/// Reads `buffer[done..len]` from `offset + done` through the ring (short reads are
/// continued); returns the buffer.
async fn uring_read(
    ring: &Arc<Ring>,
    mut buffer: Buffer,
    mut done: usize,
    len: usize,
    offset: u64,
) -> io::Result<Buffer> {
    while done < len {
        let (n, back) = ring.read(buffer, done, len, offset + done as u64).await?;
        buffer = back;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "end of file at {} while reading {len} bytes at {offset}",
                    offset + done as u64
                ),
            ));
        }
        done += n;
    }
    Ok(buffer)
}

/// Writes `data` at `offset` through the ring (short writes are continued), then
/// `fdatasync` with `fua`.
async fn uring_write(
    ring: &Arc<Ring>,
    offset: u64,
    data: Bytes,
    fua: bool,
    direct: bool,
) -> io::Result<()> {
    let len = data.len();
    let mut buffer = if direct && !is_aligned(&data) {
        Buffer::Aligned(aligned::copied(&data))
    } else {
        Buffer::Shared(data)
    };
    let mut done = 0;
    while done < len {
        let (n, back) = ring.write(buffer, done, offset + done as u64).await?;
        buffer = back;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the file took no bytes at {}", offset + done as u64),
            ));
        }
        done += n;
    }
    if fua {
        ring.sync_data().await?;
    }
    Ok(())
}
