//! `diff`: which byte ranges changed between two points of the journal, from segment indexes
//! alone. A segment's footer index lists every record's kind, device, offset and length, so
//! the extents written between two points cost one tail read per segment in the interval
//! (two when an index outgrows the first guess) and no payload read at all.
//!
//! The interval `(from, to]` is the records with `from.lsn < lsn <= to.lsn` on the lineage
//! (records a `promote --at` left off the chain changed nothing of the image). Their ranges
//! (WRITE, DISCARD, WRITE_ZEROES, RESYNC_DATA) are merged into sorted, disjoint extents per
//! device; a byte any RESYNC_DATA record covers is flagged `resync` (the writer lost track of
//! what changed there and rewrote the whole region, so it may not have changed at all).
//! Going from the image at `from` to the image at `to` changes bytes inside these extents
//! only; the extents can be larger than the bytes that differ (a write of the same bytes, a
//! range written and written back).
//!
//! Points are resolved against the journal's live range (from its trim pointer to its end,
//! or to a hole: see `journal::head`), not a replica's window: a diff needs no replica. A
//! point outside it, past a hole, or inside a resync span the interval shows (a state the
//! primary never had) is refused with an error naming the range.
//!
//! Cost: one index read per segment from the one holding `from + 1` to the one holding
//! `to` ([`READ_AHEAD`] in flight, so at most `READ_AHEAD - 1` read past it), plus a binary
//! search (O(log n) index reads) to find the first, plus O(log n) HEADs to find the
//! journal's end. Memory: one range per record until merged, merged every
//! [`MERGE_EVERY`] ranges.
//!
//! Must never: read a payload; read a segment outside the interval except to find it; take a
//! missing segment for the end of the interval (below the journal's known end it is a hole);
//! report an extent that overlaps another of the same device.

use std::collections::VecDeque;
use std::ops::Range;

use serde::Serialize;

use crate::clock::format_ns;
use crate::journal::chain::Lineage;
use crate::journal::consumer::load_trim_pointer;
use crate::journal::head;
use crate::journal::mark;
use crate::journal::reader::JournalReader;
use crate::journal::record::RecordKind;
use crate::journal::segment::{SegmentError, SegmentIndex};
use crate::journal::{JournalError, JournalResult};

use super::error::{TimeTravelError, TimeTravelResult};
use super::sources::{journal_segment_missing, Point, Spans, Target};

/// Index reads in flight during a walk.
pub const READ_AHEAD: usize = 8;

type IndexRead = tokio::task::JoinHandle<JournalResult<Option<(SegmentIndex, u64)>>>;

/// Ranges collected before they are merged (bounds memory on long intervals).
pub(crate) const MERGE_EVERY: usize = 1 << 20;

/// A byte range of one device that changed in the interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ChangedExtent {
    /// The device inside the journal's group (0 for a single device).
    pub dev: u32,
    pub offset: u64,
    pub length: u64,
    /// A resync span rewrote these bytes: they may or may not have changed.
    pub resync: bool,
}

impl ChangedExtent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The journal's live range: what a diff can span.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LiveRange {
    /// The first live seq (the trim pointer).
    pub first_seq: u64,
    /// The first live LSN: the oldest point a diff can start from is `first_lsn - 1`.
    pub first_lsn: u64,
    /// The timestamp of record `first_lsn` (0 when the journal holds no record).
    pub first_time_ns: u64,
    /// Past the last readable seq: the end, or a hole.
    pub end_seq: u64,
    /// The newest point (the last record before `end_seq`).
    pub head: Point,
    /// A hole at `end_seq` (its message): no point after `head` can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hole: Option<String>,
}

/// What [`changed_extents`] found and what it cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub from: Point,
    pub to: Point,
    /// Sorted by (dev, offset), disjoint; touching extents of the same flag are merged.
    pub extents: Vec<ChangedExtent>,
    /// The segments whose records make up the interval (first and past-the-last seq).
    pub segments: Range<u64>,
    /// Records in the interval on the lineage (of every kind).
    pub records: u64,
    /// Records that change data (WRITE, DISCARD, WRITE_ZEROES, RESYNC_DATA).
    pub data_records: u64,
    /// Segment indexes read (each one or two ranged reads of a segment's tail), the search
    /// for the first segment included; never a payload.
    pub objects_read: u64,
    /// Bytes of the interval's segments (what reading the records themselves would cost).
    pub segment_bytes: u64,
}

