//! S3 store (`s3://bucket/prefix`), for AWS S3 and S3-compatible services, with aws-sdk-s3.
//!
//! Keys are stored under the prefix: key `epochs/00000000000000000001` of
//! `s3://b/j1` is object `j1/epochs/00000000000000000001` of bucket `b`. Conditional
//! creates use `If-None-Match: *`, so the service must support it (AWS S3 since 2024,
//! MinIO, Ceph RGW, s3s, moto); a service that rejects the header fails the create with
//! a permanent error rather than overwriting.
//!
//! Configuration: endpoint from [`S3Options::endpoint`] or the standard `AWS_ENDPOINT_URL`
//! (`AWS_ENDPOINT_URL_S3`); region from the option, the standard chain, or `us-east-1`;
//! path-style addressing when asked or when the endpoint host is an IP address or
//! `localhost`; credentials from the standard AWS chain (environment, profile, instance
//! role).
//!
//! The SDK's own retries are turned off: [`super::retrying::RetryingStore`] is the one
//! retry policy, and only it knows how to resolve a conditional create whose answer was
//! lost (an SDK-internal retry would turn our own successful create into a 412).
//!
//! Must never: print, log or put into an error any credential (the `Debug` impl shows the
//! bucket, prefix and endpoint only); treat an unsupported conditional create as success.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::Bytes;

use super::{
    tail_range, validate_key, validate_prefix, ListPage, ObjectMeta, ObjectStore, StoreError,
    StoreResult,
};

/// DeleteObjects takes at most this many keys per request.
const DELETE_BATCH: usize = 1000;
/// ListObjectsV2 returns at most this many keys per page.
const LIST_PAGE_MAX: usize = 1000;

/// How to reach an S3 service; everything unset comes from the standard AWS chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL (`http(s)://host[:port]`) of an S3-compatible service; `None` uses
    /// `AWS_ENDPOINT_URL` or AWS itself.
    pub endpoint: Option<String>,
    /// Region; `None` uses the standard chain (`AWS_REGION`, profile), then `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket/key` instead of `bucket.endpoint/key`. Implied
    /// when the endpoint host is an IP address or `localhost`.
    pub force_path_style: bool,
}

/// Why an S3 store could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum S3ConfigError {
    /// The endpoint is not an `http://` or `https://` URL with a host.
    #[error(
        "invalid S3 endpoint {endpoint:?}: expected http://HOST[:PORT] or https://HOST[:PORT]"
    )]
    Endpoint { endpoint: String },
    /// The bucket name cannot be a bucket.
    #[error("invalid S3 bucket name {bucket:?}: {reason}")]
    Bucket {
        bucket: String,
        reason: &'static str,
    },
    /// The prefix is not key-shaped (empty components, `.`, `..`, control characters).
    #[error("invalid S3 prefix {prefix:?}: {reason}")]
    Prefix {
        prefix: String,
        reason: &'static str,
    },
}

/// A journal root in an S3 bucket, under a prefix.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// `""` or a prefix ending in `/`.
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    endpoint: Option<String>,
    path_style: bool,
}

