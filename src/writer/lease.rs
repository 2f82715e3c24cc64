//! The writer's side of the lease (`journal::lease`): a task that renews this writer's
//! lease every `ttl / 3` (two requests each: the fence check `HEAD epochs/<E+1>`, then the
//! lease's PUT), and a store wrapper that keeps a writer which missed its own renewal
//! deadline (paused, partitioned), or found itself fenced, from uploading a segment before
//! it has checked that no newer epoch exists.
//!
//! ```text
//! serve: lease::ensure_free ─► PrimaryCore::start (claims epoch E, through LeasedStore)
//!        ─► LeaseKeeper::start(E): HEAD epochs/E+1, writes leases/E; again every ttl/3
//! upload of a segment ─► LeasedStore::put_if_absent: deadline passed? ─► HEAD epochs/E+1,
//!        renew ─► then the PUT (or a transient error; a newer epoch fences the writer:
//!        mode `fenced`)
//! ```
//!
//! The deadline is measured on the monotonic clock from the moment the last successful
//! renewal's fence check was *sent*, which is no later than the `renewed_at` the lease
//! advertises; a process stopped by SIGSTOP sees its deadline pass the moment it runs
//! again. Segment uploads themselves carry no fence check: see `writer::journal_writer`,
//! "Fencing without a request per upload", for why the conditional create suffices.
//!
//! Must never: let a segment upload start after the deadline without the epoch check;
//! block the primary's I/O (only uploads wait for the check); renew after the writer
//! knows it is fenced.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::{format_ns, Clock};
use crate::journal::epoch;
use crate::journal::lease::{self, Lease};
use crate::journal::paths;
use crate::journal::JournalError;
use crate::store::{ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};

/// How long a stop waits for the lease's last renewal and its release write.
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
/// Renewals never come closer together than this, whatever the term.
const MIN_RENEW_EVERY: Duration = Duration::from_millis(500);

/// Called once when the lease keeper finds that a newer epoch exists.
pub(crate) type OnFenced = Box<dyn Fn(String) + Send + Sync>;

/// Asked at each renewal (and at the release) for the seq below which the journal is
/// durable, which the lease records (`Lease::durable_next_seq`).
pub(crate) type DurableNextSeq = Box<dyn Fn() -> u64 + Send + Sync>;

/// What `status` shows of the lease (the holder is this writer).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LeaseStatus {
    pub epoch: u64,
    pub host: String,
    pub pid: u32,
    /// When this writer claimed its epoch (RFC 3339).
    pub since: String,
    /// When the last successful renewal was sent (RFC 3339; "-" before the first).
    pub renewed_at: String,
    pub ttl_seconds: f64,
    /// Seconds until the lease runs out as this writer sees it (negative: missed).
    pub expires_in_seconds: f64,
    pub renewals: u64,
    pub renewal_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// `held`, `expired` (renewals failing or the process was paused; uploads wait for an
    /// epoch check), `fenced` (a newer epoch exists) or `released`.
    pub state: &'static str,
}

/// Shared between the keeper task, the store wrapper and `status`.
struct LeaseState {
    store: Arc<dyn ObjectStore>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    /// 0 until the writer has claimed its epoch.
    epoch: AtomicU64,
    lease: Mutex<Option<Lease>>,
    /// Monotonic deadline of the current term; `None` before the first renewal.
    valid_until: Mutex<Option<Instant>>,
    renewals: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    fenced: AtomicBool,
    released: AtomicBool,
    on_fenced: Mutex<Option<OnFenced>>,
    durable_next_seq: Mutex<Option<DurableNextSeq>>,
    /// Counts successful renewals, for what looks at the store once a renewal (the resync
    /// requests: `writer::resync_requests`).
    renewed: watch::Sender<u64>,
    /// Serializes deadline checks (the keeper and concurrent uploads).
    check: tokio::sync::Mutex<()>,
}

// Critical sections are plain assignments; a poisoned lock still holds a value.
use crate::sync::lock;

