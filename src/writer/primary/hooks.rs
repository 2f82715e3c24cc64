//! The primary core's entry points for control commands, beside the I/O path: appending a
//! control record (`MARK`, `VERIFY`) in order, reading a region under its range lock for
//! a `VERIFY`, marking regions for a resync, and fencing on the lease keeper's word.
//!
//! Must never: journal a `VERIFY` whose checksum is not of the primary's bytes at that point
//! of the order (the region is read and its record queued under the region's range lock);
//! wait for pool memory (a full pool refuses the command, never the client's I/O).

use std::ops::Range;

use super::{Journaling, OnFence, PrimaryCore, Refuse};
use crate::block::BlockError;
use crate::journal::record::VerifyChecksum;
use crate::journal::Op;
use crate::writer::mode::Mode;
use crate::writer::shared::{device_record, record_cost};

/// Every way a control command on the core fails.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// `serve --no-journal`: there is no journal to write to.
    #[error("this daemon serves without a journal (--no-journal)")]
    NoJournal,
    /// Journaling stopped for good: another writer owns the journal.
    #[error("this writer is fenced ({reason}); nothing more reaches the journal")]
    Fenced { reason: String },
    /// A command that compares replicas needs a journal without a pending resync.
    #[error(
        "mode is {mode}, not logging: replicas inside a resync do not match the primary yet; \
         try again once `status` says logging"
    )]
    NotLogging { mode: Mode },
    /// The memory pool is full (the journal is behind); the command would only add to it.
    #[error("the memory pool is full (the journal is behind); try again later")]
    PoolFull,
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// The record was queued but did not become durable (store down, or fenced meanwhile).
    #[error("LSN {lsn} did not become durable in the journal (see `status` for why)")]
    NotDurable { lsn: u64 },
    /// This writer already demoted.
    #[error("this writer already demoted (DEMOTE at LSN {lsn}); it takes no more writes")]
    Demoted { lsn: u64 },
    /// A demote is in progress, or writes are refused already (`--on-fence`).
    #[error("writes are already refused here (a demote in progress, or fenced)")]
    Refusing,
    /// A resync did not drain in time: nothing was demoted.
    #[error(
        "mode is still {mode} after {waited:?} ({regions} dirty regions; {holdup}): a resync \
         is pending; nothing was demoted and writes are taken again — retry once `status` says \
         logging"
    )]
    ResyncPending {
        mode: Mode,
        regions: u64,
        waited: std::time::Duration,
        /// What opened the dirty episode and what its resync waits for.
        holdup: String,
    },
    /// The clean-stop marker could not be written.
    #[error("cannot write the clean-stop marker: {reason}")]
    Marker { reason: String },
    /// A region index past the device.
    #[error("region {region} does not exist: the device has regions 0..{count}")]
    NoSuchRegion { region: u64, count: u64 },
    /// Reading the primary failed.
    #[error("reading region {region} of the primary failed: {source}")]
    Read {
        region: u64,
        #[source]
        source: BlockError,
    },
}

/// A record appended by a control command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub lsn: u64,
    pub timestamp_ns: u64,
}

impl PrimaryCore {
    pub(super) fn journaling(&self) -> Result<&Journaling, HookError> {
        let j = self.journal.as_ref().ok_or(HookError::NoJournal)?;
        if self.mode.is_fenced() {
            return Err(HookError::Fenced {
                reason: j
                    .stats
                    .stopped_reason()
                    .unwrap_or_else(|| "a newer writer epoch exists".into()),
            });
        }
        Ok(j)
    }

    /// Appends `op` (a record that changes no data) at the current point of the order.
    pub fn append_control(&self, op: Op) -> Result<Appended, HookError> {
        let j = self.journaling()?;
        let permit = j
            .pool
            .try_reserve_meta(record_cost(&op))
            .ok_or(HookError::PoolFull)?;
        let mut timestamp_ns = 0;
        let make = |lsn| {
            timestamp_ns = j.timestamps.next();
            device_record(&self.layout, lsn, timestamp_ns, op)
        };
        let lsn = j
            .intake
            .append(make, permit, true)
            .ok_or(HookError::ShuttingDown)?;
        Ok(Appended { lsn, timestamp_ns })
    }

