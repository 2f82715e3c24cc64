//! Trim: deletes the journal segments every consumer has committed and the retention no
//! longer needs (`tinylag journal trim`), and the undo segments a replica's time-travel
//! window no longer needs (`tinylag undo trim`), then moves the store's `trim` pointer.
//!
//! Must never: delete a segment at or after any consumer's
//! [`trim_floor`](crate::journal::consumer::ConsumerState::trim_floor), one whose newest record
//! is younger than the retention, or the newest segment of the journal; delete an undo
//! segment at or after its consumer's `undo.consistent_seq` (crash recovery needs those);
//! leave the `trim` pointer naming a seq that may already be deleted; list a segment folder
//! (a trim costs O(segments deleted), not O(journal)); delete a mark (`marks/<name>`);
//! delete a segment of a branch (`branches/<name>`, `first_seq..=last_seq`: a branch holds
//! the pointer as a consumer does) unless `--drop-branch NAME` removed that branch first.
//!
//! # Order of operations (the crash-safety invariant)
//!
//! Readers and writers start at the `trim` pointer, so the pointer must never name a
//! deleted seq. Deleting first and moving the pointer after would break that on a crash
//! between the two: a restarting writer would find no segment at the pointer, take the
//! journal for empty there and write a second history over the deleted seqs. So trim works
//! the other way round, in chunks of at most [`DELETE_BATCH`] seqs `from..to`:
//!
//! 1. put `trim.pending` = `{"from_seq": from, "to_seq": to}`;
//! 2. put `trim` = `{"first_seq": to, "first_lsn": …}` (the chunk is now dead to readers);
//! 3. delete the keys of seqs `from..to` (one `delete_many`, oldest first);
//!
//! and removes `trim.pending` once the last chunk is deleted. A trim killed anywhere leaves
//! a pointer at a seq that exists, and at worst some dead objects below it, which the next
//! trim deletes first: it deletes `trim.pending`'s range up to the pointer (never past it:
//! a trim killed between 1 and 2 left a pending range the pointer never reached). Only one
//! trim may run on a store at a time (run it from one cron job).
//!
//! Racing readers: a starting writer (`head::plan_restart_from_trim_pointer`) re-reads the
//! pointer after probing and plans again if it moved, so it never mistakes a trimmed seq for
//! the end of the journal. A new replay agent reads the pointer, registers there, and reads
//! the pointer again, withdrawing if it moved; trim lists the consumers again after each
//! pointer move and before deleting, so an agent that passed its check is seen, and its
//! segments stay (named in `trim.pending` until it has moved on; the pointer may then sit
//! above that consumer, which reads from its own position). Consumers never read below
//! their own position, which trim keeps.

use serde::{Deserialize, Serialize};

use crate::journal::chain::{self, Branch};
use crate::journal::consumer::{self, ConsumerState, TrimPointer};
use crate::journal::error::JournalError;
use crate::journal::paths;
use crate::journal::segment::SegmentError;
use crate::replayer::undo::UndoError;
use crate::store::counting::DELETE_BATCH;
use crate::store::{ObjectStore, StoreError};

pub(crate) mod journal;
mod read_ahead;
pub(crate) mod undo;

pub use journal::{trim_journal, JournalTrimOptions};
pub use undo::{trim_undo, UndoTrimOptions};

/// Every way a trim fails. Nothing is deleted past the point of failure, and what was
/// deleted before it is below the pointer.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    /// Journal metadata (manifest, consumers, the trim pointer) could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A segment's index could not be read or does not check out (the message names it).
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The undo log could not be read.
    #[error(transparent)]
    Undo(#[from] UndoError),
    /// Two segments that should follow each other do not: the journal is damaged there.
    #[error("segment {key} in {store} starts at LSN {found}, but the segment before it ends at LSN {expected}; the journal is damaged there, so trim stopped before it")]
    BrokenChain {
        store: String,
        key: String,
        expected: u64,
        found: u64,
    },
    /// `--drop-branch` names no branch.
    #[error("journal {journal} has no branch named {name} (its branches: {}); nothing was changed", if known.is_empty() { "none".to_string() } else { known.join(", ") })]
    UnknownBranch {
        journal: String,
        name: String,
        known: Vec<String>,
    },
    /// A read-ahead task panicked or was cancelled.
    #[error("trim: an index read task failed: {0}")]
    Task(String),
    /// `trim` or `trim.pending` is not valid JSON of the expected shape.
    #[error("object {key} in {store} is not a valid {what}: {reason}")]
    Malformed {
        store: String,
        key: String,
        what: &'static str,
        reason: String,
    },
    /// `--undo` holds no undo log.
    #[error("no undo log at {store}: {key} not found (pass the replay agent's --undo location, default <replica>.undo)")]
    NoUndoLog { store: String, key: String },
    /// The undo log was written for another journal.
    #[error("undo log {undo} belongs to journal {found}, not to {journal} ({expected}); pass the matching --journal")]
    ForeignUndoLog {
        undo: String,
        journal: String,
        found: uuid::Uuid,
        expected: uuid::Uuid,
    },
    /// The undo log's consumer is not registered, so what crash recovery needs is unknown.
    #[error("undo log {undo} belongs to consumer {name}, which is not registered in {journal}; without its commit position trim cannot tell which undo segments crash recovery needs, so nothing was deleted")]
    UnregisteredConsumer {
        undo: String,
        journal: String,
        name: String,
    },
}

