//! The footer index: an rkyv archive describing every record, read from the object's tail.
//!
//! Must never: access the archive before its CRC and bytecheck validation passed; accept
//! entries that do not tile the body or do not follow each other in LSN and time.

use rkyv::util::AlignedVec;
use rkyv::{Archive, Serialize};
use uuid::Uuid;

use super::header::{check_version, HeaderFields, Trailer};
use super::{
    has_payload, Expected, IndexEntry, SegmentError, SegmentIndex, FLAG_ENCRYPTED, HEADER_LEN,
    MAX_PAYLOAD_LEN, SEALED_INDEX_PREFIX, TRAILER_LEN,
};
use crate::crypto::{KeyId, ObjectKind, Part, SealScope, SEAL_OVERHEAD};
use crate::journal::record::{RecordKind, VERIFY_PAYLOAD_LEN};

/// The archived index (rkyv 0.8 defaults: little-endian, aligned, 32-bit relative pointers).
///
/// It repeats the header's fields so that a reader of the tail alone knows what the segment
/// holds, and adds the CRC of the body (which the per-payload CRCs alone do not cover: zstd
/// ignores some bits of a frame, so a flipped bit may still decompress to the right bytes).
///
/// # Archived layout (`size_of::<ArchivedFooter>()` = 64 bytes, at the end of the archive)
/// ```text
/// offset size field       meaning
///      0   16 uuid        as in the header
///     16    8 epoch       as in the header
///     24    8 seq         as in the header
///     32    8 first_lsn   as in the header
///     40    8 next_seq    as in the header
///     48    4 body_crc    CRC32C of the object bytes HEADER_LEN..body_end (all stored payloads)
///     52    2 version     FORMAT_VERSION
///     54    2 flags       as in the header
///     56    8 entries     rkyv ArchivedVec: i32 relative offset, u32 length
/// ```
/// The entries precede the root, each [`FooterEntry`] archived in 56 bytes:
/// ```text
/// offset size field         meaning
///      0    8 lsn
///      8    8 timestamp_ns
///     16    8 offset        see IndexEntry::offset
///     24    8 length        see IndexEntry::length
///     32    8 body_pos      absolute offset of the stored payload in the object
///     40    4 dev
///     44    4 stored_len    stored payload length
///     48    4 crc           CRC32C of the uncompressed payload
///     52    1 kind          RecordKind value
///     53    1 compressed    0 = raw, 1 = zstd frame
///     54    2 (padding)
/// ```
#[derive(Archive, Serialize)]
pub(crate) struct Footer {
    pub(crate) uuid: [u8; 16],
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    pub(crate) first_lsn: u64,
    pub(crate) next_seq: u64,
    pub(crate) body_crc: u32,
    pub(crate) version: u16,
    pub(crate) flags: u16,
    pub(crate) entries: Vec<FooterEntry>,
}

/// One record in the archived index (layout on [`Footer`]).
#[derive(Archive, Serialize, Clone, Debug)]
pub(crate) struct FooterEntry {
    pub(crate) lsn: u64,
    pub(crate) timestamp_ns: u64,
    pub(crate) offset: u64,
    pub(crate) length: u64,
    pub(crate) body_pos: u64,
    pub(crate) dev: u32,
    pub(crate) stored_len: u32,
    pub(crate) crc: u32,
    pub(crate) kind: u8,
    pub(crate) compressed: u8,
}

/// Exact archived size of a footer with `entries` entries: the entries, then the root
/// (both multiples of 8, so no padding between them).
pub(crate) const fn archived_len(entries: usize) -> usize {
    entries * std::mem::size_of::<ArchivedFooterEntry>() + std::mem::size_of::<ArchivedFooter>()
}

/// A parsed and structurally verified index, with what only a full read can still check.
pub(crate) struct ParsedIndex {
    pub(crate) index: SegmentIndex,
    /// CRC32C of the body, to check once the body is at hand.
    pub(crate) body_crc: u32,
    /// End of the body (start of the index) in the object.
    pub(crate) body_end: u64,
}

