//! The replay agent: follows the journal from its commit position, waits out the delay, and
//! applies records to the replica in batches, each made crash-safe by the undo log.
//!
//! Per batch, strictly in this order:
//! 1. read the pre-images of the batch's ranges from the replica ([`super::preimage`]) and
//!    write them as up to four undo segments, each written while the next part's pre-images
//!    are read (all durable when the last store call returns);
//! 2. apply the records in LSN order ([`super::apply`]);
//! 3. `fdatasync` the replica;
//! 4. commit the position (`consumers/<name>`), with the undo-log position beside it.
//!
//! Steps 3 and 4 happen at most every [`PollPolicy::commit_every`] (3 s): a batch applied
//! sooner after the last commit leaves them to the next commit (when due, at the stop, or
//! after `--once`), which fsyncs and covers every batch since. A catch-up thus costs one
//! PUT per few seconds, not one per batch; a crash meanwhile leaves more undo segments past
//! the commit, which recovery undoes as below.
//!
//! Steps 2 to 4 of a batch run in the background while the next batch does step 1: its
//! pre-images take the bytes this batch writes from this batch's overlay, never from the
//! replica, which may hold them half written (the next batch's own writes wait for these);
//! commits stay in order, and each follows the fsync of the writes it covers. A crash then
//! leaves undo segments of several batches past the commit, and recovery undoes them all,
//! newest first, which ends at the oldest pre-image of every byte: the committed state. A
//! batch's own segments are written at once, so a crash among those writes can leave a
//! later part without an earlier one; such a batch never reached the replica, and recovery
//! deletes those strays without writing them back (see [`super::recovery`]).
//!
//! A fetcher task ([`super::fetcher`]) reads ahead: it asks for the predicted key of the next
//! segment (no listing), decodes and verifies the whole segment (every CRC, the UUID, seq and
//! first LSN) and checks every record fits the replica, all before handing it over. While
//! data flows it asks again at once; when idle it backs off (see [`PollPolicy`]). A
//! store that is down is retried; a corrupt or foreign segment stops the agent before any of
//! its records is applied.
//!
//! Batches hold records that are due (`timestamp + delay <= now`), up to a record count and
//! a byte budget, and never start a resync span in the middle (a `RESYNC_BEGIN` opens a new
//! batch, so the undo segments of a span start with it). A record whose range exceeds the
//! piece size (a DISCARD of gigabytes) is applied alone, piece by piece, each piece with
//! its own undo segment, so memory stays bounded by a segment plus a batch.
//!
//! Must never: touch the replica before the batch's undo segment is durable; commit a
//! position before the replica is fsync'd; apply a record before its `timestamp + delay`;
//! apply anything from a segment that failed verification.
//!
//! This file holds the agent's state and its loop (waiting out the delay, handing batches
//! on); the jobs are in `agent/`: [`open`] (registering, adopting an image, the undo log),
//! [`batch`] (which records go together), [`pipeline`] (pre-images, undo segments, the
//! background writes, fsync and commit), [`big_record`] (a record applied piece by piece),
//! [`position`] (how the position moves, `VERIFY`s) and [`commit`] (when and how the
//! position is committed).

mod batch;
mod big_record;
mod chain;
mod commit;
mod open;
mod pipeline;
mod position;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::control::wait_shutdown;
use crate::journal::chain::{Chain, Lineage};
use crate::journal::consumer::ConsumerState;
use crate::journal::head::probe_end;
use crate::journal::reader::JournalReader;
use crate::journal::record::Record;

use super::apply::extent;
use super::error::ReplayError;
use super::fetcher::{Fetcher, Pending};
use super::overlay::Overlay;
use super::recovery::{recover, RecoveryReport};
use super::replica::ReplicaTarget;
use super::seed::SeedChoice;
use super::status::{AgentState, StatusBoard};
use super::timing::{PollPolicy, Timer};
use super::undo::UndoLog;

/// How long after `--until` an idle agent keeps waiting for records acknowledged before it
/// (they reach the journal within the writer's linger and upload time).
const UNTIL_GRACE: Duration = Duration::from_secs(5);
/// Bounds on the segments the fetcher holds decoded ahead of the applier: enough to fill
/// a batch (fewer, larger batches mean fewer fsyncs), never unbounded memory.
const PREFETCH_MIN: usize = 2;
const PREFETCH_MAX: usize = 16;

