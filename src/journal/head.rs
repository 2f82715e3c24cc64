//! Finding the end of the journal without listing it: existence probes by predicted key.
//!
//! Segments exist as a contiguous run of seqs from the trim pointer on, except for holes in
//! the last `W` seqs while uploads are in flight (or after a writer died with uploads in
//! flight; a restarted writer plugs those, see [`plan_restart`]). So the end is found with
//! O(log n) HEAD requests: gallop forward, then bisect.
//!
//! # Holes: a missing segment is the end only above the known end
//! A missing seq is not always the end: an operator's mistake, a lifecycle rule or a bad copy
//! can delete a segment in the middle. So the journal records its own extent where readers
//! already look, at no extra request per segment:
//! - the writer's lease (`leases/<epoch>`, renewed every few seconds anyway) carries
//!   `durable_next_seq`: every seq below it was durable when the renewal was sent; the
//!   release at a clean stop carries the final end;
//! - every consumer's commit position: its `next_seq` was read, so every seq below it
//!   existed (as a segment or a plug).
//!
//! [`known_end`] is the highest of these. The rule every reader follows: **a seq missing
//! below the known end is a hole** ([`JournalError::Hole`], naming the seq and the range);
//! at or above it, it is the end for now (a live writer's upload in flight, or the writer's
//! own crash gap, which the next writer plugs: see [`plan_restart`]). A reader looks the
//! known end up only when it meets a missing seq it cannot otherwise explain — offline
//! commands at their one end, the tailing agent at most every few minutes of idling (one
//! GET of the lease it already knows the epoch of, no LIST) — never per segment.
//!
//! Must never: list the segment folders (that costs O(journal)), or report a head past a
//! hole as if the segments before it were all there; take a missing seq below the known end
//! for the end.

use super::consumer::{self, load_trim_pointer, TrimPointer};
use super::epoch;
use super::error::{JournalError, JournalResult};
use super::lease;
use super::manifest::Manifest;
use super::paths;
use super::segment::{read_index, Expected, SegmentIndex};
use crate::store::ObjectStore;

/// Whether segment `seq` exists.
pub(crate) async fn segment_exists(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    seq: u64,
) -> JournalResult<bool> {
    match store.head(&manifest.segment_key(seq)).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// How far the journal is known to reach, and who recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KnownEnd {
    /// Every seq below this one was durable (0: nothing known).
    pub seq: u64,
    /// Who recorded it, for the error message ("writer epoch 3's lease").
    pub from: String,
}

impl KnownEnd {
    fn raise(&mut self, seq: u64, from: impl FnOnce() -> String) {
        if seq > self.seq {
            self.seq = seq;
            self.from = from();
        }
    }
}

/// How many writer epochs [`known_end`] looks back for a lease that records an end (writers
/// refused at start claim an epoch but never write a lease).
const LEASES_LOOKED_AT: u64 = 16;

/// The journal's known end (see the module documentation): the newest writer lease that
/// records one (looking back over epochs whose writer never wrote a lease), and every
/// consumer's commit position. One LIST of the epochs, one of the consumers, a few GETs:
/// for commands that run once, not for a tailing loop (see [`known_end_from_lease`]).
pub(crate) async fn known_end(store: &dyn ObjectStore) -> JournalResult<KnownEnd> {
    let mut known = KnownEnd::default();
    if let Some(newest) = epoch::current_epoch(store).await? {
        for e in (1..=newest).rev().take(LEASES_LOOKED_AT as usize) {
            let end = known_end_from_lease(store, e).await?;
            if end > 0 {
                known.raise(end, || format!("writer epoch {e}'s lease"));
                break;
            }
        }
    }
    for c in consumer::list(store).await? {
        known.raise(c.next_seq, || {
            format!("consumer {}'s commit position", c.name)
        });
    }
    Ok(known)
}

/// What the lease of writer `epoch` records as durable (0 when it has no lease): one GET. A
/// tailing reader knows the epoch from the segments it read, so it needs no LIST.
pub(crate) async fn known_end_from_lease(
    store: &dyn ObjectStore,
    epoch: u64,
) -> JournalResult<u64> {
    if epoch == 0 {
        return Ok(0);
    }
    Ok(lease::read(store, epoch)
        .await?
        .map_or(0, |l| l.durable_next_seq))
}

/// How far [`check_missing`] looks past a hole for the next present seq.
const HOLE_SCAN: u64 = 64;

