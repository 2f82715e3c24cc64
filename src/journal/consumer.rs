//! Consumers: registered readers of a journal and their commit positions
//! (`consumers/<name>`), and the trim pointer (`trim`), the first live segment.
//!
//! Must never: move a commit position past what the consumer made durable, or let trim
//! believe a consumer is further than it is. Each consumer writes only its own key.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use super::seed::Seed;

use super::error::{JournalError, JournalResult};
use super::paths;
use crate::store::{list_all, ObjectStore};

/// A consumer's commit position and what `journal info` shows of it (JSON).
///
/// # Invariants
/// - Every record with LSN `<= applied_lsn` is applied and durable on the replica.
/// - `next_seq` is the segment holding LSN `applied_lsn + 1` (or the next segment to be
///   written).
/// - `consistent_lsn <= applied_lsn`; they differ only inside an unfinished resync span
///   (`RESYNC_BEGIN` applied, its `RESYNC_END` not yet), where `consistent_lsn` stays at
///   `RESYNC_BEGIN - 1`.
/// - `consistent_seq <= next_seq` is the segment holding `consistent_lsn + 1`: a replay agent
///   that restarts inside a span undoes it and reads again from there. **Trim keeps
///   [`trim_floor`](Self::trim_floor) and everything after it**, never only `next_seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    pub name: String,
    pub next_seq: u64,
    /// Last applied LSN; 0 before the first record (LSNs start at 1).
    pub applied_lsn: u64,
    /// Timestamp of the record at `applied_lsn` (0 before the first).
    pub applied_timestamp_ns: u64,
    /// Last LSN at which the replica equalled the primary (outside any resync span).
    pub consistent_lsn: u64,
    /// Segment holding `consistent_lsn + 1` (see the invariants). 0 in positions written
    /// before this field existed, which makes trim keep everything: safe.
    #[serde(default)]
    pub consistent_seq: u64,
    /// Timestamp of the record at `consistent_lsn` (0 before the first).
    #[serde(default)]
    pub consistent_timestamp_ns: u64,
    /// The consumer's replay delay.
    pub delay_ns: u64,
    /// Where the replica lives (for operators; not interpreted).
    #[serde(default)]
    pub replica: String,
    pub registered_at_ns: u64,
    pub updated_at_ns: u64,
    /// Where the consumer's undo log stands (replay agents that keep one).
    #[serde(default)]
    pub undo: UndoPosition,
    /// What the consumer's `VERIFY` comparisons found (shown by `journal info`).
    #[serde(default)]
    pub verify: VerifyTally,
    /// Who vouches that the replica held the journal's state where this consumer started
    /// (committed with the position: a check's progress never runs ahead of it).
    #[serde(default)]
    pub seed: Seed,
    /// The epoch chain the applied records follow: the replica holds the records of
    /// `Chain::lineage_to(chain_epoch, ..)` up to `applied_lsn` (records off that lineage
    /// were read and skipped). 0 (positions written before the chain existed): every record.
    /// A reader that learns of a later epoch whose fork cuts records it applied winds the
    /// replica back (see `crate::replayer::recovery::wind_back`).
    #[serde(default)]
    pub chain_epoch: u64,
}

impl ConsumerState {
    /// The first segment trim must keep for this consumer.
    pub fn trim_floor(&self) -> u64 {
        self.consistent_seq.min(self.next_seq)
    }
}

/// A replay agent's undo-log position, committed together with its journal position so the
/// two never disagree after a crash.
///
/// # Invariants
/// - Undo segments `consistent_seq..next_seq` hold the pre-images of the records after
///   `consistent_lsn` up to `applied_lsn` (none outside a resync span); segments at and
///   after `next_seq` that exist were written after the last commit and are undone by
///   crash recovery.
/// - `bytes` and `segments` count the undo segments below `next_seq` still in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoPosition {
    /// The undo segment the agent writes next.
    pub next_seq: u64,
    /// The first undo segment holding a pre-image of a record after `consistent_lsn`.
    pub consistent_seq: u64,
    /// Stored bytes of the undo log.
    pub bytes: u64,
    /// Undo segments in the log.
    pub segments: u64,
}

