//! `mount --at|--mark --replica URI`: a point of an object replica as a read-only
//! [`BlockDevice`], read lazily — a read fetches only the object ranges that hold the bytes
//! it asks for, through a bounded local cache ([`super::cache`]). Nothing is copied at open.
//!
//! At open the point is resolved as `restore` resolves it ([`ObjSources::restore`]): the
//! newest checkpoint at or below it, and what [`ReplicaManifest::sources`] names for that
//! checkpoint. One map of the device is built from indexes alone, never payloads:
//! - the journal's lineage records after the checkpoint up to the point (segment indexes,
//!   one ranged GET each), the newest winning;
//! - then each delta layer after the image, newest first, filling what is still unmapped
//!   (its header and index: two or three ranged GETs; the index is kept, the body never);
//! - what is left is the image: a part's index is read when a read first reaches the part's
//!   range (at most [`PART_INDEXES`] kept), and bytes no part names are zeroes.
//!
//! A read fetches, for each piece, the **unit** that holds it: one data extent of a layer or
//! image part, or one journal record's payload — the smallest range whose CRC (and seal) can
//! be checked — with one ranged GET, unless the cache holds it. Reads of one unit that miss
//! together wait for one fetch. Memory: the map (one entry per mapped extent or record), the
//! indexes of the delta layers and of at most [`PART_INDEXES`] image parts, and the units of
//! the reads in flight; never a whole layer or image.
//!
//! Block status (NBD `base:allocation`) comes from the same map: zeroes the map names and
//! ranges no image part names are holes, everything else data.
//!
//! **Compaction and trim beside the mount** (DESIGN.md "Object replica", "A mount beside
//! compaction and trim"): the mount holds the manifest generation it opened, and `replica
//! trim` may delete what that generation names once two newer ones exist. A fetch that finds
//! an object missing reloads the newest generation, resolves the same LSN on it again and
//! retries the read: history is immutable, so the bytes are the same whatever objects now
//! hold them. When no retained checkpoint (and the journal after it) reaches the point any
//! more, the read fails (EIO) and one error line names the point.
//!
//! Must never: write to the replica or the journal; serve a byte that is not the point's;
//! use a unit whose CRC or seal failed; hold a whole layer or image in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;

use super::cache::DiskCache;
use super::error::{ObjrepError, ObjrepResult};
use super::image::{check_part, layer_error, read_index};
use super::layer::{ExtentKind, LayerExtent, LayerIndex};
use super::manifest::{self, Checkpoint, ImagePart, ImageRef, ReplicaManifest};
use super::restore::{ObjPoint, ObjSources};
use crate::block::allocation::{self, Allocation, Extent};
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo};
use crate::clock::format_ns;
use crate::journal::reader::JournalReader;
use crate::journal::segment::IndexEntry;
use crate::journal::{chain, consumer, head, mark, RecordKind};
use crate::sync::lock;
use crate::timetravel::extents::ExtentMap;

/// Image part indexes kept (each a few KiB for a part of large extents): a read that
/// reaches another part reads its index again (two ranged GETs).
pub(crate) const PART_INDEXES: usize = 64;
/// Delta layer indexes read at once while opening.
const INDEX_READS: usize = 8;
/// Reloads of the manifest one read may make before it fails: each is made only when an
/// object its generation named was deleted, which takes two newer generations.
const RELOADS: usize = 3;

/// A journal record whose payload holds some bytes of the point: byte `x` of the device is
/// payload byte `x - start`.
#[derive(Debug)]
struct JournalLoc {
    seq: u64,
    entry: IndexEntry,
    start: u64,
}

/// A delta layer opened for ranged reads: its key and its index's scope (the extents are in
/// the map, not kept twice).
#[derive(Debug)]
struct LayerObject {
    key: String,
    index: LayerIndex,
}

/// Where a mapped extent's bytes come from (unmapped: the image).
#[derive(Clone, Debug)]
enum Src {
    Zero,
    Journal(Arc<JournalLoc>),
    Layer(Arc<LayerObject>, LayerExtent),
}

/// The point on one manifest generation: the map and the image under it.
#[derive(Debug)]
struct Resolved {
    gen: u64,
    map: ExtentMap<Src>,
    image: Option<ImageRef>,
    point: MountPoint,
    deltas: usize,
    journal_records: u64,
}

