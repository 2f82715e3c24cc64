//! Delta layers: the net effect of a run of journal records, as one immutable object.
//!
//! A layer of an encrypted journal is sealed (format version 2): each data extent's bytes
//! and the index are units of [`crate::crypto::seal`], bound to the layer's journal, LSN
//! range and (for an extent) its offset, so a replica in object storage holds no payload in
//! the clear.
//!
//! Must never: emit overlapping extents or extents out of offset order; decode a layer
//! without checking its magic, version, journal UUID, LSN range and every CRC it touches;
//! return a sealed extent whose tag failed.

use bytes::{BufMut, Bytes, BytesMut};
use uuid::Uuid;

use crate::crypto::{Key, KeyId, ObjectKind, OpenError, Part, SealScope, SEAL_OVERHEAD};

use crate::journal::record::Op;
use crate::replayer::overlay::{Fill, Overlay};

/// Magic at the start of a layer (a delta layer or an image part: one format).
pub(crate) const MAGIC: &[u8; 8] = b"TLOBJDL1";
/// Magic at the very end (after the index), so a torn or foreign tail is caught.
pub(crate) const END_MAGIC: &[u8; 8] = b"TLOBJDLE";
/// Format version of a layer in the clear.
pub(crate) const VERSION: u32 = 1;
/// Format version of a sealed layer (the header's word at 12 is the key id).
pub(crate) const SEALED_VERSION: u32 = 2;
/// Header length.
pub(crate) const HEADER_LEN: usize = 64;
/// One index entry.
pub(crate) const ENTRY_LEN: usize = 29;
/// The trailer: index length, index CRC, end magic.
pub(crate) const TRAILER_LEN: usize = 20;

/// Why a layer did not decode.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LayerError {
    /// Bytes that are not what the layer's key and format promise.
    #[error("{0}")]
    Corrupt(String),
    /// A sealed unit that did not open (key not held, or tampered).
    #[error("sealed layer: {0}")]
    Sealed(#[from] OpenError),
}

impl From<String> for LayerError {
    fn from(reason: String) -> LayerError {
        LayerError::Corrupt(reason)
    }
}

impl From<&str> for LayerError {
    fn from(reason: &str) -> LayerError {
        LayerError::Corrupt(reason.to_string())
    }
}

/// The scope a sealed layer's units are bound to.
fn seal_scope(key_id: KeyId, uuid: Uuid, first: u64, last: u64) -> SealScope {
    SealScope {
        kind: ObjectKind::ReplicaObject,
        key_id,
        uuid,
        epoch: first,
        seq: last,
    }
}

/// What an extent of a layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ExtentKind {
    /// Bytes in the layer's body.
    Data = 0,
    /// Zeroes written by a WRITE_ZEROES (no bytes stored).
    Zero = 1,
    /// A DISCARD: reads as zeroes, restored as a hole (no bytes stored).
    Hole = 2,
}

/// One extent of a layer: `offset..offset + len` holds `kind` (data at `body_pos` of the
/// body, `len` bytes, CRC32C `crc`; zero for the other kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LayerExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
    pub body_pos: u64,
    pub crc: u32,
}

/// A delta layer (little-endian):
///
/// ```text
/// header (64 bytes)
///   0  magic "TLOBJDL1"          8
///   8  version u32 (1)           4
///  12  key id u32 (version 2; 0 in version 1)  4
///  16  journal UUID             16
///  32  first LSN u64             8
///  40  last LSN u64              8
///  48  extent count u64          8
///  56  CRC32C of bytes 0..56     4
///  60  reserved u32 (0)          4
/// body: the bytes of the data extents, in offset order, uncompressed
/// index: one 29-byte entry per extent, ascending offset, disjoint
///   offset u64, length u64, kind u8 (0 data, 1 zero, 2 hole), body position u64,
///   CRC32C of the extent's bytes u32 (0 for zero and hole)
/// trailer (20 bytes): index length u64, CRC32C of the index u32, magic "TLOBJDLE"
/// ```
/// Version 2 (sealed, for an encrypted journal) stores each data extent in the body as a
/// sealed unit (`nonce | ciphertext | tag`, [`SEAL_OVERHEAD`] bytes more than its length;
/// its body position is the unit's) and the index as one sealed unit; the trailer's index
/// length and CRC are the sealed index's, and each entry's CRC is of the plain bytes. The
/// units' scope: kind 3 (replica object), the header's key id, the journal UUID, epoch =
/// first LSN, seq = last LSN; an extent is part 0 at "LSN" = its offset, the index part 1
/// at `u64::MAX`. A unit moved to another layer, offset or journal does not open.
///
/// # Invariants
/// - Extents are disjoint, non-empty and sorted by offset; data extents' body ranges are
///   consecutive from 0 and end where the index begins.
/// - The layer holds the state, after LSN `last`, of every byte a lineage record in
///   `first..=last` changed; bytes it does not name are as the layers before it left them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeltaLayer {
    pub uuid: Uuid,
    pub first_lsn: u64,
    pub last_lsn: u64,
    pub extents: Vec<LayerExtent>,
    /// The body (data extents' bytes).
    pub body: Bytes,
}

