//! Where an old primary's image left the current chain, and which of its own records came
//! after that point: the journal's half of `rejoin` (the other half, what the image wrote
//! but never made durable, is its activity log: `crate::replayer::rejoin`).
//!
//! - [`find_fork`]: from the epoch the image owned, the first epoch after it that began
//!   writing (its chain entry, [`ChainEntry`]) names the predecessor — the last LSN of the
//!   old chain the new owner continued. The fork is the last LSN both the image's lineage
//!   and the current lineage hold (the predecessor, or earlier if a later `promote --at`
//!   cut further back), and a consumer following the current chain from there starts at
//!   the first segment of the first current epoch past it.
//! - [`diverged_records`]: the extents of the image's own records after the fork, from
//!   segment indexes only (one ranged read of each segment's tail, no payload), walking
//!   back from the successor's first seq until a segment of the image's lineage ends at or
//!   before the fork. Orphans (segments the old owner uploaded past a gap, which the new
//!   writer plugged over) are found the same way: they carry the old epoch and LSNs past
//!   the fork.
//!
//! Must never: read a payload; count a record of an epoch that is not on the image's
//! lineage; call a fork found when a segment it needed was trimmed or is missing (that is
//! [`DivergenceError::Trimmed`] or [`DivergenceError::Missing`]: `rejoin --full`).

use std::collections::BTreeSet;

use super::chain::{Chain, ChainEntry};
use super::consumer::TrimPointer;
use super::epoch::Predecessor;
use super::error::JournalError;
use super::manifest::Manifest;
use super::record::RecordKind;
use super::seed::RegionRanges;
use super::segment::{read_index, Expected};
use crate::store::ObjectStore;

/// Every way finding the divergence fails.
#[derive(Debug, thiserror::Error)]
pub enum DivergenceError {
    /// No epoch after the image's has been claimed: the image's writer still owns the journal.
    #[error(
        "writer epoch {owned} (this image's) is still the journal's newest: there is no newer \
         chain to rejoin (promote the replica first, or serve this image again)"
    )]
    StillOwner { owned: u64 },
    /// Epoch `epoch` is claimed but has not planned its first segment yet.
    #[error(
        "writer epoch {epoch} (after this image's {owned}) is claimed but has not begun \
         writing yet: try again once the new primary serves"
    )]
    NotBegun { owned: u64, epoch: u64 },
    /// The records the rejoin needs (the current chain after the fork, or the image's own
    /// records after it) were trimmed.
    #[error(
        "the journal was trimmed past the fork (LSN {fork_lsn}; it now starts at seq \
         {first_seq}, LSN {first_lsn})"
    )]
    Trimmed {
        fork_lsn: u64,
        first_seq: u64,
        first_lsn: u64,
    },
    /// A segment between the fork and the successor is missing (a hole, not a trim).
    #[error(
        "segment {seq} is missing between the fork and the new chain: the records it held \
         cannot be accounted for"
    )]
    Missing { seq: u64 },
    /// The current chain continues the old one in the middle of an epoch after the fork,
    /// which a fork (always from a point on the lineage) never leaves.
    #[error(
        "the current chain continues LSN {fork_lsn} in the middle of an epoch: no epoch \
         begins where the rejoin would start"
    )]
    NoEpochStart { fork_lsn: u64 },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Where an image that owned epoch `owned` left the current chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fork {
    /// The epoch the image's writer owned (the last it wrote).
    pub owned: u64,
    /// The first epoch after it that began writing.
    pub successor: ChainEntry,
    /// The last LSN the image and the current chain both hold, and the epoch that wrote it.
    pub point: Predecessor,
    /// Where a consumer of the image follows the current chain from: the first segment of
    /// the first current epoch past the fork...
    pub start_seq: u64,
    /// ...and the LSN before that epoch's first (the fork itself, unless a `promote --at`
    /// cut records between, which are off the lineage and never applied).
    pub start_lsn: u64,
    /// The epochs of the image's lineage (its own and those it continued).
    lineage_epochs: BTreeSet<u64>,
}

