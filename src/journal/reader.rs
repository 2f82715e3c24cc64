//! Reading the journal in order: a cursor over the logical chain of segments, which asks for
//! the predicted key of the next segment (no listing) and follows plugs over abandoned seqs.
//! [`ReadAhead`] is the same walk with several segment reads in flight; the replay agent,
//! restore and `mount --at` all read a segment range through it.
//!
//! [`Step::NotYet`] only says the next seq is missing now: a caller that stops there checks it
//! against the journal's known end (`head::check_missing`), below which it is a hole, not the
//! end (see `journal::head`).
//!
//! Must never: return a record out of LSN order, skip an LSN (a binary search takes a hole
//! for a hole, never for "before"), or return anything from an object whose UUID, seq,
//! first LSN or checksums are not the expected ones.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::error::{JournalError, JournalResult};
use super::manifest::Manifest;
use super::segment::{
    check_header, decode_payload, read_index, read_index_guessing, read_segment, DecodedSegment,
    Expected, IndexEntry, SegmentError, SegmentIndex,
};
use super::{consumer, head};
use crate::store::{ObjectStore, StoreError};

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

    /// [`index`](Self::index) with a first tail read of `guess` bytes; also returns the
    /// length of the tail that holds the index (the next guess for a walk over segments).
    pub async fn index_guessing(
        &self,
        seq: u64,
        guess: u64,
    ) -> JournalResult<Option<(SegmentIndex, u64)>> {
        let key = self.manifest.segment_key(seq);
        match read_index_guessing(self.store.as_ref(), &key, &self.expected(seq, None), guess).await
        {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// [`index`](Self::index), with the segment's header read and checked too (one more
    /// small ranged read): a zeroed or corrupt header is an error, not a listing.
    pub async fn checked_index(&self, seq: u64) -> JournalResult<Option<SegmentIndex>> {
        let Some(index) = self.index(seq).await? else {
            return Ok(None);
        };
        let key = self.manifest.segment_key(seq);
        check_header(self.store.as_ref(), &key, &self.expected(seq, None), &index).await?;
        Ok(Some(index))
    }

    /// Reads one record's payload from segment `seq` with a ranged read (time travel's
    /// extent map); its CRC is checked.
    pub async fn payload(&self, seq: u64, entry: &IndexEntry) -> JournalResult<bytes::Bytes> {
        let key = self.manifest.segment_key(seq);
        let stored = self.store.get_range(&key, entry.stored_range()).await?;
        Ok(decode_payload(&key, entry, &stored)?)
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
    /// count as "before" while searching; then, if the records wanted may lie before the seq
    /// found, a missing seq just before it (plugs skipped) is checked: a hole there is
    /// [`JournalError::Hole`], never an answer past the records it held.
    pub async fn seek_time(&self, lo: u64, hi: u64, time_ns: u64) -> JournalResult<u64> {
        let (seq, found) = self
            .first_reaching(lo, hi, |i| i.last_timestamp().is_some_and(|t| t >= time_ns))
            .await?;
        // The seq found holds the first record at or after `time_ns` unless it starts there:
        // then that record may have been in the seq before.
        let inside = found
            .and_then(|i| i.entries.first().map(|e| e.timestamp_ns < time_ns))
            .unwrap_or(false);
        if !inside {
            self.check_before(lo, seq).await?;
        }
        Ok(seq)
    }

    /// The first seq in `lo..hi` whose last record is at or after `lsn`, with its index
    /// (binary search on segment indexes, a hole refused, as [`seek_time`](Self::seek_time));
    /// `None` if none.
    pub async fn seek_lsn(
        &self,
        lo: u64,
        hi: u64,
        lsn: u64,
    ) -> JournalResult<Option<(u64, SegmentIndex)>> {
        let (seq, found) = self
            .first_reaching(lo, hi, |i| i.entries.last().is_some_and(|e| e.lsn >= lsn))
            .await?;
        if found.as_ref().is_none_or(|i| i.header.first_lsn > lsn) {
            self.check_before(lo, seq).await?;
        }
        Ok(found.map(|i| (seq, i)))
    }

    /// The binary search both seeks share: the first seq in `lo..hi` whose index `reached`
    /// accepts, with that index (`hi` and `None` if none). Plugs and missing seqs count as not
    /// reached; the caller decides whether what it wants may lie before the answer.
    async fn first_reaching(
        &self,
        lo: u64,
        hi: u64,
        reached: impl Fn(&SegmentIndex) -> bool,
    ) -> JournalResult<(u64, Option<SegmentIndex>)> {
        let (mut lo, mut hi) = (lo, hi);
        let end = hi;
        let mut found = None;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let index = self.index(mid).await?;
            if index.as_ref().is_some_and(&reached) {
                hi = mid;
                found = index;
            } else {
                lo = mid + 1;
            }
        }
        Ok((lo, found.filter(|_| lo < end)))
    }

    /// For a search of `start..` that answered `found` although what it looked for may lie
    /// before `found`: the first seq before `found` that is not a plug must exist, or be
    /// trimmed since the caller read the trim pointer, or lie at or above the journal's
    /// known end (an upload in flight). Anything else is a hole and refused. The lookups
    /// past one index read (the known end, the trim pointer) happen only for a missing seq.
    async fn check_before(&self, start: u64, found: u64) -> JournalResult<()> {
        for seq in (start..found).rev() {
            match self.index(seq).await? {
                Some(index) if index.header.plug => continue,
                Some(_) => return Ok(()),
                None => return self.check_missing_for_search(seq).await,
            }
        }
        Ok(())
    }

    async fn check_missing_for_search(&self, seq: u64) -> JournalResult<()> {
        let store = self.store.as_ref();
        match head::check_end(store, &self.manifest, seq).await {
            Err(hole @ JournalError::Hole { .. }) => {
                // Trim deletes from the bottom after moving its pointer: behind the pointer a
                // missing seq is trimmed, not a hole.
                let trim = consumer::load_trim_pointer(store).await?;
                if seq < trim.first_seq {
                    Ok(())
                } else {
                    Err(hole)
                }
            }
            other => other,
        }
    }
}

/// [`JournalReader::step`] with up to `width` segment reads in flight: the segments after the
/// cursor are fetched by predicted key ahead of need, without knowing their first LSN, and
/// each is checked against the cursor when its turn comes, so every step returns exactly
/// what [`JournalReader::step`] would. Memory: at most `width` decoded segments.
///
/// # Invariants
/// - `reads` holds consecutive seqs from the cursor's seq (or is empty), ending at `next - 1`.
/// - With an `end`, no read is started at or past it (except one, to see the end itself).
#[derive(Debug)]
pub struct ReadAhead {
    reader: JournalReader,
    /// Stop reading ahead at this seq (a known end of the journal), if any.
    end: Option<u64>,
    /// The seq the next read started will fetch.
    next: u64,
    reads: VecDeque<(u64, JoinHandle<JournalResult<Option<DecodedSegment>>>)>,
}

impl ReadAhead {
    /// A read-ahead over `reader`'s journal that never reads past `end` (exclusive), if any.
    pub fn new(reader: JournalReader, end: Option<u64>) -> Self {
        ReadAhead {
            reader,
            end,
            next: 0,
            reads: VecDeque::new(),
        }
    }

    pub fn reader(&self) -> &JournalReader {
        &self.reader
    }

    /// Drops every read in flight and starts again from `seq`.
    fn reset(&mut self, seq: u64) {
        for (_, read) in self.reads.drain(..) {
            read.abort();
        }
        self.next = seq;
    }

    /// Returns the segment at the cursor (following plugs) and moves the cursor past it,
    /// keeping up to `width` reads in flight after it. `NotYet` when the next segment does
    /// not exist (or the cursor reached `end`).
    pub async fn step(&mut self, cursor: &mut Cursor, width: usize) -> JournalResult<Step> {
        loop {
            if self.end.is_some_and(|end| cursor.seq >= end) {
                self.reset(cursor.seq);
                return Ok(Step::NotYet);
            }
            if self.reads.front().map(|(seq, _)| *seq) != Some(cursor.seq) {
                self.reset(cursor.seq);
            }
            while self.reads.len() < width.max(1)
                && self
                    .end
                    .is_none_or(|end| self.next < end || self.reads.is_empty())
            {
                let (reader, seq) = (self.reader.clone(), self.next);
                let read = tokio::spawn(async move { reader.segment(seq, None).await });
                self.reads.push_back((seq, read));
                self.next += 1;
            }
            let Some((seq, read)) = self.reads.pop_front() else {
                return Ok(Step::NotYet);
            };
            let key = self.reader.manifest().segment_key(seq);
            let fetched = read.await.map_err(|e| {
                JournalError::Store(StoreError::Transient {
                    store: self.reader.store().describe(),
                    key: key.clone(),
                    message: format!("read task failed: {e}"),
                })
            })??;
            let Some(segment) = fetched else {
                self.reset(cursor.seq);
                return Ok(Step::NotYet);
            };
            if segment.header.first_lsn != cursor.next_lsn {
                self.reset(cursor.seq);
                return Err(SegmentError::WrongFirstLsn {
                    key,
                    expected: cursor.next_lsn,
                    found: segment.header.first_lsn,
                }
                .into());
            }
            cursor.seq = segment.header.next_seq;
            if segment.header.plug {
                continue;
            }
            cursor.next_lsn = segment.header.end_lsn();
            return Ok(Step::Segment(segment));
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.reset(0);
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

    /// A 1 MiB device in 1 MiB segments: one segment holds everything these tests write.
    fn small_manifest() -> Manifest {
        let params = ManifestParams {
            device_name: "d".into(),
            size: 1 << 20,
            block_size: 4096,
            region_size: 1 << 20,
            splay_width: 2,
            segment_size: 1 << 20,
        };
        Manifest::new(&params, 0).unwrap()
    }

    #[tokio::test]
    async fn a_cursor_inside_a_segment_resumes_after_its_last_record() {
        let store = Arc::new(MemoryStore::new());
        let manifest = small_manifest();
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
    #[tokio::test]
    async fn read_ahead_returns_exactly_what_step_returns_over_plugs() {
        use crate::journal::segment::encode_plug;
        let store = Arc::new(MemoryStore::new());
        let manifest = small_manifest();
        let rec = |lsn| Record {
            lsn,
            timestamp_ns: lsn,
            dev: 0,
            op: Op::Flush,
        };
        // 0: LSNs 1-2; 1: a plug to 3; 2: an orphan nobody may read; 3: LSN 3; then 4: LSN 5
        // (a wrong first LSN: LSN 4 is missing).
        let put = |seq, body| {
            let store = store.clone();
            let key = manifest.segment_key(seq);
            async move { store.put(&key, body).await.unwrap() }
        };
        put(
            0,
            encode_segment(manifest.uuid, 1, 0, 1, &[rec(1), rec(2)]).unwrap(),
        )
        .await;
        put(1, encode_plug(manifest.uuid, 1, 1, 3, 3)).await;
        put(
            2,
            encode_segment(manifest.uuid, 1, 2, 99, &[rec(99)]).unwrap(),
        )
        .await;
        put(
            3,
            encode_segment(manifest.uuid, 1, 3, 3, &[rec(3)]).unwrap(),
        )
        .await;
        put(
            4,
            encode_segment(manifest.uuid, 1, 4, 5, &[rec(5)]).unwrap(),
        )
        .await;
        let reader = JournalReader::new(store, manifest);
        let start = Cursor {
            seq: 0,
            next_lsn: 1,
        };
        for width in [1, 3, 8] {
            let (mut plain, mut ahead_cursor) = (start, start);
            let mut ahead = ReadAhead::new(reader.clone(), None);
            for _ in 0..2 {
                let a = reader.step(&mut plain).await.unwrap();
                let b = ahead.step(&mut ahead_cursor, width).await.unwrap();
                match (a, b) {
                    (Step::Segment(a), Step::Segment(b)) => assert_eq!(a, b),
                    other => panic!("width {width}: {other:?}"),
                }
                assert_eq!(plain, ahead_cursor);
            }
            assert!(reader.step(&mut plain).await.is_err());
            assert!(ahead.step(&mut ahead_cursor, width).await.is_err());
        }
        // With an end, nothing at or past it is returned.
        let mut cursor = start;
        let mut ahead = ReadAhead::new(reader.clone(), Some(1));
        assert!(matches!(
            ahead.step(&mut cursor, 4).await.unwrap(),
            Step::Segment(_)
        ));
        assert!(matches!(
            ahead.step(&mut cursor, 4).await.unwrap(),
            Step::NotYet
        ));
    }

    /// Segments 0..8 (two records each, LSNs 1..=16) with segment 3 deleted behind tinylag's
    /// back: once the lease records 8 as durable, a search for an LSN or a time the hole held
    /// is the hole (before, it landed on seq 4 and skipped LSNs 7 and 8); a search for what
    /// lies outside it still answers, and a seq under the trim pointer is trimmed, not a hole.
    #[tokio::test]
    async fn a_binary_search_refuses_a_hole_instead_of_landing_past_it() {
        use crate::journal::consumer::{store_trim_pointer, TrimPointer};
        use crate::journal::epoch;
        use crate::journal::lease::{self, Lease};
        let store = Arc::new(MemoryStore::new());
        let params = ManifestParams {
            device_name: "d".into(),
            size: 1 << 20,
            block_size: 4096,
            region_size: 1 << 20,
            splay_width: 2,
            segment_size: 1 << 20,
        };
        let manifest = Manifest::new(&params, 1).unwrap();
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        for seq in (0..8u64).filter(|&s| s != 3) {
            let records: Vec<Record> = [2 * seq + 1, 2 * seq + 2]
                .map(|lsn| Record {
                    lsn,
                    timestamp_ns: lsn * 10,
                    dev: 0,
                    op: Op::Flush,
                })
                .into();
            let body = encode_segment(manifest.uuid, 1, seq, 2 * seq + 1, &records).unwrap();
            store.put(&manifest.segment_key(seq), body).await.unwrap();
        }
        let mut l = Lease::new(claim.epoch, 1, 2, 15_000);
        l.durable_next_seq = 8;
        lease::write(store.as_ref(), &l).await.unwrap();
        let reader = JournalReader::new(store.clone(), manifest);

        for lsn in [7, 8] {
            let err = reader.seek_lsn(0, 8, lsn).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    JournalError::Hole {
                        first_missing: 3,
                        ..
                    }
                ),
                "LSN {lsn}: {err}"
            );
        }
        let err = reader.seek_time(0, 8, 75).await.unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Hole {
                    first_missing: 3,
                    ..
                }
            ),
            "{err}"
        );
        // What lies outside the hole is still found: LSN 9 starts seq 4.
        assert_eq!(
            reader.seek_lsn(0, 8, 2).await.unwrap().map(|(s, _)| s),
            Some(0)
        );
        assert_eq!(
            reader.seek_lsn(0, 8, 9).await.unwrap().map(|(s, _)| s),
            Some(4)
        );
        assert_eq!(
            reader.seek_lsn(0, 8, 12).await.unwrap().map(|(s, _)| s),
            Some(5)
        );
        assert_eq!(reader.seek_time(0, 8, 95).await.unwrap(), 4);
        assert_eq!(
            reader.seek_lsn(4, 8, 12).await.unwrap().map(|(s, _)| s),
            Some(5)
        );
        // Trimmed meanwhile: below the trim pointer a missing seq is gone, not a hole.
        store_trim_pointer(
            store.as_ref(),
            &TrimPointer {
                first_seq: 4,
                first_lsn: 9,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            reader.seek_lsn(0, 8, 12).await.unwrap().map(|(s, _)| s),
            Some(5)
        );
        assert_eq!(reader.seek_time(0, 8, 75).await.unwrap(), 4);
    }
}
