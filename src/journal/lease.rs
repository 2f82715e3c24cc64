//! Writer leases: how a starting `serve` tells a live owner of the journal from a dead one,
//! so that a second writer started by mistake is refused instead of silently fencing the
//! live primary. The owning writer renews its lease every few seconds (one PUT); another
//! writer refuses to start while the highest epoch's lease is live, unless told to take
//! over.
//!
//! # Why one key per epoch (`leases/<epoch:020>`) and not one `lease` key
//! The store offers only an unconditional put and a conditional *create*; a compare-and-swap
//! of one shared `lease` key would need `If-Match`, which not every S3 server here supports.
//! Instead each epoch's lease has exactly one writer, the owner of that epoch, whose
//! ownership the conditional create of `epochs/<epoch>` already decided. A stale writer that
//! renews after a takeover can only rewrite its own, older epoch's lease, which nobody reads
//! any more: readers look at the lease of the highest epoch. So no writer ever overwrites
//! another's lease, which is what the DESIGN's "replaced by conditional put" protects.
//!
//! The lease is advisory for *liveness* only; *safety* stays with the epochs and the
//! conditional creates of segments (see `writer::journal_writer`, "Fencing without a
//! request per upload"): each renewal checks for a newer epoch first, a writer that missed
//! its own renewal deadline checks again before its next upload (see `writer::lease`), and
//! a new writer whose predecessor may still upload starts `W - 1` seqs on.
//!
//! Must never: call a lease live that its holder released, or dead while its holder may
//! still write within its term (clock skew is on the side of "live").

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::consumer::decode;
use super::epoch::{self, hostname};
use super::error::{JournalError, JournalResult};
use super::paths;
use crate::clock::format_ns;
use crate::store::ObjectStore;

/// A writer's lease (JSON at `leases/<epoch:020>`).
///
/// ```json
/// {"epoch":3,"host":"db1","pid":4242,"since_ns":…,"renewed_at_ns":…,"ttl_ms":15000,
///  "renewals":17,"released":false,"durable_next_seq":42}
/// ```
///
/// # Invariants
/// - Written only by the writer that claimed `epoch`.
/// - `renewed_at_ns` is the holder's wall clock when it *sent* the renewal, so the lease
///   never claims more than the holder can be sure of; the holder's own deadline is
///   measured on its monotonic clock from the same moment.
/// - Live while `!released` and now < `renewed_at_ns + ttl_ms`, as seen by the reader's
///   clock (hosts are expected to agree within a fraction of `ttl_ms`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    pub host: String,
    pub pid: u32,
    /// When the holder claimed its epoch (ns since the UNIX epoch).
    pub since_ns: u64,
    /// When the holder last sent a renewal (ns since the UNIX epoch).
    pub renewed_at_ns: u64,
    /// How long a renewal is good for.
    pub ttl_ms: u64,
    /// Renewals so far (for operators: a counter that moves is a holder that lives).
    pub renewals: u64,
    /// The holder stopped cleanly and gave the journal up.
    #[serde(default)]
    pub released: bool,
    /// Every seq below this one was durable (a segment or a plug) when the lease was sent: a
    /// reader that finds one of them missing has found a hole, not the end (see
    /// `journal::head`). 0 when nothing is recorded (a lease of an older tinylag). On a
    /// release after a drained stop it is the end of the journal.
    #[serde(default)]
    pub durable_next_seq: u64,
}

impl Lease {
    /// A fresh lease of this process for `epoch`.
    pub fn new(epoch: u64, since_ns: u64, now_ns: u64, ttl_ms: u64) -> Lease {
        Lease {
            epoch,
            host: hostname(),
            pid: std::process::id(),
            since_ns,
            renewed_at_ns: now_ns,
            ttl_ms,
            renewals: 0,
            released: false,
            durable_next_seq: 0,
        }
    }

    /// When the lease runs out (ns since the UNIX epoch).
    pub fn expires_at_ns(&self) -> u64 {
        self.renewed_at_ns
            .saturating_add(self.ttl_ms.saturating_mul(1_000_000))
    }

    /// Whether the lease binds another writer at `now_ns`. A holder on this host whose
    /// process is gone (killed, crashed) holds nothing: its successor need not wait out the
    /// term.
    pub fn is_live(&self, now_ns: u64) -> bool {
        let holder_may_run = self.host != hostname() || process_exists(self.pid);
        !self.released && now_ns < self.expires_at_ns() && holder_may_run
    }
}

/// Writes (creates or replaces) `lease` at its epoch's key: one PUT.
pub async fn write(store: &dyn ObjectStore, lease: &Lease) -> JournalResult<()> {
    let body = serde_json::to_vec(lease).expect("a lease always serializes");
    store
        .put(&paths::lease_key(lease.epoch), Bytes::from(body))
        .await?;
    Ok(())
}