/// The image's own records after the fork, as regions and bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DivergedRecords {
    /// Regions the records touch (the journal's dirty-tracking regions, numbered across a
    /// group as `journal::layout` places its devices).
    pub regions: RegionRanges,
    /// Bytes the records changed (written, discarded or zeroed), summed.
    pub bytes: u64,
    pub records: u64,
    /// Segment indexes read.
    pub segments_read: u64,
}

/// Finds where an image that owned epoch `owned` left the current chain (see the module
/// documentation).
pub(crate) fn find_fork(chain: &Chain, owned: u64) -> Result<Fork, DivergenceError> {
    let Some(successor) = chain
        .entries
        .range(owned + 1..)
        .next()
        .map(|(_, e)| e.clone())
    else {
        return Err(match chain.claims.range(owned + 1..).next() {
            Some((&epoch, _)) => DivergenceError::NotBegun { owned, epoch },
            None => DivergenceError::StillOwner { owned },
        });
    };
    let pred = successor.predecessor.unwrap_or(Predecessor {
        epoch: owned,
        lsn: successor.first_lsn.saturating_sub(1),
    });
    let current = chain.lineage();
    let mine = chain.lineage_to(owned, u64::MAX);
    // The first LSN where the two lineages differ (either way), capped at the predecessor.
    let differ = [mine.first_not_in(&current), current.first_not_in(&mine)]
        .into_iter()
        .flatten()
        .min();
    let fork_lsn = differ.map_or(pred.lsn, |l| pred.lsn.min(l.saturating_sub(1)));
    // The epochs of the image's lineage, and the one holding the fork.
    let mut lineage_epochs = BTreeSet::new();
    let mut fork_epoch = None;
    let mut cur = Some(owned);
    while let Some(epoch) = cur {
        lineage_epochs.insert(epoch);
        let entry = chain.entries.get(&epoch);
        if fork_epoch.is_none() && entry.is_none_or(|e| e.first_lsn <= fork_lsn) {
            fork_epoch = Some(epoch);
        }
        cur = entry.and_then(|e| e.predecessor).map(|p| p.epoch);
    }
    let point = Predecessor {
        epoch: if fork_lsn == pred.lsn {
            pred.epoch
        } else {
            fork_epoch.unwrap_or(owned)
        },
        lsn: fork_lsn,
    };
    // The first epoch on the current lineage that begins past the fork.
    let start = chain
        .entries
        .range(owned + 1..)
        .map(|(_, e)| e)
        .filter(|e| e.first_lsn > fork_lsn && current.contains(e.first_lsn))
        .min_by_key(|e| e.first_lsn)
        .unwrap_or(&successor);
    if start.first_lsn > fork_lsn + 1
        && current
            .last_at_or_below(start.first_lsn - 1)
            .is_some_and(|l| l > fork_lsn)
    {
        return Err(DivergenceError::NoEpochStart { fork_lsn });
    }
    Ok(Fork {
        owned,
        start_seq: start.first_seq,
        start_lsn: start.first_lsn.saturating_sub(1).max(fork_lsn),
        successor,
        point,
        lineage_epochs,
    })
}

/// Whether a record of this kind changes the device's bytes (and so makes its regions
/// diverge).
fn changes_data(kind: RecordKind) -> bool {
    matches!(
        kind,
        RecordKind::Write | RecordKind::Discard | RecordKind::WriteZeroes | RecordKind::ResyncData
    )
}