/// A replay agent's tally of `VERIFY` records: each compares the replica's region with the
/// primary's checksum at the same point of the order.
///
/// # Invariants
/// - `checked + skipped` counts every `VERIFY` applied; `mismatches` counts the checks that
///   failed, ever.
/// - `mismatched` holds the regions whose *latest* check failed (a later matching check of
///   the same range removes it), oldest first, at most [`VerifyTally::MAX_LISTED`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyTally {
    pub checked: u64,
    pub mismatches: u64,
    /// `VERIFY` records applied inside an unfinished resync span, where the replica is not
    /// expected to match and nothing is compared.
    pub skipped: u64,
    /// LSN of the last `VERIFY` applied (0: none yet).
    pub last_lsn: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatched: Vec<VerifyMismatch>,
}

/// A region whose replica bytes did not match the primary's checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyMismatch {
    /// LSN and timestamp of the `VERIFY` record.
    pub lsn: u64,
    pub timestamp_ns: u64,
    pub offset: u64,
    pub len: u64,
}

impl VerifyTally {
    /// Regions listed in `mismatched` at most; older ones fall off (the count stays).
    pub const MAX_LISTED: usize = 64;

    /// Records the outcome of one `VERIFY`: `Some(matched)`, or `None` when skipped.
    pub fn record(
        &mut self,
        lsn: u64,
        timestamp_ns: u64,
        offset: u64,
        len: u64,
        matched: Option<bool>,
    ) {
        self.last_lsn = lsn;
        let Some(matched) = matched else {
            self.skipped += 1;
            return;
        };
        self.checked += 1;
        self.mismatched
            .retain(|m| !(m.offset == offset && m.len == len));
        if !matched {
            self.mismatches += 1;
            if self.mismatched.len() == Self::MAX_LISTED {
                self.mismatched.remove(0);
            }
            self.mismatched.push(VerifyMismatch {
                lsn,
                timestamp_ns,
                offset,
                len,
            });
        }
    }
}

/// The first live segment and the first LSN in it (JSON in `trim`). Absent means nothing
/// was trimmed yet: seq 0, LSN 1. An undo log keeps one too (`trim` in its own root: its
/// first live undo seq and that segment's first journal LSN).
///
/// # Invariants
/// - Segment `first_seq` exists (trim always keeps the newest segment) or no segment was
///   ever written; every seq below it may be gone, or still being deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrimPointer {
    pub first_seq: u64,
    pub first_lsn: u64,
}

impl Default for TrimPointer {
    fn default() -> Self {
        TrimPointer {
            first_seq: 0,
            first_lsn: 1,
        }
    }
}

fn check_name(name: &str) -> JournalResult<()> {
    if paths::valid_consumer_name(name) {
        Ok(())
    } else {
        Err(JournalError::InvalidConsumerName(name.to_string()))
    }
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    store: &dyn ObjectStore,
    key: &str,
    what: &'static str,
    data: &[u8],
) -> JournalResult<T> {
    serde_json::from_slice(data).map_err(|e| JournalError::Malformed {
        journal: store.describe(),
        key: key.to_string(),
        what,
        reason: e.to_string(),
    })
}

/// Registers `initial.name` with `initial` as its position, or returns the position it
/// already has (a restarted agent continues where it was).
pub async fn register(
    store: &dyn ObjectStore,
    initial: &ConsumerState,
) -> JournalResult<ConsumerState> {
    check_name(&initial.name)?;
    let key = paths::consumer_key(&initial.name);
    let body = serde_json::to_vec_pretty(initial).expect("consumer state serializes");
    match store.put_if_absent(&key, Bytes::from(body)).await {
        Ok(()) => Ok(initial.clone()),
        Err(e) if e.is_already_exists() => load(store, &initial.name).await,
        Err(e) => Err(e.into()),
    }
}

