//! `tinylag replica trim --retain DURATION`: drops from the manifest the checkpoints no
//! retained point needs, then deletes the objects no reader of the current or the previous
//! manifest generation needs, so the manifest and the store stay bounded.
//!
//! Order (each step safe to kill; the next run finishes what a killed one left):
//! 1. a new generation keeping the retained checkpoints and what they need (committed like
//!    compaction's, [`manifest::commit_change`]: reapplied when the agent commits first);
//! 2. manifest generations older than the previous one;
//! 3. layers and image parts named by neither the current nor the previous generation —
//!    so what step 1 (or any writer) dropped goes on a later run, once two newer generations
//!    exist, and a reader holding the previous generation still finds everything it names —
//!    except a delta layer or an image part past the newest checkpoint the trim read (an
//!    agent's spilled layer, or a compaction's image at a checkpoint committed since: both
//!    may be named by a generation newer than the one read), and an image part at a
//!    checkpoint it holds from a compaction run younger than the grace (a running
//!    compaction's: it commits only at a checkpoint still held).
//!
//! Why "two newer generations" holds by construction: no writer names again an object a
//! generation dropped (the agent adds only its new layers, compaction only its new image,
//! trim only removes), so an object named by generation K and not by the current one C nor
//! by C - 1 has C - 1 > K; and the objects the current generation names are never
//! candidates, nor are those past what it read. A kill between the commit and the deletes
//! leaves only unnamed objects, which the next run deletes.
//!
//! Must never: drop the newest checkpoint; delete an object the current or the previous
//! generation names; delete a layer the agent may still commit, or an image part a
//! compaction may still commit.

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

/// What step 3 knows when it decides what is garbage: the keys the newest generation it
/// read and the one before name, and that generation's checkpoints.
struct View {
    named: HashSet<String>,
    /// The newest checkpoint of the newest generation read.
    newest_cp: u64,
    checkpoints: HashSet<u64>,
    grace_s: u64,
    now_s: u64,
}

