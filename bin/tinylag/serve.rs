//! `tinylag serve`: the primary daemon. Serves the primary over NBD (or, with `--frontend
//! ublk`, as a local `/dev/ublkbN`) through the primary core,
//! journals every acknowledged change, keeps a writer lease on the journal (a second `serve`
//! is refused while it is live, unless `--takeover`), answers `status`, `mark`, `verify` and
//! `resync` on the control socket, and on SIGINT/SIGTERM stops accepting, drains the journal
//! within `--drain-timeout`, fsyncs the primary, releases the lease and exits 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tinylag::block::file::{self, FileOptions};
use tinylag::block::BlockDevice;
use tinylag::block::{DeviceSlice, GroupDevice};
use tinylag::clock::{Clock, SystemClock};
use tinylag::control;
use tinylag::journal::epoch::{ClaimBasis, EpochReason};
use tinylag::journal::match_named_paths;
use tinylag::journal::{epoch, lease, Manifest};
use tinylag::metrics::{Hub, NbdBuffersSource, PrimarySource};
use tinylag::nbd::{self, Export, ListenAddr, NbdServer};
use tinylag::store::CountingStore;
use tinylag::store::{open_store, ObjectStore, StoreUri};
use tinylag::units::format_size;
use tinylag::writer::LeaseKeeper;
use tinylag::writer::ServeControl;
use tinylag::writer::{
    default_activity_log_path, AckMode, JournalSetup, Labels, MaxLag, OnFence, PrimaryCore,
    Promotion, WriterConfig,
};

use crate::cmd::args::{
    parse_duration, parse_group, parse_listen, parse_max_lag, parse_pool_size, parse_segment_size,
    parse_store_uri, usage, Ack, NamedPath, S3Args, TlsArgs,
};
use crate::cmd::config::ConfigArg;
use crate::cmd::metrics::{Endpoint, MetricsArgs};
use crate::cmd::output::{tell, warn, warn_logged};
use crate::cmd::systemd;
use crate::cmd::ublk::{check_frontend, Frontend, UblkArgs};

