//! The primary core: the frontend-independent heart of `tinylag serve`. It owns the primary
//! disk (any [`BlockDevice`], normally a `FileDevice`) and implements [`BlockDevice`] itself,
//! so the NBD server today and the ublk frontend later serve it without knowing about
//! journals.
//!
//! A change (write, trim, write-zeroes) runs as:
//! 1. take the range lock for its bytes (overlapping changes queue in arrival order);
//! 2. apply it to the primary;
//! 3. reserve pool bytes; then under the intake's one small mutex assign the next LSN and
//!    the acknowledgement timestamp and queue the record, so queue order is LSN order;
//! 4. release the range lock and reply, at once (`--ack async`) or once the record is
//!    durable (`--ack journal`, or `adaptive` while the lag is over its bound).
//!
//! Before step 2, a change to a region not yet active in the activity log marks it there
//! and fsyncs the log ([`ActivityLog::activate`]); a change to an active region costs
//! nothing more.
//!
//! The request's payload buffer becomes the record's payload: it is shared, not copied. A
//! change that cannot be journaled (pool full, writer fenced or stopped) still completes;
//! its regions are marked dirty and, once per dirty episode, a `RESYNC_BEGIN` is queued at
//! that point of the order; the resync task ([`super::resync`]) journals the dirty regions
//! once the journal can take data again. A FLUSH is applied, then journaled as a `FLUSH`
//! record.
//!
//! Starting: the clean-stop marker, the journal's end and the activity log decide the first
//! mode (see [`restart`]): `logging`, `forward-part` with the regions the previous writer's
//! activity log names (after a crash), or `forward-full` (every region; only allocated,
//! non-zero data is read).
//!
//! Must never: reply to a change before the primary has it; let the journal's order differ
//! from the primary's for overlapping changes; wait for pool memory or for the store in
//! async mode; speak a frontend protocol.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::activity_log::{self, ActivityLog, ActivityLogError, Previous};
use super::dirty::DirtyRegions;
use super::intake::Intake;
use super::journal_writer::{self, JournalWriter, Progress, StartError, WriterConfig};
use super::mode::{AckMode, FullReason, MaxLag, Mode, ModeState};
use super::pool::{Pool, PoolError};
use super::range_lock::RangeLock;
use super::restart::{self, CleanMarker, RestartError};
use super::resync::{self, Episodes, ResyncTask};
use super::shared::{record_cost, Shared, WriterStats};
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo};
use crate::clock::{Clock, MonotonicTimestamps};
use crate::journal::epoch::ClaimBasis;
use crate::journal::{Manifest, Op, Record};
use crate::store::ObjectStore;

/// Region size of the dirty tracker when there is no manifest to say (`--no-journal`).
const DEFAULT_REGION_SIZE: u64 = 4 << 20;

/// Names shown by `status`.
#[derive(Clone, Debug, Default)]
pub struct Labels {
    /// The primary's path.
    pub primary: String,
    /// The NBD address clients connect to.
    pub listen: String,
    /// The export name ("" = the default export).
    pub export: String,
}

/// What journaling needs; `None` in [`PrimaryCore::start`] serves without a journal.
#[derive(Clone, Debug)]
pub struct JournalSetup {
    pub store: Arc<dyn ObjectStore>,
    pub manifest: Manifest,
    pub writer: WriterConfig,
    pub pool_size: u64,
    pub ack: AckMode,
    pub clock: Arc<dyn Clock>,
    /// The primary's path: for the clean-stop marker beside it and the "does a new
    /// journal's primary hold data" check.
    pub primary_path: PathBuf,
    /// Where the activity log lives (`--activity-log`, default
    /// [`activity_log::default_path`]); `None` keeps none (`--no-activity-log`: a restart
    /// after a crash is then `forward-full`).
    pub activity_log: Option<PathBuf>,
    /// `--abandon-after-hole`: start even though a segment is missing below the journal's
    /// known end, abandoning everything after it and resyncing the whole device (see
    /// [`journal_writer::prepare`]).
    pub abandon_after_hole: bool,
    /// Why this writer claims its epoch, and who it is (`serve --takeover`, `promote`).
    pub claim: ClaimBasis,
}

