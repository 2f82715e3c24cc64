//! What `tinylag journal info` reports: the manifest, the head, the live bytes and every
//! consumer's lag. Gathered here so the CLI, `up` and tests share one definition.
//!
//! Must never: read segment bodies. It lists the live segments (bounded by trim) and reads
//! one index, and lists the epoch chain (one object per writer start) and the branches.

use std::collections::BTreeMap;

use serde::Serialize;

use super::chain::{self, ChainReport};
use super::consumer::{self, ConsumerState, TrimPointer};
use super::epoch;
use super::error::JournalResult;
use super::head::{prefix_index, probe_end};
use super::manifest::Manifest;
use super::paths;
use super::segment::{read_index, Expected};
use crate::store::{list_all, ObjectStore};

/// The end of the journal.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct HeadInfo {
    /// The seq the writer writes next.
    pub next_seq: u64,
    /// Last LSN written (0 when the journal is empty).
    pub last_lsn: u64,
    /// Timestamp of the last record, ns since the epoch (0 when empty).
    pub last_timestamp_ns: u64,
}

/// One consumer and how far behind the head it is.
#[derive(Clone, Debug, Serialize)]
pub struct ConsumerLag {
    #[serde(flatten)]
    pub state: ConsumerState,
    pub lag_records: u64,
    pub lag_bytes: u64,
    /// Head timestamp minus the consumer's applied timestamp, in seconds: the span of write
    /// time the consumer has not applied.
    pub lag_seconds: f64,
    /// When the oldest record the consumer has not applied was written (`None` when it is
    /// caught up): "behind since" is now minus this.
    pub oldest_unapplied_ns: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct JournalInfo {
    pub journal: String,
    pub manifest: Manifest,
    pub writer_epoch: Option<u64>,
    pub trim: TrimPointer,
    pub head: HeadInfo,
    /// Live segments (trim pointer to head) and their bytes.
    pub segments: u64,
    pub bytes: u64,
    pub consumers: Vec<ConsumerLag>,
    /// The epoch chain (who wrote which epoch, why, from where) and the branches.
    pub chain: ChainReport,
    /// The id of the key that sealed the head segment (never the key); absent for a
    /// plaintext journal (DESIGN.md "Encryption at rest"). A journal whose head was sealed
    /// with a key this process lacks fails before this, naming the key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_key: Option<String>,
}

/// Gathers [`JournalInfo`]: O(log n) probes for the head, one listing of the live segments.
pub async fn gather(store: &dyn ObjectStore, manifest: &Manifest) -> JournalResult<JournalInfo> {
    let trim = consumer::load_trim_pointer(store).await?;
    let next_seq = probe_end(store, manifest, trim.first_seq).await?;
    let mut encryption_key = None;
    let head = if next_seq > trim.first_seq {
        let index = prefix_index(store, manifest, next_seq - 1).await?;
        encryption_key = index.sealed_with.map(|id| id.to_string());
        HeadInfo {
            next_seq,
            last_lsn: index.header.end_lsn().saturating_sub(1),
            last_timestamp_ns: index.last_timestamp().unwrap_or(0),
        }
    } else {
        HeadInfo {
            next_seq,
            last_lsn: trim.first_lsn.saturating_sub(1),
            last_timestamp_ns: 0,
        }
    };
    let mut sizes = BTreeMap::new();
    for meta in list_all(store, paths::JOURNAL_PREFIX).await? {
        if let Some(seq) = paths::parse_segment_key(&meta.key, manifest.splay_width) {
            if seq >= trim.first_seq {
                sizes.insert(seq, meta.size);
            }
        }
    }
    let mut consumers = Vec::new();
    for state in consumer::list(store).await? {
        let oldest_unapplied_ns = if head.last_lsn > state.applied_lsn {
            oldest_unapplied(store, manifest, &state).await?
        } else {
            None
        };
        consumers.push({
            let lag_bytes = sizes.range(state.next_seq..).map(|(_, s)| s).sum();
            let lag_records = head.last_lsn.saturating_sub(state.applied_lsn);
            let lag_seconds = if lag_records == 0 {
                0.0
            } else {
                head.last_timestamp_ns
                    .saturating_sub(state.applied_timestamp_ns) as f64
                    / 1e9
            };
            ConsumerLag {
                state,
                lag_records,
                lag_bytes,
                lag_seconds,
                oldest_unapplied_ns,
            }
        });
    }
    Ok(JournalInfo {
        journal: store.describe(),
        manifest: manifest.clone(),
        writer_epoch: epoch::current_epoch(store).await?,
        trim,
        segments: sizes.len() as u64,
        bytes: sizes.values().sum(),
        chain: chain::report(store, head.last_lsn).await?,
        head,
        consumers,
        encryption_key,
    })
}

/// Timestamp of the first record after the consumer's applied LSN: one index read of its next
/// segment, following plugs and empty segments a few steps. `None` when not found.
async fn oldest_unapplied(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    state: &ConsumerState,
) -> JournalResult<Option<u64>> {
    let mut seq = state.next_seq;
    for _ in 0..8 {
        let key = manifest.segment_key(seq);
        let expected = Expected {
            uuid: manifest.uuid,
            seq,
            first_lsn: None,
        };
        let index = match read_index(store, &key, &expected).await {
            Ok(index) => index,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if let Some(e) = index.entries.iter().find(|e| e.lsn > state.applied_lsn) {
            return Ok(Some(e.timestamp_ns));
        }
        seq = index.header.next_seq;
    }
    Ok(None)
}
