//! The object replica's identity (`objrep.json`) and its manifest generations
//! (`checkpoints/<gen>`): which layers are live and which checkpoints they make.
//!
//! Must never: replace an object (both are conditional creates); name a layer that is not
//! durable yet; list more than once per open (the agent keeps the manifest it committed),
//! but to step over a generation deleted between the listing and the read.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{ObjrepError, ObjrepResult};
use crate::journal::paths::objrep as paths;
use crate::store::{list_all, ObjectStore};

/// Format version of the identity, and of a manifest without images.
pub const FORMAT_VERSION: u32 = 1;
/// Format version of a manifest that names images: a reader that does not know images
/// would read the delta layers alone, and once trim dropped the layers an image replaced
/// it would restore wrong bytes, so such a manifest says it needs this version.
pub const IMAGES_FORMAT_VERSION: u32 = 2;

/// `objrep.json`: which journal and consumer a replica root belongs to.
///
/// ```json
/// { "format_version": 1, "journal_uuid": "…", "consumer": "dr1", "size": 1073741824,
///   "block_size": 4096, "created_ns": 1795000000000000000 }
/// ```
///
/// # Invariants
/// Written once, by conditional create, before the first layer; `size` is the journal's
/// device size (one device: group journals are refused for now).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaIdentity {
    pub format_version: u32,
    pub journal_uuid: Uuid,
    pub consumer: String,
    pub size: u64,
    pub block_size: u32,
    pub created_ns: u64,
}

/// A live layer as a manifest names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerRef {
    pub key: String,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub size: u64,
}

/// A consistent point the replica can be read at.
///
/// # Invariants
/// - `layers` is the number of the manifest's listed layers that end at or below `lsn`
///   (every writer keeps it so: the agent when it appends the checkpoint, trim by
///   `ReplicaManifest::recount` when it drops layers; compaction drops none). Readers do
///   not read the layers by it — [`ReplicaManifest::sources`] says which hold the point —
///   but check it on load ([`ReplicaManifest::check`]): a list that lost an entry a
///   checkpoint counted is refused, naming the checkpoint, instead of restoring wrong bytes.
/// - The image at `lsn` is what [`ReplicaManifest::sources`] names for it; `lsn` is the
///   `last_lsn` of the last of those layers (or of an earlier checkpoint, when only records
///   that change no bytes came between).
/// - `lsn` is outside every resync span; `next_seq` is the journal segment holding `lsn + 1`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub lsn: u64,
    pub timestamp_ns: u64,
    pub next_seq: u64,
    pub layers: usize,
    /// The timestamp of the first record after `lsn`, once a later checkpoint read it
    /// (`None` on the newest): a time before it is this checkpoint exactly, with no journal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_timestamp_ns: Option<u64>,
}

/// `checkpoints/<gen>`: the live layers in LSN order and the checkpoints they make, oldest
/// first. The newest generation is the replica.
///
/// # Invariants
/// - `layers` are sorted by `first_lsn`, their LSN ranges disjoint and ascending.
/// - `checkpoints` are sorted by `lsn`; each one's `layers` is non-decreasing.
/// - Created by conditional create after every layer it names is durable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaManifest {
    pub format_version: u32,
    pub gen: u64,
    /// The agent run that committed it (hex, as in layer keys).
    pub run: String,
    pub layers: Vec<LayerRef>,
    pub checkpoints: Vec<Checkpoint>,
    /// Image layers (compaction's), sorted by LSN.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageRef>,
}

impl ReplicaManifest {
    /// The generation before the first checkpoint: no layer, no checkpoint.
    pub fn empty() -> ReplicaManifest {
        ReplicaManifest {
            format_version: FORMAT_VERSION,
            gen: 0,
            run: String::new(),
            layers: Vec::new(),
            checkpoints: Vec::new(),
            images: Vec::new(),
        }
    }