pub type TrimResult<T> = Result<T, TrimError>;

/// What keeps the first live segment from being trimmed (JSON: `{"reason": "consumer", …}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum HeldBy {
    /// The slowest consumer: its [`trim_floor`](crate::journal::consumer::ConsumerState::trim_floor)
    /// (the smaller of `next_seq` and `consistent_seq`) is the first segment it may still read.
    Consumer {
        name: String,
        floor_seq: u64,
        next_seq: u64,
        consistent_seq: u64,
        applied_lsn: u64,
        consistent_lsn: u64,
    },
    /// The retention: segment `seq`'s newest record is younger than `retain`.
    Retention {
        retain_ns: u64,
        cutoff_ns: u64,
        seq: u64,
        newest_timestamp_ns: u64,
    },
    /// The newest segment of the journal, which trim always keeps (its index tells a
    /// restarting writer the next LSN and the last timestamp).
    Head { seq: u64 },
    /// The undo segments crash recovery needs: those at and after the consumer's
    /// `undo.consistent_seq`.
    CrashRecovery {
        consumer: String,
        consistent_seq: u64,
    },
    /// A branch (`promote --at` left it off the chain): its segments stay until
    /// `journal trim --drop-branch NAME`.
    Branch {
        name: String,
        first_seq: u64,
        last_seq: u64,
        from_lsn: u64,
        to_lsn: u64,
    },
    /// Nothing is left to trim: no segment exists at the pointer.
    Nothing { seq: u64 },
}

impl HeldBy {
    /// What a consumer's position holds.
    pub fn consumer(c: &ConsumerState) -> HeldBy {
        HeldBy::Consumer {
            name: c.name.clone(),
            floor_seq: c.trim_floor(),
            next_seq: c.next_seq,
            consistent_seq: c.consistent_seq,
            applied_lsn: c.applied_lsn,
            consistent_lsn: c.consistent_lsn,
        }
    }

    /// What a branch holds.
    pub fn branch(b: &Branch) -> HeldBy {
        HeldBy::Branch {
            name: b.name.clone(),
            first_seq: b.first_seq,
            last_seq: b.last_seq,
            from_lsn: b.from_lsn,
            to_lsn: b.to_lsn,
        }
    }
}

impl HeldBy {
    /// One line for operators.
    pub fn describe(&self) -> String {
        use crate::clock::format_ns;
        match self {
            HeldBy::Consumer {
                name,
                floor_seq,
                applied_lsn,
                consistent_lsn,
                ..
            } => format!(
                "consumer {name} (needs seq {floor_seq} on: applied LSN {applied_lsn}, consistent LSN {consistent_lsn})"
            ),
            HeldBy::Retention {
                retain_ns,
                cutoff_ns,
                seq,
                newest_timestamp_ns,
            } => format!(
                "the retention of {} (seq {seq} holds a record of {}, after {})",
                format_secs(*retain_ns),
                format_ns(*newest_timestamp_ns),
                format_ns(*cutoff_ns)
            ),
            HeldBy::Head { seq } => format!("the journal head (seq {seq} is the newest segment)"),
            HeldBy::CrashRecovery {
                consumer,
                consistent_seq,
            } => format!(
                "crash recovery of consumer {consumer} (undo seq {consistent_seq} on follows its consistent point)"
            ),
            HeldBy::Branch {
                name,
                first_seq,
                last_seq,
                from_lsn,
                to_lsn,
            } => format!(
                "branch {name} (seqs {first_seq}..={last_seq}, LSNs {from_lsn}..={to_lsn}; `journal trim --drop-branch {name}` lets them go)"
            ),
            HeldBy::Nothing { seq } => format!("nothing (no segment at seq {seq})"),
        }
    }
}

