//! Argument types shared by the subcommands: the journal location, S3 options, who may
//! connect to an NBD server (`TlsArgs`), and the value parsers that turn `4G` / `200ms` / times into numbers with errors that name the form.
//!
//! The convention every subcommand follows (so all bad input looks the same):
//! - a flag's value is checked by a clap value parser from this file
//!   (`#[arg(long, value_parser = parse_size)]`), returning `Result<T, String>`: clap prints
//!   `error: invalid value 'V' for '--flag <NAME>': <message>` and exits 2. Messages say what
//!   is wrong and the accepted forms, without repeating the value (clap quotes it).
//! - sizes and durations also take `allow_hyphen_values = true`, so `--size -1` reaches the
//!   parser ("negative sizes are not accepted") instead of clap's "unexpected argument".
//! - a rule that ties several flags together and cannot be said with clap's `requires` /
//!   `conflicts_with` returns [`usage`] from `run`: printed like clap's own errors, exit 2.
//! - everything else is a runtime error, printed once by `main` as `tinylag: error: …`.
//!
//! How a flag is shown in `--help` and the man pages (so every command reads alike):
//! - one placeholder per kind of value: `value_name = "DURATION"` for every duration, `SIZE`,
//!   `PATH`, `FILE`, `DIR`, `URI`, `TIME`, `NAME`, `N` (a count), `ADDR`; a choice shows its
//!   values (`value_name = "off|on|require"`). Clap's default (the field's name) is never left.
//! - a command's own flags under "Options"; flags every command takes (`--log`, `--color`,
//!   declared `global` in bin/tinylag.rs) under [`GLOBAL_OPTIONS`]; the S3 connection flags
//!   under [`S3_OPTIONS`] (`help_heading = …` on the flag).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use tinylag::nbd::{
    BufferBudget, ListenAddr, NbdError, Security, SecurityOptions, TlsMode, MIN_MAX_BUFFERED,
};
use tinylag::store::{open_store, open_store_for_command, ObjectStore, S3Options, StoreUri};
use tinylag::writer::MaxLag;
use tinylag::writer::MIN_POOL_SIZE;

/// The `--help` heading of the flags every command takes.
pub const GLOBAL_OPTIONS: &str = "Global options";
/// The `--help` heading of the S3 connection flags.
pub const S3_OPTIONS: &str = "S3 options";

/// Where the journal is and how to reach S3.
#[derive(Debug, Clone, Args)]
pub struct JournalArgs {
    /// Journal location: /path, file:///path, s3://bucket/prefix or mem://name.
    #[arg(long, value_name = "URI", value_parser = parse_store_uri)]
    pub journal: StoreUri,
    #[command(flatten)]
    pub s3: S3Args,
}

/// S3 connection options. Credentials come from the standard AWS chain only.
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint URL (default: AWS, or the standard AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL", help_heading = S3_OPTIONS)]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: the standard AWS chain, else us-east-1).
    #[arg(long, value_name = "REGION", help_heading = S3_OPTIONS)]
    pub s3_region: Option<String>,
    /// Force path-style addressing (automatic for IP and localhost endpoints).
    #[arg(long, help_heading = S3_OPTIONS)]
    pub s3_path_style: bool,
}

impl S3Args {
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            force_path_style: self.s3_path_style,
        }
    }
}

impl JournalArgs {
    /// The journal, for a daemon: transient failures get the full retry budget.
    pub async fn open(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(open_store(&self.journal, &self.s3.options()).await?)
    }

    /// The journal, for a command an operator waits on: an unreachable store fails within
    /// two seconds, with one line.
    pub async fn open_for_command(&self) -> anyhow::Result<Arc<dyn ObjectStore>> {
        Ok(open_store_for_command(&self.journal, &self.s3.options()).await?)
    }
}

pub fn parse_store_uri(s: &str) -> Result<StoreUri, String> {
    s.parse::<StoreUri>().map_err(|e| e.to_string())
}

pub fn parse_size(s: &str) -> Result<u64, String> {
    tinylag::units::parse_size(s)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    tinylag::units::parse_duration(s)
}

/// `--pool-size`: a size of at least 1M.
pub fn parse_pool_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size < MIN_POOL_SIZE {
        return Err(format!(
            "too small: use at least {}",
            tinylag::units::format_size_exact(MIN_POOL_SIZE.into())
        ));
    }
    Ok(size)
}

