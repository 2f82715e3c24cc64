//! In-memory store for unit tests and `mem://` journals that live as long as the process.
//!
//! Must never: be the store of anything an operator expects to survive a restart.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    check_object_range, validate_key, validate_prefix, ListPage, ObjectMeta, ObjectStore,
    StoreError, StoreResult,
};

/// A `BTreeMap` behind a mutex: ordered listing and atomic conditional create come for free.
#[derive(Debug, Default)]
pub struct MemoryStore {
    name: String,
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::named("mem://")
    }

    pub fn named(name: &str) -> Self {
        MemoryStore {
            name: name.to_string(),
            objects: Mutex::new(BTreeMap::new()),
        }
    }

    fn not_found(&self, key: &str) -> StoreError {
        StoreError::NotFound {
            store: self.name.clone(),
            key: key.to_string(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (every
        // mutation is one call), so a poisoned lock is still consistent.
        crate::sync::lock(&self.objects)
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        validate_key(key)?;
        let mut objects = self.lock();
        if objects.contains_key(key) {
            return Err(StoreError::AlreadyExists {
                store: self.name.clone(),
                key: key.to_string(),
            });
        }
        objects.insert(key.to_string(), data);
        Ok(())
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        validate_key(key)?;
        self.lock().insert(key.to_string(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.lock()
            .get(key)
            .cloned()
            .ok_or_else(|| self.not_found(key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let data = self.get(key).await?;
        let len = check_object_range(&self.name, key, &range, data.len() as u64)?;
        let start = range.start as usize;
        Ok(data.slice(start..start + len))
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        validate_key(key)?;
        self.lock()
            .get(key)
            .map(|d| ObjectMeta {
                key: key.to_string(),
                size: d.len() as u64,
            })
            .ok_or_else(|| self.not_found(key))
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let max_keys = max_keys.max(1);
        let objects = self.lock();
        let lower = match start_after {
            Some(after) if after >= prefix => std::ops::Bound::Excluded(after.to_string()),
            _ => std::ops::Bound::Included(prefix.to_string()),
        };
        let mut page = ListPage::default();
        for (key, data) in objects.range((lower, std::ops::Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if page.objects.len() == max_keys {
                page.next_start_after = page.objects.last().map(|o| o.key.clone());
                break;
            }
            page.objects.push(ObjectMeta {
                key: key.clone(),
                size: data.len() as u64,
            });
        }
        Ok(page)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            validate_key(key)?;
        }
        let mut objects = self.lock();
        for key in keys {
            objects.remove(key);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
