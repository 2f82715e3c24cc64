//! The control socket every daemon answers on (a Unix socket): one JSON request per line,
//! one JSON response per line. `tinylag status` is a client of it.
//!
//! ```text
//! → {"cmd":"status"}
//! ← {"ok":true,"result":{...}}        or        ← {"ok":false,"error":"..."}
//! ```
//!
//! Who may do what: the socket file is created `0600` (owner only), or `0660` with a
//! group (`--control-group`), in a directory the daemon checks others cannot write to
//! (else they could swap the socket under a client). Every request is then checked
//! against the peer's credentials (`SO_PEERCRED`) by [`authorize`]: read-only commands
//! (`status`) are answered to whoever could connect; every other command, including any
//! added later, is refused unless the peer is the daemon's own user, root, or in the
//! control group. The socket's mode and the check guard each other: a socket loosened by
//! hand (e.g. `chmod 666` for monitoring) still lets only those peers change anything.
//!
//! Must never: let a slow or malformed client hold up the daemon (each connection is its
//! own task with a line-length cap and a read timeout; a request line that is not JSON, or
//! not even UTF-8, gets a `malformed request` answer), keep running a command whose client
//! hung up, print credentials in a response, or run a command that is not explicitly
//! read-only for a peer [`authorize`] refuses.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Commands that change nothing and may be answered to anyone who can connect. Every
/// command not listed here is treated as state-changing.
const READ_ONLY_COMMANDS: &[&str] = &["status"];

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request: a command name and optional arguments.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Request {
    pub cmd: String,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub args: serde_json::Value,
}

/// A response line.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// What a daemon does with a request.
#[async_trait]
pub trait Handler: Send + Sync {
    async fn handle(&self, request: Request) -> Response;
}

/// Failures of the control client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens on the socket (daemon not running, or another path).
    #[error("cannot reach the daemon's control socket {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or the daemon answered nothing.
    #[error("control socket {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
    /// The daemon answered with an error.
    #[error("daemon at {path} refused {cmd}: {message}")]
    Refused {
        path: PathBuf,
        cmd: String,
        message: String,
    },
}

/// Who may use a control socket besides its owner and root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// Members of this group may connect (socket mode `0660`) and run every command.
    pub group: Option<u32>,
}

/// The credentials of a connected client, from `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// A bound control socket with the rules [`serve`] applies to its clients.
#[derive(Debug)]
pub struct ControlListener {
    listener: UnixListener,
    /// The daemon's effective uid: the socket's owner.
    owner: u32,
    access: Access,
}

/// Whether `cmd` changes nothing (answered to anyone who can connect).
pub fn is_read_only(cmd: &str) -> bool {
    READ_ONLY_COMMANDS.contains(&cmd)
}

/// May `peer` run `cmd` on a daemon running as `owner`? Read-only commands: yes.
/// Anything else: only the owner, root, or a member of `access.group` (primary group
/// from `SO_PEERCRED`, or supplementary groups of its process). The error names who may.
pub fn authorize(cmd: &str, peer: &Peer, owner: u32, access: &Access) -> Result<(), String> {
    if is_read_only(cmd) || peer.uid == owner || peer.uid == 0 {
        return Ok(());
    }
    if let Some(group) = access.group {
        if peer.gid == group || peer.pid.is_some_and(|pid| in_group(pid, group)) {
            return Ok(());
        }
    }
    let group = access
        .group
        .map(|g| format!(" or group {g}"))
        .unwrap_or_default();
    Err(format!(
        "permission denied: {cmd:?} changes state and only uid {owner}, root{group} may run it \
         (you are uid {})",
        peer.uid
    ))
}

/// Whether process `pid` has `group` among its supplementary groups (`/proc/PID/status`).
fn in_group(pid: i32, group: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .is_some_and(|groups| {
            groups
                .split_whitespace()
                .any(|g| g.parse::<u32>() == Ok(group))
        })
}

