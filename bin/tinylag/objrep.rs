//! The object replica on the command line: `replay`, `restore`, `timeline` and `mount` with
//! `--replica URI` (a store address, not a path) come here (the work is in
//! `tinylag::objrep`).
//!
//! Must never: take a plain path for an object replica (a path stays a file replica), or
//! accept a flag the object replica cannot honour (`--delay`, `--undo`, seeds, a mount's
//! `--writable`): refused in one line before anything is registered or opened.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tinylag::block::BlockDevice;
use tinylag::clock::format_ns;
use tinylag::journal::JournalReader;
use tinylag::journal::Manifest;
use tinylag::nbd::{Export, ListenAddr, NbdServer};
use tinylag::objrep::{compact, trim, CompactConfig, ObjPoint, ObjSources, TrimConfig};
use tinylag::objrep::{DiskCache, ObjView, ObjectAgent, ObjectAgentConfig};
use tinylag::store::{open_store, open_store_for_command, StoreUri};
use tokio::sync::watch;

use crate::cmd::args::{parse_duration, parse_size, JournalArgs, NamedPath};
use crate::cmd::output::{say, tell};
use crate::cmd::replay::{forward_signals, ReplayArgs};
use crate::cmd::serve::{wait_for_signal, StopSignals};
use crate::cmd::timetravel::{
    serve_nbd_until_signal, MountArgs, PointArgs, ReplicaArgs, RestoreArgs, TimelineArgs,
};
use crate::cmd::ublk::Frontend;

/// The store address when `--replica` names an object replica (`scheme://…`); `None` for a
/// file replica. A URI among several `--replica`, or with a device name, is refused.
pub fn object_replica(replicas: &[NamedPath]) -> anyhow::Result<Option<StoreUri>> {
    let is_uri = |r: &NamedPath| r.path.to_str().is_some_and(|s| s.contains("://"));
    match replicas {
        [one] if one.name.is_none() && is_uri(one) => {
            let text = one.path.to_str().unwrap_or_default();
            let uri = text
                .parse::<StoreUri>()
                .map_err(|e| anyhow::anyhow!("--replica {text}: {e}"))?;
            Ok(Some(uri))
        }
        many if many.iter().any(is_uri) => bail!(
            "--replica: an object replica is one store address (s3://bucket/prefix, \
             file:///dir), without a device name and without other --replica"
        ),
        _ => Ok(None),
    }
}