/// How big a batch may grow.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_records: usize,
    /// Payload bytes (WRITE data) and ranges changed (DISCARD, WRITE_ZEROES) per batch.
    pub max_bytes: u64,
    /// Records changing more than this are applied alone, in pieces of this size.
    pub piece_len: u64,
    /// A batch's pre-images are written as one undo segment per this many bytes (up to
    /// [`super::undo::STRAYS`] + 1), in parallel.
    pub undo_part: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_records: 8192,
            max_bytes: 32 << 20,
            piece_len: 16 << 20,
            undo_part: 4 << 20,
        }
    }
}

/// What an agent is asked to do.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Consumer name.
    pub name: String,
    /// The replica as shown to operators (its path).
    pub replica: String,
    pub delay: Duration,
    /// Stop once the next record is after this time (ns since the epoch).
    pub until_ns: Option<u64>,
    /// Apply what exists (and is due) now, then stop.
    pub once: bool,
    pub limits: BatchLimits,
    pub poll: PollPolicy,
    /// How a new consumer may adopt an existing replica image (ignored for a consumer that
    /// is already registered, and for a replica file created just now).
    pub seed: SeedChoice,
}

/// Why [`Agent::run`] returned without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `--once`: everything that existed and was due is applied.
    CaughtUp,
    /// `--until`: the next record is past the time.
    ReachedUntil,
    /// Shutdown was requested.
    Shutdown,
}

/// A record taken into a batch, with the journal seq to restart from once it is applied.
#[derive(Debug)]
struct Item {
    record: Record,
    next_seq_after: u64,
    /// Off the lineage: the position moves past it, the replica is not touched.
    skip: bool,
}

/// Bytes a record changes on the replica (its payload or its range).
fn weight(record: &Record) -> u64 {
    extent(&record.op).map_or(0, |(_, len)| len)
}

/// A batch being written to the replica in the background.
#[derive(Debug)]
struct Applying {
    handle: JoinHandle<Result<(), ReplayError>>,
    /// What the batch writes: the next batch's pre-images read these bytes from here.
    overlay: Arc<Overlay>,
}

/// A replay agent for one consumer and one replica.
#[derive(Debug)]
pub struct Agent {
    reader: JournalReader,
    undo: Option<UndoLog>,
    replica: Arc<dyn ReplicaTarget>,
    clock: Arc<dyn Clock>,
    timer: Arc<dyn Timer>,
    config: AgentConfig,
    board: Arc<StatusBoard>,
    /// The committed position, moved forward in memory as batches apply and committed at
    /// most every [`PollPolicy::commit_every`].
    pos: ConsumerState,
    /// The position has moved without being committed (past empty segments, or over
    /// batches whose commit was deferred by [`PollPolicy::commit_every`]).
    dirty: bool,
    /// Batches applied since the last commit whose writes have not been fsync'd (their
    /// commit was deferred): the next commit fsyncs first.
    unsynced: bool,
    /// The writes of the last batch to the replica, running while the next batch reads its
    /// pre-images (through that batch's overlay) and writes its undo segments.
    applying: Option<Applying>,
    /// The fsync and commit of the last batch, running while the next batch reads its
    /// pre-images and writes its undo segment.
    finishing: Option<JoinHandle<Result<(), ReplayError>>>,
    recovered: bool,
    pending: VecDeque<Pending>,
    /// An error from the fetcher, returned once everything fetched before it is applied.
    deferred: Option<ReplayError>,
    /// The loop stopped on the fetcher's error (a journal hole, a bad object), not on the
    /// replica's: what was applied before it is still committed.
    journal_stopped: bool,
    /// The epoch chain as known (loaded at open, extended by each new epoch's entry).
    chain: Chain,
    /// The LSNs the agent applies: the lineage of `pos.chain_epoch` (see `chain.rs`).
    lineage: Lineage,
}

#[cfg(test)]
impl Agent {
    /// The batches [`take_batch`](Self::take_batch) makes of `segments` handed over all at
    /// once, as (LSN, skip) per record: the batching rules, without the fetcher's timing
    /// deciding which segments are ready together.
    pub(crate) fn batches_of(&mut self, segments: Vec<Pending>) -> Vec<Vec<(u64, bool)>> {
        let (_, mut closed) = mpsc::channel(1);
        self.pending.extend(segments);
        let mut batches = Vec::new();
        loop {
            let batch = self.take_batch(&mut closed, u64::MAX);
            if batch.is_empty() {
                return batches;
            }
            batches.push(batch.iter().map(|i| (i.record.lsn, i.skip)).collect());
        }
    }
}

