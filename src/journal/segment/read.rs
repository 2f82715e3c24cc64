//! Decoding whole segments and single payloads, from bytes or from a store.
//!
//! Must never: return a record before the header, the index and that record's payload CRC
//! were verified, nor a segment whose body CRC was not; decompress past the length the index
//! announces.

use std::ops::Range;

use bytes::Bytes;

use super::header::Trailer;
use super::index::{parse_index, ParsedIndex};
use super::{
    decode_header, decode_index_from_tail, DecodedSegment, Expected, IndexEntry, SegmentError,
    SegmentHeader, SegmentIndex, HEADER_LEN, INDEX_TAIL_GUESS, SEALED_INDEX_PREFIX, TRAILER_LEN,
};
use crate::journal::record::{decode_verify_payload, Op, Record, RecordKind};
use crate::store::ObjectStore;

/// Decodes and verifies a whole segment object.
pub fn decode_segment(
    key: &str,
    data: &[u8],
    expected: &Expected,
) -> Result<DecodedSegment, SegmentError> {
    decode_with(key, data, expected, |range| {
        Bytes::copy_from_slice(&data[range])
    })
}

/// Decodes one record's stored payload (for time travel's ranged reads); checks its CRC.
///
/// The CRC covers the uncompressed bytes, so what this returns is always the payload that
/// was written; damage to bits of a zstd frame that decompression ignores goes unnoticed
/// here (only [`decode_segment`] checks the whole body's CRC).
pub fn decode_payload(key: &str, entry: &IndexEntry, stored: &[u8]) -> Result<Bytes, SegmentError> {
    let mut decompressor = None;
    decode_stored(key, entry, stored, &mut decompressor, || {
        Bytes::copy_from_slice(stored)
    })
}

/// Reads a segment's index with one tail read ([`INDEX_TAIL_GUESS`] bytes), and a second
/// ranged read only if the index is bigger.
pub async fn read_index(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Expected,
) -> Result<SegmentIndex, SegmentError> {
    let (tail, size) = store.get_tail(key, INDEX_TAIL_GUESS).await?;
    match decode_index_from_tail(key, &tail, size, expected) {
        Err(SegmentError::TailTooShort { needed }) => {
            let (tail, size) = store.get_tail(key, needed).await?;
            decode_index_from_tail(key, &tail, size, expected)
        }
        other => other,
    }
}

/// [`read_index`] with a first tail read of `guess` bytes (at least [`INDEX_TAIL_GUESS`]);
/// also returns how long the tail holding the index is, so a reader of many segments of
/// one journal can guess the next one right and pay one read each, not two.
pub async fn read_index_guessing(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Expected,
    guess: u64,
) -> Result<(SegmentIndex, u64), SegmentError> {
    let (tail, size) = store.get_tail(key, guess.max(INDEX_TAIL_GUESS)).await?;
    match decode_index_from_tail(key, &tail, size, expected) {
        Err(SegmentError::TailTooShort { needed }) => {
            let (tail, size) = store.get_tail(key, needed).await?;
            Ok((decode_index_from_tail(key, &tail, size, expected)?, needed))
        }
        Ok(index) => {
            let needed = u64::from(Trailer::decode(key, &tail)?.index_len) + TRAILER_LEN as u64;
            Ok((index, needed))
        }
        Err(e) => Err(e),
    }
}

/// Reads a segment's header (one ranged read of its first [`HEADER_LEN`] bytes), checks it
/// and compares it with `index`'s copy: for listings that read no payload yet must not pass
/// over a damaged segment (`journal inspect`).
pub async fn check_header(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Expected,
    index: &SegmentIndex,
) -> Result<(), SegmentError> {
    let head = store.get_range(key, 0..HEADER_LEN as u64).await?;
    let header = decode_header(key, &head)?;
    expected.check(key, &header)?;
    check_agreement(key, &header, &index.header)
}

