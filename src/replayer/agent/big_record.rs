//! Records too large for a batch (a DISCARD of gigabytes): applied alone, piece by piece,
//! each piece's pre-image durable before the piece is applied, so memory stays bounded.
//!
//! Must never: apply a piece before its undo record is durable.

use crate::journal::record::{Op, Record};

use super::{Agent, Item};
use crate::replayer::apply::{apply_op, extent, sync, ApplyError};
use crate::replayer::error::ReplayError;
use crate::replayer::overlay::Overlay;
use crate::replayer::preimage::read_preimage;
use crate::replayer::recovery::blocking;

impl Agent {
    /// Applies one record too large for a batch, piece by piece, each piece's pre-image
    /// durable before the piece is applied; consecutive pieces that were holes share one
    /// undo record.
    pub(super) async fn apply_big(&mut self, item: Item) -> Result<(), ReplayError> {
        let record = item.record.clone();
        let (offset, len) = extent(&record.op).unwrap_or((0, 0));
        let piece = self.config.limits.piece_len.max(1);
        // A run of pieces whose pre-image reads as zeroes, not yet written.
        let mut zero_run: Option<(u64, u64)> = None;
        let mut at = offset;
        let end = offset + len;
        while at < end || zero_run.is_some() {
            let next = if at < end {
                let n = piece.min(end - at);
                let pre = match &self.undo {
                    Some(_) => {
                        let target = self.replica.clone();
                        let lsn = record.lsn;
                        Some(
                            blocking("read pre-image", move || {
                                read_preimage(target.as_ref(), &Overlay::new(), at, n).map_err(
                                    |source| ApplyError::Io {
                                        replica: target.describe(),
                                        what: "read pre-image",
                                        lsn,
                                        source,
                                    },
                                )
                            })
                            .await?,
                        )
                    }
                    None => None,
                };
                Some((at, n, pre))
            } else {
                None
            };
            match next {
                Some((s, n, Some(Op::WriteZeroes { .. }))) => {
                    zero_run = Some(zero_run.map_or((s, n), |(rs, rn)| (rs, rn + n)));
                    at += n;
                    continue;
                }
                Some((s, n, pre)) => {
                    self.apply_zero_run(&record, zero_run.take()).await?;
                    self.apply_piece(&record, s, n, pre).await?;
                    at += n;
                }
                None => self.apply_zero_run(&record, zero_run.take()).await?,
            }
        }
        let target = self.replica.clone();
        blocking("fsync", move || sync(target.as_ref())).await?;
        self.advance(&record, item.next_seq_after);
        self.commit(1, len).await
    }

    /// Writes the undo segment for `start..start + len` of `record` (if any), then applies
    /// that part of the record.
    /// Applies a run of pieces whose pre-image was all zeroes as one piece (one undo record
    /// saying "zeroes" instead of one per piece); nothing when there is no run.
    async fn apply_zero_run(
        &mut self,
        record: &Record,
        run: Option<(u64, u64)>,
    ) -> Result<(), ReplayError> {
        let Some((start, len)) = run else {
            return Ok(());
        };
        let zeroes = Op::WriteZeroes { offset: start, len };
        self.apply_piece(record, start, len, Some(zeroes)).await
    }

    pub(super) async fn apply_piece(
        &mut self,
        record: &Record,
        start: u64,
        len: u64,
        preimage: Option<Op>,
    ) -> Result<(), ReplayError> {
        if let (Some(undo), Some(op)) = (&self.undo, preimage) {
            let undo_record = Record {
                lsn: record.lsn,
                timestamp_ns: record.timestamp_ns,
                // Pre-images are kept in the group's address space (see `apply`).
                dev: 0,
                op,
            };
            let size = undo
                .write(self.pos.undo.next_seq, vec![undo_record])
                .await?;
            self.pos.undo.next_seq += 1;
            self.pos.undo.bytes += size;
            self.pos.undo.segments += 1;
        }
        let op = sub_op(&record.op, start, len);
        let target = self.replica.clone();
        let lsn = record.lsn;
        blocking("apply", move || apply_op(target.as_ref(), lsn, &op)).await
    }
}

/// The part `start..start + len` of a ranged operation.
pub(super) fn sub_op(op: &Op, start: u64, len: u64) -> Op {
    match op {
        Op::Write { offset, data } => Op::Write {
            offset: start,
            data: data.slice((start - offset) as usize..(start - offset + len) as usize),
        },
        Op::ResyncData { offset, data } => Op::ResyncData {
            offset: start,
            data: data.slice((start - offset) as usize..(start - offset + len) as usize),
        },
        Op::Discard { .. } => Op::Discard { offset: start, len },
        Op::WriteZeroes { .. } => Op::WriteZeroes { offset: start, len },
        other => other.clone(),
    }
}