/// What the mount serves, as resolved at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MountPoint {
    /// The LSN the device is as of.
    pub lsn: u64,
    pub timestamp_ns: u64,
    /// The checkpoint it starts from (0: the blank device at the journal's start).
    pub checkpoint_lsn: u64,
}

/// What a mount found at open (its banner and tests).
#[derive(Clone, Debug, Serialize)]
pub struct ObjViewSummary {
    pub point: MountPoint,
    /// The manifest generation read.
    pub gen: u64,
    /// The image layer under the checkpoint, if any (its LSN).
    pub image_lsn: Option<u64>,
    pub image_parts: usize,
    /// Delta layers after the image (their indexes are read at open).
    pub deltas: usize,
    /// Journal records after the checkpoint that change bytes (indexes only).
    pub journal_records: u64,
    /// Extents in the map (records and delta layer extents).
    pub extents: usize,
}

/// The point to resolve: what the user asked, or (after a reload) the LSN it resolved to.
enum Want<'a> {
    Point(&'a ObjPoint),
    Lsn(u64),
}

/// Why a read failed: an object the generation names is missing (reload and retry), or
/// anything else (the message).
enum Fault {
    Missing(String),
    Other(String),
}

impl From<ObjrepError> for Fault {
    fn from(e: ObjrepError) -> Fault {
        match e {
            ObjrepError::Missing { key, .. } => Fault::Missing(key),
            e => Fault::Other(e.to_string()),
        }
    }
}

/// Image part indexes by key, least recently used out first.
#[derive(Debug, Default)]
struct PartIndexes {
    map: HashMap<String, (Arc<LayerIndex>, u64)>,
    tick: u64,
}

/// A point of an object replica as a read-only device (see the module docs).
#[derive(Debug)]
pub struct ObjView {
    sources: ObjSources,
    reader: JournalReader,
    cache: Arc<DiskCache>,
    state: RwLock<Arc<Resolved>>,
    /// Held while a reload reads the newest generation, so reads that fail together reload
    /// once.
    reloading: tokio::sync::Mutex<()>,
    parts: Mutex<PartIndexes>,
    /// One gate per unit being fetched: reads of the unit that miss together wait for the
    /// first one's fetch and then find it in the cache.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    summary: ObjViewSummary,
    /// The error line about a lost point was logged (once: every later read fails the same
    /// way).
    told: AtomicBool,
    cache_warned: AtomicBool,
}

// Locks: `state`, `parts` and `gates` are taken with `sync::lock`/`read`/`write` (each
// critical section is one map call or one assignment, so a panicking holder leaves them
// consistent), never two at once and never across an await.

impl ObjView {
    /// Resolves `point` on the replica's newest manifest (refused as `restore` refuses it:
    /// outside the retention, inside a resync span, after a journal hole) and builds its map.
    pub async fn open(
        sources: ObjSources,
        point: &ObjPoint,
        cache: Arc<DiskCache>,
    ) -> ObjrepResult<ObjView> {
        let reader = JournalReader::new(sources.journal.clone(), sources.jm.clone());
        let resolved = resolve(&sources, &reader, &sources.manifest, Want::Point(point)).await?;
        let summary = ObjViewSummary {
            point: resolved.point,
            gen: resolved.gen,
            image_lsn: resolved.image.as_ref().map(|i| i.lsn),
            image_parts: resolved.image.as_ref().map_or(0, |i| i.parts.len()),
            deltas: resolved.deltas,
            journal_records: resolved.journal_records,
            extents: resolved.map.len(),
        };
        Ok(ObjView {
            sources,
            reader,
            cache,
            state: RwLock::new(Arc::new(resolved)),
            reloading: tokio::sync::Mutex::new(()),
            parts: Mutex::new(PartIndexes::default()),
            gates: Mutex::new(HashMap::new()),
            summary,
            told: AtomicBool::new(false),
            cache_warned: AtomicBool::new(false),
        })
    }

    pub fn summary(&self) -> &ObjViewSummary {
        &self.summary
    }

    /// The manifest generation the reads use now (it changes after a reload).
    pub fn generation(&self) -> u64 {
        crate::sync::read(&self.state).gen
    }

