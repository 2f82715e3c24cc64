//! A replay agent's series (`replay`, the replica half of `up`), from
//! [`StatusBoard::snapshot`]: the same [`ReplicaStatus`] `tinylag status` prints.
//!
//! Must never: compute a value differently from `status`.

use std::sync::Arc;

use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, flag, gauge, Labels, Source};
use crate::journal::consumer::Seed;
use crate::replayer::status::AgentState;
use crate::replayer::{ReplicaStatus, StatusBoard};

/// Scrapes a replay agent.
#[derive(Debug)]
pub struct ReplicaSource(pub Arc<StatusBoard>);

#[async_trait]
impl Source for ReplicaSource {
    async fn collect(&self) -> Box<dyn Collector> {
        Box::new(ReplicaScrape(self.0.snapshot().await))
    }
}

/// One replica scrape.
#[derive(Debug)]
pub(crate) struct ReplicaScrape(pub(crate) ReplicaStatus);

impl Collector for ReplicaScrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let labels: Labels = vec![
            ("journal", s.identity.journal.clone()),
            ("consumer", s.identity.name.clone()),
        ];
        let one = |v: u64| [(labels.clone(), v)];
        let secs = |v: f64| [(labels.clone(), v)];
        let with = |k: &'static str, v: &str| {
            let mut l = labels.clone();
            l.push((k, v.to_string()));
            l
        };

        let states: Vec<(Labels, u64)> = AgentState::ALL
            .iter()
            .map(|st| (with("state", st.name()), flag(*st == s.state)))
            .collect();
        gauge(
            &mut e,
            "replica_state",
            "What the replay agent does: 1 for its state now, 0 for the others.",
            &states,
        )?;
        gauge(
            &mut e,
            "replica_applied_lsn",
            "Last LSN applied to the replica and committed.",
            &one(s.applied_lsn),
        )?;
        gauge(
            &mut e,
            "replica_consistent_lsn",
            "Last LSN at which the replica was a state the primary had (below applied_lsn \
             inside a resync span).",
            &one(s.consistent_lsn),
        )?;
        gauge(
            &mut e,
            "replica_in_resync_span",
            "1 while the replica is inside a resync span (not consistent until it ends).",
            &one(flag(s.in_resync_span)),
        )?;
        gauge(
            &mut e,
            "replica_journal_hole",
            "1 while a journal hole (a segment missing below the journal's known end) stops \
             the agent; status names the seq.",
            &one(flag(s.journal_hole_seq.is_some())),
        )?;
        gauge(
            &mut e,
            "replica_head_lsn",
            "The journal head this agent compares with.",
            &one(s.head_lsn),
        )?;
        gauge(
            &mut e,
            "replica_lag_records",
            "Records in the journal not yet applied to the replica.",
            &one(s.lag_records),
        )?;
        gauge(
            &mut e,
            "replica_lag_bytes",
            "Stored bytes of the segments not yet applied (estimated from a sample when \
             many).",
            &one(s.lag_bytes),
        )?;
        gauge(
            &mut e,
            "replica_lag_seconds",
            "Age of the oldest record not yet applied, the configured delay included (0 \
             when nothing is behind).",
            &secs(s.lag_seconds),
        )?;
        gauge(
            &mut e,
            "replica_lag_beyond_delay_seconds",
            "The part of replica_lag_seconds past the configured delay: how late the replica \
             is compared with what it was asked to be. Alert on this one.",
            &secs(s.lag_beyond_delay_seconds),
        )?;
        gauge(
            &mut e,
            "replica_delay_seconds",
            "The configured delay (--delay).",
            &secs(s.identity.delay_ns as f64 / 1e9),
        )?;
        counter(
            &mut e,
            "replica_applied_records",
            "Records applied since the agent started.",
            &one(s.records_applied),
        )?;
        counter(
            &mut e,
            "replica_applied_bytes",
            "Bytes applied since the agent started (written, discarded or zeroed).",
            &one(s.bytes_applied),
        )?;
        counter(
            &mut e,
            "replica_batches",
            "Batches applied since the agent started (one undo segment, fsync and commit \
             each).",
            &one(s.batches_applied),
        )?;
        let t = &s.time_spent;
        let phases: Vec<(Labels, f64)> = [
            ("preimage", t.preimage_ms),
            ("undo", t.undo_ms),
            ("apply", t.apply_ms),
            ("sync", t.sync_ms),
            ("commit", t.commit_ms),
        ]
        .iter()
        .map(|(phase, ms)| (with("phase", phase), *ms as f64 / 1e3))
        .collect();
        counter(
            &mut e,
            "replica_phase_seconds",
            "Wall time the agent spent per phase of a batch since it started.",
            &phases,
        )?;
        if s.identity.undo.is_some() {
            gauge(
                &mut e,
                "undo_log_bytes",
                "Bytes of the replica's undo log (time travel back).",
                &one(s.undo_bytes),
            )?;
            gauge(
                &mut e,
                "undo_log_segments",
                "Segments of the replica's undo log.",
                &one(s.undo_segments),
            )?;
        }
        let v = &s.verify;
        counter(
            &mut e,
            "verify_checked_regions",
            "Regions a VERIFY record had the agent compare.",
            &one(v.checked),
        )?;
        counter(
            &mut e,
            "verify_mismatches",
            "Regions whose replica bytes did not match the primary's checksum.",
            &one(v.mismatches),
        )?;
        counter(
            &mut e,
            "verify_skipped_regions",
            "VERIFY regions skipped inside resync spans.",
            &one(v.skipped),
        )?;
        gauge(
            &mut e,
            "verify_mismatching_regions",
            "Regions mismatching now (not yet rewritten since).",
            &one(v.mismatched.len() as u64),
        )?;
        // Who vouches for the image, loudly: an operator's word, or a check not finished.
        gauge(
            &mut e,
            "replica_seed_assumed",
            "1 when the replica's starting image was adopted on the operator's word (--assume-seeded), unchecked.",
            &one(u64::from(matches!(s.seed, Seed::Assumed { .. }))),
        )?;
        let unproven = match &s.seed {
            Seed::Checking { unproven, .. } => unproven.count(),
            _ => 0,
        };
        gauge(
            &mut e,
            "replica_seed_unproven_regions",
            "Regions of an adopted image not yet proven equal to the primary (--check-seed); the replica is not vouched for while above 0.",
            &one(unproven),
        )?;
        Ok(())
    }
}
