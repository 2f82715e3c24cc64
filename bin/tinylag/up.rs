//! `tinylag up`: the embedded default in one process. Creates (when absent) a sparse primary,
//! a local-directory journal and a replica in one directory, then serves the primary over NBD
//! (`tinylag serve`) and follows the journal onto the replica (`tinylag replay`) side by side,
//! and prints how to connect and how to watch. SIGINT/SIGTERM stop both.
//!
//! Must never: overwrite an existing journal or primary (an existing directory is resumed),
//! or let the replica side stop the primary: if the replay agent fails, the primary keeps
//! serving and the failure is reported.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, FromArgMatches};
use tinylag::block::file;
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::JournalError;
use tinylag::journal::{Manifest, ManifestParams};
use tinylag::nbd::ListenAddr;
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;
use tinylag::units::{format_duration, format_size};

use crate::cmd::args::{parse_duration, parse_listen, parse_size, TlsArgs};
use crate::cmd::config::ConfigArg;
use crate::cmd::metrics::{Endpoint, MetricsArgs};
use crate::cmd::output::{say, self_command, tell};
use crate::cmd::{replay, serve};

/// The consumer name of the replica `up` keeps.
const CONSUMER: &str = "replica";
/// How long the replay agent may take to stop once the primary has stopped.
const REPLAY_STOP: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory holding primary.img, journal/ and replica.img (created if absent).
    #[arg(long, value_name = "DIR", default_value = "./tinylag-data")]
    pub dir: PathBuf,
    /// Device size of a new primary (an existing one keeps its size) [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub size: Option<u64>,
    /// NBD address: unix:PATH or tcp:IP:PORT [default: unix:DIR/primary.img.sock]. TCP on
    /// an address other than loopback needs --tls require (or --insecure-no-tls).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<ListenAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Replay delay of the replica (e.g. 1h).
    #[arg(long, default_value = "0", value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub delay: Duration,
    /// One endpoint for the primary's and the replica's metrics.
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub config: ConfigArg,
}

/// Size of a new primary when `--size` is not given.
const DEFAULT_SIZE: u64 = 1 << 30;

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let delay = format_duration(args.delay);
    // Checked here, before anything is created, rather than by `serve` later.
    let addr = match &args.listen {
        Some(listen) => listen.clone(),
        // The default, a Unix socket in --dir (its path does not matter to the check).
        None => ListenAddr::Unix(args.dir.join("primary.img.sock")),
    };
    args.tls.security(&addr)?;
    let dir = std::path::absolute(&args.dir).context("--dir")?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let primary = dir.join("primary.img");
    let journal = dir.join("journal");
    let replica = dir.join("replica.img");
    // Before anything is printed or created: one `up` per directory.
    let _lock = lock_dir(&dir)?;
    for ctl in [
        serve::default_control_path(&primary),
        replay::default_control_path(&replica),
    ] {
        if std::os::unix::net::UnixStream::connect(&ctl).is_ok() {
            bail!(
                "{} is busy: a tinylag daemon answers on {}; stop it first or use another --dir",
                dir.display(),
                ctl.display()
            );
        }
    }

    let manifest = ensure_journal(&journal, &primary, args.size).await?;
    let size = manifest.device_size(0).unwrap_or(0);
    let export = manifest
        .devices
        .first()
        .map_or_else(|| "disk0".to_string(), |d| d.name.clone());

    let mut serve_argv = vec![
        "serve".to_string(),
        "--primary".into(),
        primary.display().to_string(),
        "--journal".into(),
        journal.display().to_string(),
    ];
    if let Some(listen) = &args.listen {
        serve_argv.extend(["--listen".into(), listen.to_string()]);
    }
    serve_argv.extend(args.tls.to_argv());
    let serve_args: serve::ServeArgs = parse_args(&serve_argv)?;
    let replay_argv = vec![
        "replay".to_string(),
        "--journal".into(),
        journal.display().to_string(),
        "--replica".into(),
        replica.display().to_string(),
        "--name".into(),
        CONSUMER.into(),
        "--delay".into(),
        delay.clone(),
    ];
    let replay_args: replay::ReplayArgs = parse_args(&replay_argv)?;

    let listen = args.listen.as_ref().map_or_else(
        || format!("unix:{}.sock", primary.display()),
        ToString::to_string,
    );
    let uri = args.tls.nbd_uri(&listen.parse()?, &export);
    let metrics = Endpoint::open(&args.metrics, None).await?;
    print_guide(
        &dir,
        &primary,
        &journal,
        &replica,
        size,
        manifest.block_size,
        &listen,
        &uri,
        &export,
        &delay,
    );
    let hub = metrics.as_ref().map(|m| m.hub.clone());
    let (metrics_stop, metrics_stopped) = tokio::sync::watch::channel(false);
    if let Some(url) = metrics.as_ref().and_then(Endpoint::url) {
        tell(format!(
            "metrics: {url}   # the primary's and the replica's series"
        ));
    }
    let metrics_task = metrics.and_then(|m| m.start(metrics_stopped));

    let replay_task = tokio::spawn(replay::run_with(replay_args, hub.clone()));
    let served = serve::run_with(serve_args, hub).await;
    // Both listen for SIGINT/SIGTERM; once the primary is down, the agent finishes its batch.
    match tokio::time::timeout(REPLAY_STOP, replay_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => say(format!(
            "tinylag up: the replay agent stopped with an error: {e:#}"
        )),
        Ok(Err(e)) => say(format!("tinylag up: the replay agent task failed: {e}")),
        Err(_) => say(format!(
            "tinylag up: the replay agent did not stop within {REPLAY_STOP:?}; its next start recovers"
        )),
    }
    let _ = metrics_stop.send(true);
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    served
}