fn format_secs(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        s if s != 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s != 0 && s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s != 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A consumer `--drop-consumer-after` unregistered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DroppedConsumer {
    pub name: String,
    /// Its last commit.
    pub updated_at_ns: u64,
    pub next_seq: u64,
    pub applied_lsn: u64,
}

/// What a trim did (or, with `dry_run`, would do). JSON for `--json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrimReport {
    /// The store trimmed (journal or undo log).
    pub store: String,
    pub dry_run: bool,
    /// The pointer before and after.
    pub before: TrimPointer,
    pub after: TrimPointer,
    /// Segments deleted (journal: segments on the chain, plugs included).
    pub deleted_segments: u64,
    /// Their stored bytes.
    pub deleted_bytes: u64,
    /// Seqs a plug jumped over (abandoned uploads of a dead writer), deleted by key.
    pub deleted_orphans: u64,
    /// Seqs below the pointer that an interrupted trim had left, deleted first.
    pub leftovers: u64,
    /// Timestamp of the first record still live (`None` when the first live segment holds
    /// none, or nothing is left).
    pub first_live_timestamp_ns: Option<u64>,
    pub held_by: HeldBy,
    /// Consumers unregistered by `--drop-consumer-after` (journal trim only).
    pub dropped_consumers: Vec<DroppedConsumer>,
    /// Branches removed by `--drop-branch` (journal trim only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dropped_branches: Vec<String>,
}

impl TrimReport {
    /// A report of nothing done yet on `store`, whose pointer stands at `before` once the
    /// `leftovers` of an interrupted trim are gone: the one start of both trims' reports.
    pub(crate) fn start(
        store: &dyn ObjectStore,
        dry_run: bool,
        before: TrimPointer,
        leftovers: u64,
    ) -> TrimReport {
        TrimReport {
            store: store.describe(),
            dry_run,
            before,
            after: before,
            deleted_segments: 0,
            deleted_bytes: 0,
            deleted_orphans: 0,
            leftovers,
            first_live_timestamp_ns: None,
            held_by: HeldBy::Nothing {
                seq: before.first_seq,
            },
            dropped_consumers: Vec::new(),
            dropped_branches: Vec::new(),
        }
    }
}

/// The seqs an unfinished trim is deleting (JSON at `trim.pending`):
///
/// ```json
/// {"from_seq": 1200, "to_seq": 2200}
/// ```
///
/// # Invariants
/// - Written before the pointer moves to `to_seq`, so a range whose `to_seq` is past the
///   pointer was never made dead: only `from_seq..min(to_seq, pointer)` may be deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingDelete {
    pub from_seq: u64,
    pub to_seq: u64,
}

/// Deletes seqs below a moving pointer, chunk by chunk, in the order of the module
/// documentation.
struct Deleter<'a> {
    store: &'a dyn ObjectStore,
    key: &'a (dyn Fn(u64) -> String + Sync),
    dry_run: bool,
    /// Whether consumers hold this store's segments (journal: yes; undo log: its one
    /// consumer's limit is fixed for the run).
    recheck_consumers: bool,
    /// First seq not yet made dead.
    chunk_from: u64,
    /// `trim.pending` was written and must go when the run ends.
    wrote_pending: bool,
}

impl<'a> Deleter<'a> {
    fn new(
        store: &'a dyn ObjectStore,
        key: &'a (dyn Fn(u64) -> String + Sync),
        dry_run: bool,
        recheck_consumers: bool,
        from: u64,
    ) -> Self {
        Deleter {
            store,
            key,
            dry_run,
            recheck_consumers,
            chunk_from: from,
            wrote_pending: false,
        }
    }

    /// Everything below `to` may go, and `to` (whose first LSN is `to_lsn`) is the first live
    /// seq. Deletes when a chunk is full, or now with `force`. Returns a consumer that
    /// registered (or a branch created) below `to` while the trim ran, with its floor (the
    /// walk must stop there); its segments stay, and `trim.pending` keeps naming them for a
    /// later trim.
    async fn advance(
        &mut self,
        to: u64,
        to_lsn: u64,
        force: bool,
    ) -> TrimResult<Option<(u64, HeldBy)>> {
        let pending = to.saturating_sub(self.chunk_from);
        if pending == 0 || (!force && pending < DELETE_BATCH as u64) {
            return Ok(None);
        }
        let from = self.chunk_from;
        self.chunk_from = to;
        if self.dry_run {
            return Ok(None);
        }
        put_pending(self.store, from, to).await?;
        self.wrote_pending = true;
        let pointer = TrimPointer {
            first_seq: to,
            first_lsn: to_lsn,
        };
        consumer::store_trim_pointer(self.store, &pointer).await?;
        // A replay agent reads the pointer, registers, then reads it again and withdraws if
        // it moved. One that passed that check registered before the pointer moved, so this
        // listing (after the move) sees it.
        let slowest = if self.recheck_consumers {
            slowest_holder(self.store).await?
        } else {
            None
        };
        match slowest.filter(|(floor, _)| *floor < to) {
            Some((floor, holder)) => {
                let cut = floor.max(from);
                tracing::warn!(
                    "{} appeared at seq {floor} of {} while trim ran: its segments stay",
                    holder.describe(),
                    self.store.describe()
                );
                delete_range(self.store, self.key, from, cut).await?;
                put_pending(self.store, cut, to).await?;
                self.wrote_pending = false;
                Ok(Some((floor, holder)))
            }
            None => {
                delete_range(self.store, self.key, from, to).await?;
                Ok(None)
            }
        }
    }

