//! Object stores: the one trait every journal byte goes through, and its backends.
//!
//! A store maps keys (`/`-separated, relative to the journal root, never starting
//! with `/`) to immutable byte objects. Backends: [`LocalStore`] (a
//! directory, the embedded default), [`s3::S3Store`] (any S3-compatible service
//! with atomic `If-None-Match: *`), [`MemoryStore`] (tests). Cross-cutting
//! behaviour is a wrapper, never a special case inside a backend:
//! [`RetryingStore`] retries transient failures with jittered backoff,
//! [`FlakyStore`] injects failures in tests.
//!
//! Must never: overwrite an object through [`ObjectStore::put_if_absent`]; report
//! a create that really happened as a conflict; put credentials into an error,
//! a log line or a `Debug` string.

use std::fmt;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

pub(crate) mod counting;
pub(crate) mod flaky;
pub(crate) mod local;
pub(crate) mod memory;
pub(crate) mod retrying;
pub(crate) mod s3;
pub(crate) mod uri;

pub use counting::{CountingStore, RequestCounts, DELETE_BATCH};
pub use flaky::{Call, FailureKind, FlakyStore, Hook};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use retrying::{RetryPolicy, RetryingStore};
pub use s3::{https_client, S3Options, S3Store};
pub use uri::{open_store, open_store_for_command, StoreUri, StoreUriError};

/// What a listing or a `head` reports about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store root.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// One page of a listing. Keys are in ascending byte order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    /// Pass as `start_after` to get the next page; `None` when the listing is complete.
    pub next_start_after: Option<String>,
}

/// Every way a store operation fails. Messages name the key and never carry credentials.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {key} not found in {store}")]
    NotFound { store: String, key: String },
    /// A conditional create found the key already taken (S3 412, or 409 on
    /// servers that answer differently; the local store's exclusive link failed).
    #[error("object {key} already exists in {store} (conditional create refused)")]
    AlreadyExists { store: String, key: String },
    /// A ranged read asked for bytes past the end of the object.
    #[error("range {start}..{end} is outside object {key} of {size} bytes in {store}")]
    InvalidRange {
        store: String,
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    /// The key is empty, absolute, contains `..` or other characters a store cannot hold.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// A failure that may pass: timeouts, throttling, 5xx, connection resets. Retried by
    /// [`RetryingStore`].
    #[error("transient error on {key} in {store}: {message}")]
    Transient {
        store: String,
        key: String,
        message: String,
    },
    /// A failure that retrying will not fix: access denied, no such bucket, a full disk.
    #[error("store error on {key} in {store}: {message}")]
    Permanent {
        store: String,
        key: String,
        message: String,
    },
    /// Local file-system failure.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// A transient error that ended a retry loop, saying so: "… (gave up after 4 attempts in
    /// 1.6 s)". Other errors (an answer after retries) are returned as they are.
    pub fn after_attempts(self, attempts: u32, spent: std::time::Duration) -> StoreError {
        match self {
            StoreError::Transient {
                store,
                key,
                message,
            } => StoreError::Transient {
                store,
                key,
                message: format!(
                    "{message} (gave up after {attempts} attempts in {:.1} s)",
                    spent.as_secs_f64()
                ),
            },
            other => other,
        }
    }

    /// True when retrying the same call may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Transient { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::WouldBlock
            ),
            _ => false,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::NotFound { .. })
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, StoreError::AlreadyExists { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The one interface to object storage.
///
/// # Invariants
/// - `put_if_absent` is atomic: of any number of concurrent creates of one key, exactly one
///   returns `Ok`, the rest `AlreadyExists`, and the object then holds the winner's bytes.
/// - An object, once visible, is complete: readers never see a partial `put`.
/// - `list` returns keys in ascending byte order, `max_keys` at most per page.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// Creates `key` only if it does not exist yet.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()>;
    /// Creates or replaces `key` (for mutable metadata: consumer positions, the trim pointer).
    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()>;
    /// Reads a whole object.
    async fn get(&self, key: &str) -> StoreResult<Bytes>;
    /// Reads `range` of an object; the range must lie inside the object.
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;
    /// The last `len` bytes of an object (all of it if shorter) and the object's total size.
    /// S3 answers this with one suffix-range GET; the default costs a `head` and a ranged read.
    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        let size = self.head(key).await?.size;
        let data = self.get_range(key, tail_range(size, len)).await?;
        Ok((data, size))
    }
    /// Size of an object.
    async fn head(&self, key: &str) -> StoreResult<ObjectMeta>;
    /// One page of keys starting with `prefix` and greater than `start_after`.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage>;
    /// Deletes the keys; deleting a missing key is not an error.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()>;
    /// A display name for messages, e.g. `s3://bucket/prefix` or `/var/lib/tinylag/j1`.
    fn describe(&self) -> String;
    /// The directory holding the objects when the store is a local directory (through any
    /// wrappers), for side files that are not objects (the undo log's generation); `None`
    /// for every other store.
    fn local_root(&self) -> Option<&std::path::Path> {
        None
    }
}

/// Reads a ranged tail: the last `len` bytes of an object of `size` bytes.
pub(crate) fn tail_range(size: u64, len: u64) -> Range<u64> {
    size.saturating_sub(len)..size
}

/// Lists every key under `prefix` (follows pagination). For metadata folders that stay small
/// (epochs, consumers); never call it on the segment folders in a hot path.
pub async fn list_all(store: &dyn ObjectStore, prefix: &str) -> StoreResult<Vec<ObjectMeta>> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, after.as_deref(), 1000).await?;
        all.extend(page.objects);
        match page.next_start_after {
            Some(next) => after = Some(next),
            None => return Ok(all),
        }
    }
}

/// Checks that `range` lies inside an object of `size` bytes and returns its length.
pub(crate) fn check_object_range(
    store: &str,
    key: &str,
    range: &Range<u64>,
    size: u64,
) -> StoreResult<usize> {
    let invalid = || StoreError::InvalidRange {
        store: store.to_string(),
        key: key.to_string(),
        start: range.start,
        end: range.end,
        size,
    };
    if range.start > range.end || range.end > size {
        return Err(invalid());
    }
    usize::try_from(range.end - range.start).map_err(|_| invalid())
}

/// Checks a key before any backend touches it.
pub(crate) fn validate_key(key: &str) -> StoreResult<()> {
    let reason = if key.is_empty() {
        Some("empty")
    } else if key.starts_with('/') {
        Some("absolute")
    } else if key
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
    {
        Some("empty, `.` or `..` path component")
    } else if key.chars().any(|c| c.is_control()) {
        Some("control character")
    } else if key.len() > 900 {
        Some("longer than 900 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a list prefix: empty (the whole store) or a key-shaped prefix, possibly ending in `/`.
pub(crate) fn validate_prefix(prefix: &str) -> StoreResult<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    validate_key(prefix.trim_end_matches('/'))
}