/// Parses the index from the last bytes of an object; `Err(SegmentError::TailTooShort {
/// needed })` when `tail` does not reach back far enough (the caller then reads the last
/// `needed` bytes).
pub fn decode_index_from_tail(
    key: &str,
    tail: &[u8],
    object_size: u64,
    expected: &Expected,
) -> Result<SegmentIndex, SegmentError> {
    let parsed = parse_index(key, tail, object_size, expected)?;
    expected.check(key, &parsed.index.header)?;
    Ok(parsed.index)
}

/// Everything [`decode_index_from_tail`] checks except the expectation (whose uuid and seq
/// an encrypted index's seal binds: one moved from elsewhere does not open).
pub(crate) fn parse_index(
    key: &str,
    tail: &[u8],
    object_size: u64,
    expected: &Expected,
) -> Result<ParsedIndex, SegmentError> {
    let tail_len = tail.len() as u64;
    if tail_len > object_size {
        return Err(SegmentError::TailLongerThanObject {
            key: key.to_string(),
            tail_len,
            object_size,
        });
    }
    let min_size = (HEADER_LEN + TRAILER_LEN) as u64;
    if object_size < min_size {
        return Err(SegmentError::Truncated {
            key: key.to_string(),
            size: object_size,
            needed: min_size,
        });
    }
    let trailer = Trailer::decode(key, tail)?;
    let index_len = trailer.index_len as usize;
    let needed = (index_len + TRAILER_LEN) as u64;
    if min_size + index_len as u64 > object_size {
        return Err(SegmentError::Truncated {
            key: key.to_string(),
            size: object_size,
            needed: min_size + index_len as u64,
        });
    }
    if tail_len < needed {
        return Err(SegmentError::TailTooShort { needed });
    }
    let index_start = tail.len() - TRAILER_LEN - index_len;
    let index_bytes = &tail[index_start..tail.len() - TRAILER_LEN];
    let computed = crc32c::crc32c(index_bytes);
    if computed != trailer.index_crc {
        return Err(SegmentError::IndexCrc {
            key: key.to_string(),
            stored: trailer.index_crc,
            computed,
        });
    }
    let opened;
    // A sealed index region starts with the body CRC in the clear (SEALED_INDEX_PREFIX).
    let mut clear_body_crc = None;
    let index_bytes = if trailer.key_id == 0 {
        index_bytes
    } else {
        let split = SEALED_INDEX_PREFIX.min(index_bytes.len());
        let (prefix, index_bytes) = index_bytes.split_at(split);
        clear_body_crc = prefix.try_into().ok().map(u32::from_le_bytes);
        let scope = SealScope {
            kind: ObjectKind::of_key(key),
            key_id: KeyId(trailer.key_id),
            uuid: expected.uuid,
            epoch: 0,
            seq: expected.seq,
        };
        opened = scope
            .open(Part::Index, u64::MAX, index_bytes)
            .map_err(|source| SegmentError::Sealed {
                key: key.to_string(),
                part: "index".to_string(),
                source,
            })?;
        &opened[..]
    };
    // rkyv reads archived integers in place, so the bytes must sit at the alignment they
    // were written with; a slice of a larger buffer has no such guarantee.
    let mut aligned = AlignedVec::<16>::with_capacity(index_bytes.len());
    aligned.extend_from_slice(index_bytes);
    let footer =
        rkyv::access::<ArchivedFooter, rkyv::rancor::Error>(&aligned).map_err(|source| {
            SegmentError::IndexInvalid {
                key: key.to_string(),
                source,
            }
        })?;
    check_version(key, footer.version.to_native())?;
    let count = footer.entries.len();
    if count as u64 != u64::from(trailer.record_count) {
        return Err(SegmentError::IndexDisagrees {
            key: key.to_string(),
            field: "record count",
            header: u64::from(trailer.record_count),
            index: count as u64,
        });
    }
    let header = HeaderFields {
        flags: footer.flags.to_native(),
        record_count: trailer.record_count,
        uuid: Uuid::from_bytes(footer.uuid),
        epoch: footer.epoch.to_native(),
        seq: footer.seq.to_native(),
        first_lsn: footer.first_lsn.to_native(),
        next_seq: footer.next_seq.to_native(),
    }
    .into_header(key)?;
    // The index's own flag must agree with its trailer: a sealed index says it is one.
    if (footer.flags.to_native() & FLAG_ENCRYPTED != 0) != (trailer.key_id != 0) {
        return Err(SegmentError::IndexDisagrees {
            key: key.to_string(),
            field: "encrypted (trailer key id)",
            header: u64::from(trailer.key_id),
            index: u64::from(footer.flags.to_native() & FLAG_ENCRYPTED),
        });
    }
    // The body CRC in the clear must be the one the sealed index holds.
    if let Some(clear) = clear_body_crc {
        if clear != footer.body_crc.to_native() {
            return Err(SegmentError::IndexDisagrees {
                key: key.to_string(),
                field: "body crc (in the clear before the sealed index)",
                header: u64::from(clear),
                index: u64::from(footer.body_crc.to_native()),
            });
        }
    }
    let seal = (trailer.key_id != 0).then(|| SealScope {
        kind: ObjectKind::of_key(key),
        key_id: KeyId(trailer.key_id),
        uuid: header.uuid,
        epoch: header.epoch,
        seq: header.seq,
    });
    let body_end = object_size - needed;
    let mut entries = Vec::with_capacity(count);
    let mut cursor = EntryCursor {
        key,
        next_lsn: header.first_lsn,
        next_pos: HEADER_LEN as u64,
        body_end,
        last_timestamp: None,
        seal,
    };
    for (position, archived) in footer.entries.iter().enumerate() {
        entries.push(cursor.check(position, archived)?);
    }
    if cursor.next_pos != body_end {
        return Err(SegmentError::BodyNotTiled {
            key: key.to_string(),
            lsn: None,
            expected: cursor.next_pos,
            found: body_end,
        });
    }
    Ok(ParsedIndex {
        index: SegmentIndex {
            header,
            entries,
            object_size,
            sealed_with: (trailer.key_id != 0).then_some(KeyId(trailer.key_id)),
        },
        body_crc: footer.body_crc.to_native(),
        body_end,
    })
}

