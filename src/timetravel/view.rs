//! `mount --at`: the disk as of one point, as a [`BlockDevice`] the NBD server serves at
//! once, without a full copy.
//!
//! At open, an [`ExtentMap`] is built from segment indexes (locations, never payloads):
//! - going back (the point is before the replica's consistent point): for every undo record
//!   after the point, its range maps to its pre-image, the *oldest* such record winning
//!   (`fill_gaps` in LSN order): that is each byte as of the point;
//! - going forward (a delayed replica): every journal record after the consistent point up
//!   to the point maps its range, the *newest* winning (`overwrite`); then every undo record
//!   the agent wrote past the consistent point fills the gaps, as above;
//! - everything else is read from the replica.
//!
//! Only records of the image's lineage are mapped (see `sources`); when it parts from the
//! replica's (`--branch`), the undo records go back to the last LSN both share and the
//! journal's lineage records from there are mapped forward.
//!
//! # A replay agent beside the mount
//! The agent writes an undo segment durably *before* it changes the replica. So after a
//! read that took bytes from the replica, the view asks whether undo segments appeared after
//! the ones it knows (one HEAD of the next predicted key), once per batch: reads that finish
//! together share one probe begun after all of them read (a probe per read made random reads
//! a third of `serve`'s); if so it adds their records to the map (filling gaps only: they are
//! newer than anything mapped) and reads again. With a local undo log whose writers publish
//! a generation (`replayer::generation`), a read first compares the generation with the one
//! read before the last successful probe: unchanged, nothing was written since that probe
//! looked, and the read needs none (DESIGN.md "A mount beside a running agent" says when the
//! file is not trusted, and the probe runs as before). Over NBD that comparison is made once
//! per batch of replies by the reply writer ([`BlockDevice::confirm_reads`]), after every read
//! in the batch completed; reads it does not confirm are read again. A byte the
//! agent changed before the read is then served from its pre-image, so what the mount shows
//! never changes. (Crash recovery of the agent deletes undo segments after rewinding the
//! replica; a mapped one that vanishes makes reads of its range fail with EIO rather than
//! return a wrong byte, unless the view holds it open already: its bytes, never rewritten,
//! are still the point's.)
//!
//! Writes: refused (`EPERM`) unless a scratch file is given; then they go to the scratch file
//! and a map of written ranges, and reads take written ranges from it (copy-on-write). The
//! scratch holds the mount's writes for its life only.
//!
//! Allocation (NBD block status): what the map says is zero (discards, write-zeroes) is a
//! hole, a payload is data, and a byte from the replica is what `SEEK_HOLE` says of the
//! replica, with the same undo-segment check as reads; a writable mount's writes are data.
//!
//! # A group
//! For a consistency group the view is of the whole set in the group's one address space
//! (`journal::layout`): journal records are placed with their device's base, undo records
//! are already in that space, and "the replica" is each device's image at its base (the
//! padding between devices reads as zeroes and is a hole). One map, one threshold and one
//! undo probe serve every device, so all of them are as of the same LSN; a frontend serves
//! each device as a [`crate::block::group::DeviceSlice`] of the view. A writable view has one
//! scratch file in the same space (a sparse file the size of the address space).
//!
//! Memory: the map (one extent per record range in the travelled span) and a payload cache
//! bounded by [`CACHE_BYTES`].
//!
//! Must never: write to the replica, the undo log or the journal; serve a byte that is not
//! the point's.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::block::allocation::{self, Allocation, Extent};
use crate::block::{check_range, BlockDevice, BlockError, DeviceInfo, ReadTicket};
use crate::journal::layout::DeviceLayout;
use crate::journal::reader::JournalReader;
use crate::journal::record::RecordKind;
use crate::journal::segment::IndexEntry;
use crate::replayer::generation::{Stamp, Watcher};
use crate::replayer::undo::{UndoLog, GENERATION_SINCE};
use crate::sys;

use super::error::{TimeTravelError, TimeTravelResult};
use crate::sync::checked;

// The view's locks guard maps of where each byte comes from; a thread that panicked while
// rewriting one may have left it half-updated, so a poisoned lock becomes an error (the
// read or write fails) rather than a panic or bytes from a broken map.
const MAP: &str = "the time view's map of the point";
const CACHE: &str = "the time view's payload cache";
const SCRATCH: &str = "the time view's map of scratch writes";
use super::extents::{ExtentMap, Layer, Location, Source};
use super::restore::{plan, Direction, Plan};
use super::sources::{journal_segment_missing, Point, Sources};

