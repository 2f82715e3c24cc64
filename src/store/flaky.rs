//! A store wrapper that injects failures and latency, for tests.
//!
//! Tests use it to play an unreachable or misbehaving store under the journal code (which
//! never knows it is there): fail everything, fail the next N calls, fail every call after
//! the next N (a process killed at that request), fail calls on some keys, make a create
//! succeed but report a transient error (the ambiguous create that
//! [`super::retrying::RetryingStore`] must resolve), and slow every call down. For what no
//! rule says, a [`Hook`] sees every call first and may act on the wrapped store or fail the
//! call (another process writing at that moment, a batch delete torn half-way), so tests do
//! not hand-write stores of their own. It is controlled while in use through an
//! `Arc<FlakyStore>` and its setter methods.
//!
//! Compiled in every build so integration tests and other crates' tests can use it; it is
//! never wired into a store that [`super::uri::open_store`] builds.
//!
//! Must never: inject anything it was not told to; lose track of a rule when called from
//! many tasks at once.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};

/// Which error an injected failure is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// [`StoreError::Transient`]: retried by `RetryingStore`.
    Transient,
    /// [`StoreError::Permanent`]: returned at once.
    Permanent,
}

/// One call as a [`Hook`] sees it, before the wrapped store does.
#[derive(Clone, Debug)]
pub struct Call {
    /// `put_if_absent`, `put`, `get`, `get_range`, `get_tail`, `head`, `list` or `delete_many`.
    pub op: &'static str,
    /// The call's keys (the prefix, for `list`).
    pub keys: Vec<String>,
    /// 1 for the first call the wrapper received, counting failed ones.
    pub number: u64,
    /// The wrapped store, to act on behind the caller's back.
    pub inner: Arc<dyn ObjectStore>,
}

/// Runs before every call (after the count, before the rules): `Err` is the call's result
/// (counted as injected), `Ok` lets the rules and then the wrapped store answer.
pub type Hook = Arc<dyn Fn(Call) -> BoxFuture<'static, StoreResult<()>> + Send + Sync>;

/// The rules in force. One lock, so a rule is consumed by exactly one call.
struct Rules {
    fail_all: Option<FailureKind>,
    fail_next: u64,
    fail_next_kind: FailureKind,
    /// Calls to let through before every later one fails with `fail_after_kind`.
    fail_after: Option<u64>,
    fail_after_kind: FailureKind,
    hook: Option<Hook>,
    fail_prefix: Option<(String, FailureKind)>,
    ambiguous_creates: u64,
    latency: Duration,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("fail_all", &self.fail_all)
            .field("fail_next", &self.fail_next)
            .field("fail_after", &self.fail_after)
            .field("hook", &self.hook.is_some())
            .field("fail_prefix", &self.fail_prefix)
            .field("ambiguous_creates", &self.ambiguous_creates)
            .field("latency", &self.latency)
            .finish()
    }
}

/// Wraps a store and fails its calls on demand. See the module documentation.
#[derive(Debug)]
pub struct FlakyStore {
    inner: Arc<dyn ObjectStore>,
    rules: Mutex<Rules>,
    calls: AtomicU64,
    injected: AtomicU64,
}

impl FlakyStore {
    /// A wrapper that passes everything through until told otherwise.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FlakyStore {
            inner,
            rules: Mutex::new(Rules {
                fail_all: None,
                fail_next: 0,
                fail_next_kind: FailureKind::Transient,
                fail_after: None,
                fail_after_kind: FailureKind::Permanent,
                hook: None,
                fail_prefix: None,
                ambiguous_creates: 0,
                latency: Duration::ZERO,
            }),
            calls: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// The wrapped store (to inspect what really happened, bypassing the injection).
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    /// Fails every call with `kind` (`Some`) until called with `None`.
    pub fn fail_all(&self, kind: Option<FailureKind>) {
        self.rules().fail_all = kind;
    }

    /// Fails the next `n` calls with `kind` (replaces a previous count).
    pub fn fail_next(&self, n: u64, kind: FailureKind) {
        let mut rules = self.rules();
        rules.fail_next = n;
        rules.fail_next_kind = kind;
    }

    /// Lets the next `n` calls through, then fails every call with `kind` until
    /// [`FlakyStore::heal`]: a process killed at its `n + 1`-th request.
    pub fn fail_after(&self, n: u64, kind: FailureKind) {
        let mut rules = self.rules();
        rules.fail_after = Some(n);
        rules.fail_after_kind = kind;
    }