/// Walks the entries in order, checking each against the ones before it.
struct EntryCursor<'k> {
    key: &'k str,
    next_lsn: u64,
    next_pos: u64,
    body_end: u64,
    last_timestamp: Option<u64>,
    seal: Option<SealScope>,
}

impl EntryCursor<'_> {
    fn check(
        &mut self,
        position: usize,
        e: &ArchivedFooterEntry,
    ) -> Result<IndexEntry, SegmentError> {
        let key = self.key;
        let lsn = e.lsn.to_native();
        if lsn != self.next_lsn {
            return Err(SegmentError::LsnNotContiguous {
                key: key.to_string(),
                position,
                expected: self.next_lsn,
                found: lsn,
            });
        }
        let timestamp_ns = e.timestamp_ns.to_native();
        if let Some(previous) = self.last_timestamp.filter(|&p| timestamp_ns < p) {
            return Err(SegmentError::TimestampsDecreasing {
                key: key.to_string(),
                lsn,
                previous,
                found: timestamp_ns,
            });
        }
        let Some(kind) = RecordKind::from_u8(e.kind) else {
            return Err(SegmentError::UnknownKind {
                key: key.to_string(),
                lsn,
                kind: e.kind,
            });
        };
        let entry = IndexEntry {
            lsn,
            timestamp_ns,
            kind,
            dev: e.dev.to_native(),
            offset: e.offset.to_native(),
            length: e.length.to_native(),
            body_pos: e.body_pos.to_native(),
            stored_len: e.stored_len.to_native(),
            crc: e.crc.to_native(),
            compressed: match e.compressed {
                0 => false,
                1 => true,
                _ => return Err(invalid(key, lsn, "compressed flag is neither 0 nor 1")),
            },
            seal: self.seal.filter(|_| has_payload(kind)),
        };
        check_entry_fields(key, &entry)?;
        if entry.body_pos != self.next_pos {
            return Err(SegmentError::BodyNotTiled {
                key: key.to_string(),
                lsn: Some(lsn),
                expected: self.next_pos,
                found: entry.body_pos,
            });
        }
        // body_pos == next_pos <= body_end and stored_len < 2^32: no overflow.
        let end = entry.body_pos + u64::from(entry.stored_len);
        if end > self.body_end {
            return Err(SegmentError::BodyOverrun {
                key: key.to_string(),
                lsn,
                end,
                body_end: self.body_end,
            });
        }
        self.next_pos = end;
        // The header check guaranteed first_lsn + count does not overflow.
        self.next_lsn = lsn + 1;
        self.last_timestamp = Some(timestamp_ns);
        Ok(entry)
    }
}

