//! The primary daemon's series (`serve`, the primary half of `up`), from
//! [`PrimaryCore::status`] and the core's ack->durable histogram.
//!
//! Must never: compute a value differently from `status` (every number here is a field of
//! the snapshot, or the histogram that `durable_lag` summarizes).

use std::sync::Arc;

use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::{counter, flag, gauge, Labels, Source};
use crate::writer::{LagBuckets, Mode, PrimaryCore, StatusSnapshot};

/// Scrapes a primary core.
#[derive(Debug)]
pub struct PrimarySource(pub Arc<PrimaryCore>);

#[async_trait]
impl Source for PrimarySource {
    async fn collect(&self) -> Box<dyn Collector> {
        Box::new(PrimaryScrape {
            status: self.0.status(),
            durable_lag: self.0.durable_lag_buckets(),
        })
    }
}

/// One primary scrape: the status and the histogram, read together.
#[derive(Debug)]
pub(crate) struct PrimaryScrape {
    pub(crate) status: StatusSnapshot,
    pub(crate) durable_lag: Option<LagBuckets>,
}

impl Collector for PrimaryScrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let labels: Labels = vec![
            ("journal", s.journal.clone().unwrap_or_default()),
            ("device", s.export.clone()),
        ];
        let one = |v: u64| [(labels.clone(), v)];
        let secs = |v: f64| [(labels.clone(), v)];
        let with = |k: &'static str, v: &str| {
            let mut l = labels.clone();
            l.push((k, v.to_string()));
            l
        };

        let modes: Vec<(Labels, u64)> = Mode::ALL
            .iter()
            .map(|m| (with("mode", m.name()), flag(*m == s.mode)))
            .collect();
        gauge(
            &mut e,
            "mode",
            "Replication mode of the primary: 1 for the mode in force, 0 for the others \
             (logging is healthy; see `tinylag status` for the others).",
            &modes,
        )?;
        gauge(
            &mut e,
            "ack_waits_for_journal",
            "1 while a write's acknowledgement waits for the journal (--ack journal, or \
             adaptive past --max-lag), 0 while it does not.",
            &one(flag(s.ack.effective == "journal")),
        )?;
        gauge(
            &mut e,
            "device_size_bytes",
            "Size of the primary.",
            &one(s.device_size),
        )?;
        gauge(
            &mut e,
            "pool_used_bytes",
            "Memory holding changes acknowledged but not yet durable in the journal.",
            &one(s.pool.used),
        )?;
        gauge(
            &mut e,
            "pool_capacity_bytes",
            "Cap of that memory (--pool-size); past it changes go dirty.",
            &one(s.pool.cap),
        )?;
        gauge(
            &mut e,
            "pool_peak_bytes",
            "Most pool memory used since start.",
            &one(s.pool.peak),
        )?;
        if let Some(epoch) = s.epoch {
            gauge(
                &mut e,
                "writer_epoch",
                "Epoch of this writer on the journal.",
                &one(epoch),
            )?;
        }
        gauge(
            &mut e,
            "head_lsn",
            "Last LSN assigned to an acknowledged change.",
            &one(s.head_lsn),
        )?;
        gauge(
            &mut e,
            "durable_lsn",
            "Last LSN durable in the journal (every LSN up to it is).",
            &one(s.durable_lsn),
        )?;
        gauge(
            &mut e,
            "journal_lag_records",
            "Records acknowledged but not yet durable (head_lsn - durable_lsn).",
            &one(s.lag.records),
        )?;
        gauge(
            &mut e,
            "journal_lag_bytes",
            "Bytes of those records (pool memory in use).",
            &one(s.lag.bytes),
        )?;
        gauge(
            &mut e,
            "journal_lag_seconds",
            "Age of the oldest record not yet durable (0 when none).",
            &secs(s.lag.seconds),
        )?;
        if let Some(h) = &self.durable_lag {
            let mut metric = e.encode_descriptor(
                "ack_to_durable_seconds",
                "Time from a record's acknowledgement to its segment joining the durable \
                 prefix: the recovery point a replica sees.",
                None,
                MetricType::Histogram,
            )?;
            metric
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        counter(
            &mut e,
            "segments_uploaded",
            "Journal segments uploaded.",
            &one(s.segments_uploaded),
        )?;
        counter(
            &mut e,
            "uploaded_bytes",
            "Bytes of journal segments uploaded.",
            &one(s.bytes_uploaded),
        )?;
        gauge(
            &mut e,
            "uploads_in_flight",
            "Segment uploads under way.",
            &one(s.uploads_in_flight),
        )?;
        counter(
            &mut e,
            "upload_errors",
            "Failed segment uploads (each is retried).",
            &one(s.upload_errors.count),
        )?;
        gauge(
            &mut e,
            "upload_failing_seconds",
            "How long uploads have failed without a success (0 while they succeed).",
            &secs(s.upload_errors.failing_seconds.unwrap_or(0.0)),
        )?;
        gauge(
            &mut e,
            "store_outage",
            "1 once uploads have failed longer than --store-outage (--ack journal stops \
             waiting).",
            &one(flag(s.upload_errors.outage)),
        )?;
        counter(
            &mut e,
            "records_abandoned",
            "Records queued but never journaled (fenced, or not drained at stop).",
            &one(s.records_abandoned),
        )?;
        gauge(
            &mut e,
            "dirty_regions",
            "Regions changed without being journaled, waiting for a resync.",
            &one(s.dirty.regions),
        )?;
        gauge(
            &mut e,
            "dirty_bytes",
            "Bytes those regions cover.",
            &one(s.dirty.bytes),
        )?;
        let r = &s.resync;
        gauge(
            &mut e,
            "resync_running",
            "1 while a resync walks the dirty regions.",
            &one(flag(r.running)),
        )?;
        gauge(
            &mut e,
            "resync_done_bytes",
            "Bytes of the regions the current resync has journaled.",
            &one(r.bytes_done),
        )?;
        gauge(
            &mut e,
            "resync_total_bytes",
            "Bytes the current resync covers: done plus the regions still dirty.",
            &one(r.bytes_done + r.regions_left * s.dirty.region_size),
        )?;
        gauge(
            &mut e,
            "resync_read_bytes",
            "Bytes the current resync read from the primary (holes and zeroes are not read).",
            &one(r.bytes_read),
        )?;
        counter(
            &mut e,
            "resync_regions",
            "Regions resynced since start.",
            &one(r.lifetime_regions),
        )?;
        counter(
            &mut e,
            "resyncs_completed",
            "Resyncs ended by a RESYNC_END since start.",
            &one(r.episodes_ended),
        )?;
        if let Some(al) = &s.activity_log {
            gauge(
                &mut e,
                "activity_log_regions",
                "Regions the activity log marks active (resynced after a crash).",
                &one(al.regions),
            )?;
            counter(
                &mut e,
                "activity_log_writes",
                "Activity-log writes (each with an fsync).",
                &one(al.writes),
            )?;
            gauge(
                &mut e,
                "activity_log_broken",
                "1 once the activity log could not be written (a crash now means \
                 forward-full).",
                &one(flag(al.broken)),
            )?;
        }
        let io = &s.io;
        let ops: Vec<(Labels, u64)> = [
            ("read", io.reads),
            ("write", io.writes),
            ("flush", io.flushes),
            ("trim", io.trims),
            ("write_zeroes", io.write_zeroes),
        ]
        .iter()
        .map(|(op, n)| (with("op", op), *n))
        .collect();
        counter(
            &mut e,
            "primary_requests",
            "Requests the primary served (NBD or ublk), by kind.",
            &ops,
        )?;
        counter(
            &mut e,
            "primary_read_bytes",
            "Bytes read from the primary by clients.",
            &one(io.bytes_read),
        )?;
        counter(
            &mut e,
            "primary_written_bytes",
            "Bytes written to the primary by clients.",
            &one(io.bytes_written),
        )?;
        // A group: each device's changes under its own `device` label (the totals above keep
        // the group's labels, so a sum over devices is never counted twice).
        if !s.devices.is_empty() {
            let journal = s.journal.clone().unwrap_or_default();
            let on = |d: &str| -> Labels {
                vec![("journal", journal.clone()), ("device", d.to_string())]
            };
            let mut requests: Vec<(Labels, u64)> = Vec::new();
            let mut written: Vec<(Labels, u64)> = Vec::new();
            for d in &s.devices {
                for (op, n) in [
                    ("write", d.io.writes),
                    ("trim", d.io.trims),
                    ("write_zeroes", d.io.write_zeroes),
                ] {
                    let mut l = on(&d.name);
                    l.push(("op", op.to_string()));
                    requests.push((l, n));
                }
                written.push((on(&d.name), d.io.bytes_written));
            }
            counter(
                &mut e,
                "group_device_requests",
                "Changes a group's device took (each a journal record), by device and kind.",
                &requests,
            )?;
            counter(
                &mut e,
                "group_device_written_bytes",
                "Bytes written to a group's device by clients.",
                &written,
            )?;
        }
        gauge(
            &mut e,
            "uptime_seconds",
            "Seconds since the daemon started.",
            &secs(s.uptime_seconds),
        )?;
        Ok(())
    }
}
