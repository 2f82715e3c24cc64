//! The small block-device trait every frontend serves and every target implements.
//!
//! Frontends (NBD now, ublk later) hold a `dyn BlockDevice` and know nothing of journals;
//! the primary core (`writer::primary`) implements it for `serve`, a file target
//! ([`sync_file::SyncFileDevice`] or [`uring_file::UringFileDevice`], one per I/O engine,
//! opened by [`file::open`]) for a plain file or block device, and the time-travel view
//! (`timetravel::view::TimeView`) implements it for `mount --at`.
//!
//! Must never: accept I/O outside `0..size` (callers get [`BlockError::OutOfRange`] and
//! nothing is touched).

use async_trait::async_trait;
use bytes::Bytes;

use allocation::{Allocation, Extent};

pub(crate) mod allocation;
pub(crate) mod buffers;
// pub: a namespace (`engine::select`, `engine::probe_uring`); hoisted, `select` says nothing.
pub mod engine;
// pub: a namespace (`file::open`, `file::FileOptions`); hoisted, `open` says nothing.
pub mod file;
pub(crate) mod group;
pub(crate) mod sync_file;
mod uring;

pub use group::{DeviceSlice, GroupDevice};
pub(crate) mod uring_file;

/// What a device is and what it supports; frontends advertise exactly this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size (512 or 4096): the smallest unit clients should address.
    pub block_size: u32,
    pub read_only: bool,
    /// Discard (TRIM) is honoured.
    pub supports_trim: bool,
    /// Write-zeroes is honoured without sending data.
    pub supports_write_zeroes: bool,
    /// A flush on any connection makes every write completed on any connection durable.
    pub flush_covers_all_connections: bool,
}

/// One variant per way a block operation fails; frontends map each to a protocol error.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device (or wraps around).
    #[error("request {offset}+{len} is outside the device of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write, trim or write-zeroes on a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this device.
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// The underlying file or device failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// What a device wants confirmed about a read before its data may be sent: see
/// [`BlockDevice::read_to_confirm`]. Opaque to frontends; only compared (older is smaller).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReadTicket(pub(crate) u64);

#[async_trait]
pub trait BlockDevice: Send + Sync {
    fn info(&self) -> DeviceInfo;
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError>;
    /// Whether reads should go through [`BlockDevice::read_to_confirm`]: asked once per
    /// connection, so every other device's reads cost nothing more than [`BlockDevice::read`].
    fn reads_to_confirm(&self) -> bool {
        false
    }
    /// A read whose data may still need [`BlockDevice::confirm_reads`] before it is sent: a
    /// device whose bytes can change under a read it must not show changed (a time view
    /// beside a running replay agent) checks once per batch of replies instead of once per
    /// read. With a ticket, the data may be sent only if `confirm_reads`, called after the
    /// read completed, says so; otherwise the frontend reads again with [`BlockDevice::read`].
    /// Without one the data is final.
    async fn read_to_confirm(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
        self.read(offset, len).await.map(|data| (data, None))
    }
    /// Whether every read that returned a ticket at least `oldest`, and completed before this
    /// call, may be sent as it was read. `false` costs the caller a [`BlockDevice::read`] per
    /// such read, never a wrong byte.
    fn confirm_reads(&self, oldest: ReadTicket) -> bool {
        let _ = oldest;
        false
    }
    /// Writes `data`; with `fua` the data is durable before this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), BlockError>;
    /// Discards a range (its content becomes unspecified; files punch a hole).
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes a range read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError>;
    /// Whether `offset..offset+len` may hold data: `false` only when the device knows the
    /// range is unallocated (a hole of a sparse file) and so reads as zeroes. A resync skips
    /// such ranges without reading them. Devices that cannot tell answer `true`.
    async fn has_data(&self, offset: u64, len: u64) -> Result<bool, BlockError> {
        let _ = (offset, len);
        Ok(true)
    }
    /// What `offset..offset+len` holds, as consecutive extents from `offset`: at least one
    /// and at most `max_extents`, never past the range (a shorter answer is fine: the
    /// caller asks again from where it ended). A range is a hole or zero only if it reads
    /// as zeroes. Devices that cannot tell answer one data extent.
    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.info().size)?;
        let _ = max_extents;
        Ok(vec![Extent {
            len,
            allocation: Allocation::Data,
        }])
    }
}

/// Checks `offset..offset+len` against a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}
