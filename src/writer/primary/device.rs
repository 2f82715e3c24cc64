//! The primary core as a [`BlockDevice`]: what the frontends (NBD, ublk) call. Reads and
//! allocation queries go straight to the primary; writes, trims and write-zeroes take the
//! ack path.
//!
//! Must never: speak a frontend protocol; take a lock for a read.

use async_trait::async_trait;
use bytes::Bytes;

use super::{PrimaryCore, Refuse};
use crate::block::allocation::Extent;
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo};
use crate::journal::Op;

#[async_trait]
impl BlockDevice for PrimaryCore {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        // Reads take no lock: a read overlapping a write in flight may see either content,
        // as on any disk.
        check_range(offset, u64::from(len), self.info.size)?;
        self.refuse_all()?;
        self.io.read(u64::from(len));
        self.device.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        check_range(offset, len, self.info.size)?;
        self.io.write(self.device_index(offset), len);
        // The record shares the payload with the primary's write; without a journal there is
        // no record, and no second owner to pay for (a clone of a fresh `Bytes` allocates its
        // shared count: one allocation per write, tests/request_allocations.rs).
        let record = if self.journal.is_some() {
            data.clone()
        } else {
            Bytes::new()
        };
        self.change(
            offset..offset + len,
            Op::Write {
                offset,
                data: record,
            },
            self.device.write(offset, data, fua),
        )
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.io.flush();
        self.refuse_all()?;
        if self.refusing() == Refuse::Writes {
            // Nothing more is journaled (demoted or fenced read-only): the flush only makes
            // the primary durable.
            return self.device.flush().await;
        }
        let applied = self.device.flush().await;
        let ticket = self.journal(Op::Flush, &applied);
        applied?;
        self.acknowledge(ticket).await;
        Ok(())
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        // Like a read: the primary's own holes (SEEK_HOLE on a file), no lock.
        check_range(offset, len, self.info.size)?;
        self.refuse_all()?;
        self.device.allocation(offset, len, max_extents).await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.io.trim(self.device_index(offset));
        self.change(
            offset..offset + len,
            Op::Discard { offset, len },
            self.device.trim(offset, len),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.io.write_zeroes(self.device_index(offset));
        self.change(
            offset..offset + len,
            Op::WriteZeroes { offset, len },
            self.device.write_zeroes(offset, len, fua),
        )
        .await
    }
}

impl PrimaryCore {
    /// The group device a change at `offset` lies on, for the per-device counts (`None` for
    /// one device: no lookup on its path).
    fn device_index(&self, offset: u64) -> Option<u32> {
        if self.layout.is_single() {
            return None;
        }
        self.layout.device_at(offset).map(|(dev, _)| dev)
    }

    /// `--on-fence error`: every request fails once fenced.
    fn refuse_all(&self) -> Result<(), BlockError> {
        match self.refusing() {
            Refuse::Everything => Err(BlockError::Io(std::io::Error::other(
                "this writer is fenced (--on-fence error): another writer owns the journal",
            ))),
            _ => Ok(()),
        }
    }
}