impl LeaseState {
    fn epoch(&self) -> Option<u64> {
        match self.epoch.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    fn expired(&self) -> bool {
        lock(&self.valid_until).is_none_or(|t| Instant::now() >= t)
    }

    /// What the writer reports durable, recorded in the lease (never moving back).
    fn record_durable(&self, lease: &mut Lease) {
        if let Some(durable) = lock(&self.durable_next_seq).as_ref() {
            lease.durable_next_seq = lease.durable_next_seq.max(durable());
        }
    }

    /// One renewal: the fence check (a HEAD of `epochs/<epoch + 1>`), then the lease's PUT.
    /// On success the term restarts from when the check was sent: no newer epoch existed
    /// then, so the term ends at most one `ttl` after any newer claim (the bound the module
    /// documentation's safety argument uses). Finding a newer epoch fences the writer.
    async fn renew(&self) -> Result<(), String> {
        let sent = Instant::now();
        let Some(epoch) = lock(&self.lease).as_ref().map(|l| l.epoch) else {
            return Err("no lease yet".into());
        };
        match epoch::ensure_not_fenced(self.store.as_ref(), epoch).await {
            Ok(()) => {}
            Err(JournalError::Fenced { newer, .. }) => {
                let reason = format!(
                    "writer epoch {epoch} found epoch {newer}: another writer took the journal \
                     over"
                );
                self.fence(reason.clone());
                return Err(reason);
            }
            Err(e) => {
                let message = format!("checking for an epoch after {epoch}: {e}");
                self.errors.fetch_add(1, Ordering::AcqRel);
                *lock(&self.last_error) = Some(message.clone());
                return Err(message);
            }
        }
        let lease = {
            let mut guard = lock(&self.lease);
            let Some(lease) = guard.as_mut() else {
                return Err("no lease yet".into());
            };
            lease.renewed_at_ns = self.clock.now_ns();
            lease.renewals += 1;
            self.record_durable(lease);
            lease.clone()
        };
        match lease::write(self.store.as_ref(), &lease).await {
            Ok(()) => {
                *lock(&self.valid_until) = Some(sent + self.ttl);
                let n = self.renewals.fetch_add(1, Ordering::AcqRel) + 1;
                self.renewed.send_replace(n);
                Ok(())
            }
            Err(e) => {
                let message = format!("renewing {}: {e}", paths::lease_key(lease.epoch));
                self.errors.fetch_add(1, Ordering::AcqRel);
                *lock(&self.last_error) = Some(message.clone());
                Err(message)
            }
        }
    }

    /// The deadline passed: renew, which checks that no newer epoch exists first. `Err`
    /// says why journaling must wait (or stop, once `fenced` is set).
    async fn recheck(&self, epoch: u64) -> Result<(), String> {
        let _one = self.check.lock().await;
        if self.fenced.load(Ordering::Acquire) {
            return Err(format!("writer epoch {epoch} is fenced"));
        }
        if !self.expired() {
            return Ok(());
        }
        self.renew()
            .await
            .map_err(|e| format!("writer epoch {epoch} missed its lease deadline: {e}"))
    }

    fn fence(&self, reason: String) {
        if self.fenced.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::error!(%reason, "journaling stops: fenced");
        if let Some(f) = lock(&self.on_fenced).take() {
            f(reason);
        }
    }
}

/// A store wrapper for the journal writer: before a segment upload, a writer past its lease
/// deadline checks for a newer epoch and renews first (see the module documentation).
/// Everything else passes straight through.
#[derive(Clone)]
pub(crate) struct LeasedStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<LeaseState>,
}