/// Encodes the net effect `overlay` of LSNs `first..=last` of journal `uuid`, sealed with
/// `seal_with` when given (an encrypted journal's replica).
pub(crate) fn encode(
    uuid: Uuid,
    first: u64,
    last: u64,
    overlay: &Overlay,
    seal_with: Option<&Key>,
) -> Bytes {
    let scope = seal_with.map(|key| (key, seal_scope(key.id(), uuid, first, last)));
    let data_len: usize = overlay
        .extents()
        .map(|(_, e)| match &e.fill {
            Fill::Data(d) => d.len(),
            Fill::Zero { .. } => 0,
        })
        .sum();
    let count = overlay.extents().count();
    let data_count = overlay
        .extents()
        .filter(|(_, e)| matches!(e.fill, Fill::Data(_)))
        .count();
    let overhead = scope.map_or(0, |_| (data_count + 1) * SEAL_OVERHEAD);
    let mut out =
        BytesMut::with_capacity(HEADER_LEN + data_len + count * ENTRY_LEN + TRAILER_LEN + overhead);
    out.put_slice(MAGIC);
    match &scope {
        Some((key, _)) => {
            out.put_u32_le(SEALED_VERSION);
            out.put_u32_le(key.id().0);
        }
        None => {
            out.put_u32_le(VERSION);
            out.put_u32_le(0);
        }
    }
    out.put_slice(uuid.as_bytes());
    out.put_u64_le(first);
    out.put_u64_le(last);
    out.put_u64_le(count as u64);
    let crc = crc32c::crc32c(&out[..56]);
    out.put_u32_le(crc);
    out.put_u32_le(0);
    let mut index = BytesMut::with_capacity(count * ENTRY_LEN);
    let mut pos = 0u64;
    for (start, e) in overlay.extents() {
        let len = e.end - start;
        index.put_u64_le(start);
        index.put_u64_le(len);
        match &e.fill {
            Fill::Data(d) => {
                index.put_u8(ExtentKind::Data as u8);
                index.put_u64_le(pos);
                index.put_u32_le(crc32c::crc32c(d));
                match &scope {
                    Some((key, scope)) => {
                        let unit = scope.seal(key, Part::Payload, start, d);
                        out.put_slice(&unit);
                        pos += unit.len() as u64;
                    }
                    None => {
                        out.put_slice(d);
                        pos += len;
                    }
                }
            }
            Fill::Zero { punch } => {
                let kind = if *punch {
                    ExtentKind::Hole
                } else {
                    ExtentKind::Zero
                };
                index.put_u8(kind as u8);
                index.put_u64_le(0);
                index.put_u32_le(0);
            }
        }
    }
    let index = match &scope {
        Some((key, scope)) => BytesMut::from(&scope.seal(key, Part::Index, u64::MAX, &index)[..]),
        None => index,
    };
    let index_crc = crc32c::crc32c(&index);
    out.put_slice(&index);
    out.put_u64_le(index.len() as u64);
    out.put_u32_le(index_crc);
    out.put_slice(END_MAGIC);
    out.freeze()
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// A layer's header and index without its body: where each extent's stored bytes lie, so a
/// reader of a range fetches only the extents there (one ranged GET for a run of them).
/// Image parts are read this way by compaction; a whole layer by [`decode`].
#[derive(Clone, Debug)]
pub(crate) struct LayerIndex {
    scope: Option<SealScope>,
    /// Bytes of the body (the stored data extents).
    pub(crate) body_len: u64,
    /// Extents in offset order; a data extent's `body_pos` is where its stored bytes (a
    /// sealed unit, when sealed) begin in the body.
    pub(crate) extents: Vec<LayerExtent>,
}

/// The index length a layer's trailer states (`tail` ends where the object ends): a reader
/// that fetched too short a tail fetches `index length + TRAILER_LEN` bytes of it.
pub(crate) fn index_len(tail: &[u8]) -> Result<u64, LayerError> {
    if tail.len() < TRAILER_LEN {
        return Err(format!("{} bytes is shorter than a layer's trailer", tail.len()).into());
    }
    let t = &tail[tail.len() - TRAILER_LEN..];
    if &t[12..20] != END_MAGIC {
        return Err("bad end magic (truncated?)".into());
    }
    Ok(u64_at(t, 0))
}

/// Decodes a layer's header (`header`: its first [`HEADER_LEN`] bytes) and index (`tail`: at
/// least the last `index length + TRAILER_LEN` bytes of the `object_len`-byte object),
/// checking it is the layer of `uuid` over `first..=last` its key names, the CRCs of both
/// and (sealed) the index's tag.
pub(crate) fn decode_index(
    header: &[u8],
    tail: &[u8],
    object_len: u64,
    uuid: Uuid,
    first: u64,
    last: u64,
) -> Result<LayerIndex, LayerError> {
    if object_len < (HEADER_LEN + TRAILER_LEN) as u64 || header.len() < HEADER_LEN {
        return Err(format!("{object_len} bytes is shorter than a layer").into());
    }
    let h = &header[..HEADER_LEN];
    if &h[..8] != MAGIC {
        return Err("bad magic (not a delta layer)".into());
    }
    if crc32c::crc32c(&h[..56]) != u32_at(h, 56) {
        return Err("header CRC mismatch".into());
    }
    let version = u32_at(h, 8);
    let sealed = match version {
        VERSION => None,
        SEALED_VERSION => Some(KeyId(u32_at(h, 12))),
        _ => {
            return Err(format!(
                "format version {version}, this build reads {VERSION} and {SEALED_VERSION}"
            )
            .into())
        }
    };
    let found_uuid = Uuid::from_slice(&h[16..32]).expect("16 bytes");
    if found_uuid != uuid {
        return Err(format!("journal UUID {found_uuid}, expected {uuid}").into());
    }
    let (f, l) = (u64_at(h, 32), u64_at(h, 40));
    if (f, l) != (first, last) {
        return Err(format!("holds LSNs {f}..={l}, its key says {first}..={last}").into());
    }
    let count = u64_at(h, 48);
    let scope = sealed.map(|key_id| seal_scope(key_id, uuid, first, last));
    let index_len = index_len(tail)?;
    let plain_index_len = index_len.checked_sub(scope.map_or(0, |_| SEAL_OVERHEAD as u64));
    if plain_index_len != count.checked_mul(ENTRY_LEN as u64)
        || index_len > object_len - (HEADER_LEN + TRAILER_LEN) as u64
    {
        return Err(format!(
            "index of {index_len} bytes does not fit {count} extents in {object_len} bytes"
        )
        .into());
    }
    let stored_index_end = tail.len() - TRAILER_LEN;
    let Some(stored_index_start) = stored_index_end.checked_sub(index_len as usize) else {
        return Err(format!("the index of {index_len} bytes was not read whole").into());
    };
    let index = &tail[stored_index_start..stored_index_end];
    if crc32c::crc32c(index) != u32_at(tail, tail.len() - TRAILER_LEN + 8) {
        return Err("index CRC mismatch".into());
    }
    let opened_index;
    let index = match &scope {
        Some(scope) => {
            opened_index = scope.open(Part::Index, u64::MAX, index)?;
            &opened_index[..]
        }
        None => index,
    };
    let body_len = object_len - (HEADER_LEN + TRAILER_LEN) as u64 - index_len;
    let overhead = scope.map_or(0, |_| SEAL_OVERHEAD as u64);
    let mut extents = Vec::with_capacity(count as usize);
    let (mut next_pos, mut last_end) = (0u64, 0u64);
    for e in index.chunks_exact(ENTRY_LEN) {
        let (offset, len) = (u64_at(e, 0), u64_at(e, 8));
        let kind = match e[16] {
            0 => ExtentKind::Data,
            1 => ExtentKind::Zero,
            2 => ExtentKind::Hole,
            k => return Err(format!("extent at {offset} has unknown kind {k}").into()),
        };
        let (body_pos, crc) = (u64_at(e, 17), u32_at(e, 25));
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("extent at {offset} of {len} bytes overflows"))?;
        if len == 0 || offset < last_end {
            return Err(format!("extent at {offset} is empty or overlaps the one before").into());
        }
        last_end = end;
        if kind == ExtentKind::Data {
            let stored = len.saturating_add(overhead);
            if body_pos != next_pos || body_pos.saturating_add(stored) > body_len {
                return Err(format!("extent at {offset} points outside the body").into());
            }
            next_pos += stored;
        }
        extents.push(LayerExtent {
            offset,
            len,
            kind,
            body_pos,
            crc,
        });
    }
    if next_pos != body_len {
        return Err("body holds bytes no extent names".into());
    }
    Ok(LayerIndex {
        scope,
        body_len,
        extents,
    })
}