/// Decoded payloads kept for reads that hit the same record again.
pub(crate) const CACHE_BYTES: usize = 64 << 20;

/// What a mount found at open (for its banner and tests).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ViewSummary {
    pub point: Point,
    pub direction: Direction,
    pub extents: usize,
    pub undo_segments: u64,
    pub journal_segments: u64,
}

/// A bounded cache of decoded payloads, oldest out first.
#[derive(Debug, Default)]
struct Cache {
    map: HashMap<(Layer, u64, u64), Bytes>,
    order: VecDeque<(Layer, u64, u64)>,
    bytes: usize,
}

impl Cache {
    fn get(&self, key: &(Layer, u64, u64)) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: (Layer, u64, u64), value: Bytes) {
        if value.len() > CACHE_BYTES / 4 || self.map.contains_key(&key) {
            return;
        }
        self.bytes += value.len();
        self.map.insert(key, value);
        self.order.push_back(key);
        while self.bytes > CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(v) = self.map.remove(&old) {
                self.bytes -= v.len();
            }
        }
    }
}

/// The copy-on-write scratch of a writable mount.
#[derive(Debug)]
struct Scratch {
    file: File,
    path: PathBuf,
    /// Ranges written (the source is unused: `Zero` marks "in the scratch").
    written: RwLock<ExtentMap>,
}

/// One device's replica image and where it sits in the view's address space.
#[derive(Debug)]
struct Member {
    file: File,
    base: u64,
}

/// The disk (a group: the set) as of one point (see the module docs).
#[derive(Debug)]
pub struct TimeView {
    reader: JournalReader,
    undo: Option<UndoLog>,
    /// Every device's replica image, in device order (one for a one-device journal).
    replicas: Vec<Member>,
    layout: DeviceLayout,
    size: u64,
    block_size: u32,
    map: RwLock<ExtentMap>,
    /// Undo records after this LSN are pre-images of the point.
    threshold: u64,
    /// Past the last undo segment in the map.
    known_end: tokio::sync::Mutex<u64>,
    /// `known_end`, stored after the map has the segments below it: a read that resolved
    /// its pieces under an older value may hold replica bytes the map now covers.
    generation: AtomicU64,
    /// Undo probes begun (each under `known_end`, numbered before its look at the store).
    probes: AtomicU64,
    /// The number of the last probe that succeeded. A read that saw `probes` at `n` after
    /// its replica bytes, and finds this above `n` once it holds `known_end`, is covered by
    /// a probe that looked after it read, and skips its own.
    covered: AtomicU64,
    cache: Mutex<Cache>,
    /// The local undo log's generation file, when the log's writers all publish one (format
    /// version 2); `None`: every batch of replica reads probes the store.
    watch: Option<Watcher>,
    /// The stamp read just before the last successful probe began: while the file still says
    /// this, no undo segment became durable after that probe looked (DESIGN.md "A mount beside
    /// a running agent").
    trusted: Mutex<Option<Stamp>>,
    /// Open undo segments of a local undo log, by seq: a payload is one `pread`, not an
    /// open, a read and a close on the blocking pool.
    undo_files: Mutex<HashMap<u64, Arc<File>>>,
    scratch: Option<Scratch>,
    summary: ViewSummary,
}

/// Undo segment files a view keeps open (a file descriptor each).
const UNDO_FILES: usize = 256;
const TRUSTED: &str = "the time view's trusted undo generation";
const UNDO_FILES_LOCK: &str = "the time view's open undo segments";

fn io_other(e: impl std::fmt::Display) -> BlockError {
    BlockError::Io(io::Error::other(e.to_string()))
}