    /// The newest checkpoint.
    pub fn last(&self) -> Option<&Checkpoint> {
        self.checkpoints.last()
    }

    /// The newest checkpoint at or below `lsn`.
    pub fn at_or_below(&self, lsn: u64) -> Option<&Checkpoint> {
        self.checkpoints.iter().rev().find(|c| c.lsn <= lsn)
    }

    /// The newest checkpoint at or before time `ns`.
    pub fn at_or_before_time(&self, ns: u64) -> Option<&Checkpoint> {
        self.checkpoints.iter().rev().find(|c| c.timestamp_ns <= ns)
    }
}

/// One part of an image layer: the image's data in `start..end` of the device (bytes of the
/// range no extent of the part names are zeroes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePart {
    pub key: String,
    pub start: u64,
    pub end: u64,
    pub size: u64,
}

/// An image layer: the whole image at checkpoint `lsn` (compaction's), as parts by offset
/// range; a range no part covers is zeroes.
///
/// # Invariants
/// `lsn` is the LSN of a checkpoint the manifest that first named the image held; parts are
/// sorted by `start`, their ranges disjoint; every part durable before a manifest names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub lsn: u64,
    /// The compaction run that wrote it (hex, as in its keys).
    pub run: String,
    pub parts: Vec<ImagePart>,
}

impl ImageRef {
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.size).sum()
    }
}

/// What holds a checkpoint: the one rule every reader uses (restore, compaction, a lazy
/// mount): the newest image at or below it, then every delta layer after that image up to
/// it, oldest first.
#[derive(Clone, Debug)]
pub struct PointSources<'a> {
    pub checkpoint: &'a Checkpoint,
    pub image: Option<&'a ImageRef>,
    pub deltas: Vec<&'a LayerRef>,
}

impl ReplicaManifest {
    /// The objects that hold checkpoint `cp` (see [`PointSources`]).
    pub fn sources<'a>(&'a self, cp: &'a Checkpoint) -> PointSources<'a> {
        let image = self.images.iter().rev().find(|i| i.lsn <= cp.lsn);
        let after = image.map_or(0, |i| i.lsn);
        PointSources {
            checkpoint: cp,
            image,
            deltas: self
                .layers
                .iter()
                .filter(|l| l.first_lsn > after && l.last_lsn <= cp.lsn)
                .collect(),
        }
    }

    /// Every object key the manifest names (layers and image parts).
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.layers.iter().map(|l| l.key.as_str()).chain(
            self.images
                .iter()
                .flat_map(|i| i.parts.iter().map(|p| p.key.as_str())),
        )
    }

    /// Sets each checkpoint's `layers` to the number of listed layers at or below it (after
    /// a change of the list).
    pub(crate) fn recount(&mut self) {
        for cp in &mut self.checkpoints {
            cp.layers = layers_at_or_below(&self.layers, cp.lsn);
        }
    }

    /// Checks the invariants a reader relies on: layers in LSN order with disjoint ranges,
    /// checkpoints and images in LSN order, and each checkpoint's `layers` equal to the
    /// listed layers ending at or below it — so a layer a checkpoint counted but the list
    /// lost is named here, not found later as wrong bytes. The error says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        for pair in self.layers.windows(2) {
            if pair[0].last_lsn >= pair[1].first_lsn || pair[1].first_lsn > pair[1].last_lsn {
                return Err(format!(
                    "layers {} and {} are not in LSN order with disjoint ranges",
                    pair[0].key, pair[1].key
                ));
            }
        }
        if self.checkpoints.windows(2).any(|p| p[0].lsn >= p[1].lsn) {
            return Err("its checkpoints are not in LSN order".into());
        }
        if self.images.windows(2).any(|p| p[0].lsn >= p[1].lsn) {
            return Err("its images are not in LSN order".into());
        }
        for cp in &self.checkpoints {
            let listed = layers_at_or_below(&self.layers, cp.lsn);
            if listed != cp.layers {
                return Err(format!(
                    "checkpoint LSN {} counts {} layers at or below it, the manifest lists {} \
                     (a layer it needs is not listed, or one is listed that it never had)",
                    cp.lsn, cp.layers, listed
                ));
            }
        }
        Ok(())
    }
}

