//! How the in-memory position moves as records are applied: applied and consistent LSNs
//! (a resync span holds the consistent point back), the seed's proven regions, and the
//! `VERIFY` comparisons.
//!
//! Must never: move the consistent point inside an unfinished resync span.

use crate::journal::record::{Op, Record, RecordKind};

use super::Agent;
use crate::replayer::apply::ApplyError;
use crate::replayer::error::ReplayError;
use crate::replayer::recovery::blocking;

impl Agent {
    /// Compares the replica with a `VERIFY` record just applied (the last of its batch, so
    /// the replica is as of its LSN), unless inside an unfinished resync span.
    pub(super) async fn verify(&mut self, record: &Record) -> Result<(), ReplayError> {
        let Op::Verify {
            offset,
            len,
            checksum,
        } = record.op
        else {
            return Ok(());
        };
        let in_span = self.pos.consistent_lsn < self.pos.applied_lsn;
        let matched = if in_span {
            None
        } else {
            let target = self.replica.clone();
            let lsn = record.lsn;
            Some(
                blocking("verify", move || {
                    crate::replayer::verify::region_matches(target.as_ref(), offset, len, &checksum)
                        .map_err(|source| ApplyError::Io {
                            replica: target.describe(),
                            what: "read for verify",
                            lsn,
                            source,
                        })
                })
                .await?,
            )
        };
        if matched == Some(false) {
            tracing::warn!(
                lsn = record.lsn,
                offset,
                len,
                replica = %self.replica.describe(),
                "VERIFY mismatch: the replica's region differs from the primary's at this LSN"
            );
        }
        self.pos
            .verify
            .record(record.lsn, record.timestamp_ns, offset, len, matched);
        if matched.is_some() && !self.pos.seed.vouched() {
            let (region_size, device_end) = self.seed_bounds(offset);
            match matched {
                Some(true) => {
                    self.pos
                        .seed
                        .proven((offset, len), record.lsn, region_size, device_end)
                }
                _ => self
                    .pos
                    .seed
                    .mismatched((offset, len), region_size, device_end),
            }
        }
        self.dirty = true;
        Ok(())
    }

    /// What a seed check counts in for a change at group offset `offset`: the journal's
    /// region size, and the end of the device the change lies on (for one device, its size).
    /// A group's region ends there too: the padding after a device is never written, so a
    /// region of a device that is not a multiple of the region size is proven once its
    /// device's bytes are.
    pub(super) fn seed_bounds(&self, offset: u64) -> (u64, u64) {
        let manifest = self.reader.manifest();
        let layout = manifest.layout();
        let end = layout
            .device_at(offset)
            .map_or(layout.span(), |(_, d)| d.base + d.size);
        (manifest.region_size, end)
    }

    /// Moves the in-memory position past `record`, which is off the lineage and was not
    /// applied: the replica still holds the lineage's records up to the new applied LSN
    /// (see [`ConsumerState::chain_epoch`]); resync spans and seeds are not affected.
    ///
    /// [`ConsumerState::chain_epoch`]: crate::journal::consumer::ConsumerState::chain_epoch
    pub(super) fn pass_over(&mut self, record: &Record, next_seq_after: u64) {
        let pos = &mut self.pos;
        let in_span = pos.consistent_lsn < pos.applied_lsn;
        pos.applied_lsn = record.lsn;
        pos.applied_timestamp_ns = record.timestamp_ns;
        pos.next_seq = next_seq_after;
        if !in_span {
            pos.consistent_lsn = pos.applied_lsn;
            pos.consistent_timestamp_ns = pos.applied_timestamp_ns;
            pos.consistent_seq = pos.next_seq;
            pos.undo.consistent_seq = pos.undo.next_seq;
        }
        self.dirty = true;
    }

    /// Moves the in-memory position past `record` (applied and fsync'd).
    pub(super) fn advance(&mut self, record: &Record, next_seq_after: u64) {
        // A record that rewrites whole regions leaves them equal to the primary's.
        let rewritten = match &record.op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                Some((*offset, data.len() as u64))
            }
            Op::WriteZeroes { offset, len } => Some((*offset, *len)),
            _ => None,
        };
        // Only an unfinished check has regions to prove (the layout is not built per record).
        if let Some(range) = rewritten.filter(|_| !self.pos.seed.vouched()) {
            let (region_size, device_end) = self.seed_bounds(range.0);
            self.pos
                .seed
                .proven(range, record.lsn, region_size, device_end);
        }
        let pos = &mut self.pos;
        let in_span = pos.consistent_lsn < pos.applied_lsn;
        pos.applied_lsn = record.lsn;
        pos.applied_timestamp_ns = record.timestamp_ns;
        pos.next_seq = next_seq_after;
        let in_span = match record.kind() {
            RecordKind::ResyncBegin => true,
            RecordKind::ResyncEnd => false,
            _ => in_span,
        };
        if !in_span {
            pos.consistent_lsn = pos.applied_lsn;
            pos.consistent_timestamp_ns = pos.applied_timestamp_ns;
            pos.consistent_seq = pos.next_seq;
            pos.undo.consistent_seq = pos.undo.next_seq;
        }
    }
}
