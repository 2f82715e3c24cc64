//! `tinylag replica trim --retain DURATION`: drops from the manifest the checkpoints no
//! retained point needs, then deletes the objects no reader of the current or the previous
//! manifest generation needs, so the manifest and the store stay bounded.
//!
//! Order (each step safe to kill; the next run finishes what a killed one left):
//! 1. a new generation keeping the retained checkpoints and what they need (committed like
//!    compaction's, [`manifest::commit_change`]: reapplied when the agent commits first);
//! 2. manifest generations older than the previous one;
//! 3. layers and image parts named by neither the current nor the previous generation —
//!    so what step 1 dropped goes on a later run, once two newer generations exist — except
//!    a delta layer past the newest checkpoint (a running agent's, not committed yet) and an
//!    image part at a checkpoint of the newest generation from a compaction run younger than
//!    the grace (a running compaction's: it commits only at a checkpoint still held).
//!
//! Must never: drop the newest checkpoint; delete an object the current or the previous
//! generation names; delete a layer the agent may still commit.

use std::collections::HashSet;
use std::time::Duration;

use serde::Serialize;

use super::compact::run_started_s;
use super::error::ObjrepResult;
use super::manifest::{self, ReplicaManifest};
use super::restore::ObjSources;
use crate::journal::paths::objrep as paths;
use crate::store::list_all;

/// How a trim runs.
#[derive(Clone, Debug)]
pub struct TrimConfig {
    /// Checkpoints younger than this stay restorable, and the newest one older than it
    /// (the base of the points between it and the first younger one).
    pub retain: Duration,
    /// An unnamed image part is a dead compaction's once its run is this old.
    pub orphan_grace: Duration,
    /// Now, in ns since the epoch.
    pub now_ns: u64,
}

/// What a trim did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrimReport {
    /// The generation committed (0: the manifest needed no change).
    pub gen: u64,
    pub checkpoints_dropped: usize,
    pub checkpoints_kept: usize,
    pub generations_deleted: usize,
    pub objects_deleted: usize,
    pub bytes_deleted: u64,
    /// Objects the current manifest names, and their bytes (what the replica stores).
    pub objects_live: usize,
    pub bytes_live: u64,
}

/// `m` with only the checkpoints retained at `horizon_ns` and what they need.
pub(crate) fn retained(m: &ReplicaManifest, horizon_ns: u64) -> Option<ReplicaManifest> {
    // The newest checkpoint at or before the horizon is the base of the window's first
    // points; every later one is inside it.
    let first = m
        .checkpoints
        .iter()
        .rposition(|c| c.timestamp_ns <= horizon_ns)
        .unwrap_or(0);
    let mut next = m.clone();
    next.checkpoints.drain(..first);
    let mut keep_layers = HashSet::new();
    let mut keep_images = HashSet::new();
    for cp in &next.checkpoints {
        let s = next.sources(cp);
        keep_images.extend(s.image.map(|i| i.lsn));
        keep_layers.extend(s.deltas.iter().map(|l| l.key.clone()));
    }
    next.layers.retain(|l| keep_layers.contains(&l.key));
    next.images.retain(|i| keep_images.contains(&i.lsn));
    next.recount();
    (next.checkpoints.len() != m.checkpoints.len()
        || next.layers.len() != m.layers.len()
        || next.images.len() != m.images.len())
    .then_some(next)
}

