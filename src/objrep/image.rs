//! Image layers: the whole image at a checkpoint, made by compaction from what
//! [`ReplicaManifest::sources`] names for it (the newest image at or below it, then the
//! delta layers after that image), written as parts by offset range, one window at a time.
//!
//! An image part is a layer in [`super::layer`]'s format (the same codec, sealed the same
//! way) over LSNs `0..=lsn`: the net effect of everything up to the checkpoint, data extents
//! only — zero and never-written ranges are in no part at all.
//!
//! Must never: hold more than one part and one window of the image in memory; name a part
//! in a manifest before it is durable; read a source without checking it (magic, UUID, LSN
//! range, CRCs, tags); emit an extent outside its part's range.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use super::error::{ObjrepError, ObjrepResult};
use super::layer::{self, ExtentKind, LayerError, LayerExtent, LayerIndex};
use super::manifest::{Checkpoint, ImagePart, ImageRef, ReplicaIdentity, ReplicaManifest};
use crate::crypto::Key;
use crate::journal::paths::objrep as paths;
use crate::journal::record::Op;
use crate::replayer::overlay::{Fill, Overlay};
use crate::store::ObjectStore;

/// An image part's data extents are merged while adjacent, up to this size: an image read
/// back finds few, large extents (delta layers of 4 KiB writes hold many small ones).
const MERGE_LIMIT: u64 = 1 << 20;

/// The error of a layer or image part that did not decode, naming the object.
pub(crate) fn layer_error(store: &dyn ObjectStore, key: &str, e: LayerError) -> ObjrepError {
    match e {
        LayerError::Corrupt(reason) => ObjrepError::Corrupt {
            store: store.describe(),
            key: key.to_string(),
            reason,
        },
        LayerError::Sealed(error) => ObjrepError::Sealed {
            store: store.describe(),
            key: key.to_string(),
            error,
        },
    }
}

/// A store error on an object `manifest` names: a missing object is named as such.
pub(crate) fn named_error(
    store: &dyn ObjectStore,
    key: &str,
    manifest: u64,
    e: crate::store::StoreError,
) -> ObjrepError {
    if e.is_not_found() {
        ObjrepError::Missing {
            store: store.describe(),
            key: key.to_string(),
            manifest: paths::checkpoint_key(manifest),
        }
    } else {
        e.into()
    }
}

/// Reads a layer's header and index (two ranged GETs, a third when the index is longer than
/// the first tail read), without its body.
pub(crate) async fn read_index(
    store: &dyn ObjectStore,
    key: &str,
    gen: u64,
    identity: &ReplicaIdentity,
    first: u64,
    last: u64,
) -> ObjrepResult<LayerIndex> {
    const TAIL: u64 = 64 << 10;
    let fail = |e| named_error(store, key, gen, e);
    let header = store
        .get_range(key, 0..layer::HEADER_LEN as u64)
        .await
        .map_err(fail)?;
    let (mut tail, size) = store.get_tail(key, TAIL).await.map_err(fail)?;
    let need = layer::index_len(&tail)
        .map_err(|e| layer_error(store, key, e))?
        .saturating_add(layer::TRAILER_LEN as u64)
        .min(size);
    if need > tail.len() as u64 {
        tail = store
            .get_range(key, size - need..size)
            .await
            .map_err(fail)?;
    }
    layer::decode_index(&header, &tail, size, identity.journal_uuid, first, last)
        .map_err(|e| layer_error(store, key, e))
}

/// A source of the image opened for ranged reads.
struct Source {
    key: String,
    index: LayerIndex,
}