impl std::fmt::Debug for LeasedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedStore")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl ObjectStore for LeasedStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        if let Some(epoch) = self.state.epoch() {
            if key.starts_with(paths::JOURNAL_PREFIX)
                && (self.state.expired() || self.state.fenced.load(Ordering::Acquire))
            {
                self.state
                    .recheck(epoch)
                    .await
                    .map_err(|message| StoreError::Transient {
                        store: self.inner.describe(),
                        key: key.to_string(),
                        message,
                    })?;
            }
        }
        self.inner.put_if_absent(key, data).await
    }
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.inner.put(key, data).await
    }
    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.inner.get(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        self.inner.get_tail(key, len).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.inner.head(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.inner.list(prefix, start_after, max_keys).await
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        self.inner.delete_many(keys).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// Keeps this writer's lease: see the module documentation.
pub struct LeaseKeeper {
    state: Arc<LeaseState>,
    task: Mutex<Option<(JoinHandle<()>, watch::Sender<bool>)>>,
}

impl std::fmt::Debug for LeaseKeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("epoch", &self.state.epoch())
            .finish()
    }
}

impl LeaseKeeper {
    /// A keeper for a writer about to start on `store`, with a lease term of `ttl`. Give the
    /// writer [`store`](Self::store), then call [`start`](Self::start) once it has its epoch.
    pub fn new(store: Arc<dyn ObjectStore>, clock: Arc<dyn Clock>, ttl: Duration) -> LeaseKeeper {
        LeaseKeeper {
            state: Arc::new(LeaseState {
                store,
                clock,
                ttl,
                epoch: AtomicU64::new(0),
                lease: Mutex::new(None),
                valid_until: Mutex::new(None),
                renewals: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                last_error: Mutex::new(None),
                fenced: AtomicBool::new(false),
                released: AtomicBool::new(false),
                on_fenced: Mutex::new(None),
                durable_next_seq: Mutex::new(None),
                renewed: watch::channel(0).0,
                check: tokio::sync::Mutex::new(()),
            }),
            task: Mutex::new(None),
        }
    }

    /// Has every renewal (and the release) record what `durable` reports: the seq below which
    /// the journal is durable. Set before [`start`](Self::start) so the first lease has it.
    pub fn record_durable(&self, durable: DurableNextSeq) {
        *lock(&self.state.durable_next_seq) = Some(durable);
    }

    /// Changes after every successful renewal (its value: the renewals so far).
    pub fn renewals(&self) -> watch::Receiver<u64> {
        self.state.renewed.subscribe()
    }