/// A reader found seq `missing` absent: `Ok` when that may be the end (at or above the known
/// end, or there after all), [`JournalError::Hole`] when it is a hole. The hole's range is
/// found by looking at the seqs after it (at most [`HOLE_SCAN`] HEADs, only once a hole is
/// certain).
///
/// `known` must have been read *after* the read that found `missing` absent; even so, a live
/// writer may have uploaded `missing` between that read and the lease renewal `known` came
/// from, so a seq below the known end is looked at once more (one HEAD) before it is called
/// a hole.
pub(crate) async fn check_missing(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    missing: u64,
    known: &KnownEnd,
) -> JournalResult<()> {
    if missing >= known.seq || segment_exists(store, manifest, missing).await? {
        return Ok(());
    }
    Err(hole(store, manifest, missing, known).await)
}

/// The [`JournalError::Hole`] for seq `missing` (its range looked up, a failure to look it
/// up leaving the range open).
pub(crate) async fn hole(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    missing: u64,
    known: &KnownEnd,
) -> JournalError {
    let mut next_present = None;
    for seq in missing + 1..known.seq.min(missing + HOLE_SCAN).max(missing + 1) {
        if segment_exists(store, manifest, seq).await.unwrap_or(false) {
            next_present = Some(seq);
            break;
        }
    }
    JournalError::Hole {
        journal: store.describe(),
        key: manifest.segment_key(missing),
        first_missing: missing,
        next_present,
        known_end: known.seq,
        known_from: known.from.clone(),
    }
}

/// The lowest seq in `from..to` that does not exist, if any, found by listing each stripe
/// from `from` on (W LISTs per 1000 W seqs, memory one bit per seq): for a starting writer,
/// which must see a hole anywhere below the end, not only the crash gaps near it. Never in a
/// steady-state loop.
pub(crate) async fn lowest_missing(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    from: u64,
    to: u64,
) -> JournalResult<Option<u64>> {
    if from >= to {
        return Ok(None);
    }
    let width = u64::from(manifest.splay_width);
    let mut present = vec![false; (to - from) as usize];
    for stripe in 0..width {
        let prefix = paths::stripe_prefix(stripe);
        // The highest seq of this stripe below `from`: list after its key.
        let mut after = (from > stripe).then(|| {
            let below = from - 1 - (from - 1 + width - stripe) % width;
            manifest.segment_key(below)
        });
        'pages: loop {
            let page = store.list(&prefix, after.as_deref(), 1000).await?;
            for meta in &page.objects {
                let Some(seq) = paths::parse_segment_key(&meta.key, manifest.splay_width) else {
                    continue;
                };
                if seq >= to {
                    break 'pages;
                }
                if seq >= from {
                    present[(seq - from) as usize] = true;
                }
            }
            match page.next_start_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    Ok(present.iter().position(|p| !p).map(|i| from + i as u64))
}

/// [`known_end`] then [`check_missing`]: for commands that meet one missing seq.
pub async fn check_end(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    missing: u64,
) -> JournalResult<()> {
    let known = known_end(store).await?;
    check_missing(store, manifest, missing, &known).await
}

/// A seq `n >= from` such that `n` does not exist and `n - 1` does (or `n == from`). When
/// existence is contiguous this is the end of the journal.
pub async fn probe_end(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    from: u64,
) -> JournalResult<u64> {
    gallop_end(from, |seq| segment_exists(store, manifest, seq)).await
}

/// The end-of-log search of the journal and of undo logs: a seq `n >= from` such that
/// `exists(n)` is false and `exists(n - 1)` true (or `n == from`), found with O(log n) calls
/// (doubling steps from `from`, then bisection). When existence is contiguous this is the
/// end of the run; callers whose runs can have gaps check the last steps themselves.
pub(crate) async fn gallop_end<E, F, Fut>(from: u64, mut exists: F) -> Result<u64, E>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<bool, E>>,
{
    if !exists(from).await? {
        return Ok(from);
    }
    let (mut lo, mut step) = (from, 1u64);
    let mut hi = loop {
        let candidate = lo.saturating_add(step);
        if exists(candidate).await? {
            lo = candidate;
            step = step.saturating_mul(2);
        } else {
            break candidate;
        }
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid).await? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(hi)
}

/// Where a starting writer continues, found from the trim pointer.
///
/// The writer then (1) writes its first segment at `next_seq` with LSN `next_lsn`, and only
/// then (2) plugs every hole, highest seq first, with a plug segment (`first_lsn =
/// next_lsn`, `next_seq = next_seq`). A reader that reaches `first_missing` finds a plug and
/// jumps over the orphans. Doing (1) first and plugging downwards means a writer that dies
/// half-way leaves `first_missing` still a hole, so the next plan finds the same prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestartPlan {
    /// First seq of the gap-free prefix that does not exist.
    pub first_missing: u64,
    /// Highest existing seq at or after `first_missing` (orphans of a writer that died with
    /// uploads in flight), if any.
    pub last_orphan: Option<u64>,
    /// Seqs in `first_missing..=last_orphan` that do not exist and must be plugged.
    pub holes: Vec<u64>,
    /// The seq the new writer writes first.
    pub next_seq: u64,
    /// The LSN the new writer assigns first (one past the durable prefix).
    pub next_lsn: u64,
    /// Timestamp of the last record of the durable prefix (new timestamps never go below).
    pub last_timestamp_ns: u64,
}