/// Resolves `--control-group`: a group name or a numeric gid.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("{name:?} contains NUL"))?;
    // SAFETY: `libc::group` is plain data (integers and pointers); all-zero is valid.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives its use through `group`.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!(
            "no group named {name:?}; give a group name from /etc/group or a numeric gid"
        ));
    }
    Ok(group.gr_gid)
}

/// Refuses a directory that others could write to (unless it is sticky, like /tmp) or
/// that belongs to another user: they could replace the socket under a client.
fn check_directory(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir)?;
    let mode = meta.permissions().mode();
    let me = rustix::process::geteuid().as_raw();
    let unsafe_dir = if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        Some(format!(
            "it is writable by everyone (mode {:o})",
            mode & 0o7777
        ))
    } else if meta.uid() != me && meta.uid() != 0 {
        Some(format!(
            "it belongs to uid {}, not to us (uid {me}) or root",
            meta.uid()
        ))
    } else {
        None
    };
    match unsafe_dir {
        Some(reason) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing to create a control socket in {}: {reason}; choose another --control path",
                dir.display()
            ),
        )),
        None => Ok(()),
    }
}

/// Binds an owner-only (`0600`) control socket; see [`bind_with`].
pub async fn bind(path: &Path) -> std::io::Result<ControlListener> {
    bind_with(path, Access::default()).await
}

/// Binds the control socket, replacing a stale socket file (one nothing answers on), and
/// sets its mode: `0600`, or `0660` owned by `access.group`. Refuses if a live daemon
/// already answers there or if the directory is not safe (see [`check_directory`]).
pub async fn bind_with(path: &Path, access: Access) -> std::io::Result<ControlListener> {
    check_directory(path)?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another daemon answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Until the chmod the socket has the umask's mode; a client connecting in that
    // instant can still run only read-only commands (`authorize`).
    if let Some(gid) = access.group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    let mode = if access.group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(ControlListener {
        listener,
        owner: rustix::process::geteuid().as_raw(),
        access,
    })
}

