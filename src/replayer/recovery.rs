//! Crash recovery: before a replay agent applies anything, it walks the replica back to the
//! last point where it equalled the primary.
//!
//! The committed position says where that is: `consistent_lsn`, and `undo.consistent_seq`,
//! the first undo segment holding a pre-image of a later record. Every undo segment from
//! there on exists because a batch after the consistent point started: either uncommitted
//! (the agent died between writing its pre-images and committing) or inside a resync span
//! that never reached its `RESYNC_END`. Recovery:
//!
//! 1. finds the run of undo segments from `undo.consistent_seq` (O(log n) HEADs) up to the
//!    first missing one, and any strays past that gap;
//! 2. reads the run newest first and writes every pre-image back, newest record first;
//! 3. fsyncs the replica;
//! 4. commits the position back at the consistent point;
//! 5. deletes the strays and the run, newest first.
//!
//! Strays are never written back. The agent writes a batch's undo segments at once, and a
//! crash among those writes leaves later parts without an earlier one: such a batch never
//! touched the replica (its writes wait for all of its segments), and a later part's
//! pre-images hold what the earlier parts' records write (a pre-image is the replica patched
//! with the records of the batch before it). Writing them back would put bytes of records
//! that were never applied on the replica. Segments before the gap are whole batches, or
//! the leading parts of that last batch, whose oldest pre-image of each byte is what the
//! replica held: undoing them is exact.
//!
//! A crash anywhere in there is safe to repeat: undoing the same run again ends at the same
//! bytes (the oldest pre-image of each byte wins, and it is the consistent content), and
//! step 5 deleting newest first leaves a run that still starts at `undo.consistent_seq`
//! (strays, deleted first, stay past a gap until then). The agent writes nothing new until
//! step 5 is done.
//!
//! Without an undo log (`--no-undo`) there is nothing to undo: the replica may be torn
//! between its last commit and the crash until the agent re-applies those records (redo is
//! idempotent: writing the same records in the same order gives the same bytes).
//!
//! Must never: undo a record at or before the consistent LSN; move the position before the
//! replica is fsync'd; delete an undo segment before the rewound position is committed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::journal::chain::Lineage;
use crate::journal::consumer::{self, ConsumerState};
use crate::journal::paths;
use crate::store::ObjectStore;

use super::apply::{apply_op, check_record, sync};
use super::error::ReplayError;
use super::replica::ReplicaTarget;
use super::undo::UndoLog;

/// What recovery did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    pub undone_segments: u64,
    pub undone_records: u64,
    /// Strays deleted without being written back: parts of a batch that never reached the
    /// replica.
    #[serde(default)]
    pub discarded_segments: u64,
    /// Applied LSN found at start.
    pub from_lsn: u64,
    /// Applied LSN after recovery (the consistent LSN).
    pub to_lsn: u64,
}

/// Runs recovery for the consumer at `state` (its committed position), updating and
/// committing `state` when it moves. `now_ns` stamps the commit.
pub(crate) async fn recover(
    journal: &dyn ObjectStore,
    undo: Option<&UndoLog>,
    replica: &Arc<dyn ReplicaTarget>,
    state: &mut ConsumerState,
    now_ns: u64,
) -> Result<RecoveryReport, ReplayError> {
    let mut report = RecoveryReport {
        from_lsn: state.applied_lsn,
        to_lsn: state.applied_lsn,
        ..Default::default()
    };
    let Some(undo) = undo else {
        return Ok(report);
    };
    let from = state.undo.consistent_seq;
    let end = undo.end_from(from).await?;
    let strays = undo.strays(end).await?;
    if end == from && strays.is_empty() && state.consistent_lsn == state.applied_lsn {
        return Ok(report);
    }
    tracing::info!(
        "recovery: undoing undo segments {from}..{end} of {} to return {} from LSN {} to LSN {}",
        undo.describe(),
        replica.describe(),
        state.applied_lsn,
        state.consistent_lsn
    );
    if !strays.is_empty() {
        tracing::info!(
            "recovery: deleting undo segments {strays:?} of {} without writing them back: \
             a crash cut their batch's undo writes short, so it never reached the replica",
            undo.describe()
        );
    }
    let mut committed_bytes = 0u64;
    let mut committed_segments = 0u64;
    for seq in (from..end).rev() {
        let Some((segment, size)) = undo.read(seq).await? else {
            continue;
        };
        let key = paths::undo_segment_key(seq);
        let object = format!("{}/{key}", undo.describe());
        for record in &segment.records {
            if record.lsn <= state.consistent_lsn {
                return Err(ReplayError::UndoBeforeConsistent {
                    undo: undo.describe(),
                    key,
                    lsn: record.lsn,
                    consistent_lsn: state.consistent_lsn,
                });
            }
            check_record(&object, record, replica.size())?;
        }
        let target = replica.clone();
        let records = segment.records;
        let undone = records.len() as u64;
        blocking("undo", move || {
            records
                .iter()
                .rev()
                .try_for_each(|r| apply_op(target.as_ref(), r.lsn, &r.op))
        })
        .await?;
        report.undone_segments += 1;
        report.undone_records += undone;
        // Segments below the committed next seq were counted in the log's size.
        if seq < state.undo.next_seq {
            committed_bytes += size;
            committed_segments += 1;
        }
    }
    let target = replica.clone();
    blocking("fsync", move || sync(target.as_ref())).await?;

    if state.consistent_lsn < state.applied_lsn {
        state.applied_lsn = state.consistent_lsn;
        state.applied_timestamp_ns = state.consistent_timestamp_ns;
        state.next_seq = state.consistent_seq;
    }
    state.undo.next_seq = from;
    state.undo.bytes = state.undo.bytes.saturating_sub(committed_bytes);
    state.undo.segments = state.undo.segments.saturating_sub(committed_segments);
    state.updated_at_ns = now_ns;
    consumer::commit(journal, state).await?;
    for &seq in strays.iter().rev() {
        undo.delete(seq).await?;
        report.discarded_segments += 1;
    }
    for seq in (from..end).rev() {
        undo.delete(seq).await?;
    }
    report.to_lsn = state.applied_lsn;
    Ok(report)
}

