//! A store wrapper that counts requests, so a command can report what it cost and a
//! benchmark can check a bound (e.g. trim's "at most 2 requests per deleted segment")
//! without special cases in the code it measures.
//!
//! Counts are of calls made through the wrapper: one `get_tail` is one request on S3 (a
//! suffix-range GET) and a `head` plus a read on the local directory store. One
//! `delete_many` call is one request on S3 as long as it carries at most 1000 keys (the S3
//! `DeleteObjects` limit); callers that want that cost batch by [`DELETE_BATCH`].
//!
//! Each call is also tallied by its result ([`Outcome`]: ok, not found, already exists,
//! other error), for the `tinylag_store_requests_total` metric; [`CountingStore::counts`]
//! sums over results.
//!
//! Must never: change what a call does or returns.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use super::{ListPage, ObjectMeta, ObjectStore, StoreResult};

/// Most keys per `delete_many` call that S3 answers in one request.
pub const DELETE_BATCH: usize = 1000;

/// Requests made through a [`CountingStore`], by kind (JSON in `--json` outputs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub put_if_absent: u64,
    pub put: u64,
    pub get: u64,
    pub get_range: u64,
    pub get_tail: u64,
    pub head: u64,
    pub list: u64,
    pub delete_many: u64,
    /// Keys passed to `delete_many` (not requests: one call deletes many).
    pub deleted_keys: u64,
}

impl RequestCounts {
    /// Every request, of every kind.
    pub fn total(&self) -> u64 {
        self.put_if_absent
            + self.put
            + self.get
            + self.get_range
            + self.get_tail
            + self.head
            + self.list
            + self.delete_many
    }
}

/// A request kind, in the order of [`RequestCounts`]' fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    PutIfAbsent,
    Put,
    Get,
    GetRange,
    GetTail,
    Head,
    List,
    DeleteMany,
}

impl Operation {
    pub const ALL: [Operation; 8] = [
        Operation::PutIfAbsent,
        Operation::Put,
        Operation::Get,
        Operation::GetRange,
        Operation::GetTail,
        Operation::Head,
        Operation::List,
        Operation::DeleteMany,
    ];

    /// The name in metrics labels (the trait method's name).
    pub fn name(self) -> &'static str {
        match self {
            Operation::PutIfAbsent => "put_if_absent",
            Operation::Put => "put",
            Operation::Get => "get",
            Operation::GetRange => "get_range",
            Operation::GetTail => "get_tail",
            Operation::Head => "head",
            Operation::List => "list",
            Operation::DeleteMany => "delete_many",
        }
    }
}

/// How a request ended. `not_found` and `already_exists` are answers the callers expect
/// (polling for the next segment, a conditional create that lost), not failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    NotFound,
    AlreadyExists,
    Error,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::NotFound,
        Outcome::AlreadyExists,
        Outcome::Error,
    ];

    /// The name in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::AlreadyExists => "already_exists",
            Outcome::Error => "error",
        }
    }

    fn of<T>(result: &StoreResult<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ok,
            Err(e) if e.is_not_found() => Outcome::NotFound,
            Err(e) if e.is_already_exists() => Outcome::AlreadyExists,
            Err(_) => Outcome::Error,
        }
    }
}

/// Calls by operation and outcome.
#[derive(Debug, Default)]
struct Counters {
    calls: [[AtomicU64; 4]; 8],
    deleted_keys: AtomicU64,
    /// Bytes returned by `get`, `get_range` and `get_tail`.
    bytes_read: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Wraps a store and counts the calls made through it.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counters: Counters,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CountingStore {
            inner,
            counters: Counters::default(),
        }
    }

    /// Calls of `op` that ended with `outcome` so far.
    pub fn count(&self, op: Operation, outcome: Outcome) -> u64 {
        self.counters.calls[op as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// The counts so far (every outcome).
    pub fn counts(&self) -> RequestCounts {
        let calls = |op: Operation| Outcome::ALL.iter().map(|&o| self.count(op, o)).sum();
        RequestCounts {
            put_if_absent: calls(Operation::PutIfAbsent),
            put: calls(Operation::Put),
            get: calls(Operation::Get),
            get_range: calls(Operation::GetRange),
            get_tail: calls(Operation::GetTail),
            head: calls(Operation::Head),
            list: calls(Operation::List),
            delete_many: calls(Operation::DeleteMany),
            deleted_keys: self.counters.deleted_keys.load(Ordering::Relaxed),
        }
    }

    /// Object bytes returned by reads (`get`, `get_range`, `get_tail`) so far: what a
    /// command's reads cost in transfer, for reports and benchmarks.
    pub fn bytes_read(&self) -> u64 {
        self.counters.bytes_read.load(Ordering::Relaxed)
    }

    fn read_bytes<T>(&self, result: &StoreResult<T>, len: impl Fn(&T) -> usize) {
        if let Ok(v) = result {
            bump(&self.counters.bytes_read, len(v) as u64);
        }
    }

    /// Tallies `result` under `op` and hands it back.
    fn tally<T>(&self, op: Operation, result: StoreResult<T>) -> StoreResult<T> {
        bump(
            &self.counters.calls[op as usize][Outcome::of(&result) as usize],
            1,
        );
        result
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let result = self.inner.put_if_absent(key, data).await;
        self.tally(Operation::PutIfAbsent, result)
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        let result = self.inner.put(key, data).await;
        self.tally(Operation::Put, result)
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        let result = self.inner.get(key).await;
        self.read_bytes(&result, Bytes::len);
        self.tally(Operation::Get, result)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let result = self.inner.get_range(key, range).await;
        self.read_bytes(&result, Bytes::len);
        self.tally(Operation::GetRange, result)
    }

    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        let result = self.inner.get_tail(key, len).await;
        self.read_bytes(&result, |(b, _)| b.len());
        self.tally(Operation::GetTail, result)
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        let result = self.inner.head(key).await;
        self.tally(Operation::Head, result)
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let result = self.inner.list(prefix, start_after, max_keys).await;
        self.tally(Operation::List, result)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        bump(&self.counters.deleted_keys, keys.len() as u64);
        let result = self.inner.delete_many(keys).await;
        self.tally(Operation::DeleteMany, result)
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

    #[tokio::test]
    async fn counts_each_call_once_and_passes_results_through() {
        let store = CountingStore::new(Arc::new(MemoryStore::new()));
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert!(store
            .put_if_absent("a", Bytes::from_static(b"2"))
            .await
            .unwrap_err()
            .is_already_exists());
        assert_eq!(store.get("a").await.unwrap(), Bytes::from_static(b"1"));
        assert!(store.head("b").await.unwrap_err().is_not_found());
        store
            .delete_many(&["a".to_string(), "b".to_string()])
            .await
            .unwrap();
        let c = store.counts();
        assert_eq!(
            (
                c.put,
                c.put_if_absent,
                c.get,
                c.head,
                c.delete_many,
                c.deleted_keys
            ),
            (1, 1, 1, 1, 1, 2)
        );
        assert_eq!(c.total(), 5);
        assert_eq!(store.count(Operation::Put, Outcome::Ok), 1);
        assert_eq!(
            store.count(Operation::PutIfAbsent, Outcome::AlreadyExists),
            1
        );
        assert_eq!(store.count(Operation::Head, Outcome::NotFound), 1);
        assert_eq!(store.count(Operation::Head, Outcome::Ok), 0);
    }
}
