//! `journal trim`: deletes the segments every consumer has committed and the retention no
//! longer needs, oldest first, walking forward from the `trim` pointer by predicted keys.
//!
//! What is deleted, segment by segment along the chain from the pointer (plugs followed):
//! a segment `s` goes when `s` is below every consumer's `trim_floor()`, its newest record
//! is older than `now - retain` (a plug or an empty segment holds none), and the segment
//! after it exists (the newest segment always stays). With no consumer registered only the
//! retention holds trim back: the journal keeps `retain` of history and its newest segment.
//! Seqs a plug jumps over (a dead writer's orphans) go with the plug. A branch
//! (`branches/<name>`) holds its first seq as a consumer holds its floor, until
//! `--drop-branch NAME` deletes its object first. Cost: one index read
//! (one ranged GET) per deleted segment plus one for the first kept, one `delete_many` per
//! [`DELETE_BATCH`](crate::store::counting::DELETE_BATCH) seqs, and a few metadata requests.
//!
//! Must never: see the module documentation of [`crate::trim`].

use crate::journal::chain;
use crate::journal::consumer::{self, ConsumerState};
use crate::journal::error::JournalError;
use crate::journal::head;
use std::sync::Arc;

use crate::journal::Manifest;
use crate::store::ObjectStore;

use super::read_ahead::ReadAhead;

use super::{
    finish_interrupted, lowest_holder, Deleter, DroppedConsumer, HeldBy, TrimError, TrimReport,
    TrimResult,
};

/// What `journal trim` is asked to do.
#[derive(Clone, Debug, Default)]
pub struct JournalTrimOptions {
    /// Keep every segment holding a record younger than this (ns).
    pub retain_ns: u64,
    /// Unregister consumers that have not committed for longer than this (ns).
    pub drop_consumer_after_ns: Option<u64>,
    /// Report, change nothing.
    pub dry_run: bool,
    /// The current time (ns since the UNIX epoch).
    pub now_ns: u64,
    /// Branches to delete first (`--drop-branch`): their segments go with this trim.
    pub drop_branches: Vec<String>,
}

