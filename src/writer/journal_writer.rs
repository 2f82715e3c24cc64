//! Journal writer: turns the stream of acknowledged records into segments, uploads up to W
//! of them at once, and publishes the durable LSN.
//!
//! Three parts, one concern each: the [`Intake`] (LSN assignment and the queue, under the
//! I/O path's one mutex), the [`Encoder`] thread (segment building, off the async threads),
//! and the upload coordinator here (an async task). The coordinator uploads each closed
//! segment with a conditional create of its predicted key, at most `W` (the splay width) at a
//! time. Uploads complete in any order; the durable LSN only advances over the gap-free
//! prefix of completed segments, and only then is the pool memory of those records released.
//!
//! Starting ([`prepare`] then [`Prepared::start`]): claim the next writer epoch, plan the
//! restart from the trim pointer ([`head::plan_restart`]), write the first segment (an
//! `EPOCH` record, and `RESYNC_BEGIN` if the replica cannot be trusted) at `plan.next_seq`,
//! then plug every hole, highest seq first. Only the previous writer's own crash gaps are
//! plugged: a segment missing below the journal's known end is a hole, and the start is
//! refused (unless `--abandon-after-hole`, see [`prepare`]).
//!
//! Failures: an upload that fails is retried with the same bytes, with backoff, until it
//! succeeds (the store's own wrapper already retries transient errors; this retries the
//! rest), counting every failure. A segment key already taken by someone else means another
//! writer owns the journal: journaling stops for good (mode `fenced`),
//! every record still held is marked dirty and all waiters are released.
//!
//! # Fencing without a request per upload
//! A segment upload is one request, the conditional create of its key: no `HEAD
//! epochs/<epoch + 1>` before it. What keeps a fenced writer E from getting a segment
//! accepted after writer E+1 has started writing:
//!
//! 1. Every seq is created at most once (`If-None-Match: *`, or the local store's exclusive
//!    link), and a writer that meets a key it did not create stops journaling for good.
//! 2. Writer E starts the upload of seq `s` only when every one of E's seqs below
//!    `s - W + 1` has succeeded (an upload window of `W` seqs from the oldest one not yet
//!    durable, so at most `W` in flight; a refused one stops E before it starts another).
//!    A window, not only a count: with a count alone, a stuck upload let seqs far above it
//!    land, and a writer killed then left a hole deeper than a restart looks.
//! 3. A starting writer E+1 whose predecessor may still be uploading (its lease is not
//!    released and its process is not known to be gone: a takeover, a paused or
//!    partitioned holder; [`lease::predecessor_may_still_write`]) writes its first segment
//!    `W - 1` seqs past the planned end `N` and plugs every seq from the first missing one
//!    up to it ([`RestartPlan::reserve`]). Once its start has succeeded, E+1 has created
//!    every missing seq up to `N + W - 1`, among them the `W` consecutive seqs `N ..= N + W - 1`.
//!
//! Then E gets no segment accepted at a seq E+1 created (1); below `N` every other seq
//! existed when E+1 planned; and E never even starts a seq above `N + W - 1`: by (2) it
//! would first have seen one of `N ..= N + W - 1` succeed, a key E+1 created (1). If E wins
//! one of those keys first, E+1's own create fails and E+1 refuses to start, naming the
//! key (a writer racing its predecessor does not journal; nothing it planned is read).
//! In particular, when the new epoch's first seq lies beyond the predecessor's next seq
//! (uploads of its still in flight, or the reservation itself), every seq between is a
//! plug: a late upload there meets it and is refused; the reservation closes the seqs above.
//! A predecessor that released its lease, or whose process is gone, uploads nothing more,
//! and the new writer starts at the planned end as before.
//!
//! Fencing is also *learned* in bounded time without uploads: each lease renewal (every
//! `ttl / 3`) checks for a newer epoch first, and a writer past its renewal deadline checks
//! before its next upload (`writer::lease`), so an idle fenced writer reports `fenced`
//! within a renewal period rather than at its next write.
//!
//! [`head::plan_restart`]: crate::journal::head::plan_restart
//! [`RestartPlan::reserve`]: crate::journal::head::RestartPlan::reserve
//! [`lease::predecessor_may_still_write`]: crate::journal::lease::predecessor_may_still_write
//!
//! Must never: advance the durable LSN past a segment that is not durable; upload two
//! different objects under one key; block the I/O path (intake never waits; the pool, not
//! the queue, bounds memory); lose track of a record without marking its range dirty.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use super::encoder::{Encoded, Encoder, Unsettled};
use super::intake::Intake;
use super::mode::{FullReason, Mode};
use super::shared::{Shared, WriterStats};
use crate::clock::{Clock, MonotonicTimestamps};
use crate::journal::chain::{self, ChainEntry};
use crate::journal::consumer::{self, TrimPointer};
use crate::journal::epoch::{self, ClaimBasis, EpochClaim, Predecessor};
use crate::journal::head::{self, plan_restart_from_trim_pointer, KnownEnd, RestartPlan};
use crate::journal::lease;
use crate::journal::paths;
use crate::journal::segment::{encode_plug, SegmentBuilder, SegmentError};
use crate::journal::{JournalError, Manifest, Op, Record};
use crate::store::retrying::RetryPolicy;
use crate::store::{list_all, ObjectStore};

