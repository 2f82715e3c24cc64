//! Segment encoder: a dedicated thread that takes batches of records from the intake, pushes
//! them into a [`SegmentBuilder`] (compressing and checksumming: CPU work that must not sit
//! on the async I/O threads), and closes segments at `segment_size`, at `linger` after their
//! first record, or at once when journal-mode writers wait and an upload slot is free
//! (group commit). Closed segments go to the upload coordinator in `journal_writer`.
//!
//! Compression adapts: payloads are offered to zstd in windows of [`PROBE_WINDOW`]; when a
//! window's payloads together lost less than 1/8 of their bytes (the codec's own bar for one
//! payload), the next [`SKIP_RECORDS`] payloads are stored raw, then zstd is tried again. Data
//! that compresses keeps being compressed; data that does not, or barely (half of fio's 4 KiB
//! buffers shrink by 15 %: 8 % overall for ~5 µs of zstd per record), stops costing the
//! attempt.
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
use crate::journal::segment::SegmentBuilder;

/// Payload records per probe window: compression stays on while each window's payloads
/// shrink by 1/8 altogether.
pub const PROBE_WINDOW: u32 = 32;
/// Payload records stored raw before compression is tried again.
pub const SKIP_RECORDS: u32 = 1024;
/// Room reserved past `segment_size` in a new segment buffer: the record that crosses the
/// target size and the index.
const SEGMENT_SLACK: usize = (1 << 20) + (256 << 10);

/// A closed segment not yet durable, as the coordinator tracks it.
#[derive(Debug)]
pub struct Unsettled {
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
pub enum Encoded {
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

/// Adaptive compression state (see the module documentation).
#[derive(Debug, Default)]
struct Probe {
    /// Compression is allowed at all (`--compress auto`).
    allowed: bool,
    enabled: bool,
    /// Payloads observed in the current window, their bytes, and the bytes zstd saved.
    seen: u32,
    offered: u64,
    saved: u64,
    /// Payloads stored raw since compression was turned off.
    skipped: u32,
}

impl Probe {
    fn new(allowed: bool) -> Self {
        Probe {
            allowed,
            enabled: allowed,
            ..Probe::default()
        }
    }

    /// A payload of `len` bytes was stored in `stored` bytes (`stored == len` when raw).
    fn observe(&mut self, len: usize, stored: usize) {
        if !self.allowed {
            return;
        }
        if self.enabled {
            self.seen += 1;
            self.offered += len as u64;
            self.saved += len.saturating_sub(stored) as u64;
            if self.seen >= PROBE_WINDOW {
                if self.saved * 8 < self.offered {
                    self.enabled = false;
                    self.skipped = 0;
                }
                self.seen = 0;
                self.offered = 0;
                self.saved = 0;
            }
        } else {
            self.skipped += 1;
            if self.skipped >= SKIP_RECORDS {
                self.enabled = true;
            }
        }
    }
}

/// The encoder's configuration and connections.
pub struct Encoder {
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
    probe: Probe,
}

impl Encoder {
    /// Starts the encoder thread.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tinylag-encoder".into())
            .spawn(move || {
                let compress = self.compress;
                let shared = self.shared.clone();
                let stopped = self.stopped.clone();
                let stats = self.stats.clone();
                let run = Run {
                    cfg: self,
                    open: None,
                    probe: Probe::new(compress),
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
            let mut builder =
                SegmentBuilder::new(self.cfg.uuid, self.cfg.epoch, seq, self.cfg.next_lsn);
            builder.set_compression(self.probe.enabled);
            // The segment closes once it passes `segment_size`, usually by less than one
            // record: room for that and a 1 MiB record (and the index) avoids regrowth.
            builder.reserve(self.cfg.segment_size as usize + SEGMENT_SLACK);
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
        let was_enabled = self.probe.enabled;
        match open.builder.push(&record) {
            Ok(()) => {
                open.permit.merge(permit);
                open.timestamps.push(record.timestamp_ns);
                if let Some(range) = record.op.range() {
                    open.ranges.push(range);
                }
                let len = record.op.payload_len();
                if was_enabled && len >= 64 {
                    let stored = open.builder.last_stored_len().unwrap_or(len);
                    self.probe.observe(len, stored);
                } else if !was_enabled && len > 0 {
                    self.probe.observe(len, len);
                }
                if self.probe.enabled != was_enabled {
                    open.builder.set_compression(self.probe.enabled);
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

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = 4096;

    /// Feeds one window of payloads: `shrunk` of them stored in `stored` bytes, the rest raw.
    fn window(p: &mut Probe, shrunk: u32, stored: usize) {
        for i in 0..PROBE_WINDOW {
            p.observe(LEN, if i < shrunk { stored } else { LEN });
        }
    }

    #[test]
    fn compression_is_skipped_after_a_window_that_does_not_compress_and_probed_again() {
        let mut p = Probe::new(true);
        window(&mut p, 0, LEN);
        assert!(!p.enabled);
        for _ in 0..SKIP_RECORDS - 1 {
            p.observe(LEN, LEN);
        }
        assert!(!p.enabled, "still skipping");
        p.observe(LEN, LEN);
        assert!(p.enabled, "tried again after the skip");
    }

    #[test]
    fn compression_stays_on_while_a_window_saves_an_eighth_altogether() {
        let mut p = Probe::new(true);
        // Every payload shrinks by 1/8 exactly: kept.
        window(&mut p, PROBE_WINDOW, LEN - LEN / 8);
        assert!(p.enabled);
        // 5 payloads of 32 all zeroes (stored in ~20 bytes), the rest random: kept.
        window(&mut p, PROBE_WINDOW / 8 + 1, 20);
        assert!(p.enabled);
        // Undecided until the window ends.
        for _ in 0..PROBE_WINDOW - 1 {
            p.observe(LEN, LEN);
        }
        assert!(p.enabled);
        p.observe(LEN, LEN);
        assert!(!p.enabled);
    }

    /// Half the payloads saving 15 % (fio's 4 KiB buffers) is 7.5 % overall: not worth
    /// zstd's CPU; the old rule (32 misses in a row) never turned compression off for it.
    #[test]
    fn barely_compressible_data_turns_compression_off() {
        let mut p = Probe::new(true);
        for i in 0..PROBE_WINDOW {
            p.observe(LEN, if i % 2 == 0 { 3469 } else { LEN });
        }
        assert!(!p.enabled);
    }

    #[test]
    fn compress_off_never_turns_it_on() {
        let mut p = Probe::new(false);
        assert!(!p.enabled);
        for _ in 0..2 * SKIP_RECORDS {
            p.observe(LEN, LEN);
        }
        assert!(!p.enabled);
    }
}
