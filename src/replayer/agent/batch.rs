//! Batching: which due records go together into the next batch (a record count and byte
//! budget, a `RESYNC_BEGIN` opens a batch, a `VERIFY` ends one, a big record goes alone).
//!
//! Records off the epoch chain's lineage (a branch a fork left) are marked `skip`: read and
//! verified like the rest, they move the position but are never applied, and they go in
//! batches of their own (a batch's undo records must be one contiguous LSN run).
//! A batch ends before the first segment of an epoch the agent has not seen (its chain
//! entry is followed first, see `chain.rs`).
//!
//! Must never: take a record before its `timestamp + delay`, or past `--until`; start a
//! resync span in the middle of a batch; apply a record off the lineage.

use tokio::sync::mpsc;

use crate::journal::record::RecordKind;

use super::{weight, Agent, Item};
use crate::replayer::error::ReplayError;
use crate::replayer::fetcher::Pending;

impl Agent {
    /// Pops fully consumed segments off the front, moving the position past them.
    pub(super) fn skip_empty_segments(&mut self) {
        while let Some(front) = self.pending.front() {
            if !front.records.is_empty() || front.entry.is_some() {
                break;
            }
            if self.pos.next_seq != front.next_seq {
                self.pos.next_seq = front.next_seq;
                if self.pos.consistent_lsn == self.pos.applied_lsn {
                    self.pos.consistent_seq = front.next_seq;
                }
                self.dirty = true;
            }
            self.pending.pop_front();
        }
    }

    /// Takes the next batch: due records in order, within the limits, never starting a
    /// resync span after other records, and a big record alone.
    pub(super) fn take_batch(
        &mut self,
        rx: &mut mpsc::Receiver<Result<Pending, ReplayError>>,
        now: u64,
    ) -> Vec<Item> {
        let limits = self.config.limits;
        let delay = self.config.delay.as_nanos() as u64;
        let mut in_span = self.pos.consistent_lsn < self.pos.applied_lsn;
        let mut items: Vec<Item> = Vec::new();
        let mut bytes = 0u64;
        loop {
            if self.pending.is_empty() && self.deferred.is_none() {
                // Extend the batch with segments already fetched, without waiting.
                match rx.try_recv() {
                    Ok(Ok(p)) => self.pending.push_back(p),
                    Ok(Err(e)) => self.deferred = Some(e),
                    Err(_) => {}
                }
            }
            let Some(front) = self.pending.front_mut() else {
                break;
            };
            if front.entry.is_some() {
                // A new epoch: its chain entry is followed before any of its records.
                break;
            }
            let Some(record) = front.records.front() else {
                self.pending.pop_front();
                continue;
            };
            let skip = !self.lineage.contains(record.lsn);
            let w = if skip { 0 } else { weight(record) };
            let due = record.timestamp_ns.saturating_add(delay) <= now;
            let past_until = self
                .config
                .until_ns
                .is_some_and(|u| record.timestamp_ns > u);
            let opens_span = !skip && record.kind() == RecordKind::ResyncBegin && !in_span;
            let full = items.len() >= limits.max_records
                || (!items.is_empty() && bytes + w > limits.max_bytes);
            let big = w > limits.piece_len;
            // Records off the lineage and records on it never share a batch: a batch's undo
            // records are one contiguous LSN run (the segment codec's rule), and records on
            // both sides of a skipped branch would not be (the CI run saw "pushed LSN 58,
            // expected 34" when a batch held the fork, the branch and the next epoch).
            let crosses_skip = items.last().is_some_and(|last: &Item| last.skip != skip);
            if !items.is_empty()
                && (!due || past_until || opens_span || full || big || crosses_skip)
            {
                break;
            }
            let record = front.records.pop_front().expect("checked above");
            let next_seq_after = if front.records.is_empty() {
                front.next_seq
            } else {
                front.seq
            };
            match record.kind() {
                _ if skip => {}
                RecordKind::ResyncBegin => in_span = true,
                RecordKind::ResyncEnd => in_span = false,
                _ => {}
            }
            bytes += w;
            // A VERIFY compares the replica as of its own LSN: it ends its batch, so the
            // batch's net effect is exactly the state it checks.
            let verify = !skip && record.kind() == RecordKind::Verify;
            items.push(Item {
                record,
                next_seq_after,
                skip,
            });
            if big || verify {
                break;
            }
        }
        items
    }
}