    /// Appends `op` and waits until it is durable.
    pub async fn append_control_durable(&self, op: Op) -> Result<Appended, HookError> {
        let appended = self.append_control(op)?;
        if !self.wait_durable(appended.lsn).await {
            return Err(HookError::NotDurable { lsn: appended.lsn });
        }
        Ok(appended)
    }

    /// Regions of the device (the dirty tracker's unit).
    pub fn region_count(&self) -> u64 {
        self.info.size.div_ceil(self.dirty.region_size().max(1))
    }

    /// Byte range of region `region`.
    pub fn region_range(&self, region: u64) -> Result<Range<u64>, HookError> {
        let count = self.region_count();
        if region >= count {
            return Err(HookError::NoSuchRegion { region, count });
        }
        let size = self.dirty.region_size();
        let start = region * size;
        // In a group, a device's last region ends at the device (not in the padding).
        Ok(self.layout.clip(start..(start + size).min(self.info.size)))
    }

    /// Reads region `region` under its range lock and journals a `VERIFY` of it at that
    /// point of the order. Refused unless the mode is `logging`.
    pub async fn verify_region(
        &self,
        region: u64,
    ) -> Result<(Appended, VerifyChecksum), HookError> {
        let range = self.region_range(region)?;
        self.journaling()?;
        let mode = self.mode();
        if mode != Mode::Logging {
            return Err(HookError::NotLogging { mode });
        }
        let _held = self.locks.lock(range.clone()).await;
        // One region (the tracker's unit, 4 MiB by default) in memory at a time.
        let len = u32::try_from(range.end - range.start).expect("a region fits in u32");
        let data = self
            .device
            .read(range.start, len)
            .await
            .map_err(|source| HookError::Read { region, source })?;
        // Hashing 4 MiB takes milliseconds: off the async threads.
        let checksum = tokio::task::spawn_blocking(move || VerifyChecksum::of(&data))
            .await
            .map_err(|e| HookError::Read {
                region,
                source: BlockError::Io(std::io::Error::other(format!("hash task failed: {e}"))),
            })?;
        let appended = self.append_control(Op::Verify {
            offset: range.start,
            len: u64::from(len),
            checksum,
        })?;
        Ok((appended, checksum))
    }

    /// Marks `regions` dirty and opens a dirty episode (queueing its `RESYNC_BEGIN`), so
    /// the writer re-journals them from the primary as a resync span.
    pub fn resync_regions(&self, regions: &[u64]) -> Result<(), HookError> {
        let ranges = regions
            .iter()
            .map(|&r| self.region_range(r))
            .collect::<Result<Vec<_>, _>>()?;
        let j = self.journaling()?;
        tracing::info!(
            regions = regions.len(),
            "regions marked for a resync on request"
        );
        for range in ranges {
            j.episodes
                .not_journaled(Some(range), "resync asked for by the operator");
        }
        Ok(())
    }

    /// Stops journaling because another writer owns the journal (the lease keeper found a
    /// newer epoch). The primary keeps serving; changes from now on only mark regions dirty,
    /// and the writer drops what it still holds when its next upload fails (the lease
    /// wrapper refuses a fenced writer's uploads).
    pub fn fence(&self, reason: String) {
        if let Some(j) = &self.journal {
            j.stats.set_stopped(reason.clone());
        }
        self.mode.fence(&reason);
        let clients = match self.on_fence {
            OnFence::Keep => {
                "clients keep reading and writing (split brain: those writes \
                              stay in the activity log and are this site's divergence at rejoin)"
            }
            OnFence::ReadOnly => "writes are refused from now on (--on-fence read-only)",
            OnFence::Error => "every request fails from now on (--on-fence error)",
        };
        match self.on_fence {
            OnFence::Keep => {}
            OnFence::ReadOnly => self.refuse_at_least(Refuse::Writes),
            OnFence::Error => self.refuse_at_least(Refuse::Everything),
        }
        tracing::error!(
            reason = %reason,
            "FENCED (split brain): another writer owns the journal; nothing written here is \
             journaled any more; {clients}"
        );
    }
}
