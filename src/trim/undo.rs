//! `undo trim`: deletes the oldest undo segments of a replay agent's undo log that the
//! time-travel window no longer needs, then moves the undo log's own `trim` pointer (the
//! start of the restorable window that `timeline`, `restore` and `mount` read).
//!
//! An undo segment `s` goes when its newest record is older than `now - retain` (going back
//! to any time at or after the cutoff only undoes records after it, which are all in later
//! segments) and `s` is below the consumer's committed `undo.consistent_seq` (crash recovery
//! writes back every undo segment from there on). The walk starts at the pointer and reads
//! one index per segment, so it costs O(segments deleted), like the journal's.
//!
//! The consumer's `undo.bytes` and `undo.segments` (what `journal info` shows) are the
//! agent's own key and are not rewritten here; they count what the agent wrote.
//!
//! Must never: see the module documentation of [`crate::trim`]; create an undo log where
//! there is none.

use crate::journal::consumer::{self, TrimPointer};
use crate::journal::error::JournalError;
use crate::journal::paths;
use std::sync::Arc;

use crate::journal::Manifest;
use crate::replayer::undo::read_manifest;
use crate::store::ObjectStore;

use super::read_ahead::ReadAhead;

use super::{finish_interrupted, Deleter, HeldBy, TrimError, TrimReport, TrimResult};

/// What `undo trim` is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct UndoTrimOptions {
    /// Keep every undo segment holding a record younger than this (ns): the window.
    pub retain_ns: u64,
    /// Report, change nothing.
    pub dry_run: bool,
    /// The current time (ns since the UNIX epoch).
    pub now_ns: u64,
}

/// Trims the undo log in `undo` of a consumer of the journal in `journal` (see the module
/// documentation).
pub async fn trim_undo(
    undo_arc: Arc<dyn ObjectStore>,
    journal: &dyn ObjectStore,
    opts: &UndoTrimOptions,
) -> TrimResult<TrimReport> {
    let undo = undo_arc.as_ref();
    let manifest = Manifest::load(journal).await?;
    let Some(log) = read_manifest(undo).await? else {
        return Err(TrimError::NoUndoLog {
            store: undo.describe(),
            key: paths::UNDO_MANIFEST.to_string(),
        });
    };
    if log.journal_uuid != manifest.uuid {
        return Err(TrimError::ForeignUndoLog {
            undo: undo.describe(),
            journal: journal.describe(),
            found: log.journal_uuid,
            expected: manifest.uuid,
        });
    }
    let state = match consumer::load(journal, &log.consumer).await {
        Ok(s) => s,
        Err(JournalError::UnknownConsumer { .. }) => {
            return Err(TrimError::UnregisteredConsumer {
                undo: undo.describe(),
                journal: journal.describe(),
                name: log.consumer,
            })
        }
        Err(e) => return Err(e.into()),
    };
    let limit = state.undo.consistent_seq.min(state.undo.next_seq);
    let cutoff = opts.now_ns.saturating_sub(opts.retain_ns);
    let before = consumer::load_trim_pointer(undo).await?;
    let key = paths::undo_segment_key;
    let leftovers = finish_interrupted(undo, &key, before.first_seq, limit, opts.dry_run).await?;
    let mut report = TrimReport::start(undo, opts.dry_run, before, leftovers);

    let mut reads = ReadAhead::new(
        undo_arc.clone(),
        manifest.uuid,
        Arc::new(paths::undo_segment_key),
        limit,
    );
    let (mut seq, mut lsn) = (before.first_seq, before.first_lsn);
    let mut deleter = Deleter::new(undo, &key, opts.dry_run, false, seq);
    let held_by = loop {
        if seq >= limit {
            break HeldBy::CrashRecovery {
                consumer: log.consumer.clone(),
                consistent_seq: limit,
            };
        }
        let Some(cur) = reads.get(seq).await? else {
            break HeldBy::Nothing { seq };
        };
        lsn = cur.header.first_lsn;
        report.first_live_timestamp_ns = cur.first_timestamp();
        deleter.advance(seq, lsn, false).await?;
        if let Some(newest) = cur.last_timestamp().filter(|&t| t >= cutoff) {
            break HeldBy::Retention {
                retain_ns: opts.retain_ns,
                cutoff_ns: cutoff,
                seq,
                newest_timestamp_ns: newest,
            };
        }
        report.deleted_segments += 1;
        report.deleted_bytes += cur.object_size;
        report.first_live_timestamp_ns = None;
        seq += 1;
        lsn = cur.header.end_lsn();
    };
    deleter.advance(seq, lsn, true).await?;
    deleter.finish().await?;
    report.after = TrimPointer {
        first_seq: seq,
        first_lsn: lsn,
    };
    report.held_by = held_by;
    Ok(report)
}
