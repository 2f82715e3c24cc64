//! `restore`: writes the disk as of one point into a new file: a sparse copy of the replica,
//! then wound back through the undo log (newest first) or forward through the journal.
//!
//! # A consistent result while `replay` runs
//! The agent writes every undo segment durably *before* it touches the replica, and undo
//! records of one log come in LSN order. So: (1) the plan is made from the consumer position
//! and undo end read at start; (2) the replica is copied (it may change meanwhile); (3) the
//! undo end is read again, and every undo record after the threshold (the target going back;
//! the consistent point going forward) in segments up to that new end is written back,
//! newest first. Every byte the agent changed during the copy has its pre-image in one of
//! those segments, and the oldest pre-image of a byte after the threshold is that byte at
//! the threshold; bytes no such record touches were not changed since. Going forward, the
//! journal's records after the consistent point are then applied up to the target.
//!
//! # Another lineage
//! When the image's lineage (`--branch`, or the current chain for a replica whose agent has
//! not yet followed a fork) parts from the replica's below the point, the replica is undone
//! back to the last LSN they share and the journal's records of the image's lineage are
//! applied from there; records off the lineage are read, never applied.
//!
//! A group's set is written into a directory, one image per device, each with a seed stamp
//! of the same point beside it (or none beside any).
//!
//! Must never: write to the replica, the undo log or the journal; leave a partial output
//! behind on failure; hold more than a few segments in memory.

use std::collections::VecDeque;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::task::JoinHandle;

use crate::journal::head::probe_end;
use crate::journal::layout::DeviceLayout;
use crate::journal::reader::{Cursor, ReadAhead, Step};
use crate::journal::record::{Record, RecordKind};
use crate::replayer::apply::{apply_op, check_journal_record, check_record, sync};
use crate::replayer::group_replica::GroupReplica;
use crate::replayer::replica::{ReplicaFile, ReplicaTarget};
use crate::replayer::seed::{stamp_path, SeedStamp};
use crate::replayer::undo::{UndoError, UndoLog};

use super::copy::copy_sparse;
use super::error::{TimeTravelError, TimeTravelResult};
use super::sources::{journal_segment_missing, Hole, Point, Sources, Spans, Window};

/// Undo segments read ahead of the one being written back.
const UNDO_READ_AHEAD: usize = 4;
/// Journal segments read ahead going forward.
const JOURNAL_READ_AHEAD: usize = 8;

/// Which way from the replica's consistent point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Back through the undo log.
    Backward,
    /// Forward through the journal (a delayed replica), after undoing what the agent applied
    /// past its consistent point.
    Forward,
}

/// What a restore will read and do (`--dry-run` prints it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub point: Point,
    pub direction: Direction,
    /// The replica's consistent point when planned.
    pub base: Point,
    /// Undo segments written back, newest first (more may join: those the agent writes
    /// during the copy).
    pub undo_segments: Range<u64>,
    pub undo_bytes: u64,
    /// Undo records written back.
    pub undo_records: u64,
    /// Journal segments read going forward (first and past-the-last seq).
    pub journal_segments: Range<u64>,
    pub journal_bytes: u64,
    /// Journal records applied.
    pub journal_records: u64,
    /// Records past this LSN in the undo segments are written back.
    #[serde(skip)]
    pub(crate) undo_after: u64,
    /// Where the journal's records are read from going forward (the segment holding the
    /// first LSN applied, and that LSN).
    #[serde(skip)]
    pub(crate) journal_from: Cursor,
}

/// The stages [`restore`] reports progress in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Copying the replica (bytes of the device covered).
    Copy,
    /// Writing back undo segments (segments done).
    Undo,
    /// Applying journal segments (segments done).
    Journal,
}

/// Progress callbacks: `(stage, done, total)`.
pub type Progress<'a> = &'a (dyn Fn(Stage, u64, u64) + Sync);

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub point: Point,
    pub direction: Direction,
    pub output: PathBuf,
    /// Data bytes copied from the replica.
    pub copied_bytes: u64,
    pub undo_segments: u64,
    pub undo_records: u64,
    pub journal_segments: u64,
    pub journal_records: u64,
    /// The seed stamp left beside the output (`replay` adopts the image with it), if any; a
    /// group's: the first image's (one is beside every image, or none is).
    pub seed_stamp: Option<PathBuf>,
}

