//! NBD server frontend: serves [`BlockDevice`]s to NBD clients (qemu, nbd-client,
//! libnbd tools, the kernel) over TCP or a Unix socket.
//!
//! Fixed newstyle negotiation with `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STARTTLS`, `STRUCTURED_REPLY` and `LIST_META_CONTEXT`/`SET_META_CONTEXT`
//! (`handshake.rs`), under a deadline and a byte bound, with the TLS policy and
//! credentials of `tls.rs`; then simple or structured replies to `READ`, `WRITE`, `FLUSH`,
//! `TRIM`, `WRITE_ZEROES`, `BLOCK_STATUS` and `DISC` with FUA, many requests in flight per
//! connection and replies in completion order (`transmission.rs`; write payloads read by
//! `payload.rs`). Block status reports the metadata contexts of `meta.rs`: `base:allocation`
//! from the device, and the dirty bitmaps an export is given (`qemu:dirty-bitmap:<name>`);
//! many connections per listener (`listen.rs`). Wire formats live in `protocol.rs`. What
//! all connections together may make the server hold (read replies, write payloads,
//! socket and TLS buffers) is capped by one budget (`budget.rs`, `--max-buffered`).
//!
//! Must never: let one client's bad input disturb another connection (a malformed
//! request gets an NBD error, or only that connection is closed); touch the device for
//! a request it rejected; buffer unbounded data for a client (in-flight requests and
//! bytes are capped per connection, and bytes across all connections); log data.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use crate::block::BlockDevice;

mod budget;
mod handshake;
mod listen;
mod meta;
mod payload;
mod protocol;
#[cfg(test)]
mod test_device;
mod tls;
mod transmission;

pub use budget::{BudgetError, BudgetStatus, BufferBudget, DEFAULT_MAX_BUFFERED, MIN_MAX_BUFFERED};
pub use listen::{bind, serve, Listener};
pub use meta::{DirtyBitmap, DIRTY_BITMAP_PREFIX};
pub use tls::{Security, SecurityOptions, TlsError, TlsMode, DEFAULT_HANDSHAKE_TIMEOUT};

/// One named device offered to clients.
#[derive(Clone)]
pub struct Export {
    /// Name clients ask for (non-empty, UTF-8, no NUL, at most 4096 bytes).
    pub name: String,
    /// Free text shown by `nbdinfo --list` and similar tools.
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("info", &self.device.info())
            .finish()
    }
}

impl Export {
    /// Transmission flags advertised for this export: exactly what the device supports,
    /// and "don't fragment" once the client negotiated structured replies.
    pub(crate) fn transmission_flags(&self, structured: bool) -> u16 {
        use protocol::*;
        let info = self.device.info();
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
        if structured {
            flags |= FLAG_SEND_DF;
        }
        if info.read_only {
            flags |= FLAG_READ_ONLY;
        } else {
            if info.supports_trim {
                flags |= FLAG_SEND_TRIM;
            }
            if info.supports_write_zeroes {
                flags |= FLAG_SEND_WRITE_ZEROES;
            }
        }
        if info.flush_covers_all_connections {
            flags |= FLAG_CAN_MULTI_CONN;
        }
        flags
    }
}

/// Every way configuring the NBD server fails.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// [`NbdServer::new`] was given no export at all.
    #[error("the NBD server needs at least one export")]
    NoExports,
    /// Two exports share a name.
    #[error("export name {name:?} is used twice")]
    DuplicateExport { name: String },
    /// An export name breaks the protocol's rules for names.
    #[error("invalid export name {name:?}: {reason}")]
    BadExportName { name: String, reason: &'static str },
    /// The default export is not among the exports.
    #[error("default export {name:?} is not one of the exports")]
    UnknownDefaultExport { name: String },
    /// A device's block size cannot be advertised as an NBD minimum block size.
    #[error(
        "export {name:?} has block size {block_size}: expected a power of two from 512 to 65536"
    )]
    BadBlockSize { name: String, block_size: u32 },
    /// A dirty bitmap's name cannot be part of a metadata context name.
    #[error("invalid dirty bitmap name {name:?}: {reason}")]
    BadBitmapName { name: String, reason: &'static str },
    /// A dirty bitmap was given for an export the server does not have.
    #[error("dirty bitmap {bitmap:?} is for export {export:?}, which is not one of the exports")]
    UnknownBitmapExport { export: String, bitmap: String },
    /// Two dirty bitmaps of one export share a name.
    #[error("export {export:?} has two dirty bitmaps named {bitmap:?}")]
    DuplicateBitmap { export: String, bitmap: String },
    /// A listen address is not in one of the accepted forms.
    #[error("invalid listen address {addr:?}: {reason}; expected unix:/path/to/socket or tcp:HOST:PORT (e.g. tcp:127.0.0.1:10809)")]
    BadListenAddr { addr: String, reason: String },
}