impl TimeView {
    /// Builds the view of `point` (refused inside a resync span, like a restore); with
    /// `scratch`, a new scratch file takes writes.
    pub async fn open(
        sources: Sources,
        point: Point,
        scratch: Option<&Path>,
    ) -> TimeTravelResult<TimeView> {
        let window = sources.window().await?;
        let plan = plan(&sources, &window, point).await?;
        let layout = sources.reader.manifest().layout();
        let mut replicas = Vec::new();
        for (path, placed) in sources.members.iter().zip(layout.devices()) {
            let file = File::open(path).map_err(|source| TimeTravelError::Io {
                what: "cannot open --replica",
                path: path.clone(),
                source,
            })?;
            replicas.push(Member {
                file,
                base: placed.base,
            });
        }
        let mut map = ExtentMap::default();
        let mut journal_segments = 0;
        if plan.direction == Direction::Forward && point.lsn >= plan.journal_from.next_lsn {
            journal_segments = map_journal(&sources, &layout, &plan, &mut map).await?;
        }
        let undo_end = plan.undo_segments.end.max(plan.undo_segments.start);
        if let Some(log) = &sources.undo {
            for seq in plan.undo_segments.clone() {
                let index = sources.undo_index(seq).await?;
                map_undo(
                    log,
                    seq,
                    &index.entries,
                    plan.undo_after,
                    sources.size,
                    &mut map,
                )?;
            }
        }
        let scratch = match scratch {
            None => None,
            Some(path) => {
                let file = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|source| {
                        if source.kind() == io::ErrorKind::AlreadyExists {
                            TimeTravelError::ScratchExists {
                                path: path.to_owned(),
                            }
                        } else {
                            TimeTravelError::Io {
                                what: "cannot create --writable",
                                path: path.to_owned(),
                                source,
                            }
                        }
                    })?;
                file.set_len(sources.size)
                    .map_err(|source| TimeTravelError::Io {
                        what: "cannot size --writable",
                        path: path.to_owned(),
                        source,
                    })?;
                Some(Scratch {
                    file,
                    path: path.to_owned(),
                    written: RwLock::new(ExtentMap::default()),
                })
            }
        };
        let summary = ViewSummary {
            point,
            direction: plan.direction,
            extents: map.len(),
            undo_segments: plan.undo_segments.end - plan.undo_segments.start,
            journal_segments,
        };
        let watch = sources.undo.as_ref().and_then(|log| {
            let dir = log.local_dir()?;
            (log.manifest().format_version >= GENERATION_SINCE)
                .then(|| Watcher::new(dir, log.manifest()))
        });
        Ok(TimeView {
            watch,
            trusted: Mutex::new(None),
            undo_files: Mutex::new(HashMap::new()),
            block_size: sources.reader.manifest().block_size,
            reader: sources.reader,
            undo: sources.undo,
            replicas,
            layout,
            size: sources.size,
            map: RwLock::new(map),
            threshold: plan.undo_after,
            known_end: tokio::sync::Mutex::new(undo_end),
            generation: AtomicU64::new(undo_end),
            probes: AtomicU64::new(0),
            covered: AtomicU64::new(0),
            cache: Mutex::new(Cache::default()),
            scratch,
            summary,
        })
    }

    pub fn summary(&self) -> &ViewSummary {
        &self.summary
    }

    /// Adds undo segments the agent wrote since the map was last extended; true if any.
    /// `seen` is [`TimeView::probes`] as read after the caller's replica reads. Reads waiting together share one probe
    /// (begun after all of them read): per batch of reads, not one store look-up per read
    /// (which made a mount's random reads a third of `serve`'s, issue 23).
    async fn refresh(&self, seen: u64) -> TimeTravelResult<bool> {
        let Some(log) = &self.undo else {
            return Ok(false);
        };
        let mut known = self.known_end.lock().await;
        if self.covered.load(Ordering::SeqCst) > seen {
            // A probe began after the caller's reads and succeeded (it ran under the lock we
            // hold now); whatever it found is in the map and in `generation` already.
            return Ok(false);
        }
        // Read before the probe looks: whatever the file announced by now, the probe finds.
        let stamp = self.watch.as_ref().and_then(Watcher::read_reopening);
        let probe = self.probes.fetch_add(1, Ordering::SeqCst) + 1;
        let end = log.end_from(*known).await?;
        if end == *known {
            self.trust(stamp)?;
            self.covered.store(probe, Ordering::SeqCst);
            return Ok(false);
        }
        for seq in *known..end {
            let Some(index) = log.index(seq).await? else {
                return Err(TimeTravelError::UndoSegmentMissing {
                    undo: log.describe(),
                    seq,
                });
            };
            let mut map = checked(self.map.write(), MAP)
                .map_err(|p| TimeTravelError::LockPoisoned { what: p.what })?;
            map_undo(
                log,
                seq,
                &index.entries,
                self.threshold,
                self.size,
                &mut map,
            )?;
        }
        *known = end;
        self.generation.store(end, Ordering::Release);
        // After the map and `generation`: a read that finds this stamp trusted also finds
        // the map it was trusted for.
        self.trust(stamp)?;
        self.covered.store(probe, Ordering::SeqCst);
        Ok(true)
    }

    fn trust(&self, stamp: Option<Stamp>) -> TimeTravelResult<()> {
        *checked(self.trusted.lock(), TRUSTED)
            .map_err(|p| TimeTravelError::LockPoisoned { what: p.what })? = stamp;
        Ok(())
    }

    /// Whether the undo log's generation still says what it said before the last successful
    /// probe began: then no undo segment became durable since, and a read that took replica
    /// bytes before this call needs no probe of its own. One `statx` and one `pread`.
    fn unchanged_since_probe(&self) -> bool {
        let Some(now) = self.watch.as_ref().and_then(Watcher::read) else {
            return false;
        };
        checked(self.trusted.lock(), TRUSTED).is_ok_and(|t| *t == Some(now))
    }

    /// An undo payload of a local log, read through a kept-open segment file.
    fn local_undo_payload(
        &self,
        log: &UndoLog,
        dir: &Path,
        loc: &Location,
    ) -> Result<Bytes, BlockError> {
        let file = {
            let mut files = checked(self.undo_files.lock(), UNDO_FILES_LOCK).map_err(io_other)?;
            match files.get(&loc.seq) {
                Some(f) => f.clone(),
                None => {
                    let path = dir.join(crate::journal::paths::undo_segment_key(loc.seq));
                    let f =
                        Arc::new(File::open(&path).map_err(|e| {
                            io_other(format!("undo segment {}: {e}", path.display()))
                        })?);
                    if files.len() >= UNDO_FILES {
                        // Any one out: reopening costs one open, and segments are immutable.
                        if let Some(&old) = files.keys().next() {
                            files.remove(&old);
                        }
                    }
                    files.insert(loc.seq, f.clone());
                    f
                }
            }
        };
        log.payload_from(&file, loc.seq, &loc.entry)
            .map_err(io_other)
    }

    async fn payload(&self, loc: &Location) -> Result<Bytes, BlockError> {
        let key = (loc.layer, loc.seq, loc.entry.body_pos);
        if let Some(p) = checked(self.cache.lock(), CACHE)
            .map_err(io_other)?
            .get(&key)
        {
            return Ok(p);
        }
        let data = match loc.layer {
            Layer::Journal => self
                .reader
                .payload(loc.seq, &loc.entry)
                .await
                .map_err(io_other)?,
            Layer::Undo => {
                let log = self.undo.as_ref().ok_or_else(|| io_other("no undo log"))?;
                match log.local_dir() {
                    Some(dir) => self.local_undo_payload(log, dir, loc)?,
                    None => log.payload(loc.seq, &loc.entry).await.map_err(io_other)?,
                }
            }
        };
        if (data.len() as u64) < loc.entry.length {
            return Err(io_other(format!(
                "record LSN {} payload is {} bytes, its index says {}",
                loc.entry.lsn,
                data.len(),
                loc.entry.length
            )));
        }
        checked(self.cache.lock(), CACHE)
            .map_err(io_other)?
            .put(key, data.clone());
        Ok(data)
    }

    /// The point's bytes of `offset..offset + len`, before the scratch's writes.
    async fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        loop {
            let Some(generation) = self.read_pieces(offset, buf).await? else {
                return Ok(());
            };
            // The agent writes an undo segment before it changes the replica: any change
            // the reads above saw is in a segment the map now has (added by this read or a
            // concurrent one), once a probe has looked after them. With the generation
            // unchanged since the last probe and the map unchanged since these reads
            // began, that probe is it.
            if self.confirm(generation) {
                return Ok(());
            }
            let seen = self.probes.load(Ordering::SeqCst);
            self.refresh(seen).await.map_err(io_other)?;
            if self.generation.load(Ordering::Acquire) == generation {
                return Ok(());
            }
        }
    }

    /// Reads `offset..offset + len` as the map says now. When a byte came from the replica,
    /// the map's generation from before the reads: the read holds the point's bytes only
    /// once [`TimeView::confirm`] of it (or a probe) says so.
    async fn read_pieces(&self, offset: u64, buf: &mut [u8]) -> Result<Option<u64>, BlockError> {
        let end = offset + buf.len() as u64;
        let generation = self.generation.load(Ordering::Acquire);
        // One source for the whole read (nearly every 4 KiB read) is found without
        // building the list of pieces.
        let (one, many) = {
            let map = checked(self.map.read(), MAP).map_err(io_other)?;
            match map.whole(offset, end) {
                Some(src) => (Some((offset, end, src)), Vec::new()),
                None => (None, map.pieces(offset, end)),
            }
        };
        let mut from_replica = false;
        for (s, e, src) in one.into_iter().chain(many) {
            let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                None => {
                    from_replica = true;
                    self.read_replica(out, s)?;
                }
                Some(Source::Zero) => out.fill(0),
                Some(Source::Payload(loc)) => {
                    let p = self.payload(&loc).await?;
                    let from = (s - loc.start) as usize;
                    out.copy_from_slice(&p[from..from + out.len()]);
                }
            }
        }
        Ok(from_replica.then_some(generation))
    }

    /// Whether replica bytes read while the map was at `generation`, before this call, are
    /// still the point's: no undo segment became durable since the last probe (the
    /// generation file is trusted and unchanged) and the map has not grown since. One
    /// `statx` and one `pread`; `false` whenever the file cannot vouch for it.
    fn confirm(&self, generation: u64) -> bool {
        self.unchanged_since_probe() && self.generation.load(Ordering::Acquire) == generation
    }

    /// Overlays what a writable mount wrote over `offset..offset + buf.len()`.
    fn overlay_scratch(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let Some(scratch) = &self.scratch else {
            return Ok(());
        };
        let pieces = checked(scratch.written.read(), SCRATCH)
            .map_err(io_other)?
            .pieces(offset, offset + buf.len() as u64);
        for (s, e, src) in pieces {
            if src.is_some() {
                let out = &mut buf[(s - offset) as usize..(e - offset) as usize];
                scratch.file.read_exact_at(out, s)?;
            }
        }
        Ok(())
    }

    /// The replica set's bytes at `offset` of the view's space: each device's image at its
    /// base, zeroes in the padding between devices.
    fn read_replica(&self, out: &mut [u8], offset: u64) -> Result<(), BlockError> {
        if let [only] = self.replicas.as_slice() {
            return Ok(only.file.read_exact_at(out, offset)?);
        }
        let end = offset + out.len() as u64;
        for piece in self.layout.pieces(offset..end) {
            let part = &mut out
                [(piece.range.start - offset) as usize..(piece.range.end - offset) as usize];
            match piece.on {
                Some((dev, local)) => self.replicas[dev as usize]
                    .file
                    .read_exact_at(part, local)?,
                None => part.fill(0),
            }
        }
        Ok(())
    }

    /// What `SEEK_HOLE` says of the replica set's `offset..offset + len` (padding is a hole).
    fn replica_extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        let block = u64::from(self.block_size);
        if let [only] = self.replicas.as_slice() {
            return Ok(allocation::seek_extents(
                &only.file, offset, len, block, max,
            )?);
        }
        let mut out: Vec<Extent> = Vec::new();
        for piece in self.layout.pieces(offset..offset + len) {
            let n = piece.range.end - piece.range.start;
            let extents = match piece.on {
                Some((dev, local)) => {
                    let member = &self.replicas[dev as usize];
                    debug_assert_eq!(member.base + local, piece.range.start);
                    allocation::seek_extents(&member.file, local, n, block, max)?
                }
                None => vec![Extent {
                    len: n,
                    allocation: Allocation::Hole,
                }],
            };
            let mut covered = 0;
            for x in extents {
                if !allocation::push(&mut out, x.len, x.allocation, max) {
                    return Ok(out);
                }
                covered += x.len;
            }
            if covered < n {
                return Ok(out);
            }
        }
        Ok(out)
    }

    fn scratch(&self) -> Result<&Scratch, BlockError> {
        self.scratch.as_ref().ok_or(BlockError::ReadOnly)
    }

    /// The point's allocation of `offset..end` as absolute `(start, end, allocation)`
    /// pieces, at most `max` of them, before the scratch's writes: zeroes in the map are
    /// holes, payloads data, and the replica's own ranges what `SEEK_HOLE` says of it.
    async fn point_allocation(
        &self,
        offset: u64,
        end: u64,
        max: usize,
    ) -> Result<Vec<(u64, u64, Allocation)>, BlockError> {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let pieces = checked(self.map.read(), MAP)
                .map_err(io_other)?
                .pieces(offset, end);
            let mut out: Vec<Extent> = Vec::new();
            let mut from_replica = false;
            for (s, e, src) in pieces {
                let room = match src {
                    Some(Source::Zero) => allocation::push(&mut out, e - s, Allocation::Hole, max),
                    Some(Source::Payload(_)) => {
                        allocation::push(&mut out, e - s, Allocation::Data, max)
                    }
                    None => {
                        from_replica = true;
                        let replica = self.replica_extents(s, e - s, max)?;
                        let mut covered = 0;
                        let mut room = true;
                        for x in replica {
                            room = allocation::push(&mut out, x.len, x.allocation, max);
                            if !room {
                                break;
                            }
                            covered += x.len;
                        }
                        room && covered == e - s
                    }
                };
                if !room {
                    break;
                }
            }
            if from_replica
                && !(self.unchanged_since_probe()
                    && self.generation.load(Ordering::Acquire) == generation)
            {
                // As for reads: a replica hole the agent made after the point is covered by
                // an undo segment written before it; with that segment mapped, ask again.
                let seen = self.probes.load(Ordering::SeqCst);
                self.refresh(seen).await.map_err(io_other)?;
                if self.generation.load(Ordering::Acquire) != generation {
                    continue;
                }
            }
            let mut at = offset;
            return Ok(out
                .into_iter()
                .map(|x| {
                    at += x.len;
                    (at - x.len, at, x.allocation)
                })
                .collect());
        }
    }
}

