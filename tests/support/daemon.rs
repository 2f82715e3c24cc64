//! The primary daemon (`tinylag serve`) as a child process of a test: `init` a journal and a
//! sparse primary, start the daemon on Unix sockets in the test's directory, ask it for its
//! status over the control socket, stop it with SIGTERM, read its memory use. The process is
//! killed by pid when the guard drops.
//!
//! Must never: leave a daemon running after a test (the guard kills it), wait forever for
//! one (every wait has a deadline and shows the daemon's log when it fails).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use super::procs::{wait_for, ChildGuard};

/// How long a daemon may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `tinylag` binary under test.
pub fn tinylag_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tinylag")
}

/// Runs `tinylag args…` to completion.
pub fn tinylag(args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(tinylag_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TINYLAG_LOG", "warn")
        .output()
        .expect("run tinylag")
}

/// Runs `tinylag args…` and returns its stdout; the test fails unless it exits 0.
pub fn tinylag_ok(args: &[&str], env: &[(&str, String)]) -> String {
    let out = tinylag(args, env);
    assert!(
        out.status.success(),
        "tinylag {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tinylag init` of `journal` with a sparse primary at `primary` of `size` (`64M`, …).
pub fn init(journal: &str, primary: &Path, size: &str, extra: &[&str], env: &[(&str, String)]) {
    let mut args = vec![
        "init",
        "--journal",
        journal,
        "--size",
        size,
        "--primary",
        primary.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    tinylag_ok(&args, env);
}

/// A running `tinylag serve`.
pub struct Daemon {
    guard: ChildGuard,
    pub primary: PathBuf,
    /// The NBD Unix socket.
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tinylag serve --primary PRIMARY --journal JOURNAL extra…` with the sockets
    /// beside the primary, and waits until it answers `status`.
    pub fn start(primary: &Path, journal: &str, extra: &[&str], env: &[(&str, String)]) -> Daemon {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--primary".into(),
            primary.display().to_string(),
        ];
        if !extra.contains(&"--no-journal") {
            args.push("--journal".into());
            args.push(journal.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_args(primary, None, &args, env)
    }

    /// Starts `tinylag <args>`, which must serve `primary` with the NBD socket beside it and
    /// the control socket at `control` (default: beside it too).
    pub fn start_args(
        primary: &Path,
        control: Option<&Path>,
        args: &[String],
        env: &[(&str, String)],
    ) -> Daemon {
        let with_suffix = |s: &str| {
            let mut p = primary.as_os_str().to_owned();
            p.push(s);
            PathBuf::from(p)
        };
        let log = with_suffix(".log");
        let mut cmd = Command::new(tinylag_bin());
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TINYLAG_LOG", "info");
        let guard = ChildGuard::spawn_logged("tinylag serve", &mut cmd, &log).expect("spawn");
        let mut daemon = Daemon {
            guard,
            primary: primary.to_path_buf(),
            socket: with_suffix(".sock"),
            control: control.map_or_else(|| with_suffix(".ctl"), Path::to_path_buf),
            log,
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&mut self) {
        let what = format!("tinylag serve to answer on {}", self.control.display());
        wait_for(&what, START_TIMEOUT, || {
            if let Some(status) = self.guard.exited() {
                panic!(
                    "tinylag serve exited ({status}) before answering; its log ends with:\n{}",
                    self.log_tail()
                );
            }
            self.try_status()
                .map_err(|e| format!("{e}; log:\n{}", self.log_tail()))
        });
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// The NBD URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The daemon's last lines of output.
    pub fn log_tail(&self) -> String {
        self.guard.log_tail(8192)
    }

    /// One `{"cmd":"status"}` over the control socket.
    pub fn try_status(&self) -> Result<serde_json::Value, String> {
        control_status(&self.control)
    }

    /// The status; the test fails if the daemon does not answer.
    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("status failed: {e}; log:\n{}", self.log_tail()))
    }

    /// Polls the status until `ready` holds on it.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, timeout, || {
            let status = self.status();
            if ready(&status) {
                Ok(status)
            } else {
                Err(format!("status:\n{status:#}"))
            }
        })
    }

    /// Waits until the daemon's log holds `needle` (what it says once, such as promote's
    /// "promoted at LSN …").
    pub fn wait_log(&self, timeout: Duration, needle: &str) {
        wait_for(&format!("{needle:?} in the log"), timeout, || {
            let log = self.log_tail();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(format!("log:\n{log}"))
            }
        });
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        self.guard.exited().is_none()
    }

    /// (VmRSS, VmHWM) in bytes, from /proc/PID/status.
    pub fn memory(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().strip_suffix("kB"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// SIGKILL (by pid) and reaps it: a crash, no shutdown of any kind.
    pub fn kill9(&mut self) {
        let child = self.guard.child_mut();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for the exit; returns the exit status and the log.
    pub fn stop(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let status = self.guard.terminate(timeout).expect("terminate");
        (status, self.log_tail())
    }

    /// Stops the daemon and fails the test unless it exits 0.
    pub fn stop_ok(&mut self) -> String {
        let (status, log) = self.stop(Duration::from_secs(60));
        assert!(
            status.success(),
            "tinylag serve exited with {status}; log:\n{log}"
        );
        log
    }
}

/// One `{"cmd":"status"}` on the control socket of any daemon (serve, replay, up, mount).
pub fn control_status(control: &Path) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(control).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"{\"cmd\":\"status\"}\n")
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let response: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
    if response["ok"] != true {
        return Err(format!("daemon refused: {response}"));
    }
    Ok(response["result"].clone())
}

/// Polls the status on `control` until `ready` holds on it; fails at once, with its log, if
/// `child` (the daemon answering there) exits first.
pub fn wait_control(
    control: &Path,
    child: &mut ChildGuard,
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, timeout, || {
        if let Some(status) = child.exited() {
            panic!(
                "{} exited ({status}) while waiting for {what}; log:\n{}",
                child.name(),
                child.log_tail(8192)
            );
        }
        match control_status(control) {
            Ok(status) if ready(&status) => Ok(status),
            Ok(status) => Err(format!("status:\n{status:#}")),
            Err(e) => Err(format!("no status ({e}); log:\n{}", child.log_tail(4096))),
        }
    })
}

/// Waits until the replay agent answering on `control` has applied `lsn`.
pub fn wait_applied(
    control: &Path,
    agent: &mut ChildGuard,
    lsn: u64,
    timeout: Duration,
) -> serde_json::Value {
    wait_control(
        control,
        agent,
        timeout,
        &format!("LSN {lsn} applied"),
        |s| s["applied_lsn"].as_u64().is_some_and(|a| a >= lsn),
    )
}

/// Waits until the lease of writer `epoch` in the local journal directory `journal` has
/// run out (`renewed_at_ns + ttl_ms` is past): its writer, paused or partitioned, no longer
/// renews it. The wait is the lease's own term, read from the lease, not a guess of it.
pub fn wait_lease_expired(journal: &Path, epoch: u64, timeout: Duration) {
    let key = journal.join("leases").join(format!("{epoch:020}"));
    wait_for(
        &format!("the lease of epoch {epoch} to run out"),
        timeout,
        || {
            let text =
                std::fs::read_to_string(&key).map_err(|e| format!("{}: {e}", key.display()))?;
            let lease: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let renewed = lease["renewed_at_ns"].as_u64().ok_or("no renewed_at_ns")?;
            let ttl_ns = lease["ttl_ms"].as_u64().ok_or("no ttl_ms")? * 1_000_000;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64;
            if now > renewed + ttl_ns {
                Ok(())
            } else {
                Err(format!("lease {lease}"))
            }
        },
    );
}