/// `replay --replica URI`.
pub async fn run_replay(args: ReplayArgs, uri: StoreUri) -> anyhow::Result<()> {
    let refused: [(bool, &str); 8] = [
        (!args.delay.is_zero(), "--delay"),
        (args.undo.is_some(), "--undo"),
        (args.no_undo, "--no-undo"),
        (args.until.is_some(), "--until"),
        (args.assume_seeded, "--assume-seeded"),
        (args.check_seed, "--check-seed"),
        (args.recover_only, "--recover-only"),
        (args.control.is_some(), "--control"),
    ];
    if let Some((_, flag)) = refused.iter().find(|(given, _)| *given) {
        bail!(
            "{flag} is not taken with an object replica (--replica {uri}): its layers are its \
             history (no undo log), and delays, seeds and a control socket are not built for \
             it yet"
        );
    }
    let opts = args.journal.s3.options();
    let journal = args.journal.open().await?;
    let replica = open_store(&uri, &opts).await?;
    let manifest = Manifest::load(journal.as_ref()).await?;
    manifest.check_key_for_reading(&journal.describe())?;
    let mut config = ObjectAgentConfig::new(&args.name);
    config.checkpoint_interval = args.checkpoint_interval;
    config.layer_bytes = args.layer_size.max(1);
    config.once = args.once;
    if let Some(poll) = args.poll {
        config.active_poll = poll;
    }
    config.idle_commit = config.idle_commit.max(args.idle_commit);
    if manifest.encryption.is_some() {
        // The layers hold the journal's payloads: sealed like its segments (DESIGN
        // "Encryption at rest"); check_key_for_reading above made sure a key is given.
        config.seal_with = tinylag::crypto::writing_key();
    }
    let signals = StopSignals::watch()?;
    let mut agent = ObjectAgent::open(
        JournalReader::new(journal.clone(), manifest),
        replica.clone(),
        config,
    )
    .await?;
    let resumed = agent.manifest().last().map_or(0, |c| c.lsn);
    say(format!(
        "tinylag replay: {} -> object replica {} as consumer {} (checkpoint every {}, \
         resuming after LSN {resumed})",
        journal.describe(),
        replica.describe(),
        args.name,
        tinylag::units::format_duration(args.checkpoint_interval),
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let signals = tokio::spawn(forward_signals(signals, shutdown_tx.clone()));
    let result = agent.run(shutdown_rx).await;
    signals.abort();
    let report = result?;
    tell(serde_json::to_string(&report)?);
    say(format!(
        "tinylag replay: checkpoint at LSN {} ({} checkpoints, {} layers of {} bytes this run)",
        report.checkpoint_lsn, report.checkpoints, report.layers, report.layer_bytes
    ));
    if report.read_lsn > report.checkpoint_lsn {
        say(format!(
            "tinylag replay: LSNs {}..={} were read inside an unfinished resync span and \
             are not checkpointed yet",
            report.checkpoint_lsn + 1,
            report.read_lsn
        ));
    }
    Ok(())
}

async fn open_sources(replica: &ReplicaArgs, uri: &StoreUri) -> anyhow::Result<ObjSources> {
    if replica.undo.is_some() || replica.name.is_some() {
        bail!("--undo and --name are not taken with an object replica (--replica {uri})");
    }
    let journal = replica.journal.open_for_command().await?;
    let store = open_store_for_command(uri, &replica.journal.s3.options()).await?;
    Ok(ObjSources::open(journal, store).await?)
}

fn point(args: &PointArgs) -> anyhow::Result<ObjPoint> {
    match (&args.at, &args.mark, &args.branch) {
        (Some(t), _, _) => Ok(ObjPoint::Time(*t)),
        (None, Some(m), _) => Ok(ObjPoint::Mark(m.clone())),
        _ => bail!("--branch is not taken with an object replica yet; use --at or --mark"),
    }
}

/// `restore --replica URI`.
pub async fn run_restore(args: RestoreArgs, uri: StoreUri) -> anyhow::Result<()> {
    let output: PathBuf = match (&args.output, &args.output_dir, args.dry_run) {
        (Some(o), None, false) => o.clone(),
        (_, _, true) => bail!("--dry-run is not taken with an object replica yet"),
        _ => bail!("--output FILE: an object replica restores one image"),
    };
    let point = point(&args.point)?;
    let sources = open_sources(&args.replica, &uri).await?;
    let report = sources
        .restore(&point, &output)
        .await
        .with_context(|| format!("restore from object replica {}", sources.replica.describe()))?;
    if args.json {
        tell(serde_json::to_string_pretty(&report)?);
    } else {
        tell(format!(
            "restored {} as of LSN {} ({}): checkpoint LSN {} ({} layers, {} bytes) and {} \
             journal records",
            output.display(),
            report.lsn,
            format_ns(report.timestamp_ns),
            report.checkpoint_lsn,
            report.layers,
            report.layer_bytes,
            report.journal_records
        ));
    }
    Ok(())
}

/// A mount's cache cap when `--cache-size` is not given: large enough to hold what a file
/// system check or a file restore reads again (metadata, directories, the files copied),
/// small beside the disks it serves; a read of the whole device streams through it.
const DEFAULT_CACHE_SIZE: u64 = 1 << 30;
/// The smallest cap: a unit (one layer extent, up to 1 MiB in an image) is kept only when
/// it is at most a quarter of the cap.
const MIN_CACHE_SIZE: u64 = 1 << 20;

/// `--cache-size`: a size of at least [`MIN_CACHE_SIZE`].
pub fn parse_cache_size(s: &str) -> Result<u64, String> {
    let size = parse_size(s)?;
    if size < MIN_CACHE_SIZE {
        return Err(format!(
            "{s} is too small: at least 1M (a fetched range is kept only when it is at most a \
             quarter of the cache)"
        ));
    }
    Ok(size)
}

/// Where a mount's cache lives without `--cache-dir`: the system's directory for disposable
/// files (`$TMPDIR`, else /tmp), in a directory of the user's own, so nothing is written
/// beside anything the user named.
fn default_cache_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tinylag-{}", rustix::process::getuid().as_raw()))
}

/// `mount --at|--mark --replica URI`: the point served lazily, through a bounded cache.
pub async fn run_mount(args: MountArgs, uri: StoreUri) -> anyhow::Result<()> {
    let refused: [(bool, &str, &str); 3] = [
        (
            args.writable.is_some(),
            "--writable",
            "its copy-on-write scratch is the file replica's view's own",
        ),
        (
            args.changes_since.is_some(),
            "--changes-since",
            "the dirty bitmap is built on a file replica's sources",
        ),
        (
            args.point.branch.is_some(),
            "--branch",
            "an object replica follows one lineage",
        ),
    ];
    if let Some((_, flag, why)) = refused.iter().find(|(given, _, _)| *given) {
        bail!(
            "{flag} is not taken with the mount of an object replica (--replica {uri}) yet: \
             {why}; restore the point to a file (`tinylag restore --replica {uri} --output \
             FILE`) and mount or use that"
        );
    }
    let point = point(&args.point)?;
    let listen = match (args.frontend, &args.listen) {
        (Frontend::Nbd, Some(listen)) => Some(listen.clone()),
        (Frontend::Nbd, None) => bail!(
            "--listen unix:PATH|tcp:IP:PORT is needed to mount an object replica (--replica \
             {uri}): there is no replica file to put the socket beside"
        ),
        (Frontend::Ublk, _) => None,
    };
    // Before anything is opened: plaintext on an address other hosts reach is refused.
    let security = match &listen {
        Some(l) => Some(args.tls.security_of(l, true)?),
        None => None,
    };
    let cache_dir = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cache_size = args.cache_size.unwrap_or(DEFAULT_CACHE_SIZE);
    let sources = open_sources(&args.replica, &uri).await?;
    let export = args.export.clone().unwrap_or_else(|| {
        sources
            .jm
            .devices
            .first()
            .map_or_else(|| "disk0".to_string(), |d| d.name.clone())
    });
    let cache = Arc::new(
        DiskCache::create(&cache_dir, cache_size)
            .with_context(|| format!("--cache-dir {}", cache_dir.display()))?,
    );
    let served = serve_view(
        &args,
        sources,
        &point,
        cache.clone(),
        listen,
        security,
        &export,
    )
    .await;
    cache.remove();
    served
}

/// Opens the view and serves it until SIGINT/SIGTERM (the cache is the caller's to remove).
async fn serve_view(
    args: &MountArgs,
    sources: ObjSources,
    point: &ObjPoint,
    cache: Arc<DiskCache>,
    listen: Option<ListenAddr>,
    security: Option<tinylag::nbd::Security>,
    export: &str,
) -> anyhow::Result<()> {
    let replica = sources.replica.describe();
    let region_size = sources.jm.region_size;
    let view = ObjView::open(sources, point, cache.clone())
        .await
        .with_context(|| format!("mount object replica {replica}"))?;
    let summary = view.summary().clone();
    let view: Arc<dyn BlockDevice> = Arc::new(view);
    let announce = |served_as: &str| {
        let p = summary.point;
        tell(format!(
            "tinylag mount: object replica {replica} as of LSN {} ({}) as {served_as}",
            p.lsn,
            format_ns(p.timestamp_ns)
        ));
        tell(format!(
            "read-only, lazily: checkpoint LSN {} (manifest generation {}): {}, {} delta layers, \
             {} journal records, {} extents mapped; cache {} (cap {})",
            p.checkpoint_lsn,
            summary.gen,
            summary.image_lsn.map_or_else(
                || "no image".to_string(),
                |lsn| format!("image at LSN {lsn} in {} parts", summary.image_parts)
            ),
            summary.deltas,
            summary.journal_records,
            summary.extents,
            cache.dir().display(),
            tinylag::units::format_size(cache.cap()),
        ));
    };
    let (Some(listen), Some(security)) = (listen, security) else {
        let options = args.ublk.options(region_size);
        let device = tinylag::ublk::start(view, options, tokio::runtime::Handle::current()).await?;
        announce(&device.block_path().to_string());
        let signal = wait_for_signal().await?;
        tracing::info!(signal, "stopping: deleting {}", device.block_path());
        device.stop().await;
        return Ok(());
    };
    let exports = vec![Export {
        name: export.to_string(),
        description: format!(
            "tinylag object replica {replica} as of LSN {}",
            summary.point.lsn
        ),
        device: view,
    }];
    let server = NbdServer::new(exports, export)?
        .with_security(security.clone())
        .with_buffer_budget(args.tls.buffer_budget()?);
    serve_nbd_until_signal(server, &listen, &security, &args.tls, export, |served_as| {
        announce(&served_as)
    })
    .await
}

/// `timeline --replica URI`.
pub async fn run_timeline(args: TimelineArgs, uri: StoreUri) -> anyhow::Result<()> {
    let sources = open_sources(&args.replica, &uri).await?;
    let t = sources.timeline().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    println!("object replica {}", t.replica);
    println!(
        "journal holds LSN {} on: every LSN from there to its end is restorable, and every \
         checkpoint",
        t.journal_first_lsn
    );
    for c in &t.checkpoints {
        println!(
            "checkpoint LSN {:>12}  {}  ({} layers)",
            c.lsn,
            format_ns(c.timestamp_ns),
            c.layers
        );
    }
    for (name, lsn, ts) in &t.marks {
        println!("mark {name} LSN {lsn}  {}", format_ns(*ts));
    }
    Ok(())
}

/// `tinylag replica …`: the object replica's own jobs.
#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Fold an object replica's delta layers into an image layer at its newest checkpoint
    /// (cron-safe, idempotent, safe to kill; runs beside the agent).
    Compact(CompactArgs),
    /// Drop an object replica's checkpoints older than --retain and delete the objects no
    /// retained point needs (cron-safe, idempotent, safe to kill; runs beside the agent).
    Trim(ReplicaTrimArgs),
}