    fn resolved(&self) -> Arc<Resolved> {
        crate::sync::read(&self.state).clone()
    }

    /// After `key` (named by generation `seen`) was found missing: reads the newest
    /// generation and resolves the same LSN on it. An error is the reason the point is lost.
    async fn reload(&self, seen: u64, key: &str) -> Result<(), String> {
        let _one = self.reloading.lock().await;
        if self.resolved().gen != seen {
            return Ok(()); // another read reloaded meanwhile
        }
        let store = self.sources.replica.as_ref();
        let newest = manifest::load_latest(store)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("object replica {} has no manifest", store.describe()))?;
        if newest.gen == seen {
            return Err(format!(
                "object {key} named by manifest generation {seen}, still the newest, is \
                 missing from {}",
                store.describe()
            ));
        }
        let lsn = self.summary.point.lsn;
        let resolved = resolve(&self.sources, &self.reader, &newest, Want::Lsn(lsn))
            .await
            .map_err(|e| e.to_string())?;
        // A warning: what the mount reads from changed under it (its bytes did not).
        tracing::warn!(
            from = seen,
            to = newest.gen,
            lsn,
            "object {key} of manifest generation {seen} was deleted by a replica trim; the \
             point was resolved again on generation {}",
            newest.gen
        );
        *crate::sync::write(&self.state) = Arc::new(resolved);
        Ok(())
    }

    /// The point's bytes of `offset..offset + buf.len()`, reloading the manifest when an
    /// object was deleted under the mount (as [`Self::with_reloads`] does for other calls).
    async fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut reloads = 0;
        loop {
            let state = self.resolved();
            match self.read_resolved(&state, offset, buf).await {
                Ok(()) => return Ok(()),
                Err(Fault::Missing(key)) if reloads < RELOADS => {
                    reloads += 1;
                    self.reload(state.gen, &key).await?;
                }
                Err(Fault::Missing(key)) => {
                    return Err(format!("object {key} is missing after {RELOADS} reloads"))
                }
                Err(Fault::Other(e)) => return Err(e),
            }
        }
    }

    async fn read_resolved(
        &self,
        state: &Resolved,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), Fault> {
        let end = offset + buf.len() as u64;
        for (s, e, src) in state.map.pieces(offset, end) {
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Some(Src::Zero) => out.fill(0),
                Some(Src::Journal(loc)) => self.journal_unit(&loc, s - loc.start, out).await?,
                Some(Src::Layer(layer, ext)) => {
                    self.layer_unit(
                        state.gen,
                        &layer.key,
                        &layer.index,
                        &ext,
                        s - ext.offset,
                        out,
                    )
                    .await?
                }
                None => self.read_image(state, s, out).await?,
            }
        }
        Ok(())
    }

    /// Bytes of the image (under every delta and record) at `offset`: its parts' data
    /// extents, zeroes elsewhere.
    async fn read_image(&self, state: &Resolved, offset: u64, out: &mut [u8]) -> Result<(), Fault> {
        let Some(image) = &state.image else {
            out.fill(0);
            return Ok(());
        };
        let end = offset + out.len() as u64;
        let zero = |out: &mut [u8], from: u64, to: u64| {
            out[(from - offset) as usize..(to - offset) as usize].fill(0)
        };
        let mut at = offset;
        let first = image.parts.partition_point(|p| p.end <= offset);
        for part in &image.parts[first..] {
            if part.start >= end {
                break;
            }
            if part.start > at {
                zero(out, at, part.start);
                at = part.start;
            }
            let hi = part.end.min(end);
            let index = self.part_index(state.gen, image.lsn, part).await?;
            for ext in index.overlapping(at, hi) {
                let (lo, xe) = (ext.offset.max(at), (ext.offset + ext.len).min(hi));
                if lo > at {
                    zero(out, at, lo);
                }
                let piece = &mut out[(lo - offset) as usize..(xe - offset) as usize];
                match ext.kind {
                    ExtentKind::Data => {
                        self.layer_unit(state.gen, &part.key, &index, ext, lo - ext.offset, piece)
                            .await?
                    }
                    ExtentKind::Zero | ExtentKind::Hole => piece.fill(0),
                }
                at = xe;
            }
            if hi > at {
                zero(out, at, hi);
            }
            at = hi;
        }
        if end > at {
            zero(out, at, end);
        }
        Ok(())
    }

    /// The index of an image part (kept for the next read that reaches it).
    async fn part_index(
        &self,
        gen: u64,
        image_lsn: u64,
        part: &ImagePart,
    ) -> Result<Arc<LayerIndex>, Fault> {
        {
            let mut parts = lock(&self.parts);
            parts.tick += 1;
            let tick = parts.tick;
            if let Some((index, used)) = parts.map.get_mut(&part.key) {
                *used = tick;
                return Ok(index.clone());
            }
        }
        let store = self.sources.replica.as_ref();
        let index = read_index(store, &part.key, gen, &self.sources.identity, 0, image_lsn).await?;
        check_part(store, part, &index.extents)?;
        let index = Arc::new(index);
        let mut parts = lock(&self.parts);
        if parts.map.len() >= PART_INDEXES {
            let oldest = parts
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                parts.map.remove(&k);
            }
        }
        let tick = parts.tick;
        parts.map.insert(part.key.clone(), (index.clone(), tick));
        Ok(index)
    }

    /// Bytes `from..` of a layer's (or image part's) data extent `ext` into `out`.
    async fn layer_unit(
        &self,
        gen: u64,
        key: &str,
        index: &LayerIndex,
        ext: &LayerExtent,
        from: u64,
        out: &mut [u8],
    ) -> Result<(), Fault> {
        let name = format!("{key}#{}", ext.body_pos);
        let store = self.sources.replica.as_ref();
        self.unit(&name, from, out, || async move {
            let stored = store
                .get_range(key, index.object_range(ext))
                .await
                .map_err(|e| Fault::from(super::image::named_error(store, key, gen, e)))?;
            index
                .open(ext, stored)
                .map_err(|e| Fault::from(layer_error(store, key, e)))
        })
        .await
    }

    /// Bytes `from..` of a journal record's payload into `out`.
    async fn journal_unit(&self, loc: &JournalLoc, from: u64, out: &mut [u8]) -> Result<(), Fault> {
        let name = format!("journal/{}#{}", loc.seq, loc.entry.body_pos);
        self.unit(&name, from, out, || async move {
            let data = self
                .reader
                .payload(loc.seq, &loc.entry)
                .await
                .map_err(|e| {
                    Fault::Other(format!(
                        "journal {}: record LSN {} of segment seq {} (the journal after the \
                     checkpoint holds the point): {e}",
                        self.reader.store().describe(),
                        loc.entry.lsn,
                        loc.seq
                    ))
                })?;
            if (data.len() as u64) < loc.entry.length {
                return Err(Fault::Other(format!(
                    "record LSN {} payload is {} bytes, its index says {}",
                    loc.entry.lsn,
                    data.len(),
                    loc.entry.length
                )));
            }
            Ok(data)
        })
        .await
    }

    /// Bytes `from..from + out.len()` of unit `name`: from the cache, or fetched (once for
    /// all the reads that wait for it) and kept.
    async fn unit<F, Fut>(
        &self,
        name: &str,
        from: u64,
        out: &mut [u8],
        fetch: F,
    ) -> Result<(), Fault>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Bytes, Fault>>,
    {
        if self.cached(name, from, out) {
            return Ok(());
        }
        let gate = lock(&self.gates)
            .entry(name.to_string())
            .or_default()
            .clone();
        let result = async {
            let _fetching = gate.lock().await;
            if self.cached(name, from, out) {
                return Ok(());
            }
            let data = fetch().await?;
            let Some(bytes) = data.get(from as usize..from as usize + out.len()) else {
                return Err(Fault::Other(format!(
                    "{name}: {} bytes, a read wants {} from {from}",
                    data.len(),
                    out.len()
                )));
            };
            out.copy_from_slice(bytes);
            if let Err(e) = self.cache.put(name, &data) {
                self.warn_cache(&e);
            }
            Ok(())
        }
        .await;
        let mut gates = lock(&self.gates);
        // The map's and ours: no other read waits on this gate.
        if Arc::strong_count(&gate) <= 2 {
            gates.remove(name);
        }
        result
    }

    /// Whether the cache held the bytes (an error reading it is a miss, warned once).
    fn cached(&self, name: &str, from: u64, out: &mut [u8]) -> bool {
        match self.cache.read(name, from, out) {
            Ok(hit) => hit,
            Err(e) => {
                self.warn_cache(&e);
                false
            }
        }
    }

    fn warn_cache(&self, e: &std::io::Error) {
        if !self.cache_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.cache.dir().display(),
                error = %e,
                "the mount's cache failed; reads go to the store"
            );
        }
    }

    /// What `offset..end` holds (NBD block status), before the cap of `max` extents: zeroes
    /// the map names and ranges no image part names are holes, everything else data.
    async fn allocation_resolved(
        &self,
        state: &Resolved,
        offset: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<Extent>, Fault> {
        let mut out = Vec::new();
        for (s, e, src) in state.map.pieces(offset, end) {
            let room = match src {
                Some(Src::Zero) => allocation::push(&mut out, e - s, Allocation::Hole, max),
                Some(_) => allocation::push(&mut out, e - s, Allocation::Data, max),
                None => self
                    .image_allocation(state, s, e)
                    .await?
                    .into_iter()
                    .all(|(len, a)| allocation::push(&mut out, len, a, max)),
            };
            if !room {
                break;
            }
        }
        Ok(out)
    }

    /// The image's allocation of `offset..end`: its parts' data extents are data, the rest
    /// holes (consecutive `(len, allocation)` from `offset`).
    async fn image_allocation(
        &self,
        state: &Resolved,
        offset: u64,
        end: u64,
    ) -> Result<Vec<(u64, Allocation)>, Fault> {
        let Some(image) = &state.image else {
            return Ok(vec![(end - offset, Allocation::Hole)]);
        };
        let mut out = Vec::new();
        let mut at = offset;
        let first = image.parts.partition_point(|p| p.end <= offset);
        for part in &image.parts[first..] {
            if part.start >= end {
                break;
            }
            if part.start > at {
                out.push((part.start - at, Allocation::Hole));
                at = part.start;
            }
            let hi = part.end.min(end);
            let index = self.part_index(state.gen, image.lsn, part).await?;
            for ext in index.overlapping(at, hi) {
                let (lo, xe) = (ext.offset.max(at), (ext.offset + ext.len).min(hi));
                if lo > at {
                    out.push((lo - at, Allocation::Hole));
                }
                let a = match ext.kind {
                    ExtentKind::Data => Allocation::Data,
                    ExtentKind::Zero | ExtentKind::Hole => Allocation::Hole,
                };
                out.push((xe - lo, a));
                at = xe;
            }
            if hi > at {
                out.push((hi - at, Allocation::Hole));
            }
            at = hi;
        }
        if end > at {
            out.push((end - at, Allocation::Hole));
        }
        Ok(out)
    }

    /// Runs `op` on the current resolution, reloading the manifest when an object it needs
    /// was deleted under the mount (as [`Self::read_point`] does for reads).
    async fn with_reloads<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: Fn(Arc<Resolved>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Fault>>,
    {
        let mut reloads = 0;
        loop {
            let state = self.resolved();
            let gen = state.gen;
            match op(state).await {
                Ok(v) => return Ok(v),
                Err(Fault::Missing(key)) if reloads < RELOADS => {
                    reloads += 1;
                    self.reload(gen, &key).await?;
                }
                Err(Fault::Missing(key)) => {
                    return Err(format!("object {key} is missing after {RELOADS} reloads"))
                }
                Err(Fault::Other(e)) => return Err(e),
            }
        }
    }

    /// The error of a failed read or block status: EIO, and one error line for the mount's
    /// life naming the point.
    fn failed(&self, reason: String) -> BlockError {
        if !self.told.swap(true, Ordering::Relaxed) {
            tracing::error!(
                "mount of object replica {} as of {}: reads fail: {reason}",
                self.sources.replica.describe(),
                self.point_text()
            );
        }
        BlockError::Io(std::io::Error::other(reason))
    }

    fn point_text(&self) -> String {
        let p = self.summary.point;
        format!("LSN {} ({})", p.lsn, format_ns(p.timestamp_ns))
    }
}

/// Resolves `want` on `manifest` and maps it (see the module docs).
async fn resolve(
    sources: &ObjSources,
    reader: &JournalReader,
    manifest: &ReplicaManifest,
    want: Want<'_>,
) -> ObjrepResult<Resolved> {
    let journal = sources.journal.as_ref();
    let (target_lsn, until_ns) = match &want {
        Want::Point(ObjPoint::Mark(name)) => (mark::load(journal, name).await?.lsn, u64::MAX),
        Want::Point(ObjPoint::Time(t)) => (u64::MAX, *t),
        // The newest point the journal extends (promote's; a mount names a mark or a time).
        Want::Point(ObjPoint::End) => (u64::MAX, u64::MAX),
        Want::Lsn(lsn) => (*lsn, u64::MAX),
    };
    let base = match &want {
        Want::Point(ObjPoint::Time(t)) => manifest.at_or_before_time(*t),
        _ => manifest.at_or_below(target_lsn),
    }
    .cloned();
    // As restore decides it: the checkpoint is the point itself (a mark or LSN on it, or a
    // time before the record that follows it), and then no journal is read.
    let exact = base.as_ref().is_some_and(|b| {
        b.lsn == target_lsn || b.next_timestamp_ns.is_some_and(|next| next > until_ns)
    });
    let mut resolved = Resolved {
        gen: manifest.gen,
        map: ExtentMap::default(),
        image: None,
        point: MountPoint {
            lsn: base.as_ref().map_or(0, |b| b.lsn),
            timestamp_ns: base.as_ref().map_or(0, |b| b.timestamp_ns),
            checkpoint_lsn: base.as_ref().map_or(0, |b| b.lsn),
        },
        deltas: 0,
        journal_records: 0,
    };
    if !exact {
        map_journal(
            sources,
            reader,
            base.as_ref(),
            target_lsn,
            until_ns,
            &mut resolved,
        )
        .await?;
    }
    if let Some(cp) = &base {
        map_layers(sources, manifest, cp, &mut resolved).await?;
    }
    Ok(resolved)
}

/// Maps the journal's lineage records after `base` up to the point (newest wins), from
/// segment indexes; sets the point's LSN and time.
async fn map_journal(
    sources: &ObjSources,
    reader: &JournalReader,
    base: Option<&Checkpoint>,
    target_lsn: u64,
    until_ns: u64,
    resolved: &mut Resolved,
) -> ObjrepResult<()> {
    let journal = sources.journal.as_ref();
    let from_seq = base.map_or(0, |b| b.next_seq);
    let trim = consumer::load_trim_pointer(journal).await?;
    if trim.first_seq > from_seq {
        return Err(ObjrepError::Refused(format!(
            "the point lies after checkpoint LSN {} of object replica {}, and journal {} no \
             longer holds the records after it (trimmed to LSN {}); only its checkpoints are \
             mountable there: `tinylag timeline --journal {} --replica {}` lists them",
            base.map_or(0, |b| b.lsn),
            sources.replica.describe(),
            journal.describe(),
            trim.first_lsn,
            journal.describe(),
            sources.replica.describe(),
        )));
    }
    let lineage = chain::load(journal).await?.lineage();
    let layout = sources.jm.layout();
    let size = sources.identity.size;
    let after = base.map_or(0, |b| b.lsn);
    let mut span_begin: Option<u64> = None;
    let mut seq = from_seq;
    'segments: loop {
        let Some(index) = reader.index(seq).await? else {
            // Missing below the journal's known end is a hole, never the end.
            let known = head::known_end(journal).await?;
            head::check_missing(journal, &sources.jm, seq, &known).await?;
            if target_lsn == u64::MAX {
                break;
            }
            return Err(ObjrepError::Refused(format!(
                "journal {} ends at LSN {} (seq {seq} is missing), before the point at LSN \
                 {target_lsn}",
                journal.describe(),
                resolved.point.lsn.max(after)
            )));
        };
        let key = sources.jm.segment_key(seq);
        for e in index.entries.iter().filter(|e| e.lsn > after) {
            if e.lsn > target_lsn || e.timestamp_ns > until_ns {
                break 'segments;
            }
            if lineage.contains(e.lsn) {
                match e.kind {
                    RecordKind::ResyncBegin => span_begin = Some(e.lsn),
                    RecordKind::ResyncEnd => span_begin = None,
                    RecordKind::Write
                    | RecordKind::ResyncData
                    | RecordKind::Discard
                    | RecordKind::WriteZeroes => {
                        let start = layout
                            .to_global(e.dev, e.offset, e.length)
                            .ok()
                            .filter(|s| s.checked_add(e.length).is_some_and(|end| end <= size))
                            .ok_or_else(|| ObjrepError::Corrupt {
                                store: journal.describe(),
                                key: key.clone(),
                                reason: format!(
                                    "record LSN {} writes {} bytes at {} of device {}, outside \
                                     the replica's {size} bytes",
                                    e.lsn, e.length, e.offset, e.dev
                                ),
                            })?;
                        let src = match e.kind {
                            RecordKind::Write | RecordKind::ResyncData => {
                                Src::Journal(Arc::new(JournalLoc {
                                    seq,
                                    entry: e.clone(),
                                    start,
                                }))
                            }
                            _ => Src::Zero,
                        };
                        resolved.map.overwrite(start, start + e.length, src);
                        resolved.journal_records += 1;
                    }
                    _ => {}
                }
            }
            resolved.point.lsn = e.lsn;
            resolved.point.timestamp_ns = e.timestamp_ns;
            if e.lsn == target_lsn {
                break 'segments;
            }
        }
        seq = index.header.next_seq;
    }
    if let Some(begin) = span_begin {
        return Err(ObjrepError::Refused(format!(
            "LSN {} is inside a resync span (begun at LSN {begin}): no consistent image exists \
             there; choose a point before LSN {begin} or after the span ends",
            resolved.point.lsn
        )));
    }
    if target_lsn != u64::MAX && resolved.point.lsn != target_lsn {
        return Err(ObjrepError::Refused(format!(
            "journal {} does not reach LSN {target_lsn}",
            journal.describe()
        )));
    }
    Ok(())
}

