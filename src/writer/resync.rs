//! Resync: brings the journal back to reproducing the primary after changes were left out
//! of it (pool full, store down, a crash, a primary with data the journal never saw).
//!
//! A *dirty episode* starts when the first change cannot be journaled: its regions are
//! marked dirty and a `RESYNC_BEGIN` is queued at that point of the order
//! ([`Episodes::not_journaled`]). Once the journal can take data again (no store outage, the
//! pool at most half full), the resync task walks the dirty regions in passes. For each
//! region it takes the region's range lock (changes to it wait), clears its dirty bit, asks
//! the device whether it holds data, reads it in [`CHUNK`] pieces and queues each as
//! `RESYNC_DATA` (or `WRITE_ZEROES` for a piece of zeroes or a hole) through the same intake
//! and pool as live writes, so it is in order with them. A change to the region after the
//! lock is released is journaled normally, or marks it dirty again for the next pass. When
//! a pass ends with no region dirty, `RESYNC_END` is queued and the mode returns to
//! `logging` ([`Episodes::try_end`]): both under the episode mutex that opening an episode
//! also takes, so an episode cannot end while a change is being left out of it.
//!
//! Pacing: the resync starts a region only while the pool is less than half full (live
//! writes keep the other half), never fills it past 3/4 (waiting at most [`CHUNK_WAIT`] for
//! room, else it retries the region later), and after each region it rests a quarter of the
//! time it held the region's lock. It converges under load whenever the journal's bandwidth
//! exceeds the write rate (and under `--ack adaptive`, which keeps the pool from filling).
//!
//! The activity-log cleaner ([`clean_activity_log`]) also lives here: it retires regions
//! whose records are durable, under their range locks.
//!
//! Must never: end an episode while a region is dirty; hold a region in memory beyond one
//! chunk in flight per queued record (they are charged to the pool); read a region without
//! holding its range lock; clear a dirty bit without journaling the region after it (a
//! failure or cancellation marks it dirty again).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::activity_log::ActivityLog;
use super::dirty::DirtyRegions;
use super::intake::Intake;
use super::journal_writer::Progress;
use super::mode::ModeState;
use super::pool::{Permit, Pool, RECORD_OVERHEAD};
use super::range_lock::RangeLock;
use super::shared::{device_record, record_cost, Shared, WriterStats};
use crate::block::BlockDevice;
use crate::clock::MonotonicTimestamps;
use crate::journal::layout::DeviceLayout;
use crate::journal::Op;

/// Bytes read and journaled as one `RESYNC_DATA` record (less with a pool under 8 MiB:
/// at most 1/8 of it).
pub(super) const CHUNK: u64 = 1 << 20;
/// How long a region's resync waits, holding its range lock, for pool room for its next
/// chunk before it gives up (marks the region dirty again) and retries later.
const CHUNK_WAIT: Duration = Duration::from_secs(1);
/// How often an idle resync task looks for work (it is also woken when an episode opens).
const IDLE_POLL: Duration = Duration::from_millis(250);
/// How long the resync waits before trying again when the journal cannot take data.
const BACKOFF: Duration = Duration::from_millis(50);
/// How often the activity-log cleaner runs (a region leaves the log one to two rounds after
/// its last record is durable).
const CLEAN_EVERY: Duration = Duration::from_millis(500);

/// Opening and ending dirty episodes, and queuing resync records. Shared by the I/O path
/// and the resync task.
pub(super) struct Episodes {
    pub(super) mode: Arc<ModeState>,
    pub(super) dirty: Arc<DirtyRegions>,
    pub(super) pool: Pool,
    pub(super) intake: Arc<Intake>,
    pub(super) timestamps: Arc<MonotonicTimestamps>,
    pub(super) stats: Arc<WriterStats>,
    pub(super) al: Option<Arc<ActivityLog>>,
    /// Where each device of the group lives: records carry device-local offsets.
    pub(super) layout: Arc<DeviceLayout>,
    pub(super) progress: ResyncProgress,
    /// Serializes opening an episode (with its `RESYNC_BEGIN`) against ending one.
    episode: Mutex<()>,
    wake: Notify,
}

impl std::fmt::Debug for Episodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Episodes")
            .field("mode", &self.mode.mode())
            .field("dirty", &self.dirty.count())
            .finish()
    }
}

/// Resync counters for `status`.
#[derive(Debug, Default)]
pub(super) struct ResyncProgress {
    running: AtomicBool,
    passes: AtomicU64,
    /// Regions dirty when the current episode's resync started, plus any marked since.
    regions_total: AtomicU64,
    regions_done: AtomicU64,
    bytes_done: AtomicU64,
    /// Bytes sent as `RESYNC_DATA` (zero pieces and holes excluded).
    bytes_read: AtomicU64,
    started: Mutex<Option<Instant>>,
    /// Regions resynced since the daemon started, over every episode.
    lifetime_regions: AtomicU64,
    episodes_ended: AtomicU64,
}

