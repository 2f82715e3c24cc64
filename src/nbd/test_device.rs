//! The one `BlockDevice` fake of the NBD tests: a test says what its device reports and how
//! it reads ([`Reads`]); [`ReadsOnly`] makes that a device whose writes, flushes, trims and
//! write-zeroes succeed and change nothing, so no test writes those four again.
//!
//! Must never: be compiled outside `cfg(test)`; keep what a test writes (a test that needs
//! its writes back uses a real file device).

use std::ops::Deref;

use async_trait::async_trait;
use bytes::Bytes;

use crate::block::{BlockDevice, BlockError, DeviceInfo, ReadTicket};

/// What a test device answers to `info` and `read`, and, for one whose reads need
/// confirming, to the three confirmation calls (by default: nothing to confirm).
#[async_trait]
pub(crate) trait Reads: Send + Sync {
    fn info(&self) -> DeviceInfo;
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError>;
    fn reads_to_confirm(&self) -> bool {
        false
    }
    async fn read_to_confirm(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
        self.read(offset, len).await.map(|data| (data, None))
    }
    fn confirm_reads(&self, _oldest: ReadTicket) -> bool {
        false
    }
}

/// A [`Reads`] as a device that accepts and drops every write. Derefs to the test's own
/// type, so a test reaches its counters and gates through the `Arc` it serves.
pub(crate) struct ReadsOnly<R>(pub(crate) R);

impl<R> Deref for ReadsOnly<R> {
    type Target = R;
    fn deref(&self) -> &R {
        &self.0
    }
}

#[async_trait]
impl<R: Reads> BlockDevice for ReadsOnly<R> {
    fn info(&self) -> DeviceInfo {
        self.0.info()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        self.0.read(offset, len).await
    }
    fn reads_to_confirm(&self) -> bool {
        self.0.reads_to_confirm()
    }
    async fn read_to_confirm(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
        self.0.read_to_confirm(offset, len).await
    }
    fn confirm_reads(&self, oldest: ReadTicket) -> bool {
        self.0.confirm_reads(oldest)
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> Result<(), BlockError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    async fn trim(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), BlockError> {
        Ok(())
    }
}
