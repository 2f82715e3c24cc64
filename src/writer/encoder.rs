//! Segment encoder: a dedicated thread that takes batches of records from the intake, pushes
//! them into a [`SegmentBuilder`] (compressing and checksumming: CPU work that must not sit
//! on the async I/O threads), and closes segments at `segment_size`, at `linger` after their
//! first record, or at once when journal-mode writers wait and an upload slot is free
//! (group commit). Closed segments go to the upload coordinator in `journal_writer`.
//!
//! Compression adapts, with the policy the replay agent uses for undo pre-images
//! ([`CompressProbe`]): a large payload is offered to zstd when a sample of it compresses, and
//! small payloads that keep not compressing are mostly stored raw. Data that compresses keeps
//! being compressed; data that does not stops costing the attempt.
//!
//! Must never: reorder records, skip an LSN, or drop a record without marking its range
//! dirty (when journaling has stopped).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::intake::Intake;
use super::pool::Permit;
use super::shared::{Pending, Shared, WriterStats};
use crate::journal::record::Op;
use crate::journal::segment::{BufferRecycler, CompressProbe, SegmentBuilder};
/// Room reserved past `segment_size` in a new segment buffer: the record that crosses the
/// target size and the index.
const SEGMENT_SLACK: usize = (1 << 20) + (256 << 10);

/// A closed segment not yet durable, as the coordinator tracks it.
#[derive(Debug)]
pub(super) struct Unsettled {
    pub last_lsn: u64,
    pub first_ts: u64,
    /// Acknowledgement timestamps of its records, for the ack→durable lag.
    pub timestamps: Vec<u64>,
    /// Held, never read: dropping it when the segment joins the durable prefix releases
    /// the pool bytes.
    pub _permit: Permit,
    /// What to mark dirty if the segment never becomes durable.
    pub ranges: Vec<Range<u64>>,
}

/// What the encoder sends the coordinator.
#[derive(Debug)]
pub(super) enum Encoded {
    Segment {
        seq: u64,
        bytes: Bytes,
        meta: Unsettled,
    },
    /// Intake closed and everything was sent; the next writer would write `next_seq`.
    End { next_seq: u64 },
}

/// The segment being filled.
struct Open {
    seq: u64,
    builder: SegmentBuilder,
    permit: Permit,
    first_ts: u64,
    timestamps: Vec<u64>,
    deadline: Instant,
    ranges: Vec<Range<u64>>,
}

/// The encoder's configuration and connections.
pub(super) struct Encoder {
    pub intake: Arc<Intake>,
    pub uuid: Uuid,
    pub epoch: u64,
    pub next_seq: u64,
    pub next_lsn: u64,
    pub segment_size: u64,
    pub linger: Duration,
    /// Offer payloads to zstd (adaptively); `false` stores everything raw.
    pub compress: bool,
    pub max_uploads: usize,
    pub stats: Arc<WriterStats>,
    pub shared: Shared,
    /// Set by the coordinator when journaling stops for good.
    pub stopped: Arc<AtomicBool>,
    pub out: mpsc::UnboundedSender<Encoded>,
}

/// The encoder's working state.
struct Run {
    cfg: Encoder,
    open: Option<Open>,
    /// Which payloads zstd gets (see the module documentation); unused with `compress` off.
    probe: CompressProbe,
    /// Buffers of uploaded segments, reused for the next ones: at most one idle buffer per
    /// upload slot is kept (a segment size each, outside the pool's cap).
    buffers: BufferRecycler,
}

impl Encoder {
    /// Starts the encoder thread.
    pub(super) fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tinylag-encoder".into())
            .spawn(move || {
                let shared = self.shared.clone();
                let stopped = self.stopped.clone();
                let stats = self.stats.clone();
                let run = Run {
                    buffers: BufferRecycler::new(self.max_uploads),
                    cfg: self,
                    open: None,
                    probe: CompressProbe::new(),
                };
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.run())).is_err() {
                    // A bug; journaling cannot go on, and the mode must say so.
                    stopped.store(true, Ordering::Release);
                    shared.mode.need_full(super::mode::FullReason::WriterFailed);
                    stats.set_stopped("the segment encoder thread panicked".into());
                }
            })
    }
}

impl Run {
    fn run(mut self) {
        loop {
            let deadline = self.open.as_ref().map(|o| o.deadline);
            let batch = self.cfg.intake.next_batch(deadline);
            for pending in batch.records {
                self.accept(pending);
            }
            if batch.closed {
                self.close_open();
                let _ = self.cfg.out.send(Encoded::End {
                    next_seq: self.cfg.next_seq,
                });
                return;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) || self.group_commit_due() {
                self.close_open();
            }
        }
    }