    /// The store the writer must use.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(LeasedStore {
            inner: self.state.store.clone(),
            state: self.state.clone(),
        })
    }

    /// Writes the first lease of `epoch` (claimed at `since_ns`) and starts renewing it.
    /// `on_fenced` is called once if the keeper finds a newer epoch. A failed first write is
    /// logged, not fatal: the writer journals on, and the next renewal tries again.
    pub async fn start(&self, epoch: u64, since_ns: u64, on_fenced: OnFenced) {
        let ttl_ms = self.state.ttl.as_millis() as u64;
        *lock(&self.state.lease) = Some(Lease::new(epoch, since_ns, 0, ttl_ms));
        *lock(&self.state.on_fenced) = Some(on_fenced);
        if let Err(e) = self.state.renew().await {
            tracing::warn!(error = %e, "cannot write the writer lease; will retry");
        }
        // The epoch is set after the first lease: until then uploads pass unchecked, as
        // they did before the lease existed.
        self.state.epoch.store(epoch, Ordering::Release);
        let (stop_tx, mut stop) = watch::channel(false);
        let state = self.state.clone();
        let every = (self.state.ttl / 3).max(MIN_RENEW_EVERY);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if state.fenced.load(Ordering::Acquire) {
                    return;
                }
                let result = if state.expired() {
                    tracing::warn!(
                        epoch,
                        "missed the lease deadline; checking for a newer epoch"
                    );
                    state.recheck(epoch).await
                } else {
                    state.renew().await
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "lease renewal failed");
                }
            }
        });
        *lock(&self.task) = Some((task, stop_tx));
    }

    /// Stops renewing and, unless fenced, marks the lease released so the next writer need
    /// not wait out the term (a clean stop).
    /// Stops renewing and marks the lease released, each step bounded by [`RELEASE_GRACE`]
    /// so that a dead store cannot hold up a stop (the lease then simply expires).
    pub async fn release(&self) {
        let task = lock(&self.task).take();
        if let Some((mut task, stop)) = task {
            let _ = stop.send(true);
            // A renewal stuck in store retries (store down) must not hold up the stop.
            if tokio::time::timeout(RELEASE_GRACE, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        // Fenced: not ours to release. Released already (a demote): nothing more to write.
        if self.state.fenced.load(Ordering::Acquire) || self.state.released.load(Ordering::Acquire)
        {
            return;
        }
        let lease = lock(&self.state.lease).as_mut().map(|l| {
            l.released = true;
            self.state.record_durable(l);
            l.clone()
        });
        if let Some(lease) = lease {
            match tokio::time::timeout(
                RELEASE_GRACE,
                lease::write(self.state.store.as_ref(), &lease),
            )
            .await
            {
                Ok(Ok(())) => self.state.released.store(true, Ordering::Release),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the writer lease"),
                Err(_) => tracing::warn!(
                    "the store did not answer within {RELEASE_GRACE:?}; the writer lease is \
                     not released and expires by itself"
                ),
            }
        }
    }

    /// The lease as `status` shows it; `None` before [`start`](Self::start).
    pub fn status(&self) -> Option<LeaseStatus> {
        let s = &self.state;
        let lease = lock(&s.lease).clone()?;
        let valid_until = *lock(&s.valid_until);
        let expires_in_seconds = valid_until.map_or(0.0, |t| {
            let now = Instant::now();
            if t >= now {
                (t - now).as_secs_f64()
            } else {
                -(now - t).as_secs_f64()
            }
        });
        let state = if s.fenced.load(Ordering::Acquire) {
            "fenced"
        } else if s.released.load(Ordering::Acquire) {
            "released"
        } else if s.expired() {
            "expired"
        } else {
            "held"
        };
        Some(LeaseStatus {
            epoch: lease.epoch,
            host: lease.host,
            pid: lease.pid,
            since: format_ns(lease.since_ns),
            renewed_at: if lease.renewed_at_ns == 0 {
                "-".into()
            } else {
                format_ns(lease.renewed_at_ns)
            },
            ttl_seconds: s.ttl.as_secs_f64(),
            expires_in_seconds,
            renewals: s.renewals.load(Ordering::Acquire),
            renewal_errors: s.errors.load(Ordering::Acquire),
            last_error: lock(&s.last_error).clone(),
            state,
        })
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some((task, _)) = lock(&self.task).take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::store::memory::MemoryStore;
    use std::sync::atomic::AtomicUsize;

    fn keeper(store: Arc<dyn ObjectStore>, ttl: Duration) -> LeaseKeeper {
        LeaseKeeper::new(store, Arc::new(SystemClock), ttl)
    }

    #[tokio::test]
    async fn renews_with_one_put_and_releases_on_a_clean_stop() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        let k = keeper(store.clone(), Duration::from_millis(1500));
        k.start(claim.epoch, 1, Box::new(|_| {})).await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let status = k.status().unwrap();
        assert_eq!(status.state, "held");
        assert!(status.renewals >= 2, "{status:?}");
        let stored = lease::read(store.as_ref(), claim.epoch)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.pid, std::process::id());
        assert!(
            lease::ensure_free(store.as_ref(), SystemClock.now_ns(), 1500)
                .await
                .is_err()
        );
        k.release().await;
        assert_eq!(k.status().unwrap().state, "released");
        assert!(
            lease::ensure_free(store.as_ref(), SystemClock.now_ns(), 1500)
                .await
                .is_ok()
        );
    }

    /// Each renewal records what the writer reports durable, and the release the final
    /// value: readers tell a hole from the end by it (`journal::head`).
    #[tokio::test]
    async fn renewals_and_the_release_record_the_durable_seq() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        let k = keeper(store.clone(), Duration::from_secs(60));
        let durable = Arc::new(AtomicU64::new(7));
        let reported = durable.clone();
        k.record_durable(Box::new(move || reported.load(Ordering::Acquire)));
        k.start(claim.epoch, 1, Box::new(|_| {})).await;
        let stored = lease::read(store.as_ref(), claim.epoch).await.unwrap();
        assert_eq!(stored.unwrap().durable_next_seq, 7);
        durable.store(9, Ordering::Release);
        k.release().await;
        let stored = lease::read(store.as_ref(), claim.epoch).await.unwrap();
        let stored = stored.unwrap();
        assert!(stored.released);
        assert_eq!(stored.durable_next_seq, 9);
    }

    /// A writer past its deadline (as after SIGSTOP) may not upload before it has looked for
    /// a newer epoch; finding one fences it, once.
    #[tokio::test]
    async fn past_the_deadline_an_upload_waits_for_the_epoch_check() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        let k = keeper(store.clone(), Duration::from_secs(60));
        let fenced = Arc::new(AtomicUsize::new(0));
        let f = fenced.clone();
        k.start(
            claim.epoch,
            1,
            Box::new(move |_| {
                f.fetch_add(1, Ordering::AcqRel);
            }),
        )
        .await;
        let leased = k.store();
        leased
            .put_if_absent("journal/0/00000000000000000000", Bytes::from_static(b"a"))
            .await
            .unwrap();
        // Pretend the process was paused past its term, while another writer took over.
        *lock(&k.state.valid_until) = Some(Instant::now() - Duration::from_secs(1));
        epoch::claim_next(store.as_ref(), 2).await.unwrap();
        let err = leased
            .put_if_absent("journal/1/00000000000000000001", Bytes::from_static(b"b"))
            .await
            .unwrap_err();
        assert!(err.is_transient(), "{err}");
        assert!(err.to_string().contains("found epoch 2"), "{err}");
        assert!(store.head("journal/1/00000000000000000001").await.is_err());
        assert_eq!(fenced.load(Ordering::Acquire), 1);
        assert_eq!(k.status().unwrap().state, "fenced");
        // Metadata writes are not the writer's segments: they pass.
        leased
            .put_if_absent("marks/x", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        k.release().await;
        // A fenced writer leaves its lease as it was: not released.
        let stored = lease::read(store.as_ref(), 1).await.unwrap().unwrap();
        assert!(!stored.released);
    }

    /// Uploads carry no fence check, so an idle writer learns of a takeover from its
    /// renewals: within one renewal period, with no upload at all.
    #[tokio::test]
    async fn a_renewal_finds_a_newer_epoch_and_fences_an_idle_writer() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        let k = keeper(store.clone(), Duration::from_millis(1500));
        let (tx, mut fenced) = tokio::sync::mpsc::unbounded_channel();
        k.start(
            claim.epoch,
            1,
            Box::new(move |reason| {
                let _ = tx.send(reason);
            }),
        )
        .await;
        epoch::claim_next(store.as_ref(), 2).await.unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(5), fenced.recv())
            .await
            .expect("fenced within a few renewal periods")
            .unwrap();
        assert!(reason.contains("found epoch 2"), "{reason}");
        assert_eq!(k.status().unwrap().state, "fenced");
        let err = k
            .store()
            .put_if_absent("journal/0/00000000000000000000", Bytes::from_static(b"a"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("fenced"), "{err}");
        assert!(store.head("journal/0/00000000000000000000").await.is_err());
    }

    #[tokio::test]
    async fn past_the_deadline_without_a_newer_epoch_renews_and_uploads() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        let k = keeper(store.clone(), Duration::from_secs(60));
        k.start(claim.epoch, 1, Box::new(|_| panic!("not fenced")))
            .await;
        let before = k.status().unwrap().renewals;
        *lock(&k.state.valid_until) = Some(Instant::now() - Duration::from_secs(1));
        k.store()
            .put_if_absent("journal/0/00000000000000000000", Bytes::from_static(b"a"))
            .await
            .unwrap();
        let after = k.status().unwrap();
        assert_eq!(after.renewals, before + 1);
        assert_eq!(after.state, "held");
    }
}
