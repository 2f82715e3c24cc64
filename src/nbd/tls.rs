//! Who may talk to the NBD server: the TLS policy (`--tls off|on|require`), X.509
//! credentials loaded from a directory in the layout nbdkit and qemu use, the handshake
//! deadline, and the rule that a TCP listener reachable from other hosts needs TLS.
//!
//! Credentials directory (the same files `nbdkit --tls-certificates DIR` and qemu's
//! `tls-creds-x509,dir=DIR` read):
//!
//! ```text
//! DIR/server-cert.pem   the server's certificate, then any intermediates (PEM)
//! DIR/server-key.pem    its private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC)
//! DIR/ca-cert.pem       CA certificate(s) client certificates must chain to
//!                       (read only with --tls-verify-peer)
//! ```
//!
//! Pre-shared keys (nbdkit's `psktool` files) are not supported: rustls implements no
//! TLS-PSK cipher suites for external keys.
//!
//! Must never: accept a client certificate that does not chain to `ca-cert.pem` when
//! peer verification is on; log key material; let a client's TLS handshake run without
//! a deadline or a byte bound.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;

use super::ListenAddr;

/// How long a client has from connecting to choosing an export (TLS handshake included)
/// unless configured otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes a client may send during the TLS handshake itself (certificate chains
/// included); far above any real handshake.
pub(crate) const MAX_TLS_HANDSHAKE_BYTES: u64 = 256 << 10;

/// Whether clients must, may or cannot negotiate TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// Clients may upgrade with `NBD_OPT_STARTTLS` or stay in plaintext.
    On,
    /// Every option before `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_TLS_REQD`.
    Require,
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "on" => Ok(Self::On),
            "require" => Ok(Self::Require),
            _ => Err(format!(
                "{s:?} is not a TLS mode; expected off, on or require"
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Require => "require",
        })
    }
}

/// Every way setting up the server's security fails.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read.
    #[error("cannot read TLS credentials file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A credentials file holds no usable PEM object of the kind expected.
    #[error("TLS credentials file {path} holds no {what} (expected PEM: {expected})")]
    Empty {
        path: PathBuf,
        what: &'static str,
        expected: &'static str,
    },
    /// A credentials file is not valid PEM.
    #[error("TLS credentials file {path} is not valid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    /// rustls refused the credentials (key does not match the certificate, bad CA, …).
    #[error("the TLS credentials in {dir} are not usable: {reason}")]
    Rejected { dir: PathBuf, reason: String },
    /// TLS is on but no credentials directory was given.
    #[error(
        "--tls {mode} needs --tls-certificates DIR (holding server-cert.pem and server-key.pem)"
    )]
    NoCredentials { mode: TlsMode },
    /// TLS options were given while TLS is off.
    #[error("{flag} has no effect with --tls off; use --tls require")]
    UnusedOption { flag: &'static str },
    /// A TCP listener reachable from other hosts would accept plaintext clients.
    #[error(
        "refusing to serve {addr} without TLS: anyone who can reach it could {}; use --tls \
         require --tls-certificates DIR, listen on 127.0.0.1 or a Unix socket, or pass \
         --insecure-no-tls",
        exposure(*read_only)
    )]
    InsecureListener { addr: ListenAddr, read_only: bool },
}

/// The server's security settings: TLS policy and credentials, and how long a client may
/// take to negotiate.
#[derive(Clone)]
pub struct Security {
    pub(crate) mode: TlsMode,
    pub(crate) acceptor: Option<TlsAcceptor>,
    pub(crate) verify_peer: bool,
    pub(crate) handshake_timeout: Duration,
    pub(crate) insecure: bool,
    /// Clients cannot change the disk (`mount` without `--writable`): warnings say so.
    pub(crate) read_only: bool,
}

/// What a client that reaches the server can do, for the warnings.
fn exposure(read_only: bool) -> &'static str {
    if read_only {
        "read the disk"
    } else {
        "read and overwrite the disk"
    }
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Security")
            .field("mode", &self.mode)
            .field("verify_peer", &self.verify_peer)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Default for Security {
    /// Plaintext only, with the default handshake deadline: fit for Unix sockets and
    /// loopback.
    fn default() -> Self {
        Self {
            mode: TlsMode::Off,
            acceptor: None,
            verify_peer: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            insecure: false,
            read_only: false,
        }
    }
}

