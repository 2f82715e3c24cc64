//! State the writer's parts share: the record on its way ([`Pending`]), the handles the I/O
//! path and the writer both hold ([`Shared`]) and the counters `status` reads
//! ([`WriterStats`]). It exists so that the intake, the encoder and the upload coordinator
//! depend on it rather than on each other.
//!
//! Must never: hold a lock across an await or while doing I/O (every critical section here
//! is a plain assignment).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::dirty::DirtyRegions;
use super::lag_histogram::LagHistogram;
use super::mode::ModeState;
use super::pool::{Permit, Pool, RECORD_OVERHEAD};
use crate::journal::layout::DeviceLayout;
use crate::journal::{Op, Record};

/// A record on its way to the journal, holding its pool bytes.
#[derive(Debug)]
pub(crate) struct Pending {
    pub record: Record,
    pub permit: Permit,
}

/// Counters the writer keeps for `status`. Everything is updated without locks held across
/// an await.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    pub segments_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub upload_errors: AtomicU64,
    pub uploads_in_flight: AtomicU64,
    /// Segments closed by the encoder and not yet uploading.
    pub segments_waiting: AtomicU64,
    /// Timestamp of the first record of the oldest closed segment not yet durable (0: none).
    pub pending_first_ns: AtomicU64,
    /// Timestamp of the first record of the segment being filled (0: none).
    pub open_first_ns: AtomicU64,
    /// Records that were queued but will never be journaled (fenced, writer stopped).
    pub records_abandoned: AtomicU64,
    /// `--ack journal` writers waiting now; while any wait, segments close early.
    pub sync_waiters: AtomicU64,
    /// The store has been failing for longer than the outage bound.
    pub outage: AtomicBool,
    /// Ack→durable lag of every journaled record.
    pub durable_lag: LagHistogram,
    last_error: Mutex<Option<String>>,
    failing_since: Mutex<Option<Instant>>,
    /// Why journaling stopped, if it did.
    stopped: Mutex<Option<String>>,
}

impl WriterStats {
    /// The last upload error message (object key and store message; never credentials).
    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// How long uploads have been failing without a success.
    pub(crate) fn failing_for(&self) -> Option<Duration> {
        lock(&self.failing_since).map(|t| t.elapsed())
    }

    /// Why journaling stopped, if it did.
    pub(crate) fn stopped_reason(&self) -> Option<String> {
        lock(&self.stopped).clone()
    }

    /// Records why journaling stopped (the first reason is kept).
    pub(crate) fn set_stopped(&self, reason: String) {
        lock(&self.stopped).get_or_insert(reason);
    }

    /// Timestamp of the oldest record not yet durable (0 when none). Records still queued in
    /// the intake are newer than the open segment's first, so they never change the answer
    /// while a segment is open.
    pub(crate) fn oldest_pending_ns(&self) -> u64 {
        match self.pending_first_ns.load(Ordering::Acquire) {
            0 => self.open_first_ns.load(Ordering::Acquire),
            t => t,
        }
    }

    pub(super) fn count_upload(&self, segment: &Bytes) {
        self.segments_uploaded.fetch_add(1, Ordering::AcqRel);
        self.bytes_uploaded
            .fetch_add(segment.len() as u64, Ordering::AcqRel);
    }

    /// Counts a failed attempt that started at `attempt_started`. The store's own retries
    /// may have hidden the failure for a while; the outage is counted from the start of the
    /// attempt, not from the report.
    pub(super) fn record_error(&self, message: String, attempt_started: Instant) {
        self.upload_errors.fetch_add(1, Ordering::AcqRel);
        *lock(&self.last_error) = Some(message);
        lock(&self.failing_since).get_or_insert(attempt_started);
    }
}

/// Uploads succeed again: the failure clock stops.
impl WriterStats {
    pub(super) fn clear_failing(&self) {
        *lock(&self.failing_since) = None;
    }
}

// Every critical section is a plain assignment; a poisoned lock still holds a value.
pub(super) use crate::sync::lock;

/// Shared state the writer task and the core both touch.
#[derive(Clone, Debug)]
pub(crate) struct Shared {
    pub mode: Arc<ModeState>,
    pub dirty: Arc<DirtyRegions>,
    pub pool: Pool,
}

/// The record of group-space `op` at `lsn`: its device and device-local offsets (see
/// `journal::layout`).
///
/// Callers pass only ops that lie on one device: the group device refuses a change that does
/// not before it reaches the primary, and region ranges are clipped to their device.
pub(super) fn device_record(layout: &DeviceLayout, lsn: u64, timestamp_ns: u64, op: Op) -> Record {
    let (dev, op) = if layout.is_single() {
        (0, op)
    } else {
        layout
            .localize(op)
            .expect("a journaled change lies on one device of the group")
    };
    Record {
        lsn,
        timestamp_ns,
        dev,
        op,
    }
}

/// Pool bytes one record is charged.
pub(super) fn record_cost(op: &Op) -> u64 {
    op.payload_len() as u64 + RECORD_OVERHEAD
}
