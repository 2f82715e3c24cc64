//! The status snapshot of a primary daemon: what `tinylag status` shows and what the control
//! socket's `{"cmd":"status"}` returns as JSON.
//!
//! The JSON field names are part of the CLI contract (`tinylag status --json`): add fields,
//! never rename them. The text form is in `status/render.rs`.
//!
//! Must never: carry credentials (the journal is shown as its display name, which stores
//! build without secrets); hide a degraded mode (the text form prints a WARNING line for
//! every mode but `logging`).

use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};

use super::io_counts::{DeviceIoStatus, IoStatus};
use super::lag_histogram::{LagBuckets, LagSummary};
use super::mode::{AckMode, Mode, Transition};
use super::primary::{PrimaryCore, StartKind};
use super::resync::ResyncStatus;
use crate::journal::layout::DeviceLayout;
use crate::units::format_size;

mod render;

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
    /// A consistency group's devices, in index order, each with its share of `dirty` (absent
    /// for a one-device journal, whose status is as before groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceStatus>,
    /// Requests the primary served since start.
    #[serde(default)]
    pub io: IoStatus,
    pub uptime_seconds: f64,
    /// How this daemon started: `clean`, `activity-log` (with the regions it named) or
    /// `full` (with why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<serde_json::Value>,
    /// Every mode change since start, oldest first (the last 32), with its time and cause.
    #[serde(default)]
    pub transitions: Vec<Transition>,
    #[serde(default)]
    pub resync: ResyncStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_log: Option<ActivityLogStatus>,
    /// Set while the NBD server accepts plaintext clients from other hosts
    /// (`--insecure-no-tls`); `status` shows it first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_warning: Option<String>,
}

/// The activity log as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityLogStatus {
    pub path: String,
    /// Regions marked active now.
    pub regions: u64,
    /// Bytes those regions cover.
    pub bytes: u64,
    /// Size of the log file.
    pub file_bytes: u64,
    /// Log writes (each with an fsync) since start.
    pub writes: u64,
    /// The log could not be written and was abandoned (a crash now means forward-full).
    pub broken: bool,
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

/// One device of a consistency group as `status` shows it: its dirty regions (what a resync
/// of the group would move on it) and its changes since start (the group's `io` totals them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    pub size: u64,
    /// Where it starts in the group's address space (regions are numbered across the group).
    pub base: u64,
    pub dirty_regions: u64,
    /// Bytes of the device those regions cover (the padding after it is not counted).
    pub dirty_bytes: u64,
    /// Writes, trims, write-zeroes and bytes written to this device since the daemon started.
    #[serde(default)]
    pub io: DeviceIoStatus,
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
                "WARNING: mode fenced{reason}: another writer owns the journal (split brain if \
                 clients still write here); NOTHING written here is journaled any more ({} regions dirty). Stop this daemon, or find out \
                 which writer should own the journal.",
                self.dirty.regions
            )),
            Mode::Demoted => Some(
                "mode demoted: this writer's epoch ended with its DEMOTE record; writes are \
                 refused, reads are served until the daemon is stopped"
                    .into(),
            ),
            Mode::NoJournal => Some(
                "WARNING: mode no-journal: this daemon journals nothing (--no-journal is for \
                 measurements only)."
                    .into(),
            ),
        }
    }
}

impl PrimaryCore {
    /// The ack->durable lag histogram behind `durable_lag` (absent without a journal).
    pub fn durable_lag_buckets(&self) -> Option<LagBuckets> {
        self.journal.as_ref().map(|j| j.stats.durable_lag.buckets())
    }

    /// Each device of a group with its dirty regions; empty for one device.
    fn device_status(&self) -> Vec<DeviceStatus> {
        if self.layout.is_single() {
            return Vec::new();
        }
        let mut devices =
            device_shares(&self.layout, self.dirty.region_size(), self.dirty.regions());
        for (d, io) in devices.iter_mut().zip(self.io.devices()) {
            d.io = io;
        }
        devices
    }