/// The object replica a job works on.
#[derive(Debug, Args)]
pub struct ObjectReplicaArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// The object replica: its store address (s3://bucket/prefix, file:///dir).
    #[arg(long, value_name = "URI", value_parser = parse_object_replica)]
    pub replica: StoreUri,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--replica` of a job: a store address, never a plain path (a file replica has no layers).
fn parse_object_replica(s: &str) -> Result<StoreUri, String> {
    if !s.contains("://") {
        return Err(
            "an object replica is a store address (s3://bucket/prefix, file:///dir); a file \
             replica has no layers to compact or trim (its undo log has `tinylag undo trim`)"
                .into(),
        );
    }
    s.parse::<StoreUri>().map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    #[command(flatten)]
    pub target: ObjectReplicaArgs,
    /// Data bytes per image part (its memory is one part and a quarter of one).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub part_size: u64,
    /// Compact even when the delta layers since the newest image are under a quarter of it.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ReplicaTrimArgs {
    #[command(flatten)]
    pub target: ObjectReplicaArgs,
    /// Keep every checkpoint younger than this restorable (and the newest one older, the
    /// base of the points after it); the newest checkpoint is always kept.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub retain: std::time::Duration,
    /// An image part no manifest names is a dead compaction's once its run is this old.
    /// Shorter than a compaction's run, it deletes that compaction's parts: for tests.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration, hide = true)]
    pub orphan_grace: std::time::Duration,
}

async fn open_target(t: &ObjectReplicaArgs) -> anyhow::Result<ObjSources> {
    let journal = t.journal.open_for_command().await?;
    let store = open_store_for_command(&t.replica, &t.journal.s3.options()).await?;
    Ok(ObjSources::open(journal, store).await?)
}

/// `tinylag replica compact|trim`.
pub async fn run_replica(command: ReplicaCommand) -> anyhow::Result<()> {
    match command {
        ReplicaCommand::Compact(args) => {
            let sources = open_target(&args.target).await?;
            let mut config = CompactConfig::new();
            config.part_bytes = args.part_size.max(4096);
            config.force = args.force;
            if sources.jm.encryption.is_some() {
                // Image parts hold the journal's payloads: sealed like its layers.
                config.seal_with = tinylag::crypto::writing_key();
            }
            let report = compact(&sources, &config).await.with_context(|| {
                format!("compact object replica {}", sources.replica.describe())
            })?;
            if args.target.json {
                tell(serde_json::to_string_pretty(&report)?);
            } else {
                tell(format!(
                    "object replica {}: {} at checkpoint LSN {} ({} parts, {} bytes of {} \
                     bytes of data, from {} sources; generation {})",
                    sources.replica.describe(),
                    report.outcome,
                    report.lsn,
                    report.stats.parts,
                    report.stats.bytes,
                    report.stats.data_bytes,
                    report.stats.sources,
                    report.gen
                ));
            }
        }
        ReplicaCommand::Trim(args) => {
            let sources = open_target(&args.target).await?;
            let config = TrimConfig {
                retain: args.retain,
                orphan_grace: args.orphan_grace,
                now_ns: tinylag::clock::Clock::now_ns(&tinylag::clock::SystemClock),
            };
            let report = trim(&sources, &config)
                .await
                .with_context(|| format!("trim object replica {}", sources.replica.describe()))?;
            if args.target.json {
                tell(serde_json::to_string_pretty(&report)?);
            } else {
                tell(format!(
                    "object replica {}: {} checkpoints dropped, {} kept; {} objects ({} bytes) \
                     and {} old manifests deleted; {} objects of {} bytes live",
                    sources.replica.describe(),
                    report.checkpoints_dropped,
                    report.checkpoints_kept,
                    report.objects_deleted,
                    report.bytes_deleted,
                    report.generations_deleted,
                    report.objects_live,
                    report.bytes_live
                ));
            }
        }
    }
    Ok(())
}