/// The image's own records after the fork (see the module documentation). `trim` is the
/// journal's trim pointer, read once by the caller.
pub(crate) async fn diverged_records(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    fork: &Fork,
    trim: TrimPointer,
) -> Result<DivergedRecords, DivergenceError> {
    let trimmed = || DivergenceError::Trimmed {
        fork_lsn: fork.point.lsn,
        first_seq: trim.first_seq,
        first_lsn: trim.first_lsn,
    };
    if fork.start_seq < trim.first_seq || fork.start_lsn + 1 < trim.first_lsn {
        return Err(trimmed());
    }
    // Regions are the group's (`journal::layout`): a record of device `dev` counts at its
    // device's base, clipped to that device (a one-device journal: the identity).
    let layout = manifest.layout();
    let region_size = manifest.region_size.max(1);
    let mut out = DivergedRecords::default();
    let mut seq = fork.successor.first_seq;
    loop {
        if seq == 0 {
            // Walked back to the journal's first segment: every record was seen.
            return Ok(out);
        }
        seq -= 1;
        if seq < trim.first_seq {
            return Err(trimmed());
        }
        let key = manifest.segment_key(seq);
        let expected = Expected {
            uuid: manifest.uuid,
            seq,
            first_lsn: None,
        };
        let index = match read_index(store, &key, &expected).await {
            Ok(index) => index,
            Err(e) if e.is_not_found() => return Err(DivergenceError::Missing { seq }),
            Err(e) => return Err(JournalError::from(e).into()),
        };
        out.segments_read += 1;
        let header = &index.header;
        if header.plug || !fork.lineage_epochs.contains(&header.epoch) {
            // A plug, or an epoch the image never continued (a dead writer's orphans).
            continue;
        }
        for entry in &index.entries {
            if entry.lsn <= fork.point.lsn || !changes_data(entry.kind) {
                continue;
            }
            let Some(device) = layout.device(entry.dev) else {
                continue;
            };
            let local_end = entry.offset.saturating_add(entry.length).min(device.size);
            if entry.offset >= local_end {
                continue;
            }
            let (start, end) = (device.base + entry.offset, device.base + local_end);
            out.records += 1;
            out.bytes += end - start;
            out.regions
                .insert(start / region_size, (end - 1) / region_size + 1);
        }
        if header.end_lsn() <= fork.point.lsn + 1 {
            // Everything from here back is at or before the fork.
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;
    use crate::journal::epoch::EpochReason;
    use crate::journal::manifest::ManifestParams;
    use crate::journal::record::{Op, Record};
    use crate::journal::segment::{encode_plug, encode_segment};
    use crate::store::memory::MemoryStore;

    const MIB: u64 = 1 << 20;

    fn manifest() -> Manifest {
        Manifest::new(
            &ManifestParams {
                device_name: "d".into(),
                size: 16 * MIB,
                block_size: 4096,
                region_size: MIB,
                splay_width: 2,
                segment_size: MIB,
            },
            1,
        )
        .unwrap()
    }

    fn entry(epoch: u64, first_seq: u64, first_lsn: u64, pred: Option<(u64, u64)>) -> ChainEntry {
        ChainEntry {
            epoch,
            first_seq,
            first_lsn,
            predecessor: pred.map(|(epoch, lsn)| Predecessor { epoch, lsn }),
            reason: EpochReason::PromoteForce,
            owner: String::new(),
            host: String::new(),
            began_at_ns: 0,
        }
    }

    fn chain(entries: Vec<ChainEntry>) -> Chain {
        Chain {
            claims: BTreeMap::new(),
            entries: entries.into_iter().map(|e| (e.epoch, e)).collect(),
        }
    }

    fn write(lsn: u64, offset: u64, len: usize) -> Record {
        Record {
            lsn,
            timestamp_ns: lsn,
            dev: 0,
            op: Op::Write {
                offset,
                data: Bytes::from(vec![7u8; len]),
            },
        }
    }

    async fn put(store: &MemoryStore, m: &Manifest, epoch: u64, seq: u64, records: &[Record]) {
        let first = records.first().map_or(0, |r| r.lsn);
        let body = encode_segment(m.uuid, epoch, seq, first, records).unwrap();
        store
            .put_if_absent(&m.segment_key(seq), body)
            .await
            .unwrap();
    }

    /// Epoch 1 (the old primary) wrote seqs 0..=3 (LSNs 1..=4), but seq 2 never arrived: the
    /// forced promote of epoch 2 continued after LSN 2, plugged seq 2 over the orphan at seq
    /// 3 (LSN 4, region 5) and began at seq 4. The divergence is the orphan's region only.
    #[tokio::test]
    async fn an_orphan_past_the_plug_is_the_old_primarys_divergence() {
        let store = MemoryStore::new();
        let m = manifest();
        put(&store, &m, 1, 0, &[write(1, 0, 4096)]).await;
        put(&store, &m, 1, 1, &[write(2, MIB, 4096)]).await;
        store
            .put_if_absent(&m.segment_key(2), encode_plug(m.uuid, 2, 2, 3, 4))
            .await
            .unwrap();
        put(&store, &m, 1, 3, &[write(4, 5 * MIB + 10, 8192)]).await;
        put(&store, &m, 2, 4, &[write(3, 9 * MIB, 4096)]).await;
        let c = chain(vec![entry(1, 0, 1, None), entry(2, 4, 3, Some((1, 2)))]);
        let fork = find_fork(&c, 1).unwrap();
        assert_eq!(fork.point, Predecessor { epoch: 1, lsn: 2 });
        assert_eq!((fork.start_seq, fork.start_lsn), (4, 2));
        let d = diverged_records(&store, &m, &fork, TrimPointer::default())
            .await
            .unwrap();
        assert_eq!(d.regions.to_string(), "5");
        assert_eq!((d.records, d.bytes), (1, 8192));
        assert_eq!(
            d.segments_read, 3,
            "the orphan, the plug, and seq 1 at the fork"
        );
        // Trimmed to the successor's start: the orphan is gone, the walk cannot end.
        let trim = TrimPointer {
            first_seq: 4,
            first_lsn: 3,
        };
        assert!(matches!(
            diverged_records(&store, &m, &fork, trim).await,
            Err(DivergenceError::Trimmed { fork_lsn: 2, .. })
        ));
        // Trimmed past the successor's start: refused before anything is read.
        let trim = TrimPointer {
            first_seq: 5,
            first_lsn: 4,
        };
        assert!(matches!(
            diverged_records(&store, &m, &fork, trim).await,
            Err(DivergenceError::Trimmed { .. })
        ));
    }

    /// A plain demote and promote: the successor continues everything; nothing diverged.
    #[tokio::test]
    async fn after_a_demote_and_promote_nothing_diverged() {
        let store = MemoryStore::new();
        let m = manifest();
        put(&store, &m, 1, 0, &[write(1, 0, 4096), write(2, MIB, 4096)]).await;
        put(&store, &m, 2, 1, &[write(3, 2 * MIB, 4096)]).await;
        let c = chain(vec![entry(1, 0, 1, None), entry(2, 1, 3, Some((1, 2)))]);
        let fork = find_fork(&c, 1).unwrap();
        let d = diverged_records(&store, &m, &fork, TrimPointer::default())
            .await
            .unwrap();
        assert!(d.regions.is_empty());
        assert_eq!(d.segments_read, 1);
        // The new owner itself has nothing to rejoin.
        assert!(matches!(
            find_fork(&c, 2),
            Err(DivergenceError::StillOwner { owned: 2 })
        ));
    }

    /// `promote --at` cut the old primary's LSNs 3..=5: they are its divergence, and its
    /// consumer starts at the new epoch's first segment, past the cut.
    #[tokio::test]
    async fn records_cut_by_a_promote_at_are_diverged() {
        let store = MemoryStore::new();
        let m = manifest();
        put(&store, &m, 1, 0, &[write(1, 0, 4096), write(2, MIB, 4096)]).await;
        put(
            &store,
            &m,
            1,
            1,
            &[write(3, 3 * MIB, 4096), write(4, 3 * MIB, 10)],
        )
        .await;
        put(
            &store,
            &m,
            1,
            2,
            &[write(5, 15 * MIB + 4096, 2 * MIB as usize)],
        )
        .await;
        put(&store, &m, 2, 3, &[write(6, 0, 4096)]).await;
        let c = chain(vec![entry(1, 0, 1, None), entry(2, 3, 6, Some((1, 2)))]);
        let fork = find_fork(&c, 1).unwrap();
        assert_eq!(fork.point.lsn, 2);
        assert_eq!((fork.start_seq, fork.start_lsn), (3, 5));
        let d = diverged_records(&store, &m, &fork, TrimPointer::default())
            .await
            .unwrap();
        assert_eq!(d.regions.to_string(), "3,15", "clipped at the device's end");
        assert_eq!(d.records, 3);
        assert_eq!(d.bytes, 4096 + 10 + (MIB - 4096));
    }

    /// A group (devices of 3.5 and 4 MiB, regions of 1 MiB: device 1 starts at 4 MiB): the
    /// old primary's records after the fork count in the group's regions, each at its
    /// device's base and clipped to its device, never in the padding.
    #[tokio::test]
    async fn a_groups_diverged_records_count_in_the_groups_regions() {
        use crate::journal::manifest::DeviceSpec;
        let store = MemoryStore::new();
        let spec = |name: &str, size| DeviceSpec {
            name: name.into(),
            size,
        };
        let m = Manifest::new_group(
            &ManifestParams {
                device_name: String::new(),
                size: 0,
                block_size: 4096,
                region_size: MIB,
                splay_width: 2,
                segment_size: MIB,
            },
            vec![spec("wal", 7 * MIB / 2), spec("data", 4 * MIB)],
            1,
        )
        .unwrap();
        let on = |dev, record: Record| Record { dev, ..record };
        put(&store, &m, 1, 0, &[write(1, 0, 4096)]).await;
        put(
            &store,
            &m,
            1,
            1,
            &[
                // The wal's last region (3), half of it padding.
                on(0, write(2, 3 * MIB, 4096)),
                // The data device's region 1 is the group's region 5.
                on(1, write(3, MIB + 10, 8192)),
            ],
        )
        .await;
        put(&store, &m, 2, 2, &[on(1, write(4, 0, 4096))]).await;
        let c = chain(vec![entry(1, 0, 1, None), entry(2, 2, 4, Some((1, 1)))]);
        let fork = find_fork(&c, 1).unwrap();
        let d = diverged_records(&store, &m, &fork, TrimPointer::default())
            .await
            .unwrap();
        assert_eq!(d.regions.to_string(), "3,5");
        assert_eq!((d.records, d.bytes), (2, 4096 + 8192));
    }

    /// The image owned epoch 2, which a later `promote --at` (epoch 3, from epoch 1 at LSN
    /// 2) cut whole: the fork is at 2 and both of epoch 2's records diverged.
    #[tokio::test]
    async fn a_fork_back_over_the_whole_epoch_counts_it_all() {
        let store = MemoryStore::new();
        let m = manifest();
        put(&store, &m, 1, 0, &[write(1, 0, 4096), write(2, MIB, 4096)]).await;
        put(
            &store,
            &m,
            2,
            1,
            &[write(3, 4 * MIB, 4096), write(4, 6 * MIB, 4096)],
        )
        .await;
        put(&store, &m, 3, 2, &[write(5, 0, 4096)]).await;
        let c = chain(vec![
            entry(1, 0, 1, None),
            entry(2, 1, 3, Some((1, 2))),
            entry(3, 2, 5, Some((1, 2))),
        ]);
        let fork = find_fork(&c, 2).unwrap();
        assert_eq!(fork.point, Predecessor { epoch: 1, lsn: 2 });
        let d = diverged_records(&store, &m, &fork, TrimPointer::default())
            .await
            .unwrap();
        assert_eq!(d.regions.to_string(), "4,6");
        // A claim without an entry yet: try again later.
        let mut c = chain(vec![entry(1, 0, 1, None)]);
        c.claims.insert(
            2,
            crate::journal::epoch::EpochClaim {
                epoch: 2,
                claim_id: uuid::Uuid::nil(),
                host: String::new(),
                pid: 0,
                claimed_at_ns: 0,
                reason: EpochReason::PromoteForce,
                owner: String::new(),
                fork: None,
            },
        );
        assert!(matches!(
            find_fork(&c, 1),
            Err(DivergenceError::NotBegun { epoch: 2, .. })
        ));
    }
}