/// Maps the journal's records of the lineage after the plan's base up to the point (newest
/// wins), each at its device's place in `layout`.
/// Returns the segments read.
async fn map_journal(
    sources: &Sources,
    layout: &DeviceLayout,
    plan: &Plan,
    map: &mut ExtentMap,
) -> TimeTravelResult<u64> {
    let (base, point) = (plan.journal_from.next_lsn - 1, plan.point.lsn);
    let mut seq = plan.journal_from.seq;
    let mut read = 0;
    let mut last = base;
    while last < point {
        let Some(index) = sources.reader.index(seq).await? else {
            return Err(journal_segment_missing(&sources.reader, seq, last + 1).await);
        };
        read += 1;
        let key = sources.reader.manifest().segment_key(seq);
        for e in index
            .entries
            .iter()
            .filter(|e| e.lsn > base && e.lsn <= point)
        {
            last = e.lsn;
            if !sources.lineage.contains(e.lsn) {
                // Off the lineage (a branch, or the cut of one): never part of the image.
                continue;
            }
            let Some((start, end, source)) = extent_of(&key, Layer::Journal, seq, e, |e| {
                layout.to_global(e.dev, e.offset, e.length).ok()
            })?
            else {
                continue;
            };
            map.overwrite(start, end, source);
        }
        seq = index.header.next_seq;
    }
    Ok(read)
}

