//! The file target on the thread engine ([`IoEngine::Threads`]): reads, writes and flushes
//! that the page cache cannot serve at once are `pread`/`pwrite`/`fdatasync` on the shared
//! descriptor, run on tokio's blocking pool so the async frontends never stall. What both
//! engines share (checks, the page-cache fast paths, trim, write-zeroes, allocation) is
//! `super::file::FileTarget`.
//!
//! Must never: run a blocking system call on a runtime thread other than the bounded
//! inline write `FileTarget` allows, or report a FUA write or a flush as done before
//! `fdatasync` has returned.

use std::os::unix::fs::FileExt;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::allocation::Extent;
use super::file::{is_aligned, FileError, FileOptions, FileTarget, ReadStart};
use super::{BlockDevice, BlockError, DeviceInfo};
use crate::aligned;

/// A regular file or block device served through the blocking pool.
#[derive(Debug)]
pub(crate) struct SyncFileDevice {
    target: FileTarget,
}

impl SyncFileDevice {
    /// Opens `path` (a regular file or a block device) with `options` (its `engine` is not
    /// looked at: this type is the thread engine).
    pub(crate) fn open(path: &Path, options: FileOptions) -> Result<Self, FileError> {
        Ok(Self {
            target: FileTarget::open(path, options)?,
        })
    }

    /// The engine running this device's reads, writes and flushes (the tests check which
    /// engine `open` picked).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> super::engine::IoEngine {
        super::engine::IoEngine::Threads
    }
}

#[async_trait]
impl BlockDevice for SyncFileDevice {
    fn info(&self) -> DeviceInfo {
        self.target.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        let (mut buffer, done, len) = match self.target.begin_read(offset, len)? {
            ReadStart::Done(bytes) => return Ok(bytes),
            ReadStart::Rest { buffer, done, len } => (buffer, done, len),
        };
        let buffer = self
            .target
            .blocking(move |file| {
                file.read_exact_at(&mut buffer.as_mut_slice()[done..len], offset + done as u64)?;
                Ok(buffer)
            })
            .await?;
        FileTarget::finish_read(buffer, len)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let Some(done) = self.target.begin_write(offset, &data, fua)? else {
            return Ok(());
        };
        let direct = self.target.direct;
        self.target
            .blocking(move |file| {
                if direct && !is_aligned(&data) {
                    file.write_all_at(&aligned::copied(&data), offset)?;
                } else {
                    file.write_all_at(&data[done..], offset + done as u64)?;
                }
                if fua {
                    file.sync_data()?;
                }
                Ok(())
            })
            .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        if !self.target.flush_needed() {
            return Ok(());
        }
        self.target.blocking(|file| file.sync_data()).await
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
