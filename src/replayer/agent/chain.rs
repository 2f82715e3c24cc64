//! Following the epoch chain: the agent applies only records on the lineage (see
//! [`crate::journal::chain`]). It loads the chain at open and, at the first segment of an
//! epoch it has not seen, gets that epoch's entry (one GET, by the fetcher). When the new
//! lineage leaves out records the replica already holds (another site did `promote --at`
//! below what this agent applied: it followed what is now a branch), the replica is wound
//! back through the undo log to just before the first of them ([`wind_back`]), those undo
//! records are dropped, the position is committed there, and reading starts again where the
//! chain goes on. Without undo records reaching that far it stops before touching the
//! replica, and says to `rejoin`.
//!
//! Must never: apply a record off the lineage; touch the replica when the wind-back cannot
//! be completed; move `chain_epoch` past a fork whose cut records the replica still holds.

use crate::journal::chain::ChainEntry;
use crate::journal::consumer;
use crate::journal::head::probe_end;
use crate::journal::reader::Cursor;
use crate::replayer::error::ReplayError;
use crate::replayer::recovery::{wind_back, WindBackReport, WindTarget};
use crate::replayer::status::AgentState;

use super::Agent;

impl Agent {
    /// Takes `entry` (a new epoch's, or `None` at open) into the chain and brings the
    /// position onto the new lineage; true when the replica was wound back (reading
    /// restarts from the new position). Called with nothing in flight.
    pub(super) async fn follow(&mut self, entry: Option<ChainEntry>) -> Result<bool, ReplayError> {
        if let Some(entry) = entry {
            self.chain.entries.insert(entry.epoch, entry);
        }
        let head = self.chain.head_epoch();
        if head <= self.pos.chain_epoch {
            return Ok(false);
        }
        let applied = self.chain.lineage_to(self.pos.chain_epoch, u64::MAX);
        let lineage = self.chain.lineage();
        let Some(first_cut) = applied.first_difference(&lineage, self.pos.applied_lsn) else {
            // Nothing the replica holds is off the new lineage.
            self.lineage = lineage;
            self.pos.chain_epoch = head;
            self.dirty = true;
            return Ok(false);
        };
        let target = first_cut.saturating_sub(1);
        let (replica, journal) = (self.config.replica.clone(), self.reader.store().describe());
        let (name, applied_lsn) = (self.config.name.clone(), self.pos.applied_lsn);
        let cannot = move |why: String| ReplayError::CannotWindBack {
            replica,
            journal,
            name,
            applied_lsn,
            target_lsn: target,
            epoch: head,
            why,
        };
        // Where the chain goes on: the epoch whose first record is the lineage's next.
        let resume = lineage
            .next_at_or_after(target + 1)
            .and_then(|lsn| self.chain.entry_starting_at(lsn))
            .map(|e| e.first_seq)
            .ok_or_else(|| {
                format!("no epoch of the chain begins where its lineage goes on after LSN {target}")
            });
        let resume = match resume {
            Ok(seq) => seq,
            Err(why) => return Err(cannot(why)),
        };
        if self.pos.consistent_lsn < self.pos.applied_lsn && target > self.pos.consistent_lsn {
            return Err(ReplayError::ForkInsideSpan {
                replica: self.config.replica.clone(),
                target_lsn: target,
                consistent_lsn: self.pos.consistent_lsn,
            });
        }
        self.drain().await?;
        self.board.set_state(AgentState::Recovering);
        tracing::warn!(
            consumer = %self.config.name,
            replica = %self.config.replica,
            "the epoch chain forked at LSN {target} (epoch {head}): this replica applied records \
             up to LSN {} of what is now a branch; winding it back to LSN {target}",
            self.pos.applied_lsn
        );
        let now = self.clock.now_ns();
        let to = WindTarget {
            lsn: target,
            timestamp_ns: None,
            resume_seq: resume,
            applied,
            chain_epoch: head,
        };
        let store = self.reader.store().clone();
        let report = wind_back(
            store.as_ref(),
            self.undo.as_ref(),
            &self.replica,
            &mut self.pos,
            to,
            now,
        )
        .await?
        .map_err(|c| cannot(c.why))?;
        tracing::info!(
            consumer = %self.config.name,
            "wound back from LSN {} to LSN {}: {} records undone, {} undo segments dropped",
            report.from_lsn,
            report.to_lsn,
            report.undone_records,
            report.dropped_segments
        );
        self.lineage = lineage;
        self.dirty = false;
        self.unsynced = false;
        self.board.committed(&self.pos, 0, 0);
        Ok(true)
    }

    /// Where reading resumes: the record after the applied one, or, when that is off the
    /// lineage and the position already points at the epoch where the lineage goes on
    /// (after a wind-back), that epoch's first record.
    pub(super) fn resume_cursor(&self) -> Cursor {
        let mut next_lsn = self.pos.applied_lsn + 1;
        if !self.lineage.contains(next_lsn) {
            if let Some(entry) = self
                .lineage
                .next_at_or_after(next_lsn)
                .and_then(|lsn| self.chain.entry_starting_at(lsn))
                .filter(|e| e.first_seq == self.pos.next_seq)
            {
                next_lsn = entry.first_lsn;
            }
        }
        Cursor {
            seq: self.pos.next_seq,
            next_lsn,
        }
    }
}

impl Agent {
    /// Winds the replica back to `lsn` on its lineage (`promote --at`): crash recovery
    /// first, then every record after `lsn` undone through the undo log and its undo
    /// records dropped; the position is committed at `lsn`, reading on at the segment
    /// holding the next record. Refused, with nothing changed, when `lsn` is off the lineage,
    /// past what the replica applied, or beyond the undo log's reach.
    pub async fn wind_back_to(
        &mut self,
        lsn: u64,
        timestamp_ns: u64,
    ) -> Result<WindBackReport, ReplayError> {
        if !self.recovered {
            self.recover().await?;
        }
        let (replica, journal) = (self.config.replica.clone(), self.reader.store().describe());
        let (name, applied_lsn) = (self.config.name.clone(), self.pos.applied_lsn);
        let epoch = self.pos.chain_epoch;
        let cannot = move |why: String| ReplayError::CannotWindBack {
            replica,
            journal,
            name,
            applied_lsn,
            target_lsn: lsn,
            epoch,
            why,
        };
        if !self.lineage.contains(lsn) {
            return Err(cannot(
                "that LSN is not on the chain the replica follows".into(),
            ));
        }
        if lsn > self.pos.applied_lsn {
            return Err(cannot(format!(
                "the replica has applied only up to LSN {}",
                self.pos.applied_lsn
            )));
        }
        let store = self.reader.store().clone();
        let trim = consumer::load_trim_pointer(store.as_ref()).await?;
        let end = probe_end(store.as_ref(), self.reader.manifest(), trim.first_seq).await?;
        let resume = match self.reader.seek_lsn(trim.first_seq, end, lsn + 1).await? {
            Some((seq, _)) => seq,
            None => self.pos.next_seq,
        };
        let to = WindTarget {
            lsn,
            timestamp_ns: Some(timestamp_ns),
            resume_seq: resume,
            applied: self.lineage.clone(),
            chain_epoch: self.pos.chain_epoch,
        };
        let now = self.clock.now_ns();
        let report = wind_back(
            store.as_ref(),
            self.undo.as_ref(),
            &self.replica,
            &mut self.pos,
            to,
            now,
        )
        .await?;
        let report = match report {
            Ok(report) => report,
            Err(c) => return Err(cannot(c.why)),
        };
        self.board.committed(&self.pos, 0, 0);
        Ok(report)
    }
}