impl LayerIndex {
    /// Bytes a data extent takes in the body (its length, plus the seal's when sealed).
    pub(crate) fn stored_len(&self, e: &LayerExtent) -> u64 {
        e.len + self.scope.map_or(0, |_| SEAL_OVERHEAD as u64)
    }

    /// Where a data extent's stored bytes lie in the object.
    pub(crate) fn object_range(&self, e: &LayerExtent) -> std::ops::Range<u64> {
        let start = HEADER_LEN as u64 + e.body_pos;
        start..start + self.stored_len(e)
    }

    /// The extents overlapping `start..end`, in offset order.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> &[LayerExtent] {
        let lo = self.extents.partition_point(|e| e.offset + e.len <= start);
        let hi = self.extents.partition_point(|e| e.offset < end).max(lo);
        &self.extents[lo..hi]
    }

    /// A data extent's bytes from its stored bytes: the sealed unit opened (bound to this
    /// layer and the extent's offset), then the CRC of the plain bytes checked.
    pub(crate) fn open(&self, e: &LayerExtent, stored: Bytes) -> Result<Bytes, LayerError> {
        let plain = match &self.scope {
            Some(scope) => Bytes::from(scope.open(Part::Payload, e.offset, &stored)?),
            None => stored,
        };
        if crc32c::crc32c(&plain) != e.crc {
            return Err(format!("data CRC mismatch in the extent at offset {}", e.offset).into());
        }
        Ok(plain)
    }
}