impl fmt::Debug for S3Store {
    // By hand, so that no client or credential internals ever reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// The one HTTPS client of the SDK: rustls with the ring provider (the SDK's default,
/// aws-lc-rs, is a large C build; see Cargo.toml). Plain `http://` endpoints work too.
pub fn https_client() -> aws_sdk_s3::config::SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

impl S3Store {
    /// Connects with credentials and region from the standard AWS chain.
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        opts: &S3Options,
    ) -> Result<Self, S3ConfigError> {
        check_bucket(bucket)?;
        let prefix = normalize_prefix(prefix)?;
        if let Some(endpoint) = &opts.endpoint {
            check_endpoint(endpoint)?;
        }
        // The loader's own chains (region, credentials) use the loader's HTTP client for
        // instance metadata; a region chain built apart from it would have none.
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).http_client(https_client());
        if let Some(region) = &opts.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        // The endpoint that will be used, to decide on path-style addressing.
        let endpoint = opts
            .endpoint
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_S3").ok())
            .or_else(|| sdk.endpoint_url().map(str::to_string));
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            builder = builder.region(Region::from_static("us-east-1"));
        }
        if let Some(explicit) = &opts.endpoint {
            builder = builder.endpoint_url(explicit);
        }
        Ok(Self::build(builder, bucket, prefix, endpoint, opts))
    }

    /// Connects with the given static credentials and never reads the environment or a
    /// profile: for tests against local servers with dummy keys.
    pub fn with_credentials(
        bucket: &str,
        prefix: &str,
        opts: &S3Options,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, S3ConfigError> {
        check_bucket(bucket)?;
        let prefix = normalize_prefix(prefix)?;
        if let Some(endpoint) = &opts.endpoint {
            check_endpoint(endpoint)?;
        }
        let region = opts.region.clone().unwrap_or_else(|| "us-east-1".into());
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(Credentials::new(
                access_key_id,
                secret_access_key,
                None,
                None,
                "tinylag-static",
            ));
        if let Some(endpoint) = &opts.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self::build(
            builder,
            bucket,
            prefix,
            opts.endpoint.clone(),
            opts,
        ))
    }

    fn build(
        builder: aws_sdk_s3::config::Builder,
        bucket: &str,
        prefix: String,
        endpoint: Option<String>,
        opts: &S3Options,
    ) -> Self {
        let path_style = opts.force_path_style
            || endpoint
                .as_deref()
                .and_then(endpoint_host)
                .is_some_and(host_needs_path_style);
        let config = builder
            .http_client(https_client())
            .force_path_style(path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .read_timeout(Duration::from_secs(30))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            )
            // Segments carry their own CRC32C; checksums only where the API demands one
            // keeps S3-compatible services that predate flexible checksums working.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        let url = format!("s3://{bucket}/{prefix}");
        S3Store {
            client: Client::from_conf(config),
            bucket: bucket.to_string(),
            prefix,
            url,
            endpoint,
            path_style,
        }
    }

    /// The bucket holding the objects.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The key prefix inside the bucket (`""` or ending in `/`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether requests use path-style addressing.
    pub fn path_style(&self) -> bool {
        self.path_style
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn invalid_range(&self, key: &str, range: &Range<u64>, size: u64) -> StoreError {
        StoreError::InvalidRange {
            store: self.url.clone(),
            key: key.to_string(),
            start: range.start,
            end: range.end,
            size,
        }
    }

    fn transient(&self, key: &str, message: String) -> StoreError {
        StoreError::Transient {
            store: self.url.clone(),
            key: key.to_string(),
            message,
        }
    }

    fn permanent(&self, key: &str, message: String) -> StoreError {
        StoreError::Permanent {
            store: self.url.clone(),
            key: key.to_string(),
            message,
        }
    }

    /// Maps an SDK failure to a store error, and tells the HTTP status if there was an answer.
    fn classify<E>(&self, key: &str, err: &SdkError<E, HttpResponse>) -> (Option<u16>, StoreError)
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = error_chain(err);
        match err {
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
                (None, self.transient(key, message))
            }
            SdkError::DispatchFailure(failure) => {
                // A connection that closed or reset under a request sent on it (the server
                // died or restarted) is reported as an "other" failure by the HTTP client,
                // but it is as transient as any I/O error.
                let connection_lost = message.contains("SendRequest")
                    || message.contains("connection closed")
                    || message.contains("connection reset");
                if failure.is_io() || failure.is_timeout() || connection_lost {
                    (None, self.transient(key, with_endpoint_hint(message)))
                } else {
                    // Missing credentials, a malformed endpoint: retrying will not help.
                    (None, self.permanent(key, with_credentials_hint(message)))
                }
            }
            SdkError::ConstructionFailure(_) => {
                (None, self.permanent(key, with_credentials_hint(message)))
            }
            SdkError::ServiceError(service) => {
                let status = service.raw().status().as_u16();
                let code = service.err().code().unwrap_or("");
                // The service's own words only: the full error context would dump the raw
                // response into every log line.
                let message = match service.err().message() {
                    Some(said) => format!("HTTP {status} {code}: {said}"),
                    None => format!("HTTP {status} {code}"),
                };
                let error = match (status, code) {
                    (_, "NoSuchBucket") => self.permanent(
                        key,
                        format!(
                            "{message}; create the bucket first (aws s3 mb s3://{})",
                            self.bucket
                        ),
                    ),
                    (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                        self.permanent(key, format!("{message}; {CREDENTIALS_HINT}"))
                    }
                    // A service without conditional writes: no retry will give it them.
                    (501, _) | (_, "NotImplemented") => self.permanent(key, message),
                    (404, _) | (_, "NoSuchKey") | (_, "NotFound") => StoreError::NotFound {
                        store: self.url.clone(),
                        key: key.to_string(),
                    },
                    (_, "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout")
                    | (_, "InternalError" | "ServiceUnavailable" | "RequestTimeTooSkewed")
                    | (408 | 429 | 500..=599, _) => self.transient(key, message),
                    _ => self.permanent(key, message),
                };
                (Some(status), error)
            }
            // Future SDK variants: take the cautious road, an operator sees the message.
            _ => (
                err.raw_response().map(|r| r.status().as_u16()),
                self.permanent(key, message),
            ),
        }
    }

    /// GET with an optional `Range` header; returns the body and the `Content-Range` header.
    async fn get_object(
        &self,
        key: &str,
        range: Option<String>,
    ) -> Result<(Bytes, Option<String>), (Option<u16>, StoreError)> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .set_range(range)
            .send()
            .await
            .map_err(|e| self.classify(key, &e))?;
        let content_range = out.content_range().map(str::to_string);
        let body = out.body.collect().await.map_err(|e| {
            (
                None,
                self.transient(key, format!("reading the response body: {e}")),
            )
        })?;
        Ok((body.into_bytes(), content_range))
    }
}

