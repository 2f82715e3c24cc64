//! `tinylag serve`: the primary daemon. Serves the primary over NBD through the primary core,
//! journals every acknowledged change, answers `status` on the control socket, and on
//! SIGINT/SIGTERM stops accepting, drains the journal within `--drain-timeout`, fsyncs the
//! primary and exits 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use clap::Args;
use tinylag::block::file::{FileDevice, FileOptions};
use tinylag::block::BlockDevice;
use tinylag::clock::SystemClock;
use tinylag::control::{self, Handler, Request, Response};
use tinylag::journal::Manifest;
use tinylag::nbd::{self, Export, ListenAddr, NbdServer};
use tinylag::store::{open_store, StoreUri};
use tinylag::units::format_size;
use tinylag::writer::{
    default_activity_log_path, AckMode, JournalSetup, Labels, PrimaryCore, WriterConfig,
    MIN_POOL_SIZE,
};

use crate::cmd::args::{parse_size, parse_store_uri, S3Args};

/// Block size advertised without a journal (`--no-journal`), when no manifest says.
const NO_JOURNAL_BLOCK_SIZE: u32 = 4096;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The primary: a file or block device whose size is the journal's device size.
    #[arg(long, value_name = "PATH")]
    pub primary: PathBuf,
    /// Journal location: /path, file:///path, s3://bucket/prefix or mem://name.
    #[arg(long, value_name = "URI", value_parser = parse_store_uri, required_unless_present = "no_journal")]
    pub journal: Option<StoreUri>,
    #[command(flatten)]
    pub s3: S3Args,
    /// NBD address: unix:PATH or tcp:IP:PORT [default: unix:<primary>.sock].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// NBD export name [default: the journal's device name]. Clients asking for the empty
    /// name get this export.
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Control socket [default: <primary>.ctl].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Memory for changes acknowledged but not yet durable; past it, changes are not
    /// journaled (their regions go dirty) rather than blocking the primary.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    pub pool_size: u64,
    /// Target segment size [default: the journal's].
    #[arg(long, value_parser = parse_size)]
    pub segment_size: Option<u64>,
    /// Close a segment this long after its first record (bounds the data at risk).
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub linger: Duration,
    /// When a write is acknowledged: async (after the primary), journal (once durable in the
    /// journal), adaptive (async until the lag passes --max-lag, then journal).
    #[arg(long, default_value = "async", value_name = "async|journal|adaptive")]
    pub ack: String,
    /// Lag bound of --ack adaptive: a size (64M) or a duration (5s; a lower-case m means
    /// minutes).
    #[arg(long, value_name = "SIZE|DURATION")]
    pub max_lag: Option<String>,
    /// Journal compression: auto (zstd, skipped while the data does not compress) or off
    /// (payloads stored raw: less CPU, more journal bytes).
    #[arg(long, default_value = "auto", value_name = "auto|off", value_parser = ["auto", "off"])]
    pub compress: String,
    /// Open the primary with O_DIRECT (requests must be block-aligned).
    #[arg(long)]
    pub direct: bool,
    /// Serve without a journal (for measurements only: nothing is replicated).
    #[arg(long, conflicts_with = "journal")]
    pub no_journal: bool,
    /// At shutdown, wait at most this long for the journal to catch up.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The activity log: regions with changes not yet durable in the journal, so a restart
    /// after a crash resyncs only those [default: <primary>.tinylag-al].
    #[arg(long, value_name = "PATH")]
    pub activity_log: Option<PathBuf>,
    /// Keep no activity log (saves one fsync per newly active region; a restart after a
    /// crash then resyncs the whole device).
    #[arg(long, conflicts_with = "activity_log")]
    pub no_activity_log: bool,
    /// Once no upload has completed for this long, --ack journal stops waiting for the
    /// store (status shows the outage) until an upload succeeds again.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub store_outage: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    tinylag::units::parse_duration(s)
}

