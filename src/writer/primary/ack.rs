//! The ack path: a change under its range lock is applied to the primary, then journaled
//! (pool permit, LSN and timestamp under the intake's mutex) or marked dirty when it cannot
//! be, and acknowledged at once or once durable as the `--ack` mode says.
//!
//! Must never: reply to a change before the primary has it; let the journal's order differ
//! from the primary's for overlapping changes; wait for pool memory or for the store in async
//! mode.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Journaling, PrimaryCore, Refuse};
use crate::block::BlockError;
use crate::journal::Op;
use crate::writer::mode::{AckMode, MaxLag};
use crate::writer::shared::{device_record, record_cost, WriterStats};

/// A journal-mode acknowledgement in waiting; keeps the writer's group commit informed.
pub(super) struct Ticket {
    lsn: u64,
    stats: Arc<WriterStats>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.stats.sync_waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PrimaryCore {
    /// Waits until every record up to `lsn` is durable, or the writer gave up on them.
    /// Returns whether they are durable.
    pub async fn wait_durable(&self, lsn: u64) -> bool {
        let Some(j) = &self.journal else {
            return false;
        };
        let mut rx = j.progress.clone();
        let _ = rx
            .wait_for(|p| p.durable_lsn >= lsn || p.released_lsn >= lsn)
            .await;
        let durable = rx.borrow().durable_lsn >= lsn;
        durable
    }

    /// Applies a change's outcome to the journal: journals `op` (when the primary has it),
    /// or marks its range dirty. Returns a ticket when the client must wait for durability.
    pub(super) fn journal(&self, op: Op, applied: &Result<(), BlockError>) -> Option<Ticket> {
        let j = self.journal.as_ref()?;
        let range = op.range().filter(|r| r.start < r.end);
        match applied {
            Ok(()) => {}
            // Refused before touching anything: nothing changed.
            Err(
                BlockError::OutOfRange { .. } | BlockError::ReadOnly | BlockError::NotSupported(_),
            ) => return None,
            // The primary may hold part of the change; only a resync can tell.
            Err(BlockError::Io(_)) => {
                j.episodes
                    .not_journaled(range, "a change failed part-way on the primary");
                return None;
            }
        }
        if matches!(
            op,
            Op::Write { .. } | Op::Discard { .. } | Op::WriteZeroes { .. }
        ) && range.is_none()
        {
            // An empty change changes nothing.
            return None;
        }
        if self.mode.is_fenced() {
            self.dirty_only(range);
            return None;
        }
        let cost = record_cost(&op);
        let permit = if op.payload_len() > 0 {
            j.pool.try_reserve(cost)
        } else {
            j.pool.try_reserve_meta(cost)
        };
        let Some(permit) = permit else {
            j.episodes.not_journaled(
                range,
                "the memory pool is full (the journal store is slow or down)",
            );
            return None;
        };
        let wait = self.wants_durable(j);
        // Counted before the record is queued, so the encoder sees the waiter with it.
        let ticket = wait.then(|| {
            j.stats.sync_waiters.fetch_add(1, Ordering::AcqRel);
            Ticket {
                lsn: 0,
                stats: j.stats.clone(),
            }
        });
        let make = |lsn| device_record(&self.layout, lsn, j.timestamps.next(), op);
        match j.intake.append(make, permit, wait) {
            Some(lsn) => {
                if let Some(range) = range {
                    j.al.touch(range, lsn);
                }
                ticket.map(|mut t| {
                    t.lsn = lsn;
                    t
                })
            }
            None => {
                // Intake closed (shutting down): applied, not journaled.
                self.dirty_only(range);
                None
            }
        }
    }

    fn dirty_only(&self, range: Option<Range<u64>>) {
        if let Some(range) = range {
            self.dirty.mark(range);
        }
    }

    /// Whether a write now must wait for durability (`--ack journal`, or `adaptive` over its
    /// bound). Never while the store is in an outage.
    fn wants_durable(&self, j: &Journaling) -> bool {
        if j.stats.outage.load(Ordering::Acquire) {
            return false;
        }
        match j.ack {
            AckMode::Async => false,
            AckMode::Journal => true,
            AckMode::Adaptive(bound) => {
                let (over, under) = match bound {
                    MaxLag::Bytes(b) => {
                        let used = j.pool.used();
                        (used > b, used <= b / 2)
                    }
                    MaxLag::Time(d) => {
                        let lag = self.lag_time(j);
                        (lag > d, lag <= d / 2)
                    }
                };
                let waits = j.adaptive_waits.load(Ordering::Acquire);
                if waits && under {
                    j.adaptive_waits.store(false, Ordering::Release);
                    false
                } else if !waits && over {
                    j.adaptive_waits.store(true, Ordering::Release);
                    true
                } else {
                    waits
                }
            }
        }
    }

    pub(in crate::writer) fn lag_time(&self, j: &Journaling) -> Duration {
        match j.stats.oldest_pending_ns() {
            0 => Duration::ZERO,
            oldest => Duration::from_nanos(j.clock.now_ns().saturating_sub(oldest)),
        }
    }

    pub(super) async fn acknowledge(&self, ticket: Option<Ticket>) {
        if let Some(ticket) = ticket {
            self.wait_durable(ticket.lsn).await;
        }
    }

    /// A change under the range lock: apply with `apply`, then journal `op`.
    pub(super) async fn change<F>(
        &self,
        range: Range<u64>,
        op: Op,
        apply: F,
    ) -> Result<(), BlockError>
    where
        F: std::future::Future<Output = Result<(), BlockError>>,
    {
        let ticket = {
            let _held = self.locks.lock(range.clone()).await;
            // Checked under the lock, so a demote that holds the whole device's lock sees
            // every change either finished or refused.
            if self.refusing() != Refuse::Nothing {
                return Err(BlockError::ReadOnly);
            }
            if let Some(j) = &self.journal {
                // The region is durably active before the primary can hold the change.
                j.al.activate(range).await;
            }
            let applied = apply.await;
            let ticket = self.journal(op, &applied);
            applied?;
            ticket
        };
        self.acknowledge(ticket).await;
        Ok(())
    }
}
