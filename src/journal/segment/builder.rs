//! Encoding: the incremental [`SegmentBuilder`] and the one-shot helpers built on it.
//!
//! Must never: accept a record that would make the segment undecodable (LSN gap, timestamp
//! running backwards, payload or count past the limits); produce different bytes for the same
//! records (the builder and [`encode_segment`] share one path).

use bytes::Bytes;
use uuid::Uuid;

use super::buffers::BufferRecycler;
use super::header::Trailer;
use super::index::{archived_len, Footer, FooterEntry};
use super::{
    has_payload, payload_bytes, SegmentError, SegmentHeader, FLAG_ENCRYPTED, FLAG_PLUG,
    FORMAT_VERSION, HEADER_LEN, MAX_INDEX_LEN, MAX_PAYLOAD_LEN, MAX_RECORDS, SEALED_INDEX_PREFIX,
    TRAILER_LEN,
};
use crate::aligned::{grow_zeroed, AlignedBuf, PAGE_ALIGN};
use crate::crypto::seal::NONCE_LEN;
use crate::crypto::{Key, ObjectKind, Part, SealScope, SEAL_OVERHEAD};
use crate::journal::record::{Op, Record};

/// zstd level: the writer runs on few cores, and level 1 already wins most of what
/// compression can win on block data (zeroes, text, sparse structures).
const ZSTD_LEVEL: i32 = 1;
/// Payloads shorter than this are stored raw: a zstd frame's overhead eats the gain.
const MIN_COMPRESS_LEN: usize = 64;

const _: () = assert!(archived_len(MAX_RECORDS) <= MAX_INDEX_LEN);

/// Incremental encoder: the writer pushes records as they arrive (compressing at push time)
/// and closes the segment when [`encoded_len`](Self::encoded_len) reaches the target size.
pub struct SegmentBuilder {
    uuid: Uuid,
    epoch: u64,
    seq: u64,
    first_lsn: u64,
    /// Header placeholder followed by the body: `finish` fills in the header and appends the
    /// index and trailer, so the body is never copied again. Page-aligned (see
    /// [`super::buffers`]).
    buf: AlignedBuf,
    /// Where the buffer goes back once the finished segment is dropped.
    recycler: Option<BufferRecycler>,
    entries: Vec<FooterEntry>,
    last_timestamp: Option<u64>,
    body_crc: u32,
    /// Created on the first payload worth compressing; reused for every later one.
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Whether payloads are offered to zstd at all (see [`SegmentBuilder::set_compression`]).
    compress: bool,
    /// The key payloads and the index are sealed with, and the kind of object they go to;
    /// `None` writes plaintext (today's format, byte for byte).
    sealing: Option<(Key, ObjectKind)>,
}

impl std::fmt::Debug for SegmentBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentBuilder")
            .field("uuid", &self.uuid)
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .field("first_lsn", &self.first_lsn)
            .field("records", &self.entries.len())
            .field("body_len", &(self.buf.len() - HEADER_LEN))
            .finish()
    }
}

impl SegmentBuilder {
    pub fn new(uuid: Uuid, epoch: u64, seq: u64, first_lsn: u64) -> Self {
        Self::with_buffer(
            uuid,
            epoch,
            seq,
            first_lsn,
            AlignedBuf::new(PAGE_ALIGN),
            None,
        )
    }

    /// A builder encoding into a buffer from `recycler` with room for `capacity` bytes (the
    /// segment size plus slack); the finished segment's bytes give it back when dropped.
    pub fn recycled(
        uuid: Uuid,
        epoch: u64,
        seq: u64,
        first_lsn: u64,
        recycler: &BufferRecycler,
        capacity: usize,
    ) -> Self {
        let buf = recycler.take(capacity);
        Self::with_buffer(uuid, epoch, seq, first_lsn, buf, Some(recycler.clone()))
    }