/// The fields an entry of each kind may hold (what the builder writes, nothing else).
pub(crate) fn check_entry_fields(key: &str, e: &IndexEntry) -> Result<(), SegmentError> {
    let lsn = e.lsn;
    if has_payload(e.kind) {
        if e.length > MAX_PAYLOAD_LEN as u64 {
            return Err(SegmentError::LimitExceeded {
                key: key.to_string(),
                what: "payload length",
                value: e.length,
                limit: MAX_PAYLOAD_LEN as u64,
            });
        }
        let mut stored = u64::from(e.stored_len);
        if e.seal.is_some() {
            // A sealed unit is the stored payload plus nonce and tag.
            stored = stored
                .checked_sub(SEAL_OVERHEAD as u64)
                .ok_or_else(|| invalid(key, lsn, "sealed payload shorter than nonce and tag"))?;
        }
        if e.compressed && stored >= e.length {
            return Err(invalid(
                key,
                lsn,
                "compressed payload is not smaller than raw",
            ));
        }
        if !e.compressed && stored != e.length {
            return Err(invalid(
                key,
                lsn,
                "raw payload length differs from its length",
            ));
        }
    } else if e.stored_len != 0 || e.compressed {
        return Err(invalid(key, lsn, "record of this kind has a payload"));
    }
    match e.kind {
        RecordKind::Write
        | RecordKind::ResyncData
        | RecordKind::Discard
        | RecordKind::WriteZeroes => {
            if e.offset.checked_add(e.length).is_none() {
                return Err(invalid(key, lsn, "device range overflows u64"));
            }
        }
        RecordKind::Mark => {
            if e.offset != 0 {
                return Err(invalid(key, lsn, "MARK has a non-zero offset"));
            }
        }
        RecordKind::Verify => {
            if e.length != VERIFY_PAYLOAD_LEN as u64 {
                return Err(invalid(key, lsn, "VERIFY payload is not 40 bytes"));
            }
        }
        RecordKind::Epoch | RecordKind::Demote => {
            if e.length != 0 {
                return Err(invalid(key, lsn, "EPOCH or DEMOTE has a non-zero length"));
            }
        }
        RecordKind::Flush | RecordKind::ResyncBegin | RecordKind::ResyncEnd => {
            if e.offset != 0 || e.length != 0 {
                return Err(invalid(
                    key,
                    lsn,
                    "record without range has an offset or length",
                ));
            }
        }
    }
    Ok(())
}

fn invalid(key: &str, lsn: u64, reason: &'static str) -> SegmentError {
    SegmentError::EntryInvalid {
        key: key.to_string(),
        lsn,
        reason,
    }
}
