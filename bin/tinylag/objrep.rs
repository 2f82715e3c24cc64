//! The object replica on the command line: `replay`, `restore` and `timeline` with
//! `--replica URI` (a store address, not a path) come here (the work is in
//! `tinylag::objrep`).
//!
//! Must never: take a plain path for an object replica (a path stays a file replica), or
//! accept a flag the object replica cannot honour (`--delay`, `--undo`, seeds): refused in
//! one line before anything is registered.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use tinylag::clock::format_ns;
use tinylag::journal::JournalReader;
use tinylag::journal::Manifest;
use tinylag::objrep::{compact, trim, CompactConfig, ObjPoint, ObjSources, TrimConfig};
use tinylag::objrep::{ObjectAgent, ObjectAgentConfig};
use tinylag::store::{open_store, open_store_for_command, StoreUri};
use tokio::sync::watch;

use crate::cmd::args::{parse_duration, parse_size, JournalArgs, NamedPath};
use crate::cmd::output::{say, tell};
use crate::cmd::replay::{forward_signals, ReplayArgs};
use crate::cmd::serve::StopSignals;
use crate::cmd::timetravel::{PointArgs, ReplicaArgs, RestoreArgs, TimelineArgs};

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