/// What `status` shows of the resync.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    /// A resync is walking the dirty regions now.
    pub running: bool,
    /// Passes over the dirty regions in the current episode.
    pub passes: u64,
    pub regions_done: u64,
    /// Regions still dirty.
    pub regions_left: u64,
    pub bytes_done: u64,
    /// Bytes read from the primary and journaled as data (holes and zeroes are not read).
    pub bytes_read: u64,
    pub bytes_per_second: f64,
    /// Estimated seconds to the end of the current pass, at the current rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Regions resynced since start, every episode.
    pub lifetime_regions: u64,
    /// Dirty episodes ended by a `RESYNC_END` since start.
    pub episodes_ended: u64,
}

impl Episodes {
    pub(super) fn new(
        Shared { mode, dirty, pool }: Shared,
        intake: Arc<Intake>,
        timestamps: Arc<MonotonicTimestamps>,
        stats: Arc<WriterStats>,
        al: Option<Arc<ActivityLog>>,
        layout: Arc<DeviceLayout>,
    ) -> Self {
        Episodes {
            layout,
            mode,
            dirty,
            pool,
            intake,
            timestamps,
            stats,
            al,
            progress: ResyncProgress::default(),
            episode: Mutex::new(()),
            wake: Notify::new(),
        }
    }

    fn lock_episode(&self) -> std::sync::MutexGuard<'_, ()> {
        crate::sync::lock(&self.episode)
    }

    /// Queues `op` with `permit`; its LSN, or `None` once intake is closed.
    pub(super) fn append(&self, op: Op, permit: Permit) -> Option<u64> {
        let range = op.range();
        let lsn = self.intake.append(
            |lsn| device_record(&self.layout, lsn, self.timestamps.next(), op),
            permit,
            false,
        )?;
        if let (Some(al), Some(range)) = (&self.al, range) {
            al.touch(range, lsn);
        }
        Some(lsn)
    }

    /// A change left out of the journal: its regions are dirty, and the first such change
    /// of an episode queues the `RESYNC_BEGIN` (its pool bytes forced: see
    /// [`Pool::force_reserve`]).
    pub(super) fn not_journaled(&self, range: Option<Range<u64>>, cause: &str) {
        if let Some(range) = range {
            self.dirty.mark(range);
        }
        if self.mode.is_fenced() {
            return;
        }
        let _held = self.lock_episode();
        if !self.mode.open_dirty_episode(cause) {
            return;
        }
        tracing::warn!(
            pool_used = self.pool.used(),
            pool_cap = self.pool.cap(),
            cause,
            "a change could not be journaled; mode forward-part until a resync"
        );
        // A closed intake (shutting down) leaves the episode unmarked in the journal; this
        // stop cannot be clean, and the activity log still names the regions.
        let _ = self.append(Op::ResyncBegin, self.pool.force_reserve(RECORD_OVERHEAD));
        self.wake.notify_one();
    }

    /// Ends the episode if no region is dirty: queues `RESYNC_END` and returns the mode to
    /// `logging` (or to what else holds). False when a region is dirty again.
    fn try_end(&self) -> bool {
        let _held = self.lock_episode();
        if self.dirty.count() > 0 || !self.mode.dirty_episode_open() {
            return false;
        }
        if self
            .append(Op::ResyncEnd, self.pool.force_reserve(RECORD_OVERHEAD))
            .is_none()
        {
            return false;
        }
        self.mode
            .resync_done("resync complete: every dirty region is journaled");
        true
    }

    /// In words, why the current dirty episode has not ended yet: what opened it and what
    /// the resync is waiting for now. For refusals that wait on a resync (`demote`).
    pub(super) fn holdup(&self) -> String {
        let cause = self
            .mode
            .last_cause_of(super::mode::Mode::ForwardPart)
            .unwrap_or_else(|| "unknown".into());
        let waiting = if self.stats.outage.load(Ordering::Acquire) {
            "the journal store has completed no upload for longer than the outage bound, so \
             the resync waits for it"
                .to_string()
        } else if let Some(reason) = self.stats.stopped_reason() {
            format!("journaling stopped ({reason})")
        } else if self.pool.used() * 2 > self.pool.cap() {
            format!(
                "the memory pool holds {} of {} (the journal is behind); the resync starts a \
                 region only below half",
                crate::units::format_size(self.pool.used()),
                crate::units::format_size(self.pool.cap())
            )
        } else {
            let s = self.status();
            format!(
                "the resync is running: {} regions done in {} passes",
                s.regions_done, s.passes
            )
        };
        format!("entered because {cause}; {waiting}")
    }

    /// Wakes the resync task (an episode opened at start).
    pub(super) fn wake(&self) {
        self.wake.notify_one();
    }

    /// The resync's status now.
    pub(super) fn status(&self) -> ResyncStatus {
        let p = &self.progress;
        let done = p.bytes_done.load(Ordering::Acquire);
        let elapsed = crate::sync::lock(&p.started)
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let left = self.dirty.count();
        let running = p.running.load(Ordering::Acquire);
        let eta = (running && rate > 0.0).then(|| (left * self.dirty.region_size()) as f64 / rate);
        ResyncStatus {
            running,
            passes: p.passes.load(Ordering::Acquire),
            regions_done: p.regions_done.load(Ordering::Acquire),
            regions_left: left,
            bytes_done: done,
            bytes_read: p.bytes_read.load(Ordering::Acquire),
            bytes_per_second: rate,
            eta_seconds: eta,
            lifetime_regions: p.lifetime_regions.load(Ordering::Acquire),
            episodes_ended: p.episodes_ended.load(Ordering::Acquire),
        }
    }
}