/// The first undo seq in `range` whose last record is after `lsn` (binary search on
/// indexes; missing seqs count as before).
pub(crate) async fn first_undo_after(
    log: &UndoLog,
    range: Range<u64>,
    lsn: u64,
) -> TimeTravelResult<u64> {
    let (mut lo, mut hi) = (range.start, range.end);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let after = log
            .index(mid)
            .await?
            .and_then(|i| i.entries.last().map(|e| e.lsn))
            .is_some_and(|l| l > lsn);
        if after {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// Plans a restore to `point` (inside `window`): which way, what to read; refuses a point
/// inside a resync span.
pub async fn plan(sources: &Sources, window: &Window, point: Point) -> TimeTravelResult<Plan> {
    let base = sources.consistent();
    let mut plan = Plan {
        point,
        direction: Direction::Forward,
        base,
        undo_segments: 0..0,
        undo_bytes: 0,
        undo_records: 0,
        journal_segments: 0..0,
        journal_bytes: 0,
        journal_records: 0,
        undo_after: base.lsn,
        journal_from: Cursor {
            seq: sources.consumer.consistent_seq,
            next_lsn: base.lsn + 1,
        },
    };
    if let Some(common) = sources.rebase(point.lsn.min(base.lsn)) {
        return plan_rebased(sources, window, plan, common).await;
    }
    if point.lsn < base.lsn {
        plan.direction = Direction::Backward;
        plan.undo_after = point.lsn;
        let Some(log) = sources
            .undo
            .as_ref()
            .filter(|_| point.lsn >= window.start.lsn)
        else {
            return Err(TimeTravelError::NoUndoLog {
                undo: sources.undo_location.clone(),
                lsn: point.lsn,
                consistent_lsn: base.lsn,
            });
        };
        let first = first_undo_after(log, sources.undo_first..sources.undo_end, point.lsn).await?;
        plan.undo_segments = first..sources.undo_end;
        // The first resync marker after the point says whether it is inside a span.
        let mut marker: Option<(RecordKind, Point)> = None;
        for seq in plan.undo_segments.clone() {
            let index = sources.undo_index(seq).await?;
            plan.undo_bytes += index.object_size;
            for e in index.entries.iter().filter(|e| e.lsn > point.lsn) {
                plan.undo_records += 1;
                if marker.is_none()
                    && matches!(e.kind, RecordKind::ResyncBegin | RecordKind::ResyncEnd)
                {
                    let at = Point {
                        lsn: e.lsn,
                        timestamp_ns: e.timestamp_ns,
                    };
                    marker = Some((e.kind, at));
                }
            }
        }
        if let Some((RecordKind::ResyncEnd, end)) = marker {
            let hole = span_before(sources, log, first, point.lsn, end).await?;
            return Err(hole.refuse(&point));
        }
        return Ok(plan);
    }
    // Forward: undo what the agent applied past its consistent point, then the journal.
    match &sources.undo {
        Some(_) => {
            let from = sources.consumer.undo.consistent_seq.max(sources.undo_first);
            plan.undo_segments = from..sources.undo_end.max(from);
            for seq in plan.undo_segments.clone() {
                if let Some(index) = sources.undo.as_ref().expect("some").index(seq).await? {
                    plan.undo_bytes += index.object_size;
                    plan.undo_records +=
                        index.entries.iter().filter(|e| e.lsn > base.lsn).count() as u64;
                }
            }
        }
        None if sources.consumer.applied_lsn != base.lsn => {
            return Err(TimeTravelError::NoUndoLog {
                undo: sources.undo_location.clone(),
                lsn: base.lsn,
                consistent_lsn: base.lsn,
            })
        }
        None => {}
    }
    let journal = sources.journal().describe();
    let missing = |lsn| TimeTravelError::JournalSegmentMissing {
        journal: journal.clone(),
        lsn,
    };
    let mut spans = Spans::default();
    let mut seq = sources.consumer.consistent_seq;
    plan.journal_segments = seq..seq;
    let mut reached = point.lsn <= base.lsn;
    // The span the point is in, read on until its end to name it.
    let mut hole: Option<Hole> = None;
    while !reached || hole.is_some() {
        if seq >= window.journal_end {
            break;
        }
        let Some(index) = sources.reader.index(seq).await? else {
            if !reached {
                let lsn = spans.last().map_or(base.lsn + 1, |p| p.lsn + 1);
                return Err(journal_segment_missing(&sources.reader, seq, lsn).await);
            }
            break;
        };
        let next = index.header.next_seq;
        if !reached {
            plan.journal_bytes += index.object_size;
            plan.journal_segments.end = next;
        }
        for e in index
            .entries
            .iter()
            .filter(|e| e.lsn > base.lsn && sources.lineage.contains(e.lsn))
        {
            spans.feed(e.lsn, e.timestamp_ns, e.kind);
            if !reached {
                plan.journal_records += 1;
                if e.lsn == point.lsn {
                    reached = true;
                    hole = spans.open();
                    if hole.is_none() {
                        break;
                    }
                }
            } else if let (Some(h), RecordKind::ResyncEnd) = (hole, e.kind) {
                let end = Point {
                    lsn: e.lsn,
                    timestamp_ns: e.timestamp_ns,
                };
                return Err(Hole {
                    end: Some(end),
                    ..h
                }
                .refuse(&point));
            }
        }
        seq = next;
    }
    if !reached {
        return Err(missing(spans.last().map_or(base.lsn + 1, |p| p.lsn + 1)));
    }
    if let Some(h) = hole {
        return Err(h.refuse(&point));
    }
    Ok(plan)
}

/// [`plan`] when the image's lineage parts from the replica's at or below the point: undo
/// back to `common`, the last LSN both hold, then the lineage's journal records up to the
/// point.
async fn plan_rebased(
    sources: &Sources,
    window: &Window,
    mut plan: Plan,
    common: u64,
) -> TimeTravelResult<Plan> {
    let point = plan.point;
    let Some(log) = sources.undo.as_ref().filter(|_| common >= window.start.lsn) else {
        return Err(TimeTravelError::NoUndoLog {
            undo: sources.undo_location.clone(),
            lsn: common,
            consistent_lsn: plan.base.lsn,
        });
    };
    plan.direction = if point.lsn > common {
        Direction::Forward
    } else {
        Direction::Backward
    };
    plan.undo_after = common;
    let first = first_undo_after(log, sources.undo_first..sources.undo_end, common).await?;
    plan.undo_segments = first..sources.undo_end;
    for seq in plan.undo_segments.clone() {
        let index = sources.undo_index(seq).await?;
        plan.undo_bytes += index.object_size;
        plan.undo_records += index.entries.iter().filter(|e| e.lsn > common).count() as u64;
    }
    plan.journal_from.next_lsn = common + 1;
    if point.lsn <= common {
        return Ok(plan);
    }
    let trim = crate::journal::consumer::load_trim_pointer(sources.journal().as_ref()).await?;
    let Some((mut seq, _)) = sources
        .reader
        .seek_lsn(trim.first_seq, window.journal_end, common + 1)
        .await?
    else {
        return Err(journal_segment_missing(&sources.reader, trim.first_seq, common + 1).await);
    };
    plan.journal_from.seq = seq;
    plan.journal_segments = seq..seq;
    loop {
        let Some(index) = sources.reader.index(seq).await? else {
            return Err(journal_segment_missing(&sources.reader, seq, common + 1).await);
        };
        plan.journal_bytes += index.object_size;
        plan.journal_segments.end = index.header.next_seq;
        plan.journal_records += index
            .entries
            .iter()
            .filter(|e| e.lsn > common && e.lsn <= point.lsn && sources.lineage.contains(e.lsn))
            .count() as u64;
        if index.entries.last().is_some_and(|e| e.lsn >= point.lsn) {
            return Ok(plan);
        }
        seq = index.header.next_seq;
    }
}

/// The span that ends at `end` and holds `lsn`: its begin found by reading undo indexes
/// backwards from `seq`.
async fn span_before(
    sources: &Sources,
    log: &UndoLog,
    seq: u64,
    lsn: u64,
    end: Point,
) -> TimeTravelResult<Hole> {
    for s in (sources.undo_first..=seq.min(sources.undo_end.saturating_sub(1))).rev() {
        let Some(index) = log.index(s).await? else {
            continue;
        };
        let mut previous: Option<Point> = None;
        let mut found = None;
        for e in index.entries.iter().filter(|e| e.lsn <= lsn) {
            if e.kind == RecordKind::ResyncBegin {
                found = Some((e.lsn, previous));
            }
            previous = Some(Point {
                lsn: e.lsn,
                timestamp_ns: e.timestamp_ns,
            });
        }
        if let Some((begin, before)) = found {
            let before = match before {
                Some(b) => Some(b),
                None if s > sources.undo_first => {
                    let prev = log.index(s - 1).await?;
                    prev.and_then(|i| {
                        i.entries.last().map(|e| Point {
                            lsn: e.lsn,
                            timestamp_ns: e.timestamp_ns,
                        })
                    })
                }
                None => None,
            };
            return Ok(Hole {
                begin_lsn: begin,
                before,
                end: Some(end),
            });
        }
    }
    Ok(Hole {
        begin_lsn: 0,
        before: None,
        end: Some(end),
    })
}

/// Removes the outputs (and a directory made for them) unless disarmed.
struct Partial {
    files: Vec<PathBuf>,
    dir: Option<PathBuf>,
    armed: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Creates the new, sized output file `path` (refused if it exists).
fn create_output(path: &Path, size: u64, partial: &mut Partial) -> TimeTravelResult<File> {
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TimeTravelError::OutputExists {
                    path: path.to_owned(),
                }
            } else {
                io_err("cannot create --output", path)(e)
            }
        })?;
    partial.files.push(path.to_owned());
    file.set_len(size)
        .map_err(io_err("cannot size --output", path))?;
    Ok(file)
}

