//! Finding the end of the journal without listing it: existence probes by predicted key.
//!
//! Segments exist as a contiguous run of seqs from the trim pointer on, except for holes in
//! the last `W` seqs while uploads are in flight (or after a writer died with uploads in
//! flight; a restarted writer plugs those, see [`plan_restart`]). So the end is found with
//! O(log n) HEAD requests: gallop forward, then bisect.
//!
//! Must never: list the segment folders (that costs O(journal)), or report a head past a
//! hole as if the segments before it were all there.

use super::consumer::{load_trim_pointer, TrimPointer};
use super::error::JournalResult;
use super::manifest::Manifest;
use super::segment::{read_index, Expected, SegmentIndex};
use crate::store::ObjectStore;

/// Whether segment `seq` exists.
pub async fn segment_exists(
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

/// A seq `n >= from` such that `n` does not exist and `n - 1` does (or `n == from`). When
/// existence is contiguous this is the end of the journal.
pub async fn probe_end(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    from: u64,
) -> JournalResult<u64> {
    if !segment_exists(store, manifest, from).await? {
        return Ok(from);
    }
    let (mut lo, mut step) = (from, 1u64);
    let mut hi = loop {
        let candidate = lo.saturating_add(step);
        if segment_exists(store, manifest, candidate).await? {
            lo = candidate;
            step = step.saturating_mul(2);
        } else {
            break candidate;
        }
    };
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if segment_exists(store, manifest, mid).await? {
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
pub async fn plan_restart(
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
    // Holes only sit among the last uploads of writers that died: at most W per writer, and
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
