//! Journal writer: turns the stream of acknowledged records into segments, uploads up to W
//! of them at once, and publishes the durable LSN.
//!
//! Records arrive on a channel in LSN order (the primary core assigns LSNs and sends under
//! one mutex). The writer task pushes them into a [`SegmentBuilder`], closes the segment at
//! `segment_size` or `linger` after its first record (or at once, when an `--ack journal`
//! writer waits and an upload slot is free: group commit), and uploads each closed segment
//! with a conditional create of its predicted key, at most `W` (the splay width) at a time.
//! Uploads complete in any order; the durable LSN only advances over the gap-free prefix of
//! completed segments, and only then is the pool memory of those records released.
//!
//! Starting ([`prepare`] then [`Prepared::start`]): claim the next writer epoch, plan the
//! restart from the trim pointer ([`head::plan_restart`]), write the first segment (an
//! `EPOCH` record, and `RESYNC_BEGIN` if the replica cannot be trusted) at `plan.next_seq`,
//! then plug every hole, highest seq first.
//!
//! Failures: an upload that fails is retried with the same bytes, with backoff, until it
//! succeeds (the store's own wrapper already retries transient errors; this retries the
//! rest), counting every failure. A segment key already taken by someone else, or a newer
//! epoch, means another writer owns the journal: the writer stops journaling for good (mode
//! `fenced`), marks every record it still held as dirty and releases all waiters.
//!
//! Must never: advance the durable LSN past a segment that is not durable; upload two
//! different objects under one key; block the sender (the channel is unbounded; the pool,
//! not the channel, bounds memory); lose track of a record without marking its range dirty.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::dirty::DirtyRegions;
use super::lag_histogram::LagHistogram;
use super::mode::{FullReason, ModeState};
use super::pool::{Permit, Pool, RECORD_OVERHEAD};
use crate::clock::{Clock, MonotonicTimestamps};
use crate::journal::consumer::{load_trim_pointer, TrimPointer};
use crate::journal::epoch::{self, EpochClaim};
use crate::journal::head::{plan_restart, RestartPlan};
use crate::journal::segment::{encode_plug, SegmentBuilder, SegmentError};
use crate::journal::{JournalError, Manifest, Op, Record};
use crate::store::ObjectStore;

/// How often the writer checks whether a store outage has lasted past the bound.
const OUTAGE_CHECK: Duration = Duration::from_millis(250);
/// Most records taken off the channel in one go before the writer looks at its uploads.
const BATCH: usize = 4096;

/// How the writer cuts and uploads segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Close a segment once its encoded size reaches this.
    pub segment_size: u64,
    /// Close a segment this long after its first record (bounds the RPO).
    pub linger: Duration,
    /// Uploads in flight at most: the manifest's splay width.
    pub max_uploads: usize,
    /// Once uploads have been pending this long without one completing (a dead or hanging
    /// store), `--ack journal` writers stop waiting: the primary is never held hostage by
    /// the store for longer.
    pub outage_bound: Duration,
    /// First pause between retries of a failed upload; doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl WriterConfig {
    /// The defaults for `manifest`: its segment size and splay width, 200 ms linger.
    pub fn for_manifest(manifest: &Manifest) -> Self {
        WriterConfig {
            segment_size: manifest.segment_size,
            linger: Duration::from_millis(200),
            max_uploads: manifest.splay_width as usize,
            outage_bound: Duration::from_secs(30),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// A record on its way to the journal, holding its pool bytes.
#[derive(Debug)]
pub struct Pending {
    pub record: Record,
    pub permit: Permit,
}

/// Durability, as published to the writers that wait for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Every record at or below this LSN is in a durable segment.
    pub durable_lsn: u64,
    /// Waiters for an LSN at or below this stop waiting without durability: the writer was
    /// fenced or stopped (`u64::MAX`), or the store has been failing past the outage bound.
    pub released_lsn: u64,
}

/// Counters the writer keeps for `status`. Everything is updated without locks held across
/// an await.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub segments_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub upload_errors: AtomicU64,
    pub uploads_in_flight: AtomicU64,
    /// Timestamp of the oldest record not yet durable (0 when there is none). Records still
    /// in the channel are not seen; the writer drains it continuously.
    pub oldest_pending_ns: AtomicU64,
    /// Records that were queued but will never be journaled (fenced, writer stopped).
    pub records_abandoned: AtomicU64,
    /// `--ack journal` writers waiting now; while any wait, segments close early.
    pub sync_waiters: AtomicU64,
    /// The store has been failing for longer than the outage bound.
    pub outage: AtomicBool,
    /// Ack→durable lag of every journaled record.
    pub durable_lag: LagHistogram,
    last_error: Mutex<Option<String>>,
    failing_since: Mutex<Option<Instant>>,
    /// Why journaling stopped, if it did.
    stopped: Mutex<Option<String>>,
}