impl Diff {
    /// Total bytes inside the extents.
    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }
}

impl LiveRange {
    /// The live range of the journal `reader` reads: the trim pointer, then the end found by
    /// probing (O(log n) HEADs), checked against the known end (a missing seq below it is a
    /// hole: the range stops before it and says so).
    pub async fn open(reader: &JournalReader) -> TimeTravelResult<LiveRange> {
        let store = reader.store().as_ref();
        let trim = load_trim_pointer(store).await?;
        let end_seq = head::probe_end(store, reader.manifest(), trim.first_seq).await?;
        let hole = match head::check_end(store, reader.manifest(), end_seq).await {
            Ok(()) => None,
            Err(e @ JournalError::Hole { .. }) => Some(e.to_string()),
            Err(e) => return Err(e.into()),
        };
        // The head: the last record before the end (plugs and empty segments hold none).
        let mut head = Point {
            lsn: trim.first_lsn.saturating_sub(1),
            timestamp_ns: 0,
        };
        for seq in (trim.first_seq..end_seq).rev() {
            if let Some(e) = reader
                .index(seq)
                .await?
                .and_then(|i| i.entries.last().cloned())
            {
                head = Point {
                    lsn: e.lsn,
                    timestamp_ns: e.timestamp_ns,
                };
                break;
            }
        }
        let mut first_time_ns = 0;
        let mut seq = trim.first_seq;
        while seq < end_seq {
            let Some(index) = reader.index(seq).await? else {
                break;
            };
            if let Some(e) = index.entries.iter().find(|e| e.lsn >= trim.first_lsn) {
                first_time_ns = e.timestamp_ns;
                break;
            }
            seq = index.header.next_seq;
        }
        Ok(LiveRange {
            first_seq: trim.first_seq,
            first_lsn: trim.first_lsn,
            first_time_ns,
            end_seq,
            head,
            hole,
        })
    }

    /// The oldest point a diff can start from.
    pub fn start(&self) -> Point {
        Point {
            lsn: self.first_lsn.saturating_sub(1),
            timestamp_ns: self.first_time_ns,
        }
    }

    fn outside(&self, what: &'static str, point: String) -> TimeTravelError {
        TimeTravelError::OutsideJournal {
            what,
            point,
            range: format!(
                "LSN {}..={} ({} .. {}){}",
                self.first_lsn,
                self.head.lsn,
                format_ns(self.first_time_ns),
                format_ns(self.head.timestamp_ns),
                self.hole
                    .as_ref()
                    .map_or(String::new(), |h| format!("; the journal stops early: {h}"))
            ),
        }
    }

    /// The point `target` names (`what` is the flag, for messages): a mark's LSN, or the last
    /// record at or before a time (binary search over segment indexes), moved onto `lineage`
    /// as `restore` does; refused outside the live range. `now_ns` bounds times.
    pub async fn resolve(
        &self,
        reader: &JournalReader,
        lineage: &Lineage,
        what: &'static str,
        target: &Target,
        now_ns: u64,
    ) -> TimeTravelResult<Point> {
        let point = match target {
            Target::Mark(name) => {
                let m = mark::load(reader.store().as_ref(), name).await?;
                let point = Point {
                    lsn: m.lsn,
                    timestamp_ns: m.timestamp_ns,
                };
                if m.lsn < self.start().lsn || m.lsn > self.head.lsn {
                    return Err(self.outside(what, format!("mark {name} ({})", point.describe())));
                }
                if !lineage.contains(m.lsn) {
                    return Err(TimeTravelError::MarkOffChain {
                        name: name.clone(),
                        lsn: m.lsn,
                    });
                }
                return Ok(point);
            }
            &Target::Time(t) => {
                if t < self.first_time_ns || (t > self.head.timestamp_ns && self.hole.is_some()) {
                    return Err(self.outside(what, format_ns(t)));
                }
                if t > now_ns.max(self.head.timestamp_ns) {
                    return Err(TimeTravelError::InFuture {
                        time: format_ns(t),
                        head: format_ns(self.head.timestamp_ns),
                        head_lsn: self.head.lsn,
                    });
                }
                if t >= self.head.timestamp_ns {
                    self.head
                } else {
                    self.time_to_point(reader, t).await?
                }
            }
            Target::Branch(name) => {
                return Err(self.outside(what, format!("branch {name} (not supported by diff)")))
            }
        };
        Ok(match lineage.last_at_or_below(point.lsn) {
            Some(lsn) if lsn != point.lsn => Point { lsn, ..point },
            _ => point,
        })
    }