/// Block size advertised without a journal (`--no-journal`), when no manifest says.
const NO_JOURNAL_BLOCK_SIZE: u32 = 4096;
/// Region size (ublk's chunk) without a journal.
const NO_JOURNAL_REGION_SIZE: u64 = 4 << 20;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The primary: a file or block device whose size is the journal's device size. A group
    /// journal (several devices) takes one `--primary NAME=PATH` per device; each is served as
    /// the NBD export NAME.
    #[arg(long = "primary", value_name = "[NAME=]PATH", value_parser = NamedPath::parse, required = true)]
    pub primary: Vec<NamedPath>,
    /// Journal location: /path, file:///path, s3://bucket/prefix or mem://name.
    #[arg(long, value_name = "URI", value_parser = parse_store_uri, required_unless_present = "no_journal")]
    pub journal: Option<StoreUri>,
    #[command(flatten)]
    pub s3: S3Args,
    /// How the primary is served: nbd (a socket, see --listen) or ublk (a local
    /// /dev/ublkbN; needs the kernel's ublk_drv).
    #[arg(long, value_enum, default_value = "nbd", value_name = "nbd|ublk")]
    pub frontend: Frontend,
    #[command(flatten)]
    pub ublk: UblkArgs,
    /// NBD address: unix:PATH or tcp:IP:PORT [default: unix:<primary>.sock]. TCP on an
    /// address other than loopback needs --tls require (or --insecure-no-tls).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<ListenAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// NBD export name [default: the journal's device name]. Clients asking for the empty
    /// name get this export.
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Control socket [default: <primary>.ctl].
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Let this group use the control socket (mode 0660) and run every command on it
    /// [default: owner and root only, mode 0600].
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub control_group: Option<u32>,
    /// Memory for changes acknowledged but not yet durable; past it, changes are not
    /// journaled (their regions go dirty) rather than blocking the primary.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_pool_size, allow_hyphen_values = true)]
    pub pool_size: u64,
    /// Target segment size, 64K to 1G [default: the journal's].
    #[arg(long, value_name = "SIZE", value_parser = parse_segment_size, allow_hyphen_values = true)]
    pub segment_size: Option<u64>,
    /// Close a segment this long after its first record (bounds the data at risk).
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = parse_duration, allow_hyphen_values = true)]
    pub linger: Duration,
    /// When a write is acknowledged: async (after the primary), journal (once durable in the
    /// journal), adaptive (async until the lag passes --max-lag, then journal).
    #[arg(
        long,
        value_enum,
        default_value = "async",
        hide_possible_values = true,
        value_name = "async|journal|adaptive"
    )]
    pub ack: Ack,
    /// Lag bound of --ack adaptive: a size (64M) or a duration (5s; a lower-case m means
    /// minutes).
    #[arg(long, value_name = "SIZE|DURATION", value_parser = parse_max_lag, allow_hyphen_values = true, required_if_eq("ack", "adaptive"))]
    pub max_lag: Option<MaxLag>,
    /// Journal compression: auto (zstd, skipped while the data does not compress) or off
    /// (payloads stored raw: less CPU, more journal bytes).
    #[arg(long, default_value = "auto", value_name = "auto|off", value_parser = ["auto", "off"])]
    pub compress: String,
    /// Open the primary with O_DIRECT (requests must be block-aligned).
    #[arg(long)]
    pub direct: bool,
    /// Serve without a journal (for measurements only: nothing is replicated).
    #[arg(long, conflicts_with_all = ["journal", "ack", "max_lag"])]
    pub no_journal: bool,
    /// At shutdown, wait at most this long for the journal to catch up.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
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
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub store_outage: Duration,
    /// Claim the journal even though another writer's lease is live: that writer is fenced
    /// (it keeps serving its clients but stops journaling). For a planned or forced failover.
    #[arg(long, conflicts_with = "no_journal")]
    pub takeover: bool,
    /// Term of this writer's lease on the journal, renewed every third of it (one request).
    /// Another `serve` waits this long after this one vanishes without a clean stop (unless
    /// on the same host, where a dead pid frees the lease at once).
    #[arg(long, default_value = "15s", value_name = "DURATION", value_parser = parse_lease_time)]
    pub lease_time: Duration,
    /// Start even though a journal segment is missing below the journal's known end (a hole
    /// that `serve` otherwise refuses): everything from the hole on is abandoned, and the
    /// whole device is resynced so every replica converges again. Prefer restoring the
    /// missing object.
    #[arg(long, conflicts_with = "no_journal")]
    pub abandon_after_hole: bool,
    /// What clients see once another writer fences this one (split brain): keep (serve
    /// reads and writes; the writes stay in the activity log as this site's divergence),
    /// read-only (writes fail: NBD EPERM, ublk EROFS) or error (every request fails).
    #[arg(long, default_value = "keep", value_name = "keep|read-only|error", value_parser = OnFence::parse)]
    pub on_fence: OnFence,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub config: ConfigArg,
}

fn parse_lease_time(s: &str) -> Result<Duration, String> {
    let d = tinylag::units::parse_duration(s)?;
    if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&d) {
        return Err(format!("{s} is out of range: use 1s to 1h"));
    }
    Ok(d)
}

impl ServeArgs {
    /// The first (or only) primary: the daemon's sockets and files default to beside it.
    pub fn first_primary(&self) -> &Path {
        &self.primary[0].path
    }

    /// The acknowledgement policy `--ack` and `--max-lag` describe together.
    fn ack_mode(&self) -> anyhow::Result<AckMode> {
        match (self.ack, self.max_lag) {
            (Ack::Async, None) => Ok(AckMode::Async),
            (Ack::Journal, None) => Ok(AckMode::Journal),
            (Ack::Adaptive, Some(lag)) => Ok(AckMode::Adaptive(lag)),
            (Ack::Adaptive, None) => Err(usage(
                "--ack adaptive needs --max-lag SIZE|DURATION (e.g. 64M or 5s)",
            )),
            (_, Some(_)) => Err(usage(
                "--max-lag only applies to --ack adaptive; drop it or add --ack adaptive",
            )),
        }
    }
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
    run_with(args, None).await
}