/// Serves requests until `shutdown` turns true.
pub async fn serve(
    listener: ControlListener,
    handler: Arc<dyn Handler>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let (owner, access) = (listener.owner, listener.access);
    loop {
        tokio::select! {
            _ = wait_shutdown(&mut shutdown) => return,
            accepted = listener.listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_one(stream, handler, owner, access).await {
                            tracing::debug!("control connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn wait_shutdown(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // The `Ref` returned by `wait_for` is not `Send`; drop it inside this future.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}

async fn serve_one(
    stream: UnixStream,
    handler: Arc<dyn Handler>,
    owner: u32,
    access: Access,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let fd = stream.as_raw_fd();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 + 1));
    // Bytes, not a `String`: a line that is not UTF-8 is answered, not a read error.
    let mut line = Vec::new();
    let n = match tokio::time::timeout(READ_TIMEOUT, lines.read_until(b'\n', &mut line)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let response = if n == 0 {
        return Ok(());
    } else if n > MAX_REQUEST || !line.ends_with(b"\n") {
        Response::error(format!(
            "request longer than {MAX_REQUEST} bytes or not newline-terminated"
        ))
    } else {
        match serde_json::from_slice::<Request>(&line) {
            Ok(request) => match authorize(&request.cmd, &peer, owner, &access) {
                Ok(()) => {
                    let cmd = request.cmd.clone();
                    tokio::select! {
                        response = handler.handle(request) => response,
                        () = hung_up(fd) => {
                            // Dropping the command's future stops it (a `verify` reads no
                            // further region) and frees what it held; the socket closes here.
                            tracing::info!(%cmd, pid = ?peer.pid, "control client hung up: command abandoned");
                            return Ok(());
                        }
                    }
                }
                Err(refusal) => {
                    tracing::warn!(
                        cmd = %request.cmd,
                        uid = peer.uid,
                        pid = ?peer.pid,
                        "control request refused"
                    );
                    Response::error(refusal)
                }
            },
            Err(e) => Response::error(format!("malformed request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// How often a running command checks whether its client is still there.
const HANGUP_CHECK: Duration = Duration::from_millis(200);

/// Resolves once the client has closed its socket (`POLLHUP` or `POLLERR`). A client that
/// only shut down its sending side (`socat`, `nc -U` at the end of their input) still waits
/// for the answer: that is no hang-up.
async fn hung_up(fd: std::os::fd::RawFd) {
    let mut tick = tokio::time::interval(HANGUP_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut poll = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait; `fd` belongs to the connection this task owns
        // (it outlives this future, which the caller drops first).
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        if n > 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// Sends one request and returns the result of a successful response.
pub async fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    let protocol = |reason: String| ControlError::Protocol {
        path: path.to_path_buf(),
        reason,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).map_err(|e| protocol(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    if answer.is_empty() {
        return Err(protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| protocol(format!("malformed answer: {e}")))?;
    if response.ok {
        Ok(response.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ControlError::Refused {
            path: path.to_path_buf(),
            cmd: request.cmd.clone(),
            message: response.error.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait]
    impl Handler for Echo {
        async fn handle(&self, request: Request) -> Response {
            match request.cmd.as_str() {
                "status" => Response::ok(serde_json::json!({"mode": "logging"})),
                other => Response::error(format!("unknown command {other:?}")),
            }
        }
    }

    #[tokio::test]
    async fn answers_requests_and_survives_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, Arc::new(Echo), rx));

        let status = Request {
            cmd: "status".into(),
            args: serde_json::Value::Null,
        };
        let result = request(&path, &status).await.unwrap();
        assert_eq!(result["mode"], "logging");

        let mut raw = UnixStream::connect(&path).await.unwrap();
        raw.write_all(b"not json\n").await.unwrap();
        let mut answer = String::new();
        BufReader::new(raw).read_line(&mut answer).await.unwrap();
        assert!(answer.contains("malformed request"), "{answer}");

        let bogus = Request {
            cmd: "explode".into(),
            args: serde_json::Value::Null,
        };
        assert!(matches!(
            request(&path, &bogus).await,
            Err(ControlError::Refused { .. })
        ));
        // Still serving after the bad ones; a second bind while it runs is refused.
        assert!(request(&path, &status).await.is_ok());
        assert!(bind(&path).await.is_err());
        tx.send(true).unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_request_line_that_is_not_utf8_gets_a_malformed_request_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let server = tokio::spawn(serve(listener, Arc::new(Echo), rx));
        for garbage in [
            &b"\xff\xfe\x80 not utf-8\n"[..],
            b"{\"cmd\":\"st\xffatus\"}\n",
        ] {
            let mut raw = UnixStream::connect(&path).await.unwrap();
            raw.write_all(garbage).await.unwrap();
            let mut answer = String::new();
            BufReader::new(raw).read_line(&mut answer).await.unwrap();
            let response: Response = serde_json::from_str(&answer).unwrap();
            assert!(!response.ok, "{answer}");
            assert!(
                response.error.unwrap().starts_with("malformed request"),
                "{answer}"
            );
        }
        tx.send(true).unwrap();
        server.await.unwrap();
    }

    /// A command that runs until its future is dropped, and says when that happened.
    struct Endless {
        started: tokio::sync::mpsc::UnboundedSender<()>,
        dropped: tokio::sync::mpsc::UnboundedSender<()>,
    }

    struct SignalOnDrop(tokio::sync::mpsc::UnboundedSender<()>);

    impl Drop for SignalOnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(());
        }
    }

    #[async_trait]
    impl Handler for Endless {
        async fn handle(&self, _request: Request) -> Response {
            let _guard = SignalOnDrop(self.dropped.clone());
            let _ = self.started.send(());
            std::future::pending::<()>().await;
            Response::error("unreachable")
        }
    }

    #[tokio::test]
    async fn a_command_whose_client_hangs_up_is_stopped_and_its_socket_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let (dropped_tx, mut dropped) = tokio::sync::mpsc::unbounded_channel();
        let handler = Arc::new(Endless {
            started: started_tx,
            dropped: dropped_tx,
        });
        let server = tokio::spawn(serve(listener, handler, rx));

        // A client that only stops sending still gets to wait for its answer.
        let mut half = UnixStream::connect(&path).await.unwrap();
        half.write_all(b"{\"cmd\":\"verify\"}\n").await.unwrap();
        half.shutdown().await.unwrap();
        started.recv().await.unwrap();
        tokio::time::sleep(HANGUP_CHECK * 3).await;
        assert!(dropped.try_recv().is_err(), "a half-close is not a hang-up");

        // One that closes its socket: the command is dropped and the daemon's end closes.
        let mut gone = UnixStream::connect(&path).await.unwrap();
        gone.write_all(b"{\"cmd\":\"verify\"}\n").await.unwrap();
        started.recv().await.unwrap();
        drop(gone);
        tokio::time::timeout(Duration::from_secs(10), dropped.recv())
            .await
            .expect("the abandoned command was not stopped")
            .unwrap();
        // The half-closed client's command is still running; closing it stops that one too.
        drop(half);
        tokio::time::timeout(Duration::from_secs(10), dropped.recv())
            .await
            .expect("the second abandoned command was not stopped")
            .unwrap();
        tx.send(true).unwrap();
        server.await.unwrap();
    }

    #[test]
    fn only_read_only_commands_are_open_to_other_users() {
        let owner = 1000;
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        let open = Access::default();
        let group = Access { group: Some(50) };
        // Status: anyone who could connect.
        assert!(authorize("status", &peer(2000, 2000), owner, &open).is_ok());
        // The owner and root: everything.
        for cmd in ["mark", "verify", "resync", "status"] {
            assert!(authorize(cmd, &peer(owner, 1), owner, &open).is_ok());
            assert!(authorize(cmd, &peer(0, 0), owner, &open).is_ok());
        }
        // Anything not known to be read-only counts as state-changing, including
        // commands that do not exist yet.
        for cmd in ["mark", "verify", "resync", "future-command", "Status", ""] {
            let err = authorize(cmd, &peer(2000, 2000), owner, &open).unwrap_err();
            assert!(
                err.contains("permission denied") && err.contains("uid 2000"),
                "{err}"
            );
            assert!(authorize(cmd, &peer(2000, 50), owner, &group).is_ok());
            assert!(authorize(cmd, &peer(2000, 51), owner, &group).is_err());
        }
        // Supplementary groups are read from the peer's process.
        let me = Peer {
            uid: 2000,
            gid: 2000,
            pid: Some(std::process::id() as i32),
        };
        let my_gid = rustix::process::getegid().as_raw();
        let err = authorize(
            "mark",
            &me,
            owner,
            &Access {
                group: Some(my_gid + 12345),
            },
        );
        assert!(err.is_err());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let groups = status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .unwrap();
        if let Some(g) = groups.split_whitespace().next() {
            let g: u32 = g.parse().unwrap();
            assert!(authorize("mark", &me, owner, &Access { group: Some(g) }).is_ok());
        }
    }

    #[tokio::test]
    async fn sockets_are_owner_only_or_group_and_refuse_unsafe_directories() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(listener);
        std::fs::remove_file(&path).unwrap();

        let gid = rustix::process::getegid().as_raw();
        let _listener = bind_with(&path, Access { group: Some(gid) }).await.unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);

        let open = tempfile::tempdir().unwrap();
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = bind(&open.path().join("ctl.sock")).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("writable by everyone"), "{err}");
        assert!(!open.path().join("ctl.sock").exists());
        // A sticky world-writable directory (like /tmp) is fine.
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(bind(&open.path().join("ctl.sock")).await.is_ok());
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("4242").unwrap(), 4242);
        assert_eq!(resolve_group("root").unwrap(), 0);
        let err = resolve_group("no-such-group-here").unwrap_err();
        assert!(err.contains("numeric gid"), "{err}");
    }
}