impl Agent {
    /// The status board the control socket reads.
    pub fn board(&self) -> Arc<StatusBoard> {
        self.board.clone()
    }

    /// The position as committed (or about to be).
    pub fn position(&self) -> &ConsumerState {
        &self.pos
    }

    /// Crash recovery (see [`super::recovery`]); [`run`](Self::run) does it first if not done.
    pub async fn recover(&mut self) -> Result<RecoveryReport, ReplayError> {
        self.board.set_state(AgentState::Recovering);
        let now = self.clock.now_ns();
        let report = recover(
            self.reader.store().as_ref(),
            self.undo.as_ref(),
            &self.replica,
            &mut self.pos,
            now,
        )
        .await?;
        // Back at a committed state: bring it onto the chain as it stands now.
        self.follow(None).await?;
        self.recovered = true;
        self.board.committed(&self.pos, 0, 0);
        self.board.recovered(report.clone());
        Ok(report)
    }

    /// Recovers, then applies records until `--once`/`--until` is satisfied, `shutdown`
    /// turns true, or an error stops it (reported on the status board too).
    pub async fn run(mut self, shutdown: watch::Receiver<bool>) -> Result<Outcome, ReplayError> {
        let board = self.board.clone();
        match self.run_inner(shutdown).await {
            Ok(outcome) => {
                board.set_state(AgentState::Stopped);
                Ok(outcome)
            }
            Err(e) => {
                board.failed(&e.to_string());
                Err(e)
            }
        }
    }