    /// Runs `hook` before every call until [`FlakyStore::heal`] (see [`Hook`]).
    pub fn set_hook(
        &self,
        hook: impl Fn(Call) -> BoxFuture<'static, StoreResult<()>> + Send + Sync + 'static,
    ) {
        self.rules().hook = Some(Arc::new(hook));
    }

    /// Fails every call whose key (or list prefix) starts with `prefix`, until
    /// [`FlakyStore::clear_prefix`].
    pub fn fail_prefix(&self, prefix: &str, kind: FailureKind) {
        self.rules().fail_prefix = Some((prefix.to_string(), kind));
    }

    pub fn clear_prefix(&self) {
        self.rules().fail_prefix = None;
    }

    /// The next `n` successful `put_if_absent`/`put` calls really write, then report a
    /// transient error, as when a response is lost after the store committed.
    pub fn ambiguous_creates(&self, n: u64) {
        self.rules().ambiguous_creates = n;
    }

    /// Adds `latency` before every call.
    pub fn set_latency(&self, latency: Duration) {
        self.rules().latency = latency;
    }

    /// Removes every rule and the latency.
    pub fn heal(&self) {
        let mut rules = self.rules();
        rules.fail_all = None;
        rules.fail_next = 0;
        rules.fail_after = None;
        rules.hook = None;
        rules.fail_prefix = None;
        rules.ambiguous_creates = 0;
        rules.latency = Duration::ZERO;
    }

    /// Calls received so far (including failed ones).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Failures injected so far (including ambiguous creates).
    pub fn injected_failures(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn rules(&self) -> MutexGuard<'_, Rules> {
        // Every rule update is a plain assignment, so a poisoned lock is still consistent.
        crate::sync::lock(&self.rules)
    }