/// `--max-buffered`: a size of at least 64M (two maximum NBD requests).
pub fn parse_max_buffered(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size < MIN_MAX_BUFFERED {
        return Err(format!(
            "too small: use at least {} (two maximum-size NBD requests)",
            tinylag::units::format_size_exact(MIN_MAX_BUFFERED.into())
        ));
    }
    Ok(size)
}

/// `--segment-size` of `serve`: 64K to 1G.
pub fn parse_segment_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if !(64 << 10..=1 << 30).contains(&size) {
        return Err("out of range: use 64K to 1G".into());
    }
    Ok(size)
}

/// `--max-lag`: a duration (`5s`, `500ms`, `2m` = two minutes) or a size (`64M`, `1G`),
/// more than zero. Durations are tried first, so a lower-case `m` means minutes.
pub fn parse_max_lag(s: &str) -> Result<MaxLag, String> {
    const FORMS: &str = "a duration (5s, 500ms, 2m) or a size (64M, 1G, 65536)";
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("negative lags are not accepted; expected {FORMS}"));
    }
    let lag = match (
        tinylag::units::parse_duration(t),
        tinylag::units::parse_size(t),
    ) {
        (Ok(d), _) => MaxLag::Time(d),
        (_, Ok(n)) => MaxLag::Bytes(n),
        (Err(why), Err(_)) => {
            let why = why.split(';').next().unwrap_or_default();
            return Err(format!(
                "neither a duration ({why}) nor a size; expected {FORMS}"
            ));
        }
    };
    if matches!(lag, MaxLag::Time(d) if d.is_zero()) || lag == MaxLag::Bytes(0) {
        return Err(format!("must be more than zero; expected {FORMS}"));
    }
    Ok(lag)
}

/// `--listen`: `unix:PATH` or `tcp:IP:PORT`.
pub fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    s.parse::<ListenAddr>().map_err(|e| match e {
        NbdError::BadListenAddr { reason, .. } => format!(
            "{reason}; expected unix:/path/to/socket or tcp:IP:PORT (e.g. tcp:127.0.0.1:10809)"
        ),
        other => other.to_string(),
    })
}

/// `--ack`: when a client gets the reply to a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ack {
    /// After the primary has the write.
    Async,
    /// Once the write is durable in the journal.
    Journal,
    /// Async until the lag passes --max-lag, then journal.
    Adaptive,
}

/// A rule about several flags together was broken: printed like clap's own usage errors
/// (`error: …`, exit 2) by `main`. Build it with [`usage`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A [`UsageError`] as an `anyhow::Error`, for `return Err(usage(…))` in a `run`.
pub fn usage(message: impl Into<String>) -> anyhow::Error {
    UsageError(message.into()).into()
}

pub fn parse_time(s: &str) -> Result<u64, String> {
    tinylag::clock::parse_time(s, &tinylag::clock::SystemClock)
}

/// Who may connect to an NBD server and how: flattened into every command that serves
/// NBD (`serve`, `up`, `mount`).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// NBD over TLS (the protocol's STARTTLS): off, on (clients choose) or require (every
    /// option before STARTTLS is refused).
    #[arg(long, default_value = "off", value_name = "off|on|require", value_parser = parse_tls_mode)]
    pub tls: TlsMode,
    /// Directory with server-cert.pem, server-key.pem and, for --tls-verify-peer,
    /// ca-cert.pem (the layout of nbdkit --tls-certificates and qemu's tls-creds-x509).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Require a client certificate signed by DIR/ca-cert.pem (mutual TLS).
    #[arg(long)]
    pub tls_verify_peer: bool,
    /// Allow plaintext NBD on a TCP address other hosts can reach (refused otherwise):
    /// anyone who reaches it can read the disk (and, but for a read-only mount, overwrite it).
    #[arg(long)]
    pub insecure_no_tls: bool,
    /// A client that has not chosen an export this long after connecting (TLS handshake
    /// included) is disconnected.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,
    /// Most memory all NBD clients together may make the server hold (read replies, write
    /// payloads in flight, socket and TLS buffers); past it the connections holding the
    /// most are not read from until they take their replies. At least 64M.
    #[arg(long, default_value = "256M", value_name = "SIZE", value_parser = parse_max_buffered, allow_hyphen_values = true)]
    pub max_buffered: u64,
}

