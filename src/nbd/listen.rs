//! Listening sockets (TCP or Unix), the accept loop, and the life of one connection:
//! handshake (with STARTTLS, the TLS handshake in the middle of it), then transmission,
//! then close, each step logged with the peer and export.
//!
//! A plaintext connection is split into the socket's own owned halves, so the plain path
//! pays nothing for TLS; after STARTTLS the halves are put back together, wrapped in TLS
//! and split again. The whole negotiation, TLS included, runs against one deadline.
//!
//! Each connection is a holder in the server's buffer budget from its first byte: its
//! socket buffers (and TLS state after STARTTLS) are charged before the handshake runs,
//! and its requests' payloads during transmission.
//!
//! Must never: let a failing connection stop the accept loop or another connection;
//! remove a socket file that is not ours (a live server's socket, or a regular file);
//! wait unboundedly for connections at shutdown, or for a client that does not finish
//! its handshake.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{tcp, unix, TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::budget::Holder;
use super::handshake::{greet, options, HandshakeError, Outcome, Session, Tls};
use super::tls::{Metered, TlsMode, MAX_TLS_HANDSHAKE_BYTES};
use super::transmission::{serve_export, TransmissionError};
use super::{stop_requested, ListenAddr, NbdServer};

/// How long `serve` lets open connections finish their in-flight requests after a
/// shutdown before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Pause after a failed accept (out of descriptors, …) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Socket buffer sizes on our side; larger reads and writes bypass them.
const IO_BUFFER: usize = 64 << 10;
/// What a connection holds before any request: its reader's and writer's buffers, and
/// the handshake's bounded scratch. Charged to the buffer budget for its whole life.
const CONNECTION_BUFFERS: u64 = 2 * IO_BUFFER as u64 + (32 << 10);
/// What TLS adds: rustls's plaintext buffers in each direction (its default limit of
/// 64 KiB each) and a record being decrypted or encrypted in each (16 KiB plus overhead).
const TLS_BUFFERS: u64 = 2 * (64 << 10) + 2 * (18 << 10);

/// A bound listening socket, ready for [`serve`].
#[derive(Debug)]
pub struct Listener {
    kind: Kind,
    addr: ListenAddr,
}

#[derive(Debug)]
enum Kind {
    Tcp(TcpListener),
    /// The socket file's (device, inode), so that drop removes only the file it made.
    Unix(UnixListener, (u64, u64)),
}

impl Listener {
    /// The address actually bound (for `tcp:127.0.0.1:0`, the port the system picked).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let (Kind::Unix(_, identity), ListenAddr::Unix(path)) = (&self.kind, &self.addr) {
            if file_identity(path).ok() == Some(*identity) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds `addr`. A Unix socket file left behind by a dead server is removed first; a
/// live server's socket or any other file at the path is an error.
pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
    let with_context =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    match addr {
        ListenAddr::Tcp(socket_addr) => {
            let listener = TcpListener::bind(socket_addr).await.map_err(with_context)?;
            let bound = listener.local_addr().map_err(with_context)?;
            Ok(Listener {
                kind: Kind::Tcp(listener),
                addr: ListenAddr::Tcp(bound),
            })
        }
        ListenAddr::Unix(path) => {
            remove_stale_socket(path).map_err(with_context)?;
            let listener = UnixListener::bind(path).map_err(with_context)?;
            let identity = file_identity(path).map_err(with_context)?;
            Ok(Listener {
                kind: Kind::Unix(listener, identity),
                addr: addr.clone(),
            })
        }
    }
}

fn file_identity(path: &Path) -> io::Result<(u64, u64)> {
    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

fn remove_stale_socket(path: &PathBuf) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another server is listening on this socket",
        )),
        // Nobody answers: the socket belonged to a server that is gone.
        Err(_) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// An accepted connection.
enum Accepted {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

async fn accept(listener: &Listener, id: u64) -> io::Result<Accepted> {
    match &listener.kind {
        Kind::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            // Replies are small and latency-bound; batching is done by our own flushes.
            stream.set_nodelay(true)?;
            Ok(Accepted::Tcp(stream, format!("tcp:{peer}#{id}")))
        }
        Kind::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            Ok(Accepted::Unix(stream, format!("{}#{id}", listener.addr)))
        }
    }
}