    fn with_buffer(
        uuid: Uuid,
        epoch: u64,
        seq: u64,
        first_lsn: u64,
        mut buf: AlignedBuf,
        recycler: Option<BufferRecycler>,
    ) -> Self {
        buf.clear();
        buf.extend_from_slice(&[0; HEADER_LEN]);
        SegmentBuilder {
            uuid,
            epoch,
            seq,
            first_lsn,
            buf,
            recycler,
            entries: Vec::new(),
            last_timestamp: None,
            body_crc: 0,
            compressor: None,
            compress: true,
            sealing: crate::crypto::writing_key().map(|k| (k, ObjectKind::JournalSegment)),
        }
    }

    /// Seals with `key` (or writes plaintext), overriding the process keyring's choice.
    /// Call before the first push.
    pub fn set_sealing(&mut self, key: Option<Key>) {
        debug_assert!(self.entries.is_empty(), "sealing changed mid-segment");
        let kind = self
            .sealing
            .as_ref()
            .map_or(ObjectKind::JournalSegment, |(_, k)| *k);
        self.sealing = key.map(|k| (k, kind));
    }

    /// Which kind of object this segment becomes (bound into every seal): the undo log's
    /// segments say [`ObjectKind::UndoSegment`].
    pub fn set_object_kind(&mut self, kind: ObjectKind) {
        if let Some((_, k)) = self.sealing.as_mut() {
            *k = kind;
        }
    }

    fn seal_scope(&self, epoch: u64) -> Option<(&Key, SealScope)> {
        self.sealing.as_ref().map(|(key, kind)| {
            (
                key,
                SealScope {
                    kind: *kind,
                    key_id: key.id(),
                    uuid: self.uuid,
                    epoch,
                    seq: self.seq,
                },
            )
        })
    }

    /// Offers later payloads to zstd (the default) or stores them raw. A writer whose data
    /// does not compress saves the attempt; the format is the same either way.
    pub fn set_compression(&mut self, enabled: bool) {
        self.compress = enabled;
    }