/// Marks a region dirty again unless its resync completed (a failure, a full pool or a
/// cancellation part-way must not lose it).
struct Redirty<'a> {
    dirty: &'a DirtyRegions,
    range: Range<u64>,
    done: bool,
}

impl Drop for Redirty<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.dirty.mark(self.range.clone());
        }
    }
}

/// What the resync task needs.
pub(super) struct ResyncTask {
    pub episodes: Arc<Episodes>,
    pub device: Arc<dyn BlockDevice>,
    pub locks: Arc<RangeLock>,
    /// Holes need no record: the journal is new and replicas start as zeroes.
    pub skip_holes: bool,
}

/// Why a region's resync stopped short.
enum Short {
    /// The pool or the journal cannot take it now; try again later.
    Busy,
    /// Intake is closed: the daemon stops.
    Closed,
}

impl ResyncTask {
    /// Runs until intake closes (the core aborts it at shutdown).
    pub(super) async fn run(self) {
        let e = &self.episodes;
        loop {
            if e.intake.is_closed() {
                return;
            }
            let work = e.mode.dirty_episode_open()
                && !e.mode.is_fenced()
                && e.stats.stopped_reason().is_none();
            if !work {
                tokio::select! {
                    _ = e.wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
                continue;
            }
            if !self.journal_takes(e.dirty.region_size()) {
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
            self.begin_pass();
            let mut at = 0;
            let mut short = false;
            while let Some(r) = e.dirty.next_dirty(at) {
                match self.region(r).await {
                    Ok(()) => at = r + 1,
                    Err(Short::Closed) => return,
                    Err(Short::Busy) => {
                        short = true;
                        break;
                    }
                }
            }
            if short {
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
            if e.try_end() {
                let s = e.status();
                e.progress.running.store(false, Ordering::Release);
                e.progress.episodes_ended.fetch_add(1, Ordering::AcqRel);
                *crate::sync::lock(&e.progress.started) = None;
                tracing::info!(
                    regions = s.regions_done,
                    bytes = s.bytes_done,
                    passes = s.passes,
                    "resync complete: RESYNC_END queued, mode back to {}",
                    e.mode.mode()
                );
            }
        }
    }

    /// The pool has room for `bytes` of resync below half its cap, and the store is not in
    /// an outage.
    fn journal_takes(&self, bytes: u64) -> bool {
        let e = &self.episodes;
        let bytes = bytes.min(e.pool.cap() / 4);
        !e.stats.outage.load(Ordering::Acquire)
            && e.pool.used() + bytes + 8 * RECORD_OVERHEAD <= e.pool.cap() / 2
    }

    /// Bytes per chunk for this pool.
    fn chunk(&self) -> u64 {
        (self.episodes.pool.cap() / 8).clamp(4096, CHUNK) / 4096 * 4096
    }

    /// Pool bytes for a chunk record of `cost`, keeping a quarter of the pool for live
    /// writes; waits up to [`CHUNK_WAIT`].
    async fn reserve(&self, cost: u64, payload: bool) -> Option<Permit> {
        let pool = &self.episodes.pool;
        let deadline = Instant::now() + CHUNK_WAIT;
        loop {
            if pool.used() + cost <= pool.cap() / 4 * 3 {
                let permit = if payload {
                    pool.try_reserve(cost)
                } else {
                    pool.try_reserve_meta(cost)
                };
                if permit.is_some() {
                    return permit;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn begin_pass(&self) {
        let p = &self.episodes.progress;
        let mut started = crate::sync::lock(&p.started);
        if started.is_none() {
            *started = Some(Instant::now());
            p.passes.store(0, Ordering::Release);
            p.regions_done.store(0, Ordering::Release);
            p.bytes_done.store(0, Ordering::Release);
            p.bytes_read.store(0, Ordering::Release);
            tracing::info!(
                regions = self.episodes.dirty.count(),
                "resync starting: the journal can take data again"
            );
        }
        p.running.store(true, Ordering::Release);
        p.passes.fetch_add(1, Ordering::AcqRel);
        p.regions_total
            .store(self.episodes.dirty.count(), Ordering::Release);
    }

    /// Journals region `r` from the primary, under its range lock.
    async fn region(&self, r: u64) -> Result<(), Short> {
        let e = &self.episodes;
        // A group's last region of a device ends at the device, not in the padding after it.
        let range = e.layout.clip(e.dirty.region_range(r));
        let len = range.end - range.start;
        if !self.journal_takes(len) {
            return Err(Short::Busy);
        }
        let held_since = Instant::now();
        let guard = self.locks.lock(range.clone()).await;
        if !e.dirty.clear(r) {
            return Ok(());
        }
        let mut redirty = Redirty {
            dirty: &e.dirty,
            range: range.clone(),
            done: false,
        };
        let has_data = match self.device.has_data(range.start, len).await {
            Ok(d) => d,
            Err(err) => {
                tracing::warn!(region = r, error = %err, "resync cannot inspect a region; will retry");
                return Err(Short::Busy);
            }
        };
        let mut read = 0;
        if !has_data {
            if self.skip_holes {
                // Nothing to send; the region leaves the activity log like the others.
                if let Some(al) = &e.al {
                    al.touch(range.clone(), e.intake.head_lsn());
                }
            } else {
                let permit = self
                    .reserve(RECORD_OVERHEAD, false)
                    .await
                    .ok_or(Short::Busy)?;
                e.append(
                    Op::WriteZeroes {
                        offset: range.start,
                        len,
                    },
                    permit,
                )
                .ok_or(Short::Closed)?;
            }
        } else {
            let chunk = self.chunk();
            let mut offset = range.start;
            while offset < range.end {
                let n = (range.end - offset).min(chunk);
                let data = match self.device.read(offset, n as u32).await {
                    Ok(d) => d,
                    Err(err) => {
                        tracing::warn!(region = r, offset, error = %err, "resync read failed; will retry");
                        return Err(Short::Busy);
                    }
                };
                let op = if is_zero(&data) {
                    Op::WriteZeroes { offset, len: n }
                } else {
                    read += n;
                    Op::ResyncData { offset, data }
                };
                let permit = self
                    .reserve(record_cost(&op), op.payload_len() > 0)
                    .await
                    .ok_or(Short::Busy)?;
                e.append(op, permit).ok_or(Short::Closed)?;
                offset += n;
            }
        }
        redirty.done = true;
        drop(guard);
        let p = &e.progress;
        p.regions_done.fetch_add(1, Ordering::AcqRel);
        p.lifetime_regions.fetch_add(1, Ordering::AcqRel);
        p.bytes_done.fetch_add(len, Ordering::AcqRel);
        p.bytes_read.fetch_add(read, Ordering::AcqRel);
        // Pacing: the primary's own I/O gets the disk at least 4/5 of the time.
        tokio::time::sleep(held_since.elapsed() / 4).await;
        Ok(())
    }
}

fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to only reinterprets the middle.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Retires activity-log regions whose records are all durable, once a second, until the
/// core aborts it. A region is checked and retired under its range lock, so no change to it
/// is in flight; it must have been quiet (every record durable) since the previous round.
pub(super) async fn clean_activity_log(
    al: Arc<ActivityLog>,
    dirty: Arc<DirtyRegions>,
    locks: Arc<RangeLock>,
    durable: watch::Receiver<Progress>,
) {
    let mut quiet_lsn = 0;
    loop {
        tokio::time::sleep(CLEAN_EVERY).await;
        let now_durable = durable.borrow().durable_lsn;
        let mut retired = 0;
        for r in al.candidates(quiet_lsn) {
            let range = dirty.region_range(r);
            let _guard = locks.lock(range).await;
            if !dirty.is_dirty(r) && al.quiet(r, quiet_lsn) {
                al.retire(r);
                retired += 1;
            }
        }
        if retired > 0 {
            let log = al.clone();
            let _ = tokio::task::spawn_blocking(move || log.flush_retired()).await;
        }
        quiet_lsn = now_durable;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_handles_unaligned_edges() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[1..]));
        v[4098] = 0;
        v[0] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&v[1..]));
    }
}