/// Unregisters the consumers silent for longer than `after_ns` (re-reading each first, so
/// one that committed since the listing stays) and returns the others and the dropped.
async fn drop_silent(
    store: &dyn ObjectStore,
    consumers: Vec<ConsumerState>,
    after_ns: u64,
    opts: &JournalTrimOptions,
) -> TrimResult<(Vec<ConsumerState>, Vec<DroppedConsumer>)> {
    let cutoff = opts.now_ns.saturating_sub(after_ns);
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for listed in consumers {
        if listed.updated_at_ns >= cutoff {
            kept.push(listed);
            continue;
        }
        let state = match consumer::load(store, &listed.name).await {
            Ok(s) => s,
            Err(JournalError::UnknownConsumer { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if state.updated_at_ns >= cutoff {
            kept.push(state);
            continue;
        }
        tracing::warn!(
            "{}consumer {} of {}: silent since {} (longer than --drop-consumer-after), at applied LSN {}; it no longer holds trim back and its replica cannot follow this journal any more",
            if opts.dry_run { "would unregister " } else { "unregistering " },
            state.name,
            store.describe(),
            crate::clock::format_ns(state.updated_at_ns),
            state.applied_lsn
        );
        if !opts.dry_run {
            match consumer::unregister(store, &state.name).await {
                Ok(()) | Err(JournalError::UnknownConsumer { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        dropped.push(DroppedConsumer {
            name: state.name,
            updated_at_ns: state.updated_at_ns,
            next_seq: state.next_seq,
            applied_lsn: state.applied_lsn,
        });
    }
    Ok((kept, dropped))
}

/// Trims the journal in `store` (see the module documentation).
pub async fn trim_journal(
    store_arc: Arc<dyn ObjectStore>,
    manifest: &Manifest,
    opts: &JournalTrimOptions,
) -> TrimResult<TrimReport> {
    let store = store_arc.as_ref();
    let before = consumer::load_trim_pointer(store).await?;
    let mut branches = chain::list_branches(store).await?;
    let mut dropped_branches = Vec::new();
    // Every name is checked before anything changes.
    if let Some(name) = opts
        .drop_branches
        .iter()
        .find(|n| !branches.iter().any(|b| &b.name == *n))
    {
        return Err(TrimError::UnknownBranch {
            journal: store.describe(),
            name: name.clone(),
            known: branches.iter().map(|b| b.name.clone()).collect(),
        });
    }
    for name in &opts.drop_branches {
        let Some(at) = branches.iter().position(|b| &b.name == name) else {
            return Err(TrimError::UnknownBranch {
                journal: store.describe(),
                name: name.clone(),
                known: branches.iter().map(|b| b.name.clone()).collect(),
            });
        };
        let branch = branches.remove(at);
        tracing::warn!(
            "{} branch {} of {} (LSNs {}..={}, seqs {}..={})",
            if opts.dry_run {
                "would drop"
            } else {
                "dropping"
            },
            branch.name,
            store.describe(),
            branch.from_lsn,
            branch.to_lsn,
            branch.first_seq,
            branch.last_seq
        );
        if !opts.dry_run {
            chain::drop_branch(store, &branch.name).await?;
        }
        dropped_branches.push(branch.name);
    }
    let mut consumers = consumer::list(store).await?;
    let mut dropped_consumers = Vec::new();
    if let Some(after) = opts.drop_consumer_after_ns {
        (consumers, dropped_consumers) = drop_silent(store, consumers, after, opts).await?;
    }
    let slowest = lowest_holder(&consumers, &branches);
    let floor = slowest.as_ref().map_or(u64::MAX, |(floor, _)| *floor);
    let held_by_consumer = || {
        slowest
            .as_ref()
            .expect("a floor below u64::MAX comes from a consumer or a branch")
            .1
            .clone()
    };
    let cutoff = opts.now_ns.saturating_sub(opts.retain_ns);

    let key = |seq: u64| manifest.segment_key(seq);
    let leftovers = finish_interrupted(store, &key, before.first_seq, floor, opts.dry_run).await?;
    let mut report = TrimReport {
        dropped_consumers,
        dropped_branches,
        ..TrimReport::start(store, opts.dry_run, before, leftovers)
    };

    let keys = manifest.clone();
    let mut reads = ReadAhead::new(
        store_arc.clone(),
        manifest.uuid,
        Arc::new(move |seq| keys.segment_key(seq)),
        floor.saturating_add(1),
    );
    let mut seq = before.first_seq;
    let Some(mut cur) = reads.get(seq).await? else {
        // Nothing at the pointer: an empty journal, or a hole trim did not make.
        head::check_end(store, manifest, seq).await?;
        return Ok(report);
    };
    if cur.header.first_lsn != before.first_lsn {
        return Err(TrimError::BrokenChain {
            store: store.describe(),
            key: manifest.segment_key(seq),
            expected: before.first_lsn,
            found: cur.header.first_lsn,
        });
    }
    let mut deleter = Deleter::new(store, &key, opts.dry_run, true, seq);
    // What the walk passed since the last chunk was deleted: (seq, bytes, orphans).
    let mut chunk: Vec<(u64, u64, u64)> = Vec::new();
    let mut late = None;
    let mut held_by = loop {
        if let Some(c) = deleter.advance(seq, cur.header.first_lsn, false).await? {
            late = Some(c);
            break HeldBy::Head { seq };
        }
        if chunk
            .last()
            .is_some_and(|&(s, _, _)| s < deleter.chunk_from)
        {
            chunk.clear();
        }
        let next_seq = cur.header.next_seq;
        if seq >= floor || next_seq > floor {
            break held_by_consumer();
        }
        if let Some(newest) = cur.last_timestamp().filter(|&t| t >= cutoff) {
            break HeldBy::Retention {
                retain_ns: opts.retain_ns,
                cutoff_ns: cutoff,
                seq,
                newest_timestamp_ns: newest,
            };
        }
        let Some(next) = reads.get(next_seq).await? else {
            // The pointer never moves across a hole it did not make: a missing seq below
            // the journal's known end stops the trim with the hole as its error.
            head::check_end(store, manifest, next_seq).await?;
            break HeldBy::Head { seq };
        };
        if next.header.first_lsn != cur.header.end_lsn() {
            return Err(TrimError::BrokenChain {
                store: store.describe(),
                key: manifest.segment_key(next_seq),
                expected: cur.header.end_lsn(),
                found: next.header.first_lsn,
            });
        }
        let orphans = next_seq - seq - 1;
        chunk.push((seq, cur.object_size, orphans));
        report.deleted_segments += 1;
        report.deleted_bytes += cur.object_size;
        report.deleted_orphans += orphans;
        seq = next_seq;
        cur = next;
    };
    if late.is_none() {
        late = deleter.advance(seq, cur.header.first_lsn, true).await?;
    }
    if let Some((floor, holder)) = late {
        // The pointer stays where it moved to; the segments from the consumer's floor on stay
        // too (named in `trim.pending` until a later trim may delete them).
        for &(_, bytes, orphans) in chunk.iter().filter(|&&(s, _, _)| s >= floor) {
            report.deleted_segments -= 1;
            report.deleted_bytes -= bytes;
            report.deleted_orphans -= orphans;
        }
        held_by = holder;
    }
    deleter.finish().await?;
    report.after = consumer::TrimPointer {
        first_seq: seq,
        first_lsn: cur.header.first_lsn,
    };
    report.first_live_timestamp_ns = cur.first_timestamp();
    report.held_by = held_by;
    Ok(report)
}
