//! Retries transient store failures with jittered exponential backoff, around any store.
//!
//! Every store that [`super::uri::open_store`] hands out is wrapped in a [`RetryingStore`],
//! so the journal code sees a transient error only after the whole retry budget is spent.
//!
//! A command an operator waits on (`journal info`, `restore`, …) opens its stores
//! [failing fast at first](RetryingStore::failing_fast_at_first): until a store has answered
//! once, a transient failure (an unreachable endpoint) gets a short, quiet retry budget, so
//! the command fails within two seconds with one line instead of logging a WARN per retry for
//! a quarter of a minute. Once the store has answered, the full budget applies. The error a
//! spent budget returns says how many attempts over how long.
//!
//! Must never: retry a permanent error (access denied, a full disk, a conflict); report a
//! conditional create that really happened as a conflict (see [`RetryingStore`]).

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;

use super::{ListPage, ObjectMeta, ObjectStore, StoreError, StoreResult};

/// How often and how patiently to retry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Calls made in total, the first one included (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubles on each following one.
    pub base_delay: Duration,
    /// Upper bound of any one delay.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// Ten attempts, 50 ms doubling up to 5 s: about 16 s of retries, enough to ride out S3
    /// throttling (`SlowDown`) and a connection reset without hiding a real outage for long.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// For a store that has never answered, in a command an operator waits on: four
    /// attempts, 250 ms, 500 ms and 1 s apart at most (under 2 s of retries: enough for a
    /// server still starting or a first request throttled, short enough to wait for).
    pub fn first_contact() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(1),
        }
    }

    /// The pause after failed attempt `attempt` (1-based): `base * 2^(attempt-1)` capped at
    /// `max_delay`, then drawn uniformly from its upper half so that writers that failed
    /// together do not retry together.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        let full = self
            .base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay);
        let nanos = u64::try_from(full.as_nanos()).unwrap_or(u64::MAX);
        if nanos < 2 {
            return full;
        }
        Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos))
    }
}

/// A store that retries [`StoreError::is_transient`] failures of its inner store.
///
/// # Ambiguous conditional creates
/// A `put_if_absent` that failed transiently (a timeout, a reset connection) may still have
/// created the object. Its retry then meets `AlreadyExists` — from its own earlier attempt.
/// So when a retried create gets `AlreadyExists` after an earlier attempt of the same call
/// failed transiently, this store reads the object back and compares it with the bytes it
/// was asked to write: equal bytes mean the object is ours and the call returns `Ok`;
/// different bytes (or no object) mean another writer won, and the conflict is returned.
///
/// That comparison is sound because every conditional payload in tinylag is unique to its
/// writer: segments carry the device UUID, epoch and seq, epoch claims carry a random claim
/// id, the manifest carries its creation time and UUID. Two different writers never try to
/// create the same key with identical bytes.
///
/// A create whose *last* attempt fails transiently returns that transient error: the object
/// may or may not exist, and the caller must find out (e.g. by reading it) before relying on
/// either.
#[derive(Debug)]
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
    /// The quiet policy used until the store has answered once, if any.
    first_contact: Option<RetryPolicy>,
    /// Whether any call got an answer (success or a permanent error) from the store.
    answered: AtomicBool,
}