    async fn run_inner(
        &mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Outcome, ReplayError> {
        if !self.recovered {
            self.recover().await?;
        }
        loop {
            let cursor = self.resume_cursor();
            let end = if self.config.once {
                let store = self.reader.store().clone();
                Some(probe_end(store.as_ref(), self.reader.manifest(), cursor.seq).await?)
            } else {
                None
            };
            let segment = self.reader.manifest().segment_size.max(1);
            let prefetch = (self.config.limits.max_bytes.div_ceil(segment) as usize + 1)
                .clamp(PREFETCH_MIN, PREFETCH_MAX);
            let (tx, mut rx) = mpsc::channel(prefetch);
            let at_head = Arc::new(AtomicBool::new(false));
            let fetcher = Fetcher {
                reader: self.reader.clone(),
                replica_size: self.replica.size(),
                layout: self.reader.manifest().layout(),
                end,
                timer: self.timer.clone(),
                poll: self.config.poll,
                board: self.board.clone(),
                tx,
                at_head: at_head.clone(),
                epoch_seen: 0,
                known_epoch: self.chain.head_epoch(),
            };
            let fetch_task = tokio::spawn(fetcher.run(cursor, shutdown.clone()));
            let outcome = self.apply_loop(&mut rx, &mut shutdown, &at_head).await;
            fetch_task.abort();
            if let Ok(None) = outcome {
                // Wound back: what was fetched belongs to the old position.
                self.pending.clear();
                self.deferred = None;
                continue;
            }
            // Whatever stopped the loop, the last applied batch still gets its commit.
            let finished = self.drain().await;
            if outcome.is_err() && self.journal_stopped && finished.is_ok() && self.dirty {
                // The journal stopped the agent (a hole, a bad object), not the replica: every
                // batch the position covers is on the replica, so the position is committed
                // before the error goes out (trim and the next start see how far this
                // consumer got).
                if let Err(e) = self.commit(0, 0).await {
                    tracing::warn!("committing the position before stopping failed: {e}");
                }
            }
            let outcome = outcome?.expect("a rewind restarts the loop");
            finished?;
            if self.dirty {
                self.commit(0, 0).await?;
            }
            return Ok(outcome);
        }
    }

    /// Applies what the fetcher hands over; `None` when the replica was wound back (a fork
    /// below what it applied) and reading starts again from the new position.
    async fn apply_loop(
        &mut self,
        rx: &mut mpsc::Receiver<Result<Pending, ReplayError>>,
        shutdown: &mut watch::Receiver<bool>,
        at_head: &AtomicBool,
    ) -> Result<Option<Outcome>, ReplayError> {
        loop {
            if *shutdown.borrow() {
                return Ok(Some(Outcome::Shutdown));
            }
            if let Some(entry) = self.pending.front_mut().and_then(|p| p.entry.take()) {
                // The first segment of an epoch not seen before: everything before it is
                // applied; follow its chain entry before any of its records.
                self.drain().await?;
                if self.follow(Some(entry)).await? {
                    return Ok(None);
                }
            }
            self.skip_empty_segments();
            if self.pending.is_empty() {
                if let Some(e) = self.deferred.take() {
                    self.journal_stopped = true;
                    return Err(e);
                }
                self.drain().await?;
                if self.dirty && self.commit_due() {
                    self.commit(0, 0).await?;
                }
                if let Some(until) = self.config.until_ns {
                    let grace = until.saturating_add(UNTIL_GRACE.as_nanos() as u64);
                    if at_head.load(Ordering::Acquire) && self.clock.now_ns() > grace {
                        return Ok(Some(Outcome::ReachedUntil));
                    }
                }
                // Idle only once the fetcher found no next segment; between two segments of a
                // backlog the agent is still catching up.
                let state = if at_head.load(Ordering::Acquire) {
                    AgentState::Idle
                } else {
                    AgentState::CatchingUp
                };
                if self.board.state() != state {
                    self.board.set_state(state);
                }
                let received = tokio::select! {
                    _ = wait_shutdown(shutdown) => return Ok(Some(Outcome::Shutdown)),
                    r = rx.recv() => r,
                    // Wake up now and then to check `--until`.
                    _ = self.timer.sleep(Duration::from_secs(1)), if self.config.until_ns.is_some() => continue,
                    // Real time, not the timer: only a live process should look alive.
                    _ = tokio::time::sleep(self.until_idle_commit()) => {
                        self.commit_if_silent().await?;
                        continue;
                    }
                    // A deferred commit is made once it is due, data or not.
                    _ = tokio::time::sleep(self.until_commit_due()), if self.dirty => {
                        self.commit(0, 0).await?;
                        continue;
                    }
                };
                match received {
                    Some(Ok(p)) => self.pending.push_back(p),
                    Some(Err(e)) => {
                        self.journal_stopped = true;
                        return Err(e);
                    }
                    // The fetcher stops on its own in `--once` mode at the end, and on
                    // shutdown.
                    None if *shutdown.borrow() => return Ok(Some(Outcome::Shutdown)),
                    None => return Ok(Some(Outcome::CaughtUp)),
                }
                continue;
            }
            let Some(first) = self.pending.front().and_then(|p| p.records.front()) else {
                continue;
            };
            if self.config.until_ns.is_some_and(|u| first.timestamp_ns > u) {
                return Ok(Some(Outcome::ReachedUntil));
            }
            let due = first
                .timestamp_ns
                .saturating_add(self.config.delay.as_nanos() as u64);
            let now = self.clock.now_ns();
            if now < due {
                if self.config.once {
                    return Ok(Some(Outcome::CaughtUp));
                }
                self.drain().await?;
                if self.dirty && self.commit_due() {
                    self.commit(0, 0).await?;
                }
                self.commit_if_silent().await?;
                self.board.waiting_until(due);
                let wait = Duration::from_nanos(due - now).min(Duration::from_secs(1));
                tokio::select! {
                    _ = wait_shutdown(shutdown) => return Ok(Some(Outcome::Shutdown)),
                    _ = self.timer.sleep(wait) => {}
                }
                continue;
            }
            self.board.set_state(AgentState::CatchingUp);
            let items = self.take_batch(rx, now);
            let big = items.len() == 1 && weight(&items[0].record) > self.config.limits.piece_len;
            if big {
                let item = items.into_iter().next().expect("one item");
                self.drain().await?;
                self.apply_big(item).await?;
            } else {
                self.apply_batch(items).await?;
            }
        }
    }
}

/// Waits for a background task and passes its error on.
async fn join(
    handle: JoinHandle<Result<(), ReplayError>>,
    what: &'static str,
) -> Result<(), ReplayError> {
    handle.await.map_err(|e| ReplayError::Task {
        what,
        message: e.to_string(),
    })?
}