/// Parses `argv` (starting with the subcommand name) into a subcommand's arguments, with
/// every default the command line would give.
fn parse_args<T: Args + FromArgMatches>(argv: &[String]) -> anyhow::Result<T> {
    let command = T::augment_args(clap::Command::new("tinylag"));
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|e| anyhow::anyhow!("internal arguments {argv:?}: {e}"))?;
    Ok(T::from_arg_matches(&matches)?)
}

/// Holds an exclusive lock on `<dir>/.lock` for as long as the returned file is open, so a
/// second `up` on the same directory fails at once, before it prints or creates anything.
fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            bail!(
                "{} is busy: another `tinylag up` runs there; stop it first or use another --dir",
                dir.display()
            );
        }
        return Err(anyhow::Error::new(e).context(format!("cannot lock {}", path.display())));
    }
    Ok(file)
}

/// Opens the journal at `journal`, or creates it (and the primary) when it does not exist.
async fn ensure_journal(
    journal: &Path,
    primary: &Path,
    size: Option<u64>,
) -> anyhow::Result<Manifest> {
    let store = LocalStore::new(journal);
    match Manifest::load(&store).await {
        Ok(manifest) => {
            let existing = manifest.device_size(0).unwrap_or(0);
            if let Some(size) = size.filter(|&s| s != existing) {
                bail!(
                    "--size {} differs from the existing journal {} of {} bytes; omit --size or use another --dir",
                    size,
                    journal.display(),
                    existing
                );
            }
            if !primary.exists() {
                bail!(
                    "the journal {} exists but the primary {} does not; restore it or use another --dir",
                    journal.display(),
                    primary.display()
                );
            }
            Ok(manifest)
        }
        Err(JournalError::NotInitialized { .. }) => {
            let size = size.unwrap_or(DEFAULT_SIZE);
            if primary.exists() {
                bail!(
                    "{} exists without a journal beside it; move it away or use another --dir",
                    primary.display()
                );
            }
            let manifest = Manifest::new(
                &ManifestParams {
                    device_name: "disk0".into(),
                    size,
                    block_size: 4096,
                    region_size: 4 << 20,
                    splay_width: 4,
                    segment_size: 8 << 20,
                },
                SystemClock.now_ns(),
            )?;
            file::create_sparse(primary, size)
                .with_context(|| format!("cannot create {}", primary.display()))?;
            manifest.create(&store as &dyn ObjectStore).await?;
            Ok(manifest)
        }
        Err(e) => Err(e.into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn print_guide(
    dir: &Path,
    primary: &Path,
    journal: &Path,
    replica: &Path,
    size: u64,
    block_size: u32,
    listen: &str,
    uri: &str,
    export: &str,
    delay: &str,
) {
    let nbd_client = match listen.strip_prefix("unix:") {
        Some(path) => format!("nbd-client -unix {path} -N {export} /dev/nbd0"),
        None => {
            let hostport = listen.strip_prefix("tcp:").unwrap_or(listen);
            let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "10809"));
            format!("nbd-client {host} {port} -N {export} /dev/nbd0")
        }
    };
    let kernel_nbd = Path::new("/sys/module/nbd").exists() || Path::new("/dev/nbd0").exists();
    let mnt = dir.join("mnt");
    let me = self_command();
    let mut g = String::new();
    let _ = writeln!(g, "tinylag up: {} in {}", format_size(size), dir.display());
    let _ = writeln!(
        g,
        "  primary  {}  (served over NBD at {uri})",
        primary.display()
    );
    let _ = writeln!(g, "  journal  {}", journal.display());
    let _ = writeln!(
        g,
        "  replica  {}  (consumer {CONSUMER}, delay {delay}, undo log {}.undo)",
        replica.display(),
        replica.display()
    );
    let _ = writeln!(g, "connect:");
    let _ = writeln!(
        g,
        "  qemu-io -f raw '{uri}' -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M'"
    );
    // mkfs and mount go on a loop device over nbdfuse's file, never on the file itself:
    // nbdfuse refuses the unaligned writes mkfs makes through a file. The loop device takes
    // the disk's block size, or it would send 512-byte requests a 4 KiB disk refuses.
    let fs = dir.join("fs");
    let _ = writeln!(
        g,
        "  mkdir -p {m} && nbdfuse {m} '{uri}' &   # {m}/nbd is the disk as a file",
        m = mnt.display()
    );
    let _ = writeln!(
        g,
        "  dev=$(losetup -b {block_size} -f --show {m}/nbd) && mkfs.ext4 -q \"$dev\" && mkdir -p {fs} && mount \"$dev\" {fs}   # as root; mkfs the loop device, not {m}/nbd",
        m = mnt.display(),
        fs = fs.display()
    );
    let _ = writeln!(
        g,
        "  umount {fs}; losetup -d \"$dev\"; fusermount3 -u {m}   # undo, in this order",
        m = mnt.display(),
        fs = fs.display()
    );
    if kernel_nbd {
        let _ = writeln!(g, "  {nbd_client}   # the kernel's nbd driver");
    } else {
        let _ = writeln!(
            g,
            "  {nbd_client}   # needs the kernel's nbd driver (modprobe nbd), absent here"
        );
    }
    let _ = writeln!(g, "watch:");
    let _ = writeln!(
        g,
        "  {me} status --control {}.ctl   # the primary",
        primary.display()
    );
    let _ = writeln!(
        g,
        "  {me} status --control {}.ctl   # the replica",
        replica.display()
    );
    let _ = writeln!(g, "  {me} journal info --journal {}", journal.display());
    print_time_travel(&mut g, &me, dir, primary, journal, replica, export);
    let _ = writeln!(
        g,
        "stop: Ctrl-C (or SIGTERM); `{me} up --dir {}` resumes",
        dir.display()
    );
    for line in g.lines() {
        tell(line);
    }
}

/// The time-travel commands with this `up`'s own paths: a mark, the window, the disk as of the
/// mark as a new file and served read-only without a copy (at `mount`'s default socket).
#[allow(clippy::too_many_arguments)]
fn print_time_travel(
    g: &mut String,
    me: &str,
    dir: &Path,
    primary: &Path,
    journal: &Path,
    replica: &Path,
    export: &str,
) {
    const MARK: &str = "before-change";
    let (j, r) = (journal.display(), replica.display());
    let _ = writeln!(g, "time travel:");
    let _ = writeln!(
        g,
        "  {me} mark {MARK} --primary {}   # a named point; --freeze MOUNTPOINT makes it file-system-consistent",
        primary.display()
    );
    let _ = writeln!(g, "  {me} timeline --replica {r} --journal {j}");
    let _ = writeln!(
        g,
        "  {me} restore --mark {MARK} --output {} --replica {r} --journal {j}   # or --at TIME",
        dir.join(format!("{MARK}.img")).display()
    );
    let _ = writeln!(
        g,
        "  {me} mount --mark {MARK} --replica {r} --journal {j} &   # read-only, no copy"
    );
    // `mount`'s default address: unix:<replica>.at.sock.
    let past = format!("nbd+unix:///{export}?socket={r}.at.sock");
    let _ = writeln!(g, "  qemu-io -f raw -r '{past}' -c 'read 0 1M'");
}
