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

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::control::wait_shutdown;
use crate::journal::consumer::{self, ConsumerState, Seed, UndoPosition};
use crate::journal::head::probe_end;
use crate::journal::reader::{Cursor, JournalReader};
use crate::journal::record::{Op, Record, RecordKind};
use crate::journal::{JournalError, JournalResult};
use crate::store::ObjectStore;

use super::apply::{apply_op, apply_overlay, extent, sync, ApplyError};
use super::error::ReplayError;
use super::fetcher::{Fetcher, Pending};
use super::overlay::Overlay;
use super::preimage::{capture_batch, read_preimage};
use super::recovery::{blocking, recover, RecoveryReport};
use super::replica::ReplicaTarget;
use super::seed::{SeedChoice, SeedStamp};
use super::status::{AgentIdentity, AgentState, Phase, StatusBoard};
use super::timing::{PollPolicy, Timer};
use super::undo::{split_by, UndoLog, UndoManifest, STRAYS, UNDO_FORMAT_VERSION};

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
}

impl Agent {
    /// Registers (or finds) the consumer, checks it belongs to this replica, and opens the
    /// undo log (`undo_store`; `None` runs without one). `replica_created` says the replica
    /// file was created just now (blank).
    pub async fn open(
        reader: JournalReader,
        undo_store: Option<Arc<dyn ObjectStore>>,
        replica: Arc<dyn ReplicaTarget>,
        replica_created: bool,
        config: AgentConfig,
        clock: Arc<dyn Clock>,
        timer: Arc<dyn Timer>,
    ) -> Result<Agent, ReplayError> {
        let store = reader.store().clone();
        let manifest = reader.manifest().clone();
        let journal = store.describe();
        let now = clock.now_ns();
        let trim = consumer::load_trim_pointer(store.as_ref()).await?;
        let initial = ConsumerState {
            name: config.name.clone(),
            next_seq: trim.first_seq,
            applied_lsn: trim.first_lsn.saturating_sub(1),
            applied_timestamp_ns: 0,
            consistent_lsn: trim.first_lsn.saturating_sub(1),
            consistent_seq: trim.first_seq,
            consistent_timestamp_ns: 0,
            delay_ns: config.delay.as_nanos() as u64,
            replica: config.replica.clone(),
            registered_at_ns: now,
            updated_at_ns: now,
            undo: UndoPosition::default(),
            verify: Default::default(),
            seed: Seed::Blank,
        };
        // Refuse before registering: a new consumer on a trimmed journal would hold trim back
        // for a replica that can never be built.
        let existing = match consumer::load(store.as_ref(), &config.name).await {
            Ok(state) => Some(state),
            Err(JournalError::UnknownConsumer { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if existing.is_none() && replica_created && trim.first_lsn > 1 {
            return Err(ReplayError::JournalTrimmed {
                journal,
                first_lsn: trim.first_lsn,
            });
        }
        // A new consumer on an image it did not create adopts it only if something vouches
        // for it (see `crate::journal::seed`); also refused before registering.
        let initial = match (&existing, replica_created) {
            (None, false) => adopt(&reader, replica.as_ref(), &config, initial, trim).await?,
            _ => initial,
        };
        let mut pos = consumer::register(store.as_ref(), &initial).await?;
        let is_new = pos == initial;
        // A `journal trim` that listed the consumers before this registration may have moved
        // the pointer past where it starts (and be deleting those segments): start over.
        if is_new && consumer::load_trim_pointer(store.as_ref()).await? != trim {
            consumer::unregister(store.as_ref(), &config.name).await?;
            return Err(ReplayError::TrimmedWhileRegistering {
                journal,
                name: config.name.clone(),
            });
        }
        if pos.replica != config.replica {
            return Err(ReplayError::ConsumerOfOtherReplica {
                name: config.name.clone(),
                journal,
                registered: pos.replica.clone(),
                requested: config.replica.clone(),
            });
        }
        if replica_created && pos.applied_lsn > trim.first_lsn.saturating_sub(1) {
            return Err(ReplayError::ReplicaLost {
                replica: config.replica.clone(),
                name: config.name.clone(),
                applied_lsn: pos.applied_lsn,
            });
        }
        if is_new && !replica_created {
            match &pos.seed {
                Seed::Assumed { .. } => tracing::warn!(
                    consumer = %config.name,
                    replica = %config.replica,
                    "new consumer adopts an existing replica on the operator's word (--assume-seeded): nothing checks it holds the primary's state at LSN {}",
                    pos.applied_lsn
                ),
                seed => tracing::info!(
                    consumer = %config.name,
                    replica = %config.replica,
                    "new consumer adopts an existing replica at LSN {}: {seed}",
                    pos.applied_lsn
                ),
            }
            if matches!(config.seed, SeedChoice::Stamp(_)) {
                // Adopted: from here the agent changes the image, and the position says how
                // it was seeded.
                if let Some(path) = seed_stamp_image(&config.replica) {
                    SeedStamp::remove(&path);
                }
            }
        }
        pos.delay_ns = config.delay.as_nanos() as u64;
        let device_size = manifest.device_size(0).unwrap_or(0);
        let undo = match undo_store {
            None => None,
            Some(undo_store) => {
                let expected = UndoManifest {
                    format_version: UNDO_FORMAT_VERSION,
                    journal_uuid: manifest.uuid,
                    consumer: config.name.clone(),
                    replica: config.replica.clone(),
                    device_size,
                    created_ns: now,
                };
                let log = UndoLog::open_or_create(undo_store, &expected).await?;
                if is_new {
                    // An `undo trim` moves the log's start: count from its pointer.
                    let from = consumer::load_trim_pointer(log.store().as_ref())
                        .await?
                        .first_seq;
                    let segments = log.end_from(from).await? - from;
                    if segments > 0 {
                        return Err(ReplayError::StaleUndoLog {
                            undo: log.describe(),
                            name: config.name.clone(),
                            segments,
                        });
                    }
                }
                Some(log)
            }
        };
        let identity = AgentIdentity {
            name: config.name.clone(),
            journal,
            replica: config.replica.clone(),
            undo: undo.as_ref().map(|u| u.describe()),
            delay_ns: pos.delay_ns,
        };
        let board = Arc::new(StatusBoard::new(identity, reader.clone(), clock.clone()));
        board.committed(&pos, 0, 0);
        Ok(Agent {
            reader,
            undo,
            replica,
            clock,
            timer,
            config,
            board,
            pos,
            dirty: false,
            unsynced: false,
            applying: None,
            finishing: None,
            recovered: false,
            pending: VecDeque::new(),
            deferred: None,
            journal_stopped: false,
        })
    }

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
        let cursor = Cursor {
            seq: self.pos.next_seq,
            next_lsn: self.pos.applied_lsn + 1,
        };
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
            end,
            timer: self.timer.clone(),
            poll: self.config.poll,
            board: self.board.clone(),
            tx,
            at_head: at_head.clone(),
            epoch_seen: 0,
        };
        let fetch_task = tokio::spawn(fetcher.run(cursor, shutdown.clone()));
        let outcome = self.apply_loop(&mut rx, &mut shutdown, &at_head).await;
        fetch_task.abort();
        // Whatever stopped the loop, the last applied batch still gets its commit.
        let finished = self.drain().await;
        if outcome.is_err() && self.journal_stopped && finished.is_ok() && self.dirty {
            // The journal stopped the agent (a hole, a bad object), not the replica: every
            // batch the position covers is on the replica, so the position is committed before
            // the error goes out (trim and the next start see how far this consumer got).
            if let Err(e) = self.commit(0, 0).await {
                tracing::warn!("committing the position before stopping failed: {e}");
            }
        }
        let outcome = outcome?;
        finished?;
        if self.dirty {
            self.commit(0, 0).await?;
        }
        Ok(outcome)
    }

    async fn apply_loop(
        &mut self,
        rx: &mut mpsc::Receiver<Result<Pending, ReplayError>>,
        shutdown: &mut watch::Receiver<bool>,
        at_head: &AtomicBool,
    ) -> Result<Outcome, ReplayError> {
        loop {
            if *shutdown.borrow() {
                return Ok(Outcome::Shutdown);
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
                        return Ok(Outcome::ReachedUntil);
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
                    _ = wait_shutdown(shutdown) => return Ok(Outcome::Shutdown),
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
                    None if *shutdown.borrow() => return Ok(Outcome::Shutdown),
                    None => return Ok(Outcome::CaughtUp),
                }
                continue;
            }
            let Some(first) = self.pending.front().and_then(|p| p.records.front()) else {
                continue;
            };
            if self.config.until_ns.is_some_and(|u| first.timestamp_ns > u) {
                return Ok(Outcome::ReachedUntil);
            }
            let due = first
                .timestamp_ns
                .saturating_add(self.config.delay.as_nanos() as u64);
            let now = self.clock.now_ns();
            if now < due {
                if self.config.once {
                    return Ok(Outcome::CaughtUp);
                }
                self.drain().await?;
                if self.dirty && self.commit_due() {
                    self.commit(0, 0).await?;
                }
                self.commit_if_silent().await?;
                self.board.waiting_until(due);
                let wait = Duration::from_nanos(due - now).min(Duration::from_secs(1));
                tokio::select! {
                    _ = wait_shutdown(shutdown) => return Ok(Outcome::Shutdown),
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

    /// Pops fully consumed segments off the front, moving the position past them.
    fn skip_empty_segments(&mut self) {
        while let Some(front) = self.pending.front() {
            if !front.records.is_empty() {
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
    fn take_batch(
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
            let Some(record) = front.records.front() else {
                self.pending.pop_front();
                continue;
            };
            let w = weight(record);
            let due = record.timestamp_ns.saturating_add(delay) <= now;
            let past_until = self
                .config
                .until_ns
                .is_some_and(|u| record.timestamp_ns > u);
            let opens_span = record.kind() == RecordKind::ResyncBegin && !in_span;
            let full = items.len() >= limits.max_records
                || (!items.is_empty() && bytes + w > limits.max_bytes);
            let big = w > limits.piece_len;
            if !items.is_empty() && (!due || past_until || opens_span || full || big) {
                break;
            }
            let record = front.records.pop_front().expect("checked above");
            let next_seq_after = if front.records.is_empty() {
                front.next_seq
            } else {
                front.seq
            };
            match record.kind() {
                RecordKind::ResyncBegin => in_span = true,
                RecordKind::ResyncEnd => in_span = false,
                _ => {}
            }
            bytes += w;
            // A VERIFY compares the replica as of its own LSN: it ends its batch, so the
            // batch's net effect is exactly the state it checks.
            let verify = record.kind() == RecordKind::Verify;
            items.push(Item {
                record,
                next_seq_after,
            });
            if big || verify {
                break;
            }
        }
        items
    }

    /// Applies a batch: undo segment, records, fsync, commit.
    async fn apply_batch(&mut self, items: Vec<Item>) -> Result<(), ReplayError> {
        if items.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = items.iter().map(|i| i.record.clone()).collect();
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
            self.advance(&item.record, item.next_seq_after);
        }
        if let Some(last) = items
            .last()
            .filter(|i| i.record.kind() == RecordKind::Verify)
        {
            self.wait_applied().await?;
            self.verify(&last.record).await?;
        }
        self.finish_in_background(count, bytes, applied_rx);
        Ok(())
    }

    /// Waits until the last batch's writes are done (not yet durable).
    async fn wait_applied(&mut self) -> Result<(), ReplayError> {
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
    async fn write_preimages(
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
    fn finish_in_background(&mut self, records: u64, bytes: u64, applied: oneshot::Receiver<bool>) {
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
    async fn drain(&mut self) -> Result<(), ReplayError> {
        let applied = self.wait_applied().await;
        let finished = match self.finishing.take() {
            Some(handle) => join(handle, "fsync and commit").await,
            None => Ok(()),
        };
        applied.and(finished)
    }

    /// Applies one record too large for a batch, piece by piece, each piece's pre-image
    /// durable before the piece is applied; consecutive pieces that were holes share one
    /// undo record.
    async fn apply_big(&mut self, item: Item) -> Result<(), ReplayError> {
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
                    if let Some((rs, rn)) = zero_run.take() {
                        self.apply_piece(
                            &record,
                            rs,
                            rn,
                            Some(Op::WriteZeroes {
                                offset: rs,
                                len: rn,
                            }),
                        )
                        .await?;
                    }
                    self.apply_piece(&record, s, n, pre).await?;
                    at += n;
                }
                None => {
                    if let Some((rs, rn)) = zero_run.take() {
                        self.apply_piece(
                            &record,
                            rs,
                            rn,
                            Some(Op::WriteZeroes {
                                offset: rs,
                                len: rn,
                            }),
                        )
                        .await?;
                    }
                }
            }
        }
        let target = self.replica.clone();
        blocking("fsync", move || sync(target.as_ref())).await?;
        self.advance(&record, item.next_seq_after);
        self.commit(1, len).await
    }

    /// Writes the undo segment for `start..start + len` of `record` (if any), then applies
    /// that part of the record.
    async fn apply_piece(
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
                dev: record.dev,
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

    /// Compares the replica with a `VERIFY` record just applied (the last of its batch, so
    /// the replica is as of its LSN), unless inside an unfinished resync span.
    async fn verify(&mut self, record: &Record) -> Result<(), ReplayError> {
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
                    super::verify::region_matches(target.as_ref(), offset, len, &checksum).map_err(
                        |source| ApplyError::Io {
                            replica: target.describe(),
                            what: "read for verify",
                            lsn,
                            source,
                        },
                    )
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
        let (region_size, device_size) = self.layout();
        match matched {
            Some(true) => self
                .pos
                .seed
                .proven((offset, len), record.lsn, region_size, device_size),
            Some(false) => self
                .pos
                .seed
                .mismatched((offset, len), region_size, device_size),
            None => {}
        }
        self.dirty = true;
        Ok(())
    }

    /// The journal's region size and device size (what a seed check counts in).
    fn layout(&self) -> (u64, u64) {
        let manifest = self.reader.manifest();
        (manifest.region_size, manifest.device_size(0).unwrap_or(0))
    }

    /// Moves the in-memory position past `record` (applied and fsync'd).
    fn advance(&mut self, record: &Record, next_seq_after: u64) {
        // A record that rewrites whole regions leaves them equal to the primary's.
        let rewritten = match &record.op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                Some((*offset, data.len() as u64))
            }
            Op::WriteZeroes { offset, len } => Some((*offset, *len)),
            _ => None,
        };
        if let Some(range) = rewritten {
            let (region_size, device_size) = self.layout();
            self.pos
                .seed
                .proven(range, record.lsn, region_size, device_size);
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

    /// How long until [`commit_if_silent`](Self::commit_if_silent) has to commit.
    fn until_idle_commit(&self) -> Duration {
        let silent = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        self.config
            .poll
            .idle_commit
            .saturating_sub(Duration::from_nanos(silent))
    }

    /// Commits the position, unchanged, when the last commit is older than
    /// [`PollPolicy::idle_commit`]: the sign of life `journal trim --drop-consumer-after`
    /// reads.
    async fn commit_if_silent(&mut self) -> Result<(), ReplayError> {
        let silent = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        if silent >= self.config.poll.idle_commit.as_nanos() as u64 {
            self.commit(0, 0).await?;
        }
        Ok(())
    }

    /// Whether a moved position may be committed now: the last commit is at least
    /// [`PollPolicy::commit_every`] old.
    fn commit_due(&self) -> bool {
        self.until_commit_due().is_zero()
    }

    /// How long until a moved position may be committed.
    fn until_commit_due(&self) -> Duration {
        let since = self.clock.now_ns().saturating_sub(self.pos.updated_at_ns);
        self.config
            .poll
            .commit_every
            .saturating_sub(Duration::from_nanos(since))
    }

    /// Commits the in-memory position, after an fsync of the replica when batches applied
    /// since the last commit were not fsync'd.
    async fn commit(&mut self, records: u64, bytes: u64) -> Result<(), ReplayError> {
        self.drain().await?;
        if self.unsynced {
            let replica = self.replica.clone();
            let started = Instant::now();
            blocking("fsync", move || sync(replica.as_ref())).await?;
            self.board.spent(Phase::Sync, started.elapsed());
            self.unsynced = false;
        }
        self.pos.updated_at_ns = self.clock.now_ns();
        let started = Instant::now();
        commit_retrying(self.reader.store().as_ref(), &self.pos).await?;
        self.board.spent(Phase::Commit, started.elapsed());
        self.dirty = false;
        self.board.committed(&self.pos, records, bytes);
        Ok(())
    }
}

/// The image path a seed stamp sits beside, for a replica shown as a file path.
fn seed_stamp_image(replica: &str) -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(replica);
    path.is_absolute().then_some(path)
}

/// The initial position of a new consumer on an existing image, as `config.seed` vouches for
/// it, or the refusal naming the choices. `initial` starts at the journal's start (`trim`).
async fn adopt(
    reader: &JournalReader,
    replica: &dyn ReplicaTarget,
    config: &AgentConfig,
    mut initial: ConsumerState,
    trim: consumer::TrimPointer,
) -> Result<ConsumerState, ReplayError> {
    let journal = reader.store().describe();
    let manifest = reader.manifest();
    // A file without any data is the blank device, as the agent creates it (an agent killed
    // after creating its replica and before registering leaves one behind).
    let blank = || {
        replica
            .is_hole(0, replica.size())
            .map_err(|source| ApplyError::Io {
                replica: replica.describe(),
                what: "look for data in the replica",
                lsn: 0,
                source,
            })
    };
    match &config.seed {
        SeedChoice::Refuse if blank()? => {
            if trim.first_lsn > 1 {
                return Err(ReplayError::JournalTrimmed {
                    journal,
                    first_lsn: trim.first_lsn,
                });
            }
            Ok(initial)
        }
        SeedChoice::BrokenStamp(reason) => Err(ReplayError::BrokenStamp {
            reason: reason.clone(),
        }),
        SeedChoice::Refuse => Err(ReplayError::UnvouchedReplica {
            replica: config.replica.clone(),
            journal,
            name: config.name.clone(),
            lsn: initial.applied_lsn,
        }),
        SeedChoice::Assume => {
            initial.seed = Seed::Assumed {
                lsn: initial.applied_lsn,
            };
            Ok(initial)
        }
        SeedChoice::Check => {
            let regions = manifest
                .device_size(0)
                .unwrap_or(0)
                .div_ceil(manifest.region_size.max(1));
            initial.seed = Seed::checking(initial.applied_lsn, regions);
            Ok(initial)
        }
        SeedChoice::Stamp(stamp) => {
            if stamp.journal_uuid != manifest.uuid {
                return Err(ReplayError::StampOfOtherJournal {
                    replica: config.replica.clone(),
                    journal,
                    found: stamp.journal_uuid,
                    expected: manifest.uuid,
                });
            }
            let gone = || ReplayError::StampPointGone {
                replica: config.replica.clone(),
                journal: journal.clone(),
                lsn: stamp.lsn,
                seq: stamp.seq,
                first_lsn: trim.first_lsn,
            };
            if stamp.lsn + 1 < trim.first_lsn {
                return Err(gone());
            }
            // The segment holding the stamp's LSN (a consumer may start inside it); at the
            // journal's very start, the first live segment.
            let seq = if stamp.lsn + 1 == trim.first_lsn {
                trim.first_seq
            } else {
                let index = reader.index(stamp.seq).await?.ok_or_else(gone)?;
                let holds = index.header.first_lsn <= stamp.lsn
                    && index.entries.last().is_some_and(|e| e.lsn >= stamp.lsn);
                if !holds || stamp.seq < trim.first_seq {
                    return Err(gone());
                }
                stamp.seq
            };
            initial.next_seq = seq;
            initial.applied_lsn = stamp.lsn;
            initial.applied_timestamp_ns = stamp.timestamp_ns;
            initial.consistent_lsn = stamp.lsn;
            initial.consistent_seq = seq;
            initial.consistent_timestamp_ns = stamp.timestamp_ns;
            initial.seed = Seed::Restore {
                lsn: stamp.lsn,
                epoch: stamp.epoch,
            };
            Ok(initial)
        }
    }
}

/// Commits a position, retrying transient store errors until the store answers (a store
/// outage must not stop the agent: the position it commits is the same on every retry).
async fn commit_retrying(store: &dyn ObjectStore, state: &ConsumerState) -> JournalResult<()> {
    let mut delay = Duration::from_millis(100);
    loop {
        match consumer::commit(store, state).await {
            Err(JournalError::Store(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "committing the position failed; will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            other => return other,
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

/// The part `start..start + len` of a ranged operation.
fn sub_op(op: &Op, start: u64, len: u64) -> Op {
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