/// Serves until `shutdown` turns true (or its sender is dropped): then stops accepting,
/// lets in-flight requests finish and reply (waiting at most `SHUTDOWN_GRACE`), closes
/// every connection and returns. Errors of single connections are logged, never
/// returned.
pub async fn serve(
    listener: Listener,
    server: Arc<NbdServer>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut connections = JoinSet::new();
    let mut next_id = 0u64;
    // Handed to each connection; `shutdown` itself is borrowed by the select below.
    let for_connections = shutdown.clone();
    tracing::info!(addr = %listener.addr, "NBD server listening");
    loop {
        tokio::select! {
            biased;
            _ = stop_requested(&mut shutdown) => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done {
                    tracing::error!(error = %e, "NBD connection task failed");
                }
            }
            accepted = accept(&listener, next_id) => match accepted {
                Ok(conn) => {
                    next_id += 1;
                    let server = Arc::clone(&server);
                    let shutdown = for_connections.clone();
                    connections.spawn(async move {
                        match conn {
                            Accepted::Tcp(stream, peer) => {
                                connection(stream, peer, server, shutdown).await;
                            }
                            Accepted::Unix(stream, peer) => {
                                connection(stream, peer, server, shutdown).await;
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(addr = %listener.addr, error = %e, "accepting an NBD connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }

    let addr = listener.addr.clone();
    // Free the address at once, so a successor can bind while we drain.
    drop(listener);
    tracing::info!(%addr, open = connections.len(), "NBD server shutting down");
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            %addr,
            open = connections.len(),
            "NBD connections still busy after the shutdown grace period; dropping them"
        );
        connections.shutdown().await;
    }
    Ok(())
}

/// A connected socket: split into owned halves for the plaintext path, put back together
/// for STARTTLS.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn halves(self) -> (Self::Read, Self::Write);
    fn reunite(read: Self::Read, write: Self::Write) -> io::Result<Self>;
}

impl Socket for TcpStream {
    type Read = tcp::OwnedReadHalf;
    type Write = tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn reunite(read: Self::Read, write: Self::Write) -> io::Result<Self> {
        read.reunite(write).map_err(io::Error::other)
    }
}

impl Socket for UnixStream {
    type Read = unix::OwnedReadHalf;
    type Write = unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn reunite(read: Self::Read, write: Self::Write) -> io::Result<Self> {
        read.reunite(write).map_err(io::Error::other)
    }
}

/// One connection from greeting to close.
async fn connection<S: Socket>(
    stream: S,
    peer: String,
    server: Arc<NbdServer>,
    mut shutdown: watch::Receiver<bool>,
) {
    let security = server.security();
    let deadline = Instant::now() + security.handshake_timeout;
    let tls = match security.mode {
        TlsMode::Off => Tls::Unavailable,
        TlsMode::On => Tls::Offered,
        TlsMode::Require => Tls::Required,
    };
    tracing::debug!(peer, "NBD client connected");
    let buffers = server.buffers().holder();
    // Waits (within the handshake's deadline) while the server holds too much already.
    let Some(socket_buffers) = handshake_phase(
        async { Ok(buffers.acquire(CONNECTION_BUFFERS).await) },
        deadline,
        &mut shutdown,
        &peer,
    )
    .await
    else {
        return;
    };
    let (r, w) = stream.halves();
    let mut reader = BufReader::with_capacity(IO_BUFFER, r);
    let mut writer = BufWriter::with_capacity(IO_BUFFER, w);
    let plaintext = async {
        let mut state = greet(&mut reader, &mut writer, tls).await?;
        let outcome = options(&mut reader, &mut writer, &server, &peer, &mut state).await?;
        Ok((outcome, state))
    };
    let Some((outcome, mut state)) =
        handshake_phase(plaintext, deadline, &mut shutdown, &peer).await
    else {
        return;
    };
    let (session, reader, writer, _tls_buffers) = match outcome {
        Outcome::Transmission(session) => {
            return transmit(reader, writer, session, shutdown, &peer, &buffers).await;
        }
        Outcome::Aborted => {
            tracing::debug!(peer, "NBD client aborted the handshake");
            return;
        }
        Outcome::StartTls => {
            let Some(acceptor) = security.acceptor.clone() else {
                // `options` acknowledges STARTTLS only when TLS is offered.
                tracing::error!(peer, "STARTTLS acknowledged without TLS credentials");
                return;
            };
            let upgraded = async {
                // Anything already buffered was sent before our reply: plaintext the
                // client wants us to treat as if it came over TLS. Refuse it.
                if !reader.buffer().is_empty() {
                    return Err(HandshakeError::DataAfterStartTls);
                }
                let tls_buffers = buffers.acquire(TLS_BUFFERS).await;
                let socket = S::reunite(reader.into_inner(), writer.into_inner())?;
                let mut stream = acceptor
                    .accept(Metered::new(socket, MAX_TLS_HANDSHAKE_BYTES))
                    .await
                    .map_err(HandshakeError::Tls)?;
                stream.get_mut().0.lift();
                state.tls = Tls::Active;
                tracing::debug!(peer, "NBD client switched to TLS");
                let (r, w) = tokio::io::split(stream);
                let mut reader = BufReader::with_capacity(IO_BUFFER, r);
                let mut writer = BufWriter::with_capacity(IO_BUFFER, w);
                let outcome = options(&mut reader, &mut writer, &server, &peer, &mut state).await?;
                Ok((outcome, reader, writer, tls_buffers))
            };
            let Some((outcome, reader, writer, tls_buffers)) =
                handshake_phase(upgraded, deadline, &mut shutdown, &peer).await
            else {
                return;
            };
            match outcome {
                Outcome::Transmission(session) => (session, reader, writer, tls_buffers),
                Outcome::Aborted => {
                    tracing::debug!(peer, "NBD client aborted the handshake");
                    return;
                }
                Outcome::StartTls => {
                    tracing::error!(peer, "STARTTLS acknowledged twice");
                    return;
                }
            }
        }
    };
    transmit(reader, writer, session, shutdown, &peer, &buffers).await;
    drop(socket_buffers);
}

/// Runs one step of the negotiation until `deadline`; `None` (logged) if it failed, ran
/// out of time or the server is shutting down.
async fn handshake_phase<T>(
    phase: impl Future<Output = Result<T, HandshakeError>>,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
    peer: &str,
) -> Option<T> {
    let result = tokio::select! {
        biased;
        _ = stop_requested(shutdown) => {
            tracing::debug!(peer, "closing an NBD connection in its handshake: shutting down");
            return None;
        }
        result = tokio::time::timeout_at(deadline, phase) => result,
    };
    match result {
        Ok(Ok(value)) => Some(value),
        Err(_) => {
            tracing::warn!(
                peer,
                "NBD handshake not finished by its deadline; closing this connection"
            );
            None
        }
        Ok(Err(HandshakeError::Io(e))) => {
            tracing::debug!(peer, error = %e, "NBD client left during the handshake");
            None
        }
        Ok(Err(e)) => {
            tracing::warn!(peer, error = %e, "NBD handshake failed; closing this connection");
            None
        }
    }
}

/// The transmission phase of a negotiated connection, logged.
async fn transmit<R, W>(
    reader: R,
    writer: W,
    session: Session,
    shutdown: watch::Receiver<bool>,
    peer: &str,
    buffers: &Holder,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let name = session.export.name.clone();
    tracing::info!(
        peer,
        export = %name,
        structured = session.structured,
        contexts = session.contexts.len(),
        "NBD client connected"
    );
    match serve_export(reader, writer, session, shutdown, peer, buffers).await {
        Ok(ending) => tracing::info!(peer, export = %name, ?ending, "NBD client disconnected"),
        Err(TransmissionError::Io(e)) => {
            tracing::info!(peer, export = %name, error = %e, "NBD connection lost")
        }
        Err(e) => tracing::warn!(
            peer,
            export = %name,
            error = %e,
            "NBD protocol error; closing this connection"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unix_socket_files_are_reclaimed_only_when_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let addr = ListenAddr::Unix(path.clone());

        // A socket file whose server is gone is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let listener = bind(&addr).await.expect("stale socket reclaimed");

        // A live server's socket is not stolen.
        let err = bind(&addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        assert!(err.to_string().contains("nbd.sock"), "{err}");

        // Dropping the listener removes its own socket file.
        drop(listener);
        assert!(!path.exists());

        // Anything that is not a socket is left alone.
        std::fs::write(&path, b"precious").unwrap();
        let err = bind(&addr).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists, "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn tcp_reports_the_port_it_got() {
        let listener = bind(&"tcp:127.0.0.1:0".parse().unwrap()).await.unwrap();
        match listener.local_addr() {
            ListenAddr::Tcp(a) => assert_ne!(a.port(), 0),
            other => panic!("{other}"),
        }
    }
}