    /// The last record at or before `t` (`first_time_ns <= t < head`).
    async fn time_to_point(&self, reader: &JournalReader, t: u64) -> TimeTravelResult<Point> {
        let seq = reader
            .seek_time(self.first_seq, self.end_seq, t.saturating_add(1))
            .await?;
        let index = match reader.index(seq).await? {
            Some(i) if seq < self.end_seq => i,
            _ => return Ok(self.head),
        };
        let mut previous: Option<Point> = None;
        for e in &index.entries {
            if e.timestamp_ns > t {
                if let Some(p) = previous {
                    return Ok(p);
                }
                for s in (self.first_seq..seq).rev() {
                    if let Some(last) = reader
                        .index(s)
                        .await?
                        .and_then(|i| i.entries.last().cloned())
                    {
                        return Ok(Point {
                            lsn: last.lsn,
                            timestamp_ns: last.timestamp_ns,
                        });
                    }
                }
                return Ok(self.start());
            }
            previous = Some(Point {
                lsn: e.lsn,
                timestamp_ns: e.timestamp_ns,
            });
        }
        Ok(previous.unwrap_or(self.head))
    }
}

/// Merges ranges `(dev, start, end, resync)` into sorted, disjoint extents: a byte covered by
/// any resync range is resync; touching extents of the same device and flag become one.
pub(crate) fn merge_ranges(ranges: &mut Vec<(u32, u64, u64, bool)>) -> Vec<ChangedExtent> {
    let mut out: Vec<ChangedExtent> = Vec::new();
    for resync in [true, false] {
        // Resync ranges first (they win), then the rest minus them.
        let mut these: Vec<(u32, u64, u64)> = ranges
            .iter()
            .filter(|r| r.3 == resync && r.2 > r.1)
            .map(|r| (r.0, r.1, r.2))
            .collect();
        these.sort_unstable();
        let mut merged: Vec<(u32, u64, u64)> = Vec::new();
        for (dev, s, e) in these {
            match merged.last_mut() {
                Some(last) if last.0 == dev && s <= last.2 => last.2 = last.2.max(e),
                _ => merged.push((dev, s, e)),
            }
        }
        if resync {
            out.extend(merged.into_iter().map(|(dev, s, e)| ChangedExtent {
                dev,
                offset: s,
                length: e - s,
                resync: true,
            }));
            continue;
        }
        // Subtract the resync extents (sorted) from the merged plain ones.
        let resyncs = out.clone();
        let mut i = 0;
        for (dev, s, e) in merged {
            let mut at = s;
            while i < resyncs.len() && (resyncs[i].dev, resyncs[i].end()) <= (dev, at) {
                i += 1;
            }
            let mut j = i;
            while at < e {
                match resyncs.get(j).filter(|r| r.dev == dev && r.offset < e) {
                    Some(r) => {
                        if r.offset > at {
                            out.push(ChangedExtent {
                                dev,
                                offset: at,
                                length: r.offset - at,
                                resync: false,
                            });
                        }
                        at = at.max(r.end());
                        j += 1;
                    }
                    None => {
                        out.push(ChangedExtent {
                            dev,
                            offset: at,
                            length: e - at,
                            resync: false,
                        });
                        at = e;
                    }
                }
            }
        }
    }
    out.sort_unstable_by_key(|e| (e.dev, e.offset));
    ranges.clear();
    out
}