    /// Removes `trim.pending` once every chunk is deleted.
    async fn finish(self) -> TrimResult<()> {
        if self.wrote_pending {
            self.store
                .delete_many(&[paths::TRIM_PENDING.to_string()])
                .await?;
        }
        Ok(())
    }
}

/// The registered consumer or branch with the lowest trim floor, with that floor.
async fn slowest_holder(store: &dyn ObjectStore) -> TrimResult<Option<(u64, HeldBy)>> {
    let consumers = consumer::list(store).await?;
    let branches = chain::list_branches(store).await?;
    Ok(lowest_holder(&consumers, &branches))
}

/// The lowest floor among `consumers` and `branches`, with what holds it.
fn lowest_holder(consumers: &[ConsumerState], branches: &[Branch]) -> Option<(u64, HeldBy)> {
    let consumer = consumers
        .iter()
        .min_by_key(|c| c.trim_floor())
        .map(|c| (c.trim_floor(), HeldBy::consumer(c)));
    let branch = branches
        .iter()
        .min_by_key(|b| b.first_seq)
        .map(|b| (b.first_seq, HeldBy::branch(b)));
    match (consumer, branch) {
        (Some(c), Some(b)) => Some(if b.0 < c.0 { b } else { c }),
        (c, b) => c.or(b),
    }
}

async fn put_pending(store: &dyn ObjectStore, from: u64, to: u64) -> TrimResult<()> {
    let range = PendingDelete {
        from_seq: from,
        to_seq: to,
    };
    let body = serde_json::to_vec(&range).expect("a pending range serializes");
    store
        .put(paths::TRIM_PENDING, bytes::Bytes::from(body))
        .await?;
    Ok(())
}

/// Deletes the keys of seqs `from..to`, oldest first, at most [`DELETE_BATCH`] per request.
async fn delete_range(
    store: &dyn ObjectStore,
    key: &(dyn Fn(u64) -> String + Sync),
    from: u64,
    to: u64,
) -> TrimResult<()> {
    let mut start = from;
    while start < to {
        let end = to.min(start.saturating_add(DELETE_BATCH as u64));
        let keys: Vec<String> = (start..end).map(key).collect();
        store.delete_many(&keys).await?;
        start = end;
    }
    Ok(())
}

/// Deletes what an interrupted trim left below `pointer` (see [`PendingDelete`]), but
/// nothing at or past `floor` (a consumer that registered while that trim ran), and returns
/// how many seqs it deleted. What `floor` keeps stays named in `trim.pending`. With
/// `dry_run`, only counts.
async fn finish_interrupted(
    store: &dyn ObjectStore,
    key: &(dyn Fn(u64) -> String + Sync),
    pointer: u64,
    floor: u64,
    dry_run: bool,
) -> TrimResult<u64> {
    let data = match store.get(paths::TRIM_PENDING).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let range: PendingDelete = serde_json::from_slice(&data).map_err(|e| TrimError::Malformed {
        store: store.describe(),
        key: paths::TRIM_PENDING.to_string(),
        what: "pending trim range",
        reason: e.to_string(),
    })?;
    let to = range.to_seq.min(pointer);
    let cut = to.min(floor.max(range.from_seq));
    let count = cut.saturating_sub(range.from_seq);
    if dry_run {
        return Ok(count);
    }
    if count > 0 {
        tracing::info!(
            "finishing an interrupted trim of {}: deleting seqs {}..{cut}",
            store.describe(),
            range.from_seq
        );
        delete_range(store, key, range.from_seq, cut).await?;
    }
    if cut < to {
        if cut > range.from_seq {
            put_pending(store, cut, to).await?;
        }
    } else {
        store
            .delete_many(&[paths::TRIM_PENDING.to_string()])
            .await?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests;
