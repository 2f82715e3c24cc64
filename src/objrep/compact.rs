//! `tinylag replica compact`: folds the delta layers up to the newest checkpoint into an
//! image layer ([`super::image`]) and commits a manifest generation that names it.
//!
//! How it shares the manifest with the agent (and with `replica trim`): no lease; each
//! writer's change is a function of the newest manifest, committed by conditional create
//! of the next generation ([`manifest::commit_change`]). Compaction adds an image at a
//! checkpoint the manifest holds, and nothing else, so when the agent commits first the
//! compaction reapplies the same change to the agent's generation, and the agent, losing to
//! a compaction, appends its checkpoint to the compaction's. A second compaction at the same
//! checkpoint finds the image there and deletes its own parts: harmless.
//!
//! Must never: name a part before it is durable; commit after running longer than half
//! [`ORPHAN_GRACE`] (a `replica trim` may by then take its parts for a dead run's);
//! change a checkpoint or a delta layer of the manifest.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::{ObjrepError, ObjrepResult};
use super::image::{self, discard, ImageStats, PartSize};
use super::manifest::{self, ImageRef, ReplicaManifest};
use super::restore::ObjSources;
use crate::crypto::Key;

/// An image part no manifest names is a dead compaction's once its run is this old (the
/// run's start time is in its key): `replica trim` deletes it then.
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(3600);

/// How a compaction runs.
#[derive(Clone, Debug)]
pub struct CompactConfig {
    pub part_bytes: u64,
    /// Compact even when the delta layers since the newest image are small.
    pub force: bool,
    /// Seal the parts (an encrypted journal's replica).
    pub seal_with: Option<Key>,
}

impl CompactConfig {
    pub fn new() -> CompactConfig {
        CompactConfig {
            part_bytes: 64 << 20,
            force: false,
            seal_with: None,
        }
    }
}

impl Default for CompactConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// What a compaction did (printed as JSON by `replica compact --json`).
#[derive(Clone, Debug, Serialize)]
pub struct CompactReport {
    /// `compacted`, `up-to-date` (the newest checkpoint has its image), `small` (the delta
    /// layers since the newest image are under a quarter of it: not worth rewriting it), or
    /// `raced` (another compaction committed the same image first; ours was deleted).
    pub outcome: &'static str,
    /// The checkpoint the image is at.
    pub lsn: u64,
    /// The generation that names it (0 when nothing was committed).
    pub gen: u64,
    #[serde(flatten)]
    pub stats: ImageStats,
    /// Bytes of the delta layers folded in.
    pub delta_bytes: u64,
}

/// The compaction run id: its start time in seconds (the high 32 bits, so `replica trim`
/// tells a dead run's parts from a running one's by the key alone) and 32 random bits.
pub(crate) fn run_id(now_s: u64) -> u64 {
    (now_s << 32) | u64::from(rand::random::<u32>())
}

/// The start time (seconds) of compaction run `run`.
pub(crate) fn run_started_s(run: u64) -> u64 {
    run >> 32
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Compacts the replica `src` opened: an image at its newest checkpoint.
pub async fn compact(src: &ObjSources, config: &CompactConfig) -> ObjrepResult<CompactReport> {
    let store = src.replica.as_ref();
    let m = &src.manifest;
    let Some(cp) = m.last() else {
        return Err(ObjrepError::NoCheckpoint {
            store: store.describe(),
        });
    };
    let sources = m.sources(cp);
    let delta_bytes: u64 = sources.deltas.iter().map(|l| l.size).sum();
    let mut report = CompactReport {
        outcome: "up-to-date",
        lsn: cp.lsn,
        gen: 0,
        stats: ImageStats::default(),
        delta_bytes,
    };
    if sources.image.is_some_and(|i| i.lsn == cp.lsn) {
        return Ok(report);
    }
    // Rewriting the image costs its size; a quarter of it in deltas keeps the bytes stored
    // within 1.25x of the image (DESIGN's budget is 1.3x) between compactions.
    if !config.force && sources.image.is_some_and(|i| delta_bytes * 4 < i.bytes()) {
        report.outcome = "small";
        return Ok(report);
    }
    let started = Instant::now();
    let run = run_id(now_s());
    let (image, stats) = image::build(
        store,
        &src.identity,
        m,
        cp,
        run,
        PartSize::new(config.part_bytes),
        config.seal_with.as_ref(),
    )
    .await?;
    report.stats = stats;
    if started.elapsed() > ORPHAN_GRACE / 2 {
        discard(store, &image).await;
        return Err(ObjrepError::Refused(format!(
            "compaction of {} took {:?}, longer than half the {:?} after which `replica trim` \
             takes an unnamed image part for a dead run's: not committed (use a larger \
             --part-size or compact more often)",
            store.describe(),
            started.elapsed(),
            ORPHAN_GRACE
        )));
    }
    let mut raced = false;
    let committed = manifest::commit_change(store, m.clone(), |newest: &ReplicaManifest| {
        if newest.images.iter().any(|i| i.lsn == image.lsn) {
            raced = true;
            return Ok(None);
        }
        if !newest.checkpoints.iter().any(|c| c.lsn == image.lsn) {
            // A trim dropped the checkpoint meanwhile: nothing needs the image.
            raced = true;
            return Ok(None);
        }
        Ok(Some(with_image(newest, image.clone())))
    })
    .await?;
    match committed {
        Some(next) => {
            report.outcome = "compacted";
            report.gen = next.gen;
        }
        None => {
            discard(store, &image).await;
            report.outcome = if raced { "raced" } else { "up-to-date" };
        }
    }
    Ok(report)
}

/// `newest` with `image` added (sorted by LSN).
fn with_image(newest: &ReplicaManifest, image: ImageRef) -> ReplicaManifest {
    let mut next = newest.clone();
    let at = next.images.partition_point(|i| i.lsn < image.lsn);
    next.images.insert(at, image);
    next.format_version = super::manifest::IMAGES_FORMAT_VERSION;
    next
}