/// Trims the replica `src` opened.
pub async fn trim(src: &ObjSources, config: &TrimConfig) -> ObjrepResult<TrimReport> {
    let store = src.replica.as_ref();
    let horizon = config
        .now_ns
        .saturating_sub(config.retain.as_nanos() as u64);
    let mut report = TrimReport::default();
    let before = src.manifest.checkpoints.len();
    let committed = manifest::commit_change(store, src.manifest.clone(), |newest| {
        Ok(retained(newest, horizon))
    })
    .await?;
    let current = match committed {
        Some(next) => {
            report.gen = next.gen;
            report.checkpoints_dropped = before.saturating_sub(next.checkpoints.len());
            next
        }
        None => manifest::load_latest(store)
            .await?
            .unwrap_or_else(ReplicaManifest::empty),
    };
    report.checkpoints_kept = current.checkpoints.len();

    // Generations older than the previous one.
    let generations: Vec<u64> = list_all(store, paths::CHECKPOINTS_PREFIX)
        .await?
        .iter()
        .filter_map(|o| paths::parse_checkpoint_key(&o.key))
        .collect();
    let newest_gen = generations.iter().copied().max().unwrap_or(current.gen);
    let old: Vec<String> = generations
        .iter()
        .filter(|g| **g + 1 < newest_gen)
        .map(|g| paths::checkpoint_key(*g))
        .collect();
    if !old.is_empty() {
        store.delete_many(&old).await?;
        report.generations_deleted = old.len();
    }

    // What the newest and the previous generation name (read again: the agent may have
    // committed since step 1).
    let mut named: HashSet<String> = HashSet::new();
    let newest = manifest::load_latest(store)
        .await?
        .unwrap_or_else(ReplicaManifest::empty);
    named.extend(newest.keys().map(String::from));
    if let Some(previous) = newest.gen.checked_sub(1).filter(|g| *g > 0) {
        if let Some(m) = manifest::load_generation(store, previous).await? {
            named.extend(m.keys().map(String::from));
        }
    }
    report.objects_live = newest.keys().count();
    report.bytes_live = newest.layers.iter().map(|l| l.size).sum::<u64>()
        + newest.images.iter().map(|i| i.bytes()).sum::<u64>();
    let newest_cp = newest.last().map_or(0, |c| c.lsn);
    let checkpoints: HashSet<u64> = newest.checkpoints.iter().map(|c| c.lsn).collect();
    let grace_s = config.orphan_grace.as_secs();
    let now_s = config.now_ns / 1_000_000_000;
    let mut garbage = Vec::new();
    for o in list_all(store, paths::LAYERS_PREFIX).await? {
        if named.contains(&o.key) {
            continue;
        }
        // A layer past the newest checkpoint may be the running agent's, spilled for its
        // next one.
        if paths::parse_layer_key(&o.key).is_some_and(|(_, _, last, _)| last <= newest_cp) {
            garbage.push(o);
        }
    }
    for o in list_all(store, paths::IMAGES_PREFIX).await? {
        if named.contains(&o.key) {
            continue;
        }
        // A compaction commits its image only at a checkpoint the newest manifest still
        // holds: a part at any other LSN is garbage now; one at a checkpoint may be a
        // running compaction's until its run is older than the grace.
        if paths::parse_image_key(&o.key).is_some_and(|(lsn, run, _)| {
            !checkpoints.contains(&lsn) || run_started_s(run) + grace_s <= now_s
        }) {
            garbage.push(o);
        }
    }
    for chunk in garbage.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|o| o.key.clone()).collect();
        store.delete_many(&keys).await?;
        report.objects_deleted += chunk.len();
        report.bytes_deleted += chunk.iter().map(|o| o.size).sum::<u64>();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objrep::manifest::{Checkpoint, ImagePart, ImageRef, LayerRef};

    fn layer(first: u64, last: u64) -> LayerRef {
        LayerRef {
            key: format!("l{first}-{last}"),
            first_lsn: first,
            last_lsn: last,
            size: 10,
        }
    }

    fn cp(lsn: u64, ts: u64) -> Checkpoint {
        Checkpoint {
            lsn,
            timestamp_ns: ts,
            next_seq: 0,
            layers: 0,
            next_timestamp_ns: None,
        }
    }

    fn image(lsn: u64) -> ImageRef {
        ImageRef {
            lsn,
            run: String::new(),
            parts: vec![ImagePart {
                key: format!("i{lsn}"),
                start: 0,
                end: 4096,
                size: 100,
            }],
        }
    }

    /// Checkpoints at 10, 20, 30, 40 (times 1..4), one layer each, an image at 20.
    fn sample() -> ReplicaManifest {
        let mut m = ReplicaManifest::empty();
        m.layers = vec![layer(1, 10), layer(11, 20), layer(21, 30), layer(31, 40)];
        m.checkpoints = vec![cp(10, 1), cp(20, 2), cp(30, 3), cp(40, 4)];
        m.images = vec![image(20)];
        m.recount();
        m
    }

    #[test]
    fn a_checkpoint_is_the_newest_image_below_it_and_the_deltas_after() {
        let m = sample();
        let s = m.sources(&m.checkpoints[3]);
        assert_eq!(s.image.map(|i| i.lsn), Some(20));
        let deltas: Vec<_> = s.deltas.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(deltas, ["l21-30", "l31-40"]);
        let s = m.sources(&m.checkpoints[0]);
        assert!(s.image.is_none());
        assert_eq!(s.deltas.len(), 1);
    }

    #[test]
    fn retention_keeps_the_window_and_its_base_and_what_they_need() {
        let m = sample();
        // Horizon at time 3: checkpoint 30 is the base, 40 inside; both need the image at
        // 20 and the layers after it, nothing before.
        let next = retained(&m, 3).expect("a change");
        let lsns: Vec<_> = next.checkpoints.iter().map(|c| c.lsn).collect();
        assert_eq!(lsns, [30, 40]);
        let keys: Vec<_> = next.keys().collect();
        assert_eq!(keys, ["l21-30", "l31-40", "i20"]);
        assert_eq!(next.checkpoints[0].layers, 1, "recounted");
        // Applied again: nothing to change (idempotent).
        assert!(retained(&next, 3).is_none());
        // A horizon before every checkpoint keeps them all, but not the layer the image at
        // 20 folded (no checkpoint reads it any more); one past them keeps the newest.
        let all = retained(&m, 0).expect("a change");
        assert_eq!(all.checkpoints.len(), 4);
        let keys: Vec<_> = all.keys().collect();
        assert_eq!(keys, ["l1-10", "l21-30", "l31-40", "i20"]);
        assert!(retained(&all, 0).is_none());
        let newest = retained(&m, 100).expect("a change");
        assert_eq!(newest.checkpoints.len(), 1);
        assert_eq!(newest.checkpoints[0].lsn, 40);
    }
}