/// What [`Security::new`] is built from (the `--tls*` flags).
#[derive(Clone, Debug, Default)]
pub struct SecurityOptions {
    pub mode: TlsMode,
    /// Directory with `server-cert.pem`, `server-key.pem` and, for `verify_peer`,
    /// `ca-cert.pem`.
    pub certificates: Option<PathBuf>,
    /// Require a client certificate that chains to `ca-cert.pem` (mutual TLS).
    pub verify_peer: bool,
    /// The operator insists on plaintext TCP reachable from other hosts.
    pub insecure_no_tls: bool,
    /// The export is read-only (a time-travel `mount`): the refusal and the warning speak
    /// of reading the disk, not overwriting it.
    pub read_only: bool,
    /// Deadline from accept to the end of negotiation; `None` for the default.
    pub handshake_timeout: Option<Duration>,
}

impl Security {
    /// Loads the credentials and checks the options against `listen`: a TCP listener on
    /// anything but a loopback address needs `TlsMode::Require` unless `insecure_no_tls`.
    pub fn new(options: &SecurityOptions, listen: &ListenAddr) -> Result<Self, TlsError> {
        let acceptor = match (options.mode, &options.certificates) {
            (TlsMode::Off, Some(_)) => {
                return Err(TlsError::UnusedOption {
                    flag: "--tls-certificates",
                })
            }
            (TlsMode::Off, None) if options.verify_peer => {
                return Err(TlsError::UnusedOption {
                    flag: "--tls-verify-peer",
                })
            }
            (TlsMode::Off, None) => None,
            (mode, None) => return Err(TlsError::NoCredentials { mode }),
            (_, Some(dir)) => Some(load_acceptor(dir, options.verify_peer)?),
        };
        let exposed = match listen {
            ListenAddr::Tcp(addr) => !is_loopback(addr),
            ListenAddr::Unix(_) => false,
        };
        let insecure = exposed && options.mode != TlsMode::Require;
        if insecure && !options.insecure_no_tls {
            return Err(TlsError::InsecureListener {
                addr: listen.clone(),
                read_only: options.read_only,
            });
        }
        Ok(Self {
            mode: options.mode,
            acceptor,
            verify_peer: options.verify_peer,
            handshake_timeout: options
                .handshake_timeout
                .unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
            insecure,
            read_only: options.read_only,
        })
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// The warning an operator must see when plaintext clients can reach the disk from
    /// other hosts (`--insecure-no-tls`).
    pub fn warning(&self, listen: &ListenAddr) -> Option<String> {
        self.insecure.then(|| {
            format!(
                "WARNING: NBD on {listen} accepts plaintext clients from other hosts \
                 (--insecure-no-tls): anyone who can reach it can {}.",
                exposure(self.read_only)
            )
        })
    }

    /// How clients reach the server, e.g. `tls require, client certificates`.
    pub fn describe(&self) -> String {
        match (self.mode, self.verify_peer) {
            (TlsMode::Off, _) => "tls off".into(),
            (mode, false) => format!("tls {mode}"),
            (mode, true) => format!("tls {mode}, client certificates required"),
        }
    }
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => a.ip().to_canonical().is_loopback(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
            expected: "-----BEGIN CERTIFICATE-----",
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
            expected: "-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY",
        },
        e => TlsError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        },
    })
}