/// Decodes a whole layer, checking it is the layer of `uuid` over `first..=last` its key
/// names, and every CRC; a sealed layer is opened with the process keyring. The error is
/// the reason (the caller names the object).
pub(crate) fn decode(
    data: Bytes,
    uuid: Uuid,
    first: u64,
    last: u64,
) -> Result<DeltaLayer, LayerError> {
    let index = decode_index(&data, &data, data.len() as u64, uuid, first, last)?;
    let body = data.slice(HEADER_LEN..);
    let sealed = index.scope.is_some();
    // A sealed layer's data extents, opened, one after another (the decoded layer's body).
    let mut plain = BytesMut::new();
    let mut extents = index.extents.clone();
    for e in extents.iter_mut().filter(|e| e.kind == ExtentKind::Data) {
        let pos = e.body_pos as usize;
        let stored = body.slice(pos..pos + index.stored_len(e) as usize);
        let bytes = index.open(e, stored)?;
        if sealed {
            e.body_pos = plain.len() as u64;
            plain.extend_from_slice(&bytes);
        }
    }
    Ok(DeltaLayer {
        uuid,
        first_lsn: first,
        last_lsn: last,
        extents,
        // A sealed layer's extents point into the opened bytes.
        body: if sealed {
            plain.freeze()
        } else {
            body.slice(..index.body_len as usize)
        },
    })
}

impl DeltaLayer {
    /// The layer as an overlay (every extent written by its `last_lsn`), to apply in offset
    /// order with [`crate::replayer::apply::apply_overlay`].
    pub(crate) fn overlay(&self) -> Overlay {
        let mut overlay = Overlay::new();
        for e in &self.extents {
            let op = match e.kind {
                ExtentKind::Data => Op::Write {
                    offset: e.offset,
                    data: self
                        .body
                        .slice(e.body_pos as usize..(e.body_pos + e.len) as usize),
                },
                ExtentKind::Zero => Op::WriteZeroes {
                    offset: e.offset,
                    len: e.len,
                },
                ExtentKind::Hole => Op::Discard {
                    offset: e.offset,
                    len: e.len,
                },
            };
            overlay.record(self.last_lsn, &op);
        }
        overlay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Uuid, Overlay) {
        let mut o = Overlay::new();
        o.record(
            5,
            &Op::Write {
                offset: 4096,
                data: Bytes::from(vec![7u8; 8192]),
            },
        );
        o.record(
            6,
            &Op::Discard {
                offset: 0,
                len: 4096,
            },
        );
        o.record(
            7,
            &Op::WriteZeroes {
                offset: 8192,
                len: 1024,
            },
        );
        (Uuid::new_v4(), o)
    }

