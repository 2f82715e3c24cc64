//! Opening an agent: registering (or finding) the consumer, refusing a replica nothing
//! vouches for or a journal trimmed past where it would start, and opening the undo log.
//!
//! Must never: register a consumer it is about to refuse (a registration holds trim back);
//! adopt an existing image without a [`SeedChoice`] that vouches for it.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::clock::Clock;
use crate::journal::chain;
use crate::journal::consumer::{self, ConsumerState, Seed, UndoPosition};
use crate::journal::reader::JournalReader;
use crate::journal::JournalError;
use crate::store::ObjectStore;

use super::{Agent, AgentConfig};
use crate::replayer::apply::ApplyError;
use crate::replayer::error::ReplayError;
use crate::replayer::replica::ReplicaTarget;
use crate::replayer::seed::{SeedChoice, SeedStamp};
use crate::replayer::status::{AgentIdentity, StatusBoard};
use crate::replayer::timing::Timer;
use crate::replayer::undo::{UndoLog, UndoManifest, UNDO_FORMAT_VERSION};

impl Agent {
    /// Registers (or finds) the consumer, checks it belongs to this replica, and opens the
    /// undo log (`undo_store`; `None` runs without one). `replica_created` says the replica
    /// file was created just now (blank).
    pub async fn open(
        reader: JournalReader,
        undo_store: Option<Arc<dyn ObjectStore>>,
        replica: Arc<dyn ReplicaTarget>,
        replica_created: bool,
        config: AgentConfig,
        clock: Arc<dyn Clock>,
        timer: Arc<dyn Timer>,
    ) -> Result<Agent, ReplayError> {
        let store = reader.store().clone();
        let manifest = reader.manifest().clone();
        let journal = store.describe();
        let now = clock.now_ns();
        let trim = consumer::load_trim_pointer(store.as_ref()).await?;
        // The chain as it stands: a new consumer follows its head from the start.
        let chain = chain::load(store.as_ref()).await?;
        let initial = ConsumerState {
            name: config.name.clone(),
            next_seq: trim.first_seq,
            applied_lsn: trim.first_lsn.saturating_sub(1),
            applied_timestamp_ns: 0,
            consistent_lsn: trim.first_lsn.saturating_sub(1),
            consistent_seq: trim.first_seq,
            consistent_timestamp_ns: 0,
            delay_ns: config.delay.as_nanos() as u64,
            replica: config.replica.clone(),
            registered_at_ns: now,
            updated_at_ns: now,
            undo: UndoPosition::default(),
            verify: Default::default(),
            seed: Seed::Blank,
            chain_epoch: chain.head_epoch(),
        };
        // Refuse before registering: a new consumer on a trimmed journal would hold trim back
        // for a replica that can never be built.
        let existing = match consumer::load(store.as_ref(), &config.name).await {
            Ok(state) => Some(state),
            Err(JournalError::UnknownConsumer { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if existing.is_none() && replica_created && trim.first_lsn > 1 {
            return Err(ReplayError::JournalTrimmed {
                journal,
                first_lsn: trim.first_lsn,
            });
        }
        // A new consumer on an image it did not create adopts it only if something vouches
        // for it (see `crate::journal::seed`); also refused before registering.
        let initial = match (&existing, replica_created) {
            (None, false) => adopt(&reader, replica.as_ref(), &config, initial, trim).await?,
            _ => initial,
        };
        let mut pos = consumer::register(store.as_ref(), &initial).await?;
        let is_new = pos == initial;
        // A `journal trim` that listed the consumers before this registration may have moved
        // the pointer past where it starts (and be deleting those segments): start over.
        if is_new && consumer::load_trim_pointer(store.as_ref()).await? != trim {
            consumer::unregister(store.as_ref(), &config.name).await?;
            return Err(ReplayError::TrimmedWhileRegistering {
                journal,
                name: config.name.clone(),
            });
        }
        if pos.replica != config.replica {
            return Err(ReplayError::ConsumerOfOtherReplica {
                name: config.name.clone(),
                journal,
                registered: pos.replica.clone(),
                requested: config.replica.clone(),
            });
        }
        if replica_created && pos.applied_lsn > trim.first_lsn.saturating_sub(1) {
            return Err(ReplayError::ReplicaLost {
                replica: config.replica.clone(),
                name: config.name.clone(),
                applied_lsn: pos.applied_lsn,
            });
        }
        if is_new && !replica_created {
            match &pos.seed {
                Seed::Assumed { .. } => tracing::warn!(
                    consumer = %config.name,
                    replica = %config.replica,
                    "new consumer adopts an existing replica on the operator's word (--assume-seeded): nothing checks it holds the primary's state at LSN {}",
                    pos.applied_lsn
                ),
                seed => tracing::info!(
                    consumer = %config.name,
                    replica = %config.replica,
                    "new consumer adopts an existing replica at LSN {}: {seed}",
                    pos.applied_lsn
                ),
            }
            if matches!(config.seed, SeedChoice::Stamp(_)) {
                // Adopted: from here the agent changes the image, and the position says how
                // it was seeded.
                if let Some(path) = seed_stamp_image(&config.replica) {
                    SeedStamp::remove(&path);
                }
            }
        }
        pos.delay_ns = config.delay.as_nanos() as u64;
        let device_size = manifest.layout().span();
        let undo = match undo_store {
            None => None,
            Some(undo_store) => {
                let expected = UndoManifest {
                    format_version: UNDO_FORMAT_VERSION,
                    journal_uuid: manifest.uuid,
                    consumer: config.name.clone(),
                    replica: config.replica.clone(),
                    device_size,
                    created_ns: now,
                };
                let log = UndoLog::open_or_create(undo_store, &expected).await?;
                if is_new {
                    // An `undo trim` moves the log's start: count from its pointer.
                    let from = consumer::load_trim_pointer(log.store().as_ref())
                        .await?
                        .first_seq;
                    let segments = log.end_from(from).await? - from;
                    if segments > 0 {
                        return Err(ReplayError::StaleUndoLog {
                            undo: log.describe(),
                            name: config.name.clone(),
                            segments,
                        });
                    }
                }
                Some(log)
            }
        };
        let identity = AgentIdentity {
            name: config.name.clone(),
            journal,
            replica: config.replica.clone(),
            undo: undo.as_ref().map(|u| u.describe()),
            delay_ns: pos.delay_ns,
        };
        let board = Arc::new(StatusBoard::new(identity, reader.clone(), clock.clone()));
        board.committed(&pos, 0, 0);
        let lineage = chain.lineage_to(pos.chain_epoch, u64::MAX);
        Ok(Agent {
            reader,
            undo,
            replica,
            clock,
            timer,
            config,
            board,
            pos,
            dirty: false,
            unsynced: false,
            applying: None,
            finishing: None,
            recovered: false,
            pending: VecDeque::new(),
            deferred: None,
            journal_stopped: false,
            lineage,
            chain,
        })
    }
}

/// The image path a seed stamp sits beside, for a replica shown as a file path.
pub(super) fn seed_stamp_image(replica: &str) -> Option<std::path::PathBuf> {
    let path = std::path::PathBuf::from(replica);
    path.is_absolute().then_some(path)
}

/// The initial position of a new consumer on an existing image, as `config.seed` vouches for
/// it, or the refusal naming the choices. `initial` starts at the journal's start (`trim`).
pub(super) async fn adopt(
    reader: &JournalReader,
    replica: &dyn ReplicaTarget,
    config: &AgentConfig,
    mut initial: ConsumerState,
    trim: consumer::TrimPointer,
) -> Result<ConsumerState, ReplayError> {
    let journal = reader.store().describe();
    let manifest = reader.manifest();
    // A file without any data is the blank device, as the agent creates it (an agent killed
    // after creating its replica and before registering leaves one behind).
    let blank = || {
        replica
            .is_hole(0, replica.size())
            .map_err(|source| ApplyError::Io {
                replica: replica.describe(),
                what: "look for data in the replica",
                lsn: 0,
                source,
            })
    };
    match &config.seed {
        SeedChoice::Refuse if blank()? => {
            if trim.first_lsn > 1 {
                return Err(ReplayError::JournalTrimmed {
                    journal,
                    first_lsn: trim.first_lsn,
                });
            }
            Ok(initial)
        }
        SeedChoice::BrokenStamp(reason) => Err(ReplayError::BrokenStamp {
            reason: reason.clone(),
        }),
        SeedChoice::Refuse => Err(ReplayError::UnvouchedReplica {
            replica: config.replica.clone(),
            journal,
            name: config.name.clone(),
            lsn: initial.applied_lsn,
        }),
        SeedChoice::Assume => {
            initial.seed = Seed::Assumed {
                lsn: initial.applied_lsn,
            };
            Ok(initial)
        }
        SeedChoice::Check => {
            let regions = manifest
                .device_size(0)
                .unwrap_or(0)
                .div_ceil(manifest.region_size.max(1));
            initial.seed = Seed::checking(initial.applied_lsn, regions);
            Ok(initial)
        }
        SeedChoice::Stamp(stamp) => {
            if stamp.journal_uuid != manifest.uuid {
                return Err(ReplayError::StampOfOtherJournal {
                    replica: config.replica.clone(),
                    journal,
                    found: stamp.journal_uuid,
                    expected: manifest.uuid,
                });
            }
            let gone = || ReplayError::StampPointGone {
                replica: config.replica.clone(),
                journal: journal.clone(),
                lsn: stamp.lsn,
                seq: stamp.seq,
                first_lsn: trim.first_lsn,
            };
            if stamp.lsn + 1 < trim.first_lsn {
                return Err(gone());
            }
            // The segment holding the stamp's LSN (a consumer may start inside it); at the
            // journal's very start, the first live segment.
            let seq = if stamp.lsn + 1 == trim.first_lsn {
                trim.first_seq
            } else {
                let index = reader.index(stamp.seq).await?.ok_or_else(gone)?;
                let holds = index.header.first_lsn <= stamp.lsn
                    && index.entries.last().is_some_and(|e| e.lsn >= stamp.lsn);
                if !holds || stamp.seq < trim.first_seq {
                    return Err(gone());
                }
                stamp.seq
            };
            initial.next_seq = seq;
            initial.applied_lsn = stamp.lsn;
            initial.applied_timestamp_ns = stamp.timestamp_ns;
            initial.consistent_lsn = stamp.lsn;
            initial.consistent_seq = seq;
            initial.consistent_timestamp_ns = stamp.timestamp_ns;
            initial.seed = Seed::Restore {
                lsn: stamp.lsn,
                epoch: stamp.epoch,
            };
            Ok(initial)
        }
    }
}