/// Builds the TLS acceptor from `dir` (see the module documentation for the layout).
fn load_acceptor(dir: &Path, verify_peer: bool) -> Result<TlsAcceptor, TlsError> {
    let rejected = |reason: String| TlsError::Rejected {
        dir: dir.to_owned(),
        reason,
    };
    let chain = certificates(&dir.join("server-cert.pem"))?;
    let key = private_key(&dir.join("server-key.pem"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| rejected(e.to_string()))?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for ca in certificates(&ca_path)? {
            roots
                .add(ca)
                .map_err(|e| rejected(format!("{}: {e}", ca_path.display())))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| rejected(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| rejected(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A stream that fails reads once a client has sent more than its budget, while the
/// budget is on. It sits under TLS so the TLS handshake is bounded; [`Metered::lift`]
/// turns it off once the handshake is done.
pub(crate) struct Metered<S> {
    inner: S,
    /// Bytes the client may still send; `None` once lifted.
    remaining: Option<u64>,
}

impl<S> Metered<S> {
    pub(crate) fn new(inner: S, budget: u64) -> Self {
        Self {
            inner,
            remaining: Some(budget),
        }
    }

    pub(crate) fn lift(&mut self) {
        self.remaining = None;
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(remaining)) = (&polled, &mut this.remaining) {
            let got = (buf.filled().len() - before) as u64;
            if got > *remaining {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the client sent more than {MAX_TLS_HANDSHAKE_BYTES} bytes in its TLS \
                         handshake"
                    ),
                )));
            }
            *remaining -= got;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn options(mode: TlsMode) -> SecurityOptions {
        SecurityOptions {
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn plaintext_is_refused_on_addresses_other_hosts_reach() {
        for addr in ["tcp:0.0.0.0:10809", "tcp:192.0.2.1:10809", "tcp:[::]:10809"] {
            let listen: ListenAddr = addr.parse().unwrap();
            let err = Security::new(&options(TlsMode::Off), &listen).unwrap_err();
            assert!(matches!(err, TlsError::InsecureListener { .. }), "{err}");
            assert!(err.to_string().contains("--insecure-no-tls"), "{err}");
            // TLS offered but not required still lets plaintext clients in.
            assert!(Security::new(&options(TlsMode::On), &listen).is_err());
            let insisted = SecurityOptions {
                insecure_no_tls: true,
                ..options(TlsMode::Off)
            };
            let security = Security::new(&insisted, &listen).unwrap();
            assert!(security.warning(&listen).unwrap().contains("WARNING"));
        }
        for addr in [
            "tcp:127.0.0.1:10809",
            "tcp:[::1]:10809",
            "tcp:[::ffff:127.0.0.1]:1",
            "unix:/run/x.sock",
        ] {
            let listen: ListenAddr = addr.parse().unwrap();
            let security = Security::new(&options(TlsMode::Off), &listen).unwrap();
            assert!(security.warning(&listen).is_none(), "{addr}");
        }
    }

    #[test]
    fn tls_options_need_each_other() {
        let listen: ListenAddr = "tcp:127.0.0.1:1".parse().unwrap();
        let err = Security::new(&options(TlsMode::Require), &listen).unwrap_err();
        assert!(err.to_string().contains("--tls-certificates DIR"), "{err}");
        let stray = SecurityOptions {
            certificates: Some("/nonexistent".into()),
            ..options(TlsMode::Off)
        };
        assert!(matches!(
            Security::new(&stray, &listen),
            Err(TlsError::UnusedOption { .. })
        ));
        let missing = SecurityOptions {
            certificates: Some("/nonexistent".into()),
            ..options(TlsMode::Require)
        };
        let err = Security::new(&missing, &listen).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/server-cert.pem"),
            "{err}"
        );
    }

    #[test]
    fn garbage_credentials_are_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server-cert.pem"), "not pem at all").unwrap();
        std::fs::write(dir.path().join("server-key.pem"), "").unwrap();
        let opts = SecurityOptions {
            certificates: Some(dir.path().to_owned()),
            ..options(TlsMode::Require)
        };
        let listen: ListenAddr = "unix:/x".parse().unwrap();
        let err = Security::new(&opts, &listen).unwrap_err();
        assert!(matches!(err, TlsError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("server-cert.pem"), "{err}");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("require".parse::<TlsMode>().unwrap(), TlsMode::Require);
        assert_eq!(TlsMode::On.to_string(), "on");
        assert!("yes"
            .parse::<TlsMode>()
            .unwrap_err()
            .contains("off, on or require"));
    }

    #[tokio::test]
    async fn metered_reads_stop_at_the_budget_until_lifted() {
        let data = [7u8; 100];
        let mut metered = Metered::new(&data[..], 40);
        let mut buf = [0u8; 30];
        metered.read_exact(&mut buf).await.unwrap();
        let err = metered.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut metered = Metered::new(&data[..], 40);
        metered.lift();
        let mut all = Vec::new();
        metered.read_to_end(&mut all).await.unwrap();
        assert_eq!(all.len(), 100);
    }
}