/// The total size from a `Content-Range: bytes FIRST-LAST/TOTAL` header.
fn content_range_total(header: &str) -> Option<u64> {
    header.rsplit_once('/')?.1.trim().parse().ok()
}

/// The host of an `http(s)://` URL, without port or brackets.
fn endpoint_host(endpoint: &str) -> Option<&str> {
    let rest = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then_some(host)
}

/// Virtual-hosted addressing needs DNS names per bucket, which IPs and `localhost` lack.
fn host_needs_path_style(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok()
}

fn check_endpoint(endpoint: &str) -> Result<(), S3ConfigError> {
    match endpoint_host(endpoint) {
        Some(_) => Ok(()),
        None => Err(S3ConfigError::Endpoint {
            endpoint: endpoint.to_string(),
        }),
    }
}

/// Accepts AWS bucket names and the looser names some S3-compatible services allow
/// (upper case, `_`), but nothing that would change the request path.
pub(crate) fn check_bucket(bucket: &str) -> Result<(), S3ConfigError> {
    let reason = if bucket.is_empty() {
        Some("empty")
    } else if bucket.len() > 255 {
        Some("longer than 255 characters")
    } else if !bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        Some("only letters, digits, `-`, `.` and `_` are allowed")
    } else if !bucket.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        Some("must start with a letter or digit")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(S3ConfigError::Bucket {
            bucket: bucket.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// `""` stays `""`; anything else becomes `a/b/` after checking it is key-shaped.
pub(crate) fn normalize_prefix(prefix: &str) -> Result<String, S3ConfigError> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    validate_key(trimmed).map_err(|e| S3ConfigError::Prefix {
        prefix: prefix.to_string(),
        reason: match e {
            StoreError::InvalidKey { reason, .. } => reason,
            _ => "not a valid key prefix",
        },
    })?;
    Ok(format!("{trimmed}/"))
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put_if_absent(&self, key: &str, data: Bytes) -> StoreResult<()> {
        validate_key(key)?;
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(key, &e) {
                // 412 PreconditionFailed is the answer; 409 ConditionalRequestConflict comes
                // when another conditional write of the key is in flight; both mean someone
                // else holds (or is taking) the key.
                (Some(412 | 409), _) => Err(StoreError::AlreadyExists {
                    store: self.url.clone(),
                    key: key.to_string(),
                }),
                (_, err) => Err(err),
            },
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> StoreResult<()> {
        validate_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .body(ByteStream::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.classify(key, &e).1)
    }

    async fn get(&self, key: &str) -> StoreResult<Bytes> {
        validate_key(key)?;
        self.get_object(key, None)
            .await
            .map(|(data, _)| data)
            .map_err(|(_, e)| e)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        validate_key(key)?;
        if range.start >= range.end {
            // HTTP cannot ask for zero bytes; the size alone decides.
            let size = self.head(key).await?.size;
            if range.start > range.end || range.end > size {
                return Err(self.invalid_range(key, &range, size));
            }
            return Ok(Bytes::new());
        }
        let header = format!("bytes={}-{}", range.start, range.end - 1);
        let (data, content_range) = match self.get_object(key, Some(header)).await {
            Ok(answer) => answer,
            Err((Some(416), _)) => {
                let size = self.head(key).await?.size;
                return Err(self.invalid_range(key, &range, size));
            }
            Err((_, e)) => return Err(e),
        };
        let want = range.end - range.start;
        match content_range.as_deref().and_then(content_range_total) {
            // S3 clips a range that runs past the end; ours must lie inside the object.
            Some(total) if range.end > total => Err(self.invalid_range(key, &range, total)),
            Some(_) if data.len() as u64 == want => Ok(data),
            Some(_) => Err(self.transient(
                key,
                format!("ranged read returned {} bytes, expected {want}", data.len()),
            )),
            // No Content-Range: the service ignored the Range header and sent it all.
            None => {
                let size = data.len() as u64;
                if range.end > size {
                    return Err(self.invalid_range(key, &range, size));
                }
                Ok(data.slice(range.start as usize..range.end as usize))
            }
        }
    }

    /// One suffix-range GET (`Range: bytes=-len`); the size comes from `Content-Range`.
    async fn get_tail(&self, key: &str, len: u64) -> StoreResult<(Bytes, u64)> {
        validate_key(key)?;
        if len == 0 {
            let size = self.head(key).await?.size;
            return Ok((Bytes::new(), size));
        }
        match self.get_object(key, Some(format!("bytes=-{len}"))).await {
            Ok((data, content_range)) => {
                match content_range.as_deref().and_then(content_range_total) {
                    Some(total) => {
                        let expected = len.min(total);
                        if data.len() as u64 != expected {
                            return Err(self.transient(
                                key,
                                format!(
                                    "suffix read returned {} bytes, expected {expected}",
                                    data.len()
                                ),
                            ));
                        }
                        Ok((data, total))
                    }
                    // The whole object came back (the service ignored the Range header).
                    None => {
                        let size = data.len() as u64;
                        let tail = tail_range(size, len);
                        Ok((data.slice(tail.start as usize..tail.end as usize), size))
                    }
                }
            }
            // Some services answer a suffix range on an empty object with 416, and some
            // (s3s-fs 0.14) fail a suffix longer than the object with 500. A head and an
            // ordinary range work on all of them; if the 500 was a real outage, they fail
            // too and the caller's retry policy takes over.
            Err((Some(416 | 500), _)) => {
                let size = self.head(key).await?.size;
                let data = self.get_range(key, tail_range(size, len)).await?;
                Ok((data, size))
            }
            Err((_, e)) => Err(e),
        }
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectMeta> {
        validate_key(key)?;
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| self.classify(key, &e).1)?;
        let size = out.content_length().unwrap_or(0);
        Ok(ObjectMeta {
            key: key.to_string(),
            size: u64::try_from(size).unwrap_or(0),
        })
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        validate_prefix(prefix)?;
        let max_keys = max_keys.clamp(1, LIST_PAGE_MAX);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .set_start_after(start_after.map(|a| self.full_key(a)))
            .max_keys(max_keys as i32)
            .send()
            .await
            .map_err(|e| self.classify(prefix, &e).1)?;
        let mut page = ListPage::default();
        for object in out.contents() {
            let Some(full) = object.key() else { continue };
            let Some(key) = full.strip_prefix(self.prefix.as_str()) else {
                return Err(self.permanent(
                    prefix,
                    format!("listing returned key {full:?} outside the prefix"),
                ));
            };
            page.objects.push(ObjectMeta {
                key: key.to_string(),
                size: u64::try_from(object.size().unwrap_or(0)).unwrap_or(0),
            });
        }
        if out.is_truncated().unwrap_or(false) {
            match page.objects.last() {
                Some(last) => page.next_start_after = Some(last.key.clone()),
                None => {
                    return Err(self.permanent(
                        prefix,
                        "listing is marked truncated but holds no keys".to_string(),
                    ))
                }
            }
        }
        Ok(page)
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for key in keys {
            validate_key(key)?;
        }
        for batch in keys.chunks(DELETE_BATCH) {
            let first = batch.first().map(String::as_str).unwrap_or("");
            let ids = batch
                .iter()
                .map(|k| ObjectIdentifier::builder().key(self.full_key(k)).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.permanent(first, format!("building the request: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| self.permanent(first, format!("building the request: {e}")))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| self.classify(first, &e).1)?;
            // A missing key is deleted already; anything else fails the call, transiently if
            // the service says so, so that a retry deletes what is left.
            let failed: Vec<_> = out
                .errors()
                .iter()
                .filter(|e| e.code() != Some("NoSuchKey"))
                .collect();
            if let Some(first_failure) = failed.first() {
                let key = first_failure
                    .key()
                    .map(|k| k.strip_prefix(self.prefix.as_str()).unwrap_or(k))
                    .unwrap_or(first)
                    .to_string();
                let code = first_failure.code().unwrap_or("unknown");
                let message = format!(
                    "{} of {} deletions failed, first: {code}: {}",
                    failed.len(),
                    batch.len(),
                    first_failure.message().unwrap_or("")
                );
                let transient = failed.iter().all(|e| {
                    matches!(
                        e.code(),
                        Some(
                            "InternalError" | "SlowDown" | "ServiceUnavailable" | "RequestTimeout"
                        )
                    )
                });
                return Err(if transient {
                    self.transient(&key, message)
                } else {
                    self.permanent(&key, message)
                });
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

/// What to set when S3 credentials are missing or refused (never a credential's value).
const CREDENTIALS_HINT: &str = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE \
     (a profile in ~/.aws/credentials); for an S3-compatible server also --s3-endpoint URL";

/// A failure to find credentials said as what to set: the SDK's own words ("failed to load
/// IMDS session token", "the credential provider was not enabled") name none of it.
fn with_credentials_hint(message: String) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("credential") || lower.contains("imds") || lower.contains("identity") {
        // On one line: the SDK lists each provider it tried on a line of its own.
        let said: Vec<&str> = message.lines().map(str::trim).collect();
        format!(
            "no usable S3 credentials: {CREDENTIALS_HINT} (the AWS SDK said: {})",
            said.join(" ")
        )
    } else {
        message
    }
}

/// A connection failure names the flag that says where S3 is.
fn with_endpoint_hint(message: String) -> String {
    format!("{message}; is the S3 endpoint right and up? (--s3-endpoint URL, or AWS_ENDPOINT_URL)")
}

/// The messages of an error and its sources, joined by `: `, each said once. The SDK's own
/// context formatting appends `Debug` dumps of every layer, unreadable in a log line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let said = e.to_string();
        if !said.is_empty() && !parts.iter().any(|p| p.contains(&said)) {
            parts.push(said);
        }
        next = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_style_for_ips_and_localhost_only() {
        let host = |e| endpoint_host(e).expect("host");
        assert_eq!(host("http://127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(host("http://[::1]:9000/"), "::1");
        assert_eq!(host("https://user@localhost"), "localhost");
        assert_eq!(
            host("https://s3.eu-west-1.amazonaws.com"),
            "s3.eu-west-1.amazonaws.com"
        );
        assert!(host_needs_path_style("127.0.0.1"));
        assert!(host_needs_path_style("::1"));
        assert!(host_needs_path_style("LOCALHOST"));
        assert!(!host_needs_path_style("minio.internal"));
        assert_eq!(endpoint_host("ftp://x"), None);
        assert_eq!(endpoint_host("http://"), None);
    }

    #[test]
    fn content_range_total_parses() {
        assert_eq!(content_range_total("bytes 0-9/20"), Some(20));
        assert_eq!(content_range_total("bytes 10-19/20"), Some(20));
        assert_eq!(content_range_total("bytes */20"), Some(20));
        assert_eq!(content_range_total("bytes 0-9/*"), None);
        assert_eq!(content_range_total("garbage"), None);
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(normalize_prefix("").expect("empty"), "");
        assert_eq!(normalize_prefix("/").expect("slash"), "");
        assert_eq!(normalize_prefix("j1").expect("j1"), "j1/");
        assert_eq!(normalize_prefix("a/b/").expect("a/b/"), "a/b/");
        assert!(normalize_prefix("a//b").is_err());
        assert!(normalize_prefix("a/../b").is_err());
    }

    #[test]
    fn debug_shows_no_credentials() {
        let opts = S3Options {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..S3Options::default()
        };
        let store = S3Store::with_credentials("b", "p", &opts, "AKIDSECRETID", "VERYSECRETKEY")
            .expect("store");
        let shown = format!("{store:?} {}", store.describe());
        assert!(!shown.contains("AKIDSECRETID"), "{shown}");
        assert!(!shown.contains("VERYSECRETKEY"), "{shown}");
        assert!(store.path_style());
        assert_eq!(store.describe(), "s3://b/p/");
    }
}
