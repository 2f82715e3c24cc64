//! What time travel reads: the journal, the replica's consumer position and its undo log;
//! the restorable window they span; and how a `--at TIME` or `--mark NAME` becomes one
//! point (an LSN) inside it.
//!
//! The window runs from the oldest undo record (the undo store's `trim` pointer names the
//! first live undo segment) to the journal's head (found by following the chain of segment
//! indexes from the consumer's position; a segment missing below the journal's known end is
//! a hole, and the window ends before it). A time becomes the last record at or before it by a binary search
//! over segment indexes (one tail read each): never a listing of the journal or the log.
//!
//! Time travel follows the epoch chain: the image is the records of a **lineage** (the
//! current chain's, or with `--branch NAME` the chain as it stood before a `promote --at`
//! left that branch, up to the branch's end). A point off that lineage is the state of the
//! last lineage record before it.
//!
//! Must never: write to any store or to the replica; accept a point outside the window, or
//! past a journal hole; apply a record off the lineage.

use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::format_ns;
use crate::journal::chain::{self, Branch, Chain, Lineage};
use crate::journal::consumer::{self, ConsumerState};
use crate::journal::head;
use crate::journal::layout::match_named_paths;
use crate::journal::mark;
use crate::journal::reader::JournalReader;
use crate::journal::record::RecordKind;
use crate::journal::segment::SegmentIndex;
use crate::journal::JournalError;
use crate::journal::Manifest;
use crate::replayer::undo::{UndoError, UndoLog};
use crate::store::ObjectStore;

use super::error::{TimeTravelError, TimeTravelResult};

/// A point in the journal's history: the state after every record up to `lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub lsn: u64,
    /// The timestamp of record `lsn` (ns since the epoch; 0 for LSN 0).
    pub timestamp_ns: u64,
}

impl Point {
    /// `LSN n (time)` for messages.
    pub fn describe(&self) -> String {
        format!("LSN {} ({})", self.lsn, format_ns(self.timestamp_ns))
    }
}

/// What to travel to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The last record at or before this time (ns since the epoch).
    Time(u64),
    /// A named point (`marks/<name>`).
    Mark(String),
    /// The end of a branch (`branches/<name>`): the state the old primary last made durable
    /// before a `promote --at` forked the chain. [`Sources::follow_branch`] first.
    Branch(String),
}

/// The journal, the replica's consumer, and its undo log, as they were when opened.
#[derive(Debug)]
pub struct Sources {
    pub reader: JournalReader,
    /// The consumer position (committed) of the replica's replay agent.
    pub consumer: ConsumerState,
    /// The undo log, if the agent keeps one and it exists.
    pub undo: Option<UndoLog>,
    /// Where the undo log was looked for (for messages).
    pub undo_location: String,
    /// The first live undo segment (the undo store's trim pointer).
    pub undo_first: u64,
    /// Past the last undo segment (strays of a cut batch included).
    pub undo_end: u64,
    /// The replica (a group: its first device's image; messages and defaults use it).
    pub replica: PathBuf,
    /// Every device's image, in device order (one for a one-device journal).
    pub members: Vec<PathBuf>,
    /// The device size (a group: its address space, see `journal::layout`).
    pub size: u64,
    /// The epoch chain when opened.
    pub chain: Chain,
    /// The records the image is made of: the current chain's lineage, or a branch's.
    pub lineage: Lineage,
    /// The branch followed (`--branch`), if any.
    pub branch: Option<Branch>,
}

/// The restorable window and where things stand.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// The oldest restorable point.
    pub start: Point,
    /// The earliest time accepted (the oldest undo record's timestamp).
    pub start_time_ns: u64,
    /// The journal's head: the newest point.
    pub head: Point,
    /// Past the last journal segment that can be read (the end, or a hole).
    pub journal_end: u64,
    /// The last record the undo log holds a pre-image of, if any.
    pub undo_last: Option<Point>,
    /// A journal hole at `journal_end` (its message): the head is the last point before it,
    /// and no point after the head can be restored.
    pub hole: Option<String>,
}