/// Maps the delta layers after the image under `cp` (newest first, filling gaps: the
/// journal's records are newer) and notes the image.
async fn map_layers(
    sources: &ObjSources,
    manifest: &ReplicaManifest,
    cp: &Checkpoint,
    resolved: &mut Resolved,
) -> ObjrepResult<()> {
    let store = sources.replica.as_ref();
    let point_sources = manifest.sources(cp);
    // Owned keys: a future borrowing the manifest's refs would not be `Send` for every
    // lifetime the reads' callers need.
    let wanted: Vec<(String, u64, u64)> = point_sources
        .deltas
        .iter()
        .map(|l| (l.key.clone(), l.first_lsn, l.last_lsn))
        .collect();
    let (gen, identity) = (manifest.gen, &sources.identity);
    let indexes: Vec<LayerIndex> =
        stream::iter(wanted.into_iter().map(|(key, first, last)| async move {
            read_index(store, &key, gen, identity, first, last).await
        }))
        .buffered(INDEX_READS)
        .try_collect()
        .await?;
    for (l, mut index) in point_sources.deltas.iter().zip(indexes).rev() {
        let extents = std::mem::take(&mut index.extents);
        let layer = Arc::new(LayerObject {
            key: l.key.clone(),
            index,
        });
        for e in extents {
            let src = match e.kind {
                ExtentKind::Data => Src::Layer(layer.clone(), e),
                ExtentKind::Zero | ExtentKind::Hole => Src::Zero,
            };
            resolved.map.fill_gaps(e.offset, e.offset + e.len, src);
        }
    }
    resolved.deltas = point_sources.deltas.len();
    resolved.image = point_sources.image.cloned();
    Ok(())
}

#[async_trait]
impl BlockDevice for ObjView {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.sources.identity.size,
            block_size: self.sources.identity.block_size,
            read_only: true,
            supports_trim: false,
            supports_write_zeroes: false,
            flush_covers_all_connections: true,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), self.sources.identity.size)?;
        let mut buf = vec![0u8; len as usize];
        self.read_point(offset, &mut buf)
            .await
            .map_err(|reason| self.failed(reason))?;
        Ok(Bytes::from(buf))
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.sources.identity.size)?;
        self.with_reloads(|state| async move {
            self.allocation_resolved(&state, offset, offset + len, max_extents.max(1))
                .await
        })
        .await
        .map_err(|reason| self.failed(reason))
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _fua: bool) -> Result<(), BlockError> {
        Err(BlockError::ReadOnly)
    }
}