/// Reads one consumer's position.
pub async fn load(store: &dyn ObjectStore, name: &str) -> JournalResult<ConsumerState> {
    check_name(name)?;
    let key = paths::consumer_key(name);
    let data = match store.get(&key).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            return Err(JournalError::UnknownConsumer {
                journal: store.describe(),
                name: name.to_string(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    decode(store, &key, "consumer position", &data)
}

/// Moves a consumer's commit position (the consumer's own key only).
pub async fn commit(store: &dyn ObjectStore, state: &ConsumerState) -> JournalResult<()> {
    check_name(&state.name)?;
    let body = serde_json::to_vec_pretty(state).expect("consumer state serializes");
    store
        .put(&paths::consumer_key(&state.name), Bytes::from(body))
        .await?;
    Ok(())
}

/// Every registered consumer, by name.
pub async fn list(store: &dyn ObjectStore) -> JournalResult<Vec<ConsumerState>> {
    let mut out = Vec::new();
    for meta in list_all(store, paths::CONSUMERS_PREFIX).await? {
        let Some(name) = paths::parse_consumer_key(&meta.key) else {
            continue;
        };
        match load(store, name).await {
            Ok(state) => out.push(state),
            // Unregistered between the listing and the read.
            Err(JournalError::UnknownConsumer { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes a consumer, so it no longer holds trim back.
pub async fn unregister(store: &dyn ObjectStore, name: &str) -> JournalResult<()> {
    check_name(name)?;
    load(store, name).await?;
    store.delete_many(&[paths::consumer_key(name)]).await?;
    Ok(())
}

/// Reads the trim pointer (the default when nothing was trimmed).
pub async fn load_trim_pointer(store: &dyn ObjectStore) -> JournalResult<TrimPointer> {
    match store.get(paths::TRIM_POINTER).await {
        Ok(data) => decode(store, paths::TRIM_POINTER, "trim pointer", &data),
        Err(e) if e.is_not_found() => Ok(TrimPointer::default()),
        Err(e) => Err(e.into()),
    }
}

/// Moves the trim pointer (trim only). Trim moves it *before* it deletes the segments below
/// it, so it never names a deleted seq (the order is documented in `crate::trim`).
pub async fn store_trim_pointer(
    store: &dyn ObjectStore,
    pointer: &TrimPointer,
) -> JournalResult<()> {
    let body = serde_json::to_vec(pointer).expect("trim pointer serializes");
    store.put(paths::TRIM_POINTER, Bytes::from(body)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn state(name: &str, lsn: u64) -> ConsumerState {
        ConsumerState {
            name: name.into(),
            next_seq: 0,
            applied_lsn: lsn,
            applied_timestamp_ns: 0,
            consistent_lsn: lsn,
            consistent_seq: 0,
            consistent_timestamp_ns: 0,
            delay_ns: 0,
            replica: "/r".into(),
            registered_at_ns: 1,
            updated_at_ns: 1,
            undo: UndoPosition::default(),
            verify: VerifyTally::default(),
            seed: Default::default(),
            chain_epoch: 0,
        }
    }

    #[tokio::test]
    async fn register_commit_list_unregister() {
        let store = MemoryStore::new();
        assert_eq!(
            register(&store, &state("a", 0)).await.unwrap().applied_lsn,
            0
        );
        commit(&store, &state("a", 42)).await.unwrap();
        // Registering again keeps the committed position.
        assert_eq!(
            register(&store, &state("a", 0)).await.unwrap().applied_lsn,
            42
        );
        register(&store, &state("b", 0)).await.unwrap();
        let names: Vec<_> = list(&store)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        unregister(&store, "a").await.unwrap();
        assert!(matches!(
            load(&store, "a").await,
            Err(JournalError::UnknownConsumer { .. })
        ));
        assert!(matches!(
            unregister(&store, "a").await,
            Err(JournalError::UnknownConsumer { .. })
        ));
    }

    #[test]
    fn positions_written_before_the_replay_fields_still_load() {
        let old = br#"{"name":"a","next_seq":5,"applied_lsn":9,"applied_timestamp_ns":1,
            "consistent_lsn":9,"delay_ns":0,"registered_at_ns":1,"updated_at_ns":1}"#;
        let state: ConsumerState = serde_json::from_slice(old).unwrap();
        assert_eq!(state.undo, UndoPosition::default());
        assert_eq!(
            state.trim_floor(),
            0,
            "an unknown consistent seq keeps everything"
        );
    }

    #[tokio::test]
    async fn bad_names_and_garbage_are_refused() {
        let store = MemoryStore::new();
        assert!(matches!(
            register(&store, &state("../x", 0)).await,
            Err(JournalError::InvalidConsumerName(_))
        ));
        store
            .put("consumers/c", Bytes::from_static(b"nope"))
            .await
            .unwrap();
        assert!(matches!(
            load(&store, "c").await,
            Err(JournalError::Malformed { .. })
        ));
    }

    #[tokio::test]
    async fn trim_pointer_defaults_and_moves() {
        let store = MemoryStore::new();
        assert_eq!(
            load_trim_pointer(&store).await.unwrap(),
            TrimPointer::default()
        );
        let p = TrimPointer {
            first_seq: 7,
            first_lsn: 900,
        };
        store_trim_pointer(&store, &p).await.unwrap();
        assert_eq!(load_trim_pointer(&store).await.unwrap(), p);
    }
}
