//! Segment codec: turns a run of records into one immutable object and back.
//!
//! A segment object is `header | body | footer index | trailer`, all integers little-endian:
//!
//! ```text
//! 0            72                          body_end        size-24     size
//! +------------+---------------------------+---------------+-----------+
//! | header     | payloads, in LSN order    | index (rkyv)  | trailer   |
//! | 72 bytes   | raw or zstd, tiled        | index_len     | 24 bytes  |
//! +------------+---------------------------+---------------+-----------+
//! ```
//!
//! - header: [`SegmentHeader`] (layout on the type);
//! - body: each record's payload (WRITE/RESYNC_DATA data, a MARK's name, nothing for the other
//!   kinds), zstd level 1 when that saves at least 1/8 of it, else raw; payloads tile the body
//!   with no gap and no overlap;
//! - index: an rkyv archive of `Footer` (layout on the type, in `index.rs`), which repeats the
//!   header's fields, so that one ranged read of the tail tells what a segment holds;
//! - trailer: `Trailer` (layout on the type, in `header.rs`).
//!
//! Encrypted segments (header flag `ENCRYPTED`, DESIGN.md "Encryption at rest") have the same
//! layout: each payload and the index are sealed units (`crate::crypto::seal`), the body CRC
//! sits in the clear before the sealed index ([`SEALED_INDEX_PREFIX`]), the key id sits in the
//! header's and the trailer's reserved words, and every CRC but the per-payload ones covers
//! the stored (sealed) bytes, so all of those are checked without the key. Which key seals is the process keyring's newest
//! (`crate::crypto::writing_key`), picked when a builder is made.
//!
//! Every byte of an object is covered by a check: the header by its CRC (and the reserved
//! word by being zero), the index by the trailer's CRC, the trailer by its magic, reserved
//! word and agreement with the index, the body by the index's body CRC and each payload by
//! the CRC of its uncompressed bytes. Flipping any byte or truncating anywhere is an error.
//!
//! Must never: panic or allocate without bound on untrusted bytes (every length is checked
//! against the limits below first); return a record from a segment whose UUID, seq or first
//! LSN is not the expected one; accept a payload whose CRC it did not verify.

use uuid::Uuid;

use crate::journal::record::{Record, RecordKind};

mod buffers;
mod builder;
mod crc;
mod error;
mod header;
mod index;
mod probe;
mod read;

pub use buffers::BufferRecycler;
pub use builder::{encode_plug, encode_segment, SegmentBuilder};
pub use error::SegmentError;
pub use header::decode_header;
pub use index::decode_index_from_tail;
pub(crate) use probe::CompressProbe;
pub use read::{
    check_header, check_sealed_without_key, decode_payload, decode_segment, read_index,
    read_index_guessing, read_segment,
};

/// Format version written in the header and the index.
pub const FORMAT_VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 72;
/// Size of the fixed trailer.
pub const TRAILER_LEN: usize = 24;
/// Largest payload of one record (uncompressed).
pub const MAX_PAYLOAD_LEN: usize = 64 << 20;
/// Most records in one segment.
pub const MAX_RECORDS: usize = 1 << 20;
/// Largest archived index.
pub const MAX_INDEX_LEN: usize = 64 << 20;
/// How much of an object's tail [`read_index`] reads first; a bigger index costs a second read.
pub const INDEX_TAIL_GUESS: u64 = 64 << 10;

/// Header flag: a plug segment (no records; `next_seq` tells where the journal continues).
pub(crate) const FLAG_PLUG: u16 = 1;
/// Header flag: payloads and index are sealed (the reserved words hold the key id).
pub(crate) const FLAG_ENCRYPTED: u16 = 2;
/// In an encrypted segment the index region is `body_crc (4 bytes, LE, in the clear) |
/// sealed index`: the CRC of the stored (sealed) body, the same value the sealed index holds,
/// so that a reader without the key still checks every CRC of the object (the trailer's
/// index CRC covers both parts).
pub const SEALED_INDEX_PREFIX: usize = 4;
/// Every flag bit this version knows.
pub(crate) const KNOWN_FLAGS: u16 = FLAG_PLUG | FLAG_ENCRYPTED;

/// What a segment holds, as its header (or its index) says.
///
/// # On-disk layout (72 bytes, little-endian)
/// ```text
/// offset size field         meaning
///      0    8 magic         b"TLAGSEG\0"
///      8    2 version       FORMAT_VERSION (1)
///     10    2 flags         bit 0 = PLUG, bit 1 = ENCRYPTED; other bits must be zero
///     12    4 record_count  records in the segment, <= MAX_RECORDS; 0 for a plug
///     16   16 uuid          device-group UUID (from the manifest)
///     32    8 epoch         writer epoch that wrote the segment
///     40    8 seq           segment number (matches the object key)
///     48    8 first_lsn     LSN of the first record (for an empty segment: the next LSN)
///     56    8 next_seq      seq + 1; for a plug, the seq where the journal continues (> seq)
///     64    4 header_crc    CRC32C of bytes 0..64
///     68    4 key_id        zero; with ENCRYPTED, the sealing key's id (never zero)
/// ```
///
/// # Invariants
/// - `plug` implies `record_count == 0` and `next_seq > seq`; otherwise `next_seq == seq + 1`.
/// - `first_lsn + record_count` does not overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub uuid: Uuid,
    pub epoch: u64,
    pub seq: u64,
    pub first_lsn: u64,
    pub next_seq: u64,
    pub record_count: u32,
    pub plug: bool,
}

