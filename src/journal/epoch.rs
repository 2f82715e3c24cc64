//! Writer epochs: which writer owns the journal. A writer claims the next epoch with a
//! conditional create of `epochs/<epoch:020>`; the highest claim is the owner, and a writer
//! that sees a higher claim than its own is fenced.
//!
//! Must never: let two writers believe they own the journal at once. A claim that loses a
//! race is an error, never a silent retry at a higher number (that would fence the winner).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::{JournalError, JournalResult};
use super::paths;
use crate::store::{list_all, ObjectStore};

/// The body of an epoch claim (JSON). `claim_id` makes every claim's bytes unique, which the
/// retrying store relies on to recognise its own earlier successful create.
///
/// A claim says who fenced whom and why; where the epoch's records begin and which prefix
/// of its predecessor they continue is in the epoch's chain entry
/// ([`super::chain::ChainEntry`]), written once the writer has planned. `reason`, `owner`
/// and `fork` were added after format version 1 shipped: an older claim reads as
/// `start` by an unnamed owner, without a fork.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochClaim {
    pub epoch: u64,
    pub claim_id: Uuid,
    pub host: String,
    pub pid: u32,
    pub claimed_at_ns: u64,
    /// Why this writer began.
    #[serde(default)]
    pub reason: EpochReason,
    /// Who owns the epoch: the site's name (`promote --name`), or empty for a plain `serve`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// Only for `promote --at`: the fork the claim commits to before anything is planned,
    /// so that the records of `fork.epoch` after `fork.lsn` are a branch from this claim on,
    /// whatever the writer does next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<Predecessor>,
}

/// Why a writer epoch began (shown by `journal info` and `timeline`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EpochReason {
    /// `serve` on a journal whose previous writer is gone or stopped (or a new journal).
    #[default]
    Start,
    /// `serve --takeover`: the previous writer's lease was live; it is fenced.
    Takeover,
    /// `promote` after the previous owner's `demote`: nothing is lost, nothing resynced.
    Promote,
    /// `promote --force`: the previous owner is gone (or fenced); what it never uploaded
    /// is lost to this chain and comes back only as its divergence at `rejoin`.
    PromoteForce,
    /// `promote --at`/`--mark`: a past point; the previous owner's later records are a branch.
    PromoteAt,
}

impl EpochReason {
    /// The name `journal info`, `timeline` and the claim's JSON use.
    pub fn name(self) -> &'static str {
        match self {
            EpochReason::Start => "start",
            EpochReason::Takeover => "takeover",
            EpochReason::Promote => "promote",
            EpochReason::PromoteForce => "promote --force",
            EpochReason::PromoteAt => "promote --at",
        }
    }
}

/// An epoch's predecessor: the epoch it continues and the last LSN of it that the new
/// owner's image contains (Ceph's `TagPredecessor`). Records of that epoch past `lsn` are
/// not on the new chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Predecessor {
    pub epoch: u64,
    pub lsn: u64,
}

/// What a claimer says about itself (everything of an [`EpochClaim`] but the numbers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimBasis {
    pub reason: EpochReason,
    pub owner: String,
    pub fork: Option<Predecessor>,
}

/// The highest epoch claimed so far, if any. Lists `epochs/`, which holds one object per
/// writer start and stays small.
pub async fn current_epoch(store: &dyn ObjectStore) -> JournalResult<Option<u64>> {
    let objects = list_all(store, paths::EPOCHS_PREFIX).await?;
    Ok(objects
        .iter()
        .filter_map(|o| paths::parse_epoch_key(&o.key))
        .max())
}

/// Claims the epoch after the current highest. Exactly one of several concurrent claimers
/// succeeds; the others get [`JournalError::EpochContended`].
pub async fn claim_next(store: &dyn ObjectStore, now_ns: u64) -> JournalResult<EpochClaim> {
    claim_next_as(store, now_ns, ClaimBasis::default()).await
}

/// [`claim_next`] with a reason, an owner and (for `promote --at`) a fork.
pub async fn claim_next_as(
    store: &dyn ObjectStore,
    now_ns: u64,
    basis: ClaimBasis,
) -> JournalResult<EpochClaim> {
    let epoch = current_epoch(store).await?.map_or(1, |e| e + 1);
    claim_exact(store, epoch, now_ns, basis).await
}

