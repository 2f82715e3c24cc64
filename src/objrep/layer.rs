//! Delta layers: the net effect of a run of journal records, as one immutable object.
//!
//! Must never: emit overlapping extents or extents out of offset order; decode a layer
//! without checking its magic, version, journal UUID, LSN range and every CRC it touches.

use bytes::{BufMut, Bytes, BytesMut};
use uuid::Uuid;

use crate::journal::record::Op;
use crate::replayer::overlay::{Fill, Overlay};

/// Magic at the start of a delta layer.
pub(crate) const MAGIC: &[u8; 8] = b"TLOBJDL1";
/// Magic at the very end (after the index), so a torn or foreign tail is caught.
pub(crate) const END_MAGIC: &[u8; 8] = b"TLOBJDLE";
/// Format version.
pub(crate) const VERSION: u32 = 1;
/// Header length.
pub(crate) const HEADER_LEN: usize = 64;
/// One index entry.
pub(crate) const ENTRY_LEN: usize = 29;
/// The trailer: index length, index CRC, end magic.
pub(crate) const TRAILER_LEN: usize = 20;

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
///  12  reserved u32 (0)          4
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

/// Encodes the net effect `overlay` of LSNs `first..=last` of journal `uuid`.
pub(crate) fn encode(uuid: Uuid, first: u64, last: u64, overlay: &Overlay) -> Bytes {
    let data_len: usize = overlay
        .extents()
        .map(|(_, e)| match &e.fill {
            Fill::Data(d) => d.len(),
            Fill::Zero { .. } => 0,
        })
        .sum();
    let count = overlay.extents().count();
    let mut out = BytesMut::with_capacity(HEADER_LEN + data_len + count * ENTRY_LEN + TRAILER_LEN);
    out.put_slice(MAGIC);
    out.put_u32_le(VERSION);
    out.put_u32_le(0);
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
                out.put_slice(d);
                pos += len;
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

/// Decodes a whole layer, checking it is the layer of `uuid` over `first..=last` its key
/// names, and every CRC. The error is the reason (the caller names the object).
pub(crate) fn decode(data: Bytes, uuid: Uuid, first: u64, last: u64) -> Result<DeltaLayer, String> {
    if data.len() < HEADER_LEN + TRAILER_LEN {
        return Err(format!("{} bytes is shorter than a layer", data.len()));
    }
    let h = &data[..HEADER_LEN];
    if &h[..8] != MAGIC {
        return Err("bad magic (not a delta layer)".into());
    }
    if crc32c::crc32c(&h[..56]) != u32_at(h, 56) {
        return Err("header CRC mismatch".into());
    }
    let version = u32_at(h, 8);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this build reads {VERSION}"
        ));
    }
    let found_uuid = Uuid::from_slice(&h[16..32]).expect("16 bytes");
    if found_uuid != uuid {
        return Err(format!("journal UUID {found_uuid}, expected {uuid}"));
    }
    let (f, l) = (u64_at(h, 32), u64_at(h, 40));
    if (f, l) != (first, last) {
        return Err(format!(
            "holds LSNs {f}..={l}, its key says {first}..={last}"
        ));
    }
    let count = u64_at(h, 48);
    let t = &data[data.len() - TRAILER_LEN..];
    if &t[12..20] != END_MAGIC {
        return Err("bad end magic (truncated?)".into());
    }
    let index_len = u64_at(t, 0);
    if Some(index_len) != count.checked_mul(ENTRY_LEN as u64)
        || index_len > (data.len() - HEADER_LEN - TRAILER_LEN) as u64
    {
        return Err(format!(
            "index of {index_len} bytes does not fit {count} extents in {} bytes",
            data.len()
        ));
    }
    let index_start = data.len() - TRAILER_LEN - index_len as usize;
    let index = &data[index_start..data.len() - TRAILER_LEN];
    if crc32c::crc32c(index) != u32_at(t, 8) {
        return Err("index CRC mismatch".into());
    }
    let body = data.slice(HEADER_LEN..index_start);
    let mut extents = Vec::with_capacity(count as usize);
    let (mut next_pos, mut last_end) = (0u64, 0u64);
    for e in index.chunks_exact(ENTRY_LEN) {
        let (offset, len) = (u64_at(e, 0), u64_at(e, 8));
        let kind = match e[16] {
            0 => ExtentKind::Data,
            1 => ExtentKind::Zero,
            2 => ExtentKind::Hole,
            k => return Err(format!("extent at {offset} has unknown kind {k}")),
        };
        let (body_pos, crc) = (u64_at(e, 17), u32_at(e, 25));
        let end = offset
            .checked_add(len)
            .ok_or_else(|| format!("extent at {offset} of {len} bytes overflows"))?;
        if len == 0 || offset < last_end {
            return Err(format!(
                "extent at {offset} is empty or overlaps the one before"
            ));
        }
        last_end = end;
        if kind == ExtentKind::Data {
            if body_pos != next_pos || body_pos + len > body.len() as u64 {
                return Err(format!("extent at {offset} points outside the body"));
            }
            let bytes = &body[body_pos as usize..(body_pos + len) as usize];
            if crc32c::crc32c(bytes) != crc {
                return Err(format!(
                    "data CRC mismatch in the extent at offset {offset}"
                ));
            }
            next_pos += len;
        }
        extents.push(LayerExtent {
            offset,
            len,
            kind,
            body_pos,
            crc,
        });
    }
    if next_pos != body.len() as u64 {
        return Err("body holds bytes no extent names".into());
    }
    Ok(DeltaLayer {
        uuid,
        first_lsn: first,
        last_lsn: last,
        extents,
        body,
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
        let bytes = encode(uuid, 5, 7, &o);
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
        let bytes = encode(uuid, 5, 7, &o);
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
}