impl WriterStats {
    /// The last upload error message (object key and store message; never credentials).
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// How long uploads have been failing without a success.
    pub fn failing_for(&self) -> Option<Duration> {
        lock(&self.failing_since).map(|t| t.elapsed())
    }

    /// Why journaling stopped, if it did.
    pub fn stopped_reason(&self) -> Option<String> {
        lock(&self.stopped).clone()
    }

    fn count_upload(&self, segment: &Bytes) {
        self.segments_uploaded.fetch_add(1, Ordering::AcqRel);
        self.bytes_uploaded
            .fetch_add(segment.len() as u64, Ordering::AcqRel);
    }

    /// Counts a failed attempt that started at `attempt_started`. The store's own retries
    /// may have hidden the failure for a while; the outage is counted from the start of the
    /// attempt, not from the report.
    fn record_error(&self, message: String, attempt_started: Instant) {
        self.upload_errors.fetch_add(1, Ordering::AcqRel);
        *lock(&self.last_error) = Some(message);
        lock(&self.failing_since).get_or_insert(attempt_started);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a plain assignment; a poisoned lock still holds a value.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every way starting the journal writer fails.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Claiming the epoch, reading the trim pointer or planning the restart failed.
    #[error("cannot start the journal writer on {journal}: {source}")]
    Journal {
        journal: String,
        #[source]
        source: JournalError,
    },
    /// The first segment (the `EPOCH` record) could not be written.
    #[error("cannot write the first segment {key} of writer epoch {epoch} to {journal}: {source}")]
    FirstSegment {
        journal: String,
        key: String,
        epoch: u64,
        #[source]
        source: JournalError,
    },
    /// A plug over an abandoned seq could not be written.
    #[error("cannot plug the abandoned segment {key} in {journal}: {source}")]
    Plug {
        journal: String,
        key: String,
        #[source]
        source: JournalError,
    },
    /// Encoding the first segment failed (a bug: it holds one or two fixed records).
    #[error("cannot encode the first segment of writer epoch {epoch}: {source}")]
    Encode {
        epoch: u64,
        #[source]
        source: SegmentError,
    },
}

/// The journal as a starting writer found it: its claim and where it continues.
#[derive(Debug)]
pub struct Prepared {
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    pub claim: EpochClaim,
    pub trim: TrimPointer,
    pub plan: RestartPlan,
}

impl Prepared {
    /// True when the journal holds no segment yet (a new journal).
    pub fn journal_is_empty(&self) -> bool {
        self.plan.next_seq == self.trim.first_seq && self.plan.next_lsn == self.trim.first_lsn
    }
}

/// Claims the next epoch and plans where to continue. Nothing is written but the claim.
pub async fn prepare(
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    clock: &dyn Clock,
) -> Result<Prepared, StartError> {
    let fail = |source| StartError::Journal {
        journal: store.describe(),
        source,
    };
    let claim = epoch::claim_next(store.as_ref(), clock.now_ns())
        .await
        .map_err(fail)?;
    let trim = load_trim_pointer(store.as_ref()).await.map_err(fail)?;
    let plan = plan_restart(store.as_ref(), &manifest, trim.first_seq, trim.first_lsn)
        .await
        .map_err(fail)?;
    Ok(Prepared {
        store,
        manifest,
        claim,
        trim,
        plan,
    })
}

/// What the I/O path needs from a running writer.
#[derive(Debug)]
pub struct JournalWriter {
    /// Where the core sends records, in LSN order.
    pub sender: mpsc::UnboundedSender<Pending>,
    /// Durability progress.
    pub progress: watch::Receiver<Progress>,
    pub stats: Arc<WriterStats>,
    /// The task; it ends once the sender is dropped and everything queued is durable (or
    /// journaling stopped). Its output is the seq the next writer would write.
    pub task: JoinHandle<u64>,
    pub epoch: u64,
    /// The LSN of the first live record (after the first segment's records).
    pub next_lsn: u64,
    /// Record timestamps, floored at the journal's last one.
    pub timestamps: MonotonicTimestamps,
}

/// Shared state the writer task and the core both touch.
#[derive(Clone, Debug)]
pub struct Shared {
    pub mode: Arc<ModeState>,
    pub dirty: Arc<DirtyRegions>,
    pub pool: Pool,
}

impl Prepared {
    /// Writes the first segment (`EPOCH`, plus `RESYNC_BEGIN` when `resync_begin`), plugs
    /// the holes, and starts the writer task.
    pub async fn start(
        self,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
        shared: Shared,
        resync_begin: bool,
    ) -> Result<JournalWriter, StartError> {
        let Prepared {
            store,
            manifest,
            claim,
            plan,
            ..
        } = self;
        let epoch = claim.epoch;
        let timestamps = MonotonicTimestamps::new(clock.clone(), plan.last_timestamp_ns);
        let mut ops = vec![Op::Epoch { epoch }];
        if resync_begin {
            ops.push(Op::ResyncBegin);
        }
        let mut builder = SegmentBuilder::new(manifest.uuid, epoch, plan.next_seq, plan.next_lsn);
        let mut lsn = plan.next_lsn;
        for op in ops {
            let record = Record {
                lsn,
                timestamp_ns: timestamps.next(),
                dev: 0,
                op,
            };
            builder
                .push(&record)
                .map_err(|source| StartError::Encode { epoch, source })?;
            lsn += 1;
        }
        let stats = Arc::new(WriterStats::default());
        let first_key = manifest.segment_key(plan.next_seq);
        let first = builder.finish();
        create_checked(store.as_ref(), epoch, &first_key, first.clone())
            .await
            .map_err(|source| StartError::FirstSegment {
                journal: store.describe(),
                key: first_key.clone(),
                epoch,
                source,
            })?;
        stats.count_upload(&first);
        for &hole in plan.holes.iter().rev() {
            let key = manifest.segment_key(hole);
            let plug = encode_plug(manifest.uuid, epoch, hole, plan.next_lsn, plan.next_seq);
            create_checked(store.as_ref(), epoch, &key, plug.clone())
                .await
                .map_err(|source| StartError::Plug {
                    journal: store.describe(),
                    key: key.clone(),
                    source,
                })?;
            stats.count_upload(&plug);
        }
        tracing::info!(
            journal = %store.describe(),
            epoch,
            seq = plan.next_seq,
            lsn = plan.next_lsn,
            plugs = plan.holes.len(),
            "journal writer started"
        );

        let (sender, rx) = mpsc::unbounded_channel();
        let (progress_tx, progress) = watch::channel(Progress {
            durable_lsn: lsn - 1,
            released_lsn: 0,
        });
        let task = Task {
            clock,
            store,
            manifest: Arc::new(manifest),
            epoch,
            config,
            rx,
            progress: progress_tx,
            stats: stats.clone(),
            shared,
            open: None,
            next_seq: plan.next_seq + 1,
            next_lsn: lsn,
            ready: VecDeque::new(),
            uploads: JoinSet::new(),
            pending: BTreeMap::new(),
            stopped: false,
            stalled_since: None,
        };
        Ok(JournalWriter {
            sender,
            progress,
            stats,
            task: tokio::spawn(task.run()),
            epoch,
            next_lsn: lsn,
            timestamps,
        })
    }
}

/// One conditional create after a fence check, as the first segment and plugs need.
async fn create_checked(
    store: &dyn ObjectStore,
    epoch: u64,
    key: &str,
    data: Bytes,
) -> Result<(), JournalError> {
    epoch::ensure_not_fenced(store, epoch).await?;
    store.put_if_absent(key, data).await?;
    Ok(())
}

/// The segment being filled.
struct Open {
    seq: u64,
    builder: SegmentBuilder,
    permit: Permit,
    first_ts: u64,
    /// Acknowledgement timestamps of the records, for the ack→durable lag.
    timestamps: Vec<u64>,
    deadline: Instant,
    ranges: Vec<Range<u64>>,
}

/// A closed segment not yet durable (uploading, waiting for a slot, or uploaded but behind
/// an earlier one that is not).
struct Unsettled {
    last_lsn: u64,
    first_ts: u64,
    timestamps: Vec<u64>,
    /// Held, never read: dropping it when the segment joins the durable prefix releases
    /// the pool bytes.
    _permit: Permit,
    /// What to mark dirty if the segment never becomes durable.
    ranges: Vec<Range<u64>>,
    uploaded: bool,
}

/// Why an upload gave up (every other failure is retried).
#[derive(Debug)]
enum Refused {
    /// A newer epoch exists.
    Fenced { newer: u64 },
    /// The key holds another object: another writer wrote this seq.
    Taken { key: String },
}

struct Task {
    clock: Arc<dyn Clock>,
    store: Arc<dyn ObjectStore>,
    manifest: Arc<Manifest>,
    epoch: u64,
    config: WriterConfig,
    rx: mpsc::UnboundedReceiver<Pending>,
    progress: watch::Sender<Progress>,
    stats: Arc<WriterStats>,
    shared: Shared,
    open: Option<Open>,
    next_seq: u64,
    next_lsn: u64,
    /// Closed segments waiting for an upload slot, in seq order.
    ready: VecDeque<(u64, Bytes)>,
    uploads: JoinSet<(u64, Result<(), Refused>)>,
    /// Closed, not yet durable, by seq.
    pending: BTreeMap<u64, Unsettled>,
    /// Journaling stopped for good (fenced or failed).
    stopped: bool,
    /// Since when uploads have been pending without one completing (`None` when idle). A
    /// store that hangs, or whose failures the retrying wrapper is still hiding, shows here
    /// before any error is reported.
    stalled_since: Option<Instant>,
}

impl Task {
    async fn run(mut self) -> u64 {
        let mut intake_open = true;
        let mut outage_check = tokio::time::interval(OUTAGE_CHECK);
        outage_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_uploads();
            if !intake_open
                && self.open.is_none()
                && self.ready.is_empty()
                && self.uploads.is_empty()
            {
                break;
            }
            let deadline = self.open.as_ref().map(|o| o.deadline);
            tokio::select! {
                biased;
                Some(joined) = self.uploads.join_next(), if !self.uploads.is_empty() => {
                    match joined {
                        Ok((seq, Ok(()))) => self.uploaded(seq),
                        Ok((_, Err(Refused::Fenced { newer }))) => self.stop(
                            format!("writer epoch {} was fenced by epoch {newer}", self.epoch),
                            true,
                        ),
                        Ok((_, Err(Refused::Taken { key }))) => self.stop(
                            format!("segment {key} was written by another writer"),
                            true,
                        ),
                        Err(e) => self.stop(format!("an upload task failed: {e}"), false),
                    }
                }
                received = self.rx.recv(), if intake_open => match received {
                    Some(first) => {
                        self.accept(first);
                        for _ in 0..BATCH {
                            match self.rx.try_recv() {
                                Ok(more) => self.accept(more),
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        intake_open = false;
                        self.close_open();
                    }
                },
                () = sleep_until(deadline) => self.close_open(),
                _ = outage_check.tick() => self.check_outage(),
            }
            // Group commit: a journal-mode writer is waiting and a slot is free, so lingering
            // would only add latency.
            if self.stats.sync_waiters.load(Ordering::Acquire) > 0
                && self.ready.is_empty()
                && self.uploads.len() < self.config.max_uploads
            {
                self.close_open();
            }
            self.publish_oldest();
        }
        self.next_seq
    }

    fn accept(&mut self, pending: Pending) {
        let Pending { record, permit } = pending;
        if self.stopped {
            if let Some(range) = record.op.range() {
                self.shared.dirty.mark(range);
            }
            self.stats.records_abandoned.fetch_add(1, Ordering::AcqRel);
            return;
        }
        if self.open.is_none() {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.open = Some(Open {
                seq,
                builder: SegmentBuilder::new(self.manifest.uuid, self.epoch, seq, self.next_lsn),
                permit: self.shared.pool.empty_permit(),
                first_ts: record.timestamp_ns,
                timestamps: Vec::new(),
                deadline: Instant::now() + self.config.linger,
                ranges: Vec::new(),
            });
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        match open.builder.push(&record) {
            Ok(()) => {
                open.permit.merge(permit);
                open.timestamps.push(record.timestamp_ns);
                if let Some(range) = record.op.range() {
                    open.ranges.push(range);
                }
                let full = open.builder.encoded_len() as u64 >= self.config.segment_size;
                self.next_lsn += 1;
                if full {
                    self.close_open();
                }
            }
            Err(e) => {
                if let Some(range) = record.op.range() {
                    self.shared.dirty.mark(range);
                }
                self.stop(
                    format!("record {} cannot be journaled: {e}", record.lsn),
                    false,
                );
            }
        }
    }

    fn close_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if open.builder.is_empty() {
            // Only a failed first push leaves an empty builder; its seq was never used, so
            // the next segment may take it.
            self.next_seq = open.seq;
            return;
        }
        let last_lsn = open.builder.next_lsn() - 1;
        let bytes = open.builder.finish();
        self.pending.insert(
            open.seq,
            Unsettled {
                last_lsn,
                first_ts: open.first_ts,
                timestamps: open.timestamps,
                _permit: open.permit,
                ranges: open.ranges,
                uploaded: false,
            },
        );
        self.ready.push_back((open.seq, bytes));
    }

    fn start_uploads(&mut self) {
        while !self.stopped && self.uploads.len() < self.config.max_uploads {
            let Some((seq, bytes)) = self.ready.pop_front() else {
                break;
            };
            let upload = Upload {
                store: self.store.clone(),
                key: self.manifest.segment_key(seq),
                epoch: self.epoch,
                stats: self.stats.clone(),
                retry_base: self.config.retry_base,
                retry_max: self.config.retry_max,
            };
            self.uploads
                .spawn(async move { (seq, upload.run(bytes).await) });
            self.stalled_since.get_or_insert_with(Instant::now);
        }
        self.stats
            .uploads_in_flight
            .store(self.uploads.len() as u64, Ordering::Release);
    }

    /// Segment `seq` is in the store; the durable prefix may grow.
    fn uploaded(&mut self, seq: u64) {
        *lock(&self.stats.failing_since) = None;
        self.stalled_since = (!self.uploads.is_empty()).then(Instant::now);
        if self.stats.outage.swap(false, Ordering::AcqRel) {
            tracing::info!(journal = %self.store.describe(), "the journal store answers again");
            if !self.stopped {
                self.progress.send_modify(|p| p.released_lsn = 0);
            }
        }
        if let Some(u) = self.pending.get_mut(&seq) {
            u.uploaded = true;
        }
        let mut durable = None;
        let now = self.clock.now_ns();
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().uploaded {
                break;
            }
            // Dropping the entry releases its pool bytes.
            let settled = entry.remove();
            for ts in &settled.timestamps {
                self.stats.durable_lag.record(now.saturating_sub(*ts));
            }
            durable = Some(settled.last_lsn);
        }
        if let Some(lsn) = durable {
            self.progress.send_modify(|p| p.durable_lsn = lsn);
        }
    }

