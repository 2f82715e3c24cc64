//! The replay agent's fetcher: a task that reads the journal ahead of the applier through
//! [`ReadAhead`] (segment reads in flight doubling with each segment found, up to
//! [`READ_AHEAD`] while a backlog flows; one request per poll interval when idle, the
//! interval backing off as [`PollPolicy`] says), checks every record fits the replica, and
//! hands whole verified segments to the apply loop over a bounded channel. Each segment is
//! read once, with one GET (no HEAD first).
//!
//! A missing next segment is the end only at or above the journal's known end
//! (`journal::head`): `--once` checks that at its one end (and stops with the hole as its
//! error); a tailing agent checks it after every [`HOLE_CHECK_EVERY`] of idling at the same
//! seq, with one GET of the lease of the epoch it last read (no LIST), and while a hole
//! stands its status says `journal hole at seq N` and it waits, applying nothing past it.
//!
//! The first segment of an epoch later than any the agent knows carries that epoch's chain
//! entry (one GET of `chain/<epoch>`), which the agent follows before the segment's records.
//!
//! Must never: hand over a segment that failed verification, or a record outside the
//! replica; stop over a store outage (it retries at the idle pace); hold more than the
//! channel's and the read-ahead's segments in memory; take a hole for the end.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::control::wait_shutdown;
use crate::journal::chain::{self, ChainEntry};
use crate::journal::head::{self, KnownEnd};
use crate::journal::reader::{Cursor, JournalReader, ReadAhead, Step};
use crate::journal::record::Record;
use crate::journal::segment::{DecodedSegment, SegmentError};
use crate::journal::JournalError;

use super::apply::check_journal_record;
use super::error::ReplayError;
use super::status::StatusBoard;
use super::timing::{PollPolicy, Timer};
use crate::journal::layout::DeviceLayout;

/// A fetched segment not yet fully applied.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) seq: u64,
    pub(crate) epoch: u64,
    pub(crate) next_seq: u64,
    pub(crate) records: VecDeque<Record>,
    /// The chain entry of this segment's epoch, when it is the first segment of an epoch
    /// the agent did not know (cleared once followed).
    pub(crate) entry: Option<ChainEntry>,
}

/// Reads segments ahead of the applier.
pub(crate) struct Fetcher {
    pub(crate) reader: JournalReader,
    pub(crate) replica_size: u64,
    /// Where each device lives in the replica set: records are moved there on arrival.
    pub(crate) layout: DeviceLayout,
    /// `--once`: stop at this seq (the end found at start).
    pub(crate) end: Option<u64>,
    pub(crate) timer: Arc<dyn Timer>,
    pub(crate) poll: PollPolicy,
    pub(crate) board: Arc<StatusBoard>,
    pub(crate) tx: mpsc::Sender<Result<Pending, ReplayError>>,
    /// Set when the last request found no next segment (the agent has seen the head).
    pub(crate) at_head: Arc<AtomicBool>,
    /// Highest writer epoch of a segment passed on: a later segment of an older epoch is a
    /// fenced writer's late upload and is refused.
    pub(crate) epoch_seen: u64,
    /// The highest epoch whose chain entry the agent has (loaded at open or passed on).
    pub(crate) known_epoch: u64,
}

/// Segment reads in flight at once while data flows: one stream of GETs to S3 cannot keep
/// up with a writer that uploads W segments at once (measured on a local S3 server: 4 in
/// flight ~250 MB/s, 8 ~400 MB/s). When idle, one. Memory: this many segments, plus the
/// channel's.
const READ_AHEAD: usize = 8;

/// Idle time at one missing seq after which a tailing agent asks the lease whether that seq
/// is a hole: one GET, rare enough to add nothing to the idle request bill worth counting.
pub(crate) const HOLE_CHECK_EVERY: Duration = Duration::from_secs(60);

