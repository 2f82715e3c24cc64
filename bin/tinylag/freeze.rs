//! `tinylag mark --freeze MOUNTPOINT --exec-before CMD --exec-after CMD`: a mark that is more
//! than crash-consistent. A plain mark of a mounted file system is a state a power cut could
//! have left (the file system replays its journal when it is restored). Frozen with
//! `fsfreeze`, the file system has written everything and holds new writes while the mark is
//! taken, so the state at the mark needs no recovery; `--exec-before` lets an application
//! (a database's checkpoint, a backup mode) make its own files consistent first.
//!
//! The order: `--exec-before` (if it fails: nothing frozen, no mark), `fsfreeze --freeze` of
//! each mount point in turn (if one fails: those frozen are unfrozen, no mark), the mark,
//! `fsfreeze --unfreeze` newest first, then `--exec-after` (whenever `--exec-before` ran, also
//! after a failure, so an application is never left in its backup mode).
//!
//! Must never: leave a file system frozen — they are unfrozen after the mark, on its error,
//! when it outlasts `--freeze-timeout`, on SIGINT/SIGTERM and on a panic (only SIGKILL cannot
//! be answered: then `fsfreeze --unfreeze MOUNTPOINT` by hand); unfreeze a file system this
//! command did not freeze; record a mark after `--exec-before` or a freeze failed.

use std::future::Future;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cmd::args::parse_duration;
use crate::cmd::output::say;
use tinylag::units::format_duration;

/// What makes a mark consistent beyond a crash: freezes and application hooks.
#[derive(Debug, Args)]
pub struct ConsistencyArgs {
    /// Freeze this mounted file system (`fsfreeze`) while the mark is taken, so the state at
    /// the mark needs no journal recovery; repeatable. Needs root.
    #[arg(long = "freeze", value_name = "MOUNTPOINT")]
    pub freeze: Vec<PathBuf>,
    /// The longest the file systems stay frozen: a mark that takes longer fails, and they are
    /// unfrozen.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub freeze_timeout: Duration,
    /// A shell command run first (`sh -c`), e.g. a database's checkpoint; if it fails,
    /// nothing is frozen and no mark is recorded.
    #[arg(long, value_name = "CMD")]
    pub exec_before: Option<String>,
    /// A shell command run last, after the unfreeze, also when the mark failed (once
    /// `--exec-before`, if given, has run).
    #[arg(long, value_name = "CMD")]
    pub exec_after: Option<String>,
}

impl ConsistencyArgs {
    /// Whether anything beyond a plain mark was asked for.
    pub fn any(&self) -> bool {
        !self.freeze.is_empty() || self.exec_before.is_some() || self.exec_after.is_some()
    }
}

/// Runs `mark` between the hooks and inside the freezes of `args` (see the module header for
/// the order). `mark`'s error comes first; a failing `--exec-after` is reported after it.
pub async fn around<T>(
    args: &ConsistencyArgs,
    mark: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    for mountpoint in &args.freeze {
        if !mountpoint.is_dir() {
            bail!(
                "--freeze {}: not a directory (give the mount point of a mounted file system); nothing was frozen and no mark recorded",
                mountpoint.display()
            );
        }
    }
    // From here on SIGINT/SIGTERM no longer end the process at once: they are answered once
    // the file systems are unfrozen.
    let mut signals = Signals::new()?;
    if let Some(cmd) = &args.exec_before {
        hook("--exec-before", cmd, &mut signals)
            .await
            .map_err(|e| e.context("nothing was frozen and no mark recorded".to_string()))?;
    }
    let marked = frozen(args, mark, &mut signals).await;
    let after = match &args.exec_after {
        Some(cmd) => hook("--exec-after", cmd, &mut signals).await,
        None => Ok(()),
    };
    match (marked, after) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(e.context("the mark was recorded")),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(after)) => Err(e.context(format!("and then {after:#}"))),
    }
}

/// Freezes every `--freeze` mount point, runs `mark` within `--freeze-timeout` unless a
/// signal comes first, and unfreezes.
async fn frozen<T>(
    args: &ConsistencyArgs,
    mark: impl Future<Output = anyhow::Result<T>>,
    signals: &mut Signals,
) -> anyhow::Result<T> {
    if args.freeze.is_empty() {
        return tokio::select! {
            biased;
            name = signals.next() => Err(anyhow!("interrupted by {name}; the daemon may still record the mark (see `tinylag timeline`)")),
            marked = mark => marked,
        };
    }
    let mut frozen = Frozen::default();
    for mountpoint in &args.freeze {
        // An error here drops `frozen`, which unfreezes what was frozen before it.
        frozen
            .freeze(mountpoint)
            .context("no mark recorded; what was frozen is unfrozen")?;
    }
    let since = Instant::now();
    let timeout = args.freeze_timeout;
    let marked = tokio::select! {
        biased;
        name = signals.next() => Err(anyhow!(
            "interrupted by {name} while frozen: unfrozen; the daemon may still record the mark (see `tinylag timeline`)"
        )),
        marked = tokio::time::timeout(timeout, mark) => marked.unwrap_or_else(|_| Err(anyhow!(
            "the mark took longer than --freeze-timeout {}: unfrozen; the daemon may still record it (see `tinylag timeline`)",
            format_duration(timeout)
        ))),
    };
    let thawed = frozen.thaw();
    say(format!(
        "unfroze {} after {:.2}s",
        args.freeze
            .iter()
            .map(|m| m.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        since.elapsed().as_secs_f64()
    ));
    let value = marked?;
    thawed?;
    Ok(value)
}

/// The mount points this command froze, unfrozen newest first by [`Frozen::thaw`] or, on an
/// early return or a panic, on drop.
#[derive(Default)]
struct Frozen {
    mountpoints: Vec<PathBuf>,
}

impl Frozen {
    fn freeze(&mut self, mountpoint: &Path) -> anyhow::Result<()> {
        fsfreeze("--freeze", mountpoint)?;
        self.mountpoints.push(mountpoint.to_owned());
        Ok(())
    }

    /// Unfreezes everything; tries every mount point and reports the first failure.
    fn thaw(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(mountpoint) = self.mountpoints.pop() {
            if let Err(e) = fsfreeze("--unfreeze", &mountpoint) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            say(format!("tinylag mark: {e:#}"));
        }
    }
}

/// `fsfreeze ACTION MOUNTPOINT`, with its own message on failure.
fn fsfreeze(action: &str, mountpoint: &Path) -> anyhow::Result<()> {
    let out = Command::new("fsfreeze")
        .arg(action)
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run fsfreeze {action} (util-linux)"))?;
    if !out.status.success() {
        bail!(
            "fsfreeze {action} {} failed ({}): {}",
            mountpoint.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `sh -c CMD` with its output on our stderr (stdout stays the mark's, for `--json`);
/// a signal meanwhile stops it (by its pid) and fails.
async fn hook(flag: &str, cmd: &str, signals: &mut Signals) -> anyhow::Result<()> {
    /// How often the hook is looked at (it is a child process, not a future).
    const POLL: Duration = Duration::from_millis(20);
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::from(stderr))
        .spawn()
        .with_context(|| format!("{flag}: cannot run sh"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::select! {
            biased;
            name = signals.next() => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{flag} `{cmd}` interrupted by {name}");
            }
            () = tokio::time::sleep(POLL) => {}
        }
    };
    if !status.success() {
        bail!("{flag} `{cmd}` failed ({status})");
    }
    Ok(())
}

/// SIGINT and SIGTERM, caught from creation on.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
        })
    }

    /// The name of the next signal.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
