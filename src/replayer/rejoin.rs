//! `rejoin`: an old primary's image comes back as a replica of the current chain, moving only
//! what diverged. This module works out the plan; `bin/tinylag/rejoin.rs` prints it, asks the
//! writer for the regions and runs the agent.
//!
//! **Which epoch the image owned.** Two files beside a primary say it, and both name the
//! journal they belong to:
//! - its activity log (`<primary>.tinylag-al`, `writer::activity_log`): every slot carries
//!   the writer epoch that wrote it, and its bitmap names the regions with changes the
//!   journal may lack — acknowledged but never durable, including everything a fenced
//!   writer kept serving (its records never become durable, so its regions never retire);
//! - its clean-stop marker (`<primary>.tinylag-clean`, `writer::restart`): the epoch of a
//!   writer that stopped with everything durable (a `demote` or a clean stop).
//!
//! The higher epoch of the two wins; the log's regions count only when the log is newer than
//! the marker. A marker of the log's own epoch was written when that writer stopped cleanly
//! or demoted, with everything it acknowledged durable (a fenced writer writes none): the
//! regions its log still lists (they retire a round after they quiet) diverged in nothing. The epoch
//! claims' host and pid are not used: a host name is shared by containers and a pid is
//! reused. Without either file (`--no-activity-log` and a crash), nothing bounds what the
//! image wrote: only `rejoin --full` proceeds. A serve that ran without its log after one
//! with it and crashed would leave the older log naming an older epoch: keep the default
//! (the log on) where rejoin is wanted.
//!
//! **What diverged** = the log's regions ∪ the regions of the image's own records after
//! the fork (`journal::divergence`). Bytes moved = those regions × the region size,
//! clipped at the device's end.
//!
//! **A group** rejoins as one set: its activity log and clean-stop marker sit beside the
//! first device's primary, as `serve` keeps them, and every region here is the group's
//! (`journal::layout`: numbered across the group, each on one device). One fork, one set of
//! regions, one consumer at one LSN; the writer's one resync span rewrites them on whichever
//! devices they lie, so the set is never a mix of a resynced disk and an older one.
//!
//! Must never: proceed without a bound on what the image wrote (unless `--full`); vouch
//! for a region it did not count (the consumer's seed is `checking` over exactly these
//! regions, and only the writer's resync span proves them).

use std::path::Path;

use crate::journal::chain::Chain;
use crate::journal::consumer::{ConsumerState, TrimPointer, UndoPosition};
use crate::journal::divergence::{self, DivergedRecords, DivergenceError, Fork};
use crate::journal::layout::DeviceLayout;
use crate::journal::seed::{RegionRanges, Seed};
use crate::journal::Manifest;
use crate::store::ObjectStore;
use crate::writer::activity_log::{read_slot as read_activity_log, ActivityLogError};
use crate::writer::restart::{read_marker as read_clean_marker, RestartError};

/// How the image's epoch is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerSource {
    ActivityLog,
    CleanStop,
}

impl OwnerSource {
    pub fn name(self) -> &'static str {
        match self {
            OwnerSource::ActivityLog => "its activity log",
            OwnerSource::CleanStop => "its clean-stop marker",
        }
    }
}

/// What the files beside the image say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageState {
    /// The writer epoch the image's last `serve` owned.
    pub owned: u64,
    pub source: OwnerSource,
    /// Regions the activity log names: changes the journal may lack.
    pub unjournaled: RegionRanges,
}