    /// Counts the call, runs the hook, waits the latency, and returns the failure to
    /// inject, if any.
    async fn before(&self, op: &'static str, keys: &[&str]) -> StoreResult<()> {
        let number = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let hook = self.rules().hook.clone();
        if let Some(hook) = hook {
            let call = Call {
                op,
                keys: keys.iter().map(|k| k.to_string()).collect(),
                number,
                inner: self.inner.clone(),
            };
            if let Err(e) = hook(call).await {
                self.injected.fetch_add(1, Ordering::SeqCst);
                return Err(e);
            }
        }
        let (latency, failure) = {
            let mut rules = self.rules();
            let after_kind = rules.fail_after_kind;
            let after = match rules.fail_after.as_mut() {
                Some(0) => Some(after_kind),
                Some(left) => {
                    *left -= 1;
                    None
                }
                None => None,
            };
            let failure = if let Some(kind) = rules.fail_all {
                Some(kind)
            } else if after.is_some() {
                after
            } else if rules.fail_next > 0 {
                rules.fail_next -= 1;
                Some(rules.fail_next_kind)
            } else {
                match &rules.fail_prefix {
                    Some((prefix, kind)) if keys.iter().any(|k| k.starts_with(prefix.as_str())) => {
                        Some(*kind)
                    }
                    _ => None,
                }
            };
            (rules.latency, failure)
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        match failure {
            Some(kind) => Err(self.injected_error(kind, op, keys.first().copied().unwrap_or(""))),
            None => Ok(()),
        }
    }

    /// Turns a successful write into a reported transient failure if an ambiguous create is due.
    fn after_write(&self, key: &str, result: StoreResult<()>) -> StoreResult<()> {
        if result.is_ok() {
            let mut rules = self.rules();
            if rules.ambiguous_creates > 0 {
                rules.ambiguous_creates -= 1;
                drop(rules);
                self.injected.fetch_add(1, Ordering::SeqCst);
                return Err(StoreError::Transient {
                    store: self.inner.describe(),
                    key: key.to_string(),
                    message: "injected by FlakyStore: the write succeeded but its answer was lost"
                        .to_string(),
                });
            }
        }
        result
    }

    fn injected_error(&self, kind: FailureKind, op: &str, key: &str) -> StoreError {
        self.injected.fetch_add(1, Ordering::SeqCst);
        let store = self.inner.describe();
        let key = key.to_string();
        let message = format!("injected by FlakyStore: {op} failed");
        match kind {
            FailureKind::Transient => StoreError::Transient {
                store,
                key,
                message,
            },
            FailureKind::Permanent => StoreError::Permanent {
                store,
                key,
                message,
            },
        }
    }
}

#[async_trait]
impl ObjectStore for FlakyStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.before("put_if_absent", &[key]).await?;
        let result = self.inner.put_if_absent(key, data).await;
        self.after_write(key, result)
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.before("put", &[key]).await?;
        let result = self.inner.put(key, data).await;
        self.after_write(key, result)
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.before("get", &[key]).await?;
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.before("get_range", &[key]).await?;
        self.inner.get_range(key, range).await
    }

    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        self.before("get_tail", &[key]).await?;
        self.inner.get_tail(key, len).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.before("head", &[key]).await?;
        self.inner.head(key).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.before("list", &[prefix]).await?;
        self.inner.list(prefix, start_after, max_keys).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.before("delete_many", &refs).await?;
        self.inner.delete_many(keys).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn local_root(&self) -> Option<&std::path::Path> {
        self.inner.local_root()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn flaky() -> FlakyStore {
        FlakyStore::new(Arc::new(MemoryStore::new()))
    }

    #[tokio::test]
    async fn fail_next_counts_down_then_passes() {
        let store = flaky();
        store.fail_next(2, FailureKind::Permanent);
        for _ in 0..2 {
            let err = store.get("k").await.expect_err("injected");
            assert!(matches!(err, StoreError::Permanent { .. }), "{err}");
        }
        assert!(store.get("k").await.expect_err("missing").is_not_found());
        assert_eq!((store.calls(), store.injected_failures()), (3, 2));
    }

    #[tokio::test]
    async fn prefix_rule_only_hits_matching_keys() {
        let store = flaky();
        store.fail_prefix("journal/", FailureKind::Transient);
        let err = store
            .put("journal/0/1", Bytes::from_static(b"x"))
            .await
            .expect_err("injected");
        assert!(err.is_transient(), "{err}");
        store
            .put("consumers/a", Bytes::from_static(b"x"))
            .await
            .expect("other keys pass");
        store.clear_prefix();
        store
            .put("journal/0/1", Bytes::from_static(b"x"))
            .await
            .expect("rule cleared");
    }

    #[tokio::test]
    async fn ambiguous_create_really_writes() {
        let store = flaky();
        store.ambiguous_creates(1);
        let err = store
            .put_if_absent("k", Bytes::from_static(b"ours"))
            .await
            .expect_err("reported as failed");
        assert!(err.is_transient(), "{err}");
        assert_eq!(
            store.inner().get("k").await.expect("written"),
            Bytes::from_static(b"ours")
        );
    }

    #[tokio::test]
    async fn fail_after_lets_n_calls_through_then_fails_all() {
        let store = flaky();
        store.fail_after(2, FailureKind::Permanent);
        store
            .put("a", Bytes::from_static(b"1"))
            .await
            .expect("first");
        store.get("a").await.expect("second");
        for _ in 0..3 {
            let err = store.get("a").await.expect_err("killed");
            assert!(matches!(err, StoreError::Permanent { .. }), "{err}");
        }
        store.heal();
        store.get("a").await.expect("healed");
    }

    #[tokio::test]
    async fn a_hook_sees_each_call_first_and_may_act_or_fail() {
        let store = flaky();
        store.set_hook(|call: Call| {
            Box::pin(async move {
                if call.op == "put" && call.keys == ["trigger"] {
                    // Another writer, at exactly this moment.
                    call.inner.put("side", Bytes::from_static(b"s")).await?;
                }
                if call.number == 3 {
                    return Err(StoreError::Permanent {
                        store: "hook".into(),
                        key: call.keys[0].clone(),
                        message: "third call".into(),
                    });
                }
                Ok(())
            })
        });
        store
            .put("trigger", Bytes::from_static(b"t"))
            .await
            .expect("1");
        assert_eq!(
            store.get("side").await.expect("2"),
            Bytes::from_static(b"s")
        );
        let err = store.get("trigger").await.expect_err("3");
        assert!(err.to_string().contains("third call"), "{err}");
        assert_eq!(store.injected_failures(), 1);
        store.heal();
        store.get("trigger").await.expect("hook removed");
    }

    #[tokio::test]
    async fn fail_all_until_healed() {
        let store = flaky();
        store.fail_all(Some(FailureKind::Transient));
        assert!(store
            .list("", None, 10)
            .await
            .expect_err("down")
            .is_transient());
        store.heal();
        store.list("", None, 10).await.expect("healed");
    }
}
