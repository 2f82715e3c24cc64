//! Store addresses as an operator types them, and opening the store behind one.
//!
//! Accepted forms: `/abs/path`, `./rel/path` or `rel/path` (made absolute against the
//! current directory), `file:///abs/path`, `s3://bucket[/prefix]`, `mem://[name]`.
//! [`open_store`] builds the backend and wraps it in a [`RetryingStore`].
//!
//! Must never: guess at a scheme it does not know (a typo like `s4://b` is an error, not a
//! local directory named `s4:`), nor take a mistyped address for a local path (`s3:/b/j`,
//! `s3//b/j`, `S3://b`, `file:/x` are refused as addresses: a directory named like that is
//! written `./s3:/b/j`); give two different `mem://` names the same store.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, OnceLock};

use super::local::LocalStore;
use super::memory::MemoryStore;
use super::retrying::{RetryPolicy, RetryingStore};
use super::s3::{check_bucket, normalize_prefix, S3ConfigError, S3Options, S3Store};
use super::ObjectStore;

/// The accepted forms, for error messages.
const ACCEPTED: &str =
    "/abs/path, ./rel/path, file:///abs/path, s3://bucket[/prefix] or mem://[name]";

/// Why a store address could not be parsed or opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreUriError {
    /// Nothing was given.
    #[error("empty store address; accepted: {ACCEPTED}")]
    Empty,
    /// A `scheme://` this program does not know.
    #[error("unknown scheme in store address {uri:?}; accepted: {ACCEPTED}")]
    UnknownScheme { uri: String },
    /// Something that reads as a mistyped address (`s3:/bucket`, `s3//bucket`, `S3://b`),
    /// not as a local path.
    #[error("store address {uri:?} is not a valid address: {reason}; accepted: {ACCEPTED}")]
    Malformed { uri: String, reason: String },
    /// `file://` followed by something other than an absolute path.
    #[error("store address {uri:?} must be file:///abs/path (three slashes, absolute path); accepted: {ACCEPTED}")]
    FileNotAbsolute { uri: String },
    /// `s3://` without a bucket, or with an invalid bucket or prefix.
    #[error("invalid S3 store address {uri:?}: {source} (expected s3://bucket[/prefix])")]
    S3Address {
        uri: String,
        #[source]
        source: S3ConfigError,
    },
    /// The relative path could not be made absolute (no current directory).
    #[error("cannot make store path {path:?} absolute")]
    Relative {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The S3 client could not be configured (bad endpoint, bucket or prefix).
    #[error("cannot open S3 store {uri}")]
    S3Config {
        uri: String,
        #[source]
        source: S3ConfigError,
    },
}

/// A parsed store address. `Display` gives the canonical form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUri {
    /// A local directory (always absolute).
    Local(PathBuf),
    /// A bucket and a prefix (`""` or ending in `/`).
    S3 { bucket: String, prefix: String },
    /// A process-wide in-memory store, shared by everyone who opens the same name.
    Memory(String),
}

impl StoreUri {
    /// Parses an address; see the module documentation for the forms.
    pub fn parse(s: &str) -> Result<Self, StoreUriError> {
        if s.is_empty() {
            return Err(StoreUriError::Empty);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let s3_error = |source| StoreUriError::S3Address {
                uri: s.to_string(),
                source,
            };
            check_bucket(bucket).map_err(s3_error)?;
            let prefix = normalize_prefix(prefix).map_err(s3_error)?;
            return Ok(StoreUri::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(StoreUriError::FileNotAbsolute { uri: s.to_string() });
            }
            return Ok(StoreUri::Local(PathBuf::from(rest)));
        }
        if let Some(name) = s.strip_prefix("mem://") {
            return Ok(StoreUri::Memory(name.to_string()));
        }
        if let Some(reason) = mistyped_scheme(s) {
            return Err(StoreUriError::Malformed {
                uri: s.to_string(),
                reason,
            });
        }
        if s.contains("://") {
            return Err(StoreUriError::UnknownScheme { uri: s.to_string() });
        }
        let path = Path::new(s);
        let absolute = std::path::absolute(path).map_err(|source| StoreUriError::Relative {
            path: s.to_string(),
            source,
        })?;
        Ok(StoreUri::Local(absolute))
    }
}

