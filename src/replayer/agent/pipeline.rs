//! The pre-image pipeline: a batch's pre-images are read (patched with the previous batch's
//! overlay while that batch is still being written) and made durable as undo segments; then
//! its writes, the replica's fsync and the commit run in the background, in order, while the
//! next batch reads its own pre-images.
//!
//! Must never: start a batch's writes before its undo segments are durable, or before the
//! previous batch's writes; commit a position before the fsync of the writes it covers.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::journal::record::{Record, RecordKind};

use super::commit::commit_retrying;
use super::{join, weight, Agent, Applying, Item};
use crate::replayer::apply::{apply_overlay, sync, ApplyError};
use crate::replayer::error::ReplayError;
use crate::replayer::overlay::Overlay;
use crate::replayer::preimage::capture_batch;
use crate::replayer::recovery::blocking;
use crate::replayer::status::Phase;
use crate::replayer::undo::{split_by, UndoLog, STRAYS};

impl Agent {
    /// Applies a batch: undo segment, records, fsync, commit.
    pub(super) async fn apply_batch(&mut self, items: Vec<Item>) -> Result<(), ReplayError> {
        if items.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = items
            .iter()
            .filter(|i| !i.skip)
            .map(|i| i.record.clone())
            .collect();
        if records.is_empty() {
            // Only records off the lineage: nothing to write, the position moves past them.
            for item in &items {
                self.pass_over(&item.record, item.next_seq_after);
            }
            return Ok(());
        }
        let bytes: u64 = records.iter().map(weight).sum();
        let count = records.len() as u64;
        // The previous batch may still be being written: its overlay stands in for the
        // replica's bytes it covers.
        let base = self.applying.as_ref().map(|a| a.overlay.clone());
        let overlay = if let Some(undo) = &self.undo {
            let undo = undo.clone();
            let (overlay, segments, size) = self.write_preimages(&undo, records, base).await?;
            self.pos.undo.next_seq += segments;
            self.pos.undo.bytes += size;
            self.pos.undo.segments += segments;
            overlay
        } else {
            let mut overlay = Overlay::new();
            for r in &records {
                overlay.record(r.lsn, &r.op);
            }
            overlay
        };
        // This batch's pre-images are durable; its writes go after the previous batch's.
        self.wait_applied().await?;
        let overlay = Arc::new(overlay);
        let (applied_tx, applied_rx) = oneshot::channel();
        let target = self.replica.clone();
        let board = self.board.clone();
        let writes = overlay.clone();
        let handle = tokio::spawn(async move {
            let started = Instant::now();
            let result = blocking("apply", move || apply_overlay(target.as_ref(), &writes)).await;
            board.spent(Phase::Apply, started.elapsed());
            let _ = applied_tx.send(result.is_ok());
            result
        });
        self.applying = Some(Applying { handle, overlay });
        for item in &items {
            if item.skip {
                self.pass_over(&item.record, item.next_seq_after);
            } else {
                self.advance(&item.record, item.next_seq_after);
            }
        }
        if let Some(last) = items
            .last()
            .filter(|i| !i.skip && i.record.kind() == RecordKind::Verify)
        {
            self.wait_applied().await?;
            self.verify(&last.record).await?;
        }
        self.finish_in_background(count, bytes, applied_rx);
        Ok(())
    }

    /// Waits until the last batch's writes are done (not yet durable).
    pub(super) async fn wait_applied(&mut self) -> Result<(), ReplayError> {
        match self.applying.take() {
            Some(applying) => join(applying.handle, "apply").await,
            None => Ok(()),
        }
    }

