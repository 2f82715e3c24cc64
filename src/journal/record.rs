//! Journal records: the events a writer appends and a replayer applies.
//!
//! Must never: hold a payload that disagrees with its operation (a `Write`'s length is its
//! data's length), or carry a timestamp that runs backwards along LSNs.

use bytes::Bytes;

/// The kind byte stored in a segment's index. Values are part of the on-disk format:
/// never renumber, only add.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    Write = 1,
    Discard = 2,
    WriteZeroes = 3,
    Flush = 4,
    Mark = 5,
    Epoch = 6,
    ResyncBegin = 7,
    ResyncData = 8,
    ResyncEnd = 9,
    /// Added after format version 1 shipped: an older reader refuses a segment holding one
    /// with an "unknown record kind" error naming the object, never misreads it.
    Verify = 10,
    /// The writer of this epoch demoted itself: the last record of its epoch; a `promote`
    /// without `--force` requires it at the end of the current epoch.
    Demote = 11,
}

impl RecordKind {
    pub fn from_u8(v: u8) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Discard,
            3 => RecordKind::WriteZeroes,
            4 => RecordKind::Flush,
            5 => RecordKind::Mark,
            6 => RecordKind::Epoch,
            7 => RecordKind::ResyncBegin,
            8 => RecordKind::ResyncData,
            9 => RecordKind::ResyncEnd,
            10 => RecordKind::Verify,
            11 => RecordKind::Demote,
            _ => return None,
        })
    }

    /// Name used by `journal inspect` and in JSON output.
    pub fn name(self) -> &'static str {
        match self {
            RecordKind::Write => "WRITE",
            RecordKind::Discard => "DISCARD",
            RecordKind::WriteZeroes => "WRITE_ZEROES",
            RecordKind::Flush => "FLUSH",
            RecordKind::Mark => "MARK",
            RecordKind::Epoch => "EPOCH",
            RecordKind::ResyncBegin => "RESYNC_BEGIN",
            RecordKind::ResyncData => "RESYNC_DATA",
            RecordKind::ResyncEnd => "RESYNC_END",
            RecordKind::Verify => "VERIFY",
            RecordKind::Demote => "DEMOTE",
        }
    }
}

/// What a record does. Offsets and lengths are in bytes on device `dev` of the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Data written by a client.
    Write { offset: u64, data: Bytes },
    /// A TRIM: the range's content became undefined; replicas punch a hole.
    Discard { offset: u64, len: u64 },
    /// The range reads as zeroes from now on.
    WriteZeroes { offset: u64, len: u64 },
    /// The primary made everything before this durable.
    Flush,
    /// A named point (e.g. after an fsfreeze); restore can target it.
    Mark { name: String },
    /// A writer of this epoch started appending.
    Epoch { epoch: u64 },
    /// The writer of this epoch demoted itself: nothing of its epoch follows (`tinylag
    /// demote`). Stored like `EPOCH`: the epoch in the index entry's offset, no payload.
    Demote { epoch: u64 },
    /// Start of a span that is applied atomically (see docs/DESIGN.md, primary step 4).
    ResyncBegin,
    /// Region content read from the primary during a resync.
    ResyncData { offset: u64, data: Bytes },
    /// End of the resync span: the replica equals the primary here.
    ResyncEnd,
    /// The primary's bytes `offset..offset + len` (one region) hashed at this point of the
    /// order: a replica that applies it compares its own bytes (see [`VerifyChecksum`]).
    Verify {
        offset: u64,
        len: u64,
        checksum: VerifyChecksum,
    },
}

/// Length of a [`VerifyChecksum`].
pub(crate) const VERIFY_CHECKSUM_LEN: usize = 32;

/// The checksum a `VERIFY` record carries: SHA-256 of the region's bytes. A cryptographic
/// hash, not CRC32C: a verify exists to catch silent divergence, and a 32-bit CRC would let
/// one mismatching region in four billion through unnoticed. Hardware SHA extensions make
/// it cost about as much as reading the region.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyChecksum(pub [u8; VERIFY_CHECKSUM_LEN]);

impl VerifyChecksum {
    /// The checksum of `data`.
    pub fn of(data: &[u8]) -> VerifyChecksum {
        use sha2::Digest as _;
        VerifyChecksum(sha2::Sha256::digest(data).into())
    }

    /// Lower-case hex, for logs and status.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for VerifyChecksum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

/// The payload a `VERIFY` record stores in a segment body (40 bytes, little-endian):
///
/// ```text
/// offset size field     meaning
///      0    8 len       length of the verified range (the index entry's `offset` is its start)
///      8   32 checksum  SHA-256 of the range's bytes
/// ```
///
/// The index entry keeps the usual payload rules (`length` = payload length = 40), so every
/// existing CRC and length check covers it unchanged.
pub(crate) const VERIFY_PAYLOAD_LEN: usize = 8 + VERIFY_CHECKSUM_LEN;

/// Encodes a `VERIFY` payload (see [`VERIFY_PAYLOAD_LEN`]).
pub(crate) fn encode_verify_payload(
    len: u64,
    checksum: &VerifyChecksum,
) -> [u8; VERIFY_PAYLOAD_LEN] {
    let mut out = [0u8; VERIFY_PAYLOAD_LEN];
    out[..8].copy_from_slice(&len.to_le_bytes());
    out[8..].copy_from_slice(&checksum.0);
    out
}

/// Decodes a `VERIFY` payload; `None` when it is not [`VERIFY_PAYLOAD_LEN`] bytes.
pub(crate) fn decode_verify_payload(payload: &[u8]) -> Option<(u64, VerifyChecksum)> {
    if payload.len() != VERIFY_PAYLOAD_LEN {
        return None;
    }
    let len = u64::from_le_bytes(payload[..8].try_into().ok()?);
    let checksum = VerifyChecksum(payload[8..].try_into().ok()?);
    Some((len, checksum))
}

impl Op {
    pub fn kind(&self) -> RecordKind {
        match self {
            Op::Write { .. } => RecordKind::Write,
            Op::Discard { .. } => RecordKind::Discard,
            Op::WriteZeroes { .. } => RecordKind::WriteZeroes,
            Op::Flush => RecordKind::Flush,
            Op::Mark { .. } => RecordKind::Mark,
            Op::Epoch { .. } => RecordKind::Epoch,
            Op::Demote { .. } => RecordKind::Demote,
            Op::ResyncBegin => RecordKind::ResyncBegin,
            Op::ResyncData { .. } => RecordKind::ResyncData,
            Op::ResyncEnd => RecordKind::ResyncEnd,
            Op::Verify { .. } => RecordKind::Verify,
        }
    }

    /// The device byte range this operation changes, if any.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        match self {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                Some(*offset..*offset + data.len() as u64)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                Some(*offset..*offset + *len)
            }
            _ => None,
        }
    }

    /// Bytes of payload the record carries in a segment body.
    pub fn payload_len(&self) -> usize {
        match self {
            Op::Write { data, .. } | Op::ResyncData { data, .. } => data.len(),
            Op::Mark { name } => name.len(),
            Op::Verify { .. } => VERIFY_PAYLOAD_LEN,
            _ => 0,
        }
    }
}

/// One journaled event.
///
/// # Invariants
/// - Along a journal, `lsn` is gap-free and strictly increasing, and `timestamp_ns` never
///   decreases.
/// - `timestamp_ns` is nanoseconds since the UNIX epoch (UTC) at acknowledgement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub lsn: u64,
    pub timestamp_ns: u64,
    /// Index of the device inside the consistency group.
    pub dev: u32,
    pub op: Op,
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        self.op.kind()
    }
}