    /// Journal-mode writers wait and an upload could start now: lingering only adds latency.
    fn group_commit_due(&self) -> bool {
        let stats = &self.cfg.stats;
        stats.sync_waiters.load(Ordering::Acquire) > 0
            && (stats.uploads_in_flight.load(Ordering::Acquire)
                + stats.segments_waiting.load(Ordering::Acquire))
                < self.cfg.max_uploads as u64
    }

    fn accept(&mut self, pending: Pending) {
        let Pending { record, permit } = pending;
        if self.cfg.stopped.load(Ordering::Acquire) {
            self.abandon_open();
            if let Some(range) = record.op.range() {
                self.cfg.shared.dirty.mark(range);
            }
            self.cfg
                .stats
                .records_abandoned
                .fetch_add(1, Ordering::AcqRel);
            return;
        }
        if self.open.is_none() {
            let seq = self.cfg.next_seq;
            self.cfg.next_seq += 1;
            // The segment closes once it passes `segment_size`, usually by less than one
            // record: room for that and a 1 MiB record (and the index) avoids regrowth.
            let builder = SegmentBuilder::recycled(
                self.cfg.uuid,
                self.cfg.epoch,
                seq,
                self.cfg.next_lsn,
                &self.buffers,
                self.cfg.segment_size as usize + SEGMENT_SLACK,
            );
            self.open = Some(Open {
                seq,
                builder,
                permit: self.cfg.shared.pool.empty_permit(),
                first_ts: record.timestamp_ns,
                timestamps: Vec::new(),
                deadline: Instant::now() + self.cfg.linger,
                ranges: Vec::new(),
            });
            self.cfg
                .stats
                .open_first_ns
                .store(record.timestamp_ns, Ordering::Release);
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let data = match &record.op {
            Op::Write { data, .. } | Op::ResyncData { data, .. } => Some(&data[..]),
            _ => None,
        };
        // Control records' payloads (mark names, verify digests) are small or random.
        let offered = self.cfg.compress && data.is_some_and(|d| self.probe.offer(d));
        open.builder.set_compression(offered);
        match open.builder.push(&record) {
            Ok(()) => {
                open.permit.merge(permit);
                open.timestamps.push(record.timestamp_ns);
                if let Some(range) = record.op.range() {
                    open.ranges.push(range);
                }
                if let Some(d) = data.filter(|_| offered) {
                    let stored = open.builder.last_stored_len().unwrap_or(d.len());
                    self.probe.observe(d.len(), stored);
                }
                let full = open.builder.encoded_len() as u64 >= self.cfg.segment_size;
                self.cfg.next_lsn += 1;
                if full {
                    self.close_open();
                }
            }
            Err(e) => {
                if let Some(range) = record.op.range() {
                    self.cfg.shared.dirty.mark(range);
                }
                let reason = format!("record {} cannot be journaled: {e}", record.lsn);
                tracing::error!(%reason, "journaling stopped");
                self.cfg.stopped.store(true, Ordering::Release);
                self.cfg
                    .shared
                    .mode
                    .need_full(super::mode::FullReason::WriterFailed);
                self.cfg.stats.set_stopped(reason);
                self.abandon_open();
            }
        }
    }

    /// Drops the open segment, marking its ranges dirty.
    fn abandon_open(&mut self) {
        if let Some(open) = self.open.take() {
            self.cfg
                .stats
                .records_abandoned
                .fetch_add(open.builder.len() as u64, Ordering::AcqRel);
            for r in open.ranges {
                self.cfg.shared.dirty.mark(r);
            }
            self.cfg.stats.open_first_ns.store(0, Ordering::Release);
        }
    }

    fn close_open(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        self.cfg.stats.open_first_ns.store(0, Ordering::Release);
        if open.builder.is_empty() {
            // Only a refused first push leaves an empty builder; its seq was never used.
            self.cfg.next_seq = open.seq;
            return;
        }
        let last_lsn = open.builder.next_lsn() - 1;
        let bytes = open.builder.finish();
        self.cfg
            .stats
            .segments_waiting
            .fetch_add(1, Ordering::AcqRel);
        let sent = self.cfg.out.send(Encoded::Segment {
            seq: open.seq,
            bytes,
            meta: Unsettled {
                last_lsn,
                first_ts: open.first_ts,
                timestamps: open.timestamps,
                _permit: open.permit,
                ranges: open.ranges,
            },
        });
        if let Err(mpsc::error::SendError(Encoded::Segment { meta, .. })) = sent {
            // The coordinator is gone (aborted at the end of a drain): nothing more can
            // become durable.
            for r in meta.ranges {
                self.cfg.shared.dirty.mark(r);
            }
        }
    }
}