    /// Reads the pre-images of a batch and makes them durable as up to [`STRAYS`] + 1 undo
    /// segments from the current undo seq: the batch is cut into parts of about
    /// [`BatchLimits::undo_part`] bytes, and each part's segment is encoded and written while
    /// the next part's pre-images are read (consecutive parts whose pre-images hold less than
    /// that share one segment, so a batch over holes costs one). Returns the batch's overlay,
    /// the segments written and their bytes; all are durable when this returns.
    pub(super) async fn write_preimages(
        &self,
        undo: &UndoLog,
        records: Vec<Record>,
        base: Option<Arc<Overlay>>,
    ) -> Result<(Overlay, u64, u64), ReplayError> {
        let part = self.config.limits.undo_part.max(1) as u64;
        let total: u64 = records.iter().map(weight).sum();
        let parts = ((total / part) as usize + 1).min(STRAYS as usize + 1);
        let groups = split_by(records, parts, weight);
        let last = groups.len() - 1;
        let first_seq = self.pos.undo.next_seq;
        let mut next_seq = first_seq;
        let mut overlay = Overlay::new();
        let mut ready: Vec<Record> = Vec::new();
        let mut writes = Vec::new();
        for (i, group) in groups.into_iter().enumerate() {
            let target = self.replica.clone();
            let base = base.clone();
            let started = Instant::now();
            let (preimages, back) = blocking("read pre-images", move || {
                let mut overlay = overlay;
                capture_batch(target.as_ref(), &group, base.as_deref(), &mut overlay)
                    .map(|p| (p, overlay))
                    .map_err(|source| ApplyError::Io {
                        replica: target.describe(),
                        what: "read pre-image",
                        lsn: group.first().map_or(0, |r| r.lsn),
                        source,
                    })
            })
            .await?;
            self.board.spent(Phase::Preimage, started.elapsed());
            overlay = back;
            ready.extend(preimages);
            let payload: usize = ready.iter().map(|r| r.op.payload_len()).sum();
            if payload as u64 >= part || i == last {
                let log = undo.clone();
                let seq = next_seq;
                next_seq += 1;
                let records = std::mem::take(&mut ready);
                writes.push(tokio::spawn(async move { log.write(seq, records).await }));
            }
        }
        let started = Instant::now();
        let mut bytes = 0;
        let mut failure = None;
        for write in writes {
            match write.await {
                Ok(Ok(size)) => bytes += size,
                Ok(Err(e)) => {
                    failure.get_or_insert(ReplayError::from(e));
                }
                Err(e) => {
                    failure.get_or_insert(ReplayError::Task {
                        what: "undo segment write",
                        message: e.to_string(),
                    });
                }
            }
        }
        self.board.spent(Phase::Undo, started.elapsed());
        match failure {
            Some(e) => Err(e),
            None => Ok((overlay, next_seq - first_seq, bytes)),
        }
    }

    /// Starts the fsync of the replica and the commit of the current position, after the
    /// previous batch's (commits stay in order) and once `applied` says this batch's writes
    /// are done. The next batch may read pre-images and write its undo segment meanwhile; a
    /// commit still only ever follows the fsync of the writes it covers.
    pub(super) fn finish_in_background(
        &mut self,
        records: u64,
        bytes: u64,
        applied: oneshot::Receiver<bool>,
    ) {
        let previous = self.finishing.take();
        if !self.commit_due() {
            // Deferred: the next commit (when due, at the head, or at the stop) fsyncs and
            // covers this batch; until then a crash undoes it with the others past the
            // commit. Status shows the batch once its writes are on the replica.
            self.dirty = true;
            self.unsynced = true;
            let board = self.board.clone();
            let state = self.pos.clone();
            self.finishing = Some(tokio::spawn(async move {
                if let Some(previous) = previous {
                    join(previous, "fsync and commit").await?;
                }
                if !applied.await.unwrap_or(false) {
                    return Err(ReplayError::Task {
                        what: "apply",
                        message: "the batch's writes to the replica failed".into(),
                    });
                }
                board.committed(&state, records, bytes);
                Ok(())
            }));
            return;
        }
        self.dirty = false;
        self.unsynced = false;
        let replica = self.replica.clone();
        let store = self.reader.store().clone();
        let board = self.board.clone();
        self.pos.updated_at_ns = self.clock.now_ns();
        let state = self.pos.clone();
        self.finishing = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                join(previous, "fsync and commit").await?;
            }
            // A failed apply is reported by the agent, which waits for it; nothing to commit.
            if !applied.await.unwrap_or(false) {
                return Err(ReplayError::Task {
                    what: "fsync and commit",
                    message: "the batch's writes to the replica failed".into(),
                });
            }
            let started = Instant::now();
            blocking("fsync", move || sync(replica.as_ref())).await?;
            board.spent(Phase::Sync, started.elapsed());
            let started = Instant::now();
            commit_retrying(store.as_ref(), &state).await?;
            board.spent(Phase::Commit, started.elapsed());
            board.committed(&state, records, bytes);
            Ok(())
        }));
    }

    /// Waits for the background writes, fsync and commit, if any.
    pub(super) async fn drain(&mut self) -> Result<(), ReplayError> {
        let applied = self.wait_applied().await;
        let finished = match self.finishing.take() {
            Some(handle) => join(handle, "fsync and commit").await,
            None => Ok(()),
        };
        applied.and(finished)
    }
}