impl TlsArgs {
    /// Loads the credentials and refuses plaintext on an address other hosts reach
    /// (unless --insecure-no-tls).
    pub fn security(&self, listen: &ListenAddr) -> anyhow::Result<Security> {
        self.security_of(listen, false)
    }

    /// [`Self::security`] of a server whose clients cannot change the disk (`read_only`):
    /// its refusal and warning speak of reading the disk.
    pub fn security_of(&self, listen: &ListenAddr, read_only: bool) -> anyhow::Result<Security> {
        Ok(Security::new(
            &SecurityOptions {
                mode: self.tls,
                certificates: self.tls_certificates.clone(),
                verify_peer: self.tls_verify_peer,
                insecure_no_tls: self.insecure_no_tls,
                read_only,
                handshake_timeout: Some(self.handshake_timeout),
            },
            listen,
        )?)
    }

    /// The same options as command-line arguments (for `up`, which runs `serve`).
    pub fn to_argv(&self) -> Vec<String> {
        let mut argv = vec!["--tls".to_string(), self.tls.to_string()];
        if let Some(dir) = &self.tls_certificates {
            argv.extend(["--tls-certificates".into(), dir.display().to_string()]);
        }
        if self.tls_verify_peer {
            argv.push("--tls-verify-peer".into());
        }
        if self.insecure_no_tls {
            argv.push("--insecure-no-tls".into());
        }
        argv.extend([
            "--handshake-timeout".into(),
            format!("{}ms", self.handshake_timeout.as_millis()),
            "--max-buffered".into(),
            self.max_buffered.to_string(),
        ]);
        argv
    }

    /// The budget every connection of one NBD server shares (`--max-buffered`).
    pub fn buffer_budget(&self) -> anyhow::Result<BufferBudget> {
        Ok(BufferBudget::new(self.max_buffered)?)
    }

    /// The NBD URI clients use for `export` on `addr`: `nbds` when TLS is on, with the
    /// client-side certificate directory libnbd wants.
    pub fn nbd_uri(&self, addr: &ListenAddr, export: &str) -> String {
        let tls = self.tls != TlsMode::Off;
        let s = if tls { "s" } else { "" };
        let certs = match (&self.tls_certificates, tls) {
            (Some(dir), true) => format!(
                "tls-certificates={}",
                std::path::absolute(dir)
                    .unwrap_or_else(|_| dir.clone())
                    .display()
            ),
            _ => String::new(),
        };
        match addr {
            ListenAddr::Unix(path) => {
                let sep = if certs.is_empty() { "" } else { "&" };
                format!(
                    "nbd{s}+unix:///{export}?socket={}{sep}{certs}",
                    path.display()
                )
            }
            ListenAddr::Tcp(sa) if certs.is_empty() => format!("nbd{s}://{sa}/{export}"),
            ListenAddr::Tcp(sa) => format!("nbd{s}://{sa}/{export}?{certs}"),
        }
    }
}

pub fn parse_tls_mode(s: &str) -> Result<TlsMode, String> {
    s.parse()
}

pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match tinylag::units::parse_duration(s)? {
        d if d.is_zero() => Err(format!("{s:?} is zero; give a positive duration like 10s")),
        d => Ok(d),
    }
}

pub fn parse_group(s: &str) -> Result<u32, String> {
    tinylag::control::resolve_group(s)
}

/// One `--primary [NAME=]PATH` or `--replica [NAME=]PATH`: a path, named by its device in a
/// group journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPath {
    /// The device this path is for, in a group journal.
    pub name: Option<String>,
    pub path: PathBuf,
}

impl NamedPath {
    /// `NAME=PATH` when the text before the first `=` is a device name, else a plain path
    /// (write `./a=b` for a file whose name holds `=`).
    pub fn parse(s: &str) -> Result<NamedPath, String> {
        if s.is_empty() {
            return Err("an empty path".into());
        }
        if let Some((name, path)) = s.split_once('=') {
            if tinylag::journal::valid_device_name(name) {
                if path.is_empty() {
                    return Err(format!("{s}: no path after {name}="));
                }
                return Ok(NamedPath {
                    name: Some(name.to_string()),
                    path: PathBuf::from(path),
                });
            }
        }
        Ok(NamedPath {
            name: None,
            path: PathBuf::from(s),
        })
    }
}