/// How many of `layers` (in LSN order) end at or below `lsn`.
fn layers_at_or_below(layers: &[LayerRef], lsn: u64) -> usize {
    layers.partition_point(|l| l.last_lsn <= lsn)
}

/// Parses a manifest generation, refusing a format newer than this build reads (a newer
/// writer's manifest may hold what this reader would silently skip).
fn parse_manifest(
    store: &dyn ObjectStore,
    key: &str,
    data: &[u8],
) -> ObjrepResult<ReplicaManifest> {
    let manifest: ReplicaManifest =
        serde_json::from_slice(data).map_err(|e| malformed(store, key, e))?;
    if manifest.format_version <= IMAGES_FORMAT_VERSION {
        manifest.check().map_err(|e| malformed(store, key, e))?;
    }
    if manifest.format_version > IMAGES_FORMAT_VERSION {
        return Err(ObjrepError::Refused(format!(
            "object replica {}: manifest {key} has format version {}, this tinylag reads up to \
             {IMAGES_FORMAT_VERSION}; use a newer tinylag",
            store.describe(),
            manifest.format_version
        )));
    }
    Ok(manifest)
}

/// Reads generation `gen`; `None` when it is gone.
pub async fn load_generation(
    store: &dyn ObjectStore,
    gen: u64,
) -> ObjrepResult<Option<ReplicaManifest>> {
    let key = paths::checkpoint_key(gen);
    match store.get(&key).await {
        Ok(data) => parse_manifest(store, &key, &data).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Commits `change(newest)` as the next generation, where `newest` starts as `latest`: when
/// another writer (the agent, a compaction, a trim) commits that generation first, the
/// newest is read again and `change` applied to it. This is how the writers of one replica
/// share its manifest without a lock: each change is a function of the manifest it lands
/// on, and the conditional create orders them. `change` returns `None` when there is
/// nothing (left) to commit, or an error to stop.
pub(crate) async fn commit_change<F>(
    store: &dyn ObjectStore,
    latest: ReplicaManifest,
    mut change: F,
) -> ObjrepResult<Option<ReplicaManifest>>
where
    F: FnMut(&ReplicaManifest) -> ObjrepResult<Option<ReplicaManifest>>,
{
    const TRIES: usize = 16;
    let mut newest = latest;
    for _ in 0..TRIES {
        let Some(mut next) = change(&newest)? else {
            return Ok(None);
        };
        next.gen = newest.gen + 1;
        match commit(store, &next).await {
            Ok(()) => {
                // Committers delete `gen - 2`, so a writer whose view is older than the
                // newest by two or more can create a generation that existed and was deleted:
                // the create succeeds below the newest, where no reader looks. One LIST tells;
                // such a generation is deleted again and the change reapplied to the newest.
                let newest_gen = newest_generation(store).await?.unwrap_or(next.gen);
                if newest_gen > next.gen {
                    let _ = store.delete_many(&[paths::checkpoint_key(next.gen)]).await;
                    newest = load_latest(store)
                        .await?
                        .unwrap_or_else(ReplicaManifest::empty);
                    continue;
                }
                forget_before_previous(store, next.gen).await;
                return Ok(Some(next));
            }
            Err(ObjrepError::Raced { .. }) => {
                newest = load_latest(store)
                    .await?
                    .unwrap_or_else(ReplicaManifest::empty);
            }
            Err(e) => return Err(e),
        }
    }
    Err(ObjrepError::Raced {
        store: store.describe(),
        gen: newest.gen + 1,
    })
}

/// The highest generation in the store (one LIST).
async fn newest_generation(store: &dyn ObjectStore) -> ObjrepResult<Option<u64>> {
    Ok(list_all(store, paths::CHECKPOINTS_PREFIX)
        .await?
        .iter()
        .filter_map(|m| paths::parse_checkpoint_key(&m.key))
        .max())
}

/// After generation `gen` is committed, deletes generation `gen - 2`: each generation
/// repeats the whole list, so keeping them all would grow the store by the square of the
/// checkpoints; the previous one stays for a reader that listed just before (a DELETE,
/// free on S3; a failure only leaves it to `replica trim`).
pub(crate) async fn forget_before_previous(store: &dyn ObjectStore, gen: u64) {
    if let Some(old) = gen.checked_sub(2).filter(|g| *g > 0) {
        if let Err(e) = store.delete_many(&[paths::checkpoint_key(old)]).await {
            tracing::warn!(error = %e, "deleting an old manifest generation failed");
        }
    }
}

fn malformed(store: &dyn ObjectStore, key: &str, e: impl std::fmt::Display) -> ObjrepError {
    ObjrepError::Corrupt {
        store: store.describe(),
        key: key.to_string(),
        reason: e.to_string(),
    }
}

/// Reads the identity; `None` for a new (empty) replica root.
pub async fn load_identity(store: &dyn ObjectStore) -> ObjrepResult<Option<ReplicaIdentity>> {
    match store.get(paths::IDENTITY).await {
        Ok(data) => {
            let identity: ReplicaIdentity =
                serde_json::from_slice(&data).map_err(|e| malformed(store, paths::IDENTITY, e))?;
            if identity.format_version > FORMAT_VERSION {
                return Err(ObjrepError::Refused(format!(
                    "object replica {}: {} has format version {}, this tinylag reads up to \
                     {FORMAT_VERSION}; use a newer tinylag",
                    store.describe(),
                    paths::IDENTITY,
                    identity.format_version
                )));
            }
            Ok(Some(identity))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Creates the identity (conditional create; an existing one is returned as it is).
pub async fn create_identity(
    store: &dyn ObjectStore,
    identity: &ReplicaIdentity,
) -> ObjrepResult<ReplicaIdentity> {
    let body = serde_json::to_vec_pretty(identity).expect("identity serializes");
    match store
        .put_if_absent(paths::IDENTITY, Bytes::from(body))
        .await
    {
        Ok(()) => Ok(identity.clone()),
        Err(e) if e.is_already_exists() => Ok(load_identity(store)
            .await?
            .expect("an object that exists is found")),
        Err(e) => Err(e.into()),
    }
}

/// The newest manifest generation (one LIST of `checkpoints/`, one GET); `None` before the
/// first checkpoint.
pub async fn load_latest(store: &dyn ObjectStore) -> ObjrepResult<Option<ReplicaManifest>> {
    // The agent deletes the generation before the previous one after each commit: a listing
    // that two commits overtook names a deleted one, and is made again (a few times at most).
    let mut tries = 0;
    let (gen, key, data) = loop {
        let newest = list_all(store, paths::CHECKPOINTS_PREFIX)
            .await?
            .iter()
            .filter_map(|m| paths::parse_checkpoint_key(&m.key))
            .max();
        let Some(gen) = newest else {
            return Ok(None);
        };
        let key = paths::checkpoint_key(gen);
        match store.get(&key).await {
            Ok(data) => break (gen, key, data),
            Err(e) if e.is_not_found() && tries < 3 => tries += 1,
            Err(e) => return Err(e.into()),
        }
    };
    let manifest = parse_manifest(store, &key, &data)?;
    if manifest.gen != gen {
        return Err(malformed(
            store,
            &key,
            format!("holds generation {}", manifest.gen),
        ));
    }
    Ok(Some(manifest))
}

/// Commits `manifest` as its generation (conditional create): the checkpoint exists from
/// here on. Losing the create means another agent writes this replica.
pub async fn commit(store: &dyn ObjectStore, manifest: &ReplicaManifest) -> ObjrepResult<()> {
    let mut manifest = manifest.clone();
    // The version says what a reader must understand: images need version 2.
    manifest.format_version = if manifest.images.is_empty() {
        FORMAT_VERSION
    } else {
        IMAGES_FORMAT_VERSION
    };
    let body = serde_json::to_vec(&manifest).expect("manifest serializes");
    match store
        .put_if_absent(&paths::checkpoint_key(manifest.gen), Bytes::from(body))
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if e.is_already_exists() => Err(ObjrepError::Raced {
            store: store.describe(),
            gen: manifest.gen,
        }),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn image_ref(lsn: u64) -> ImageRef {
        serde_json::from_value(serde_json::json!({
            "lsn": lsn, "run": "0", "parts": []
        }))
        .expect("an image ref")
    }

    #[tokio::test]
    async fn a_checkpoint_whose_layers_are_not_all_listed_is_refused_naming_it() {
        let store = MemoryStore::new();
        let layer = |first: u64, last: u64| LayerRef {
            key: paths::layer_key(1, first, last, 7),
            first_lsn: first,
            last_lsn: last,
            size: 1,
        };
        let cp = |lsn| Checkpoint {
            lsn,
            timestamp_ns: lsn,
            next_seq: 0,
            layers: 0,
            next_timestamp_ns: None,
        };
        let mut m = ReplicaManifest::empty();
        m.gen = 1;
        m.layers = vec![layer(1, 10), layer(11, 20), layer(21, 30)];
        m.checkpoints = vec![cp(10), cp(30)];
        m.recount();
        assert_eq!(m.checkpoints[1].layers, 3);
        commit(&store, &m).await.unwrap();
        assert_eq!(load_latest(&store).await.unwrap().unwrap(), m);

        // A generation that lost the middle layer's entry: checkpoint 30 counted it.
        let mut lost = m.clone();
        lost.gen = 2;
        lost.layers.remove(1);
        commit(&store, &lost).await.unwrap();
        let text = load_latest(&store).await.unwrap_err().to_string();
        assert!(
            text.contains(&paths::checkpoint_key(2))
                && text.contains("corrupt")
                && text.contains("checkpoint LSN 30 counts 3 layers")
                && text.contains("lists 2"),
            "{text}"
        );
        // Layers out of order are named too.
        let mut swapped = m.clone();
        swapped.layers.swap(0, 1);
        let text = swapped.check().unwrap_err();
        assert!(text.contains("not in LSN order"), "{text}");
    }

    #[tokio::test]
    async fn a_manifest_with_images_says_version_2_and_a_newer_version_is_refused() {
        let store = MemoryStore::new();
        let mut m = ReplicaManifest::empty();
        m.gen = 1;
        commit(&store, &m).await.unwrap();
        assert_eq!(
            load_latest(&store).await.unwrap().unwrap().format_version,
            1
        );
        m.gen = 2;
        m.images.push(image_ref(5));
        commit(&store, &m).await.unwrap();
        let read = load_generation(&store, 2).await.unwrap().unwrap();
        assert_eq!(read.format_version, IMAGES_FORMAT_VERSION);
        assert_eq!(read.images.len(), 1);

        let mut future = serde_json::to_value(&read).unwrap();
        future["format_version"] = 3.into();
        future["gen"] = 3.into();
        store
            .put_if_absent(
                &paths::checkpoint_key(3),
                Bytes::from(serde_json::to_vec(&future).unwrap()),
            )
            .await
            .unwrap();
        for err in [
            load_latest(&store).await.unwrap_err(),
            load_generation(&store, 3).await.unwrap_err(),
        ] {
            let text = err.to_string();
            assert!(text.contains("format version 3"), "{text}");
            assert!(text.contains("use a newer tinylag"), "{text}");
        }
    }
}