/// Maps the undo records after `threshold` in one undo segment (oldest wins).
fn map_undo(
    log: &UndoLog,
    seq: u64,
    entries: &[IndexEntry],
    threshold: u64,
    size: u64,
    map: &mut ExtentMap,
) -> TimeTravelResult<()> {
    let key = format!(
        "{}/{}",
        log.describe(),
        crate::journal::paths::undo_segment_key(seq)
    );
    for e in entries.iter().filter(|e| e.lsn > threshold) {
        // Undo records are pre-images in the view's space already, stored as device 0.
        let placed = |e: &IndexEntry| {
            (e.dev == 0
                && e.offset
                    .checked_add(e.length)
                    .is_some_and(|end| end <= size))
            .then_some(e.offset)
        };
        if let Some((start, end, source)) = extent_of(&key, Layer::Undo, seq, e, placed)? {
            map.fill_gaps(start, end, source);
        }
    }
    Ok(())
}

/// The range of the view's space a record changes and where its bytes come from; `None`
/// for records that change no bytes. `place` gives the record's start in the view's space,
/// or `None` when its bytes lie outside its device.
fn extent_of(
    object: &str,
    layer: Layer,
    seq: u64,
    e: &IndexEntry,
    place: impl Fn(&IndexEntry) -> Option<u64>,
) -> TimeTravelResult<Option<(u64, u64, Source)>> {
    if !matches!(
        e.kind,
        RecordKind::Write | RecordKind::ResyncData | RecordKind::Discard | RecordKind::WriteZeroes
    ) {
        return Ok(None);
    }
    match place(e) {
        Some(start) => {
            let source = match e.kind {
                RecordKind::Write | RecordKind::ResyncData => Source::Payload(Arc::new(Location {
                    layer,
                    seq,
                    entry: e.clone(),
                    start,
                })),
                _ => Source::Zero,
            };
            Ok(Some((start, start + e.length, source)))
        }
        None => Err(TimeTravelError::RecordOutside {
            object: object.to_string(),
            lsn: e.lsn,
            dev: e.dev,
            offset: e.offset,
            len: e.length,
        }),
    }
}

