//! The object replica's agent: follows the journal as a consumer, folds the lineage
//! records into the net effect of the run since the last layer ([`Overlay`]), uploads it
//! as a delta layer when it is big enough or a checkpoint is due, and commits a checkpoint
//! (a new manifest generation, then the consumer position) at least every
//! `checkpoint_interval` while records arrive.
//!
//! Why a loop of its own and not a `ReplicaTarget` under the file agent: a checkpoint must
//! carry its LSN and fall outside resync spans, and an object replica needs no pre-images
//! (docs/DESIGN.md, "Object replica").
//!
//! Must never: commit a manifest before the layers it names are durable, or the consumer
//! position before that manifest; checkpoint inside a resync span; resume from anywhere
//! but the newest manifest; make a request to the replica's store while no record arrives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use super::error::{ObjrepError, ObjrepResult};
use super::layer;
use super::manifest::{self, Checkpoint, LayerRef, ReplicaIdentity, ReplicaManifest};
use crate::journal::chain::{self, Lineage};
use crate::journal::consumer::{self, ConsumerState, Seed};
use crate::journal::layout::DeviceLayout;
use crate::journal::paths::objrep as paths;
use crate::journal::reader::{Cursor, JournalReader, Step};
use crate::journal::record::Op;
use crate::journal::segment::DecodedSegment;
use crate::journal::JournalError;
use crate::replayer::apply::{check_journal_record, extent};
use crate::replayer::overlay::Overlay;
use crate::store::ObjectStore;

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct ObjectAgentConfig {
    /// Consumer name.
    pub name: String,
    /// A checkpoint at least this often while records arrive (default 30 s: see DESIGN's cost
    /// model).
    pub checkpoint_interval: Duration,
    /// A layer is uploaded (without a manifest yet) once the run it folds holds this many
    /// record bytes: bounds the agent's memory.
    pub layer_bytes: u64,
    /// Apply what the journal holds now, checkpoint, exit.
    pub once: bool,
    /// Poll period for the next segment while writes flow.
    pub active_poll: Duration,
    /// Poll period once no segment came for `idle_after`.
    pub idle_poll: Duration,
    pub idle_after: Duration,
    /// An unchanged position is committed this often (the consumer's sign of life).
    pub idle_commit: Duration,
    /// Seal every layer with this key: set for an encrypted journal (the keyring's newest
    /// key), so the replica holds no payload in the clear either.
    pub seal_with: Option<crate::crypto::Key>,
}

impl ObjectAgentConfig {
    /// The defaults of DESIGN's cost model for consumer `name`.
    pub fn new(name: &str) -> ObjectAgentConfig {
        ObjectAgentConfig {
            name: name.to_string(),
            checkpoint_interval: Duration::from_secs(30),
            layer_bytes: 64 << 20,
            once: false,
            active_poll: Duration::from_secs(5),
            idle_poll: Duration::from_secs(120),
            idle_after: Duration::from_secs(60),
            idle_commit: Duration::from_secs(600),
            seal_with: None,
        }
    }
}

/// What a run did (printed as JSON by `replay` at its end).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ObjectAgentReport {
    pub checkpoints: u64,
    pub layers: u64,
    pub layer_bytes: u64,
    pub records: u64,
    /// The newest checkpoint's LSN (0 before the first).
    pub checkpoint_lsn: u64,
    /// The last LSN read (past the checkpoint while inside a resync span at the stop).
    pub read_lsn: u64,
}

/// A running object replica agent.
#[derive(Debug)]
pub struct ObjectAgent {
    reader: JournalReader,
    replica: Arc<dyn ObjectStore>,
    config: ObjectAgentConfig,
    identity: ReplicaIdentity,
    layout: DeviceLayout,
    /// The newest committed manifest.
    manifest: ReplicaManifest,
    /// This run's id in layer keys.
    run: u64,
    /// The net effect of the records read since the last uploaded layer.
    pending: Overlay,
    pending_bytes: u64,
    /// Layers uploaded since the last manifest (named by the next one).
    spilled: Vec<LayerRef>,
    /// First LSN the next layer covers.
    next_layer_first: u64,
    cursor: Cursor,
    /// The cursor points into the middle of a segment (resuming from a checkpoint).
    resuming: bool,
    read_lsn: u64,
    read_ts: u64,
    in_span: bool,
    /// Timestamp of the first record read after the newest checkpoint.
    first_ts_after: Option<u64>,
    lineage: Lineage,
    epoch_seen: u64,
    pos: ConsumerState,
    last_checkpoint: Instant,
    report: ObjectAgentReport,
}