/// The image files a restore writes, in device order: `output` itself for one device; for a
/// group, `output` is a directory (made if absent, refused unless empty) holding
/// `<device>.img` for each device.
fn output_files(
    layout: &DeviceLayout,
    output: &Path,
    partial: &mut Partial,
) -> TimeTravelResult<Vec<PathBuf>> {
    if layout.is_single() {
        return Ok(vec![output.to_owned()]);
    }
    match std::fs::read_dir(output) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(TimeTravelError::Output {
                    reason: format!(
                        "--output-dir {} is not empty: a group's restore writes one image per \
                         device into an empty (or new) directory",
                        output.display()
                    ),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(output).map_err(io_err("cannot create --output-dir", output))?;
            partial.dir = Some(output.to_owned());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(TimeTravelError::Output {
                reason: format!(
                    "{} is a file: a group of {} devices is restored into a directory \
                     (--output-dir DIR), one image per device",
                    output.display(),
                    layout.count()
                ),
            })
        }
        Err(e) => return Err(io_err("cannot read --output-dir", output)(e)),
    }
    Ok(layout
        .devices()
        .iter()
        .map(|d| output.join(format!("{}.img", d.name)))
        .collect())
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TimeTravelError {
    let path = path.to_owned();
    move |source| TimeTravelError::Io { what, path, source }
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> TimeTravelResult<T> + Send + 'static,
) -> TimeTravelResult<T> {
    crate::sync::blocking(f, |e| TimeTravelError::Task {
        what,
        message: e.to_string(),
    })
    .await
}

/// Carries out `plan`: writes the image as of `plan.point` into the new file `output`.
pub async fn restore(
    sources: &Sources,
    plan: &Plan,
    output: &Path,
    progress: Progress<'_>,
) -> TimeTravelResult<Report> {
    let size = sources.size;
    let layout = sources.reader.manifest().layout();
    let mut partial = Partial {
        files: Vec::new(),
        dir: None,
        armed: true,
    };
    let outputs = output_files(&layout, output, &mut partial)?;
    let mut copies = Vec::new();
    for ((out, member), placed) in outputs.iter().zip(&sources.members).zip(layout.devices()) {
        let file = create_output(out, placed.size, &mut partial)?;
        // Copy: read-only, no lock (the agent holds it), so `replay` keeps running.
        let replica = File::open(member).map_err(io_err("cannot open --replica", member))?;
        copies.push((replica, member.clone(), file, placed.size, placed.base));
    }
    let covered = Arc::new(AtomicU64::new(0));
    let copy = {
        let covered = covered.clone();
        tokio::task::spawn_blocking(move || {
            let mut copied = 0;
            for (replica, path, file, size, base) in copies {
                copied += copy_sparse(&replica, &file, size, &mut |p| {
                    covered.store(base + p, Ordering::Relaxed)
                })
                .map_err(io_err("cannot copy replica", &path))?;
            }
            Ok::<u64, TimeTravelError>(copied)
        })
    };
    tokio::pin!(copy);
    let copied = loop {
        tokio::select! {
            done = &mut copy => break done.map_err(|e| TimeTravelError::Task {
                what: "copy",
                message: e.to_string(),
            })??,
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                progress(Stage::Copy, covered.load(Ordering::Relaxed), size);
            }
        }
    };
    progress(Stage::Copy, size, size);
    let target: Arc<dyn ReplicaTarget> = if layout.is_single() {
        Arc::new(ReplicaFile::open(output, size)?)
    } else {
        let mut members: Vec<Arc<dyn ReplicaTarget>> = Vec::new();
        for (out, placed) in outputs.iter().zip(layout.devices()) {
            members.push(Arc::new(ReplicaFile::open(out, placed.size)?));
        }
        Arc::new(GroupReplica::new(layout.clone(), members))
    };
    let mut report = Report {
        point: plan.point,
        direction: plan.direction,
        output: output.to_owned(),
        copied_bytes: copied,
        undo_segments: 0,
        undo_records: 0,
        journal_segments: 0,
        journal_records: 0,
        seed_stamp: None,
    };
    match &sources.undo {
        Some(log) => {
            // Everything the agent wrote during the copy has its undo segment by now, in
            // the run (strays past it are parts of a batch that has not been applied).
            let end = log
                .end_from(plan.undo_segments.end.max(plan.undo_segments.start))
                .await?;
            let segments = plan.undo_segments.start..end;
            write_back(
                sources,
                log,
                segments,
                plan.undo_after,
                &target,
                progress,
                &mut report,
            )
            .await?;
        }
        None => {
            let now =
                crate::journal::consumer::load(sources.journal().as_ref(), &sources.consumer.name)
                    .await?;
            if now.applied_lsn != sources.consumer.applied_lsn {
                return Err(TimeTravelError::ReplicaMoved {
                    replica: sources.replica.display().to_string(),
                });
            }
        }
    }
    if plan.direction == Direction::Forward && plan.point.lsn >= plan.journal_from.next_lsn {
        forward(sources, plan, &target, progress, &mut report).await?;
    }
    let t = target.clone();
    blocking("fsync", move || Ok(sync(t.as_ref())?)).await?;
    drop(target);
    if layout.is_single() {
        report.seed_stamp = leave_seed_stamp(sources, plan.point, output).await?;
    } else {
        // A set is vouched for by a stamp beside every image, all of the same state (`replay`
        // adopts the set only then); none is left when any cannot be.
        let mut stamps = Vec::new();
        for out in &outputs {
            match leave_seed_stamp(sources, plan.point, out).await? {
                Some(stamp) => stamps.push(stamp),
                None => break,
            }
        }
        if stamps.len() == outputs.len() {
            report.seed_stamp = stamps.into_iter().next();
        } else {
            for out in &outputs {
                SeedStamp::remove(out);
            }
        }
    }
    partial.armed = false;
    Ok(report)
}

