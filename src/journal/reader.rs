//! Reading the journal in order: a cursor over the logical chain of segments, which asks for
//! the predicted key of the next segment (no listing) and follows plugs over abandoned seqs.
//!
//! Must never: return a record out of LSN order, skip an LSN, or return anything from an
//! object whose UUID, seq, first LSN or checksums are not the expected ones.

use std::sync::Arc;

use super::error::JournalResult;
use super::manifest::Manifest;
use super::segment::{
    read_index, read_segment, DecodedSegment, Expected, SegmentError, SegmentIndex,
};
use crate::store::ObjectStore;

/// A position in the logical journal: the segment to read next and the LSN it must start with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub seq: u64,
    pub next_lsn: u64,
}

/// What a step of the cursor found.
#[derive(Debug)]
pub enum Step {
    /// A segment with records (or none: an empty segment is legal); the cursor moved past it.
    Segment(DecodedSegment),
    /// The next segment does not exist yet.
    NotYet,
}

/// Reads segments of one journal.
#[derive(Clone, Debug)]
pub struct JournalReader {
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
}

impl JournalReader {
    pub fn new(store: Arc<dyn ObjectStore>, manifest: Manifest) -> Self {
        JournalReader { store, manifest }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn expected(&self, seq: u64, first_lsn: Option<u64>) -> Expected {
        Expected {
            uuid: self.manifest.uuid,
            seq,
            first_lsn,
        }
    }

    /// Reads segment `seq` whole; `None` when it does not exist.
    pub async fn segment(
        &self,
        seq: u64,
        first_lsn: Option<u64>,
    ) -> JournalResult<Option<DecodedSegment>> {
        let key = self.manifest.segment_key(seq);
        match read_segment(self.store.as_ref(), &key, &self.expected(seq, first_lsn)).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads only the index of segment `seq` (one ranged GET of the tail); `None` when absent.
    pub async fn index(&self, seq: u64) -> JournalResult<Option<SegmentIndex>> {
        let key = self.manifest.segment_key(seq);
        match read_index(self.store.as_ref(), &key, &self.expected(seq, None)).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads the segment at the cursor. Plugs are followed (they hold no records); the cursor
    /// moves past what is returned.
    pub async fn step(&self, cursor: &mut Cursor) -> JournalResult<Step> {
        loop {
            let Some(segment) = self.segment(cursor.seq, Some(cursor.next_lsn)).await? else {
                return Ok(Step::NotYet);
            };
            if segment.header.plug {
                cursor.seq = segment.header.next_seq;
                continue;
            }
            cursor.seq = segment.header.next_seq;
            cursor.next_lsn = segment.header.end_lsn();
            return Ok(Step::Segment(segment));
        }
    }

    /// [`step`](Self::step) for a cursor that may point into the middle of its segment (a
    /// consumer that committed part of a segment): the segment at `cursor.seq` may start
    /// before `cursor.next_lsn`, and its records before it are dropped. It must still hold
    /// `cursor.next_lsn` (or end exactly before it), or it is refused like a segment that
    /// starts at the wrong LSN.
    pub async fn step_resuming(&self, cursor: &mut Cursor) -> JournalResult<Step> {
        let key = self.manifest.segment_key(cursor.seq);
        let Some(mut segment) = self.segment(cursor.seq, None).await? else {
            return Ok(Step::NotYet);
        };
        let (first, end) = (segment.header.first_lsn, segment.header.end_lsn());
        if first > cursor.next_lsn || end < cursor.next_lsn {
            return Err(SegmentError::WrongFirstLsn {
                key,
                expected: cursor.next_lsn,
                found: first,
            }
            .into());
        }
        if segment.header.plug {
            cursor.seq = segment.header.next_seq;
            return self.step(cursor).await;
        }
        segment.records.retain(|r| r.lsn >= cursor.next_lsn);
        cursor.seq = segment.header.next_seq;
        cursor.next_lsn = end;
        Ok(Step::Segment(segment))
    }

    /// The first seq in `lo..hi` whose last record is at or after `time_ns` (binary search on
    /// segment indexes: O(log n) tail reads). Returns `hi` if none. Plugs and missing seqs
    /// count as "before".
    pub async fn seek_time(&self, lo: u64, hi: u64, time_ns: u64) -> JournalResult<u64> {
        let (mut lo, mut hi) = (lo, hi);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let after = match self.index(mid).await? {
                Some(i) => i.last_timestamp().is_some_and(|t| t >= time_ns),
                None => false,
            };
            if after {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::journal::manifest::ManifestParams;
    use crate::journal::record::{Op, Record};
    use crate::journal::segment::encode_segment;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_cursor_inside_a_segment_resumes_after_its_last_record() {
        let store = Arc::new(MemoryStore::new());
        let params = ManifestParams {
            device_name: "d".into(),
            size: 1 << 20,
            block_size: 4096,
            region_size: 1 << 20,
            splay_width: 2,
            segment_size: 1 << 20,
        };
        let manifest = Manifest::new(&params, 0).unwrap();
        let records: Vec<Record> = (1..=5)
            .map(|lsn| Record {
                lsn,
                timestamp_ns: lsn,
                dev: 0,
                op: Op::Write {
                    offset: 0,
                    data: Bytes::from_static(b"x"),
                },
            })
            .collect();
        let body = encode_segment(manifest.uuid, 1, 0, 1, &records).unwrap();
        store.put(&manifest.segment_key(0), body).await.unwrap();
        let reader = JournalReader::new(store, manifest);

        let mut cursor = Cursor {
            seq: 0,
            next_lsn: 4,
        };
        let Step::Segment(s) = reader.step_resuming(&mut cursor).await.unwrap() else {
            panic!("segment 0 exists");
        };
        assert_eq!(s.records.iter().map(|r| r.lsn).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(
            cursor,
            Cursor {
                seq: 1,
                next_lsn: 6
            }
        );
        assert!(matches!(
            reader.step_resuming(&mut cursor).await.unwrap(),
            Step::NotYet
        ));
        // A cursor past the segment's end, or before its start, is refused.
        for next_lsn in [7, 0] {
            let mut wrong = Cursor { seq: 0, next_lsn };
            assert!(reader.step_resuming(&mut wrong).await.is_err());
        }
        // A cursor exactly at the end gets an empty segment.
        let mut at_end = Cursor {
            seq: 0,
            next_lsn: 6,
        };
        let Step::Segment(s) = reader.step_resuming(&mut at_end).await.unwrap() else {
            panic!("segment 0 exists");
        };
        assert!(s.records.is_empty());
    }
}