/// Every way starting the core fails.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The primary's size is not the size the journal replicates.
    #[error(
        "the primary {primary} has {size} bytes but journal {journal} replicates a device of \
         {expected} bytes; use the primary the journal was made for (or `tinylag init` a new \
         journal)"
    )]
    SizeMismatch {
        primary: String,
        size: u64,
        journal: String,
        expected: u64,
    },
    /// The primary's block size is not the journal's.
    #[error(
        "the primary {primary} is opened with block size {block_size} but journal {journal} \
         uses {expected}"
    )]
    BlockSizeMismatch {
        primary: String,
        block_size: u32,
        journal: String,
        expected: u32,
    },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Writer(#[from] StartError),
    #[error(transparent)]
    Restart(#[from] RestartError),
    #[error(transparent)]
    ActivityLog(#[from] ActivityLogError),
}

/// What [`PrimaryCore::shutdown`] managed.
#[derive(Clone, Debug, Serialize)]
pub struct ShutdownReport {
    pub mode: Mode,
    pub head_lsn: u64,
    pub durable_lsn: u64,
    /// Records acknowledged but not durable when the drain ended.
    pub undrained_records: u64,
    /// The writer finished within the drain timeout.
    pub drained: bool,
    /// The primary's final fsync failed with this.
    pub flush_error: Option<String>,
    /// A clean-stop marker was written (the next start may begin in `logging`).
    pub clean: bool,
}

/// See the module documentation.
pub struct PrimaryCore {
    pub(super) device: Arc<dyn BlockDevice>,
    pub(super) info: DeviceInfo,
    pub(super) locks: Arc<RangeLock>,
    pub(super) mode: Arc<ModeState>,
    pub(super) dirty: Arc<DirtyRegions>,
    pub(super) journal: Option<Journaling>,
    pub(super) labels: Labels,
    pub(super) started: std::time::Instant,
    /// Requests served, for `status` and `/metrics`.
    pub(super) io: super::io_counts::IoCounts,
}

impl std::fmt::Debug for PrimaryCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryCore")
            .field("info", &self.info)
            .field("mode", &self.mode.mode())
            .field("labels", &self.labels)
            .finish()
    }
}

pub(super) struct Journaling {
    pub(super) store_name: String,
    pub(super) uuid: Uuid,
    pub(super) epoch: u64,
    pub(super) pool: Pool,
    pub(super) ack: AckMode,
    /// `adaptive` currently waits for durability.
    pub(super) adaptive_waits: AtomicBool,
    pub(super) intake: Arc<Intake>,
    pub(super) timestamps: Arc<MonotonicTimestamps>,
    pub(super) progress: watch::Receiver<Progress>,
    pub(super) stats: Arc<WriterStats>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) task: Mutex<Option<JoinHandle<u64>>>,
    pub(super) marker_path: PathBuf,
    pub(super) episodes: Arc<Episodes>,
    pub(super) al: Arc<ActivityLog>,
    /// The resync task and the activity-log cleaner; aborted at shutdown.
    pub(super) helpers: Mutex<Vec<JoinHandle<()>>>,
    /// How the daemon started, for `status`.
    pub(super) start: StartKind,
}

/// How a journaling core started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum StartKind {
    /// A clean stop or a new empty journal: nothing to resync.
    Clean,
    /// After an unclean stop, the previous writer's activity log named these regions.
    ActivityLog { regions: u64 },
    /// Every region: why.
    Full { reason: String },
}