/// Writes the seed stamp beside the finished `output` (see [`crate::replayer::seed`]), so
/// `replay` may adopt it as a new consumer's replica starting at `point`. None when the
/// replica restored from is itself not vouched for (a `--check-seed` not finished): its
/// images prove nothing.
async fn leave_seed_stamp(
    sources: &Sources,
    point: Point,
    output: &Path,
) -> TimeTravelResult<Option<PathBuf>> {
    if let Some(branch) = &sources.branch {
        // The image is off the chain: no consumer of it could start there.
        tracing::info!(
            "no seed stamp: the image is the end of branch {}",
            branch.name
        );
        return Ok(None);
    }
    if !sources.consumer.seed.vouched() {
        tracing::warn!(
            replica = %sources.replica.display(),
            "no seed stamp: the replica restored from is {}",
            sources.consumer.seed
        );
        return Ok(None);
    }
    let journal = sources.journal();
    let trim = crate::journal::consumer::load_trim_pointer(journal.as_ref()).await?;
    let (seq, epoch) = if point.lsn < trim.first_lsn {
        (trim.first_seq, 0)
    } else {
        let end = probe_end(journal.as_ref(), sources.reader.manifest(), trim.first_seq).await?;
        match sources
            .reader
            .seek_lsn(trim.first_seq, end, point.lsn)
            .await?
        {
            Some((seq, index)) => (seq, index.header.epoch),
            // Trimmed meanwhile: the image is right, but no consumer could start there.
            None => return Ok(None),
        }
    };
    let stamp = SeedStamp::for_image(
        output,
        sources.reader.manifest().uuid,
        point.lsn,
        point.timestamp_ns,
        seq,
        epoch,
    )
    .and_then(|stamp| stamp.write(output))
    .map_err(|e| TimeTravelError::Io {
        what: "cannot write the seed stamp",
        path: stamp_path(output),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Some(stamp))
}

/// Writes back, newest first, every undo record after `after` in `segments`.
async fn write_back(
    sources: &Sources,
    log: &UndoLog,
    segments: Range<u64>,
    after: u64,
    target: &Arc<dyn ReplicaTarget>,
    progress: Progress<'_>,
    report: &mut Report,
) -> TimeTravelResult<()> {
    type Read =
        JoinHandle<Result<Option<(crate::journal::segment::DecodedSegment, u64)>, UndoError>>;
    let total = segments.end - segments.start;
    // Not journal::reader::ReadAhead: undo segments are written back newest first, so this
    // reads backwards, and an undo segment has no cursor to check it against.
    let mut reads: VecDeque<(u64, Read)> = VecDeque::new();
    let mut next = segments.end;
    let mut done = 0;
    loop {
        while reads.len() < UNDO_READ_AHEAD && next > segments.start {
            next -= 1;
            let (log, seq) = (log.clone(), next);
            reads.push_back((seq, tokio::spawn(async move { log.read(seq).await })));
        }
        let Some((seq, read)) = reads.pop_front() else {
            break;
        };
        let read = read.await.map_err(|e| TimeTravelError::Task {
            what: "undo read",
            message: e.to_string(),
        })??;
        let Some((segment, _)) = read else {
            for (_, r) in reads {
                r.abort();
            }
            return Err(TimeTravelError::UndoSegmentMissing {
                undo: sources.undo_location.clone(),
                seq,
            });
        };
        let records: Vec<Record> = segment
            .records
            .into_iter()
            .rev()
            .filter(|r| r.lsn > after)
            .collect();
        report.undo_records += records.len() as u64;
        report.undo_segments += 1;
        let t = target.clone();
        let key = crate::journal::paths::undo_segment_key(seq);
        blocking("undo", move || {
            for r in &records {
                check_record(&key, r, t.size())?;
                apply_op(t.as_ref(), r.lsn, &r.op)?;
            }
            Ok(())
        })
        .await?;
        done += 1;
        progress(Stage::Undo, done, total);
    }
    Ok(())
}

/// Applies the journal's records after the consistent point, up to the plan's point.
async fn forward(
    sources: &Sources,
    plan: &Plan,
    target: &Arc<dyn ReplicaTarget>,
    progress: Progress<'_>,
    report: &mut Report,
) -> TimeTravelResult<()> {
    let reader = sources.reader.clone();
    let mut cursor = plan.journal_from;
    let mut ahead = ReadAhead::new(reader.clone(), None);
    let mut first = true;
    let total = plan.journal_segments.end - plan.journal_segments.start;
    let mut done = 0;
    // Built once: every segment's records are moved into the group's address space with it.
    let layout = Arc::new(reader.manifest().layout());
    while cursor.next_lsn <= plan.point.lsn {
        let step = if first {
            first = false;
            reader.step_resuming(&mut cursor).await?
        } else {
            ahead.step(&mut cursor, JOURNAL_READ_AHEAD).await?
        };
        let Step::Segment(segment) = step else {
            return Err(journal_segment_missing(&reader, cursor.seq, cursor.next_lsn).await);
        };
        let key = reader.manifest().segment_key(segment.header.seq);
        let records: Vec<Record> = segment
            .records
            .into_iter()
            .filter(|r| r.lsn <= plan.point.lsn && sources.lineage.contains(r.lsn))
            .collect();
        report.journal_records += records.len() as u64;
        report.journal_segments += 1;
        let t = target.clone();
        let layout = layout.clone();
        blocking("apply", move || {
            for r in records {
                let r = check_journal_record(&key, r, &layout, t.size())?;
                apply_op(t.as_ref(), r.lsn, &r.op)?;
            }
            Ok(())
        })
        .await?;
        done += 1;
        progress(Stage::Journal, done, total.max(done));
    }
    Ok(())
}
