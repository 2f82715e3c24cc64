//! The status snapshot of a primary daemon: what `tinylag status` shows and what the control
//! socket's `{"cmd":"status"}` returns as JSON.
//!
//! The JSON field names are part of the CLI contract (`tinylag status --json`): add fields,
//! never rename them.
//!
//! Must never: carry credentials (the journal is shown as its display name, which stores
//! build without secrets); hide a degraded mode (the text form prints a WARNING line for
//! every mode but `logging`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::lag_histogram::LagSummary;
use super::mode::Mode;
use crate::units::format_size;

/// A point-in-time view of a primary daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusSnapshot {
    /// Always `"primary"` for `tinylag serve`.
    pub role: String,
    pub mode: Mode,
    /// Why the mode is not `logging`, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode_reason: Option<String>,
    pub ack: AckStatus,
    /// The writer epoch (absent without a journal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Journal display name (absent with `--no-journal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal: Option<String>,
    pub primary: String,
    pub listen: String,
    pub export: String,
    pub device_size: u64,
    pub pool: PoolStatus,
    /// Last LSN assigned.
    pub head_lsn: u64,
    /// Last LSN in a durable segment (every LSN up to it is durable).
    pub durable_lsn: u64,
    pub lag: LagStatus,
    /// How long journaled records waited from acknowledgement to durability.
    pub durable_lag: LagSummary,
    pub segments_uploaded: u64,
    pub bytes_uploaded: u64,
    pub uploads_in_flight: u64,
    pub upload_errors: ErrorStatus,
    /// Records queued but never journaled (fenced, writer stopped, not drained).
    pub records_abandoned: u64,
    pub dirty: DirtyStatus,
    pub uptime_seconds: f64,
}

/// Acknowledgement policy, configured and in force now.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AckStatus {
    /// `async`, `journal` or `adaptive`.
    pub configured: String,
    /// The bound of `adaptive` as configured (`64.0 MiB`, `5s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_lag: Option<String>,
    /// What a write gets now: `async` or `journal`.
    pub effective: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub used: u64,
    pub cap: u64,
    pub peak: u64,
}

/// How far the journal is behind the primary.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LagStatus {
    pub records: u64,
    pub bytes: u64,
    pub seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorStatus {
    pub count: u64,
    /// The last upload error (object key and store message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
    /// How long uploads have been failing without a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_seconds: Option<f64>,
    /// Failing longer than the outage bound: `--ack journal` no longer waits.
    pub outage: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyStatus {
    pub regions: u64,
    pub bytes: u64,
    pub region_size: u64,
}

impl StatusSnapshot {
    /// The warning an operator must see for this mode, if any.
    pub fn warning(&self) -> Option<String> {
        let reason = self
            .mode_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        match self.mode {
            Mode::Logging => None,
            Mode::ForwardPart => Some(format!(
                "WARNING: mode forward-part{reason}: {} regions ({}) of the primary changed \
                 without being journaled; replicas are NOT consistent past the open RESYNC_BEGIN \
                 until a resync journals them. Check the journal store and the pool size.",
                self.dirty.regions,
                format_size(self.dirty.bytes)
            )),
            Mode::ForwardFull => Some(format!(
                "WARNING: mode forward-full{reason}: the journal does not reproduce the primary; \
                 replicas need a full resync before they can be trusted."
            )),
            Mode::ReverseFull => Some(
                "WARNING: mode reverse-full: the primary is being rebuilt from a replica.".into(),
            ),
            Mode::Fenced => Some(format!(
                "WARNING: mode fenced{reason}: another writer owns the journal; NOTHING written \
                 here is journaled any more ({} regions dirty). Stop this daemon, or find out \
                 which writer should own the journal.",
                self.dirty.regions
            )),
            Mode::NoJournal => Some(
                "WARNING: mode no-journal: this daemon journals nothing (--no-journal is for \
                 measurements only)."
                    .into(),
            ),
        }
    }

    /// The human form printed by `tinylag status`.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(w) = self.warning() {
            let _ = writeln!(out, "{w}\n");
        }
        let line = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "{k:<18} {v}");
        };
        line(&mut out, "role", self.role.clone());
        line(&mut out, "mode", self.mode.to_string());
        let ack = match &self.ack.max_lag {
            Some(lag) => format!(
                "{} (max lag {lag}), now {}",
                self.ack.configured, self.ack.effective
            ),
            None if self.ack.configured != self.ack.effective => {
                format!("{}, now {}", self.ack.configured, self.ack.effective)
            }
            None => self.ack.configured.clone(),
        };
        line(&mut out, "ack", ack);
        line(&mut out, "primary", self.primary.clone());
        line(
            &mut out,
            "device size",
            format!(
                "{} ({} bytes)",
                format_size(self.device_size),
                self.device_size
            ),
        );
        let export = if self.export.is_empty() {
            "(default)".to_string()
        } else {
            self.export.clone()
        };
        line(
            &mut out,
            "listen",
            format!("{} export {export}", self.listen),
        );
        let Some(journal) = &self.journal else {
            line(&mut out, "journal", "none (--no-journal)".into());
            line(&mut out, "uptime", secs(self.uptime_seconds));
            return out;
        };
        line(&mut out, "journal", journal.clone());
        if let Some(epoch) = self.epoch {
            line(&mut out, "writer epoch", epoch.to_string());
        }
        line(
            &mut out,
            "pool",
            format!(
                "{} of {} used (peak {})",
                format_size(self.pool.used),
                format_size(self.pool.cap),
                format_size(self.pool.peak)
            ),
        );
        line(
            &mut out,
            "LSN",
            format!("head {}, durable {}", self.head_lsn, self.durable_lsn),
        );
        line(
            &mut out,
            "lag",
            format!(
                "{} records, {}, {}",
                self.lag.records,
                format_size(self.lag.bytes),
                secs(self.lag.seconds)
            ),
        );
        if self.durable_lag.records > 0 {
            line(
                &mut out,
                "ack->durable",
                format!(
                    "p50 {}, p99 {}, max {} over {} records",
                    secs(self.durable_lag.p50_seconds),
                    secs(self.durable_lag.p99_seconds),
                    secs(self.durable_lag.max_seconds),
                    self.durable_lag.records
                ),
            );
        }
        line(
            &mut out,
            "uploaded",
            format!(
                "{} segments, {} ({} in flight)",
                self.segments_uploaded,
                format_size(self.bytes_uploaded),
                self.uploads_in_flight
            ),
        );
        let mut errors = self.upload_errors.count.to_string();
        if let Some(s) = self.upload_errors.failing_seconds {
            let _ = write!(errors, ", failing for {}", secs(s));
        }
        if self.upload_errors.outage {
            errors.push_str(" (OUTAGE: acknowledgements no longer wait for the journal)");
        }
        if let Some(last) = &self.upload_errors.last {
            let _ = write!(errors, "; last: {last}");
        }
        line(&mut out, "upload errors", errors);
        if self.records_abandoned > 0 {
            line(
                &mut out,
                "abandoned",
                format!("{} records will never be journaled", self.records_abandoned),
            );
        }
        line(
            &mut out,
            "dirty regions",
            format!(
                "{} ({} of {} regions)",
                self.dirty.regions,
                format_size(self.dirty.bytes),
                format_size(self.dirty.region_size)
            ),
        );
        line(&mut out, "uptime", secs(self.uptime_seconds));
        out
    }
}