#[async_trait]
impl BlockDevice for TimeView {
    fn info(&self) -> DeviceInfo {
        let writable = self.scratch.is_some();
        DeviceInfo {
            size: self.size,
            block_size: self.block_size,
            read_only: !writable,
            supports_trim: writable,
            supports_write_zeroes: writable,
            flush_covers_all_connections: true,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), self.size)?;
        let mut buf = vec![0u8; len as usize];
        self.read_point(offset, &mut buf).await?;
        self.overlay_scratch(offset, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// With a generation file to vouch for it, a read that took replica bytes leaves its
    /// check to [`BlockDevice::confirm_reads`], once per batch of replies: the check
    /// (`statx` + `pread`) per read was 15% of a mount's CPU in 4 KiB random reads. Without
    /// one (an undo log in S3), every read probes as [`BlockDevice::read`] does.
    fn reads_to_confirm(&self) -> bool {
        self.watch.is_some()
    }

    async fn read_to_confirm(
        &self,
        offset: u64,
        len: u32,
    ) -> Result<(Bytes, Option<ReadTicket>), BlockError> {
        if self.watch.is_none() {
            return self.read(offset, len).await.map(|data| (data, None));
        }
        check_range(offset, u64::from(len), self.size)?;
        let mut buf = vec![0u8; len as usize];
        let ticket = self.read_pieces(offset, &mut buf).await?.map(ReadTicket);
        self.overlay_scratch(offset, &mut buf)?;
        Ok((Bytes::from(buf), ticket))
    }

    fn confirm_reads(&self, oldest: ReadTicket) -> bool {
        // The map's generation only grows: equal to the oldest ticket, it equals them all.
        self.confirm(oldest.0)
    }

    async fn allocation(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<Extent>, BlockError> {
        check_range(offset, len, self.size)?;
        let point = self
            .point_allocation(offset, offset + len, max_extents.max(1))
            .await?;
        let mut out = Vec::new();
        for (s, e, a) in point {
            // What a writable mount wrote is data, whatever the point held there.
            let pieces = match &self.scratch {
                Some(scratch) => checked(scratch.written.read(), SCRATCH)
                    .map_err(io_other)?
                    .pieces(s, e),
                None => vec![(s, e, None)],
            };
            for (ps, pe, written) in pieces {
                let a = if written.is_some() {
                    Allocation::Data
                } else {
                    a
                };
                if !allocation::push(&mut out, pe - ps, a, max_extents.max(1)) {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, self.size)?;
        let scratch = self.scratch()?;
        scratch.file.write_all_at(&data, offset)?;
        if fua {
            scratch.file.sync_data()?;
        }
        checked(scratch.written.write(), SCRATCH)
            .map_err(io_other)?
            .overwrite(offset, offset + data.len() as u64, Source::Zero);
        Ok(())
    }

    async fn flush(&self) -> Result<(), BlockError> {
        match &self.scratch {
            Some(s) => Ok(s.file.sync_data()?),
            None => Ok(()),
        }
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, self.size)?;
        let scratch = self.scratch()?;
        zero_file_range(&scratch.file, offset, len).map_err(|e| {
            BlockError::Io(io::Error::new(
                e.kind(),
                format!("scratch {}: {e}", scratch.path.display()),
            ))
        })?;
        if fua {
            scratch.file.sync_data()?;
        }
        checked(scratch.written.write(), SCRATCH)
            .map_err(io_other)?
            .overwrite(offset, offset + len, Source::Zero);
        Ok(())
    }
}

/// Makes `offset..offset + len` of `file` read as zeroes (a punched hole, or written zeroes
/// where the filesystem cannot punch).
fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // Whatever stops the punch (no support, an offset the kernel refuses), zeroes written
    // out are as good.
    if sys::punch_hole(file, offset, len).is_ok() {
        return Ok(());
    }
    let zeroes = vec![0u8; (1 << 20).min(len as usize)];
    let mut at = offset;
    while at < offset + len {
        let n = zeroes.len().min((offset + len - at) as usize);
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