/// Reads the lease of `epoch`; `None` when that writer never wrote one.
pub async fn read(store: &dyn ObjectStore, epoch: u64) -> JournalResult<Option<Lease>> {
    let key = paths::lease_key(epoch);
    match store.get(&key).await {
        Ok(data) => decode(store, &key, "writer lease", &data).map(Some),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The lease that binds the journal now: the highest epoch's, or, when that writer has not
/// written one yet (it is starting), its claim read as a lease renewed at claim time with
/// `default_ttl_ms`. `None` for a journal no writer ever claimed.
pub async fn current(store: &dyn ObjectStore, default_ttl_ms: u64) -> JournalResult<Option<Lease>> {
    let Some(epoch) = epoch::current_epoch(store).await? else {
        return Ok(None);
    };
    if let Some(lease) = read(store, epoch).await? {
        return Ok(Some(lease));
    }
    let claim = epoch::read_claim(store, epoch).await?;
    Ok(Some(Lease {
        epoch,
        host: claim.host,
        pid: claim.pid,
        since_ns: claim.claimed_at_ns,
        renewed_at_ns: claim.claimed_at_ns,
        ttl_ms: default_ttl_ms,
        renewals: 0,
        released: false,
        durable_next_seq: 0,
    }))
}

/// Refuses with [`JournalError::LeaseHeld`] (naming the holder) while another writer's
/// lease is live at `now_ns`. Returns the lease found, live or not, for logging.
pub async fn ensure_free(
    store: &dyn ObjectStore,
    now_ns: u64,
    default_ttl_ms: u64,
) -> JournalResult<Option<Lease>> {
    let lease = current(store, default_ttl_ms).await?;
    if let Some(l) = lease.as_ref().filter(|l| l.is_live(now_ns)) {
        return Err(JournalError::LeaseHeld {
            journal: store.describe(),
            epoch: l.epoch,
            host: l.host.clone(),
            pid: l.pid,
            since: format_ns(l.since_ns),
            renewed_secs_ago: now_ns.saturating_sub(l.renewed_at_ns) as f64 / 1e9,
            expires_in_secs: l.expires_at_ns().saturating_sub(now_ns) as f64 / 1e9,
        });
    }
    Ok(lease)
}

/// Whether the writer of epoch `epoch` may still upload segments, as a writer that just
/// claimed `epoch + 1` must know (see `writer::journal_writer`, "Fencing without a request
/// per upload"): no, when its lease says it released the journal (a clean stop ends every
/// upload first), or when it ran in another process on this host that is gone. Otherwise
/// (live, expired but perhaps only paused, on another host, or no lease written yet) it
/// may. A writer in this very process (tests that run two writers in one process) is taken
/// as gone: it cannot outlive its own test. One GET (two when no lease was written).
pub async fn predecessor_may_still_write(
    store: &dyn ObjectStore,
    epoch: u64,
) -> JournalResult<bool> {
    let (host, pid) = match read(store, epoch).await? {
        Some(lease) if lease.released => return Ok(false),
        Some(lease) => (lease.host, lease.pid),
        None => match epoch::read_claim(store, epoch).await {
            Ok(claim) => (claim.host, claim.pid),
            Err(JournalError::Store(e)) if e.is_not_found() => return Ok(false),
            Err(e) => return Err(e),
        },
    };
    if host != hostname() {
        return Ok(true);
    }
    Ok(pid != std::process::id() && process_exists(pid))
}

fn process_exists(pid: u32) -> bool {
    match i32::try_from(pid) {
        // `kill(0, 0)` asks about our own process group, which exists: a claim that names
        // pid 0 is taken as a live holder, the careful answer.
        Ok(0) => true,
        Ok(pid) => crate::sys::process_exists(pid),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    const SEC: u64 = 1_000_000_000;

    #[tokio::test]
    async fn a_live_lease_refuses_and_names_its_holder_until_it_expires_or_is_released() {
        let store = MemoryStore::new();
        assert_eq!(ensure_free(&store, 100 * SEC, 15_000).await.unwrap(), None);
        let claim = epoch::claim_next(&store, 100 * SEC).await.unwrap();
        // Claimed, no lease written yet: the claim counts as a lease from claim time.
        let err = ensure_free(&store, 101 * SEC, 15_000).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("epoch 1"), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("--takeover"), "{msg}");

        let mut lease = Lease::new(claim.epoch, claim.claimed_at_ns, 110 * SEC, 5_000);
        write(&store, &lease).await.unwrap();
        assert!(ensure_free(&store, 114 * SEC, 15_000).await.is_err());
        // Its own 5 s term counts, not the reader's default.
        assert!(ensure_free(&store, 116 * SEC, 15_000).await.is_ok());

        lease.renewed_at_ns = 120 * SEC;
        lease.released = true;
        write(&store, &lease).await.unwrap();
        assert!(ensure_free(&store, 121 * SEC, 15_000).await.is_ok());
    }

    #[tokio::test]
    async fn a_holder_on_this_host_whose_process_is_gone_holds_nothing() {
        let store = MemoryStore::new();
        let claim = epoch::claim_next(&store, SEC).await.unwrap();
        let mut lease = Lease::new(claim.epoch, SEC, 2 * SEC, 60_000);
        // A pid that cannot exist (above the kernel's pid_max ceiling).
        lease.pid = 1 << 23;
        write(&store, &lease).await.unwrap();
        assert!(ensure_free(&store, 3 * SEC, 60_000).await.is_ok());
        lease.pid = std::process::id();
        write(&store, &lease).await.unwrap();
        assert!(ensure_free(&store, 3 * SEC, 60_000).await.is_err());
    }

    #[tokio::test]
    async fn only_the_highest_epochs_lease_counts() {
        let store = MemoryStore::new();
        let old = epoch::claim_next(&store, SEC).await.unwrap();
        let new = epoch::claim_next(&store, 2 * SEC).await.unwrap();
        write(&store, &Lease::new(new.epoch, 2 * SEC, 2 * SEC, 1_000))
            .await
            .unwrap();
        // The fenced writer renews late: its own key only, and nobody reads it.
        write(&store, &Lease::new(old.epoch, SEC, 10 * SEC, 60_000))
            .await
            .unwrap();
        let current = current(&store, 60_000).await.unwrap().unwrap();
        assert_eq!(current.epoch, new.epoch);
        assert!(ensure_free(&store, 10 * SEC, 60_000).await.is_ok());
    }
}