/// Claims exactly `epoch` — the one after the epoch the claimer has checked (a `promote`
/// checks that its predecessor demoted): if anyone claimed it first, the claimer lost the
/// race and gets [`JournalError::EpochContended`], never a higher epoch that would fence
/// the winner.
pub async fn claim_exact(
    store: &dyn ObjectStore,
    epoch: u64,
    now_ns: u64,
    basis: ClaimBasis,
) -> JournalResult<EpochClaim> {
    let claim = EpochClaim {
        epoch,
        claim_id: Uuid::new_v4(),
        host: hostname(),
        pid: std::process::id(),
        claimed_at_ns: now_ns,
        reason: basis.reason,
        owner: basis.owner,
        fork: basis.fork,
    };
    let body = serde_json::to_vec(&claim).expect("an epoch claim always serializes");
    match store
        .put_if_absent(&paths::epoch_key(epoch), Bytes::from(body))
        .await
    {
        Ok(()) => Ok(claim),
        Err(e) if e.is_already_exists() => Err(JournalError::EpochContended {
            journal: store.describe(),
            epoch,
        }),
        Err(e) => Err(e.into()),
    }
}

/// Reads one claim.
pub async fn read_claim(store: &dyn ObjectStore, epoch: u64) -> JournalResult<EpochClaim> {
    let key = paths::epoch_key(epoch);
    let data = store.get(&key).await?;
    serde_json::from_slice(&data).map_err(|e| JournalError::Malformed {
        journal: store.describe(),
        key,
        what: "epoch claim",
        reason: e.to_string(),
    })
}

/// Fails with [`JournalError::Fenced`] if a writer claimed an epoch after `epoch`. One HEAD in
/// the common case; the writer calls it at its start and in every lease renewal, not per
/// segment upload (see `writer::journal_writer`, "Fencing without a request per upload").
pub async fn ensure_not_fenced(store: &dyn ObjectStore, epoch: u64) -> JournalResult<()> {
    match store.head(&paths::epoch_key(epoch + 1)).await {
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
        Ok(_) => {
            let newer = current_epoch(store).await?.unwrap_or(epoch + 1);
            Err(JournalError::Fenced {
                journal: store.describe(),
                epoch,
                newer,
            })
        }
    }
}

/// This machine's host name (empty when unknown).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;

    #[tokio::test]
    async fn claims_count_up_and_fence_older_writers() {
        let store = MemoryStore::new();
        assert_eq!(current_epoch(&store).await.unwrap(), None);
        let first = claim_next(&store, 10).await.unwrap();
        assert_eq!(first.epoch, 1);
        ensure_not_fenced(&store, 1).await.unwrap();
        let second = claim_next(&store, 20).await.unwrap();
        assert_eq!(second.epoch, 2);
        assert_eq!(read_claim(&store, 2).await.unwrap(), second);
        let err = ensure_not_fenced(&store, 1).await.unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Fenced {
                    epoch: 1,
                    newer: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// Whatever the interleaving (both list before either creates, or one after the other),
    /// exactly one claimer ends up the owner: a lost race is an error, a later claim fences.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_claims_give_exactly_one_owner() {
        for round in 0..20 {
            let store = Arc::new(MemoryStore::new());
            let barrier = Arc::new(tokio::sync::Barrier::new(4));
            let tasks: Vec<_> = (0..4)
                .map(|i| {
                    let (s, b) = (store.clone(), barrier.clone());
                    tokio::spawn(async move {
                        b.wait().await;
                        claim_next(s.as_ref(), i).await
                    })
                })
                .collect();
            let mut claimed = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    Ok(c) => claimed.push(c.epoch),
                    Err(JournalError::EpochContended { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
            }
            let mut owners = 0;
            for epoch in claimed {
                if ensure_not_fenced(store.as_ref(), epoch).await.is_ok() {
                    owners += 1;
                }
            }
            assert_eq!(owners, 1, "round {round}");
        }
    }
}