impl Source {
    /// Records the source's extents overlapping `window` into `overlay` (clipped to it),
    /// fetching their data with one ranged GET. Each extent's bytes are copied out of the
    /// fetched buffer, so what the overlay keeps is only the live bytes of the window.
    async fn read_window(
        &self,
        store: &dyn ObjectStore,
        gen: u64,
        window: &Range<u64>,
        overlay: &mut Overlay,
        order: &mut u64,
    ) -> ObjrepResult<()> {
        let extents = self.index.overlapping(window.start, window.end);
        let data: Vec<_> = extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .collect();
        let fetched = match (data.first(), data.last()) {
            (Some(a), Some(b)) => {
                let range = self.index.object_range(a).start..self.index.object_range(b).end;
                let start = range.start;
                let bytes = store
                    .get_range(&self.key, range)
                    .await
                    .map_err(|e| named_error(store, &self.key, gen, e))?;
                Some((start, bytes))
            }
            _ => None,
        };
        for e in extents {
            let lo = e.offset.max(window.start);
            let hi = (e.offset + e.len).min(window.end);
            *order += 1;
            let op = match e.kind {
                ExtentKind::Data => {
                    let (start, bytes) = fetched.as_ref().expect("a data extent was fetched");
                    let r = self.index.object_range(e);
                    let stored = bytes.slice((r.start - start) as usize..(r.end - start) as usize);
                    let plain = self
                        .index
                        .open(e, stored)
                        .map_err(|err| layer_error(store, &self.key, err))?;
                    let clipped = &plain[(lo - e.offset) as usize..(hi - e.offset) as usize];
                    Op::Write {
                        offset: lo,
                        data: Bytes::copy_from_slice(clipped),
                    }
                }
                // In an image, a hole and written zeroes are the same: no part holds them.
                ExtentKind::Zero | ExtentKind::Hole => Op::WriteZeroes {
                    offset: lo,
                    len: hi - lo,
                },
            };
            overlay.record(*order, &op);
        }
        Ok(())
    }
}

/// How an image is cut into parts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PartSize {
    /// A part holds at most this many bytes of data.
    pub(crate) part_bytes: u64,
    /// The window of the device address space read at once (a quarter of a part, 64 KiB to
    /// 16 MiB, a multiple of 4 KiB): memory is one part and one window.
    pub(crate) window: u64,
}

impl PartSize {
    pub(crate) fn new(part_bytes: u64) -> PartSize {
        let window = (part_bytes / 4).clamp(64 << 10, 16 << 20) & !4095;
        PartSize {
            part_bytes: part_bytes.max(window),
            window,
        }
    }
}

/// What building an image did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ImageStats {
    pub parts: usize,
    /// Bytes of the part objects.
    pub bytes: u64,
    /// Bytes of data the image holds (the live data at its LSN).
    pub data_bytes: u64,
    /// Source layers read (image parts and delta layers).
    pub sources: usize,
}

/// Builds the image at checkpoint `cp` of `manifest` and uploads its parts (each by
/// conditional create under compaction run `run`); returns what a manifest names it by.
pub(crate) async fn build(
    store: &dyn ObjectStore,
    identity: &ReplicaIdentity,
    manifest: &ReplicaManifest,
    cp: &Checkpoint,
    run: u64,
    size: PartSize,
    seal_with: Option<&Key>,
) -> ObjrepResult<(ImageRef, ImageStats)> {
    let mut image = ImageRef {
        lsn: cp.lsn,
        run: format!("{run:016x}"),
        parts: Vec::new(),
    };
    match build_parts(
        store, identity, manifest, cp, run, size, seal_with, &mut image,
    )
    .await
    {
        Ok(stats) => Ok((image, stats)),
        Err(e) => {
            // A source that fails to read stops the compaction; what it uploaded goes too,
            // so a failed compaction leaves the store as it found it.
            discard(store, &image).await;
            Err(e)
        }
    }
}

/// Deletes the parts of an image no manifest will name (best effort: `replica trim`
/// deletes what is left once the run is older than the orphan grace).
pub(crate) async fn discard(store: &dyn ObjectStore, image: &ImageRef) {
    let keys: Vec<String> = image.parts.iter().map(|p| p.key.clone()).collect();
    if keys.is_empty() {
        return;
    }
    if let Err(e) = store.delete_many(&keys).await {
        tracing::warn!(error = %e, "deleting an uncommitted image failed");
    }
}