/// For an encrypted segment whose key the process keyring lacks: checks every CRC, which
/// needs no key (the header's, the trailer's CRC of the index region, and the body's, whose
/// value sits in the clear before the sealed index), and returns the header; `Ok(None)` for
/// a plaintext segment or one whose key is installed (decode it instead). Only the tags
/// need the key.
pub fn check_sealed_without_key(
    key: &str,
    data: &[u8],
    expected: &Expected,
) -> Result<Option<SegmentHeader>, SegmentError> {
    let header = decode_header(key, data)?;
    expected.check(key, &header)?;
    let Some(key_id) = super::header::header_key_id(data) else {
        return Ok(None);
    };
    if crate::crypto::lookup(crate::crypto::KeyId(key_id)).is_some() {
        return Ok(None);
    }
    let trailer = Trailer::decode(key, data)?;
    let index_len = trailer.index_len as usize;
    if trailer.key_id != key_id || data.len() < HEADER_LEN + index_len + TRAILER_LEN {
        return Err(SegmentError::IndexDisagrees {
            key: key.to_string(),
            field: "key id",
            header: u64::from(key_id),
            index: u64::from(trailer.key_id),
        });
    }
    let end = data.len() - TRAILER_LEN;
    let computed = crc32c::crc32c(&data[end - index_len..end]);
    if computed != trailer.index_crc {
        return Err(SegmentError::IndexCrc {
            key: key.to_string(),
            stored: trailer.index_crc,
            computed,
        });
    }
    // The body CRC sits in the clear before the sealed index (SEALED_INDEX_PREFIX): every
    // byte of the body is checked without the key too.
    let body_end = end - index_len;
    let Some(prefix) = data[body_end..end].get(..SEALED_INDEX_PREFIX) else {
        return Err(SegmentError::Truncated {
            key: key.to_string(),
            size: data.len() as u64,
            needed: (HEADER_LEN + SEALED_INDEX_PREFIX + TRAILER_LEN) as u64,
        });
    };
    let stored = u32::from_le_bytes(prefix.try_into().expect("four bytes"));
    let computed = crc32c::crc32c(&data[HEADER_LEN..body_end]);
    if computed != stored {
        return Err(SegmentError::BodyCrc {
            key: key.to_string(),
            stored,
            computed,
        });
    }
    Ok(Some(header))
}

/// Reads and decodes a whole segment; raw payloads share the object's buffer.
pub async fn read_segment(
    store: &dyn ObjectStore,
    key: &str,
    expected: &Expected,
) -> Result<DecodedSegment, SegmentError> {
    let data = store.get(key).await?;
    decode_with(key, &data, expected, |range| data.slice(range))
}

/// [`decode_segment`], with `share` making a raw payload's `Bytes` from its range in `data`
/// (a copy, or a slice of a shared buffer).
fn decode_with(
    key: &str,
    data: &[u8],
    expected: &Expected,
    share: impl Fn(Range<usize>) -> Bytes,
) -> Result<DecodedSegment, SegmentError> {
    let header = decode_header(key, data)?;
    expected.check(key, &header)?;
    let ParsedIndex {
        index,
        body_crc,
        body_end,
    } = parse_index(key, data, data.len() as u64, expected)?;
    expected.check(key, &index.header)?;
    check_agreement(key, &header, &index.header)?;
    // The header names the key the trailer does (or neither names one).
    let trailer_key = Trailer::decode(key, data)?.key_id;
    let header_key = super::header::header_key_id(data).unwrap_or(0);
    if header_key != trailer_key {
        return Err(SegmentError::IndexDisagrees {
            key: key.to_string(),
            field: "key id",
            header: u64::from(header_key),
            index: u64::from(trailer_key),
        });
    }
    let mut decompressor = None;
    let mut records = Vec::with_capacity(index.entries.len());
    for entry in &index.entries {
        // parse_index checked that every stored range lies inside the body, inside `data`.
        let range = entry.body_pos as usize..entry.stored_range().end as usize;
        let payload = decode_stored(key, entry, &data[range.clone()], &mut decompressor, || {
            share(range)
        })?;
        records.push(record_from(key, entry, payload)?);
    }
    // Payloads were checked one by one first, so that an error names the LSN; this catches
    // what decompression ignores.
    let computed = crc32c::crc32c(&data[HEADER_LEN..body_end as usize]);
    if computed != body_crc {
        return Err(SegmentError::BodyCrc {
            key: key.to_string(),
            stored: body_crc,
            computed,
        });
    }
    Ok(DecodedSegment { header, records })
}

/// The header and the index's copy of it must say the same.
fn check_agreement(
    key: &str,
    header: &SegmentHeader,
    index: &SegmentHeader,
) -> Result<(), SegmentError> {
    let pairs = [
        ("epoch", header.epoch, index.epoch),
        ("first LSN", header.first_lsn, index.first_lsn),
        ("next seq", header.next_seq, index.next_seq),
        (
            "record count",
            u64::from(header.record_count),
            u64::from(index.record_count),
        ),
        ("flags", u64::from(header.flags()), u64::from(index.flags())),
    ];
    for (field, h, i) in pairs {
        if h != i {
            return Err(SegmentError::IndexDisagrees {
                key: key.to_string(),
                field,
                header: h,
                index: i,
            });
        }
    }
    // uuid and seq were both checked against the expectation.
    Ok(())
}