/// How often the writer checks whether a store outage has lasted past the bound.
const OUTAGE_CHECK: Duration = Duration::from_millis(250);

/// How the writer cuts and uploads segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriterConfig {
    /// Close a segment once its encoded size reaches this.
    pub segment_size: u64,
    /// Close a segment this long after its first record (bounds the RPO).
    pub linger: Duration,
    /// Uploads in flight at most: the manifest's splay width.
    pub max_uploads: usize,
    /// Offer payloads to zstd, skipping it while the data does not compress (`true`,
    /// `--compress auto`), or store every payload raw (`false`, `--compress off`: less CPU,
    /// more bytes).
    pub compress: bool,
    /// Once uploads have been pending this long without one completing (a dead or hanging
    /// store), `--ack journal` writers stop waiting: the primary is never held hostage by
    /// the store for longer.
    pub outage_bound: Duration,
    /// First pause between retries of a failed upload; doubles up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
}

impl WriterConfig {
    /// The defaults for `manifest`: its segment size and splay width, 200 ms linger.
    pub fn for_manifest(manifest: &Manifest) -> Self {
        WriterConfig {
            segment_size: manifest.segment_size,
            linger: Duration::from_millis(200),
            max_uploads: manifest.splay_width as usize,
            compress: true,
            outage_bound: Duration::from_secs(30),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Durability, as published to the writers that wait for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Every record at or below this LSN is in a durable segment.
    pub durable_lsn: u64,
    /// Every seq below this one is durable (a segment or a plug): what the lease records
    /// for readers to tell a hole from the end (`journal::head`).
    pub durable_next_seq: u64,
    /// Waiters for an LSN at or below this stop waiting without durability: the writer was
    /// fenced or stopped (`u64::MAX`), or the store has been failing past the outage bound.
    pub released_lsn: u64,
}

/// Every way starting the journal writer fails.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Claiming the epoch, reading the trim pointer or planning the restart failed.
    #[error("cannot start the journal writer on {journal}: {source}")]
    Journal {
        journal: String,
        #[source]
        source: JournalError,
    },
    /// The first segment (the `EPOCH` record) could not be written.
    #[error("cannot write the first segment {key} of writer epoch {epoch} to {journal}: {source}")]
    FirstSegment {
        journal: String,
        key: String,
        epoch: u64,
        #[source]
        source: JournalError,
    },
    /// A plug over an abandoned seq could not be written.
    #[error("cannot plug the abandoned segment {key} in {journal}: {source}")]
    Plug {
        journal: String,
        key: String,
        #[source]
        source: JournalError,
    },
    /// Encoding the first segment failed (a bug: it holds one or two fixed records).
    #[error("cannot encode the first segment of writer epoch {epoch}: {source}")]
    Encode {
        epoch: u64,
        #[source]
        source: SegmentError,
    },
    /// The encoder thread could not be started.
    #[error("cannot start the segment encoder thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The journal as a starting writer found it: its claim and where it continues.
#[derive(Debug)]
pub(crate) struct Prepared {
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    pub claim: EpochClaim,
    pub trim: TrimPointer,
    pub plan: RestartPlan,
    /// `--abandon-after-hole` abandoned the journal from this seq on (see [`prepare`]).
    pub abandoned: Option<u64>,
    /// The journal held no segment when planned (before any [`RestartPlan::reserve`]).
    empty: bool,
    /// What this epoch continues, for its chain entry (see [`journal::chain`]).
    pub predecessor: Option<Predecessor>,
}

impl Prepared {
    /// True when the journal holds no segment yet (a new journal).
    pub(crate) fn journal_is_empty(&self) -> bool {
        self.empty
    }
}

/// Claims the next epoch and plans where to continue. Nothing is written but the claim.
///
/// A gap the plan would plug is the previous writer's own only at or above the journal's
/// known end (`head::known_end`: what the last lease recorded as durable, what consumers
/// committed): below it, a segment that was durable has gone missing, and plugging it would
/// silently drop every record after it. Such a hole refuses the start
/// ([`JournalError::Hole`]), before the epoch is claimed, unless `abandon_after_hole`: then
/// everything from the lowest missing seq on is abandoned (plugged, as a crash gap is) and
/// [`Prepared::abandoned`] tells the core to resync the whole device, so that every consumer
/// converges again.
#[cfg(test)]
pub(super) async fn prepare(
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    clock: &dyn Clock,
    abandon_after_hole: bool,
) -> Result<Prepared, StartError> {
    prepare_as(
        store,
        manifest,
        clock,
        abandon_after_hole,
        ClaimBasis::default(),
    )
    .await
}

/// [`prepare`] with the claim's reason, owner and (for `promote --at`) fork: the epoch's
/// chain entry records them, with the predecessor at the fork or, for every other reason,
/// at the journal's end as planned.
#[cfg(test)]
pub(super) async fn prepare_as(
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    clock: &dyn Clock,
    abandon_after_hole: bool,
    basis: ClaimBasis,
) -> Result<Prepared, StartError> {
    prepare_claiming(store, manifest, clock, abandon_after_hole, basis, None).await
}

/// [`prepare_as`], claiming exactly `exact` when given (`promote`: the epoch after the one
/// it checked; of two racing promotes one wins, the other gets
/// [`JournalError::EpochContended`] with nothing else written).
pub(super) async fn prepare_claiming(
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    clock: &dyn Clock,
    abandon_after_hole: bool,
    basis: ClaimBasis,
    exact: Option<u64>,
) -> Result<Prepared, StartError> {
    let fail = |source| StartError::Journal {
        journal: store.describe(),
        source,
    };
    let (known, hole) = find_hole(store.as_ref(), &manifest).await.map_err(fail)?;
    match hole {
        Some(hole) if !abandon_after_hole => return Err(fail(hole)),
        _ => {}
    }
    let abandoning = hole.is_some();
    let claim = match exact {
        Some(epoch) => epoch::claim_exact(store.as_ref(), epoch, clock.now_ns(), basis).await,
        None => epoch::claim_next_as(store.as_ref(), clock.now_ns(), basis).await,
    }
    .map_err(fail)?;
    let (trim, mut plan) = plan_restart_from_trim_pointer(store.as_ref(), &manifest)
        .await
        .map_err(fail)?;
    if abandoning {
        plan = abandon_after(store.as_ref(), &manifest, &trim, &known, plan)
            .await
            .map_err(fail)?;
        tracing::warn!(
            journal = %store.describe(),
            first_abandoned = plan.first_missing,
            plugs = plan.holes.len(),
            next_seq = plan.next_seq,
            "--abandon-after-hole: every segment from the hole on is abandoned and plugged; \
             the whole device is resynced so every replica converges again"
        );
    }
    if !abandoning {
        plan = plug_crash_gaps(store.as_ref(), &manifest, &trim, &known, plan)
            .await
            .map_err(fail)?;
    }
    let abandoned = abandoning.then_some(plan.first_missing);
    let empty = plan.next_seq == trim.first_seq && plan.next_lsn == trim.first_lsn;
    let previous = claim.epoch - 1;
    if previous > 0
        && lease::predecessor_may_still_write(store.as_ref(), previous)
            .await
            .map_err(fail)?
    {
        plan.reserve(u64::from(manifest.splay_width));
        tracing::info!(
            journal = %store.describe(),
            previous,
            first_seq = plan.next_seq,
            "the previous writer may still be uploading: this writer starts {} seqs on and \
             plugs the seqs between, so that none of its late uploads can be accepted",
            manifest.splay_width.saturating_sub(1)
        );
    }
    let predecessor = match claim.fork {
        Some(fork) => Some(fork),
        None if empty && trim.first_seq == 0 => None,
        None => {
            let previous_entry = list_all(store.as_ref(), paths::CHAIN_PREFIX)
                .await
                .map_err(|e| fail(e.into()))?
                .iter()
                .filter_map(|o| paths::parse_chain_key(&o.key))
                .filter(|&e| e < claim.epoch)
                .max();
            Some(Predecessor {
                // A journal older than the chain: the epoch before this one.
                epoch: previous_entry.unwrap_or(claim.epoch - 1),
                lsn: plan.next_lsn.saturating_sub(1),
            })
        }
    };
    Ok(Prepared {
        store,
        manifest,
        claim,
        trim,
        plan,
        abandoned,
        empty,
        predecessor,
    })
}

/// The journal's known end, and the hole a restart would otherwise plug (see [`prepare`]).
async fn find_hole(
    store: &dyn ObjectStore,
    manifest: &Manifest,
) -> Result<(KnownEnd, Option<JournalError>), JournalError> {
    let (trim, plan) = plan_restart_from_trim_pointer(store, manifest).await?;
    let known = head::known_end(store).await?;
    // The plan only looks for gaps near the end; a hole may lie anywhere below it.
    let to = plan.first_missing.min(known.seq);
    let lowest = head::lowest_missing(store, manifest, trim.first_seq, to).await?;
    let lowest = match lowest {
        Some(seq) => seq,
        None if plan.first_missing < known.seq => plan.first_missing,
        None => return Ok((known, None)),
    };
    let hole = head::hole(store, manifest, lowest, &known).await;
    Ok((known, Some(hole)))
}

/// `plan` with every crash gap of the previous writer in it. A seq missing at or above the
/// known end was never durable in order (the previous writer's own gap), and plugging it
/// loses nothing the journal promised: its records' regions are still in the activity log
/// and are resynced. The plan looks for gaps only among the last `2W` seqs, which is where a
/// writer's upload window (rule 2) leaves them; this listing from the known end (W LISTs,
/// once per start) also finds one deeper, left by a writer older than that window, instead
/// of taking it for part of the durable prefix.
async fn plug_crash_gaps(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    trim: &TrimPointer,
    known: &KnownEnd,
    plan: RestartPlan,
) -> Result<RestartPlan, JournalError> {
    let from = known.seq.max(trim.first_seq);
    let Some(lowest) = head::lowest_missing(store, manifest, from, plan.first_missing).await?
    else {
        return Ok(plan);
    };
    let plan = plugging_from(store, manifest, trim, lowest, plan.next_seq, &plan).await?;
    tracing::warn!(
        journal = %store.describe(),
        first_missing = lowest,
        plugs = plan.holes.len(),
        "the previous writer left a gap below its last uploads; its records from there on \
         were never durable in order and are plugged (their regions are resynced)"
    );
    Ok(plan)
}

/// The plan that plugs every missing seq in `lowest..next_seq`, writes first at `next_seq`
/// and continues the LSNs after the last record before `lowest` (what both a crash gap and
/// an abandoned hole come to). Timestamps never go below any record written, plugged ones
/// included: `before` floors them.
async fn plugging_from(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    trim: &TrimPointer,
    lowest: u64,
    next_seq: u64,
    before: &RestartPlan,
) -> Result<RestartPlan, JournalError> {
    let mut holes = Vec::new();
    for seq in lowest..next_seq {
        if !head::segment_exists(store, manifest, seq).await? {
            holes.push(seq);
        }
    }
    let (next_lsn, last_timestamp_ns) = if lowest > trim.first_seq {
        let index = head::prefix_index(store, manifest, lowest - 1).await?;
        (index.header.end_lsn(), index.last_timestamp().unwrap_or(0))
    } else {
        (trim.first_lsn, 0)
    };
    Ok(RestartPlan {
        first_missing: lowest,
        last_orphan: (lowest < next_seq).then(|| next_seq - 1),
        holes,
        next_seq,
        next_lsn,
        last_timestamp_ns: last_timestamp_ns.max(before.last_timestamp_ns),
    })
}

/// `plan` redone so that everything from the lowest missing seq on is abandoned: the new
/// writer starts past every seq known to exist, every missing seq before it is plugged, and
/// LSNs continue from the last record before the hole. Refused when a consumer has already
/// read past the hole (its position would no longer follow the chain).
async fn abandon_after(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    trim: &TrimPointer,
    known: &KnownEnd,
    plan: RestartPlan,
) -> Result<RestartPlan, JournalError> {
    let next_seq = plan.next_seq.max(known.seq);
    let lowest = head::lowest_missing(store, manifest, trim.first_seq, next_seq)
        .await?
        .unwrap_or(plan.first_missing);
    if let Some(ahead) = consumer::list(store)
        .await?
        .into_iter()
        .find(|c| c.next_seq > lowest)
    {
        return Err(JournalError::InvalidParameter {
            name: "--abandon-after-hole",
            reason: format!(
                "consumer {} has already read past the hole at seq {lowest} (its position is \
                 seq {}), so abandoning what follows would strand it; restore the missing \
                 object, or unregister that consumer and seed its replica again from a restore",
                ahead.name, ahead.next_seq
            ),
        });
    }
    plugging_from(store, manifest, trim, lowest, next_seq, &plan).await
}

/// What the I/O path needs from a running writer.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    /// Where records go, in LSN order; [`Intake::close`] ends the writer.
    pub intake: Arc<Intake>,
    /// Durability progress.
    pub progress: watch::Receiver<Progress>,
    pub stats: Arc<WriterStats>,
    /// The upload coordinator; it ends once intake is closed and everything queued is
    /// durable (or journaling stopped). Its output is the seq the next writer would write.
    pub task: JoinHandle<u64>,
    pub epoch: u64,
    /// Record timestamps, floored at the journal's last one.
    pub timestamps: MonotonicTimestamps,
}

impl Prepared {
    /// Writes the first segment (`EPOCH`, plus `RESYNC_BEGIN` when `resync_begin`), plugs
    /// the holes, and starts the writer task.
    pub(crate) async fn start(
        self,
        clock: Arc<dyn Clock>,
        config: WriterConfig,
        shared: Shared,
        resync_begin: bool,
    ) -> Result<JournalWriter, StartError> {
        let Prepared {
            store,
            manifest,
            claim,
            plan,
            predecessor,
            ..
        } = self;
        let epoch = claim.epoch;
        let timestamps = MonotonicTimestamps::new(clock.clone(), plan.last_timestamp_ns);
        // The chain entry before the first segment: a reader that meets a record of this
        // epoch can always learn what it continues.
        let entry = ChainEntry {
            epoch,
            first_seq: plan.next_seq,
            first_lsn: plan.next_lsn,
            predecessor,
            reason: claim.reason,
            owner: claim.owner.clone(),
            host: claim.host.clone(),
            began_at_ns: clock.now_ns(),
        };
        chain::write_entry(store.as_ref(), &entry)
            .await
            .map_err(|source| StartError::FirstSegment {
                journal: store.describe(),
                key: paths::chain_key(epoch),
                epoch,
                source,
            })?;
        let mut ops = vec![Op::Epoch { epoch }];
        if resync_begin {
            ops.push(Op::ResyncBegin);
        }
        let mut builder = SegmentBuilder::new(manifest.uuid, epoch, plan.next_seq, plan.next_lsn);
        let mut lsn = plan.next_lsn;
        for op in ops {
            let record = Record {
                lsn,
                timestamp_ns: timestamps.next(),
                dev: 0,
                op,
            };
            builder
                .push(&record)
                .map_err(|source| StartError::Encode { epoch, source })?;
            lsn += 1;
        }
        let stats = Arc::new(WriterStats::default());
        let first_key = manifest.segment_key(plan.next_seq);
        let first = builder.finish();
        create_checked(store.as_ref(), epoch, &first_key, first.clone())
            .await
            .map_err(|source| StartError::FirstSegment {
                journal: store.describe(),
                key: first_key.clone(),
                epoch,
                source,
            })?;
        stats.count_upload(&first);
        for &hole in plan.holes.iter().rev() {
            let key = manifest.segment_key(hole);
            let plug = encode_plug(manifest.uuid, epoch, hole, plan.next_lsn, plan.next_seq);
            create_checked(store.as_ref(), epoch, &key, plug.clone())
                .await
                .map_err(|source| StartError::Plug {
                    journal: store.describe(),
                    key: key.clone(),
                    source,
                })?;
            stats.count_upload(&plug);
        }
        tracing::info!(
            journal = %store.describe(),
            epoch,
            seq = plan.next_seq,
            lsn = plan.next_lsn,
            plugs = plan.holes.len(),
            "journal writer started"
        );

        let (out, rx) = mpsc::unbounded_channel();
        let (progress_tx, progress) = watch::channel(Progress {
            durable_lsn: lsn - 1,
            durable_next_seq: plan.next_seq + 1,
            released_lsn: 0,
        });
        let intake = Arc::new(Intake::new(lsn));
        let stopped = Arc::new(AtomicBool::new(false));
        let manifest = Arc::new(manifest);
        Encoder {
            intake: intake.clone(),
            uuid: manifest.uuid,
            epoch,
            next_seq: plan.next_seq + 1,
            next_lsn: lsn,
            segment_size: config.segment_size,
            linger: config.linger,
            compress: config.compress,
            max_uploads: config.max_uploads,
            stats: stats.clone(),
            shared: shared.clone(),
            stopped: stopped.clone(),
            out,
        }
        .spawn()
        .map_err(StartError::Thread)?;
        let task = Task {
            clock,
            store,
            manifest,
            epoch,
            config,
            rx,
            intake: intake.clone(),
            progress: progress_tx,
            stats: stats.clone(),
            shared,
            stopped,
            next_seq: plan.next_seq + 1,
            ready: VecDeque::new(),
            uploads: JoinSet::new(),
            pending: BTreeMap::new(),
            stalled_since: None,
        };
        Ok(JournalWriter {
            intake,
            progress,
            stats,
            task: tokio::spawn(task.run()),
            epoch,
            timestamps,
        })
    }
}

/// One conditional create after a fence check, as the first segment and plugs need (one
/// HEAD per writer start, not per upload).
async fn create_checked(
    store: &dyn ObjectStore,
    epoch: u64,
    key: &str,
    data: Bytes,
) -> Result<(), JournalError> {
    epoch::ensure_not_fenced(store, epoch).await?;
    store.put_if_absent(key, data).await?;
    Ok(())
}

/// Why an upload gave up (every other failure is retried).
#[derive(Debug)]
enum Refused {
    /// The key holds another object: another writer wrote this seq (a newer epoch's
    /// first segment or plugs, see the module documentation). `newer` is the highest
    /// epoch claimed, when it could be read.
    Taken { key: String, newer: Option<u64> },
    /// Journaling was stopped from outside while this upload was failing: the lease keeper
    /// found a newer epoch (and the lease wrapper now refuses every segment upload).
    Stopped { reason: String },
}

/// The upload coordinator.
struct Task {
    clock: Arc<dyn Clock>,
    store: Arc<dyn ObjectStore>,
    manifest: Arc<Manifest>,
    epoch: u64,
    config: WriterConfig,
    rx: mpsc::UnboundedReceiver<Encoded>,
    intake: Arc<Intake>,
    progress: watch::Sender<Progress>,
    stats: Arc<WriterStats>,
    shared: Shared,
    /// Journaling stopped for good (fenced or failed); the encoder reads it too.
    stopped: Arc<AtomicBool>,
    /// The seq after the last segment received.
    next_seq: u64,
    /// Closed segments waiting for an upload slot, in seq order.
    ready: VecDeque<(u64, Bytes)>,
    uploads: JoinSet<(u64, Result<(), Refused>)>,
    /// Closed, not yet durable, by seq; `true` once uploaded.
    pending: BTreeMap<u64, (Unsettled, bool)>,
    /// Since when uploads have been pending without one completing (`None` when idle). A
    /// store that hangs, or whose failures the retrying wrapper is still hiding, shows here
    /// before any error is reported.
    stalled_since: Option<Instant>,
}

impl Task {
    async fn run(mut self) -> u64 {
        let mut intake_open = true;
        let mut outage_check = tokio::time::interval(OUTAGE_CHECK);
        outage_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.start_uploads();
            if !intake_open && self.ready.is_empty() && self.uploads.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some(joined) = self.uploads.join_next(), if !self.uploads.is_empty() => {
                    match joined {
                        Ok((seq, Ok(()))) => self.uploaded(seq),
                        Ok((_, Err(Refused::Taken { key, newer }))) => {
                            let by = match newer {
                                Some(newer) if newer > self.epoch => format!(
                                    ": writer epoch {} was fenced by epoch {newer}",
                                    self.epoch
                                ),
                                _ => String::new(),
                            };
                            self.stop(
                                format!("segment {key} was written by another writer{by}"),
                                true,
                            )
                        }
                        Ok((_, Err(Refused::Stopped { reason }))) => {
                            let fenced = self.shared.mode.mode() == Mode::Fenced;
                            self.stop(reason, fenced)
                        }
                        Err(e) => self.stop(format!("an upload task failed: {e}"), false),
                    }
                }
                received = self.rx.recv(), if intake_open => match received {
                    Some(Encoded::Segment { seq, bytes, meta }) => self.closed(seq, bytes, meta),
                    Some(Encoded::End { next_seq }) => {
                        self.next_seq = next_seq;
                        intake_open = false;
                    }
                    // The encoder is gone without saying goodbye: it failed (and said why).
                    None => intake_open = false,
                },
                _ = outage_check.tick() => self.check_outage(),
            }
            self.publish_oldest();
        }
        self.next_seq
    }

    /// A segment the encoder closed.
    fn closed(&mut self, seq: u64, bytes: Bytes, meta: Unsettled) {
        self.next_seq = seq + 1;
        if self.stopped.load(Ordering::Acquire) {
            self.stats.segments_waiting.fetch_sub(1, Ordering::AcqRel);
            self.stats
                .records_abandoned
                .fetch_add(meta.timestamps.len() as u64, Ordering::AcqRel);
            for r in meta.ranges {
                self.shared.dirty.mark(r);
            }
            return;
        }
        self.pending.insert(seq, (meta, false));
        self.ready.push_back((seq, bytes));
    }

    fn start_uploads(&mut self) {
        while !self.stopped.load(Ordering::Acquire) && self.uploads.len() < self.config.max_uploads
        {
            let Some(&(seq, _)) = self.ready.front() else {
                break;
            };
            // The upload window, not only the count in flight: no seq starts `max_uploads` or
            // more past the oldest one not yet durable. A stuck upload then holds back what
            // follows it, so a writer that dies leaves its holes among its last `W` seqs,
            // where `head::plan_restart` looks for them; a count alone let later seqs land
            // far above a stuck one, and a restart took that deep hole for durable prefix.
            if self
                .pending
                .first_key_value()
                .is_some_and(|(&oldest, _)| seq >= oldest + self.config.max_uploads as u64)
            {
                break;
            }
            let Some((seq, bytes)) = self.ready.pop_front() else {
                break;
            };
            self.stats.segments_waiting.fetch_sub(1, Ordering::AcqRel);
            let upload = Upload {
                store: self.store.clone(),
                key: self.manifest.segment_key(seq),
                stats: self.stats.clone(),
                retry_base: self.config.retry_base,
                retry_max: self.config.retry_max,
            };
            self.uploads
                .spawn(async move { (seq, upload.run(bytes).await) });
            self.stalled_since.get_or_insert_with(Instant::now);
        }
        self.stats
            .uploads_in_flight
            .store(self.uploads.len() as u64, Ordering::Release);
    }

    /// Segment `seq` is in the store; the durable prefix may grow.
    fn uploaded(&mut self, seq: u64) {
        self.stats.clear_failing();
        self.stalled_since = (!self.uploads.is_empty()).then(Instant::now);
        if self.stats.outage.swap(false, Ordering::AcqRel) {
            tracing::info!(journal = %self.store.describe(), "the journal store answers again");
            if !self.stopped.load(Ordering::Acquire) {
                self.progress.send_modify(|p| p.released_lsn = 0);
            }
        }
        if let Some((_, uploaded)) = self.pending.get_mut(&seq) {
            *uploaded = true;
        }
        let mut durable = None;
        let now = self.clock.now_ns();
        while let Some(entry) = self.pending.first_entry() {
            if !entry.get().1 {
                break;
            }
            // Dropping the entry releases its pool bytes.
            let (seq, (settled, _)) = entry.remove_entry();
            for ts in &settled.timestamps {
                self.stats.durable_lag.record(now.saturating_sub(*ts));
            }
            durable = Some((settled.last_lsn, seq + 1));
        }
        if let Some((lsn, next_seq)) = durable {
            self.progress.send_modify(|p| {
                p.durable_lsn = lsn;
                p.durable_next_seq = next_seq;
            });
        }
        // A slot is free: journal-mode writers waiting on the open segment need it closed.
        if self.stats.sync_waiters.load(Ordering::Acquire) > 0 {
            self.intake.poke();
        }
    }

    fn check_outage(&mut self) {
        let stalled = self.stalled_since.map(|t| t.elapsed());
        let Some(failing) = self.stats.failing_for().max(stalled) else {
            return;
        };
        if failing >= self.config.outage_bound && !self.stats.outage.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                journal = %self.store.describe(),
                seconds = failing.as_secs(),
                "the journal store has completed no upload for longer than the outage bound; \
                 acknowledgements no longer wait for it"
            );
            self.progress.send_modify(|p| p.released_lsn = u64::MAX);
        }
    }

    /// Stops journaling for good: everything not durable is marked dirty, all waiters are
    /// released, and the mode says why.
    ///
    /// The reason and the dirty regions are set before the mode changes, so a status that
    /// shows the new mode also shows why and what it left out (a status read in between once
    /// showed `fenced` with no reason and no dirty region).
    fn stop(&mut self, reason: String, fenced: bool) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(journal = %self.store.describe(), %reason, "journaling stopped");
        self.stats.set_stopped(reason.clone());
        let mut abandoned = 0;
        for (_, (u, _)) in std::mem::take(&mut self.pending) {
            abandoned += u.timestamps.len() as u64;
            for r in u.ranges {
                self.shared.dirty.mark(r);
            }
        }
        if fenced {
            self.shared.mode.fence(&reason);
        } else {
            self.shared.mode.need_full(FullReason::WriterFailed);
        }
        self.stats
            .segments_waiting
            .fetch_sub(self.ready.len() as u64, Ordering::AcqRel);
        self.ready.clear();
        self.uploads.abort_all();
        self.stats
            .records_abandoned
            .fetch_add(abandoned, Ordering::AcqRel);
        self.progress.send_modify(|p| p.released_lsn = u64::MAX);
        // The encoder may sleep on an open segment: have it drop that now.
        self.intake.poke();
    }

    fn publish_oldest(&self) {
        let oldest = self
            .pending
            .first_key_value()
            .map_or(0, |(_, (u, _))| u.first_ts);
        self.stats.pending_first_ns.store(oldest, Ordering::Release);
    }
}