#[allow(clippy::too_many_arguments)]
async fn build_parts(
    store: &dyn ObjectStore,
    identity: &ReplicaIdentity,
    manifest: &ReplicaManifest,
    cp: &Checkpoint,
    run: u64,
    size: PartSize,
    seal_with: Option<&Key>,
    image: &mut ImageRef,
) -> ObjrepResult<ImageStats> {
    let gen = manifest.gen;
    let sources = manifest.sources(cp);
    let mut stats = ImageStats::default();
    // Delta layers' indexes are read up front (they are small: one entry per extent); an
    // older image's parts one at a time, as the windows reach them.
    let mut deltas = Vec::with_capacity(sources.deltas.len());
    for l in &sources.deltas {
        let index = read_index(store, &l.key, gen, identity, l.first_lsn, l.last_lsn).await?;
        deltas.push(Source {
            key: l.key.clone(),
            index,
        });
    }
    stats.sources = deltas.len() + sources.image.map_or(0, |i| i.parts.len());
    let base_parts: &[ImagePart] = sources.image.map_or(&[], |i| &i.parts);
    let base_lsn = sources.image.map_or(0, |i| i.lsn);
    let mut loaded: Vec<(usize, Source)> = Vec::new();
    let mut part = Overlay::new();
    let (mut part_start, mut part_data) = (0u64, 0u64);
    let mut window_start = 0u64;
    while window_start < identity.size {
        let window = window_start..(window_start + size.window).min(identity.size);
        let mut overlay = Overlay::new();
        let mut order = 0u64;
        // The older image's parts that overlap the window, oldest source first.
        loaded.retain(|(i, _)| base_parts[*i].end > window.start);
        for (i, p) in base_parts.iter().enumerate() {
            if p.start >= window.end || p.end <= window.start {
                continue;
            }
            if !loaded.iter().any(|(j, _)| *j == i) {
                let index = read_index(store, &p.key, gen, identity, 0, base_lsn).await?;
                check_part(store, p, &index.extents)?;
                loaded.push((
                    i,
                    Source {
                        key: p.key.clone(),
                        index,
                    },
                ));
            }
        }
        for (_, s) in &loaded {
            s.read_window(store, gen, &window, &mut overlay, &mut order)
                .await?;
        }
        for s in &deltas {
            s.read_window(store, gen, &window, &mut overlay, &mut order)
                .await?;
        }
        part_data += merge_data(&overlay, &mut part);
        let last = window.end >= identity.size;
        if part.is_empty() {
            part_start = window.end;
        } else if last || part_data + size.window > size.part_bytes {
            let key = paths::image_key(cp.lsn, run, image.parts.len() as u32);
            let bytes = layer::encode(identity.journal_uuid, 0, cp.lsn, &part, seal_with);
            let len = bytes.len() as u64;
            store.put_if_absent(&key, bytes).await?;
            image.parts.push(ImagePart {
                key,
                start: part_start,
                end: window.end,
                size: len,
            });
            stats.bytes += len;
            stats.data_bytes += part_data;
            part = Overlay::new();
            part_data = 0;
            part_start = window.end;
        }
        window_start = window.end;
    }
    stats.parts = image.parts.len();
    Ok(stats)
}

/// Refuses an image part whose extents leave the range the manifest gives it.
pub(crate) fn check_part(
    store: &dyn ObjectStore,
    p: &ImagePart,
    extents: &[LayerExtent],
) -> ObjrepResult<()> {
    let outside = extents
        .iter()
        .find(|e| e.offset < p.start || e.offset + e.len > p.end);
    match outside {
        Some(e) => Err(ObjrepError::Corrupt {
            store: store.describe(),
            key: p.key.clone(),
            reason: format!(
                "extent at {} of {} bytes lies outside the part's range {}..{}",
                e.offset, e.len, p.start, p.end
            ),
        }),
        None => Ok(()),
    }
}