    fn check_outage(&mut self) {
        let stalled = self.stalled_since.map(|t| t.elapsed());
        let Some(failing) = self.stats.failing_for().max(stalled) else {
            return;
        };
        if failing >= self.config.outage_bound && !self.stats.outage.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                journal = %self.store.describe(),
                seconds = failing.as_secs(),
                "the journal store has completed no upload for longer than the outage bound; \
                 acknowledgements no longer wait for it"
            );
            self.progress.send_modify(|p| p.released_lsn = u64::MAX);
        }
    }

    /// Stops journaling for good: everything not durable is marked dirty, all waiters are
    /// released, and the mode says why.
    fn stop(&mut self, reason: String, fenced: bool) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if fenced {
            self.shared.mode.fence();
        } else {
            self.shared.mode.need_full(FullReason::WriterFailed);
        }
        tracing::error!(journal = %self.store.describe(), %reason, "journaling stopped");
        *lock(&self.stats.stopped) = Some(reason);
        let mut abandoned = 0;
        if let Some(open) = self.open.take() {
            abandoned += open.builder.len() as u64;
            for r in open.ranges {
                self.shared.dirty.mark(r);
            }
        }
        for (_, u) in std::mem::take(&mut self.pending) {
            for r in u.ranges {
                self.shared.dirty.mark(r);
            }
        }
        self.ready.clear();
        self.uploads.abort_all();
        self.stats
            .records_abandoned
            .fetch_add(abandoned, Ordering::AcqRel);
        self.progress.send_modify(|p| p.released_lsn = u64::MAX);
    }

    fn publish_oldest(&self) {
        let oldest = self
            .pending
            .first_key_value()
            .map(|(_, u)| u.first_ts)
            .or_else(|| self.open.as_ref().map(|o| o.first_ts))
            .unwrap_or(0);
        self.stats
            .oldest_pending_ns
            .store(oldest, Ordering::Release);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One segment's upload, retried until it succeeds or is refused for good.
struct Upload {
    store: Arc<dyn ObjectStore>,
    key: String,
    epoch: u64,
    stats: Arc<WriterStats>,
    retry_base: Duration,
    retry_max: Duration,
}

impl Upload {
    async fn run(self, bytes: Bytes) -> Result<(), Refused> {
        let mut delay = self.retry_base;
        // A failed create may still have created the object (a lost response); then a retry
        // meets our own object and must recognise it by its bytes.
        let mut maybe_created = false;
        loop {
            let attempt_started = Instant::now();
            let failure = match epoch::ensure_not_fenced(self.store.as_ref(), self.epoch).await {
                Err(JournalError::Fenced { newer, .. }) => return Err(Refused::Fenced { newer }),
                Err(e) => format!("fence check before {}: {e}", self.key),
                Ok(()) => match self.store.put_if_absent(&self.key, bytes.clone()).await {
                    Ok(()) => return self.done(&bytes),
                    Err(e) if e.is_already_exists() => {
                        if !maybe_created {
                            return Err(Refused::Taken { key: self.key });
                        }
                        match self.store.get(&self.key).await {
                            Ok(existing) if existing == bytes => return self.done(&bytes),
                            Ok(_) => return Err(Refused::Taken { key: self.key }),
                            Err(e) => format!("reading back {}: {e}", self.key),
                        }
                    }
                    Err(e) => {
                        maybe_created = true;
                        e.to_string()
                    }
                },
            };
            tracing::warn!(key = %self.key, error = %failure, "segment upload failed; retrying");
            self.stats.record_error(failure, attempt_started);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.retry_max);
        }
    }

    fn done(&self, bytes: &Bytes) -> Result<(), Refused> {
        self.stats.count_upload(bytes);
        Ok(())
    }
}

/// Pool bytes one record is charged.
pub fn record_cost(op: &Op) -> u64 {
    op.payload_len() as u64 + RECORD_OVERHEAD
}

#[cfg(test)]
mod tests;
