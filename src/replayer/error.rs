//! Errors of the replay agent and of crash recovery.

use crate::journal::JournalError;

use super::apply::ApplyError;
use super::replica::ReplicaError;
use super::undo::UndoError;

/// One variant per way the agent stops; each message names the journal object, the replica
/// or the consumer involved.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the journal failed: a corrupt or foreign segment (the message names the
    /// object), a missing manifest, a malformed consumer position.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The undo log failed or belongs to someone else.
    #[error(transparent)]
    Undo(#[from] UndoError),
    /// A record could not be applied, or the replica failed.
    #[error(transparent)]
    Apply(#[from] ApplyError),
    /// The replica could not be opened.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The consumer name is registered for another replica.
    #[error("consumer {name} of {journal} replays onto {registered}, not {requested}; pick another --name or the same --replica")]
    ConsumerOfOtherReplica {
        name: String,
        journal: String,
        registered: String,
        requested: String,
    },
    /// The replica was just created, but the consumer's position says records were applied
    /// to it: the replica was deleted or moved.
    #[error("replica {replica} is new, but consumer {name} has applied the journal up to LSN {applied_lsn}; restore that replica, or `journal unregister` the consumer to start over")]
    ReplicaLost {
        replica: String,
        name: String,
        applied_lsn: u64,
    },
    /// A new replica cannot be built from a journal whose start was trimmed away.
    #[error("journal {journal} was trimmed up to LSN {first_lsn}: a new replica built from it would miss the records before; seed the replica first (`tinylag restore --output` from another replica, or a copy of the primary with --check-seed)")]
    JournalTrimmed { journal: String, first_lsn: u64 },
    /// A `journal trim` moved the journal's start while this new consumer registered there.
    #[error("journal {journal} was trimmed while consumer {name} registered at its start; the registration was withdrawn, run the agent again")]
    TrimmedWhileRegistering { journal: String, name: String },
    /// An undo segment past the consistent position holds a record at or before it: the
    /// undo log does not belong to this position.
    #[error("undo segment {key} in {undo} holds LSN {lsn}, but only records after the consistent LSN {consistent_lsn} may be undone")]
    UndoBeforeConsistent {
        undo: String,
        key: String,
        lsn: u64,
        consistent_lsn: u64,
    },
    /// The consumer is new, but its undo log already holds segments of an earlier consumer
    /// of the same name: undoing them would corrupt the replica.
    #[error("undo log {undo} already holds {segments} segments of an earlier consumer named {name}; remove it or use another --undo location")]
    StaleUndoLog {
        undo: String,
        name: String,
        segments: u64,
    },
    /// A new consumer was given an existing image that nothing vouches holds the journal's
    /// state where the consumer would start (see `crate::journal::seed`).
    #[error("replica {replica} already exists, and nothing vouches that it holds the state of {journal} at LSN {lsn}, where the new consumer {name} would start: replaying onto it could leave a replica the primary never had. Nothing was changed. Choose one: (1) seed it with `tinylag restore --output {replica}` (from another replica; the restore leaves a seed stamp replay accepts), (2) --check-seed: the agent proves it region by region against the primary (run `tinylag verify` on the primary, then `tinylag resync --regions` for what differs, as its status says), (3) --assume-seeded if you copied it from the primary yourself at that point (status will say so)")]
    UnvouchedReplica {
        replica: String,
        journal: String,
        name: String,
        lsn: u64,
    },
    /// A new consumer's image has a seed stamp that cannot vouch for it.
    #[error("{reason}; nothing was changed: restore the image again, or remove the stamp and choose --check-seed or --assume-seeded")]
    BrokenStamp { reason: String },
    /// The seed stamp is of another journal.
    #[error("the seed stamp beside {replica} is of journal {found}, not {journal} ({expected}); restore from this journal, or remove the stamp")]
    StampOfOtherJournal {
        replica: String,
        journal: String,
        found: uuid::Uuid,
        expected: uuid::Uuid,
    },
    /// The seed stamp's point was trimmed from the journal (or its segment is missing).
    #[error("the seed stamp beside {replica} holds LSN {lsn} of {journal}, but segment {seq} holding it is not there (the journal starts at LSN {first_lsn}): restore again from a newer point")]
    StampPointGone {
        replica: String,
        journal: String,
        lsn: u64,
        seq: u64,
        first_lsn: u64,
    },
    /// The replica holds records a fork left off the chain, and its undo log does not reach
    /// back far enough to wind them back (none kept, or trimmed).
    #[error("replica {replica} (consumer {name}) holds records up to LSN {applied_lsn} of {journal}, but the epoch chain forked at LSN {target_lsn} (epoch {epoch}) and {why}; nothing was changed. Bring it back on the chain with `tinylag rejoin --replica {replica} --journal {journal} --name {name}`")]
    CannotWindBack {
        replica: String,
        journal: String,
        name: String,
        applied_lsn: u64,
        target_lsn: u64,
        epoch: u64,
        why: String,
    },
    /// A fork point lies inside the replica's unfinished resync span.
    #[error("the epoch chain forked at LSN {target_lsn}, inside replica {replica}'s unfinished resync span (consistent at LSN {consistent_lsn}); nothing was changed")]
    ForkInsideSpan {
        replica: String,
        target_lsn: u64,
        consistent_lsn: u64,
    },
    /// A blocking replica task panicked or was cancelled.
    #[error("replica task ({what}) failed: {message}")]
    Task { what: &'static str, message: String },
}