/// `<primary>.<suffix>`, beside the primary.
fn beside(primary: &Path, suffix: &str) -> PathBuf {
    let mut name = primary.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The control socket a daemon serving `primary` answers on unless `--control` says.
pub fn default_control_path(primary: &Path) -> PathBuf {
    beside(primary, ".ctl")
}

/// The NBD URI clients use for `export` on `addr`.
fn nbd_uri(addr: &ListenAddr, export: &str) -> String {
    match addr {
        ListenAddr::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
        ListenAddr::Tcp(sa) => format!("nbd://{sa}/{export}"),
    }
}

struct StatusHandler {
    core: Arc<PrimaryCore>,
}

#[async_trait]
impl Handler for StatusHandler {
    async fn handle(&self, request: Request) -> Response {
        match request.cmd.as_str() {
            "status" => match serde_json::to_value(self.core.status()) {
                Ok(v) => Response::ok(v),
                Err(e) => Response::error(format!("cannot encode the status: {e}")),
            },
            other => Response::error(format!(
                "unknown command {other:?}; this daemon knows: status"
            )),
        }
    }
}

/// Large buffers (client payloads of up to 32 MiB, segment buffers of `segment_size`) come
/// and go at the rate of the I/O. glibc's default raises its mmap threshold after the first
/// such buffer is freed, and from then on serves them from per-thread arenas that keep the
/// memory after it is freed: peak RSS grew to the pool cap plus ~100 MiB and stayed there. A
/// fixed threshold hands every buffer of 128 KiB or more back to the kernel on free, so RSS
/// follows the pool (measured: pool + 14 MiB at the cap, 10 MiB once drained).
fn return_large_buffers_to_the_kernel() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts allocator parameters; called before the daemon's threads
    // allocate in earnest, and glibc serializes it against concurrent allocation anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    return_large_buffers_to_the_kernel();
    // Every argument is checked before anything is opened, bound or claimed.
    let ack = AckMode::parse(&args.ack, args.max_lag.as_deref()).map_err(anyhow::Error::msg)?;
    if args.pool_size < MIN_POOL_SIZE {
        bail!(
            "--pool-size {} is too small: use at least 1M",
            args.pool_size
        );
    }
    if let Some(size) = args.segment_size {
        if !(64 << 10..=1 << 30).contains(&size) {
            bail!("--segment-size {size} is out of range: use 64K to 1G");
        }
    }
    if args.no_journal && (args.ack != "async" || args.max_lag.is_some()) {
        bail!("--ack and --max-lag need a journal; --no-journal acknowledges at once");
    }
    let listen: ListenAddr = match &args.listen {
        Some(s) => s.parse()?,
        None => ListenAddr::Unix(beside(&args.primary, ".sock")),
    };
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(&args.primary));

    let journal = match (&args.journal, args.no_journal) {
        (Some(uri), false) => {
            let store = open_store(uri, &args.s3.options()).await?;
            let manifest = Manifest::load(store.as_ref()).await?;
            Some((store, manifest))
        }
        _ => None,
    };
    let block_size = journal
        .as_ref()
        .map_or(NO_JOURNAL_BLOCK_SIZE, |(_, m)| m.block_size);
    let export = args.export.clone().unwrap_or_else(|| {
        journal
            .as_ref()
            .and_then(|(_, m)| m.devices.first().map(|d| d.name.clone()))
            .unwrap_or_else(|| "disk0".to_string())
    });
    let device = FileDevice::open(
        &args.primary,
        FileOptions {
            direct: args.direct,
            ..FileOptions::new(block_size)
        },
    )
    .with_context(|| format!("cannot open --primary {}", args.primary.display()))?;
    let device: Arc<dyn BlockDevice> = Arc::new(device);

    // Bind first: a second daemon on the same sockets is refused before it claims an epoch.
    let listener = nbd::bind(&listen).await?;
    let listen = listener.local_addr().clone();
    let control_listener = control::bind(&control_path)
        .await
        .with_context(|| format!("cannot listen on --control {}", control_path.display()))?;

    let labels = Labels {
        primary: args.primary.display().to_string(),
        listen: listen.to_string(),
        export: export.clone(),
    };
    let setup = journal.map(|(store, manifest)| {
        let mut writer = WriterConfig::for_manifest(&manifest);
        writer.linger = args.linger;
        writer.outage_bound = args.store_outage;
        writer.compress = args.compress == "auto";
        if let Some(size) = args.segment_size {
            writer.segment_size = size;
        }
        JournalSetup {
            store,
            manifest,
            writer,
            pool_size: args.pool_size,
            ack,
            clock: Arc::new(SystemClock),
            primary_path: args.primary.clone(),
            activity_log: (!args.no_activity_log).then(|| {
                args.activity_log
                    .clone()
                    .unwrap_or_else(|| default_activity_log_path(&args.primary))
            }),
        }
    });
    let started = PrimaryCore::start(device, labels, setup).await;
    let core = match started {
        Ok(core) => Arc::new(core),
        Err(e) => {
            let _ = std::fs::remove_file(&control_path);
            return Err(e.into());
        }
    };
    let server = Arc::new(NbdServer::new(
        vec![Export {
            name: export.clone(),
            description: format!("tinylag primary {}", args.primary.display()),
            device: core.clone(),
        }],
        &export,
    )?);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let control_task = tokio::spawn(control::serve(
        control_listener,
        Arc::new(StatusHandler { core: core.clone() }),
        shutdown_rx.clone(),
    ));
    let nbd_task = tokio::spawn(nbd::serve(listener, server, shutdown_rx));

    let status = core.status();
    println!(
        "tinylag serve: {} ({}) as {}",
        args.primary.display(),
        format_size(status.device_size),
        nbd_uri(&listen, &export)
    );
    println!(
        "mode {}, journal {}, control {}",
        status.mode,
        status.journal.as_deref().unwrap_or("none (--no-journal)"),
        control_path.display()
    );
    if let Some(w) = status.warning() {
        eprintln!("{w}");
    }
    if let Some(start) = &status.start {
        match start["kind"].as_str() {
            Some("activity-log") => println!(
                "restart after an unclean stop: resyncing the {} regions the activity log names",
                start["regions"]
            ),
            Some("full") => eprintln!(
                "starting forward-full: the WHOLE device is resynced ({})",
                start["reason"].as_str().unwrap_or("")
            ),
            _ => {}
        }
    }

    let signal = wait_for_signal().await?;
    tracing::info!(
        signal,
        "stopping: no new connections, finishing in-flight I/O"
    );
    let _ = shutdown_tx.send(true);
    match nbd_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "the NBD server failed"),
        Err(e) => tracing::error!(error = %e, "the NBD server task failed"),
    }
    let report = core.shutdown(args.drain_timeout).await;
    let _ = control_task.await;
    let _ = std::fs::remove_file(&control_path);
    if let Some(e) = &report.flush_error {
        bail!("the final fsync of {} failed: {e}", args.primary.display());
    }
    if core.epoch().is_some() {
        if report.undrained_records > 0 {
            eprintln!(
                "tinylag serve: {} records (LSN {}..={}) could not be journaled within {:?}; \
                 the next start will be forward-full",
                report.undrained_records,
                report.durable_lsn + 1,
                report.head_lsn,
                args.drain_timeout
            );
        }
        println!(
            "stopped: mode {}, journal durable through LSN {} of {}{}",
            report.mode,
            report.durable_lsn,
            report.head_lsn,
            if report.clean { ", clean" } else { "" }
        );
    } else {
        println!("stopped");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