impl RetryingStore {
    /// Wraps `inner` with the default policy.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self::with_policy(inner, RetryPolicy::default())
    }

    pub fn with_policy(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryingStore {
            inner,
            policy,
            first_contact: None,
            answered: AtomicBool::new(false),
        }
    }

    /// Until the store has answered once, retries transient failures with `first_contact`
    /// instead of the policy, logging them at DEBUG instead of WARN.
    pub fn failing_fast_at_first(mut self, first_contact: RetryPolicy) -> Self {
        self.first_contact = Some(first_contact);
        self
    }

    /// The policy for the next retry, and whether its retries are logged quietly.
    fn current_policy(&self) -> (&RetryPolicy, bool) {
        match &self.first_contact {
            Some(first) if !self.answered.load(Ordering::Relaxed) => (first, true),
            _ => (&self.policy, false),
        }
    }

    /// Notes that `result` came from a store that answered (anything but a transient error).
    fn note_answer<T>(&self, result: &StoreResult<T>) {
        if !matches!(result, Err(e) if e.is_transient()) {
            self.answered.store(true, Ordering::Relaxed);
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Calls `op` until it succeeds, fails permanently or runs out of attempts.
    async fn retry<T, F, Fut>(&self, what: &str, key: &str, mut op: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut attempt = 1;
        let started = Instant::now();
        loop {
            let result = op().await;
            self.note_answer(&result);
            match result {
                Err(e) if e.is_transient() && attempt < self.current_policy().0.max_attempts => {
                    self.pause(what, key, attempt, &e).await;
                    attempt += 1;
                }
                Err(e) if attempt > 1 => return Err(e.after_attempts(attempt, started.elapsed())),
                result => return result,
            }
        }
    }

    async fn pause(&self, what: &str, key: &str, attempt: u32, err: &StoreError) {
        let (policy, quiet) = self.current_policy();
        let delay = policy.delay(attempt);
        let store = self.inner.describe();
        let max_attempts = policy.max_attempts;
        let delay_ms = delay.as_millis() as u64;
        if quiet {
            tracing::debug!(store, op = what, key, attempt, max_attempts, delay_ms, error = %err,
                "store not reached yet, retrying");
        } else {
            tracing::warn!(store, op = what, key, attempt, max_attempts, delay_ms, error = %err,
                "transient store error, retrying");
        }
        tokio::time::sleep(delay).await;
    }

    /// A retried create met `AlreadyExists`: decide whether the object is the one an earlier,
    /// transiently failed attempt of this call created.
    async fn resolve_ambiguous_create(
        &self,
        key: &str,
        data: &Bytes,
        conflict: StoreError,
    ) -> StoreResult<()> {
        match self.retry("get", key, || self.inner.get(key)).await {
            Ok(existing) if existing == *data => {
                tracing::info!(
                    store = %self.inner.describe(),
                    key,
                    "conditional create was retried after a transient error; the object holds our bytes, so the earlier attempt succeeded"
                );
                Ok(())
            }
            Ok(_) => Err(conflict),
            // Someone created and deleted it since; it was not ours to begin with.
            Err(e) if e.is_not_found() => Err(conflict),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let mut attempt = 1;
        let mut failed_transiently = false;
        let started = Instant::now();
        loop {
            let result = self.inner.put_if_absent(key, data.clone()).await;
            self.note_answer(&result);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_already_exists() && failed_transiently => {
                    return self.resolve_ambiguous_create(key, &data, e).await
                }
                Err(e) if e.is_transient() && attempt < self.current_policy().0.max_attempts => {
                    failed_transiently = true;
                    self.pause("put_if_absent", key, attempt, &e).await;
                    attempt += 1;
                }
                Err(e) if attempt > 1 => return Err(e.after_attempts(attempt, started.elapsed())),
                Err(e) => return Err(e),
            }
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        self.retry("put", key, || self.inner.put(key, data.clone()))
            .await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        self.retry("get", key, || self.inner.get(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.retry("get_range", key, || {
            self.inner.get_range(key, range.clone())
        })
        .await
    }

    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        self.retry("get_tail", key, || self.inner.get_tail(key, len))
            .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        self.retry("head", key, || self.inner.head(key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.retry("list", prefix, || {
            self.inner.list(prefix, start_after, max_keys)
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.retry("delete_many", first, || self.inner.delete_many(keys))
            .await
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

    #[test]
    fn delays_grow_and_stay_capped() {
        let policy = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let first = policy.delay(1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = policy.delay(3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = policy.delay(40);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1));
        }
    }

    #[test]
    fn zero_delay_policy_does_not_sleep() {
        let policy = RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::ZERO,
            max_delay: Duration::ZERO,
        };
        assert_eq!(policy.delay(1), Duration::ZERO);
        assert_eq!(policy.delay(5), Duration::ZERO);
    }
}