impl Fetcher {
    pub(crate) async fn run(mut self, mut cursor: Cursor, mut shutdown: watch::Receiver<bool>) {
        let mut idle = self.poll.min;
        // Time spent asking without finding a segment (the timer's time: tests move it).
        let mut idle_for = Duration::ZERO;
        // The committed position may sit inside its segment; later segments start exactly
        // where the previous one ended.
        let mut resuming = true;
        let mut ahead = ReadAhead::new(self.reader.clone(), self.end);
        let mut width = 1;
        // Idle time spent at `idle_at` since its last hole check.
        let (mut idle_at, mut since_hole_check) = (u64::MAX, Duration::ZERO);
        loop {
            if *shutdown.borrow() {
                return;
            }
            if self.end.is_some_and(|end| cursor.seq >= end) {
                self.check_once_end(cursor.seq).await;
                return;
            }
            let seq = cursor.seq;
            let step = tokio::select! {
                _ = wait_shutdown(&mut shutdown) => return,
                step = async {
                    if resuming {
                        self.reader.step_resuming(&mut cursor).await
                    } else {
                        ahead.step(&mut cursor, width).await
                    }
                } => step,
            };
            match step {
                Ok(Step::Segment(segment)) => {
                    resuming = false;
                    // Widen step by step: at the head, a full read-ahead would send
                    // READ_AHEAD GETs for one segment, all but one answered 404.
                    width = (width * 2).min(READ_AHEAD);
                    self.at_head.store(false, Ordering::Release);
                    idle = self.poll.min;
                    idle_for = Duration::ZERO;
                    let key = self.reader.manifest().segment_key(segment.header.seq);
                    let mut message = self.check(&key, segment);
                    if let Ok(pending) = &mut message {
                        match self.new_entry(pending.epoch).await {
                            Ok(entry) => pending.entry = entry,
                            Err(e) => message = Err(e),
                        }
                    }
                    let failed = message.is_err();
                    if self.tx.send(message).await.is_err() || failed {
                        return;
                    }
                }
                Ok(Step::NotYet) => {
                    if self.end.is_some() {
                        self.check_once_end(seq).await;
                        return;
                    }
                    if idle_at != seq {
                        (idle_at, since_hole_check) = (seq, Duration::ZERO);
                    }
                    if since_hole_check >= HOLE_CHECK_EVERY {
                        since_hole_check = Duration::ZERO;
                        self.check_hole(seq).await;
                    }
                    since_hole_check += idle;
                    width = 1;
                    self.at_head.store(true, Ordering::Release);
                    tokio::select! {
                        _ = wait_shutdown(&mut shutdown) => return,
                        _ = self.timer.sleep(idle) => {}
                    }
                    idle_for += idle;
                    idle = (idle * 2).min(self.poll.cap(idle_for));
                }
                Err(e) if is_store_trouble(&e) => {
                    // Transient trouble was already retried by the store; keep trying at the
                    // idle pace rather than stopping a DR replica over an outage.
                    tracing::warn!("reading segment {seq} failed, will retry: {e}");
                    self.board.warn(Some(e.to_string()));
                    tokio::select! {
                        _ = wait_shutdown(&mut shutdown) => return,
                        _ = self.timer.sleep(self.poll.max) => {}
                    }
                }
                Err(e) => {
                    let _ = self.tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    }

    /// `--once` stops at `seq`: unless that is a hole, whose error it passes on.
    async fn check_once_end(&self, seq: u64) {
        let store = self.reader.store().clone();
        let manifest = self.reader.manifest();
        if let Err(e) = head::check_end(store.as_ref(), manifest, seq).await {
            let _ = self.tx.send(Err(e.into())).await;
        }
    }

    /// A tailing agent idle at missing seq `seq`: is it a hole? One GET of the lease of the
    /// writer epoch last read (found from the previous segment's index once, after a
    /// restart). A hole goes into the status until the seq appears; a failed check is only
    /// logged (the next one comes).
    async fn check_hole(&mut self, seq: u64) {
        let store = self.reader.store().clone();
        if self.epoch_seen == 0 && seq > 0 {
            if let Ok(Some(index)) = self.reader.index(seq - 1).await {
                self.epoch_seen = index.header.epoch;
            }
        }
        let known = match head::known_end_from_lease(store.as_ref(), self.epoch_seen).await {
            Ok(end) => KnownEnd {
                seq: end,
                from: format!("writer epoch {}'s lease", self.epoch_seen),
            },
            Err(e) => {
                tracing::debug!("cannot read the lease to check for a hole at seq {seq}: {e}");
                return;
            }
        };
        let manifest = self.reader.manifest();
        if let Err(e) = head::check_missing(store.as_ref(), manifest, seq, &known).await {
            tracing::error!("{e}; waiting for the object to come back");
            self.board.journal_hole(seq, e.to_string());
        }
    }

    /// The chain entry of `epoch` if it is later than any known (one GET); a read that
    /// fails is an error (the agent cannot tell whether the records before were a branch).
    async fn new_entry(&mut self, epoch: u64) -> Result<Option<ChainEntry>, ReplayError> {
        if epoch <= self.known_epoch {
            return Ok(None);
        }
        let store = self.reader.store().clone();
        loop {
            match chain::read_entry(store.as_ref(), epoch).await {
                Ok(entry) => {
                    self.known_epoch = epoch;
                    return Ok(entry);
                }
                Err(e) if is_store_trouble(&e) => {
                    tracing::warn!(
                        "reading the chain entry of epoch {epoch} failed, will retry: {e}"
                    );
                    self.board.warn(Some(e.to_string()));
                    self.timer.sleep(self.poll.max).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks every record fits the replica; the segment was verified by the reader.
    fn check(&mut self, key: &str, segment: DecodedSegment) -> Result<Pending, ReplayError> {
        if segment.header.epoch < self.epoch_seen {
            return Err(JournalError::from(SegmentError::StaleEpoch {
                key: key.to_string(),
                epoch: segment.header.epoch,
                newer: self.epoch_seen,
            })
            .into());
        }
        self.epoch_seen = segment.header.epoch;
        let records = segment
            .records
            .into_iter()
            .map(|record| check_journal_record(key, record, &self.layout, self.replica_size))
            .collect::<Result<VecDeque<Record>, _>>()?;
        self.board.saw_segment(
            segment.header.next_seq,
            segment.header.last_lsn(),
            records.back().map(|r| r.timestamp_ns),
        );
        Ok(Pending {
            seq: segment.header.seq,
            epoch: segment.header.epoch,
            next_seq: segment.header.next_seq,
            records,
            entry: None,
        })
    }
}

/// Store failures (after the store's own retries), as opposed to bad content.
fn is_store_trouble(e: &JournalError) -> bool {
    matches!(
        e,
        JournalError::Store(_) | JournalError::Segment(SegmentError::Store(_))
    )
}
