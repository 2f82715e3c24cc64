//! How `tinylag status` prints a primary's status for a terminal (the JSON form is the serde
//! form of [`StatusSnapshot`]).
//!
//! Must never: print credentials, or hide a degraded mode (a WARNING line for every mode
//! but `logging`).

use std::fmt::Write as _;

use super::StatusSnapshot;
use crate::units::format_size;

impl StatusSnapshot {
    /// The human form printed by `tinylag status`.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(w) = &self.security_warning {
            let _ = writeln!(out, "{w}\n");
        }
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
        for d in &self.devices {
            line(
                &mut out,
                &format!("device {}", d.name),
                format!(
                    "{} at {} in the group: {} dirty regions ({}); {} writes, {} written, {} \
                     trims, {} write-zeroes since start",
                    format_size(d.size),
                    d.base,
                    d.dirty_regions,
                    format_size(d.dirty_bytes),
                    d.io.writes,
                    format_size(d.io.bytes_written),
                    d.io.trims,
                    d.io.write_zeroes
                ),
            );
        }
        let r = &self.resync;
        if r.running || r.regions_left > 0 {
            let eta = r
                .eta_seconds
                .map(|e| format!(", ETA {e:.0}s"))
                .unwrap_or_default();
            line(
                &mut out,
                "resync",
                format!(
                    "{} regions done ({}, {} read), {} left, pass {}, {}/s{eta}",
                    r.regions_done,
                    format_size(r.bytes_done),
                    format_size(r.bytes_read),
                    r.regions_left,
                    r.passes,
                    format_size(r.bytes_per_second as u64)
                ),
            );
        }
        if r.episodes_ended > 0 {
            line(
                &mut out,
                "resyncs done",
                format!(
                    "{} ({} regions since start)",
                    r.episodes_ended, r.lifetime_regions
                ),
            );
        }
        if let Some(al) = &self.activity_log {
            let mut v = format!(
                "{} regions active ({}), {} writes, file {} at {}",
                al.regions,
                format_size(al.bytes),
                al.writes,
                format_size(al.file_bytes),
                al.path
            );
            if al.broken {
                v.push_str(" (BROKEN: could not be written; a crash now means forward-full)");
            }
            line(&mut out, "activity log", v);
        }
        if let Some(start) = &self.start {
            line(&mut out, "started", start.to_string());
        }
        for t in &self.transitions {
            line(
                &mut out,
                "mode change",
                format!(
                    "{} {} -> {}: {}",
                    crate::clock::format_ns(t.at_ns),
                    t.from,
                    t.to,
                    t.cause
                ),
            );
        }
        line(
            &mut out,
            "served",
            format!(
                "{} reads ({}), {} writes ({}), {} flushes, {} trims, {} write-zeroes",
                self.io.reads,
                format_size(self.io.bytes_read),
                self.io.writes,
                format_size(self.io.bytes_written),
                self.io.flushes,
                self.io.trims,
                self.io.write_zeroes
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