/// The extents changed between `from` and `to` (either order: the bytes that differ between
/// two states are the same both ways), from the indexes of the segments in between, reading
/// only records on `lineage`. `live` bounds the segments read (see [`LiveRange::open`]); the
/// points come from [`LiveRange::resolve`] (or any two LSNs inside `live`).
pub async fn changed_extents(
    reader: &JournalReader,
    lineage: &Lineage,
    live: &LiveRange,
    from: Point,
    to: Point,
) -> TimeTravelResult<Diff> {
    let (lo, hi) = if from.lsn <= to.lsn {
        (from, to)
    } else {
        (to, from)
    };
    for (what, p) in [("--from", from), ("--to", to)] {
        if p.lsn < live.start().lsn || p.lsn > live.head.lsn {
            return Err(live.outside(what, p.describe()));
        }
    }
    let mut diff = Diff {
        from,
        to,
        extents: Vec::new(),
        segments: 0..0,
        records: 0,
        data_records: 0,
        objects_read: 0,
        segment_bytes: 0,
    };
    if lo.lsn == hi.lsn {
        return Ok(diff);
    }
    let first = lo.lsn + 1;
    // The first segment whose last record is at or after `first`: a binary search over
    // indexes (missing seqs and plugs count as before), as `JournalReader::seek_lsn`, counted.
    let (mut a, mut b) = (live.first_seq, live.end_seq);
    while a < b {
        let mid = a + (b - a) / 2;
        diff.objects_read += 1;
        let after = match reader.index(mid).await? {
            Some(i) => i.entries.last().is_some_and(|e| e.lsn >= first),
            None => false,
        };
        if after {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    let found = if a < live.end_seq {
        diff.objects_read += 1;
        reader.index_guessing(a, 0).await?
    } else {
        None
    };
    let Some((mut index, mut tail)) = found else {
        return Err(journal_segment_missing(reader, a, first).await);
    };
    // The search counts a missing seq as "before": a hole can make it land past the segment
    // holding `first`, which then is (or is behind) the seq before.
    if index.header.first_lsn > first && a > live.first_seq {
        return Err(journal_segment_missing(reader, a - 1, first).await);
    }
    diff.segments = a..a;
    let mut ranges: Vec<(u32, u64, u64, bool)> = Vec::new();
    let mut spans = Spans::default();
    // Index reads in flight for the consecutive seqs after the one being taken: a store's
    // latency, not its bandwidth, bounds a walk of small reads. Every read started is waited
    // for and counted (at most READ_AHEAD - 1 past the interval's last segment are wasted).
    let mut ahead: VecDeque<(u64, IndexRead)> = VecDeque::new();
    let mut result: TimeTravelResult<()> = Ok(());
    loop {
        diff.segment_bytes += index.object_size;
        diff.segments.end = index.header.next_seq;
        let done = take_records(
            &index,
            lineage,
            first,
            hi.lsn,
            &mut diff,
            &mut ranges,
            &mut spans,
        );
        if ranges.len() >= MERGE_EVERY {
            let merged = merge_ranges(&mut ranges);
            ranges = merged
                .into_iter()
                .map(|e| (e.dev, e.offset, e.end(), e.resync))
                .collect();
        }
        if done {
            break;
        }
        let next = index.header.next_seq;
        let expect = index.header.end_lsn();
        if next >= live.end_seq {
            result = Err(journal_segment_missing(reader, next, expect).await);
            break;
        }
        // A plug jumps: what was read ahead of it is not the chain.
        while ahead.front().is_some_and(|(seq, _)| *seq != next) {
            let (_, read) = ahead.pop_front().expect("checked");
            let _ = read.await;
        }
        // Segments of one journal have indexes of similar size: read the last one's size
        // (and a quarter more) at once, so each segment costs one read, not two.
        let guess = tail + tail / 4;
        let mut seq = ahead.back().map_or(next, |(s, _)| s + 1);
        while ahead.len() < READ_AHEAD && seq < live.end_seq {
            let r = reader.clone();
            ahead.push_back((
                seq,
                tokio::spawn(async move { r.index_guessing(seq, guess).await }),
            ));
            diff.objects_read += 1;
            seq += 1;
        }
        let (_, read) = ahead.pop_front().expect("next < end_seq: one was started");
        let read = read.await.map_err(|e| TimeTravelError::Task {
            what: "index read",
            message: e.to_string(),
        });
        (index, tail) = match read {
            Ok(Ok(Some(i))) => i,
            Ok(Ok(None)) => {
                result = Err(journal_segment_missing(reader, next, expect).await);
                break;
            }
            Ok(Err(e)) => {
                result = Err(e.into());
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        if index.header.first_lsn != expect {
            result = Err(JournalError::from(SegmentError::WrongFirstLsn {
                key: reader.manifest().segment_key(next),
                expected: expect,
                found: index.header.first_lsn,
            })
            .into());
            break;
        }
    }
    for (_, read) in ahead {
        let _ = read.await;
    }
    result?;
    // A point inside a resync span is a state the primary never had: refuse what the
    // interval shows (a span opened and not closed by `to`, or closed without its begin after
    // `from`).
    if let Some(open) = spans.open() {
        return Err(open.refuse(&hi));
    }
    if let Some(h) = spans.holes.iter().find(|h| h.begin_lsn == 0) {
        return Err(h.refuse(&lo));
    }
    diff.extents = merge_ranges(&mut ranges);
    Ok(diff)
}

/// Adds the records of `index` in `first..=last` on `lineage`; true once `last` was seen.
fn take_records(
    index: &SegmentIndex,
    lineage: &Lineage,
    first: u64,
    last: u64,
    diff: &mut Diff,
    ranges: &mut Vec<(u32, u64, u64, bool)>,
    spans: &mut Spans,
) -> bool {
    for e in &index.entries {
        if e.lsn < first {
            continue;
        }
        if e.lsn > last {
            return true;
        }
        if lineage.contains(e.lsn) {
            diff.records += 1;
            spans.feed(e.lsn, e.timestamp_ns, e.kind);
            let resync = match e.kind {
                RecordKind::Write | RecordKind::Discard | RecordKind::WriteZeroes => Some(false),
                RecordKind::ResyncData => Some(true),
                _ => None,
            };
            if let Some(resync) = resync {
                diff.data_records += 1;
                ranges.push((e.dev, e.offset, e.offset.saturating_add(e.length), resync));
            }
        }
        if e.lsn == last {
            return true;
        }
    }
    false
}

/// [`LiveRange::open`], both points resolved, then [`changed_extents`]: what `tinylag diff`
/// and `mount --changes-since` run.
pub async fn diff_between(
    reader: &JournalReader,
    lineage: &Lineage,
    from: &Target,
    to: &Target,
    now_ns: u64,
) -> TimeTravelResult<Diff> {
    let live = LiveRange::open(reader).await?;
    let from = live
        .resolve(reader, lineage, "--from", from, now_ns)
        .await?;
    let to = live.resolve(reader, lineage, "--to", to, now_ns).await?;
    changed_extents(reader, lineage, &live, from, to).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(dev: u32, offset: u64, length: u64, resync: bool) -> ChangedExtent {
        ChangedExtent {
            dev,
            offset,
            length,
            resync,
        }
    }

    #[test]
    fn ranges_merge_into_sorted_disjoint_extents_resync_winning() {
        let mut r = vec![
            (0, 100, 200, false),
            (0, 0, 10, false),
            (0, 10, 20, false),
            (0, 150, 160, true),
            (0, 190, 250, true),
            (1, 0, 10, false),
            (0, 300, 300, false),
            (0, 500, 600, false),
            (0, 400, 700, true),
        ];
        let got = merge_ranges(&mut r);
        assert_eq!(
            got,
            vec![
                ext(0, 0, 20, false),
                ext(0, 100, 50, false),
                ext(0, 150, 10, true),
                ext(0, 160, 30, false),
                ext(0, 190, 60, true),
                ext(0, 400, 300, true),
                ext(1, 0, 10, false),
            ]
        );
        assert!(r.is_empty());
    }

    #[test]
    fn merging_matches_a_byte_map() {
        // Random ranges against a per-byte oracle.
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let mut bytes = [[0u8; 256]; 2];
            let mut r = Vec::new();
            for _ in 0..(next() % 12) {
                let dev = (next() % 2) as u32;
                let s = next() % 256;
                let e = (s + next() % 40).min(256);
                let resync = next() % 4 == 0;
                for b in &mut bytes[dev as usize][s as usize..e as usize] {
                    *b = (*b).max(if resync { 2 } else { 1 });
                }
                r.push((dev, s, e, resync));
            }
            let got = merge_ranges(&mut r);
            let mut seen = [[0u8; 256]; 2];
            for w in got.windows(2) {
                assert!((w[0].dev, w[0].end()) <= (w[1].dev, w[1].offset), "{got:?}");
                if w[0].dev == w[1].dev && w[0].end() == w[1].offset {
                    assert_ne!(w[0].resync, w[1].resync, "touching extents merged: {got:?}");
                }
            }
            for e in &got {
                for b in &mut seen[e.dev as usize][e.offset as usize..e.end() as usize] {
                    *b = if e.resync { 2 } else { 1 };
                }
            }
            assert_eq!(seen, bytes);
        }
    }
}
