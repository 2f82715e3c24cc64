//! The fixed-size ends of a segment: the 72-byte header and the 24-byte trailer.
//!
//! Must never: trust a field before the checks that cover it (magic, version, CRC) passed;
//! index past the slice it was given.

use uuid::Uuid;

use super::{
    SegmentError, SegmentHeader, FLAG_ENCRYPTED, FLAG_PLUG, FORMAT_VERSION, HEADER_LEN,
    KNOWN_FLAGS, MAX_INDEX_LEN, MAX_RECORDS, TRAILER_LEN,
};

pub(crate) const HEADER_MAGIC: [u8; 8] = *b"TLAGSEG\0";
pub(crate) const TRAILER_MAGIC: [u8; 8] = *b"TLAGEND\0";
/// Bytes of the header covered by its CRC.
const HEADER_CRC_END: usize = 64;

impl SegmentHeader {
    /// The header's bytes (layout on [`SegmentHeader`]) of a plaintext segment.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> [u8; HEADER_LEN] {
        self.encode_sealed(0)
    }

    /// The header's bytes with `key_id` (0: plaintext) in the reserved word and the
    /// ENCRYPTED flag set when it is not 0.
    pub(crate) fn encode_sealed(&self, key_id: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags = self.flags() | if key_id != 0 { FLAG_ENCRYPTED } else { 0 };
        b[10..12].copy_from_slice(&flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.record_count.to_le_bytes());
        b[16..32].copy_from_slice(self.uuid.as_bytes());
        b[32..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.seq.to_le_bytes());
        b[48..56].copy_from_slice(&self.first_lsn.to_le_bytes());
        b[56..64].copy_from_slice(&self.next_seq.to_le_bytes());
        let crc = crc32c::crc32c(&b[..HEADER_CRC_END]);
        b[64..68].copy_from_slice(&crc.to_le_bytes());
        b[68..72].copy_from_slice(&key_id.to_le_bytes());
        b
    }
}

/// Decodes and checks the header from the first [`HEADER_LEN`] bytes of `data` (more may
/// follow and are ignored).
pub fn decode_header(key: &str, data: &[u8]) -> Result<SegmentHeader, SegmentError> {
    let Some(b) = data.first_chunk::<HEADER_LEN>() else {
        return Err(SegmentError::Truncated {
            key: key.to_string(),
            size: data.len() as u64,
            needed: HEADER_LEN as u64,
        });
    };
    let magic = array::<8>(b, 0);
    if magic != HEADER_MAGIC {
        return Err(SegmentError::BadMagic {
            key: key.to_string(),
            part: "header",
            found: magic,
        });
    }
    // Version before CRC: a future version may lay the header out differently, and "too new"
    // tells the operator more than "corrupt".
    let version = u16_at(b, 8);
    check_version(key, version)?;
    let stored = u32_at(b, 64);
    let computed = crc32c::crc32c(&b[..HEADER_CRC_END]);
    if stored != computed {
        return Err(SegmentError::HeaderCrc {
            key: key.to_string(),
            stored,
            computed,
        });
    }
    let reserved = u32_at(b, 68);
    let encrypted = u16_at(b, 10) & FLAG_ENCRYPTED != 0;
    if (reserved != 0) != encrypted {
        return Err(SegmentError::ReservedNotZero {
            key: key.to_string(),
            field: if encrypted {
                "header key id (encrypted segment)"
            } else {
                "header reserved word"
            },
            value: u64::from(reserved),
        });
    }
    let fields = HeaderFields {
        flags: u16_at(b, 10),
        record_count: u32_at(b, 12),
        uuid: Uuid::from_bytes(array::<16>(b, 16)),
        epoch: u64_at(b, 32),
        seq: u64_at(b, 40),
        first_lsn: u64_at(b, 48),
        next_seq: u64_at(b, 56),
    };
    fields.into_header(key)
}

/// The key id in a checked header's bytes (`None`: plaintext). Only for bytes
/// [`decode_header`] accepted.
pub(crate) fn header_key_id(data: &[u8]) -> Option<u32> {
    Some(u32_at(data, 68)).filter(|&id| id != 0)
}

pub(crate) fn check_version(key: &str, version: u16) -> Result<(), SegmentError> {
    if version == FORMAT_VERSION {
        Ok(())
    } else {
        Err(SegmentError::UnsupportedVersion {
            key: key.to_string(),
            version,
            supported: FORMAT_VERSION,
        })
    }
}