/// The set of exports one server offers, and which one an empty name selects.
///
/// # Invariants
/// `exports` is non-empty, keyed by each export's own name, and contains `default`;
/// `bitmaps` is keyed by names of `exports`, and names no bitmap twice per export.
#[derive(Debug)]
pub struct NbdServer {
    exports: BTreeMap<String, Arc<Export>>,
    /// The dirty bitmaps each export offers besides `base:allocation`.
    bitmaps: BTreeMap<String, Vec<Arc<DirtyBitmap>>>,
    default: String,
    security: Security,
    buffers: BufferBudget,
}

impl NbdServer {
    /// Builds a server offering `exports`; clients asking for the empty name get
    /// `default_export`.
    pub fn new(exports: Vec<Export>, default_export: &str) -> Result<Self, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::NoExports);
        }
        let mut by_name = BTreeMap::new();
        for export in exports {
            let name = export.name.clone();
            let reason = if name.is_empty() {
                Some("empty (the empty name selects the default export)")
            } else if name.len() > protocol::MAX_NAME_LEN {
                Some("longer than 4096 bytes")
            } else if name.contains('\0') {
                Some("contains NUL")
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(NbdError::BadExportName { name, reason });
            }
            let block_size = export.device.info().block_size;
            if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
                return Err(NbdError::BadBlockSize { name, block_size });
            }
            if by_name.insert(name.clone(), Arc::new(export)).is_some() {
                return Err(NbdError::DuplicateExport { name });
            }
        }
        if !by_name.contains_key(default_export) {
            return Err(NbdError::UnknownDefaultExport {
                name: default_export.to_owned(),
            });
        }
        Ok(Self {
            exports: by_name,
            bitmaps: BTreeMap::new(),
            default: default_export.to_owned(),
            security: Security::default(),
            buffers: BufferBudget::default(),
        })
    }

    /// Sets who may connect and how (TLS policy, credentials, handshake deadline); the
    /// default is plaintext with the default deadline.
    pub fn with_security(mut self, security: Security) -> Self {
        self.security = security;
        self
    }

    pub(crate) fn security(&self) -> &Security {
        &self.security
    }

    /// Shares `buffers` among all connections (the default is a budget of its own of
    /// [`DEFAULT_MAX_BUFFERED`] bytes); keep a clone to read its status.
    pub fn with_buffer_budget(mut self, buffers: BufferBudget) -> Self {
        self.buffers = buffers;
        self
    }

    pub(crate) fn buffers(&self) -> &BufferBudget {
        &self.buffers
    }

    /// The export a client names; the empty name is the default export.
    pub(crate) fn lookup(&self, name: &str) -> Option<&Arc<Export>> {
        let name = if name.is_empty() { &self.default } else { name };
        self.exports.get(name)
    }

    pub(crate) fn exports(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.values()
    }

    /// Offers `bitmap` on `export` as the metadata context `qemu:dirty-bitmap:<name>`.
    pub fn with_dirty_bitmap(
        mut self,
        export: &str,
        bitmap: DirtyBitmap,
    ) -> Result<Self, NbdError> {
        let Some(found) = self.exports.get(export) else {
            return Err(NbdError::UnknownBitmapExport {
                export: export.to_owned(),
                bitmap: bitmap.name().to_owned(),
            });
        };
        let list = self.bitmaps.entry(found.name.clone()).or_default();
        if list.iter().any(|b| b.name() == bitmap.name()) {
            return Err(NbdError::DuplicateBitmap {
                export: export.to_owned(),
                bitmap: bitmap.name().to_owned(),
            });
        }
        list.push(Arc::new(bitmap));
        Ok(self)
    }

    /// The metadata contexts `export` offers, in the order that gives their IDs.
    pub(crate) fn contexts(&self, export: &Export) -> Vec<meta::Context> {
        let mut out = vec![meta::Context::Allocation];
        if let Some(bitmaps) = self.bitmaps.get(&export.name) {
            out.extend(bitmaps.iter().cloned().map(meta::Context::Dirty));
        }
        out
    }
}

