//! Every way time travel (`restore`, `mount --at`, `timeline`) fails.

use std::path::PathBuf;

use crate::journal::JournalError;
use crate::replayer::apply::ApplyError;
use crate::replayer::replica::ReplicaError;
use crate::replayer::undo::UndoError;

/// One variant per failure; each names the object, the flag or the times an operator needs.
#[derive(Debug, thiserror::Error)]
pub enum TimeTravelError {
    /// The `--replica` paths do not name the journal's devices.
    #[error("{reason}")]
    ReplicaMap { reason: String },
    /// A group is restored into a directory (one image per device), a device into a file.
    #[error("{reason}")]
    Output { reason: String },
    /// No consumer of the journal is registered for this replica.
    #[error("no replay agent of journal {journal} follows replica {replica}; give the --replica a `tinylag replay` writes (or --name of its consumer)")]
    NoConsumer { journal: String, replica: String },
    /// Several consumers follow the same replica path.
    #[error("several consumers of journal {journal} follow replica {replica} ({names}); choose one with --name")]
    AmbiguousConsumer {
        journal: String,
        replica: String,
        names: String,
    },
    /// The requested time is before the oldest restorable point.
    #[error("{time} is before the restorable window, which starts at {start} (LSN {start_lsn}); choose a time at or after it")]
    BeforeWindow {
        time: String,
        start: String,
        start_lsn: u64,
    },
    /// The requested time is in the future.
    #[error("{time} is in the future; the journal's head is at {head} (LSN {head_lsn})")]
    InFuture {
        time: String,
        head: String,
        head_lsn: u64,
    },
    /// A mark names a point outside the window.
    #[error("mark {name} (LSN {lsn}, {time}) is outside the restorable window LSN {start_lsn}..={head_lsn} ({start} .. {head})")]
    MarkOutsideWindow {
        name: String,
        lsn: u64,
        time: String,
        start_lsn: u64,
        start: String,
        head_lsn: u64,
        head: String,
    },
    /// The point is inside a resync span: a state the primary never had.
    #[error("{point} is inside an unfinished resync span (LSN {begin_lsn}..{end}), a state the primary never had; the nearest valid points are {before} and {after}")]
    InHole {
        point: String,
        begin_lsn: u64,
        end: String,
        before: String,
        after: String,
    },
    /// Going back needs an undo log and there is none.
    #[error("going back to LSN {lsn} needs the undo log, and {undo} holds none; the replica is at LSN {consistent_lsn}")]
    NoUndoLog {
        undo: String,
        lsn: u64,
        consistent_lsn: u64,
    },
    /// An undo segment the plan needs is gone (trimmed, or rewound by a recovering agent).
    #[error("undo segment {seq} of {undo} disappeared while reading it (undo trim, or a replay agent recovering); run the command again")]
    UndoSegmentMissing { undo: String, seq: u64 },
    /// The point is after a journal hole: the records past it cannot be read.
    #[error("points after LSN {head_lsn} ({head}) cannot be restored: {hole}")]
    PastJournalHole {
        head_lsn: u64,
        head: String,
        hole: String,
    },
    /// A journal segment the plan needs is gone.
    #[error(
        "journal {journal} has no segment holding LSN {lsn} (trimmed?); run the command again"
    )]
    JournalSegmentMissing { journal: String, lsn: u64 },
    /// Without an undo log, the replica moved while it was copied.
    #[error("replica {replica} changed while it was copied and has no undo log to correct that; stop its replay agent, or give it an undo log")]
    ReplicaMoved { replica: String },
    /// `--output` exists already.
    #[error(
        "--output {path} exists; restore writes a new file only (remove it or choose another path)"
    )]
    OutputExists { path: PathBuf },
    /// `--writable` names an existing file.
    #[error(
        "--writable {path} exists; the scratch file must be new (remove it or choose another path)"
    )]
    ScratchExists { path: PathBuf },
    /// A record reaches outside the device (a corrupt or foreign index).
    #[error(
        "{object}: record LSN {lsn} reaches outside its device (device {dev}, {offset}+{len})"
    )]
    RecordOutside {
        object: String,
        lsn: u64,
        dev: u32,
        offset: u64,
        len: u64,
    },
    /// A file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `--branch` names no branch.
    #[error("journal {journal} has no branch named {name} (its branches: {known}; see `tinylag timeline`)")]
    UnknownBranch {
        journal: String,
        name: String,
        known: String,
    },
    /// A mark whose record a `promote --at` left off the chain.
    #[error("mark {name} (LSN {lsn}) is on a branch, not on the current epoch chain; restore it with --branch (see `tinylag timeline`)")]
    MarkOffChain { name: String, lsn: u64 },
    /// A diff's point is outside the journal's live range (trimmed, or not written yet).
    #[error("{what} {point} is outside the journal's live range {range}; choose points inside it (see `tinylag journal info`)")]
    OutsideJournal {
        what: &'static str,
        point: String,
        /// "LSN a..=b (t1 .. t2)", and the hole that ends it early, if one does.
        range: String,
    },
    /// A lock of the view was poisoned: a thread panicked while updating what it guards.
    #[error("{what} is unusable: a thread panicked while updating it")]
    LockPoisoned { what: &'static str },
    /// A background task panicked or was cancelled.
    #[error("{what} task failed: {message}")]
    Task { what: &'static str, message: String },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Undo(#[from] UndoError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
}

pub type TimeTravelResult<T> = Result<T, TimeTravelError>;
