//! A store wrapper that counts requests, so a command can report what it cost and a
//! benchmark can check a bound (e.g. trim's "at most 2 requests per deleted segment")
//! without special cases in the code it measures.
//!
//! Counts are of calls made through the wrapper: one `get_tail` is one request on S3 (a
//! suffix-range GET) and a `head` plus a read on the local directory store. One
//! `delete_many` call is one request on S3 as long as it carries at most 1000 keys (the S3
//! `DeleteObjects` limit); callers that want that cost batch by [`DELETE_BATCH`].
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

#[derive(Debug, Default)]
struct Counters {
    put_if_absent: AtomicU64,
    put: AtomicU64,
    get: AtomicU64,
    get_range: AtomicU64,
    get_tail: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete_many: AtomicU64,
    deleted_keys: AtomicU64,
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

    /// The counts so far.
    pub fn counts(&self) -> RequestCounts {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            put_if_absent: load(&c.put_if_absent),
            put: load(&c.put),
            get: load(&c.get),
            get_range: load(&c.get_range),
            get_tail: load(&c.get_tail),
            head: load(&c.head),
            list: load(&c.list),
            delete_many: load(&c.delete_many),
            deleted_keys: load(&c.deleted_keys),
        }
    }
}

#[async_trait]
impl ObjectStore for CountingStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        bump(&self.counters.put_if_absent, 1);
        self.inner.put_if_absent(key, data).await
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        bump(&self.counters.put, 1);
        self.inner.put(key, data).await
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        bump(&self.counters.get, 1);
        self.inner.get(key).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        bump(&self.counters.get_range, 1);
        self.inner.get_range(key, range).await
    }

    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        bump(&self.counters.get_tail, 1);
        self.inner.get_tail(key, len).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        bump(&self.counters.head, 1);
        self.inner.head(key).await
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        bump(&self.counters.list, 1);
        self.inner.list(prefix, start_after, max_keys).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        bump(&self.counters.delete_many, 1);
        bump(&self.counters.deleted_keys, keys.len() as u64);
        self.inner.delete_many(keys).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
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
    }
}