/// Where [`wind_back`] takes a replica: what its state becomes and where the consumer goes on.
#[derive(Clone, Debug)]
pub struct WindTarget {
    /// Every record after this LSN is undone: the replica ends at the state of this LSN.
    pub lsn: u64,
    /// The timestamp of the record at `lsn`, when the caller knows it (else the undo log's
    /// record at `lsn` gives it, or the oldest record undone, an upper bound).
    pub timestamp_ns: Option<u64>,
    /// The journal segment the consumer reads next (where the chain goes on after `lsn`).
    pub resume_seq: u64,
    /// The lineage the replica's records follow now (what was applied): the undo log must
    /// hold a pre-image of every record of it after `lsn` up to the applied LSN.
    pub applied: Lineage,
    /// The chain epoch the position follows afterwards ([`ConsumerState::chain_epoch`]).
    pub chain_epoch: u64,
}

/// What [`wind_back`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindBackReport {
    /// Applied LSN before.
    pub from_lsn: u64,
    /// The LSN the replica is back at.
    pub to_lsn: u64,
    pub undone_records: u64,
    /// Undo segments written back (all but the oldest dropped afterwards).
    pub undone_segments: u64,
    /// Undo segments deleted: they held only records after `to_lsn`.
    pub dropped_segments: u64,
}

/// Why [`wind_back`] cannot reach a target (checked before the replica is touched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CannotWindBack {
    pub why: String,
}