/// One segment's upload, retried until it succeeds or is refused for good.
struct Upload {
    store: Arc<dyn ObjectStore>,
    key: String,
    stats: Arc<WriterStats>,
    retry_base: Duration,
    retry_max: Duration,
}

impl Upload {
    async fn run(self, bytes: Bytes) -> Result<(), Refused> {
        // The store's backoff (jittered doubling), without its attempt limit: an upload is
        // retried until it succeeds or is refused for good.
        let backoff = RetryPolicy {
            max_attempts: u32::MAX,
            base_delay: self.retry_base,
            max_delay: self.retry_max,
        };
        let mut attempt = 0u32;
        // A failed create may still have created the object (a lost response); then a retry
        // meets our own object and must recognise it by its bytes.
        let mut maybe_created = false;
        loop {
            let attempt_started = Instant::now();
            // No fence check here: the conditional create is the check (see the module
            // documentation, "Fencing without a request per upload").
            let failure = match self.store.put_if_absent(&self.key, bytes.clone()).await {
                Ok(()) => return self.done(&bytes),
                Err(e) if e.is_already_exists() => {
                    if !maybe_created {
                        return Err(self.taken().await);
                    }
                    match self.store.get(&self.key).await {
                        Ok(existing) if existing == bytes => return self.done(&bytes),
                        Ok(_) => return Err(self.taken().await),
                        Err(e) => format!("reading back {}: {e}", self.key),
                    }
                }
                Err(e) => {
                    maybe_created = true;
                    e.to_string()
                }
            };
            if let Some(reason) = self.stats.stopped_reason() {
                return Err(Refused::Stopped { reason });
            }
            tracing::warn!(key = %self.key, error = %failure, "segment upload failed; retrying");
            self.stats.record_error(failure, attempt_started);
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(backoff.delay(attempt)).await;
        }
    }

    /// The key is someone else's; which epoch took over is worth one listing of `epochs/`
    /// (it happens once per writer, when it stops).
    async fn taken(self) -> Refused {
        let newer = epoch::current_epoch(self.store.as_ref())
            .await
            .ok()
            .flatten();
        Refused::Taken {
            key: self.key,
            newer,
        }
    }

    fn done(&self, bytes: &Bytes) -> Result<(), Refused> {
        self.stats.count_upload(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
