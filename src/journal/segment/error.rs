//! Every way encoding or decoding a segment fails.
//!
//! Must never: lose the object key of a decode failure (an operator must be able to find
//! the broken object from the message alone).

use uuid::Uuid;

use crate::store::StoreError;

/// A segment that cannot be built, read or trusted.
///
/// Decode-side variants name the object key; encode-side variants (`Push*`) name the seq of
/// the segment being built, since it has no key yet.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// An encrypted segment's index or payload did not open: its key is not in the keyring
    /// (the message names the key id, never a key), or its tag failed (tampered, moved from
    /// another object, or the wrong key).
    #[error("segment {key}: {part}: {source}")]
    Sealed {
        key: String,
        /// `"index"` or `"payload of LSN n"`.
        part: String,
        #[source]
        source: crate::crypto::OpenError,
    },
    /// The header or the trailer does not start/end with its magic: not a segment, or a
    /// segment cut short or overwritten.
    #[error("segment {key}: bad {part} magic {found:02x?} (not a segment, or cut short)")]
    BadMagic {
        key: String,
        /// `"header"` or `"trailer"`.
        part: &'static str,
        found: [u8; 8],
    },
    /// Written by a newer (or unknown) format version.
    #[error("segment {key}: unsupported format version {version} (this build reads {supported})")]
    UnsupportedVersion {
        key: String,
        version: u16,
        supported: u16,
    },
    /// Flag bits this version does not know are set.
    #[error("segment {key}: unknown flags {flags:#06x}")]
    UnknownFlags { key: String, flags: u16 },
    /// A field this version reserves (and writes as zero) is not zero.
    #[error("segment {key}: reserved {field} is {value:#x}, expected 0")]
    ReservedNotZero {
        key: String,
        field: &'static str,
        value: u64,
    },
    /// The segment belongs to another device group (another journal).
    #[error("segment {key}: belongs to device group {found}, expected {expected}")]
    ForeignUuid {
        key: String,
        expected: Uuid,
        found: Uuid,
    },
    /// The object holds another seq than its key promises.
    #[error("segment {key}: holds seq {found}, expected {expected}")]
    WrongSeq {
        key: String,
        expected: u64,
        found: u64,
    },
    /// A segment of an older writer epoch follows one of a newer epoch in the journal's
    /// order: a fenced writer wrote it after the newer writer began, and no reader may take
    /// it (its records may never have happened on the primary as the newer writer saw it).
    #[error(
        "segment {key}: written by writer epoch {epoch} after epoch {newer} began (a fenced \
         writer's late upload); refusing it"
    )]
    StaleEpoch { key: String, epoch: u64, newer: u64 },
    /// The segment does not start at the LSN the reader continues from.
    #[error("segment {key}: starts at LSN {found}, expected {expected}")]
    WrongFirstLsn {
        key: String,
        expected: u64,
        found: u64,
    },
    /// The header checksum does not match its bytes.
    #[error("segment {key}: header CRC32C is {stored:#010x}, bytes give {computed:#010x}")]
    HeaderCrc {
        key: String,
        stored: u32,
        computed: u32,
    },
    /// The index checksum in the trailer does not match the index bytes.
    #[error("segment {key}: index CRC32C is {stored:#010x}, bytes give {computed:#010x}")]
    IndexCrc {
        key: String,
        stored: u32,
        computed: u32,
    },
    /// The body checksum in the index does not match the body bytes (catches corruption that
    /// decompresses to the right payload, e.g. in bits a zstd decoder ignores).
    #[error("segment {key}: body CRC32C is {stored:#010x}, bytes give {computed:#010x}")]
    BodyCrc {
        key: String,
        stored: u32,
        computed: u32,
    },
    /// The index bytes are not a valid archive (rkyv/bytecheck validation failed).
    #[error("segment {key}: index archive is invalid: {source}")]
    IndexInvalid {
        key: String,
        #[source]
        source: rkyv::rancor::Error,
    },
    /// A field of the header, the index and the trailer disagree.
    #[error("segment {key}: {field} is {header} in the header/trailer but {index} in the index")]
    IndexDisagrees {
        key: String,
        field: &'static str,
        header: u64,
        index: u64,
    },
    /// The next seq does not follow the seq (seq + 1, or beyond it for a plug).
    #[error("segment {key}: next seq {next_seq} is invalid for seq {seq} (plug: {plug})")]
    BadNextSeq {
        key: String,
        seq: u64,
        next_seq: u64,
        plug: bool,
    },
    /// A plug segment claims to hold records.
    #[error("segment {key}: plug segment claims {record_count} records")]
    PlugNotEmpty { key: String, record_count: u32 },
    /// The index's LSNs are not `first_lsn, first_lsn + 1, …`.
    #[error("segment {key}: index entry {position} has LSN {found}, expected {expected}")]
    LsnNotContiguous {
        key: String,
        position: usize,
        expected: u64,
        found: u64,
    },
    /// A timestamp runs backwards along the index.
    #[error("segment {key}: LSN {lsn} has timestamp {found} before the previous {previous}")]
    TimestampsDecreasing {
        key: String,
        lsn: u64,
        previous: u64,
        found: u64,
    },
    /// An index entry has a kind byte this version does not know.
    #[error("segment {key}: LSN {lsn} has unknown record kind {kind}")]
    UnknownKind { key: String, lsn: u64, kind: u8 },
    /// An index entry's fields contradict its kind (e.g. a FLUSH with a payload).
    #[error("segment {key}: LSN {lsn} has an invalid index entry: {reason}")]
    EntryInvalid {
        key: String,
        lsn: u64,
        reason: &'static str,
    },
    /// The payloads do not tile the body: a gap or an overlap before this entry (or before
    /// the index, when `lsn` is `None`).
    #[error("segment {key}: payload of {} starts at {found}, expected {expected}", lsn.map_or("the index".to_string(), |l| format!("LSN {l}")))]
    BodyNotTiled {
        key: String,
        lsn: Option<u64>,
        expected: u64,
        found: u64,
    },
    /// A payload runs past the end of the body.
    #[error("segment {key}: payload of LSN {lsn} ends at {end}, past the body end {body_end}")]
    BodyOverrun {
        key: String,
        lsn: u64,
        end: u64,
        body_end: u64,
    },
    /// A payload's checksum does not match its (uncompressed) bytes.
    #[error("segment {key}: payload of LSN {lsn} has CRC32C {computed:#010x}, index says {stored:#010x}")]
    PayloadCrc {
        key: String,
        lsn: u64,
        stored: u32,
        computed: u32,
    },
    /// A payload has another length than its index entry says (stored or uncompressed).
    #[error("segment {key}: payload of LSN {lsn} is {found} bytes {what}, index says {expected}")]
    PayloadLength {
        key: String,
        lsn: u64,
        /// `"stored"` or `"uncompressed"`.
        what: &'static str,
        expected: u64,
        found: u64,
    },
    /// A compressed payload is not a valid zstd frame.
    #[error("segment {key}: payload of LSN {lsn} does not decompress: {source}")]
    Decompress {
        key: String,
        lsn: u64,
        #[source]
        source: std::io::Error,
    },
    /// A MARK's name is not UTF-8.
    #[error("segment {key}: MARK at LSN {lsn} has a name that is not UTF-8: {source}")]
    MarkNotUtf8 {
        key: String,
        lsn: u64,
        #[source]
        source: std::string::FromUtf8Error,
    },
    /// The object is shorter than its structure requires.
    #[error("segment {key}: object is {size} bytes, its structure needs at least {needed}")]
    Truncated { key: String, size: u64, needed: u64 },
    /// A length or count is beyond the format's limits (checked before allocating).
    #[error("segment {key}: {what} is {value}, the limit is {limit}")]
    LimitExceeded {
        key: String,
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// The tail given to [`super::decode_index_from_tail`] does not reach back to the start
    /// of the index: read the last `needed` bytes and call again.
    #[error("segment tail too short: the last {needed} bytes are needed")]
    TailTooShort { needed: u64 },
    /// The tail given is longer than the object it claims to end.
    #[error(
        "segment {key}: a tail of {tail_len} bytes cannot end an object of {object_size} bytes"
    )]
    TailLongerThanObject {
        key: String,
        tail_len: u64,
        object_size: u64,
    },
    /// Reading the object failed (including "not found": see [`SegmentError::is_not_found`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Encode: the pushed record's LSN is not the next one of the segment.
    #[error("segment seq {seq}: pushed LSN {found}, expected {expected}")]
    PushLsnNotNext { seq: u64, expected: u64, found: u64 },
    /// Encode: the pushed record's timestamp is before the previous record's.
    #[error(
        "segment seq {seq}: pushed LSN {lsn} with timestamp {found} before the previous {previous}"
    )]
    PushTimestampDecreasing {
        seq: u64,
        lsn: u64,
        previous: u64,
        found: u64,
    },
    /// Encode: the pushed record's range ends past `u64::MAX`.
    #[error("segment seq {seq}: pushed LSN {lsn} with range {offset}+{len} overflowing u64")]
    PushRangeOverflow {
        seq: u64,
        lsn: u64,
        offset: u64,
        len: u64,
    },
    /// Encode: a payload, the record count or the LSN is beyond the format's limits.
    #[error("segment seq {seq}: {what} is {value}, the limit is {limit}")]
    PushLimitExceeded {
        seq: u64,
        what: &'static str,
        value: u64,
        limit: u64,
    },
}

impl SegmentError {
    /// True when the object does not exist (yet): a tailing reader waits and asks again,
    /// where any other error means the journal is broken or unreachable.
    pub fn is_not_found(&self) -> bool {
        matches!(self, SegmentError::Store(e) if e.is_not_found())
    }
}