/// Winds the replica of the consumer at `state` (its committed position, crash recovery
/// done, nothing in flight) back to `to.lsn` through its undo log: used when the epoch
/// chain forks below what the replica applied (an agent that followed a branch), and by
/// `promote --at` (a past point becomes the new chain's start).
///
/// 1. finds the undo segments holding records after `to.lsn` (index reads, newest first,
///    down to the one that also holds `to.lsn` or earlier, or the log's start) and checks
///    they hold every applied record after `to.lsn`; if not, returns [`CannotWindBack`]
///    having touched nothing;
/// 2. writes back every record after `to.lsn`, newest first, and fsyncs the replica;
/// 3. commits the position at `to.lsn` (applied and consistent), reading on at
///    `to.resume_seq`, with the undo log ending after the oldest segment kept;
/// 4. deletes the undo segments that held only later records, newest first.
///
/// Repeatable after a crash: before 3 the old position stands and a second run writes the
/// same pre-images back (the oldest of each byte wins); after 3, segments not yet deleted lie
/// past the committed undo position, where crash recovery undoes them (to the same bytes:
/// their records are all after `to.lsn`) and deletes them. The oldest segment, which also
/// holds records at or before `to.lsn`, is kept whole: its later records' pre-images give the
/// state at `to.lsn` again, which is what time travel going further back expects there.
pub async fn wind_back(
    journal: &dyn ObjectStore,
    undo: Option<&UndoLog>,
    replica: &Arc<dyn ReplicaTarget>,
    state: &mut ConsumerState,
    to: WindTarget,
    now_ns: u64,
) -> Result<Result<WindBackReport, CannotWindBack>, ReplayError> {
    let mut report = WindBackReport {
        from_lsn: state.applied_lsn,
        to_lsn: to.lsn,
        ..Default::default()
    };
    // The oldest applied record that has to go.
    let need = to
        .applied
        .next_at_or_after(to.lsn + 1)
        .filter(|&lsn| lsn <= state.applied_lsn);
    let mut seqs = Vec::new();
    let mut kept = None;
    let mut dropped_bytes = 0u64;
    if let Some(need) = need {
        let Some(undo) = undo else {
            return Ok(Err(CannotWindBack {
                why: "it keeps no undo log".into(),
            }));
        };
        let start = consumer::load_trim_pointer(undo.store().as_ref())
            .await?
            .first_seq;
        let mut oldest = None;
        let mut seq = state.undo.next_seq;
        while seq > start {
            seq -= 1;
            let Some(index) = undo.index(seq).await? else {
                break;
            };
            let first = index.entries.first().map_or(u64::MAX, |e| e.lsn);
            oldest = Some(first);
            if first <= to.lsn {
                kept = Some(seq);
                break;
            }
            seqs.push(seq);
        }
        if kept.is_none() && oldest.is_none_or(|first| first > need) {
            return Ok(Err(CannotWindBack {
                why: match oldest {
                    Some(first) => format!(
                        "its undo log {} reaches back only to LSN {first}, not {need}",
                        undo.describe()
                    ),
                    None => format!("its undo log {} holds no records", undo.describe()),
                },
            }));
        }
        let mut timestamp = None;
        for &seq in seqs.iter().chain(kept.iter()) {
            let Some((segment, size)) = undo.read(seq).await? else {
                return Ok(Err(CannotWindBack {
                    why: format!("undo segment {seq} of {} vanished", undo.describe()),
                }));
            };
            let object = format!("{}/{}", undo.describe(), paths::undo_segment_key(seq));
            let records: Vec<_> = segment
                .records
                .into_iter()
                .filter(|r| {
                    if r.lsn == to.lsn {
                        timestamp = Some(r.timestamp_ns);
                    }
                    r.lsn > to.lsn
                })
                .collect();
            for record in &records {
                check_record(&object, record, replica.size())?;
            }
            if let Some(r) = records.first() {
                timestamp.get_or_insert(r.timestamp_ns);
            }
            if Some(seq) != kept && seq < state.undo.next_seq {
                dropped_bytes += size;
            }
            let target = replica.clone();
            report.undone_records += records.len() as u64;
            report.undone_segments += 1;
            blocking("wind back", move || {
                records
                    .iter()
                    .rev()
                    .try_for_each(|r| apply_op(target.as_ref(), r.lsn, &r.op))
            })
            .await?;
        }
        let target = replica.clone();
        blocking("fsync", move || sync(target.as_ref())).await?;
        state.applied_timestamp_ns = to.timestamp_ns.or(timestamp).unwrap_or(0);
    } else if let Some(ts) = to.timestamp_ns {
        state.applied_timestamp_ns = ts;
    }
    // Nothing applied after the target is left: the position is the target.
    state.applied_lsn = state.applied_lsn.min(to.lsn);
    let dropped = seqs;
    if let Some(&lowest) = dropped.last() {
        state.undo.next_seq = lowest;
    }
    state.undo.segments = state.undo.segments.saturating_sub(dropped.len() as u64);
    state.undo.bytes = state.undo.bytes.saturating_sub(dropped_bytes);
    state.undo.consistent_seq = state.undo.next_seq;
    state.consistent_lsn = state.applied_lsn;
    state.consistent_timestamp_ns = state.applied_timestamp_ns;
    state.next_seq = to.resume_seq;
    state.consistent_seq = to.resume_seq;
    state.chain_epoch = to.chain_epoch;
    state.updated_at_ns = now_ns;
    consumer::commit(journal, state).await?;
    if let Some(undo) = undo {
        for &seq in &dropped {
            undo.delete(seq).await?;
            report.dropped_segments += 1;
        }
    }
    report.to_lsn = state.applied_lsn;
    Ok(Ok(report))
}

/// Runs replica work on the blocking pool.
pub(crate) async fn blocking<T, E>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ReplayError>
where
    T: Send + 'static,
    E: Into<ReplayError> + Send + 'static,
{
    crate::sync::blocking(
        move || work().map_err(Into::into),
        |e| ReplayError::Task {
            what,
            message: e.to_string(),
        },
    )
    .await
}