/// Turns a stored payload into the uncompressed payload, verifying lengths and CRC.
/// `raw` makes the result for an uncompressed payload (to share rather than copy).
fn decode_stored(
    key: &str,
    entry: &IndexEntry,
    stored: &[u8],
    decompressor: &mut Option<zstd::bulk::Decompressor<'static>>,
    raw: impl FnOnce() -> Bytes,
) -> Result<Bytes, SegmentError> {
    let lsn = entry.lsn;
    if stored.len() as u64 != u64::from(entry.stored_len) {
        return Err(SegmentError::PayloadLength {
            key: key.to_string(),
            lsn,
            what: "stored",
            expected: u64::from(entry.stored_len),
            found: stored.len() as u64,
        });
    }
    // Entries reaching here came through parse_index, but decode_payload takes entries from
    // callers: recheck what bounds the allocation below.
    super::index::check_entry_fields(key, entry)?;
    // A sealed payload is opened (its tag checked) before anything reads its bytes.
    let mut opened = None;
    let stored = match &entry.seal {
        None => stored,
        Some(scope) => {
            let plain = scope
                .open(crate::crypto::Part::Payload, lsn, stored)
                .map_err(|source| SegmentError::Sealed {
                    key: key.to_string(),
                    part: format!("payload of LSN {lsn}"),
                    source,
                })?;
            &opened.insert(plain)[..]
        }
    };
    let payload = if entry.compressed {
        let decompress_err = |source| SegmentError::Decompress {
            key: key.to_string(),
            lsn,
            source,
        };
        let mut d = match decompressor.take() {
            Some(d) => d,
            None => zstd::bulk::Decompressor::new().map_err(decompress_err)?,
        };
        // The capacity bounds the output: a frame claiming more fails instead of growing.
        let out = d.decompress(stored, entry.length as usize);
        *decompressor = Some(d);
        let out = out.map_err(decompress_err)?;
        Bytes::from(out)
    } else if let Some(plain) = opened {
        Bytes::from(plain)
    } else {
        raw()
    };
    if payload.len() as u64 != entry.length && super::has_payload(entry.kind) {
        return Err(SegmentError::PayloadLength {
            key: key.to_string(),
            lsn,
            what: "uncompressed",
            expected: entry.length,
            found: payload.len() as u64,
        });
    }
    let computed = crc32c::crc32c(&payload);
    if computed != entry.crc {
        return Err(SegmentError::PayloadCrc {
            key: key.to_string(),
            lsn,
            stored: entry.crc,
            computed,
        });
    }
    Ok(payload)
}

/// Rebuilds a record from its (verified) entry and payload.
fn record_from(key: &str, e: &IndexEntry, payload: Bytes) -> Result<Record, SegmentError> {
    let op = match e.kind {
        RecordKind::Write => Op::Write {
            offset: e.offset,
            data: payload,
        },
        RecordKind::ResyncData => Op::ResyncData {
            offset: e.offset,
            data: payload,
        },
        RecordKind::Discard => Op::Discard {
            offset: e.offset,
            len: e.length,
        },
        RecordKind::WriteZeroes => Op::WriteZeroes {
            offset: e.offset,
            len: e.length,
        },
        RecordKind::Flush => Op::Flush,
        RecordKind::Mark => Op::Mark {
            name: String::from_utf8(payload.to_vec()).map_err(|source| {
                SegmentError::MarkNotUtf8 {
                    key: key.to_string(),
                    lsn: e.lsn,
                    source,
                }
            })?,
        },
        RecordKind::Epoch => Op::Epoch { epoch: e.offset },
        RecordKind::Demote => Op::Demote { epoch: e.offset },
        RecordKind::ResyncBegin => Op::ResyncBegin,
        RecordKind::ResyncEnd => Op::ResyncEnd,
        RecordKind::Verify => {
            let (len, checksum) =
                decode_verify_payload(&payload).ok_or_else(|| SegmentError::EntryInvalid {
                    key: key.to_string(),
                    lsn: e.lsn,
                    reason: "VERIFY payload is not 40 bytes",
                })?;
            if e.offset.checked_add(len).is_none() {
                return Err(SegmentError::EntryInvalid {
                    key: key.to_string(),
                    lsn: e.lsn,
                    reason: "VERIFY range overflows u64",
                });
            }
            Op::Verify {
                offset: e.offset,
                len,
                checksum,
            }
        }
    };
    Ok(Record {
        lsn: e.lsn,
        timestamp_ns: e.timestamp_ns,
        dev: e.dev,
        op,
    })
}