impl RestartPlan {
    /// Moves the first segment `width - 1` seqs further on and adds the seqs skipped to the
    /// holes, so that the new writer owns `width` consecutive seqs once it has started (its
    /// first segment and the plugs below it). A previous writer that may still be uploading
    /// (at most `width` uploads in flight) can then never get a segment accepted past them:
    /// see `writer::journal_writer`, "Fencing without a request per upload".
    pub fn reserve(&mut self, width: u64) {
        let skip = width.saturating_sub(1);
        if skip == 0 {
            return;
        }
        self.holes.extend(self.next_seq..self.next_seq + skip);
        self.first_missing = self.first_missing.min(self.next_seq);
        self.next_seq += skip;
        self.last_orphan = Some(self.next_seq - 1);
    }
}

/// Works out where a new writer continues: the end of the gap-free prefix from `first_seq`,
/// and any orphans past it. `first_lsn` is the LSN at `first_seq` (from the trim pointer).
pub(crate) async fn plan_restart(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    first_seq: u64,
    first_lsn: u64,
) -> JournalResult<RestartPlan> {
    let width = u64::from(manifest.splay_width);
    let mut end = probe_end(store, manifest, first_seq).await?;
    // The bisection stops at *a* missing seq after an existing one; with holes at the tail it
    // may be a hole with orphans past it. Orphans lie within 2W seqs of any hole (W uploads
    // in flight per dead writer, one more segment per dead restarted writer): look that far
    // past the end and continue from any found.
    'orphans: loop {
        for seq in end + 1..=end + 2 * width {
            if segment_exists(store, manifest, seq).await? {
                end = probe_end(store, manifest, seq).await?;
                continue 'orphans;
            }
        }
        break;
    }
    // Holes only sit among the last uploads of writers that died (a writer uploads within a
    // window of W seqs from its oldest one not durable: journal_writer, rule 2): at most W per writer, and
    // a dead restarted writer adds one more segment. Walk back from the end until 2W
    // consecutive segments exist; no hole can lie before that.
    let mut holes = Vec::new();
    let mut run = 0;
    let mut seq = end;
    while seq > first_seq && run < 2 * width {
        seq -= 1;
        if segment_exists(store, manifest, seq).await? {
            run += 1;
        } else {
            holes.push(seq);
            run = 0;
        }
    }
    holes.reverse();
    let first_missing = holes.first().copied().unwrap_or(end);
    let last_orphan = (first_missing < end).then(|| end - 1);
    let (next_lsn, last_timestamp_ns) = if first_missing > first_seq {
        let index = prefix_index(store, manifest, first_missing - 1).await?;
        (index.header.end_lsn(), index.last_timestamp().unwrap_or(0))
    } else {
        (first_lsn, 0)
    };
    Ok(RestartPlan {
        first_missing,
        last_orphan,
        holes,
        next_seq: last_orphan.map_or(first_missing, |s| s + 1),
        next_lsn,
        last_timestamp_ns,
    })
}

/// [`plan_restart`] from the trim pointer, safe against a `journal trim` running at the same
/// time: trim moves the pointer before it deletes anything below it, so a plan made while
/// the pointer read before and after it stayed the same never probed a deleted seq (which
/// would look like the end of the journal). A moved pointer means plan again.
pub async fn plan_restart_from_trim_pointer(
    store: &dyn ObjectStore,
    manifest: &Manifest,
) -> JournalResult<(TrimPointer, RestartPlan)> {
    let mut trim = load_trim_pointer(store).await?;
    loop {
        let plan = plan_restart(store, manifest, trim.first_seq, trim.first_lsn).await?;
        let again = load_trim_pointer(store).await?;
        if again == trim {
            return Ok((trim, plan));
        }
        tracing::info!(
            "the trim pointer of {} moved from seq {} to {} while planning; planning again",
            store.describe(),
            trim.first_seq,
            again.first_seq
        );
        trim = again;
    }
}