impl View {
    /// Whether the object at `key` (a layer or an image part) may be deleted.
    fn is_garbage(&self, key: &str) -> bool {
        if self.named.contains(key) {
            return false;
        }
        if let Some((_, _, last, _)) = paths::parse_layer_key(key) {
            // A layer past the newest checkpoint may be the running agent's, spilled for
            // its next one (or named by a generation committed since this one was read).
            return last <= self.newest_cp;
        }
        if let Some((lsn, run, _)) = paths::parse_image_key(key) {
            // Past the newest checkpoint read: a compaction's image at a checkpoint committed
            // since, maybe already named by a newer generation. At a checkpoint read: a running
            // compaction's until its run is older than the grace. Anywhere else (a checkpoint
            // dropped): no compaction commits there, garbage now.
            return lsn <= self.newest_cp
                && (!self.checkpoints.contains(&lsn)
                    || run_started_s(run) + self.grace_s <= self.now_s);
        }
        false
    }
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
    let view = View {
        named,
        newest_cp: newest.last().map_or(0, |c| c.lsn),
        checkpoints: newest.checkpoints.iter().map(|c| c.lsn).collect(),
        grace_s: config.orphan_grace.as_secs(),
        now_s: config.now_ns / 1_000_000_000,
    };
    let mut garbage = Vec::new();
    for prefix in [paths::LAYERS_PREFIX, paths::IMAGES_PREFIX] {
        for o in list_all(store, prefix).await? {
            if view.is_garbage(&o.key) {
                garbage.push(o);
            }
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
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::journal::{Manifest, ManifestParams, Op};
    use crate::objrep::error::ObjrepError;
    use crate::objrep::layer;
    use crate::objrep::manifest::{
        Checkpoint, ImagePart, ImageRef, LayerRef, ReplicaIdentity, FORMAT_VERSION,
    };
    use crate::objrep::restore::ObjPoint;
    use crate::replayer::overlay::Overlay;
    use crate::store::memory::MemoryStore;
    use crate::store::ObjectStore;

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
    fn what_a_newer_generation_may_name_is_never_garbage() {
        let old_run = 5u64 << 32; // started at second 5: long dead at second 10,000
        let view = View {
            named: ["named".to_string()].into(),
            newest_cp: 40,
            checkpoints: [30, 40].into(),
            grace_s: 3600,
            now_s: 10_000,
        };
        let layer = |first, last| paths::layer_key(9, first, last, 1);
        let part = |lsn, run| paths::image_key(lsn, run, 0);
        assert!(!view.is_garbage("named"));
        // Layers: at or below the newest checkpoint read, unnamed: garbage; past it: an
        // agent's, kept.
        assert!(view.is_garbage(&layer(1, 10)));
        assert!(!view.is_garbage(&layer(41, 50)));
        // Image parts: at a dropped checkpoint, garbage; at a held one, a dead run's only;
        // past the newest checkpoint read (a compaction that committed after the agent's
        // newer checkpoint), kept whatever its age — the race a stale view used to lose.
        assert!(view.is_garbage(&part(20, old_run)));
        assert!(view.is_garbage(&part(40, old_run)));
        assert!(!view.is_garbage(&part(40, 9_000 << 32)));
        assert!(!view.is_garbage(&part(50, old_run)));
        assert!(!view.is_garbage("images/not-a-part"));
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

    const SIZE: u64 = 64 << 10;

    /// Uploads the net effect of `ops` as a layer over `first..=last` (an image part when
    /// `first` is 0) and returns its key and size.
    async fn put_layer(
        store: &MemoryStore,
        uuid: uuid::Uuid,
        key: String,
        (first, last): (u64, u64),
        ops: &[Op],
    ) -> (String, u64) {
        let mut o = Overlay::new();
        for (i, op) in ops.iter().enumerate() {
            o.record(first.max(1) + i as u64, op);
        }
        let bytes = layer::encode(uuid, first, last, &o, None);
        let size = bytes.len() as u64;
        store.put_if_absent(&key, bytes).await.unwrap();
        (key, size)
    }

    fn write(offset: u64, b: u8) -> Op {
        Op::Write {
            offset,
            data: Bytes::from(vec![b; 4096]),
        }
    }

    /// DESIGN's promise, end to end on a store: a reader that opened generation N (a restore
    /// that listed just before a trim) still restores once trim committed N + 1 without the
    /// layers it needs, and after a second trim run; only once a generation N + 2 exists does a
    /// trim delete them, and the reader still holding N then fails naming the object.
    #[tokio::test]
    async fn a_reader_holding_the_previous_generation_still_restores_after_trim() {
        let store = Arc::new(MemoryStore::new());
        let jm = Manifest::new(
            &ManifestParams {
                device_name: "d".into(),
                size: SIZE,
                block_size: 4096,
                region_size: SIZE,
                splay_width: 1,
                segment_size: 1 << 20,
            },
            0,
        )
        .unwrap();
        let uuid = jm.uuid;
        let identity = ReplicaIdentity {
            format_version: FORMAT_VERSION,
            journal_uuid: uuid,
            consumer: "r".into(),
            size: SIZE,
            block_size: 4096,
            created_ns: 0,
        };
        // Generation 1: checkpoints 10 (time 1) and 20 (time 2), a layer each, and the image
        // at 20 (so a trim keeping only 20 drops both layers).
        let (l1, s1) = put_layer(
            &store,
            uuid,
            paths::layer_key(1, 1, 10, 7),
            (1, 10),
            &[write(0, 1)],
        )
        .await;
        let (l2, s2) = put_layer(
            &store,
            uuid,
            paths::layer_key(1, 11, 20, 7),
            (11, 20),
            &[write(4096, 2)],
        )
        .await;
        let (p, ps) = put_layer(
            &store,
            uuid,
            paths::image_key(20, 1 << 32, 0),
            (0, 20),
            &[write(0, 1), write(4096, 2)],
        )
        .await;
        let lref = |key: &str, first, last, size| LayerRef {
            key: key.to_string(),
            first_lsn: first,
            last_lsn: last,
            size,
        };
        let mut m = ReplicaManifest::empty();
        m.gen = 1;
        m.layers = vec![lref(&l1, 1, 10, s1), lref(&l2, 11, 20, s2)];
        m.checkpoints = vec![
            Checkpoint {
                next_timestamp_ns: Some(2),
                ..cp(10, 1)
            },
            cp(20, 2),
        ];
        m.images = vec![ImageRef {
            lsn: 20,
            run: format!("{:016x}", 1u64 << 32),
            parts: vec![ImagePart {
                key: p.clone(),
                start: 0,
                end: SIZE,
                size: ps,
            }],
        }];
        m.recount();
        manifest::commit(store.as_ref(), &m).await.unwrap();
        let journal: Arc<dyn ObjectStore> = store.clone();
        let open = |m: ReplicaManifest| ObjSources {
            journal: journal.clone(),
            replica: journal.clone(),
            jm: jm.clone(),
            identity: identity.clone(),
            manifest: m,
        };
        // The reader holding generation 1: checkpoint 10 needs layer l1.
        let held = open(m.clone());
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("held.img");
        let mut want = vec![0u8; SIZE as usize];
        want[..4096].fill(1);
        let restores = |label: &str| {
            let _ = std::fs::remove_file(&out);
            let label = label.to_string();
            let (held, out, want) = (&held, out.clone(), want.clone());
            async move {
                held.restore(&ObjPoint::Time(1), &out).await?;
                assert!(std::fs::read(&out).unwrap() == want, "{label}: wrong bytes");
                Ok::<(), ObjrepError>(())
            }
        };
        restores("before trim").await.unwrap();

        // Trim keeps checkpoint 20 only: generation 2 names the image alone; the layers
        // generation 1 names stay (it is the previous generation).
        let config = TrimConfig {
            retain: Duration::ZERO,
            orphan_grace: Duration::from_secs(3600),
            now_ns: 3,
        };
        let first = trim(&open(m.clone()), &config).await.unwrap();
        assert_eq!((first.gen, first.checkpoints_dropped), (2, 1));
        assert_eq!(first.objects_deleted, 0, "{first:?}");
        restores("after the trim that committed generation 2")
            .await
            .unwrap();
        let again = trim(
            &open(
                manifest::load_latest(store.as_ref())
                    .await
                    .unwrap()
                    .unwrap(),
            ),
            &config,
        )
        .await
        .unwrap();
        assert_eq!((again.gen, again.objects_deleted), (0, 0), "{again:?}");
        restores("after a second trim run").await.unwrap();

        // Generation 3 (an agent's next checkpoint): generation 1 is no longer the previous
        // one, and the layers only it named go.
        let (l3, s3) = put_layer(
            &store,
            uuid,
            paths::layer_key(3, 21, 30, 8),
            (21, 30),
            &[write(8192, 3)],
        )
        .await;
        let newest = manifest::load_latest(store.as_ref())
            .await
            .unwrap()
            .unwrap();
        manifest::commit_change(store.as_ref(), newest, |n| {
            let mut next = n.clone();
            next.layers.push(lref(&l3, 21, 30, s3));
            next.checkpoints.push(Checkpoint {
                layers: next.layers.len(),
                ..cp(30, 4)
            });
            Ok(Some(next))
        })
        .await
        .unwrap();
        let third = trim(
            &open(
                manifest::load_latest(store.as_ref())
                    .await
                    .unwrap()
                    .unwrap(),
            ),
            &config,
        )
        .await
        .unwrap();
        assert_eq!(third.objects_deleted, 2, "{third:?}");
        for key in [&l1, &l2] {
            assert!(
                store.get(key).await.unwrap_err().is_not_found(),
                "{key} kept"
            );
        }
        let err = restores("held past two generations").await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&l1)
                && text.contains(&paths::checkpoint_key(1))
                && text.contains("missing"),
            "{text}"
        );
        assert!(!out.exists(), "a failed restore left its output");
    }
}