/// Seconds in the one format every status uses ([`crate::units::format_elapsed`]).
fn secs(seconds: f64) -> String {
    crate::units::format_elapsed(std::time::Duration::from_secs_f64(seconds.max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(mode: Mode) -> StatusSnapshot {
        StatusSnapshot {
            role: "primary".into(),
            mode,
            mode_reason: None,
            ack: AckStatus {
                configured: "async".into(),
                max_lag: None,
                effective: "async".into(),
            },
            epoch: Some(3),
            journal: Some("s3://bucket/j".into()),
            primary: "/var/lib/disk.img".into(),
            listen: "unix:/var/lib/disk.img.sock".into(),
            export: String::new(),
            device_size: 1 << 30,
            pool: PoolStatus {
                used: 1 << 20,
                cap: 512 << 20,
                peak: 2 << 20,
            },
            head_lsn: 100,
            durable_lsn: 90,
            lag: LagStatus {
                records: 10,
                bytes: 1 << 20,
                seconds: 0.25,
            },
            durable_lag: LagSummary {
                records: 90,
                p50_seconds: 0.1,
                p99_seconds: 0.2,
                max_seconds: 0.25,
            },
            segments_uploaded: 7,
            bytes_uploaded: 7 << 20,
            uploads_in_flight: 1,
            upload_errors: ErrorStatus {
                count: 0,
                last: None,
                failing_seconds: None,
                outage: false,
            },
            records_abandoned: 0,
            dirty: DirtyStatus {
                regions: 0,
                bytes: 0,
                region_size: 4 << 20,
            },
            uptime_seconds: 12.0,
        }
    }

    #[test]
    fn logging_is_quiet_and_degraded_modes_are_loud() {
        let ok = sample(Mode::Logging).render_text();
        assert!(!ok.contains("WARNING"), "{ok}");
        assert!(ok.contains("head 100, durable 90"), "{ok}");
        let mut part = sample(Mode::ForwardPart);
        part.dirty.regions = 3;
        part.dirty.bytes = 12 << 20;
        let text = part.render_text();
        assert!(text.starts_with("WARNING: mode forward-part"), "{text}");
        assert!(text.contains("3 regions (12.0 MiB)"), "{text}");
        assert!(sample(Mode::Fenced)
            .render_text()
            .contains("another writer owns the journal"));
    }

    #[test]
    fn json_round_trips_with_stable_names() {
        let s = sample(Mode::ForwardPart);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["mode"], "forward-part");
        assert_eq!(json["lag"]["records"], 10);
        assert_eq!(json["dirty"]["regions"], 0);
        assert_eq!(json["pool"]["cap"], 512 << 20);
        let back: StatusSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