/// Adds the data extents of a window's `overlay` to `part`, adjacent ones merged up to
/// [`MERGE_LIMIT`]; returns the bytes added.
fn merge_data(overlay: &Overlay, part: &mut Overlay) -> u64 {
    let mut added = 0u64;
    let mut run: Option<(u64, BytesMut)> = None;
    let flush = |run: &mut Option<(u64, BytesMut)>, part: &mut Overlay| {
        if let Some((offset, data)) = run.take() {
            part.record(
                0,
                &Op::Write {
                    offset,
                    data: data.freeze(),
                },
            );
        }
    };
    for (start, e) in overlay.extents() {
        let Fill::Data(data) = &e.fill else {
            continue;
        };
        added += data.len() as u64;
        let joins = run.as_ref().is_some_and(|(offset, buf)| {
            offset + buf.len() as u64 == start && (buf.len() + data.len()) as u64 <= MERGE_LIMIT
        });
        if !joins {
            flush(&mut run, part);
            run = Some((start, BytesMut::with_capacity(data.len())));
        }
        run.as_mut().expect("a run").1.extend_from_slice(data);
    }
    flush(&mut run, part);
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objrep::manifest::{LayerRef, FORMAT_VERSION};
    use crate::store::memory::MemoryStore;
    use uuid::Uuid;

    fn identity(size: u64) -> ReplicaIdentity {
        ReplicaIdentity {
            format_version: FORMAT_VERSION,
            journal_uuid: Uuid::new_v4(),
            consumer: "t".into(),
            size,
            block_size: 4096,
            created_ns: 0,
        }
    }

    /// Writes `ops` (LSNs from `first`) as a delta layer and names it in `m` with a
    /// checkpoint at its end.
    async fn add_layer(
        store: &MemoryStore,
        id: &ReplicaIdentity,
        m: &mut ReplicaManifest,
        first: u64,
        ops: &[Op],
        oracle: &mut Overlay,
    ) {
        let mut o = Overlay::new();
        for (i, op) in ops.iter().enumerate() {
            o.record(first + i as u64, op);
            oracle.record(first + i as u64, op);
        }
        let last = first + ops.len() as u64 - 1;
        let key = paths::layer_key(1, first, last, 7);
        let bytes = layer::encode(id.journal_uuid, first, last, &o, None);
        m.layers.push(LayerRef {
            key: key.clone(),
            first_lsn: first,
            last_lsn: last,
            size: bytes.len() as u64,
        });
        store.put_if_absent(&key, bytes).await.unwrap();
        m.checkpoints.push(Checkpoint {
            lsn: last,
            timestamp_ns: last,
            next_seq: 0,
            layers: m.layers.len(),
            next_timestamp_ns: None,
        });
    }

    async fn read_image(store: &MemoryStore, id: &ReplicaIdentity, image: &ImageRef) -> Vec<u8> {
        let mut buf = vec![0u8; id.size as usize];
        for p in &image.parts {
            let data = store.get(&p.key).await.unwrap();
            let decoded = layer::decode(data, id.journal_uuid, 0, image.lsn).unwrap();
            check_part(store, p, &decoded.extents).unwrap();
            assert!(decoded.extents.iter().all(|e| e.kind == ExtentKind::Data));
            decoded.overlay().patch(0, &mut buf);
        }
        buf
    }

    #[tokio::test]
    async fn an_image_is_the_sources_folded_in_parts_with_no_zeroes_stored() {
        let store = MemoryStore::new();
        let id = identity(1 << 20);
        let mut m = ReplicaManifest::empty();
        let mut oracle = Overlay::new();
        let w = |offset: u64, len: usize, b: u8| Op::Write {
            offset,
            data: Bytes::from(vec![b; len]),
        };
        add_layer(
            &store,
            &id,
            &mut m,
            1,
            &[w(0, 300 << 10, 1), w(700 << 10, 8192, 2)],
            &mut oracle,
        )
        .await;
        let size = PartSize::new(256 << 10);
        assert_eq!(size.window, 64 << 10);
        let cp = m.last().unwrap().clone();
        let (first, stats) = build(&store, &id, &m, &cp, 1 << 32, size, None)
            .await
            .unwrap();
        assert_eq!(stats.data_bytes, (300 << 10) + 8192);
        m.images.push(first);
        // Over the image: a discard across a window boundary, a zero run, overwrites.
        add_layer(
            &store,
            &id,
            &mut m,
            3,
            &[
                Op::Discard {
                    offset: 60 << 10,
                    len: 8192,
                },
                Op::WriteZeroes {
                    offset: 200 << 10,
                    len: 4096,
                },
                w(4096, 100, 3),
                w(1000 << 10, 4096, 4),
            ],
            &mut oracle,
        )
        .await;
        let cp = m.last().unwrap().clone();
        let (second, stats) = build(&store, &id, &m, &cp, 2 << 32, size, None)
            .await
            .unwrap();
        assert_eq!(stats.sources, m.images[0].parts.len() + 1);
        let mut want = vec![0u8; id.size as usize];
        oracle.patch(0, &mut want);
        assert!(read_image(&store, &id, &second).await == want);
        // Zeroes cost nothing: the data is the bytes that are not zero.
        assert_eq!(
            stats.data_bytes,
            (300 << 10) - 8192 - 4096 + 8192 + 4096,
            "{stats:?}"
        );
        for p in &second.parts {
            assert!(p.end - p.start >= size.window && p.size <= size.part_bytes + 4096);
        }
    }
}