/// Header fields as stored, before the checks that hold for the header and for the index's
/// copy of it alike.
pub(crate) struct HeaderFields {
    pub(crate) flags: u16,
    pub(crate) record_count: u32,
    pub(crate) uuid: Uuid,
    pub(crate) epoch: u64,
    pub(crate) seq: u64,
    pub(crate) first_lsn: u64,
    pub(crate) next_seq: u64,
}

impl HeaderFields {
    /// Checks the invariants of [`SegmentHeader`].
    pub(crate) fn into_header(self, key: &str) -> Result<SegmentHeader, SegmentError> {
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(SegmentError::UnknownFlags {
                key: key.to_string(),
                flags: self.flags,
            });
        }
        let plug = self.flags & FLAG_PLUG != 0;
        check_record_count(key, self.record_count)?;
        if plug && self.record_count != 0 {
            return Err(SegmentError::PlugNotEmpty {
                key: key.to_string(),
                record_count: self.record_count,
            });
        }
        let next_ok = if plug {
            self.next_seq > self.seq
        } else {
            self.seq.checked_add(1) == Some(self.next_seq)
        };
        if !next_ok {
            return Err(SegmentError::BadNextSeq {
                key: key.to_string(),
                seq: self.seq,
                next_seq: self.next_seq,
                plug,
            });
        }
        if self
            .first_lsn
            .checked_add(u64::from(self.record_count))
            .is_none()
        {
            return Err(SegmentError::LimitExceeded {
                key: key.to_string(),
                what: "first LSN + record count",
                value: self.first_lsn,
                limit: u64::MAX - u64::from(self.record_count),
            });
        }
        Ok(SegmentHeader {
            uuid: self.uuid,
            epoch: self.epoch,
            seq: self.seq,
            first_lsn: self.first_lsn,
            next_seq: self.next_seq,
            record_count: self.record_count,
            plug,
        })
    }
}

pub(crate) fn check_record_count(key: &str, count: u32) -> Result<(), SegmentError> {
    if count as usize > MAX_RECORDS {
        return Err(SegmentError::LimitExceeded {
            key: key.to_string(),
            what: "record count",
            value: u64::from(count),
            limit: MAX_RECORDS as u64,
        });
    }
    Ok(())
}

/// The fixed end of a segment: where the index is and how to check it.
///
/// # On-disk layout (24 bytes at the very end of the object, little-endian)
/// ```text
/// offset size field         meaning
///      0    4 index_len     length of the archived index just before the trailer
///      4    4 index_crc     CRC32C of the archived index bytes
///      8    4 record_count  same as the header's and the index's entry count
///     12    4 key_id        zero; in an encrypted segment, the key id sealing the index
///     16    8 magic         b"TLAGEND\0"
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Trailer {
    pub(crate) index_len: u32,
    pub(crate) index_crc: u32,
    pub(crate) record_count: u32,
    /// 0: the index is plaintext; else the id of the key that sealed it.
    pub(crate) key_id: u32,
}

impl Trailer {
    pub(crate) fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..4].copy_from_slice(&self.index_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.index_crc.to_le_bytes());
        b[8..12].copy_from_slice(&self.record_count.to_le_bytes());
        b[12..16].copy_from_slice(&self.key_id.to_le_bytes());
        b[16..24].copy_from_slice(&TRAILER_MAGIC);
        b
    }

    /// Decodes and checks the trailer from the last [`TRAILER_LEN`] bytes of `tail`.
    pub(crate) fn decode(key: &str, tail: &[u8]) -> Result<Trailer, SegmentError> {
        let Some(b) = tail.last_chunk::<TRAILER_LEN>() else {
            return Err(SegmentError::TailTooShort {
                needed: TRAILER_LEN as u64,
            });
        };
        let magic = array::<8>(b, 16);
        if magic != TRAILER_MAGIC {
            return Err(SegmentError::BadMagic {
                key: key.to_string(),
                part: "trailer",
                found: magic,
            });
        }
        let trailer = Trailer {
            index_len: u32_at(b, 0),
            index_crc: u32_at(b, 4),
            record_count: u32_at(b, 8),
            key_id: u32_at(b, 12),
        };
        if trailer.index_len as usize > MAX_INDEX_LEN {
            return Err(SegmentError::LimitExceeded {
                key: key.to_string(),
                what: "index length",
                value: u64::from(trailer.index_len),
                limit: MAX_INDEX_LEN as u64,
            });
        }
        check_record_count(key, trailer.record_count)?;
        Ok(trailer)
    }
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}