/// The error of a fork below what the replica holds: the lineages part at `lsn`.
fn forked_below(epoch: u64, lsn: u64, replica: &str, holds: u64) -> ObjrepError {
    ObjrepError::Refused(format!(
        "epoch {epoch} forked the journal at LSN {} below what object replica {replica} holds \
         (LSN {holds}): winding an object replica back is not built yet; restore a point \
         before the fork from it, or start a new one",
        lsn.saturating_sub(1),
    ))
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl ObjectAgent {
    /// Opens (or creates) the object replica at `replica` for the journal `reader` reads,
    /// registers its consumer, and positions the cursor after the newest checkpoint. A
    /// refused start changes nothing.
    pub async fn open(
        reader: JournalReader,
        replica: Arc<dyn ObjectStore>,
        config: ObjectAgentConfig,
    ) -> ObjrepResult<ObjectAgent> {
        let jm = reader.manifest().clone();
        let journal = reader.store().clone();
        if jm.devices.len() > 1 {
            return Err(ObjrepError::Refused(format!(
                "journal {} is a group of {} devices; an object replica of a group is not \
                 built yet (replay it onto files: --replica NAME=PATH per device)",
                journal.describe(),
                jm.devices.len()
            )));
        }
        let size = jm.device_size(0).unwrap_or(0);
        let store = replica.describe();
        let identity = match manifest::load_identity(replica.as_ref()).await? {
            Some(id) => {
                if id.journal_uuid != jm.uuid {
                    return Err(ObjrepError::Foreign {
                        store,
                        reason: format!(
                            "belongs to journal {}, not to {} ({})",
                            id.journal_uuid,
                            jm.uuid,
                            journal.describe()
                        ),
                    });
                }
                if id.consumer != config.name {
                    return Err(ObjrepError::Foreign {
                        store,
                        reason: format!(
                            "is kept by consumer {}; run with --name {}",
                            id.consumer, id.consumer
                        ),
                    });
                }
                id
            }
            None => {
                // A new replica starts blank at the journal's start: the journal must still
                // hold it, and the name must be free (or ours from a start that died
                // before the identity was written).
                match consumer::load(journal.as_ref(), &config.name).await {
                    Ok(pos) if pos.replica == store && pos.applied_lsn == 0 => {}
                    Ok(pos) => {
                        return Err(ObjrepError::Refused(format!(
                            "consumer {} already exists in journal {} (its replica: {}); \
                             choose another --name for the new object replica {store}",
                            config.name,
                            journal.describe(),
                            pos.replica
                        )))
                    }
                    Err(JournalError::UnknownConsumer { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                let trim = consumer::load_trim_pointer(journal.as_ref()).await?;
                if trim.first_seq != 0 || trim.first_lsn > 1 {
                    return Err(ObjrepError::Refused(format!(
                        "journal {} was trimmed (first live LSN {}): a new object replica \
                         starts blank at the journal's start; seeding one from an image is \
                         not built yet",
                        journal.describe(),
                        trim.first_lsn
                    )));
                }
                ReplicaIdentity {
                    format_version: manifest::FORMAT_VERSION,
                    journal_uuid: jm.uuid,
                    consumer: config.name.clone(),
                    size,
                    block_size: jm.block_size,
                    created_ns: now_ns(),
                }
            }
        };
        let latest = manifest::load_latest(replica.as_ref()).await?;
        let (cursor, resuming, lsn, ts) = match latest.as_ref().and_then(|m| m.last()) {
            Some(cp) => (
                Cursor {
                    seq: cp.next_seq,
                    next_lsn: cp.lsn + 1,
                },
                true,
                cp.lsn,
                cp.timestamp_ns,
            ),
            None => (
                Cursor {
                    seq: 0,
                    next_lsn: 1,
                },
                false,
                0,
                0,
            ),
        };
        let chain = chain::load(journal.as_ref()).await?;
        let now = now_ns();
        // Registered before the identity is written: from here on trim keeps the records
        // this replica still needs.
        let initial = ConsumerState {
            name: config.name.clone(),
            next_seq: cursor.seq,
            applied_lsn: lsn,
            applied_timestamp_ns: ts,
            consistent_lsn: lsn,
            consistent_seq: cursor.seq,
            consistent_timestamp_ns: ts,
            delay_ns: 0,
            replica: store.clone(),
            registered_at_ns: now,
            updated_at_ns: now,
            undo: Default::default(),
            verify: Default::default(),
            seed: Seed::Blank,
            chain_epoch: chain.head_epoch(),
        };
        let pos = consumer::register(journal.as_ref(), &initial).await?;
        // A fork made while no agent ran (a `promote --at` below the checkpoint) is in the
        // chain already, so no new epoch would show it: the lineage the checkpoint was read
        // on (the position's chain epoch) must still hold every LSN up to it.
        if let Some(cp) = latest.as_ref().and_then(|m| m.last()) {
            let read_on = chain.lineage_to(pos.chain_epoch, cp.lsn);
            if let Some(lsn) = read_on.first_difference(&chain.lineage(), cp.lsn) {
                return Err(forked_below(chain.head_epoch(), lsn, &store, cp.lsn));
            }
        }
        let identity = manifest::create_identity(replica.as_ref(), &identity).await?;
        let manifest = latest.unwrap_or_else(ReplicaManifest::empty);
        Ok(ObjectAgent {
            layout: jm.layout(),
            reader,
            replica,
            identity,
            run: rand::random(),
            pending: Overlay::new(),
            pending_bytes: 0,
            spilled: Vec::new(),
            next_layer_first: lsn + 1,
            cursor,
            resuming,
            read_lsn: lsn,
            read_ts: ts,
            in_span: false,
            first_ts_after: None,
            lineage: chain.lineage(),
            epoch_seen: chain.head_epoch(),
            pos,
            last_checkpoint: Instant::now(),
            report: ObjectAgentReport {
                checkpoint_lsn: lsn,
                read_lsn: lsn,
                ..Default::default()
            },
            manifest,
            config,
        })
    }

    /// The newest committed manifest.
    pub fn manifest(&self) -> &ReplicaManifest {
        &self.manifest
    }

    /// Follows the journal until `shutdown` (or, with `once`, until it is read to its end),
    /// committing a last checkpoint on the way out when the point is consistent.
    pub async fn run(
        &mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> ObjrepResult<ObjectAgentReport> {
        let mut last_segment = Instant::now();
        loop {
            if *shutdown.borrow() {
                self.checkpoint().await?;
                return Ok(self.finish());
            }
            let step = if self.resuming {
                self.reader.step_resuming(&mut self.cursor).await?
            } else {
                self.reader.step(&mut self.cursor).await?
            };
            match step {
                Step::Segment(segment) => {
                    self.resuming = false;
                    self.take(segment).await?;
                    last_segment = Instant::now();
                    if self.last_checkpoint.elapsed() >= self.config.checkpoint_interval {
                        self.checkpoint().await?;
                    }
                }
                Step::NotYet => {
                    if self.config.once {
                        self.checkpoint().await?;
                        return Ok(self.finish());
                    }
                    let due = self
                        .config
                        .checkpoint_interval
                        .saturating_sub(self.last_checkpoint.elapsed());
                    if due.is_zero() {
                        self.checkpoint().await?;
                    }
                    self.commit_if_silent().await?;
                    let mut wait = if last_segment.elapsed() >= self.config.idle_after {
                        self.config.idle_poll
                    } else {
                        self.config.active_poll
                    };
                    if self.read_lsn > self.manifest.last().map_or(0, |c| c.lsn) && !due.is_zero() {
                        wait = wait.min(due);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        }
    }

    fn finish(&mut self) -> ObjectAgentReport {
        self.report.read_lsn = self.read_lsn;
        self.report.clone()
    }

    /// Folds a segment's records into the pending run.
    async fn take(&mut self, segment: DecodedSegment) -> ObjrepResult<()> {
        let key = self.reader.manifest().segment_key(segment.header.seq);
        if segment.header.epoch > self.epoch_seen {
            self.learn_chain(segment.header.epoch).await?;
        }
        for record in segment.records {
            let (lsn, ts) = (record.lsn, record.timestamp_ns);
            if self.lineage.contains(lsn) {
                let record = check_journal_record(&key, record, &self.layout, self.identity.size)?;
                match &record.op {
                    Op::ResyncBegin => self.in_span = true,
                    Op::ResyncEnd => self.in_span = false,
                    op if extent(op).is_some() => {
                        self.pending_bytes += op.payload_len().max(64) as u64;
                        self.pending.record(lsn, op);
                    }
                    _ => {}
                }
                self.report.records += 1;
            }
            self.read_lsn = lsn;
            self.read_ts = ts;
            self.first_ts_after.get_or_insert(ts);
            if self.pending_bytes >= self.config.layer_bytes {
                self.spill().await?;
            }
        }
        Ok(())
    }

    /// Reloads the chain after a segment of a new epoch: records off the new lineage are
    /// skipped from here on; a lineage that cuts what a checkpoint holds stops the agent.
    async fn learn_chain(&mut self, epoch: u64) -> ObjrepResult<()> {
        let chain = chain::load(self.reader.store().as_ref()).await?;
        let lineage = chain.lineage();
        if let Some(lsn) = self.lineage.first_difference(&lineage, self.read_lsn) {
            return Err(forked_below(
                epoch,
                lsn,
                &self.replica.describe(),
                self.read_lsn,
            ));
        }
        self.lineage = lineage;
        self.epoch_seen = epoch.max(chain.head_epoch());
        Ok(())
    }

    /// Uploads the pending run as a layer (durable, named by no manifest yet).
    async fn spill(&mut self) -> ObjrepResult<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let (first, last) = (self.next_layer_first, self.read_lsn);
        let key = paths::layer_key(self.manifest.gen + 1, first, last, self.run);
        let bytes = layer::encode(
            self.identity.journal_uuid,
            first,
            last,
            &self.pending,
            self.config.seal_with.as_ref(),
        );
        let size = bytes.len() as u64;
        self.replica.put_if_absent(&key, bytes).await?;
        self.spilled.push(LayerRef {
            key,
            first_lsn: first,
            last_lsn: last,
            size,
        });
        self.report.layers += 1;
        self.report.layer_bytes += size;
        self.pending = Overlay::new();
        self.pending_bytes = 0;
        self.next_layer_first = last + 1;
        Ok(())
    }

    /// Commits a checkpoint at the last LSN read, if it is new and outside a resync span:
    /// the pending layer, then the manifest, then the consumer position.
    async fn checkpoint(&mut self) -> ObjrepResult<()> {
        let last = self.manifest.last().map_or(0, |c| c.lsn);
        if self.in_span || self.read_lsn <= last {
            return Ok(());
        }
        self.spill().await?;
        let spilled = std::mem::take(&mut self.spilled);
        let mine = self.manifest.last().map(|c| c.lsn);
        let run = format!("{:016x}", self.run);
        let checkpoint = Checkpoint {
            lsn: self.read_lsn,
            timestamp_ns: self.read_ts,
            next_seq: self.cursor.seq,
            layers: 0,
            next_timestamp_ns: None,
        };
        let first_ts_after = self.first_ts_after;
        let store = self.replica.describe();
        // A compaction or a trim may have committed since our last checkpoint: their
        // generation keeps our newest checkpoint, and ours is appended to it. A generation
        // whose newest checkpoint is not ours is a second agent's.
        let next =
            manifest::commit_change(self.replica.as_ref(), self.manifest.clone(), |newest| {
                if newest.last().map(|c| c.lsn) != mine {
                    return Err(ObjrepError::Raced {
                        store: store.clone(),
                        gen: newest.gen,
                    });
                }
                let mut next = newest.clone();
                next.run = run.clone();
                next.layers.extend(spilled.iter().cloned());
                if let Some(previous) = next.checkpoints.last_mut() {
                    previous.next_timestamp_ns = first_ts_after;
                }
                next.checkpoints.push(Checkpoint {
                    layers: next.layers.len(),
                    ..checkpoint.clone()
                });
                Ok(Some(next))
            })
            .await?
            .expect("the agent's change always commits");
        self.manifest = next;
        self.first_ts_after = None;
        self.next_layer_first = self.read_lsn + 1;
        self.last_checkpoint = Instant::now();
        self.report.checkpoints += 1;
        self.report.checkpoint_lsn = self.read_lsn;
        let pos = &mut self.pos;
        pos.next_seq = self.cursor.seq;
        pos.consistent_seq = self.cursor.seq;
        pos.applied_lsn = self.read_lsn;
        pos.consistent_lsn = self.read_lsn;
        pos.applied_timestamp_ns = self.read_ts;
        pos.consistent_timestamp_ns = self.read_ts;
        pos.chain_epoch = self.epoch_seen;
        self.commit_position().await?;
        Ok(())
    }

    async fn commit_position(&mut self) -> ObjrepResult<()> {
        self.pos.updated_at_ns = now_ns();
        consumer::commit(self.reader.store().as_ref(), &self.pos).await?;
        Ok(())
    }

    /// Commits the unchanged position when the last commit is older than `idle_commit`.
    async fn commit_if_silent(&mut self) -> ObjrepResult<()> {
        let silent = now_ns().saturating_sub(self.pos.updated_at_ns);
        if silent >= self.config.idle_commit.as_nanos() as u64 {
            self.commit_position().await?;
        }
        Ok(())
    }
}