    /// The status snapshot.
    pub fn status(&self) -> StatusSnapshot {
        let mode = self.mode();
        let mode_reason = match mode {
            Mode::ForwardFull => match self.journal.as_ref().map(|j| &j.start) {
                Some(StartKind::Full { reason }) => Some(reason.clone()),
                _ => self.mode.full_reason().map(|r| r.describe().to_string()),
            },
            Mode::Fenced => self.journal.as_ref().and_then(|j| j.stats.stopped_reason()),
            Mode::ForwardPart => Some(
                self.mode
                    .last_cause_of(Mode::ForwardPart)
                    .unwrap_or_else(|| "changes were left out of the journal".into()),
            ),
            _ => None,
        };
        let dirty = DirtyStatus {
            regions: self.dirty.count(),
            bytes: self.dirty.bytes(),
            region_size: self.dirty.region_size(),
        };
        let devices = self.device_status();
        let uptime_seconds = self.started.elapsed().as_secs_f64();
        let Some(j) = &self.journal else {
            return StatusSnapshot {
                role: "primary".into(),
                mode,
                mode_reason,
                ack: AckStatus {
                    configured: "async".into(),
                    max_lag: None,
                    effective: "async".into(),
                },
                epoch: None,
                journal: None,
                primary: self.labels.primary.clone(),
                listen: self.labels.listen.clone(),
                export: self.labels.export.clone(),
                device_size: self.info.size,
                pool: PoolStatus {
                    used: 0,
                    cap: 0,
                    peak: 0,
                },
                head_lsn: 0,
                durable_lsn: 0,
                lag: LagStatus {
                    records: 0,
                    bytes: 0,
                    seconds: 0.0,
                },
                durable_lag: LagSummary {
                    records: 0,
                    p50_seconds: 0.0,
                    p99_seconds: 0.0,
                    max_seconds: 0.0,
                },
                segments_uploaded: 0,
                bytes_uploaded: 0,
                uploads_in_flight: 0,
                upload_errors: ErrorStatus {
                    count: 0,
                    last: None,
                    failing_seconds: None,
                    outage: false,
                },
                records_abandoned: 0,
                dirty,
                devices,
                io: self.io.status(),
                uptime_seconds,
                security_warning: None,
                start: None,
                transitions: self.mode.transitions(),
                resync: ResyncStatus::default(),
                activity_log: None,
            };
        };
        let head_lsn = self.head_lsn();
        let durable_lsn = j.progress.borrow().durable_lsn.min(head_lsn);
        let outage = j.stats.outage.load(Ordering::Acquire);
        let waits = match j.ack {
            AckMode::Async => false,
            AckMode::Journal => true,
            AckMode::Adaptive(_) => j.adaptive_waits.load(Ordering::Acquire),
        };
        let stopped = j.progress.borrow().released_lsn == u64::MAX && !outage;
        let effective = if waits && !outage && !stopped {
            "journal"
        } else {
            "async"
        };
        let s = &j.stats;
        StatusSnapshot {
            role: "primary".into(),
            mode,
            mode_reason,
            ack: AckStatus {
                configured: j.ack.name().into(),
                max_lag: match j.ack {
                    AckMode::Adaptive(lag) => Some(lag.to_string()),
                    _ => None,
                },
                effective: effective.into(),
            },
            epoch: Some(j.epoch),
            journal: Some(j.store_name.clone()),
            primary: self.labels.primary.clone(),
            listen: self.labels.listen.clone(),
            export: self.labels.export.clone(),
            device_size: self.info.size,
            pool: PoolStatus {
                used: j.pool.used(),
                cap: j.pool.cap(),
                peak: j.pool.peak(),
            },
            head_lsn,
            durable_lsn,
            lag: LagStatus {
                records: head_lsn - durable_lsn,
                bytes: j.pool.used(),
                seconds: if head_lsn > durable_lsn {
                    self.lag_time(j).as_secs_f64()
                } else {
                    0.0
                },
            },
            durable_lag: s.durable_lag.summary(),
            segments_uploaded: s.segments_uploaded.load(Ordering::Acquire),
            bytes_uploaded: s.bytes_uploaded.load(Ordering::Acquire),
            uploads_in_flight: s.uploads_in_flight.load(Ordering::Acquire),
            upload_errors: ErrorStatus {
                count: s.upload_errors.load(Ordering::Acquire),
                last: s.last_error(),
                failing_seconds: s.failing_for().map(|d| d.as_secs_f64()),
                outage,
            },
            records_abandoned: s.records_abandoned.load(Ordering::Acquire),
            dirty,
            devices,
            io: self.io.status(),
            uptime_seconds,
            security_warning: None,
            start: serde_json::to_value(&j.start).ok(),
            transitions: self.mode.transitions(),
            resync: j.episodes.status(),
            activity_log: (!j.al.path().as_os_str().is_empty()).then(|| ActivityLogStatus {
                path: j.al.path().display().to_string(),
                regions: j.al.active(),
                bytes: j.al.active() * self.dirty.region_size(),
                file_bytes: j.al.file_size(),
                writes: j.al.writes(),
                broken: j.al.is_broken(),
            }),
        }
    }
}

