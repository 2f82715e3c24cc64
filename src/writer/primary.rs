//! The primary core: the frontend-independent heart of `tinylag serve`. It owns the primary
//! disk (any [`BlockDevice`], normally a file target from `block::file::open`) and implements
//! [`BlockDevice`] itself,
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
//!
//! Files: [`start`] (checks, claim, first mode), [`ack`] (the change path and its
//! acknowledgement), [`device`] (the `BlockDevice` the frontends call), [`hooks`] (control
//! commands), [`shutdown`] (drain, fsync, clean-stop marker).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::activity_log::ActivityLog;
use super::dirty::DirtyRegions;
use super::intake::Intake;
use super::journal_writer::Progress;
use super::mode::{AckMode, Mode, ModeState};
use super::pool::Pool;
use super::range_lock::RangeLock;
use super::resync::Episodes;
use super::shared::WriterStats;
use crate::block::{BlockDevice, DeviceInfo};
use crate::clock::{Clock, MonotonicTimestamps};
use crate::journal::layout::DeviceLayout;

mod ack;
mod demote;
mod device;
mod hooks;
mod shutdown;
mod start;

pub use demote::Demoted;
pub use hooks::HookError;
pub use shutdown::ShutdownReport;
pub(crate) use start::StartKind;
pub use start::{CatchUp, CoreError, JournalSetup, Promotion};

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

/// See the module documentation.
pub struct PrimaryCore {
    pub(super) device: Arc<dyn BlockDevice>,
    pub(super) info: DeviceInfo,
    pub(super) locks: Arc<RangeLock>,
    pub(super) mode: Arc<ModeState>,
    pub(super) dirty: Arc<DirtyRegions>,
    /// Where each device of the group lives in `device` (one device: the identity).
    pub(super) layout: Arc<DeviceLayout>,
    pub(super) journal: Option<Journaling>,
    pub(super) labels: Labels,
    pub(super) started: std::time::Instant,
    /// Requests served, for `status` and `/metrics`.
    pub(super) io: super::io_counts::IoCounts,
    /// What clients see once this writer is fenced (`serve --on-fence`).
    pub(super) on_fence: OnFence,
    /// Which requests are refused now: [`Refuse`] as a number (demote, `--on-fence`).
    pub(super) refuse: AtomicU8,
    /// The `DEMOTE` this writer journaled, once `demote` succeeded.
    pub(super) demoted: Mutex<Option<Demoted>>,
}

/// What clients of a fenced writer see (`serve --on-fence`). DRBD's `on-no-quorum` is the
/// model: whichever is chosen, `status`, metrics and the log say `fenced`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFence {
    /// Keep serving reads and writes (the writes are only in the activity log and the
    /// dirty map: the split brain `rejoin` counts).
    #[default]
    Keep,
    /// Fail writes, trims and zeroes (NBD `EPERM`, ublk `-EROFS`); reads go on.
    ReadOnly,
    /// Fail every request (`EIO`).
    Error,
}

impl OnFence {
    pub fn parse(s: &str) -> Result<OnFence, String> {
        match s {
            "keep" => Ok(OnFence::Keep),
            "read-only" => Ok(OnFence::ReadOnly),
            "error" => Ok(OnFence::Error),
            other => Err(format!(
                "invalid --on-fence {other:?}: use keep, read-only or error"
            )),
        }
    }
}

/// Levels of [`PrimaryCore::refuse`]; a higher level refuses more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(super) enum Refuse {
    Nothing = 0,
    Writes = 1,
    Everything = 2,
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
    /// The primary's path: a demote leaves a seed stamp beside it.
    pub(super) primary_path: PathBuf,
    /// A group's primaries in device order (stamped at demote); empty for one device.
    pub(super) member_paths: Vec<PathBuf>,
    pub(super) episodes: Arc<Episodes>,
    pub(super) al: Arc<ActivityLog>,
    /// The resync task and the activity-log cleaner; aborted at shutdown.
    pub(super) helpers: Mutex<Vec<JoinHandle<()>>>,
    /// How the daemon started, for `status`.
    pub(super) start: StartKind,
}

// Critical sections only assign plain values or send on an unbounded channel; a poisoned
// lock still guards consistent state.
use crate::sync::lock;

impl PrimaryCore {
    pub fn mode(&self) -> Mode {
        self.mode.mode()
    }

    pub fn dirty(&self) -> &DirtyRegions {
        &self.dirty
    }

    /// The group's devices in this core's address space.
    pub fn layout(&self) -> &DeviceLayout {
        &self.layout
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
}

#[cfg(test)]
mod tests;
