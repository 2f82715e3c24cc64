//! Starting the primary core: checks the primary against the journal's manifest, claims the
//! writer epoch, lets the clean-stop marker, the journal's end and the activity log decide
//! the first mode (see [`restart`]): `logging`, `forward-part` with the regions the previous
//! writer's activity log names (after a crash), or `forward-full` (every region), then starts
//! the journal writer, the resync task and the activity-log cleaner.
//!
//! Must never: start journaling over a primary of another size or block size than the
//! journal's; begin in `logging` unless a clean-stop marker (or an empty new journal) vouches
//! that the primary equals the journal's end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::{Journaling, Labels, OnFence, PrimaryCore, DEFAULT_REGION_SIZE};
use crate::block::BlockDevice;
use crate::clock::Clock;
use crate::journal::epoch::ClaimBasis;
use crate::journal::layout::DeviceLayout;
use crate::journal::manifest::DeviceSpec;
use crate::journal::Manifest;
use crate::store::ObjectStore;
use crate::writer::activity_log::{self, ActivityLog, ActivityLogError, Previous};
use crate::writer::dirty::DirtyRegions;
use crate::writer::io_counts::IoCounts;
use crate::writer::journal_writer::{self, JournalWriter, StartError, WriterConfig};
use crate::writer::mode::{AckMode, FullReason, ModeState};
use crate::writer::pool::{Pool, PoolError};
use crate::writer::range_lock::RangeLock;
use crate::writer::restart::{self, RestartError};
use crate::writer::resync::{self, Episodes, ResyncTask};
use crate::writer::shared::Shared;

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
    /// Every device's primary, in device order, for a consistency group (the demote leaves a
    /// seed stamp beside each: a set is vouched for only by a stamp beside every image);
    /// empty for one device (`primary_path` alone).
    pub member_paths: Vec<PathBuf>,
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
    /// What clients see once this writer is fenced (`serve --on-fence`).
    pub on_fence: OnFence,
    /// `promote`: the epoch to claim exactly and the replica's catch-up that vouches for it
    /// (see [`Promotion`]); `None` for `serve`.
    pub promotion: Option<Promotion>,
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
    /// An encrypted journal without a key, or a key given for a plaintext journal.
    #[error(transparent)]
    Encryption(crate::journal::JournalError),
    /// `promote` could not bring the replica to the journal's end after its claim.
    #[error("promote: {reason}")]
    Promote { reason: String },
}

/// How `promote` starts a writer on a replica (DESIGN.md, "Failover and failback").
#[derive(Clone)]
pub struct Promotion {
    /// The epoch to claim: exactly this one, or lose the race.
    pub epoch: u64,
    /// Brings the replica up to the journal's end as planned after the claim.
    pub catch_up: Arc<dyn CatchUp>,
}

impl std::fmt::Debug for Promotion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Promotion")
            .field("epoch", &self.epoch)
            .finish()
    }
}

/// A promoted replica's catch-up, run by the core between its claim and its first segment.
#[async_trait::async_trait]
pub trait CatchUp: Send + Sync {
    /// Applies every record through `last_lsn` and returns the last LSN the replica holds
    /// (the records past it are not applied: the claim fenced their writer).
    async fn through(&self, last_lsn: u64) -> Result<u64, String>;
}

/// How a journaling core started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub(crate) enum StartKind {
    /// A clean stop or a new empty journal: nothing to resync.
    Clean,
    /// After an unclean stop, the previous writer's activity log named these regions.
    ActivityLog { regions: u64 },
    /// Every region: why.
    Full { reason: String },
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
                layout: Arc::new(DeviceLayout::new(
                    &[DeviceSpec {
                        name: labels.export.clone(),
                        size: info.size,
                    }],
                    DEFAULT_REGION_SIZE,
                )),
                locks: Arc::new(RangeLock::new()),
                mode: Arc::new(ModeState::without_journal()),
                dirty: Arc::new(DirtyRegions::new(info.size, DEFAULT_REGION_SIZE)),
                journal: None,
                labels,
                started: std::time::Instant::now(),
                io: Default::default(),
                on_fence: OnFence::Keep,
                refuse: AtomicU8::new(0),
                demoted: Mutex::new(None),
            });
        };
        let manifest = setup.manifest;
        let store_name = setup.store.describe();
        // Before anything is claimed: one epoch never mixes sealed and plaintext segments.
        manifest
            .check_key_for_writing(&store_name)
            .map_err(CoreError::Encryption)?;
        let layout = Arc::new(manifest.layout());
        // One device: its size; a group: the group's address space (the group device checked
        // each member's size against its device when it was built).
        let expected = layout.span();
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
        let prepared = journal_writer::prepare_claiming(
            setup.store.clone(),
            manifest,
            setup.clock.as_ref(),
            setup.abandon_after_hole,
            setup.claim.clone(),
            setup.promotion.as_ref().map(|p| p.epoch),
        )
        .await?;
        let epoch = prepared.claim.epoch;
        let marker_path = restart::marker_path(&setup.primary_path);
        let marker = restart::take_marker(&marker_path)?;
        let mut full = if layout.is_single() {
            restart::initial_full_reason(&prepared, uuid, marker.as_ref(), || {
                restart::primary_has_data(&setup.primary_path)
            })?
        } else {
            // A group: whether any member holds data (each member's own hole map).
            let has_data = device
                .has_data(0, info.size)
                .await
                .map_err(|e| RestartError::Primary {
                    path: setup.primary_path.clone(),
                    source: std::io::Error::other(e),
                });
            restart::initial_full_reason(&prepared, uuid, marker.as_ref(), || has_data)?
        };
        if let (Some(promotion), None) = (&setup.promotion, prepared.abandoned) {
            // The replica vouches for itself: it holds every record up to the end the plan
            // found (which, for a forced promote, may have moved since it caught up).
            let end = prepared.plan.next_lsn.saturating_sub(1);
            let applied = promotion
                .catch_up
                .through(end)
                .await
                .map_err(|reason| CoreError::Promote { reason })?;
            if applied != end {
                return Err(CoreError::Promote {
                    reason: format!(
                        "the replica holds the journal through LSN {applied}, but the journal \
                         ends at LSN {end} as planned"
                    ),
                });
            }
            full = None;
        }
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
            Shared {
                mode: mode.clone(),
                dirty: dirty.clone(),
                pool: pool.clone(),
            },
            intake.clone(),
            timestamps.clone(),
            stats.clone(),
            Some(al.clone()),
            layout.clone(),
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
        let layout_count = layout.count();
        Ok(PrimaryCore {
            device,
            info,
            layout,
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
                primary_path: setup.primary_path.clone(),
                member_paths: setup.member_paths.clone(),
                episodes,
                al,
                helpers: Mutex::new(helpers),
                start,
            }),
            labels,
            started: std::time::Instant::now(),
            io: IoCounts::for_devices(layout_count),
            on_fence: setup.on_fence,
            refuse: AtomicU8::new(0),
            demoted: Mutex::new(None),
        })
    }
}