/// The error for journal segment `seq` (which must hold LSN `lsn`) found missing while
/// reading: a hole when it lies below the journal's known end (never the "trimmed? run
/// again" advice, which is wrong for a hole), else a segment trimmed or gone meanwhile.
pub(crate) async fn journal_segment_missing(
    reader: &JournalReader,
    seq: u64,
    lsn: u64,
) -> TimeTravelError {
    match head::check_end(reader.store().as_ref(), reader.manifest(), seq).await {
        Err(e @ JournalError::Hole { .. }) => e.into(),
        _ => TimeTravelError::JournalSegmentMissing {
            journal: reader.store().describe(),
            lsn,
        },
    }
}

impl Window {
    /// Refuses a point after the head when a hole stops the journal there.
    fn check_hole(&self, past_head: bool) -> TimeTravelResult<()> {
        match &self.hole {
            Some(hole) if past_head => Err(TimeTravelError::PastJournalHole {
                head_lsn: self.head.lsn,
                head: format_ns(self.head.timestamp_ns),
                hole: hole.clone(),
            }),
            _ => Ok(()),
        }
    }
}

impl Sources {
    /// Opens everything for the replica at `replica` (its consumer found by path, or by
    /// `name`), with its undo log in `undo_store` (absent: only forward travel).
    pub async fn open(
        journal: Arc<dyn ObjectStore>,
        replicas: &[(Option<String>, PathBuf)],
        name: Option<&str>,
        undo_store: Arc<dyn ObjectStore>,
    ) -> TimeTravelResult<Sources> {
        let manifest = Manifest::load(journal.as_ref()).await?;
        manifest.check_key_for_reading(&journal.describe())?;
        // Read, though nothing here needs its value yet: a journal whose trim pointer is
        // garbage is refused as every other command refuses it, before a restore or mount
        // reads segments a broken trim may be deleting.
        consumer::load_trim_pointer(journal.as_ref()).await?;
        let layout = manifest.layout();
        let size = layout.span();
        let mut absolute = Vec::new();
        for (device, path) in replicas {
            let path = std::path::absolute(path).map_err(|source| TimeTravelError::Io {
                what: "cannot resolve --replica",
                path: path.clone(),
                source,
            })?;
            absolute.push((device.clone(), path));
        }
        let devices: Vec<&str> = manifest.devices.iter().map(|d| d.name.as_str()).collect();
        let members = match_named_paths(&devices, &absolute, "--replica")
            .map_err(|reason| TimeTravelError::ReplicaMap { reason })?;
        let replica = members[0].clone();
        // As the agent registered it: the path, or a group's `name=path,…`.
        let shown = if layout.is_single() {
            replica.display().to_string()
        } else {
            layout
                .devices()
                .iter()
                .zip(&members)
                .map(|(d, p)| format!("{}={}", d.name, p.display()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let consumer = match name {
            Some(name) => consumer::load(journal.as_ref(), name).await?,
            None => {
                let mut found: Vec<ConsumerState> = consumer::list(journal.as_ref())
                    .await?
                    .into_iter()
                    .filter(|c| c.replica == shown)
                    .collect();
                match found.len() {
                    0 => {
                        return Err(TimeTravelError::NoConsumer {
                            journal: journal.describe(),
                            replica: shown,
                        })
                    }
                    1 => found.remove(0),
                    _ => {
                        return Err(TimeTravelError::AmbiguousConsumer {
                            journal: journal.describe(),
                            replica: shown,
                            names: found
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                        })
                    }
                }
            }
        };
        let undo_location = undo_store.describe();
        let undo = match UndoLog::open_existing(undo_store, manifest.uuid).await {
            Ok(log) => Some(log),
            Err(UndoError::Store { source, .. }) if source.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(log) = &undo {
            if log.manifest().consumer != consumer.name {
                return Err(UndoError::Foreign {
                    store: log.describe(),
                    field: "consumer",
                    found: log.manifest().consumer.clone(),
                    expected: consumer.name.clone(),
                }
                .into());
            }
        }
        let (undo_first, undo_end) = match &undo {
            Some(log) => {
                let first = consumer::load_trim_pointer(log.store().as_ref())
                    .await?
                    .first_seq;
                // Not the strays past the run: their batch never reached the replica.
                let end = log.end_from(first.max(consumer.undo.next_seq)).await?;
                (first, end)
            }
            None => (0, 0),
        };
        let chain = chain::load(journal.as_ref()).await?;
        Ok(Sources {
            lineage: chain.lineage(),
            chain,
            branch: None,
            reader: JournalReader::new(journal, manifest),
            consumer,
            undo,
            undo_location,
            undo_first,
            undo_end,
            replica,
            members,
            size,
        })
    }

    pub fn journal(&self) -> &Arc<dyn ObjectStore> {
        self.reader.store()
    }

    /// Reads branch `name` from here on: the image is the chain as it stood while the
    /// branch's epoch was its head, up to the branch's end.
    pub async fn follow_branch(&mut self, name: &str) -> TimeTravelResult<()> {
        let branches = chain::list_branches(self.journal().as_ref()).await?;
        let Some(branch) = branches.iter().find(|b| b.name == name).cloned() else {
            return Err(TimeTravelError::UnknownBranch {
                journal: self.journal().describe(),
                name: name.to_string(),
                known: branches
                    .iter()
                    .map(|b| b.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let epoch = self.chain.epoch_of(branch.to_lsn).unwrap_or(0);
        self.lineage = self.chain.lineage_to(epoch, branch.to_lsn);
        self.branch = Some(branch);
        Ok(())
    }

    /// The records the replica holds: the lineage its agent followed.
    pub fn replica_lineage(&self) -> Lineage {
        self.chain.lineage_to(self.consumer.chain_epoch, u64::MAX)
    }

    /// The last LSN at or below `lsn` where the replica's records and the image's lineage
    /// still agree, when they part at or below it (the image then starts from there).
    pub fn rebase(&self, lsn: u64) -> Option<u64> {
        self.replica_lineage()
            .first_difference(&self.lineage, lsn)
            .map(|d| d.saturating_sub(1))
    }

    /// `point` on the lineage: a point off it is the state of the last lineage record
    /// before it (the time stays: the state as of then).
    fn on_lineage(&self, point: Point) -> Point {
        match self.lineage.last_at_or_below(point.lsn) {
            Some(lsn) if lsn != point.lsn => Point { lsn, ..point },
            _ => point,
        }
    }

    /// The consistent point the replica's agent committed.
    pub fn consistent(&self) -> Point {
        Point {
            lsn: self.consumer.consistent_lsn,
            timestamp_ns: self.consumer.consistent_timestamp_ns,
        }
    }

    /// The index of undo segment `seq`, which must exist.
    pub async fn undo_index(&self, seq: u64) -> TimeTravelResult<SegmentIndex> {
        let missing = || TimeTravelError::UndoSegmentMissing {
            undo: self.undo_location.clone(),
            seq,
        };
        let log = self.undo.as_ref().ok_or_else(missing)?;
        log.index(seq).await?.ok_or_else(missing)
    }

    /// The restorable window, as of now.
    pub async fn window(&self) -> TimeTravelResult<Window> {
        let consistent = self.consistent();
        let (start, start_time_ns, undo_last) = if self.undo_first < self.undo_end {
            let first = self.undo_index(self.undo_first).await?;
            let entry =
                first
                    .entries
                    .first()
                    .ok_or_else(|| TimeTravelError::UndoSegmentMissing {
                        undo: self.undo_location.clone(),
                        seq: self.undo_first,
                    })?;
            let start = Point {
                lsn: entry.lsn.saturating_sub(1),
                timestamp_ns: entry.timestamp_ns,
            };
            let mut last = None;
            for seq in (self.undo_first..self.undo_end).rev() {
                if let Some(index) = self.undo.as_ref().expect("checked").index(seq).await? {
                    if let Some(e) = index.entries.last() {
                        last = Some(Point {
                            lsn: e.lsn,
                            timestamp_ns: e.timestamp_ns,
                        });
                        break;
                    }
                }
            }
            (start, entry.timestamp_ns, last)
        } else {
            (consistent, consistent.timestamp_ns, None)
        };
        let mut head = Point {
            lsn: self.consumer.applied_lsn,
            timestamp_ns: self.consumer.applied_timestamp_ns,
        };
        if let Some(u) = undo_last {
            if u.lsn > head.lsn {
                head = u;
            }
        }
        // The chain from the consumer's position, one index (tail read) per segment: its
        // end is the first missing seq, which is a hole when it lies below the journal's
        // known end (see `journal::head`). The head is the last record before it.
        let mut seq = self.consumer.next_seq;
        while let Some(index) = self.reader.index(seq).await? {
            if let Some(e) = index.entries.last() {
                if e.lsn > head.lsn {
                    head = Point {
                        lsn: e.lsn,
                        timestamp_ns: e.timestamp_ns,
                    };
                }
            }
            seq = index.header.next_seq;
        }
        let journal = self.journal();
        let hole = match head::check_end(journal.as_ref(), self.reader.manifest(), seq).await {
            Ok(()) => None,
            Err(e @ JournalError::Hole { .. }) => Some(e.to_string()),
            Err(e) => return Err(e.into()),
        };
        Ok(Window {
            start,
            start_time_ns,
            head,
            journal_end: seq,
            undo_last,
            hole,
        })
    }

    /// The point `target` names, checked against `window` (`now_ns` bounds times).
    pub async fn resolve(
        &self,
        target: &Target,
        window: &Window,
        now_ns: u64,
    ) -> TimeTravelResult<Point> {
        match target {
            Target::Branch(name) => {
                let branch = self
                    .branch
                    .as_ref()
                    .filter(|b| &b.name == name)
                    .expect("follow_branch before resolving a branch");
                let index = self.reader.index(branch.last_seq).await?;
                let timestamp_ns = index
                    .and_then(|i| {
                        i.entries
                            .iter()
                            .find(|e| e.lsn == branch.to_lsn)
                            .map(|e| e.timestamp_ns)
                    })
                    .ok_or_else(|| TimeTravelError::JournalSegmentMissing {
                        journal: self.journal().describe(),
                        lsn: branch.to_lsn,
                    })?;
                Ok(Point {
                    lsn: branch.to_lsn,
                    timestamp_ns,
                })
            }
            Target::Mark(name) => {
                let m = mark::load(self.journal().as_ref(), name).await?;
                window.check_hole(m.lsn > window.head.lsn)?;
                if m.lsn < window.start.lsn || m.lsn > window.head.lsn {
                    return Err(TimeTravelError::MarkOutsideWindow {
                        name: name.clone(),
                        lsn: m.lsn,
                        time: format_ns(m.timestamp_ns),
                        start_lsn: window.start.lsn,
                        start: format_ns(window.start_time_ns),
                        head_lsn: window.head.lsn,
                        head: format_ns(window.head.timestamp_ns),
                    });
                }
                if !self.lineage.contains(m.lsn) {
                    return Err(TimeTravelError::MarkOffChain {
                        name: name.clone(),
                        lsn: m.lsn,
                    });
                }
                Ok(Point {
                    lsn: m.lsn,
                    timestamp_ns: m.timestamp_ns,
                })
            }
            &Target::Time(t) => {
                window.check_hole(t > window.head.timestamp_ns)?;
                if t < window.start_time_ns {
                    return Err(TimeTravelError::BeforeWindow {
                        time: format_ns(t),
                        start: format_ns(window.start_time_ns),
                        start_lsn: window.start.lsn,
                    });
                }
                if t > now_ns.max(window.head.timestamp_ns) {
                    return Err(TimeTravelError::InFuture {
                        time: format_ns(t),
                        head: format_ns(window.head.timestamp_ns),
                        head_lsn: window.head.lsn,
                    });
                }
                if t >= window.head.timestamp_ns {
                    return Ok(self.on_lineage(window.head));
                }
                let point = if window.undo_last.is_some_and(|u| t < u.timestamp_ns) {
                    self.time_in_undo(t).await?
                } else {
                    self.time_in_journal(t, window).await?
                };
                Ok(self.on_lineage(point))
            }
        }
    }

    /// The last record at or before `t`, which the undo log covers (`t` is before its last
    /// record and at or after its first).
    async fn time_in_undo(&self, t: u64) -> TimeTravelResult<Point> {
        let log = self.undo.as_ref().expect("the caller checked undo_last");
        // The first undo seq whose last record is after t (missing seqs count as before).
        let (mut lo, mut hi) = (self.undo_first, self.undo_end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let after = log
                .index(mid)
                .await?
                .and_then(|i| i.last_timestamp())
                .is_some_and(|ts| ts > t);
            if after {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        let index = self.undo_index(lo).await?;
        let mut previous: Option<Point> = None;
        for e in &index.entries {
            if e.timestamp_ns > t {
                return match previous {
                    Some(p) if p.lsn == e.lsn - 1 => Ok(p),
                    _ => self.undo_point_before(lo, e.lsn).await,
                };
            }
            previous = Some(Point {
                lsn: e.lsn,
                timestamp_ns: e.timestamp_ns,
            });
        }
        unreachable!("segment {lo} has a record after {t} by the search")
    }

    /// The point `lsn - 1`, whose record is in an undo segment before `seq`.
    async fn undo_point_before(&self, seq: u64, lsn: u64) -> TimeTravelResult<Point> {
        let log = self.undo.as_ref().expect("checked by the caller");
        for s in (self.undo_first..seq).rev() {
            if let Some(i) = log.index(s).await? {
                if let Some(e) = i.entries.iter().rev().find(|e| e.lsn < lsn) {
                    return Ok(Point {
                        lsn: lsn - 1,
                        timestamp_ns: e.timestamp_ns,
                    });
                }
            }
        }
        Ok(Point {
            lsn: lsn - 1,
            timestamp_ns: 0,
        })
    }

    /// The last record at or before `t`, found in the journal from the consumer's consistent
    /// segment on (`t` is before the head).
    async fn time_in_journal(&self, t: u64, window: &Window) -> TimeTravelResult<Point> {
        let from = self.consumer.consistent_seq;
        let seq = self
            .reader
            .seek_time(from, window.journal_end, t.saturating_add(1))
            .await?;
        if seq >= window.journal_end {
            return Ok(window.head);
        }
        let index = self.reader.index(seq).await?.ok_or_else(|| {
            TimeTravelError::JournalSegmentMissing {
                journal: self.journal().describe(),
                lsn: 0,
            }
        })?;
        let mut previous: Option<Point> = None;
        for e in &index.entries {
            if e.timestamp_ns > t {
                if let Some(p) = previous {
                    return Ok(p);
                }
                // The record before is in an earlier segment (or is the consistent point).
                for s in (from..seq).rev() {
                    if let Some(i) = self.reader.index(s).await? {
                        if let Some(last) = i.entries.last() {
                            return Ok(Point {
                                lsn: last.lsn,
                                timestamp_ns: last.timestamp_ns,
                            });
                        }
                    }
                }
                return Ok(Point {
                    lsn: e.lsn - 1,
                    timestamp_ns: self.consumer.consistent_timestamp_ns,
                });
            }
            previous = Some(Point {
                lsn: e.lsn,
                timestamp_ns: e.timestamp_ns,
            });
        }
        unreachable!("segment {seq} has a record after {t} by the search")
    }
}

/// A resync span: the points `begin_lsn ..= end - 1` are states the primary never had.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Hole {
    pub begin_lsn: u64,
    /// The last valid point before the span (`begin_lsn - 1`), when it is in the window.
    pub before: Option<Point>,
    /// The `RESYNC_END` record (the first valid point after), `None` while unfinished.
    pub end: Option<Point>,
}

impl Hole {
    /// Whether `lsn` falls inside the hole (what the tests below check of the spans).
    #[cfg(test)]
    fn contains(&self, lsn: u64) -> bool {
        lsn >= self.begin_lsn && self.end.is_none_or(|e| lsn < e.lsn)
    }

    /// The error for a point inside this hole.
    pub(crate) fn refuse(&self, point: &Point) -> TimeTravelError {
        TimeTravelError::InHole {
            point: point.describe(),
            begin_lsn: self.begin_lsn,
            end: self
                .end
                .map_or("unfinished".into(), |e| format!("{}", e.lsn - 1)),
            before: self
                .before
                .map_or("none inside the window".into(), |p| p.describe()),
            after: self
                .end
                .map_or("none yet (the resync has not finished)".into(), |p| {
                    p.describe()
                }),
        }
    }
}

/// Finds resync spans in records fed in LSN order.
#[derive(Debug, Default)]
pub(crate) struct Spans {
    open: Option<Hole>,
    /// The last record fed.
    last: Option<Point>,
    /// Finished spans, in order.
    pub holes: Vec<Hole>,
}

impl Spans {
    /// Feeds one record; records at or before the last one fed are ignored.
    pub(crate) fn feed(&mut self, lsn: u64, timestamp_ns: u64, kind: RecordKind) {
        if self.last.is_some_and(|l| lsn <= l.lsn) {
            return;
        }
        let here = Point { lsn, timestamp_ns };
        match kind {
            RecordKind::ResyncBegin => {
                if let Some(open) = self.open.take() {
                    // A second begin without an end (a writer restarted mid-resync): the
                    // first span never finished; it runs into this one.
                    self.open = Some(open);
                } else {
                    self.open = Some(Hole {
                        begin_lsn: lsn,
                        before: self.last,
                        end: None,
                    });
                }
            }
            RecordKind::ResyncEnd => {
                let mut hole = self.open.take().unwrap_or(Hole {
                    // The window starts inside the span.
                    begin_lsn: 0,
                    before: None,
                    end: None,
                });
                hole.end = Some(here);
                self.holes.push(hole);
            }
            _ => {}
        }
        self.last = Some(here);
    }

    /// The span still open after the last record fed.
    pub(crate) fn open(&self) -> Option<Hole> {
        self.open
    }

    /// Every span, the open one last.
    pub(crate) fn all(&self) -> Vec<Hole> {
        let mut v = self.holes.clone();
        v.extend(self.open);
        v
    }

    /// The last record fed.
    pub(crate) fn last(&self) -> Option<Point> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_holes_with_the_valid_points_around_them() {
        let mut spans = Spans::default();
        let kinds = [
            (1, RecordKind::Write),
            (2, RecordKind::ResyncBegin),
            (3, RecordKind::ResyncData),
            (4, RecordKind::ResyncEnd),
            (5, RecordKind::Write),
            (6, RecordKind::ResyncBegin),
            (7, RecordKind::Write),
        ];
        for (lsn, kind) in kinds {
            spans.feed(lsn, lsn * 10, kind);
        }
        // Records fed again are ignored.
        spans.feed(3, 30, RecordKind::ResyncEnd);
        let holes = spans.all();
        assert_eq!(holes.len(), 2);
        let (done, open) = (holes[0], holes[1]);
        assert_eq!(done.begin_lsn, 2);
        assert_eq!(done.before.map(|p| p.lsn), Some(1));
        assert_eq!(done.end.map(|p| p.lsn), Some(4));
        assert!(!done.contains(1) && done.contains(2) && done.contains(3) && !done.contains(4));
        assert_eq!(spans.open(), Some(open));
        assert!(open.contains(6) && open.contains(100) && !open.contains(5));
        let e = open.refuse(&Point {
            lsn: 7,
            timestamp_ns: 70,
        });
        let text = e.to_string();
        assert!(
            text.contains("LSN 5") && text.contains("not finished"),
            "{text}"
        );
        // A window that starts inside a span: the end alone is known.
        let mut late = Spans::default();
        late.feed(10, 1, RecordKind::ResyncData);
        late.feed(11, 2, RecordKind::ResyncEnd);
        let h = late.all()[0];
        assert!(h.before.is_none() && h.contains(10) && !h.contains(11));
    }
}