/// Why `s`, which is none of the accepted forms, reads as a mistyped address rather than a
/// relative path: its first component is a scheme (`s3:`, `file:`, `mem:`, any `word:`
/// followed by `/`) without its `//`, or a known scheme name followed by `//`, or a known
/// scheme in capitals.
fn mistyped_scheme(s: &str) -> Option<String> {
    const SCHEMES: [&str; 3] = ["s3", "file", "mem"];
    let (first, rest) = s.split_once('/').unwrap_or((s, ""));
    if let Some((scheme, after)) = first.split_once(':') {
        let lower = scheme.to_ascii_lowercase();
        let known = SCHEMES.contains(&lower.as_str());
        let scheme_like = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        let looks_like_a_scheme =
            known || (scheme_like && after.is_empty() && s.len() > first.len());
        if looks_like_a_scheme && !s.contains("://") {
            return Some(format!(
                "`{scheme}:` must be followed by two slashes ({lower}://…); a local directory \
                 named like this is written ./{s}"
            ));
        }
        if known && lower != scheme {
            return Some(format!("schemes are lower case ({lower}://…)"));
        }
    }
    if SCHEMES.contains(&first.to_ascii_lowercase().as_str()) && rest.starts_with('/') {
        return Some(format!(
            "`{first}` must be followed by a colon ({first}://…)"
        ));
    }
    None
}

impl FromStr for StoreUri {
    type Err = StoreUriError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreUri::parse(s)
    }
}

impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUri::Local(path) => write!(f, "{}", path.display()),
            StoreUri::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StoreUri::Memory(name) => write!(f, "mem://{name}"),
        }
    }
}

/// Opens the store at `uri`, wrapped in a [`RetryingStore`] with the default policy.
///
/// Local stores touch nothing on disk until the first write; S3 stores load the standard
/// AWS configuration (which is why this is async) but do not contact the service yet.
pub async fn open_store(
    uri: &StoreUri,
    opts: &S3Options,
) -> Result<Arc<dyn ObjectStore>, StoreUriError> {
    Ok(Arc::new(RetryingStore::new(open_backend(uri, opts).await?)))
}

/// Like [`open_store`], for a command an operator waits on (`journal info`, `restore`): a
/// store that has never answered fails within two seconds, quietly retried
/// ([`RetryingStore::failing_fast_at_first`]), instead of after the daemons' full budget.
pub async fn open_store_for_command(
    uri: &StoreUri,
    opts: &S3Options,
) -> Result<Arc<dyn ObjectStore>, StoreUriError> {
    let store = RetryingStore::new(open_backend(uri, opts).await?)
        .failing_fast_at_first(RetryPolicy::first_contact());
    Ok(Arc::new(store))
}

async fn open_backend(
    uri: &StoreUri,
    opts: &S3Options,
) -> Result<Arc<dyn ObjectStore>, StoreUriError> {
    let inner: Arc<dyn ObjectStore> = match uri {
        StoreUri::Local(path) => Arc::new(LocalStore::new(path.clone())),
        StoreUri::S3 { bucket, prefix } => Arc::new(
            S3Store::connect(bucket, prefix, opts)
                .await
                .map_err(|source| StoreUriError::S3Config {
                    uri: uri.to_string(),
                    source,
                })?,
        ),
        StoreUri::Memory(name) => memory_store(name),
    };
    Ok(inner)
}

