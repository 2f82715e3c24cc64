//! Stopping the primary core: intake closes, the writer drains for a bounded time, the
//! primary is fsync'd, and the clean-stop marker is left only when everything reached the
//! journal.
//!
//! Must never: leave the clean-stop marker when a record is not durable, the primary's fsync
//! failed or the mode is not `logging` (the next start would trust a primary that differs
//! from the journal).

use std::time::Duration;

use serde::Serialize;

use super::{lock, PrimaryCore};
use crate::writer::mode::Mode;
use crate::writer::restart::{self, CleanMarker};

/// What [`PrimaryCore::shutdown`] managed.
#[derive(Clone, Debug, Serialize)]
pub struct ShutdownReport {
    pub mode: Mode,
    pub head_lsn: u64,
    pub durable_lsn: u64,
    /// Records acknowledged but not durable when the drain ended.
    pub undrained_records: u64,
    /// The writer finished within the drain timeout.
    pub drained: bool,
    /// The primary's final fsync failed with this.
    pub flush_error: Option<String>,
    /// A clean-stop marker was written (the next start may begin in `logging`).
    pub clean: bool,
}

impl PrimaryCore {
    /// Stops intake, lets the writer drain for at most `drain_timeout`, fsyncs the primary
    /// and, when everything reached the journal, leaves the clean-stop marker.
    pub async fn shutdown(&self, drain_timeout: Duration) -> ShutdownReport {
        let Some(j) = &self.journal else {
            let flush_error = self.device.flush().await.err().map(|e| e.to_string());
            return ShutdownReport {
                mode: self.mode(),
                head_lsn: 0,
                durable_lsn: 0,
                undrained_records: 0,
                drained: true,
                flush_error,
                clean: false,
            };
        };
        if let Some(done) = self.demoted() {
            // The demote drained, fsync'd and left the marker: nothing more to write.
            let flush_error = self.device.flush().await.err().map(|e| e.to_string());
            return ShutdownReport {
                mode: self.mode(),
                head_lsn: done.lsn,
                durable_lsn: done.lsn,
                undrained_records: 0,
                drained: true,
                flush_error,
                clean: true,
            };
        }
        for helper in lock(&j.helpers).drain(..) {
            helper.abort();
        }
        let head_lsn = j.intake.close();
        let task = lock(&j.task).take();
        let next_seq = match task {
            Some(mut task) => match tokio::time::timeout(drain_timeout, &mut task).await {
                Ok(Ok(next_seq)) => Some(next_seq),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the journal writer task failed");
                    None
                }
                Err(_) => {
                    task.abort();
                    None
                }
            },
            None => None,
        };
        let durable_lsn = j.progress.borrow().durable_lsn;
        let flush_error = self.device.flush().await.err().map(|e| e.to_string());
        let mode = self.mode();
        let mut clean = false;
        if let (Some(next_seq), Mode::Logging, None) = (next_seq, mode, &flush_error) {
            if durable_lsn == head_lsn {
                let marker = CleanMarker {
                    uuid: j.uuid,
                    epoch: j.epoch,
                    next_seq,
                    next_lsn: head_lsn + 1,
                };
                match restart::write_marker(&j.marker_path, &marker) {
                    Ok(()) => clean = true,
                    Err(e) => tracing::warn!(error = %e, "cannot leave the clean-stop marker"),
                }
            }
        }
        ShutdownReport {
            mode,
            head_lsn,
            durable_lsn,
            undrained_records: head_lsn.saturating_sub(durable_lsn),
            drained: next_seq.is_some(),
            flush_error,
            clean,
        }
    }
}