    #[test]
    fn a_layer_round_trips_and_holds_the_net_effect() {
        let (uuid, o) = sample();
        let bytes = encode(uuid, 5, 7, &o, None);
        let layer = decode(bytes, uuid, 5, 7).unwrap();
        let kinds: Vec<_> = layer
            .extents
            .iter()
            .map(|e| (e.offset, e.len, e.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                (0, 4096, ExtentKind::Hole),
                (4096, 4096, ExtentKind::Data),
                (8192, 1024, ExtentKind::Zero),
                (9216, 3072, ExtentKind::Data),
            ]
        );
        // Zeroes cost no bytes: the body is the data extents only.
        assert_eq!(layer.body.len(), 4096 + 3072);
        let mut buf = vec![1u8; 12288];
        layer.overlay().patch(0, &mut buf);
        let mut want = vec![0u8; 12288];
        want[4096..8192].fill(7);
        want[9216..].fill(7);
        assert_eq!(buf, want);
    }

    #[test]
    fn every_flipped_byte_and_a_wrong_key_are_refused() {
        let (uuid, o) = sample();
        let bytes = encode(uuid, 5, 7, &o, None);
        for i in 0..bytes.len() {
            if (60..64).contains(&i) {
                continue; // reserved, outside the header CRC
            }
            let mut b = bytes.to_vec();
            b[i] ^= 0x40;
            assert!(
                decode(Bytes::from(b), uuid, 5, 7).is_err(),
                "a flip at byte {i} was accepted"
            );
        }
        assert!(decode(bytes.clone(), uuid, 5, 8).is_err());
        assert!(decode(bytes.clone(), Uuid::new_v4(), 5, 7).is_err());
        assert!(decode(bytes.slice(..bytes.len() - 1), uuid, 5, 7).is_err());
    }

    #[test]
    fn a_sealed_layer_round_trips_holds_no_payload_in_the_clear_and_binds_its_units() {
        let key = Key::from_bytes(&[0x33; 32]);
        crate::crypto::register(&key);
        let (uuid, o) = sample();
        let clear = decode(encode(uuid, 5, 7, &o, None), uuid, 5, 7).unwrap();
        let bytes = encode(uuid, 5, 7, &o, Some(&key));
        assert_eq!(u32_at(&bytes, 8), SEALED_VERSION);
        // The sample's data is 0x07 bytes; a sealed body must not hold a run of them.
        assert!(!bytes.windows(64).any(|w| w.iter().all(|&b| b == 7)));
        let sealed = decode(bytes.clone(), uuid, 5, 7).unwrap();
        assert_eq!(sealed.extents.len(), clear.extents.len());
        let (mut a, mut b) = (vec![1u8; 12288], vec![1u8; 12288]);
        clear.overlay().patch(0, &mut a);
        sealed.overlay().patch(0, &mut b);
        assert_eq!(a, b, "a sealed layer reads as the clear one");
        // Every flipped byte is refused (the header's CRC, the trailer's, or a tag).
        for i in 0..bytes.len() {
            if (60..64).contains(&i) {
                continue;
            }
            let mut t = bytes.to_vec();
            t[i] ^= 0x40;
            assert!(
                decode(Bytes::from(t), uuid, 5, 7).is_err(),
                "a flip at byte {i} was accepted"
            );
        }
        // The same units under another layer's LSN range do not open.
        let mut moved = bytes.to_vec();
        moved[40..48].copy_from_slice(&8u64.to_le_bytes());
        let crc = crc32c::crc32c(&moved[..56]);
        moved[56..60].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(Bytes::from(moved), uuid, 5, 8),
            Err(LayerError::Sealed(OpenError::Auth))
        ));
        // A key the keyring does not hold is named.
        let other = Key::from_bytes(&[0x44; 32]);
        let unknown = encode(uuid, 5, 7, &o, Some(&other));
        match decode(unknown, uuid, 5, 7) {
            Err(LayerError::Sealed(OpenError::MissingKey(id))) => assert_eq!(id, other.id()),
            other => panic!("expected the missing key named, got {other:?}"),
        }
    }
}