/// Every way a rejoin is refused before anything changes.
#[derive(Debug, thiserror::Error)]
pub enum RejoinError {
    /// Neither an activity log nor a clean-stop marker of this journal beside the image.
    #[error("{why}: nothing bounds what this image wrote since the fork")]
    UnknownImage { why: String },
    #[error(transparent)]
    Divergence(#[from] DivergenceError),
    #[error(transparent)]
    ActivityLog(#[from] ActivityLogError),
    #[error(transparent)]
    Marker(#[from] RestartError),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

/// Reads the activity log at `activity_log` and the clean-stop marker at `marker` of an
/// image of `manifest`'s journal (see the module documentation).
pub fn read_image_state(
    activity_log: &Path,
    marker: &Path,
    manifest: &Manifest,
) -> Result<ImageState, RejoinError> {
    // The log covers the group's address space (for one device, the device).
    let size = manifest.layout().span();
    let region_size = manifest.region_size.max(1);
    let regions = size.div_ceil(region_size);
    let slot = read_activity_log(activity_log, regions)?.filter(|s| {
        s.uuid == manifest.uuid && s.region_size == region_size && s.regions == regions
    });
    let marker_epoch = read_clean_marker(marker)?
        .filter(|m| m.uuid == manifest.uuid)
        .map(|m| m.epoch);
    match (slot, marker_epoch) {
        // A marker of the log's own epoch was written at that writer's clean stop (or
        // demote), after everything it acknowledged was durable: the log names nothing the
        // journal lacks, whatever it still lists (regions retire a round after they quiet).
        (Some(slot), m) if m.is_none_or(|m| slot.epoch > m) => {
            let mut unjournaled = RegionRanges::default();
            for (w, word) in slot.bits.iter().enumerate() {
                let mut word = *word;
                while word != 0 {
                    let r = w as u64 * 64 + u64::from(word.trailing_zeros());
                    word &= word - 1;
                    if r < regions {
                        unjournaled.insert(r, r + 1);
                    }
                }
            }
            Ok(ImageState {
                owned: slot.epoch,
                source: OwnerSource::ActivityLog,
                unjournaled,
            })
        }
        (_, Some(epoch)) => Ok(ImageState {
            owned: epoch,
            source: OwnerSource::CleanStop,
            unjournaled: RegionRanges::default(),
        }),
        _ => Err(RejoinError::UnknownImage {
            why: format!(
                "no activity log ({}) and no clean-stop marker ({}) of journal {} beside the image",
                activity_log.display(),
                marker.display(),
                manifest.uuid
            ),
        }),
    }
}

/// What a rejoin moves and where its consumer starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejoinPlan {
    /// The image's epoch and unjournaled regions (`None` for `--full` without them).
    pub image: Option<ImageState>,
    /// Where the image left the chain (`None` for `--full` when it cannot be found).
    pub fork: Option<Fork>,
    /// The image's own records after the fork.
    pub records: DivergedRecords,
    /// Every region to bring back from the new primary.
    pub regions: RegionRanges,
    /// Bytes of those regions (clipped at each device's end: padding is not moved).
    pub bytes: u64,
    /// Bytes of the device, or of every device of a group.
    pub device_size: u64,
    /// The consumer's start: the segment it reads first and the LSN before it.
    pub start_seq: u64,
    pub start_lsn: u64,
    /// The chain the consumer follows from its start (the current chain's head epoch): the
    /// image holds that lineage up to `start_lsn`, so the agent never winds it back over a
    /// fork it is already past.
    pub chain_epoch: u64,
    /// `--full`: every region.
    pub full: bool,
}

/// Bytes of `regions` regions of `region_size` in `layout`'s address space: each region's
/// range clipped to the device it lies on (a device's end, never the padding after it).
pub fn region_bytes(regions: &RegionRanges, region_size: u64, layout: &DeviceLayout) -> u64 {
    let region_size = region_size.max(1);
    regions
        .iter()
        .map(|r| {
            let start = r * region_size;
            let range = layout.clip(start..start.saturating_add(region_size));
            range.end - range.start
        })
        .sum()
}

/// Works out the plan. `image` is what [`read_image_state`] found; with `full`, every
/// region is moved and a missing image state, a trimmed fork or a missing segment do not
/// stop it (the consumer then starts at the journal's end: the span rewrites everything).
pub async fn plan(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    chain: &Chain,
    trim: TrimPointer,
    image: Result<ImageState, RejoinError>,
    full: bool,
) -> Result<RejoinPlan, RejoinError> {
    let layout = manifest.layout();
    let device_size = layout.devices().iter().map(|d| d.size).sum();
    let region_size = manifest.region_size.max(1);
    let all = RegionRanges::all(layout.span().div_ceil(region_size));
    let image = match image {
        Ok(image) => Some(image),
        Err(e) if full => {
            tracing::warn!(error = %e, "--full: moving every region");
            None
        }
        Err(e) => return Err(e),
    };
    let found = match &image {
        Some(image) => match divergence::find_fork(chain, image.owned) {
            Ok(fork) => match divergence::diverged_records(store, manifest, &fork, trim).await {
                Ok(records) => Ok((fork, records)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        None => Err(DivergenceError::Trimmed {
            fork_lsn: 0,
            first_seq: trim.first_seq,
            first_lsn: trim.first_lsn,
        }),
    };
    let (fork, records) = match found {
        Ok(found) => (Some(found.0), found.1),
        // Still the owner, or a successor not yet begun: nothing to rejoin, even with --full.
        Err(
            e @ (DivergenceError::StillOwner { .. }
            | DivergenceError::NotBegun { .. }
            | DivergenceError::Journal(_)),
        ) => return Err(e.into()),
        Err(e) if !full => return Err(e.into()),
        Err(_) => (None, DivergedRecords::default()),
    };
    let regions = if full {
        all
    } else {
        let mut regions = records.regions.clone();
        if let Some(image) = &image {
            for r in image.unjournaled.iter() {
                regions.insert(r, r + 1);
            }
        }
        regions
    };
    let (start_seq, start_lsn) = match &fork {
        Some(fork) => (fork.start_seq, fork.start_lsn),
        None => journal_end(store, manifest, trim).await?,
    };
    Ok(RejoinPlan {
        bytes: region_bytes(&regions, region_size, &layout),
        image,
        fork,
        records,
        regions,
        device_size,
        start_seq,
        start_lsn,
        chain_epoch: chain.head_epoch(),
        full,
    })
}

/// The journal's end as a consumer position: the first seq past the gap-free run from the
/// trim pointer, and the last LSN before it.
async fn journal_end(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    trim: TrimPointer,
) -> Result<(u64, u64), RejoinError> {
    let end = crate::journal::head::probe_end(store, manifest, trim.first_seq).await?;
    if end == trim.first_seq {
        return Ok((end, trim.first_lsn.saturating_sub(1)));
    }
    let index = crate::journal::head::prefix_index(store, manifest, end - 1).await?;
    Ok((end, index.header.end_lsn().saturating_sub(1)))
}

impl RejoinPlan {
    /// The consumer position `rejoin` registers: at the plan's start, seeded `checking` over
    /// exactly the diverged regions (`checked` at once when none diverged).
    pub fn consumer(&self, name: &str, replica: &str, delay_ns: u64, now_ns: u64) -> ConsumerState {
        let seed = if self.regions.is_empty() {
            Seed::Checked {
                lsn: self.start_lsn,
                proven_lsn: self.start_lsn,
            }
        } else {
            Seed::Checking {
                lsn: self.start_lsn,
                unproven: self.regions.clone(),
                mismatched: RegionRanges::default(),
                covering: Vec::new(),
            }
        };
        ConsumerState {
            name: name.to_string(),
            next_seq: self.start_seq,
            applied_lsn: self.start_lsn,
            applied_timestamp_ns: 0,
            consistent_lsn: self.start_lsn,
            consistent_seq: self.start_seq,
            consistent_timestamp_ns: 0,
            delay_ns,
            replica: replica.to_string(),
            registered_at_ns: now_ns,
            updated_at_ns: now_ns,
            undo: UndoPosition::default(),
            verify: Default::default(),
            seed,
            chain_epoch: self.chain_epoch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::manifest::ManifestParams;
    use crate::writer::activity_log::ActivityLog;
    use crate::writer::restart::{marker_path as clean_marker_path, write_marker, CleanMarker};

    const MIB: u64 = 1 << 20;

    fn manifest() -> Manifest {
        Manifest::new(
            &ManifestParams {
                device_name: "d".into(),
                size: 10 * MIB,
                block_size: 4096,
                region_size: 4 * MIB,
                splay_width: 1,
                segment_size: MIB,
            },
            1,
        )
        .unwrap()
    }

    /// Epoch 1 wrote seq 0 and demoted; epoch 2 (a plain promote) continued at seq 1.
    async fn demoted_and_promoted() -> (crate::store::memory::MemoryStore, Manifest, Chain) {
        use crate::journal::chain::ChainEntry;
        use crate::journal::epoch::{EpochReason, Predecessor};
        use crate::journal::record::{Op, Record};
        use crate::journal::segment::encode_segment;
        let store = crate::store::memory::MemoryStore::new();
        let m = manifest();
        for (epoch, seq, lsn) in [(1, 0, 1), (2, 1, 2)] {
            let record = Record {
                lsn,
                timestamp_ns: lsn,
                dev: 0,
                op: Op::Write {
                    offset: 0,
                    data: bytes::Bytes::from(vec![1u8; 4096]),
                },
            };
            let body = encode_segment(m.uuid, epoch, seq, lsn, &[record]).unwrap();
            store
                .put_if_absent(&m.segment_key(seq), body)
                .await
                .unwrap();
        }
        let entry = |epoch, first_seq, first_lsn, pred| ChainEntry {
            epoch,
            first_seq,
            first_lsn,
            predecessor: pred,
            reason: EpochReason::Promote,
            owner: String::new(),
            host: String::new(),
            began_at_ns: 0,
        };
        let mut chain = Chain::default();
        chain.entries.insert(1, entry(1, 0, 1, None));
        chain
            .entries
            .insert(2, entry(2, 1, 2, Some(Predecessor { epoch: 1, lsn: 1 })));
        (store, m, chain)
    }

    #[tokio::test]
    async fn after_a_plain_promote_nothing_moves_and_the_image_is_vouched_at_once() {
        let (store, m, chain) = demoted_and_promoted().await;
        let image = ImageState {
            owned: 1,
            source: OwnerSource::CleanStop,
            unjournaled: RegionRanges::default(),
        };
        let plan = plan(&store, &m, &chain, TrimPointer::default(), Ok(image), false)
            .await
            .unwrap();
        assert_eq!((plan.bytes, plan.start_seq, plan.start_lsn), (0, 1, 1));
        let pos = plan.consumer("sitea", "/a.img", 0, 5);
        assert!(
            matches!(pos.seed, Seed::Checked { lsn: 1, .. }),
            "{:?}",
            pos.seed
        );
        assert_eq!((pos.next_seq, pos.applied_lsn), (1, 1));
    }

    #[tokio::test]
    async fn full_moves_every_region_even_without_a_bound_and_starts_at_the_end() {
        let (store, m, chain) = demoted_and_promoted().await;
        let unknown = || {
            Err(RejoinError::UnknownImage {
                why: "nothing".into(),
            })
        };
        let trim = TrimPointer::default();
        assert!(plan(&store, &m, &chain, trim, unknown(), false)
            .await
            .is_err());
        let plan = plan(&store, &m, &chain, trim, unknown(), true)
            .await
            .unwrap();
        assert_eq!(plan.regions.to_string(), "0-2");
        assert_eq!(plan.bytes, 10 * MIB);
        assert_eq!(
            (plan.start_seq, plan.start_lsn),
            (2, 2),
            "the journal's end"
        );
        let pos = plan.consumer("sitea", "/a.img", 0, 5);
        assert!(!pos.seed.vouched());
    }

    #[test]
    fn bytes_are_regions_times_the_region_size_clipped_at_the_device_end() {
        let r: RegionRanges = "0,2".parse().unwrap();
        let one = manifest().layout();
        assert_eq!(region_bytes(&r, 4 * MIB, &one), 4 * MIB + 2 * MIB);
        assert_eq!(region_bytes(&RegionRanges::default(), 4 * MIB, &one), 0);
        // A group of 6 and 10 MiB in 4 MiB regions: the wal's region 1 ends at 6 MiB (the
        // padding to 8 MiB is no device's), the data device's last region (4) at 18 MiB.
        let spec = |name: &str, size| crate::journal::manifest::DeviceSpec {
            name: name.into(),
            size,
        };
        let group = DeviceLayout::new(&[spec("wal", 6 * MIB), spec("data", 10 * MIB)], 4 * MIB);
        let r: RegionRanges = "1-2,4".parse().unwrap();
        assert_eq!(
            region_bytes(&r, 4 * MIB, &group),
            2 * MIB + 4 * MIB + 2 * MIB
        );
        let all = RegionRanges::all(group.span().div_ceil(4 * MIB));
        assert_eq!(
            region_bytes(&all, 4 * MIB, &group),
            16 * MIB,
            "both devices, no padding"
        );
    }

    #[test]
    fn the_activity_log_and_the_clean_marker_name_the_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let m = manifest();
        let primary = dir.path().join("a.img");
        let al = dir.path().join("a.img.tinylag-al");
        let marker = clean_marker_path(&primary);
        // Neither: unknown.
        let err = read_image_state(&al, &marker, &m).unwrap_err();
        assert!(err.to_string().contains("nothing bounds"), "{err}");
        // A log of epoch 3 naming region 2.
        let log = ActivityLog::create(&al, m.uuid, 3, 10 * MIB, 4 * MIB, &[0b100]).unwrap();
        drop(log);
        let state = read_image_state(&al, &marker, &m).unwrap();
        assert_eq!(state.owned, 3);
        assert_eq!(state.source, OwnerSource::ActivityLog);
        assert_eq!(state.unjournaled.to_string(), "2");
        // A clean stop of the same epoch (a demote right after writes): nothing unjournaled.
        let same = CleanMarker {
            uuid: m.uuid,
            epoch: 3,
            next_seq: 9,
            next_lsn: 99,
        };
        write_marker(&marker, &same).unwrap();
        let state = read_image_state(&al, &marker, &m).unwrap();
        assert_eq!((state.owned, state.source), (3, OwnerSource::CleanStop));
        assert!(state.unjournaled.is_empty());
        // A newer clean stop (a later run without the log): its epoch, nothing unjournaled.
        let clean = CleanMarker {
            uuid: m.uuid,
            epoch: 4,
            next_seq: 9,
            next_lsn: 99,
        };
        write_marker(&marker, &clean).unwrap();
        let state = read_image_state(&al, &marker, &m).unwrap();
        assert_eq!((state.owned, state.source), (4, OwnerSource::CleanStop));
        assert!(state.unjournaled.is_empty());
        // Another journal's files count for nothing.
        let other = manifest();
        assert!(read_image_state(&al, &marker, &other).is_err());
    }
}
