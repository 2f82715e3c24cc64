//! Processes started by tests, killed by pid on drop, and waiting for what they provide.
//!
//! Every server a test starts (S3 servers, the daemon, NBD clients) lives in a
//! [`ChildGuard`], so a failing test never leaves a process behind. Servers bind only to
//! 127.0.0.1 ports from [`free_port`] or to Unix sockets in the test's temporary directory.
//!
//! Tests wait for conditions, never for a fixed time: [`wait_for`] (and [`wait_for_async`] in
//! async tests) polls a check every 20 ms until it holds, and fails the test after its
//! deadline with what it waited for and the last state the check saw. This file holds the
//! only polling sleep of the helpers.
//!
//! Must never: kill anything but the child it started; wait forever.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A temporary path as a command argument (the tests' temporary paths are UTF-8).
pub fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A finished command's stdout then stderr, for checks and messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How often the wait helpers poll.
const POLL: Duration = Duration::from_millis(20);

/// A child process, stopped (SIGKILL + wait, by its pid) when the guard drops.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
    log: Option<PathBuf>,
}

impl ChildGuard {
    /// Spawns `cmd` with its stdout and stderr appended to `log` (read back by
    /// [`ChildGuard::log_tail`] when something goes wrong) and stdin closed.
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> io::Result<ChildGuard> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            log: Some(log.to_path_buf()),
        })
    }

    /// Spawns `cmd` as configured by the caller (pipes, inherited output, ...).
    pub fn spawn(name: &str, cmd: &mut Command) -> io::Result<ChildGuard> {
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(ChildGuard {
            child,
            name: name.to_string(),
            log: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child, e.g. to take its piped stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(POLL);
        }
    }

    /// Asks the child to stop with SIGTERM, and kills it if it has not after `grace`.
    /// Returns how it ended.
    pub fn terminate(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(status) = self.exited() {
            return Ok(status);
        }
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of a child we have not reaped yet, so the pid is
            // still ours and cannot have been reused by another process.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if let Some(status) = self.wait_timeout(grace) {
            return Ok(status);
        }
        self.child.kill()?;
        self.child.wait()
    }

    /// Waits until something accepts connections on 127.0.0.1:`port`, failing early (with
    /// the end of the log) if the child exits first.
    pub fn wait_for_port(&mut self, port: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if port_accepts(port) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                return Err(format!(
                    "{} exited ({status}) before listening on port {port}; its output ends with:\n{}",
                    self.name,
                    self.log_tail(4096)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not listen on port {port} within {timeout:?}; its output ends with:\n{}",
                    self.name,
                    self.log_tail(4096)
                ));
            }
            sleep(POLL);
        }
    }

    /// Waits until `path` exists (a socket, a control socket, a pid file), failing early
    /// (with the end of the log) if the child exits first.
    pub fn wait_for_path(&mut self, path: &Path, timeout: Duration) {
        let what = format!("{} to create {}", self.name, path.display());
        wait_for(&what, timeout, || {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before creating {}; its output ends with:\n{}",
                    self.name,
                    path.display(),
                    self.log_tail(4096)
                );
            }
            if path.exists() {
                Ok(())
            } else {
                Err("not there yet".to_string())
            }
        })
    }

    /// The last `max` bytes of the child's log, or a note that there is none.
    pub fn log_tail(&self, max: u64) -> String {
        let Some(path) = &self.log else {
            return "(output not captured)".to_string();
        };
        let read = || -> io::Result<String> {
            let mut file = File::open(path)?;
            let len = file.metadata()?.len();
            file.seek(SeekFrom::Start(len.saturating_sub(max)))?;
            let mut buf = Vec::new();
            file.read_to_end(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        };
        read().unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited().is_none() {
            // Child::kill sends SIGKILL to this child's pid only.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process may take it before
/// the caller binds it; servers started on it should be retried on a fresh port if they
/// fail to listen.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` right now.
pub fn port_accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<(), String> {
    wait_until(timeout, || port_accepts(port))
        .map_err(|_| format!("nothing listened on 127.0.0.1:{port} within {timeout:?}"))
}

/// Waits until `path` exists (a socket, a pid file, a device node).
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), String> {
    wait_until(timeout, || path.exists())
        .map_err(|_| format!("{} did not appear within {timeout:?}", path.display()))
}

/// Polls `check` until it returns `Ok`, and returns its value. `Err` says why not yet (the last
/// one is in the failure message); the test fails after `timeout` with `what`. A check may
/// itself panic to fail early (a child that exited).
pub fn wait_for<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    wait_for_every(what, timeout, POLL, check)
}

/// [`wait_for`] polling every `every`, for a check that is costly itself (comparing whole
/// images).
pub fn wait_for_every<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last: {last}"
            ),
        }
        sleep(every);
    }
}

/// [`wait_for`] for async tests, whose checks await (a store read) and whose runtime must
/// not be blocked by the poll.
pub async fn wait_for_async<T, F>(what: &str, timeout: Duration, mut check: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last: {last}"
            ),
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `ready` until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(());
        }
        sleep(POLL);
    }
}
