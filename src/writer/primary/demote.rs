//! `demote`: the planned end of this writer's epoch. Writes, trims and zeroes are refused
//! from now on (reads go on, so applications shut down cleanly); changes in flight finish; a
//! pending resync drains; a `DEMOTE(epoch)` record is journaled as the epoch's last record;
//! the writer drains; the primary is fsync'd and its clean-stop marker written. The image is
//! then exactly the journal through the `DEMOTE`'s LSN, and a seed stamp beside it says so:
//! once `serve` is stopped, `replay --name SITE --replica <primary>` adopts it there and
//! follows the next primary without a full replay. Also the refusal levels that
//! `--on-fence` and `demote` share.
//!
//! Must never: journal anything after the `DEMOTE` (it is appended and the intake closed
//! in one step); demote a fenced writer (its epoch is over: another writer's records follow);
//! leave writes refused when the demote failed before its `DEMOTE` was queued.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{lock, HookError, PrimaryCore, Refuse};
use crate::journal::{Op, Record};
use crate::replayer::SeedStamp;
use crate::writer::mode::Mode;
use crate::writer::restart::{self, CleanMarker};
use crate::writer::shared::record_cost;

/// What `demote` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demoted {
    pub epoch: u64,
    /// The `DEMOTE` record's LSN: the image is exactly the journal through it.
    pub lsn: u64,
    /// The seq of the segment holding it (the epoch's last).
    pub seq: u64,
}

/// How often a demote looks whether the resync has drained.
const RESYNC_POLL: Duration = Duration::from_millis(50);

impl PrimaryCore {
    /// Which requests are refused now.
    pub(super) fn refusing(&self) -> Refuse {
        match self.refuse.load(Ordering::Acquire) {
            0 => Refuse::Nothing,
            1 => Refuse::Writes,
            _ => Refuse::Everything,
        }
    }

    /// Raises the refusal level (never lowers it).
    pub(super) fn refuse_at_least(&self, level: Refuse) {
        self.refuse.fetch_max(level as u8, Ordering::AcqRel);
    }

    /// The `DEMOTE` this writer journaled, if it demoted.
    pub fn demoted(&self) -> Option<Demoted> {
        lock(&self.demoted).clone()
    }

    /// See the module documentation. A resync still pending after `resync_timeout` fails the
    /// demote with nothing demoted (writes are taken again).
    pub async fn demote(&self, resync_timeout: Duration) -> Result<Demoted, HookError> {
        let j = self.journaling()?;
        if let Some(done) = self.demoted() {
            return Err(HookError::Demoted { lsn: done.lsn });
        }
        if self
            .refuse
            .compare_exchange(
                Refuse::Nothing as u8,
                Refuse::Writes as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return Err(HookError::Refusing);
        }
        tracing::info!("demote: refusing writes from now on; waiting for a pending resync");
        let undo = |e: HookError| {
            self.refuse.store(Refuse::Nothing as u8, Ordering::Release);
            tracing::warn!(error = %e, "demote failed; writes are taken again");
            e
        };
        // The resync reads regions under their range locks: wait for it before taking the
        // whole device's.
        let deadline = Instant::now() + resync_timeout;
        loop {
            match self.mode() {
                Mode::Logging => break,
                Mode::Fenced => {
                    return Err(undo(
                        self.journaling().err().unwrap_or(HookError::ShuttingDown),
                    ))
                }
                mode if Instant::now() >= deadline => {
                    return Err(undo(HookError::ResyncPending {
                        mode,
                        regions: self.dirty.count(),
                        waited: resync_timeout,
                        holdup: j.episodes.holdup(),
                    }))
                }
                _ => tokio::time::sleep(RESYNC_POLL).await,
            }
        }
        // Every change that passed its check before writes were refused holds a range lock
        // until the primary has it and its record is queued; this waits for all of them,
        // and every later one finds writes refused under its lock.
        let held = self.locks.lock(0..self.info.size).await;
        let mode = self.mode();
        if mode != Mode::Logging {
            drop(held);
            return Err(undo(match mode {
                Mode::Fenced => self.journaling().err().unwrap_or(HookError::ShuttingDown),
                mode => HookError::NotLogging { mode },
            }));
        }
        for helper in lock(&j.helpers).drain(..) {
            helper.abort();
        }
        let op = Op::Demote { epoch: j.epoch };
        let Some(permit) = j.pool.try_reserve_meta(record_cost(&op)) else {
            drop(held);
            return Err(undo(HookError::PoolFull));
        };
        let mut timestamp_ns = 0;
        let make = |lsn| {
            timestamp_ns = j.timestamps.next();
            Record {
                lsn,
                timestamp_ns,
                dev: 0,
                op,
            }
        };
        let Some(lsn) = j.intake.append_last(make, permit) else {
            return Err(HookError::ShuttingDown);
        };
        drop(held);
        tracing::info!(
            lsn,
            epoch = j.epoch,
            "demote: DEMOTE queued as the epoch's last record"
        );
        let task = lock(&j.task).take();
        let next_seq = match task {
            Some(task) => task.await.ok(),
            None => None,
        };
        let durable = j.progress.borrow().durable_lsn;
        let (Some(next_seq), true) = (next_seq, durable >= lsn) else {
            return Err(HookError::NotDurable { lsn });
        };
        self.device
            .flush()
            .await
            .map_err(|source| HookError::Read { region: 0, source })?;
        let marker = CleanMarker {
            uuid: j.uuid,
            epoch: j.epoch,
            next_seq,
            next_lsn: lsn + 1,
        };
        restart::write_marker(&j.marker_path, &marker).map_err(|e| HookError::Marker {
            reason: e.to_string(),
        })?;
        // The image is exactly the journal at the DEMOTE: say so where `replay` looks, so
        // that this site can follow the next primary from here (no full replay). A group's
        // set: beside every member (all flushed above), each of the same state.
        let images = if j.member_paths.is_empty() {
            std::slice::from_ref(&j.primary_path)
        } else {
            j.member_paths.as_slice()
        };
        for image in images {
            let stamped =
                SeedStamp::for_image(image, j.uuid, lsn, timestamp_ns, next_seq - 1, j.epoch)
                    .and_then(|stamp| stamp.write(image));
            if let Err(e) = stamped {
                tracing::warn!(error = %e, image = %image.display(), "demoted, but cannot leave the seed stamp beside the primary");
            }
        }
        let done = Demoted {
            epoch: j.epoch,
            lsn,
            seq: next_seq - 1,
        };
        *lock(&self.demoted) = Some(done.clone());
        self.mode.demote(&format!("demoted at LSN {lsn}"));
        tracing::info!(
            lsn,
            seq = done.seq,
            epoch = j.epoch,
            "demoted: the primary is exactly the journal through the DEMOTE"
        );
        Ok(done)
    }
}