/// Each device of `layout` with its share of the dirty `regions` (numbered across the group:
/// a region belongs to one device; bytes past a device's end are padding, not counted).
fn device_shares(layout: &DeviceLayout, region_size: u64, regions: Vec<u64>) -> Vec<DeviceStatus> {
    let region = region_size.max(1);
    let mut out: Vec<DeviceStatus> = layout
        .devices()
        .iter()
        .map(|d| DeviceStatus {
            name: d.name.clone(),
            size: d.size,
            base: d.base,
            dirty_regions: 0,
            dirty_bytes: 0,
            io: DeviceIoStatus::default(),
        })
        .collect();
    for r in regions {
        let start = r * region;
        if let Some((dev, placed)) = layout.device_at(start) {
            let d = &mut out[dev as usize];
            d.dirty_regions += 1;
            d.dirty_bytes += (start + region).min(placed.base + placed.size) - start;
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn each_device_gets_its_own_dirty_regions_without_the_padding() {
        use crate::journal::manifest::DeviceSpec;
        const MIB: u64 = 1 << 20;
        // wal: 6 MiB (regions 0-1, the second half padding), data: 10 MiB from 8 MiB.
        let layout = DeviceLayout::new(
            &[
                DeviceSpec {
                    name: "wal".into(),
                    size: 6 * MIB,
                },
                DeviceSpec {
                    name: "data".into(),
                    size: 10 * MIB,
                },
            ],
            4 * MIB,
        );
        let shares = device_shares(&layout, 4 * MIB, vec![1, 2, 4]);
        let got: Vec<(&str, u64, u64, u64)> = shares
            .iter()
            .map(|d| (d.name.as_str(), d.base, d.dirty_regions, d.dirty_bytes))
            .collect();
        assert_eq!(
            got,
            [
                ("wal", 0, 1, 2 * MIB),
                ("data", 8 * MIB, 2, 4 * MIB + 2 * MIB)
            ]
        );
    }

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
            devices: Vec::new(),
            io: IoStatus {
                reads: 4,
                writes: 110,
                flushes: 2,
                trims: 0,
                write_zeroes: 0,
                bytes_read: 16384,
                bytes_written: 110 << 12,
            },
            uptime_seconds: 12.0,
            start: None,
            transitions: vec![Transition {
                at_ns: 1_700_000_000_000_000_000,
                from: Mode::Logging,
                to: Mode::ForwardPart,
                cause: "the memory pool is full".into(),
            }],
            resync: ResyncStatus {
                running: true,
                passes: 1,
                regions_done: 2,
                regions_left: 3,
                bytes_done: 8 << 20,
                bytes_read: 4 << 20,
                bytes_per_second: 4e6,
                eta_seconds: Some(3.0),
                lifetime_regions: 2,
                episodes_ended: 0,
            },
            activity_log: Some(ActivityLogStatus {
                path: "/var/lib/disk.img.tinylag-al".into(),
                regions: 5,
                bytes: 20 << 20,
                file_bytes: 8192,
                writes: 9,
                broken: false,
            }),
            security_warning: None,
        }
    }

    #[test]
    fn logging_is_quiet_and_degraded_modes_are_loud() {
        let ok = sample(Mode::Logging).render_text();
        assert!(!ok.contains("WARNING"), "{ok}");
        assert!(ok.contains("head 100, durable 90"), "{ok}");
        assert!(ok.contains("110 writes (440.0 KiB)"), "{ok}");
        let mut part = sample(Mode::ForwardPart);
        part.dirty.regions = 3;
        part.dirty.bytes = 12 << 20;
        let text = part.render_text();
        assert!(text.starts_with("WARNING: mode forward-part"), "{text}");
        assert!(text.contains("3 regions (12.0 MiB)"), "{text}");
        assert!(
            text.contains("2 regions done (8.0 MiB, 4.0 MiB read), 3 left"),
            "{text}"
        );
        assert!(text.contains("ETA 3s"), "{text}");
        assert!(
            text.contains("logging -> forward-part: the memory pool is full"),
            "{text}"
        );
        assert!(text.contains("5 regions active (20.0 MiB)"), "{text}");
        assert!(sample(Mode::Fenced)
            .render_text()
            .contains("another writer owns the journal"));
    }

    #[test]
    fn an_exposed_plaintext_listener_is_shown_first() {
        let mut s = sample(Mode::Logging);
        assert!(serde_json::to_value(&s)
            .unwrap()
            .get("security_warning")
            .is_none());
        s.security_warning = Some("WARNING: NBD on tcp:0.0.0.0:10809 accepts plaintext".into());
        let text = s.render_text();
        assert!(
            text.starts_with("WARNING: NBD on tcp:0.0.0.0:10809"),
            "{text}"
        );
        let back: StatusSnapshot =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn json_round_trips_with_stable_names() {
        let s = sample(Mode::ForwardPart);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["mode"], "forward-part");
        assert_eq!(json["lag"]["records"], 10);
        assert_eq!(json["dirty"]["regions"], 0);
        assert_eq!(json["pool"]["cap"], 512 << 20);
        assert_eq!(json["resync"]["regions_left"], 3);
        assert_eq!(json["transitions"][0]["to"], "forward-part");
        assert_eq!(json["activity_log"]["regions"], 5);
        let back: StatusSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(back, s);
    }
}