/// A journal-mode acknowledgement in waiting; keeps the writer's group commit informed.
struct Ticket {
    lsn: u64,
    stats: Arc<WriterStats>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.stats.sync_waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Critical sections only assign plain values or send on an unbounded channel; a poisoned
    // lock still guards consistent state.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PrimaryCore {
    /// Starts the core over `device`: with a journal, claims the writer epoch, decides the
    /// initial mode (see [`restart`]), writes the first segment and starts the writer.
    pub async fn start(
        device: Arc<dyn BlockDevice>,
        labels: Labels,
        journal: Option<JournalSetup>,
    ) -> Result<PrimaryCore, CoreError> {
        let info = device.info();
        let Some(setup) = journal else {
            return Ok(PrimaryCore {
                device,
                info,
                locks: Arc::new(RangeLock::new()),
                mode: Arc::new(ModeState::without_journal()),
                dirty: Arc::new(DirtyRegions::new(info.size, DEFAULT_REGION_SIZE)),
                journal: None,
                labels,
                started: std::time::Instant::now(),
                io: Default::default(),
            });
        };
        let manifest = setup.manifest;
        let store_name = setup.store.describe();
        let expected = manifest.device_size(0).unwrap_or(0);
        if info.size != expected {
            return Err(CoreError::SizeMismatch {
                primary: labels.primary.clone(),
                size: info.size,
                journal: store_name,
                expected,
            });
        }
        if info.block_size != manifest.block_size {
            return Err(CoreError::BlockSizeMismatch {
                primary: labels.primary.clone(),
                block_size: info.block_size,
                journal: store_name,
                expected: manifest.block_size,
            });
        }
        let pool = Pool::new(setup.pool_size)?;
        let mode = Arc::new(ModeState::new());
        let dirty = Arc::new(DirtyRegions::new(info.size, manifest.region_size));
        let uuid = manifest.uuid;

        let region_size = manifest.region_size;
        let prepared = journal_writer::prepare_as(
            setup.store.clone(),
            manifest,
            setup.clock.as_ref(),
            setup.abandon_after_hole,
            setup.claim.clone(),
        )
        .await?;
        let epoch = prepared.claim.epoch;
        let marker_path = restart::marker_path(&setup.primary_path);
        let marker = restart::take_marker(&marker_path)?;
        let full = restart::initial_full_reason(&prepared, uuid, marker.as_ref(), || {
            restart::primary_has_data(&setup.primary_path)
        })?;
        let previous =
            match (full, &setup.activity_log) {
                (Some(FullReason::UncleanRestart), Some(path)) => Some(
                    activity_log::read_previous(path, uuid, epoch, region_size, dirty.total())?,
                ),
                (Some(FullReason::UncleanRestart), None) => Some(Previous::Unusable(
                    "no activity log is kept (--no-activity-log)".into(),
                )),
                _ => None,
            };
        let all = vec![u64::MAX; dirty.total().div_ceil(64) as usize];
        let (start, initial) = match (full, previous) {
            (None, _) => (StartKind::Clean, Vec::new()),
            (Some(FullReason::UncleanRestart), Some(prev @ Previous::Usable { .. })) => {
                let regions = prev.count();
                let Previous::Usable { bits } = prev else {
                    unreachable!("matched as usable")
                };
                (StartKind::ActivityLog { regions }, bits)
            }
            (Some(FullReason::UncleanRestart), Some(Previous::Unusable(why))) => {
                tracing::warn!(
                    "{why}: the previous writer stopped uncleanly, so the WHOLE device will be \
                     resynced (forward-full)"
                );
                let reason = format!("{}: {why}", FullReason::NoActivityLog.describe());
                mode.need_full(FullReason::NoActivityLog);
                (StartKind::Full { reason }, all)
            }
            (Some(reason), _) => {
                mode.need_full(reason);
                (
                    StartKind::Full {
                        reason: reason.describe().to_string(),
                    },
                    all,
                )
            }
        };
        let al = match &setup.activity_log {
            Some(path) => ActivityLog::create(path, uuid, epoch, info.size, region_size, &initial)?,
            None => ActivityLog::disabled(info.size, region_size),
        };
        let skip_holes = full == Some(FullReason::PrimaryHasData);
        match &start {
            StartKind::Clean => {}
            StartKind::ActivityLog { regions } => {
                let cause = format!(
                    "restart after an unclean stop: resyncing the {regions} regions the \
                     activity log names"
                );
                tracing::warn!("{cause}");
                mode.open_dirty_episode(&cause);
            }
            StartKind::Full { reason } => {
                tracing::warn!(reason, "starting in forward-full: every region is resynced");
                mode.open_dirty_episode(reason);
            }
        }
        for (w, word) in initial.iter().enumerate() {
            let mut word = *word;
            while word != 0 {
                let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                dirty.mark(dirty.region_range(r));
            }
        }
        let writer = prepared
            .start(
                setup.clock.clone(),
                setup.writer,
                Shared {
                    mode: mode.clone(),
                    dirty: dirty.clone(),
                    pool: pool.clone(),
                },
                start != StartKind::Clean,
            )
            .await?;
        let JournalWriter {
            intake,
            progress,
            stats,
            task,
            epoch,
            timestamps,
        } = writer;
        let timestamps = Arc::new(timestamps);
        let locks = Arc::new(RangeLock::new());
        let episodes = Arc::new(Episodes::new(
            mode.clone(),
            dirty.clone(),
            pool.clone(),
            intake.clone(),
            timestamps.clone(),
            stats.clone(),
            Some(al.clone()),
        ));
        let helpers = vec![
            tokio::spawn(
                ResyncTask {
                    episodes: episodes.clone(),
                    device: device.clone(),
                    locks: locks.clone(),
                    skip_holes,
                }
                .run(),
            ),
            tokio::spawn(resync::clean_activity_log(
                al.clone(),
                dirty.clone(),
                locks.clone(),
                progress.clone(),
            )),
        ];
        episodes.wake();
        Ok(PrimaryCore {
            device,
            info,
            locks,
            mode,
            dirty,
            journal: Some(Journaling {
                store_name,
                uuid,
                epoch,
                pool,
                ack: setup.ack,
                adaptive_waits: AtomicBool::new(false),
                intake,
                timestamps,
                progress,
                stats,
                clock: setup.clock,
                task: Mutex::new(Some(task)),
                marker_path,
                episodes,
                al,
                helpers: Mutex::new(helpers),
                start,
            }),
            labels,
            started: std::time::Instant::now(),
            io: Default::default(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode.mode()
    }

    pub fn dirty(&self) -> &DirtyRegions {
        &self.dirty
    }

    /// The writer epoch, with a journal.
    pub fn epoch(&self) -> Option<u64> {
        self.journal.as_ref().map(|j| j.epoch)
    }

    /// The last LSN assigned (0 without a journal).
    pub fn head_lsn(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.intake.head_lsn())
    }

    /// The last LSN known durable (0 without a journal).
    pub fn durable_lsn(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.progress.borrow().durable_lsn)
    }

    /// Every journal seq below this one is durable (0 without a journal): what the writer's
    /// lease records so readers can tell a missing segment below it for a hole.
    pub fn durable_next_seq(&self) -> u64 {
        self.journal
            .as_ref()
            .map_or(0, |j| j.progress.borrow().durable_next_seq)
    }

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
    fn journal(&self, op: Op, applied: &Result<(), BlockError>) -> Option<Ticket> {
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
        let make = |lsn| Record {
            lsn,
            timestamp_ns: j.timestamps.next(),
            dev: 0,
            op,
        };
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

    pub(super) fn lag_time(&self, j: &Journaling) -> Duration {
        match j.stats.oldest_pending_ns() {
            0 => Duration::ZERO,
            oldest => Duration::from_nanos(j.clock.now_ns().saturating_sub(oldest)),
        }
    }

    async fn acknowledge(&self, ticket: Option<Ticket>) {
        if let Some(ticket) = ticket {
            self.wait_durable(ticket.lsn).await;
        }
    }

    /// A change under the range lock: apply with `apply`, then journal `op`.
    async fn change<F>(&self, range: Range<u64>, op: Op, apply: F) -> Result<(), BlockError>
    where
        F: std::future::Future<Output = Result<(), BlockError>>,
    {
        let ticket = {
            let _held = self.locks.lock(range.clone()).await;
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

    /// Stops intake, lets the writer drain for at most `drain_timeout`, fsyncs the primary
    /// and, when everything reached the journal, leaves the clean-stop marker.
    pub async fn shutdown(&self, drain_timeout: Duration) -> ShutdownReport {
        let Some(j) = &self.journal else {
            let flush_error = self.device.flush().await.err().map(|e| e.to_string());
            return ShutdownReport {
                mode: self.mode(),
                head_lsn: 0,
                durable_lsn: 0,
                undrained_records: 0,
                drained: true,
                flush_error,
                clean: false,
            };
        };
        for helper in lock(&j.helpers).drain(..) {
            helper.abort();
        }
        let head_lsn = j.intake.close();
        let task = lock(&j.task).take();
        let next_seq = match task {
            Some(mut task) => match tokio::time::timeout(drain_timeout, &mut task).await {
                Ok(Ok(next_seq)) => Some(next_seq),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the journal writer task failed");
                    None
                }
                Err(_) => {
                    task.abort();
                    None
                }
            },
            None => None,
        };
        let durable_lsn = j.progress.borrow().durable_lsn;
        let flush_error = self.device.flush().await.err().map(|e| e.to_string());
        let mode = self.mode();
        let mut clean = false;
        if let (Some(next_seq), Mode::Logging, None) = (next_seq, mode, &flush_error) {
            if durable_lsn == head_lsn {
                let marker = CleanMarker {
                    uuid: j.uuid,
                    epoch: j.epoch,
                    next_seq,
                    next_lsn: head_lsn + 1,
                };
                match restart::write_marker(&j.marker_path, &marker) {
                    Ok(()) => clean = true,
                    Err(e) => tracing::warn!(error = %e, "cannot leave the clean-stop marker"),
                }
            }
        }
        ShutdownReport {
            mode,
            head_lsn,
            durable_lsn,
            undrained_records: head_lsn.saturating_sub(durable_lsn),
            drained: next_seq.is_some(),
            flush_error,
            clean,
        }
    }
}

#[async_trait]
impl BlockDevice for PrimaryCore {
    fn info(&self) -> DeviceInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        // Reads take no lock: a read overlapping a write in flight may see either content,
        // as on any disk.
        check_range(offset, u64::from(len), self.info.size)?;
        self.io.read(u64::from(len));
        self.device.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        let len = data.len() as u64;
        check_range(offset, len, self.info.size)?;
        self.io.write(len);
        let shared = data.clone();
        self.change(
            offset..offset + len,
            Op::Write { offset, data },
            self.device.write(offset, shared, fua),
        )
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        self.io.flush();
        let applied = self.device.flush().await;
        let ticket = self.journal(Op::Flush, &applied);
        applied?;
        self.acknowledge(ticket).await;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.io.trim();
        self.change(
            offset..offset + len,
            Op::Discard { offset, len },
            self.device.trim(offset, len),
        )
        .await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.info.size)?;
        self.io.write_zeroes();
        self.change(
            offset..offset + len,
            Op::WriteZeroes { offset, len },
            self.device.write_zeroes(offset, len, fua),
        )
        .await
    }
}

mod hooks;
pub use hooks::HookError;

#[cfg(test)]
mod tests;