/// Resolves once `shutdown` is true or its sender is gone. (Unlike `wait_for` itself,
/// the returned future holds no lock guard, so it can live in `Send` tasks.)
pub(crate) async fn stop_requested(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = NbdError;

    /// Accepts `unix:/path/to/socket` and `tcp:HOST:PORT` (an IP address and a port).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &str| NbdError::BadListenAddr {
            addr: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the socket path is empty"));
            }
            Ok(Self::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse::<SocketAddr>()
                .map(Self::Tcp)
                .map_err(|e| bad(&format!("{addr:?} is not IP:PORT ({e})")))
        } else {
            Err(bad("unknown scheme"))
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_device::{Reads, ReadsOnly};
    use super::*;
    use crate::block::{BlockError, DeviceInfo};
    use async_trait::async_trait;
    use bytes::Bytes;

    /// Reads zeros.
    struct Fake(DeviceInfo);

    #[async_trait]
    impl Reads for Fake {
        fn info(&self) -> DeviceInfo {
            self.0
        }
        async fn read(&self, _: u64, len: u32) -> Result<Bytes, BlockError> {
            Ok(Bytes::from(vec![0; len as usize]))
        }
    }

    fn info() -> DeviceInfo {
        DeviceInfo {
            size: 1 << 20,
            block_size: 512,
            read_only: false,
            supports_trim: true,
            supports_write_zeroes: true,
            flush_covers_all_connections: false,
        }
    }

    fn export(name: &str, info: DeviceInfo) -> Export {
        Export {
            name: name.to_owned(),
            description: String::new(),
            device: Arc::new(ReadsOnly(Fake(info))),
        }
    }

    #[test]
    fn flags_follow_the_device() {
        use protocol::*;
        let rw = export("a", info()).transmission_flags(false);
        assert_eq!(
            rw,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
        );
        let ro = export(
            "b",
            DeviceInfo {
                read_only: true,
                flush_covers_all_connections: true,
                ..info()
            },
        )
        .transmission_flags(true);
        assert_eq!(
            ro,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_DF
                | FLAG_READ_ONLY
                | FLAG_CAN_MULTI_CONN
        );
    }

    #[test]
    fn server_validates_exports() {
        assert!(matches!(
            NbdServer::new(vec![], "a"),
            Err(NbdError::NoExports)
        ));
        assert!(matches!(
            NbdServer::new(vec![export("a", info()), export("a", info())], "a"),
            Err(NbdError::DuplicateExport { .. })
        ));
        assert!(matches!(
            NbdServer::new(vec![export("", info())], ""),
            Err(NbdError::BadExportName { .. })
        ));
        assert!(matches!(
            NbdServer::new(vec![export("a", info())], "b"),
            Err(NbdError::UnknownDefaultExport { .. })
        ));
        assert!(matches!(
            NbdServer::new(
                vec![export(
                    "a",
                    DeviceInfo {
                        block_size: 100,
                        ..info()
                    }
                )],
                "a"
            ),
            Err(NbdError::BadBlockSize { .. })
        ));
        let server = NbdServer::new(vec![export("a", info()), export("b", info())], "b").unwrap();
        assert_eq!(server.lookup("").unwrap().name, "b");
        assert_eq!(server.lookup("a").unwrap().name, "a");
        assert!(server.lookup("c").is_none());
        let bitmap = || DirtyBitmap::new("m1", std::iter::once(0..512)).unwrap();
        assert!(matches!(
            NbdServer::new(vec![export("a", info())], "a")
                .unwrap()
                .with_dirty_bitmap("z", bitmap()),
            Err(NbdError::UnknownBitmapExport { .. })
        ));
        let server = server.with_dirty_bitmap("a", bitmap()).unwrap();
        assert_eq!(server.contexts(server.lookup("a").unwrap()).len(), 2);
        assert_eq!(server.contexts(server.lookup("b").unwrap()).len(), 1);
        assert!(matches!(
            server.with_dirty_bitmap("a", bitmap()),
            Err(NbdError::DuplicateBitmap { .. })
        ));
    }

    /// One option as a client sends it.
    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut out = protocol::IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    fn set_allocation(export: &str) -> Vec<u8> {
        let query = b"base:allocation";
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query);
        option(protocol::OPT_SET_META_CONTEXT, &data)
    }

    /// Reads option replies until the one answering `code` with an ACK or an error;
    /// returns the reply types seen for it.
    async fn replies_to(client: &mut tokio::io::DuplexStream, code: u32) -> Vec<u32> {
        use tokio::io::AsyncReadExt;
        let mut types = Vec::new();
        loop {
            let mut header = [0u8; 20];
            client.read_exact(&mut header).await.unwrap();
            let reply_type = u32::from_be_bytes(header[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            client.read_exact(&mut data).await.unwrap();
            if u32::from_be_bytes(header[8..12].try_into().unwrap()) == code {
                types.push(reply_type);
                if reply_type != protocol::REP_META_CONTEXT && reply_type != protocol::REP_INFO {
                    return types;
                }
            }
        }
    }

    #[tokio::test]
    async fn starttls_forgets_structured_replies_and_contexts() {
        use handshake::{greet, options, Outcome, Tls};
        use protocol::*;
        use tokio::io::AsyncWriteExt;
        let server = NbdServer::new(vec![export("a", info())], "a").unwrap();
        let (mut client, end) = tokio::io::duplex(1 << 20);
        let (mut r, mut w) = tokio::io::split(end);
        client.write_all(&3u32.to_be_bytes()).await.unwrap();
        client
            .write_all(&option(OPT_STRUCTURED_REPLY, &[]))
            .await
            .unwrap();
        client.write_all(&set_allocation("a")).await.unwrap();
        client.write_all(&option(OPT_STARTTLS, &[])).await.unwrap();
        let mut state = greet(&mut r, &mut w, Tls::Offered).await.unwrap();
        let outcome = options(&mut r, &mut w, &server, "test", &mut state).await;
        assert!(matches!(outcome, Ok(Outcome::StartTls)));
        let mut greeting = [0u8; GREETING_LEN];
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut greeting)
            .await
            .unwrap();
        assert_eq!(
            replies_to(&mut client, OPT_STRUCTURED_REPLY).await,
            [REP_ACK]
        );
        assert_eq!(
            replies_to(&mut client, OPT_SET_META_CONTEXT).await,
            [REP_META_CONTEXT, REP_ACK]
        );
        assert_eq!(replies_to(&mut client, OPT_STARTTLS).await, [REP_ACK]);

        // "Over TLS" (the same stream stands in for it): contexts need structured replies
        // negotiated again, and GO enters transmission with neither.
        state.tls = Tls::Active;
        client.write_all(&set_allocation("a")).await.unwrap();
        let mut go = 1u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"a");
        go.extend_from_slice(&0u16.to_be_bytes());
        client.write_all(&option(OPT_GO, &go)).await.unwrap();
        let outcome = options(&mut r, &mut w, &server, "test", &mut state).await;
        let Ok(Outcome::Transmission(session)) = outcome else {
            panic!("GO did not enter transmission");
        };
        assert!(!session.structured);
        assert!(session.contexts.is_empty());
        assert_eq!(
            replies_to(&mut client, OPT_SET_META_CONTEXT).await,
            [REP_ERR_INVALID]
        );
        let go_replies = replies_to(&mut client, OPT_GO).await;
        assert_eq!(go_replies.last(), Some(&REP_ACK));
    }

    #[test]
    fn listen_addresses_parse_and_print() {
        let unix: ListenAddr = "unix:/run/tinylag.sock".parse().unwrap();
        assert_eq!(unix, ListenAddr::Unix("/run/tinylag.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/tinylag.sock");
        let tcp: ListenAddr = "tcp:127.0.0.1:10809".parse().unwrap();
        assert_eq!(tcp, ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()));
        assert_eq!(tcp.to_string(), "tcp:127.0.0.1:10809");
        for bad in ["127.0.0.1:10809", "tcp:localhost", "unix:", "udp:1.2.3.4:5"] {
            let err = bad.parse::<ListenAddr>().unwrap_err();
            assert!(err.to_string().contains("unix:/path"), "{err}");
        }
    }
}