    /// Reserves room for `bytes` more of encoded segment, so a writer that knows its target
    /// size allocates once instead of doubling (a doubled buffer can hold twice the memory
    /// the segment needs until it is dropped).
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve_exact(bytes);
    }

    /// Bytes the last record's payload takes in the body (`None` before the first push).
    pub fn last_stored_len(&self) -> Option<usize> {
        self.entries.last().map(|e| e.stored_len as usize)
    }

    /// Appends a record. Its LSN must be [`next_lsn`](Self::next_lsn) and its timestamp not
    /// before the previous record's. On error the builder is unchanged.
    pub fn push(&mut self, record: &Record) -> Result<(), SegmentError> {
        self.check(record)?;
        let payload = payload_bytes(&record.op);
        let body_pos = self.buf.len() as u64;
        let payload_crc = crc32c::crc32c(&payload);
        let (stored_len, compressed) = if self.sealing.is_some() && has_payload(record.kind()) {
            self.append_sealed(&payload, payload_crc, record.lsn)
        } else {
            self.append_payload(&payload, payload_crc)
        };
        let (offset, length) = match &record.op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                (*offset, data.len() as u64)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => (*offset, *len),
            Op::Mark { name } => (0, name.len() as u64),
            Op::Epoch { epoch } | Op::Demote { epoch } => (*epoch, 0),
            Op::Verify { offset, .. } => (*offset, payload.len() as u64),
            Op::Flush | Op::ResyncBegin | Op::ResyncEnd => (0, 0),
        };
        self.entries.push(FooterEntry {
            lsn: record.lsn,
            timestamp_ns: record.timestamp_ns,
            offset,
            length,
            body_pos,
            dev: record.dev,
            // append_payload stores at most payload.len() <= MAX_PAYLOAD_LEN bytes.
            stored_len: stored_len as u32,
            crc: payload_crc,
            kind: record.kind() as u8,
            compressed: u8::from(compressed),
        });
        self.last_timestamp = Some(record.timestamp_ns);
        Ok(())
    }

    fn check(&self, record: &Record) -> Result<(), SegmentError> {
        let seq = self.seq;
        let expected = self.next_lsn();
        if record.lsn != expected {
            return Err(SegmentError::PushLsnNotNext {
                seq,
                expected,
                found: record.lsn,
            });
        }
        if let Some(previous) = self.last_timestamp.filter(|&p| record.timestamp_ns < p) {
            return Err(SegmentError::PushTimestampDecreasing {
                seq,
                lsn: record.lsn,
                previous,
                found: record.timestamp_ns,
            });
        }
        let limit = |what, value: u64, limit: u64| SegmentError::PushLimitExceeded {
            seq,
            what,
            value,
            limit,
        };
        if self.entries.len() >= MAX_RECORDS {
            return Err(limit(
                "record count",
                self.entries.len() as u64 + 1,
                MAX_RECORDS as u64,
            ));
        }
        // The LSN after this record must exist, or the segment's end LSN overflows.
        if record.lsn == u64::MAX {
            return Err(limit("LSN", record.lsn, u64::MAX - 1));
        }
        let payload_len = record.op.payload_len();
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(limit(
                "payload length",
                payload_len as u64,
                MAX_PAYLOAD_LEN as u64,
            ));
        }
        let range = match &record.op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                Some((*offset, data.len() as u64))
            }
            Op::Discard { offset, len }
            | Op::WriteZeroes { offset, len }
            | Op::Verify { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        };
        if let Some((offset, len)) = range.filter(|(o, l)| o.checked_add(*l).is_none()) {
            return Err(SegmentError::PushRangeOverflow {
                seq,
                lsn: record.lsn,
                offset,
                len,
            });
        }
        Ok(())
    }

    /// Stores `payload` at the end of the body, compressed when that saves at least 1/8 of
    /// it; returns the stored length and whether it is compressed.
    fn append_payload(&mut self, payload: &[u8], payload_crc: u32) -> (usize, bool) {
        let start = self.buf.len();
        if self.compress && payload.len() >= MIN_COMPRESS_LEN {
            // zstd fails with "destination too small" once the frame would exceed the
            // limit, which is exactly the "not worth it" case.
            let limit = payload.len() * 7 / 8;
            if self.compressor.is_none() {
                // Without a context (zstd could not allocate one) payloads are stored raw:
                // a valid, if larger, segment.
                self.compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            if let Some(compressor) = self.compressor.as_mut() {
                grow_zeroed(&mut self.buf, start + limit);
                if let Ok(n) = compressor.compress_to_buffer(payload, &mut self.buf[start..]) {
                    self.buf.truncate(start + n);
                    self.body_crc = crc32c::crc32c_append(self.body_crc, &self.buf[start..]);
                    return (n, true);
                }
                self.buf.truncate(start);
            }
        }
        self.buf.extend_from_slice(payload);
        // Stored raw, the body's bytes are the payload's: extend the body's CRC with the
        // payload's instead of reading the bytes a second time (a CRC pass was 2 of the
        // encoder's 14 % of a 4 KiB write's CPU; the combine is one 32×32 bit product).
        self.body_crc = super::crc::combine(self.body_crc, payload_crc, payload.len());
        (payload.len(), false)
    }

    /// [`append_payload`](Self::append_payload), then sealed in place as one unit (nonce,
    /// the stored bytes encrypted, tag); the body CRC covers the sealed bytes.
    fn append_sealed(&mut self, payload: &[u8], payload_crc: u32, lsn: u64) -> (usize, bool) {
        let start = self.buf.len();
        let crc_before = self.body_crc;
        self.buf.extend_from_slice(&[0; NONCE_LEN]);
        let (_, compressed) = self.append_payload(payload, payload_crc);
        let Some((key, scope)) = self.seal_scope(self.epoch) else {
            unreachable!("append_sealed without a sealing key");
        };
        let key = key.clone();
        let tag = scope.seal_in_place(&key, Part::Payload, lsn, &mut self.buf[start..]);
        self.buf.extend_from_slice(&tag);
        self.body_crc = crc32c::crc32c_append(crc_before, &self.buf[start..]);
        (self.buf.len() - start, compressed)
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Exactly the number of bytes [`finish`](Self::finish) would produce now.
    pub fn encoded_len(&self) -> usize {
        let seal = if self.sealing.is_some() {
            SEALED_INDEX_PREFIX + SEAL_OVERHEAD
        } else {
            0
        };
        self.buf.len() + archived_len(self.entries.len()) + seal + TRAILER_LEN
    }

    /// The LSN the next pushed record must have.
    pub fn next_lsn(&self) -> u64 {
        // push refuses LSN u64::MAX, so this cannot overflow.
        self.first_lsn + self.entries.len() as u64
    }

    /// Closes the segment: header, body, index, trailer.
    pub fn finish(self) -> Bytes {
        let next_seq = self.seq.saturating_add(1);
        self.finish_with(0, next_seq)
    }

    pub(crate) fn finish_with(self, flags: u16, next_seq: u64) -> Bytes {
        // Payload and index seals bind the epoch; the index's binds 0 instead (a tail reader
        // does not know the epoch before opening it; it is inside).
        let index_seal = self.seal_scope(0).map(|(key, scope)| (key.clone(), scope));
        let key_id = index_seal.as_ref().map_or(0, |(key, _)| key.id().0);
        let flags = if key_id != 0 {
            flags | FLAG_ENCRYPTED
        } else {
            flags
        };
        let mut buf = self.buf;
        let record_count = self.entries.len() as u32;
        let header = SegmentHeader {
            uuid: self.uuid,
            epoch: self.epoch,
            seq: self.seq,
            first_lsn: self.first_lsn,
            next_seq,
            record_count,
            plug: flags & FLAG_PLUG != 0,
        };
        buf[..HEADER_LEN].copy_from_slice(&header.encode_sealed(key_id));
        let footer = Footer {
            uuid: *self.uuid.as_bytes(),
            epoch: self.epoch,
            seq: self.seq,
            first_lsn: self.first_lsn,
            next_seq,
            body_crc: self.body_crc,
            version: FORMAT_VERSION,
            flags,
            entries: self.entries,
        };
        // Serializing plain integers and one vector into a growable buffer has no failure
        // path but allocation, which aborts anyway.
        let index = rkyv::to_bytes::<rkyv::rancor::Error>(&footer)
            .expect("archiving a segment index into memory cannot fail");
        // Borrowed as archived, or sealed into a new buffer (nonce | ciphertext | tag).
        let index: std::borrow::Cow<'_, [u8]> = match &index_seal {
            None => std::borrow::Cow::Borrowed(&index[..]),
            Some((key, scope)) => {
                // The body CRC goes first in the clear (see SEALED_INDEX_PREFIX), so that
                // `journal verify` without the key still checks every byte of the body.
                let sealed = scope.seal(key, Part::Index, u64::MAX, &index);
                let mut region = Vec::with_capacity(SEALED_INDEX_PREFIX + sealed.len());
                region.extend_from_slice(&self.body_crc.to_le_bytes());
                region.extend_from_slice(&sealed);
                std::borrow::Cow::Owned(region)
            }
        };
        let trailer = Trailer {
            // The limit on records keeps the index under MAX_INDEX_LEN (asserted above).
            index_len: index.len() as u32,
            index_crc: crc32c::crc32c(&index),
            record_count,
            key_id,
        };
        buf.reserve_exact(index.len() + TRAILER_LEN);
        buf.extend_from_slice(&index);
        buf.extend_from_slice(&trailer.encode());
        match self.recycler {
            Some(recycler) => recycler.wrap(buf),
            None => Bytes::from_owner(buf),
        }
    }
}

/// Encodes `records` (LSNs `first_lsn..`, timestamps non-decreasing) as one segment.
pub fn encode_segment(
    uuid: Uuid,
    epoch: u64,
    seq: u64,
    first_lsn: u64,
    records: &[Record],
) -> Result<Bytes, SegmentError> {
    let mut builder = SegmentBuilder::new(uuid, epoch, seq, first_lsn);
    for record in records {
        builder.push(record)?;
    }
    Ok(builder.finish())
}

/// A PLUG: no records, `first_lsn` = the next LSN expected, `next_seq` = where the journal
/// continues (must be greater than `seq`; readers refuse a plug that points backwards).
pub fn encode_plug(uuid: Uuid, epoch: u64, seq: u64, first_lsn: u64, next_seq: u64) -> Bytes {
    debug_assert!(
        next_seq > seq,
        "plug {seq} must point forward, not to {next_seq}"
    );
    SegmentBuilder::new(uuid, epoch, seq, first_lsn).finish_with(FLAG_PLUG, next_seq)
}