impl SegmentHeader {
    /// LSN of the last record; `None` when the segment holds none.
    pub fn last_lsn(&self) -> Option<u64> {
        (self.record_count > 0).then(|| self.end_lsn() - 1)
    }

    /// The LSN after the last record: where the next segment starts.
    pub fn end_lsn(&self) -> u64 {
        // Decoding refuses headers where this overflows; saturating keeps a hand-built
        // header from panicking.
        self.first_lsn.saturating_add(u64::from(self.record_count))
    }

    pub(crate) fn flags(&self) -> u16 {
        if self.plug {
            FLAG_PLUG
        } else {
            0
        }
    }
}

/// One record as the index describes it: enough to select records by time, LSN, kind or
/// range, and to fetch one payload with a ranged read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub lsn: u64,
    pub timestamp_ns: u64,
    pub kind: RecordKind,
    pub dev: u32,
    /// Device offset (WRITE, RESYNC_DATA, DISCARD, WRITE_ZEROES, VERIFY), the epoch number
    /// (EPOCH), else 0.
    pub offset: u64,
    /// Data length (WRITE, RESYNC_DATA), range length (DISCARD, WRITE_ZEROES), name length
    /// (MARK), payload length (VERIFY: always 40, the range length is in the payload), else 0. For payload kinds this is the uncompressed payload length.
    pub length: u64,
    /// Absolute offset of the stored payload in the object.
    pub body_pos: u64,
    /// Stored (possibly compressed) payload length.
    pub stored_len: u32,
    /// CRC32C of the uncompressed payload.
    pub crc: u32,
    /// The stored payload is a zstd frame.
    pub compressed: bool,
    /// Set when the stored payload is a sealed unit (`nonce | ciphertext | tag`, counted in
    /// `stored_len`): where it belongs, to open it.
    pub seal: Option<crate::crypto::SealScope>,
}

impl IndexEntry {
    /// The object byte range holding this record's stored payload (for a ranged read).
    pub fn stored_range(&self) -> std::ops::Range<u64> {
        // Saturating: a hand-built entry must not panic here; decoded ones never overflow.
        self.body_pos..self.body_pos.saturating_add(u64::from(self.stored_len))
    }
}

/// A segment's index, read from its tail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    pub header: SegmentHeader,
    pub entries: Vec<IndexEntry>,
    /// Size of the whole object.
    pub object_size: u64,
    /// The key that sealed the segment (its index was opened with it); `None`: plaintext.
    pub sealed_with: Option<crate::crypto::KeyId>,
}

impl SegmentIndex {
    /// Timestamp of the first record; `None` when the segment holds none.
    pub fn first_timestamp(&self) -> Option<u64> {
        self.entries.first().map(|e| e.timestamp_ns)
    }

    /// Timestamp of the last record; `None` when the segment holds none.
    pub fn last_timestamp(&self) -> Option<u64> {
        self.entries.last().map(|e| e.timestamp_ns)
    }
}

/// A whole segment, decoded and verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSegment {
    pub header: SegmentHeader,
    pub records: Vec<Record>,
}

/// What the reader expects; any mismatch is an error naming the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    pub uuid: Uuid,
    pub seq: u64,
    /// `None` when the reader does not know where the segment starts (e.g. the first
    /// segment it reads after the trim pointer).
    pub first_lsn: Option<u64>,
}

impl Expected {
    /// Checks a header (or an index's copy of it) against the expectation.
    pub(crate) fn check(&self, key: &str, header: &SegmentHeader) -> Result<(), SegmentError> {
        if header.uuid != self.uuid {
            return Err(SegmentError::ForeignUuid {
                key: key.to_string(),
                expected: self.uuid,
                found: header.uuid,
            });
        }
        if header.seq != self.seq {
            return Err(SegmentError::WrongSeq {
                key: key.to_string(),
                expected: self.seq,
                found: header.seq,
            });
        }
        match self.first_lsn {
            Some(lsn) if lsn != header.first_lsn => Err(SegmentError::WrongFirstLsn {
                key: key.to_string(),
                expected: lsn,
                found: header.first_lsn,
            }),
            _ => Ok(()),
        }
    }
}

/// Kinds whose records carry a payload in the body.
pub(crate) fn has_payload(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::Write | RecordKind::ResyncData | RecordKind::Mark | RecordKind::Verify
    )
}

/// The bytes a record stores in the body.
pub(crate) fn payload_bytes(op: &crate::journal::record::Op) -> std::borrow::Cow<'_, [u8]> {
    use crate::journal::record::{encode_verify_payload, Op};
    use std::borrow::Cow;
    match op {
        Op::Write { data, .. } | Op::ResyncData { data, .. } => Cow::Borrowed(data),
        Op::Mark { name } => Cow::Borrowed(name.as_bytes()),
        Op::Verify { len, checksum, .. } => {
            Cow::Owned(encode_verify_payload(*len, checksum).to_vec())
        }
        _ => Cow::Borrowed(&[]),
    }
}

#[cfg(test)]
mod sealed_tests;
#[cfg(test)]
mod tests;