/// [`run`], with the metrics going to `shared` (from `up`) instead of `--metrics-listen`.
pub async fn run_with(args: ServeArgs, shared: Option<Arc<Hub>>) -> anyhow::Result<()> {
    serve_with(args, shared, None).await
}

/// What `promote` hands to the serve path: its claim, the exact epoch with the replica's
/// catch-up, and its last steps once serving.
pub struct PromoteStart {
    pub claim: ClaimBasis,
    pub promotion: Promotion,
    /// Runs once the primary is served (the consumer entry ends, the report is printed).
    pub serving: ServingHook,
}

/// See [`PromoteStart::serving`].
pub type ServingHook = Box<
    dyn FnOnce(Arc<PrimaryCore>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send,
>;

/// `serve` as `promote` runs it in-process: the same flags, sockets, TLS and metrics.
pub async fn run_promoted(args: ServeArgs, promote: PromoteStart) -> anyhow::Result<()> {
    serve_with(args, None, Some(promote)).await
}

async fn serve_with(
    args: ServeArgs,
    shared: Option<Arc<Hub>>,
    promote: Option<PromoteStart>,
) -> anyhow::Result<()> {
    let (promote_claim, promotion, serving) = match promote {
        Some(p) => (Some(p.claim), Some(p.promotion), Some(p.serving)),
        None => (None, None, None),
    };
    return_large_buffers_to_the_kernel();
    // Every argument is checked before anything is opened, bound or claimed.
    let ack = args.ack_mode()?;
    let ublk = args.frontend == Frontend::Ublk;
    let mut nbd_flags = vec![
        (args.listen.is_some(), "--listen"),
        (args.export.is_some(), "--export"),
    ];
    nbd_flags.extend(args.tls.given());
    check_frontend(args.frontend, &args.ublk, &nbd_flags)?;
    let listen: ListenAddr = match &args.listen {
        Some(addr) => addr.clone(),
        None => ListenAddr::Unix(beside(args.first_primary(), ".sock")),
    };
    let security = args.tls.security(&listen)?;
    let nbd_buffers = args.tls.buffer_budget()?;
    let control_path = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(args.first_primary()));

    let metrics = Endpoint::open(&args.metrics, shared).await?;
    let mut counted = None;
    let journal = match (&args.journal, args.no_journal) {
        (Some(uri), false) => {
            let mut store = open_store(uri, &args.s3.options()).await?;
            if metrics.is_some() {
                let counting = Arc::new(CountingStore::new(store));
                counted = Some(counting.clone());
                store = counting as Arc<dyn ObjectStore>;
            }
            let manifest = Manifest::load(store.as_ref()).await?;
            Some((store, manifest))
        }
        _ => None,
    };
    // Which primary is which device, checked before anything is opened.
    let primaries = match_primaries(&args.primary, journal.as_ref().map(|(_, m)| m))?;
    let group = primaries.len() > 1;
    if group && args.export.is_some() {
        bail!("--export: a group's exports are its device names (see `tinylag journal info`)");
    }
    if group && ublk && args.ublk.dev_id.is_some() {
        bail!("--dev-id: a group gets one /dev/ublkbN per device, numbered by the kernel");
    }
    let block_size = journal
        .as_ref()
        .map_or(NO_JOURNAL_BLOCK_SIZE, |(_, m)| m.block_size);
    let ublk_options = args.ublk.options(
        journal
            .as_ref()
            .map_or(NO_JOURNAL_REGION_SIZE, |(_, m)| m.region_size),
    );
    if ublk {
        tinylag::ublk::validate(&ublk_options, block_size)?;
    }
    let export = args.export.clone().unwrap_or_else(|| {
        journal
            .as_ref()
            .and_then(|(_, m)| m.devices.first().map(|d| d.name.clone()))
            .unwrap_or_else(|| "disk0".to_string())
    });
    let engine = tinylag::block::engine::select()?;
    let mut members: Vec<Arc<dyn BlockDevice>> = Vec::new();
    for (name, path) in &primaries {
        let device = file::open(
            path,
            FileOptions {
                direct: args.direct,
                engine: engine.engine,
                ..FileOptions::new(block_size)
            },
        )
        .with_context(|| match name {
            Some(name) if group => format!("--primary {name}={}", path.display()),
            _ => "--primary".to_string(),
        })?;
        members.push(device);
    }
    let layout = journal.as_ref().map(|(_, m)| m.layout());
    let device: Arc<dyn BlockDevice> = match (&layout, group) {
        (Some(layout), true) => Arc::new(
            GroupDevice::new(layout.clone(), members)
                .map_err(|e| anyhow::anyhow!("--primary {e}"))?,
        ),
        _ => members.pop().expect("one primary"),
    };

    // Bind first: a second daemon on the same sockets is refused before it claims an epoch.
    let listener = match ublk {
        false => Some(nbd::bind(&listen).await?),
        true => None,
    };
    let listen = listener.as_ref().map_or(listen, |l| l.local_addr().clone());
    let access = control::Access {
        group: args.control_group,
    };
    // Caught from before the control socket exists: a stop that comes right after it
    // answers (a test's first `status`, systemd's READY=1) is a clean stop, not the default
    // kill. (Until here a signal kills at once, as a stuck start should be stoppable.)
    let mut signals = StopSignals::watch()?;
    let control_listener = control::bind_with(&control_path, access)
        .await
        .with_context(|| format!("cannot listen on --control {}", control_path.display()))?;

    let labels = Labels {
        primary: primaries
            .iter()
            .map(|(name, path)| match name {
                Some(name) if group => format!("{name}={}", path.display()),
                _ => path.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join(", "),
        listen: if ublk {
            "ublk".to_string()
        } else {
            listen.to_string()
        },
        export: export.clone(),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let journal_store = journal.as_ref().map(|(store, _)| store.clone());
    let keeper = journal_store.as_ref().map(|store| {
        Arc::new(LeaseKeeper::new(
            store.clone(),
            clock.clone(),
            args.lease_time,
        ))
    });
    let mut claim = promote_claim.clone().unwrap_or_default();
    // A promote checked the lease itself (released after a demote, or --force).
    if let (Some(store), None) = (&journal_store, &promote_claim) {
        let ttl_ms = args.lease_time.as_millis() as u64;
        if args.takeover {
            if let Ok(Some(holder)) = lease::current(store.as_ref(), ttl_ms).await {
                if holder.is_live(clock.now_ns()) {
                    claim.reason = EpochReason::Takeover;
                    tracing::warn!(
                        epoch = holder.epoch,
                        host = %holder.host,
                        pid = holder.pid,
                        "--takeover: fencing the live writer"
                    );
                }
            }
        } else if let Err(e) = lease::ensure_free(store.as_ref(), clock.now_ns(), ttl_ms).await {
            let _ = std::fs::remove_file(&control_path);
            return Err(e.into());
        }
    }
    // Only now, so that a refused start (sockets or lease taken) prints nothing but its error.
    tracing::info!(
        engine = %engine.engine,
        reason = %engine.reason,
        "primary I/O engine: {}",
        engine.engine
    );
    let setup = journal.map(|(_, manifest)| {
        let keeper = keeper.as_ref().expect("a keeper with every journal");
        let mut writer = WriterConfig::for_manifest(&manifest);
        writer.linger = args.linger;
        writer.outage_bound = args.store_outage;
        writer.compress = args.compress == "auto";
        if let Some(size) = args.segment_size {
            writer.segment_size = size;
        }
        JournalSetup {
            store: keeper.store(),
            manifest,
            writer,
            pool_size: args.pool_size,
            ack,
            clock: clock.clone(),
            primary_path: args.first_primary().to_path_buf(),
            member_paths: if args.primary.len() > 1 {
                primaries.iter().map(|(_, path)| path.clone()).collect()
            } else {
                Vec::new()
            },
            activity_log: (!args.no_activity_log).then(|| {
                args.activity_log
                    .clone()
                    .unwrap_or_else(|| default_activity_log_path(args.first_primary()))
            }),
            abandon_after_hole: args.abandon_after_hole,
            claim: claim.clone(),
            on_fence: args.on_fence,
            promotion: promotion.clone(),
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
    if let (Some(keeper), Some(epoch), Some(store)) = (&keeper, core.epoch(), &journal_store) {
        let since_ns = match epoch::read_claim(store.as_ref(), epoch).await {
            Ok(claim) => claim.claimed_at_ns,
            Err(_) => clock.now_ns(),
        };
        let fenced = core.clone();
        let durable = core.clone();
        keeper.record_durable(Box::new(move || durable.durable_next_seq()));
        keeper
            .start(
                epoch,
                since_ns,
                Box::new(move |reason| fenced.fence(reason)),
            )
            .await;
    }
    let exports: Vec<Export> = match (&layout, group) {
        (Some(layout), true) => layout
            .devices()
            .iter()
            .zip(&primaries)
            .map(|(placed, (_, path))| Export {
                name: placed.name.clone(),
                description: format!("tinylag primary {} ({})", placed.name, path.display()),
                device: Arc::new(DeviceSlice::new(core.clone(), placed.base, placed.size)),
            })
            .collect(),
        _ => vec![Export {
            name: export.clone(),
            description: format!("tinylag primary {}", args.first_primary().display()),
            device: core.clone(),
        }],
    };
    let ublk_targets: Vec<Arc<dyn BlockDevice>> =
        exports.iter().map(|e| e.device.clone()).collect();
    let server = Arc::new(
        NbdServer::new(exports, &export)?
            .with_security(security.clone())
            .with_buffer_budget(nbd_buffers.clone()),
    );
    let security_warning = security.warning(&listen);

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    // Rejoining replicas' resync requests: one LIST after each lease renewal.
    if let (Some(keeper), Some(store), Some(_)) = (&keeper, &journal_store, core.epoch()) {
        tokio::spawn(tinylag::writer::resync_requests::watch(
            store.clone(),
            keeper.renewals(),
            core.clone(),
            shutdown_rx.clone(),
        ));
    }
    let metrics_url = metrics.as_ref().and_then(Endpoint::url);
    let metrics_task = metrics.and_then(|m| {
        m.hub.add_source(Arc::new(PrimarySource(core.clone())));
        if listener.is_some() {
            let status = core.status();
            m.hub.add_source(Arc::new(NbdBuffersSource {
                budget: nbd_buffers.clone(),
                labels: vec![
                    ("journal", status.journal.unwrap_or_default()),
                    ("device", status.export),
                ],
            }));
        }
        if let Some(counting) = counted {
            m.hub.add_store("primary", "journal", counting);
        }
        m.start(shutdown_rx.clone())
    });
    let control_task = tokio::spawn(control::serve(
        control_listener,
        Arc::new(ServeControl {
            core: core.clone(),
            store: journal_store.clone(),
            lease: keeper.clone(),
            security_warning: security_warning.clone(),
            nbd_buffers: listener.is_some().then(|| nbd_buffers.clone()),
        }),
        shutdown_rx.clone(),
    ));
    let (nbd_task, ublk_device, served_as) = match listener {
        Some(listener) => (
            Some(tokio::spawn(nbd::serve(listener, server, shutdown_rx))),
            Vec::new(),
            format!(
                "{} ({})",
                args.tls.nbd_uri(&listen, &export),
                security.describe()
            ),
        ),
        None => {
            let mut started = Vec::new();
            let mut failed = None;
            for target in ublk_targets {
                match tinylag::ublk::start(
                    target,
                    ublk_options.clone(),
                    tokio::runtime::Handle::current(),
                )
                .await
                {
                    Ok(d) => started.push(d),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    let path = started
                        .iter()
                        .map(|d| {
                            let how = if d.recovered() { " (re-attached)" } else { "" };
                            format!("{}{how}", d.block_path())
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    (None, started, path)
                }
                Some(e) => {
                    for d in started {
                        d.stop().await;
                    }
                    let _ = shutdown_tx.send(true);
                    core.shutdown(args.drain_timeout).await;
                    if let Some(keeper) = &keeper {
                        keeper.release().await;
                    }
                    let _ = control_task.await;
                    let _ = std::fs::remove_file(&control_path);
                    return Err(e.into());
                }
            }
        }
    };

    let status = core.status();
    tell(format!(
        "tinylag serve: {} ({}) as {served_as}",
        args.first_primary().display(),
        format_size(status.device_size),
    ));
    tell(format!(
        "mode {}, journal {}, control {}",
        status.mode,
        status.journal.as_deref().unwrap_or("none (--no-journal)"),
        control_path.display()
    ));
    if let Some(url) = &metrics_url {
        tell(format!("metrics {url}"));
    }
    if let Some(w) = status.warning() {
        warn(w);
    }
    if let Some(start) = &status.start {
        match start["kind"].as_str() {
            Some("activity-log") => tell(format!(
                "restart after an unclean stop: resyncing the {} regions the activity log names",
                start["regions"]
            )),
            Some("full") => warn(format!(
                "starting forward-full: the WHOLE device is resynced ({})",
                start["reason"].as_str().unwrap_or("")
            )),
            _ => {}
        }
    }
    if let Some(w) = &security_warning {
        warn_logged(w);
    }
    // The NBD listener (bound above) accepts from here on; the control socket answers.
    systemd::ready(&format!("serving {served_as}"));
    if let Some(serving) = serving {
        serving(core.clone()).await;
    }

    let signal = signals.recv().await;
    systemd::stopping();
    tracing::info!(
        signal,
        "stopping: no new connections, finishing in-flight I/O"
    );
    let _ = shutdown_tx.send(true);
    for device in ublk_device {
        device.stop().await;
    }
    if let Some(task) = nbd_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the NBD server failed"),
            Err(e) => tracing::error!(error = %e, "the NBD server task failed"),
        }
    }
    let report = core.shutdown(args.drain_timeout).await;
    if let Some(keeper) = &keeper {
        keeper.release().await;
    }
    let _ = control_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&control_path);
    if let Some(e) = &report.flush_error {
        bail!(
            "the final fsync of {} failed: {e}",
            args.first_primary().display()
        );
    }
    if core.epoch().is_some() {
        if report.undrained_records > 0 {
            warn(format!(
                "tinylag serve: {} records (LSN {}..={}) could not be journaled within {:?}; \
                 the next start will be forward-full",
                report.undrained_records,
                report.durable_lsn + 1,
                report.head_lsn,
                args.drain_timeout
            ));
        }
        tell(format!(
            "stopped: mode {}, journal durable through LSN {} of {}{}",
            report.mode,
            report.durable_lsn,
            report.head_lsn,
            if report.clean { ", clean" } else { "" }
        ));
    } else {
        tell("stopped");
    }
    Ok(())
}

/// Each device's primary path (with its device's name in a group), in device order: one
/// primary for a one-device journal (or `--no-journal`), one `NAME=PATH` per device for a
/// group.
fn match_primaries(
    primaries: &[NamedPath],
    manifest: Option<&Manifest>,
) -> anyhow::Result<Vec<(Option<String>, PathBuf)>> {
    if manifest.is_none() && primaries.len() > 1 {
        bail!("--no-journal serves one --primary");
    }
    let devices: Vec<&str> = manifest
        .map(|m| m.devices.iter().map(|d| d.name.as_str()).collect())
        .unwrap_or_default();
    let given: Vec<(Option<String>, PathBuf)> = primaries
        .iter()
        .map(|p| (p.name.clone(), p.path.clone()))
        .collect();
    let paths = match_named_paths(&devices, &given, "--primary").map_err(anyhow::Error::msg)?;
    Ok(match devices.len() {
        0 | 1 => vec![(primaries[0].name.clone(), paths[0].clone())],
        _ => devices
            .iter()
            .map(|d| Some(d.to_string()))
            .zip(paths)
            .collect(),
    })
}

pub async fn wait_for_signal() -> anyhow::Result<&'static str> {
    Ok(StopSignals::watch()?.recv().await)
}

/// SIGTERM and SIGINT, caught from the moment this is made: a daemon makes it before its
/// sockets answer, so a stop that comes right after they do (after the first `status`, or
/// systemd's READY=1) is a clean stop, not the default action's kill.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub fn watch() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            term: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }

    /// The name of the first signal that arrives.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