/// The process-wide registry behind `mem://name`.
fn memory_store(name: &str) -> Arc<MemoryStore> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<MemoryStore>>>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
    // Inserting is one call, so a poisoned lock still holds a consistent map.
    let mut stores = crate::sync::lock(registry);
    stores
        .entry(name.to_string())
        .or_insert_with(|| Arc::new(MemoryStore::named(&format!("mem://{name}"))))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn parse(s: &str) -> StoreUri {
        StoreUri::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn local_forms() {
        assert_eq!(parse("/var/lib/j1"), StoreUri::Local("/var/lib/j1".into()));
        assert_eq!(
            parse("file:///var/lib/j1"),
            StoreUri::Local("/var/lib/j1".into())
        );
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(parse("rel/j1"), StoreUri::Local(cwd.join("rel/j1")));
        assert_eq!(parse("./j1"), StoreUri::Local(cwd.join("j1")));
        // A colon in a plain path is fine; only `://` makes a scheme.
        assert_eq!(parse("/tmp/a:b"), StoreUri::Local("/tmp/a:b".into()));
    }

    #[test]
    fn s3_forms() {
        assert_eq!(
            parse("s3://bucket"),
            StoreUri::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse("s3://bucket/"),
            StoreUri::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse("s3://bucket/a/b"),
            StoreUri::S3 {
                bucket: "bucket".into(),
                prefix: "a/b/".into()
            }
        );
        assert_eq!(parse("s3://bucket/a/b/").to_string(), "s3://bucket/a/b/");
    }

    #[test]
    fn memory_forms() {
        assert_eq!(parse("mem://"), StoreUri::Memory(String::new()));
        assert_eq!(parse("mem://t1"), StoreUri::Memory("t1".into()));
        assert_eq!(parse("mem://t1").to_string(), "mem://t1");
    }

    #[test]
    fn errors_name_the_accepted_forms() {
        for (bad, expect) in [
            ("", "empty"),
            ("s4://bucket", "unknown scheme"),
            ("file://relative/x", "three slashes"),
            ("s3://", "S3"),
            ("s3://bu/cket/../x", "S3"),
            ("s3://bad bucket", "S3"),
            ("s3:/bucket/j", "`s3:` must be followed by two slashes"),
            ("s3:bucket/j", "`s3:` must be followed by two slashes"),
            ("s3//bucket/j", "`s3` must be followed by a colon"),
            ("S3://bucket/j", "schemes are lower case (s3://"),
            ("file:/var/j", "`file:` must be followed by two slashes"),
            ("s3:///j", "S3"),
        ] {
            let err = StoreUri::parse(bad).expect_err(bad);
            let text = err.to_string();
            assert!(text.contains(expect), "{bad:?}: {text}");
            if !matches!(err, StoreUriError::S3Address { .. }) {
                assert!(text.contains("s3://bucket[/prefix]"), "{bad:?}: {text}");
            }
        }
    }

    #[tokio::test]
    async fn same_memory_name_same_store() {
        let opts = S3Options::default();
        let a = open_store(&parse("mem://uri-test-shared"), &opts)
            .await
            .expect("open a");
        let b = open_store(&parse("mem://uri-test-shared"), &opts)
            .await
            .expect("open b");
        let other = open_store(&parse("mem://uri-test-other"), &opts)
            .await
            .expect("open other");
        a.put("k", Bytes::from_static(b"v")).await.expect("put");
        assert_eq!(
            b.get("k").await.expect("same store"),
            Bytes::from_static(b"v")
        );
        assert!(other
            .get("k")
            .await
            .expect_err("other store")
            .is_not_found());
        assert_eq!(a.describe(), "mem://uri-test-shared");
    }

    #[tokio::test]
    async fn local_open_is_lazy_and_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("j1");
        let uri = parse(&format!("file://{}", root.display()));
        let store = open_store(&uri, &S3Options::default()).await.expect("open");
        assert!(!root.exists(), "opening must not create the root");
        store
            .put_if_absent("tinylag.json", Bytes::from_static(b"{}"))
            .await
            .expect("create");
        assert!(root.join("tinylag.json").is_file());
    }
}