/// The index of segment `seq`, checked against the manifest's UUID.
pub async fn prefix_index(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    seq: u64,
) -> JournalResult<SegmentIndex> {
    let expected = Expected {
        uuid: manifest.uuid,
        seq,
        first_lsn: None,
    };
    Ok(read_index(store, &manifest.segment_key(seq), &expected).await?)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::journal::manifest::ManifestParams;
    use crate::journal::record::{Op, Record};
    use crate::journal::segment::encode_segment;
    use crate::store::memory::MemoryStore;

    /// In a memory journal of segments 0..8 whose lease recorded 8 as durable, the first, a
    /// middle and the last-but-one segment deleted are each a hole for `verify` with the
    /// right seq; the same seq at or past the known end is the end.
    #[tokio::test]
    async fn a_missing_segment_below_the_known_end_is_a_hole_wherever_it_is() {
        use crate::journal::epoch;
        use crate::journal::lease::{self, Lease};
        use crate::journal::verify::verify_journal;
        for missing in [0, 4, 6] {
            let store = MemoryStore::new();
            let m = Manifest::new(
                &ManifestParams {
                    device_name: "d".into(),
                    size: 1 << 20,
                    block_size: 4096,
                    region_size: 1 << 20,
                    splay_width: 2,
                    segment_size: 1 << 20,
                },
                1,
            )
            .unwrap();
            let claim = epoch::claim_next(&store, 1).await.unwrap();
            for seq in (0..8u64).filter(|&s| s != missing) {
                let record = Record {
                    lsn: seq + 1,
                    timestamp_ns: seq + 1,
                    dev: 0,
                    op: Op::Flush,
                };
                let body = encode_segment(m.uuid, 1, seq, seq + 1, &[record]).unwrap();
                store
                    .put_if_absent(&m.segment_key(seq), body)
                    .await
                    .unwrap();
            }
            // No lease end recorded yet: the gap reads as the end (an older journal).
            let report = verify_journal(&store, &m, None, |_| {}).await.unwrap();
            assert_eq!(report.next_seq, missing);
            let mut l = Lease::new(claim.epoch, 1, 2, 15_000);
            l.durable_next_seq = 8;
            lease::write(&store, &l).await.unwrap();
            let err = verify_journal(&store, &m, None, |_| {}).await.unwrap_err();
            let JournalError::Hole {
                first_missing,
                next_present,
                known_end,
                ..
            } = err
            else {
                panic!("{err}");
            };
            assert_eq!(
                (first_missing, next_present, known_end),
                (missing, Some(missing + 1), 8)
            );
            let known = super::known_end(&store).await.unwrap();
            assert!(check_missing(&store, &m, 8, &known).await.is_ok());
            assert_eq!(
                lowest_missing(&store, &m, 0, 8).await.unwrap(),
                Some(missing)
            );
        }
    }

    /// Segments 0..=29 and an orphan at 31: the bisection alone would stop at the hole 30
    /// and miss the orphan, whose seq the new writer would then collide with.
    #[tokio::test]
    async fn an_orphan_just_past_a_hole_is_found() {
        let store = MemoryStore::new();
        let m = Manifest::new(
            &ManifestParams {
                device_name: "d".into(),
                size: 1 << 20,
                block_size: 4096,
                region_size: 1 << 20,
                splay_width: 4,
                segment_size: 1 << 20,
            },
            1,
        )
        .unwrap();
        for seq in (0..29).chain([31]) {
            store
                .put_if_absent(&m.segment_key(seq), Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        let record = Record {
            lsn: 30,
            timestamp_ns: 5,
            dev: 0,
            op: Op::Flush,
        };
        let last = encode_segment(m.uuid, 1, 29, 30, &[record]).unwrap();
        store.put_if_absent(&m.segment_key(29), last).await.unwrap();
        let plan = plan_restart(&store, &m, 0, 1).await.unwrap();
        assert_eq!(plan.holes, vec![30]);
        assert_eq!(plan.last_orphan, Some(31));
        assert_eq!((plan.next_seq, plan.next_lsn), (32, 31));
    }
}
