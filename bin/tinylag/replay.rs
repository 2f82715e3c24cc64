//! `tinylag replay`: a replay agent following a journal onto a replica, with a control socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tinylag::clock::{format_ns, Clock, SystemClock};
use tinylag::control;
use tinylag::journal::match_named_paths;
use tinylag::journal::JournalReader;
use tinylag::journal::{consumer, JournalError, Manifest};
use tinylag::metrics::{Hub, ReplicaSource};
use tinylag::replayer::GroupReplica;
use tinylag::replayer::{
    Agent, AgentConfig, BatchLimits, Outcome, PollPolicy, ReplicaFile, ReplicaTarget, SeedChoice,
    SeedStamp, StatusHandler, TokioTimer,
};
use tinylag::store::CountingStore;
use tinylag::store::LocalStore;
use tinylag::store::{open_store, ObjectStore, StoreUri};
use tinylag::units::format_duration;
use tokio::sync::watch;

use crate::cmd::args::{
    parse_duration, parse_group, parse_size, parse_store_uri, parse_time, JournalArgs, NamedPath,
};
use crate::cmd::config::ConfigArg;
use crate::cmd::metrics::{Endpoint, MetricsArgs};
use crate::cmd::output::{say, self_command, tell};
use crate::cmd::serve::StopSignals;
use crate::cmd::systemd;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// The replica image: a file (created sparse, of the device size, if absent) or a block
    /// device. A group journal takes one `--replica NAME=PATH` per device: the set is
    /// replayed in the group's one order and committed at one LSN. A store address
    /// (s3://bucket/prefix, file:///dir) keeps an object replica there instead: immutable
    /// layers and checkpoints, no disk, no undo log (see --checkpoint-interval).
    #[arg(long = "replica", value_name = "[NAME=]PATH", value_parser = NamedPath::parse, required = true)]
    pub replica: Vec<NamedPath>,
    /// Consumer name: this agent's position in the journal (1-64 of A-Z a-z 0-9 . _ -).
    #[arg(long)]
    pub name: String,
    /// Apply each record this long after it was written (e.g. 1h).
    #[arg(long, value_name = "DURATION", default_value = "0", value_parser = parse_duration, allow_hyphen_values = true)]
    pub delay: Duration,
    /// Undo log location: a directory or store URI (default: <replica>.undo/ beside the
    /// replica).
    #[arg(long, value_name = "DIR|URI", value_parser = parse_store_uri, conflicts_with = "no_undo")]
    pub undo: Option<StoreUri>,
    /// Keep no undo log: faster, but no time travel back, and after a crash the replica is
    /// torn until the agent has re-applied its last batch.
    #[arg(long)]
    pub no_undo: bool,
    /// Stop once the next record was written after TIME (RFC 3339, @unix, "10m ago").
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<u64>,
    /// Apply what is in the journal (and due) now, then exit.
    #[arg(long)]
    pub once: bool,
    /// Control socket (default: <replica>.ctl).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Let this group use the control socket (mode 0660) and run every command on it
    /// [default: owner and root only, mode 0600].
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub control_group: Option<u32>,
    /// Most records per batch (one undo segment, one fsync, one commit each).
    #[arg(long, default_value_t = 8192, hide = true)]
    pub batch_records: usize,
    /// Most bytes per batch.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size, allow_hyphen_values = true, hide = true)]
    pub batch_bytes: u64,
    /// Pre-image bytes per undo segment (a batch's undo segments are written in parallel).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size, allow_hyphen_values = true, hide = true)]
    pub undo_part_bytes: u64,
    /// A new consumer adopts the existing --replica image on your word: you copied it from
    /// the primary at the journal's start (or where its trim pointer is) yourself. Nothing
    /// is checked; status says so.
    #[arg(long, conflicts_with = "check_seed")]
    pub assume_seeded: bool,
    /// A new consumer adopts the existing --replica image and proves it region by region
    /// against the primary: run `tinylag verify` on the primary, then `tinylag resync
    /// --regions LIST` for the regions status lists as differing.
    #[arg(long)]
    pub check_seed: bool,
    /// Run crash recovery only, then exit (for tests and operators checking a replica).
    #[arg(long, hide = true)]
    pub recover_only: bool,
    /// Commit the unchanged position at least this often when idle (the sign of life
    /// `journal trim --drop-consumer-after` reads).
    #[arg(long, default_value = "60s", value_parser = parse_duration, hide = true)]
    pub idle_commit: Duration,
    /// Commit a moved position at most this often (one fsync and one PUT covering every
    /// batch since the last); `0s` commits after every batch (tests that watch commits).
    #[arg(long, default_value = "3s", value_parser = parse_duration, hide = true)]
    pub commit_every: Duration,
    /// An object replica (--replica s3://…) commits a checkpoint at least this often while
    /// records arrive: each costs three PUTs (layer, manifest, position), so the default
    /// keeps a disk written all the time at 360 PUTs an hour.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub checkpoint_interval: Duration,
    /// An object replica uploads a layer once the records it folds reach this size (bounds
    /// the agent's memory).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size, hide = true)]
    pub layer_size: u64,
    /// An object replica's poll period while writes flow (default 5s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, hide = true)]
    pub poll: Option<Duration>,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub config: ConfigArg,
}

impl ReplayArgs {
    /// The first (or only) replica image: the agent's socket and undo log default to beside
    /// it.
    pub fn first_replica(&self) -> &Path {
        &self.replica[0].path
    }
}

/// Each device's image (absolute), in device order: one `--replica` for a one-device journal,
/// one `NAME=PATH` per device for a group.
pub fn match_replicas(replicas: &[NamedPath], manifest: &Manifest) -> anyhow::Result<Vec<PathBuf>> {
    let devices: Vec<&str> = manifest.devices.iter().map(|d| d.name.as_str()).collect();
    let mut given = Vec::new();
    for r in replicas {
        let path = std::path::absolute(&r.path)
            .with_context(|| format!("--replica {}", r.path.display()))?;
        given.push((r.name.clone(), path));
    }
    match_named_paths(&devices, &given, "--replica").map_err(anyhow::Error::msg)
}

/// `<path><suffix>` beside `path` (`replica.img` → `replica.img.undo`).
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The control socket an agent for `replica` answers on unless `--control` says.
pub fn default_control_path(replica: &Path) -> PathBuf {
    beside(replica, ".ctl")
}

/// Everything a running agent needs, opened and checked.
pub struct Opened {
    pub agent: Agent,
    pub control: PathBuf,
    pub replica: PathBuf,
    pub undo: Option<String>,
    /// The undo store's request counts, when [`open`] was asked to count them.
    pub undo_counts: Option<Arc<CountingStore>>,
}

/// Opens the journal, the replica, the undo log, and the agent, for `replay` and `up`; with
/// `count_undo`, requests to the undo store are counted (for the metrics).
pub async fn open(
    args: &ReplayArgs,
    journal: Arc<dyn ObjectStore>,
    count_undo: bool,
) -> anyhow::Result<Opened> {
    let manifest = Manifest::load(journal.as_ref()).await?;
    manifest.check_key_for_reading(&journal.describe())?;
    let replica_path = std::path::absolute(args.first_replica())
        .with_context(|| format!("--replica {}", args.first_replica().display()))?;
    let size = manifest
        .device_size(0)
        .context("the journal's manifest lists no device")?;
    let group = manifest.devices.len() > 1;
    // Which image is which device, checked before anything is opened or created.
    let images = match_replicas(&args.replica, &manifest)?;
    if group && (args.assume_seeded || args.check_seed) {
        bail!(
            "--assume-seeded and --check-seed take one image; a group's replica set starts blank \
             at the journal's start"
        );
    }
    let undo_store: Option<Arc<dyn ObjectStore>> = if args.no_undo {
        None
    } else {
        Some(match &args.undo {
            Some(uri) => open_store(uri, &args.journal.s3.options()).await?,
            None => Arc::new(LocalStore::new(beside(&replica_path, ".undo"))),
        })
    };
    let undo_counts = match (&undo_store, count_undo) {
        (Some(store), true) => Some(Arc::new(CountingStore::new(store.clone()))),
        _ => None,
    };
    let undo_store = match &undo_counts {
        Some(counting) => Some(counting.clone() as Arc<dyn ObjectStore>),
        None => undo_store,
    };
    // Read before the file is opened: a stamp vouches for the image only as restore left it.
    let seed = if args.assume_seeded {
        SeedChoice::Assume
    } else if args.check_seed {
        SeedChoice::Check
    } else if group {
        set_seed(&manifest, &images)
    } else {
        match SeedStamp::read_checked(&replica_path) {
            Ok(Some(stamp)) => SeedChoice::Stamp(stamp),
            Ok(None) => SeedChoice::Refuse,
            // Only a new consumer needs the stamp: the agent decides.
            Err(e) => SeedChoice::BrokenStamp(e.to_string()),
        }
    };
    let (replica, created, created_paths, shown): (
        Arc<dyn ReplicaTarget>,
        bool,
        Vec<PathBuf>,
        String,
    ) = if group {
        let mut members: Vec<Arc<dyn ReplicaTarget>> = Vec::new();
        let mut created_paths = Vec::new();
        let opened: anyhow::Result<()> = (|| {
            for (device, path) in manifest.devices.iter().zip(&images) {
                let (image, created) = ReplicaFile::open_or_create(path, device.size)
                    .with_context(|| format!("--replica {}={}", device.name, path.display()))?;
                if created {
                    created_paths.push(path.clone());
                }
                members.push(Arc::new(image));
            }
            Ok(())
        })();
        if let Err(e) = opened {
            for path in &created_paths {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let set = GroupReplica::new(manifest.layout(), members);
        let shown = set.describe();
        if let Err(e) = take_added_devices(
            journal.as_ref(),
            &args.name,
            &shown,
            &manifest,
            &images,
            &created_paths,
        )
        .await
        {
            for path in &created_paths {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        // Blank only when every image was created now; an existing image among them is
        // adopted as the whole set is (refused unless blank).
        let all_created = created_paths.len() == images.len();
        (Arc::new(set), all_created, created_paths, shown)
    } else {
        let (replica, created) = ReplicaFile::open_or_create(&replica_path, size)?;
        let created_paths = if created {
            vec![replica_path.clone()]
        } else {
            Vec::new()
        };
        (
            Arc::new(replica),
            created,
            created_paths,
            replica_path.display().to_string(),
        )
    };
    let config = AgentConfig {
        name: args.name.clone(),
        replica: shown,
        delay: args.delay,
        until_ns: args.until,
        once: args.once,
        limits: BatchLimits {
            max_records: args.batch_records.max(1),
            max_bytes: args.batch_bytes.max(1),
            undo_part: usize::try_from(args.undo_part_bytes).unwrap_or(usize::MAX),
            ..BatchLimits::default()
        },
        poll: PollPolicy {
            idle_commit: args.idle_commit,
            commit_every: args.commit_every,
            ..PollPolicy::default()
        },
        seed,
    };
    let reader = JournalReader::new(journal, manifest);
    let opened = Agent::open(
        reader,
        undo_store.clone(),
        replica,
        created,
        config,
        Arc::new(SystemClock),
        Arc::new(TokioTimer),
    )
    .await;
    let agent = match opened {
        Ok(agent) => {
            if group {
                // The agent changes the set from here (its position says how it was seeded):
                // no image's stamp may vouch for it again. (A one-device agent removes its
                // own; a set's are one per image.)
                for image in &images {
                    SeedStamp::remove(image);
                }
            }
            agent
        }
        Err(e) => {
            // Leave nothing behind for a refused start.
            for path in &created_paths {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| default_control_path(&replica_path));
    Ok(Opened {
        agent,
        control,
        replica: replica_path,
        undo: undo_store.map(|s| s.describe()),
        undo_counts,
    })
}

/// After `journal add-device`: consumer `name`, registered for the set's first devices (or, if
/// the journal had one device then, for its image alone), takes the added devices' images when
/// they were created blank just now, and its registration names the whole set from here. That
/// is safe because no record of a device precedes its addition, and an agent stops at the
/// first record of a device its layout lacks: the consumer applied none of them. An added
/// device's image that already existed is refused in one line saying what to run.
async fn take_added_devices(
    store: &dyn ObjectStore,
    name: &str,
    shown: &str,
    manifest: &Manifest,
    images: &[PathBuf],
    created: &[PathBuf],
) -> anyhow::Result<()> {
    let mut pos = match consumer::load(store, name).await {
        Ok(pos) => pos,
        Err(JournalError::UnknownConsumer { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if pos.replica == shown {
        return Ok(());
    }
    let named: Vec<String> = manifest
        .devices
        .iter()
        .zip(images)
        .map(|(d, p)| format!("{}={}", d.name, p.display()))
        .collect();
    for k in 1..named.len() {
        let mut before = vec![named[..k].join(",")];
        if k == 1 {
            // Registered while the journal had one device: the plain path.
            before.push(images[0].display().to_string());
        }
        if !before.contains(&pos.replica) {
            continue;
        }
        let added: Vec<&str> = manifest.devices[k..]
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        if let Some(old) = images[k..].iter().find(|p| !created.contains(p)) {
            bail!(
                "consumer {name} replays onto {}, registered before device(s) {} were added; \
                 {} exists already, but an added device's image must be new (blank) for the \
                 consumer to take it: give a new path for it, or replay the set anew under a \
                 new --name",
                pos.replica,
                added.join(", "),
                old.display()
            );
        }
        pos.replica = shown.to_string();
        consumer::commit(store, &pos).await?;
        say(format!(
            "consumer {name}: takes the added device(s) {} (blank images); it now replays onto {shown}",
            added.join(", ")
        ));
        return Ok(());
    }
    // Another set altogether: the agent refuses it, naming both.
    Ok(())
}

/// How a replica set is vouched for: by a seed stamp beside **every** image (as `restore
/// --output-dir` leaves them), each checked against its own file, all naming the same journal
/// state; a stamp beside some images only, or stamps of different states, vouch for nothing
/// (one changed image would otherwise ride on the others' stamps).
fn set_seed(manifest: &Manifest, images: &[PathBuf]) -> SeedChoice {
    let mut stamps = Vec::new();
    for (device, image) in manifest.devices.iter().zip(images) {
        match SeedStamp::read_checked(image) {
            Ok(stamp) => stamps.push((device, image, stamp)),
            Err(e) => return SeedChoice::BrokenStamp(format!("device {}: {e}", device.name)),
        }
    }
    if stamps.iter().all(|(_, _, s)| s.is_none()) {
        return SeedChoice::Refuse;
    }
    if let Some((device, image, _)) = stamps.iter().find(|(_, _, s)| s.is_none()) {
        return SeedChoice::BrokenStamp(format!(
            "device {}: {} has no seed stamp beside it, though other images of the set do: a \
             set is vouched for only by a stamp beside every image",
            device.name,
            image.display()
        ));
    }
    let first = stamps[0]
        .2
        .clone()
        .expect("checked: every image has a stamp");
    let state = |s: &SeedStamp| (s.journal_uuid, s.lsn, s.seq, s.epoch);
    for (device, image, stamp) in &stamps[1..] {
        let stamp = stamp.as_ref().expect("checked: every image has a stamp");
        if state(stamp) != state(&first) {
            return SeedChoice::BrokenStamp(format!(
                "device {}: the seed stamp beside {} is of LSN {} (seq {}, epoch {}), the first \
                 image's of LSN {} (seq {}, epoch {}): the images are not one state of the set",
                device.name,
                image.display(),
                stamp.lsn,
                stamp.seq,
                stamp.epoch,
                first.lsn,
                first.seq,
                first.epoch
            ));
        }
    }
    SeedChoice::Stamp(first)
}

/// Caps glibc's malloc arenas. The agent moves tens of megabytes per batch through buffers
/// allocated on tokio's blocking threads; with glibc's default (an arena per thread, up to 8
/// per core) the freed buffers stay cached in each arena: a 1 GiB catch-up peaked at 588 MB
/// RSS with the default and 308 MB with 2 arenas, at the same speed.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tuning parameter; glibc makes it thread-safe.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<()> {
    run_with(args, None).await
}

/// [`run`], with the metrics going to `shared` (from `up`) instead of `--metrics-listen`.
pub async fn run_with(args: ReplayArgs, shared: Option<Arc<Hub>>) -> anyhow::Result<()> {
    if let Some(uri) = crate::cmd::objrep::object_replica(&args.replica)? {
        return crate::cmd::objrep::run_replay(args, uri).await;
    }
    limit_malloc_arenas();
    // A bad TINYLAG_IO_ENGINE (or `uring` where it cannot run) stops the agent here, before
    // anything is opened, as it stops serve.
    tinylag::block::engine::select()?;
    let metrics = match args.recover_only {
        true => None,
        false => Endpoint::open(&args.metrics, shared).await?,
    };
    let mut journal = args.journal.open().await?;
    let journal_counts = metrics.as_ref().map(|_| {
        let counting = Arc::new(CountingStore::new(journal.clone()));
        journal = counting.clone();
        counting
    });
    let Opened {
        mut agent,
        control: control_path,
        replica,
        undo,
        undo_counts,
    } = open(&args, journal.clone(), metrics.is_some()).await?;

    if args.recover_only {
        let report = agent.recover().await?;
        tell(serde_json::to_string(&report)?);
        return Ok(());
    }

    // Caught from here on: a stop while the control socket already answers is clean.
    let signals = StopSignals::watch()?;
    let access = control::Access {
        group: args.control_group,
    };
    let listener = control::bind_with(&control_path, access)
        .await
        .with_context(|| format!("control socket {}", control_path.display()))?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let board = agent.board();
    let server = tokio::spawn(control::serve(
        listener,
        Arc::new(StatusHandler(board.clone())),
        shutdown_rx.clone(),
    ));
    let metrics_url = metrics.as_ref().and_then(Endpoint::url);
    let metrics_task = metrics.and_then(|m| {
        m.hub.add_source(Arc::new(ReplicaSource(board.clone())));
        for (store, counts) in [("journal", journal_counts), ("undo", undo_counts)] {
            if let Some(counts) = counts {
                m.hub.add_store("replica", store, counts);
            }
        }
        m.start(shutdown_rx.clone())
    });
    if let Some(url) = &metrics_url {
        say(format!("tinylag replay: metrics {url}"));
    }
    say(format!(
        "tinylag replay: {} -> {} as consumer {} (delay {}, undo log {}); status: {} status --control {}",
        journal.describe(),
        replica.display(),
        args.name,
        format_duration(args.delay),
        undo.as_deref().unwrap_or("none"),
        self_command(),
        control_path.display()
    ));
    // The control socket answers and the agent runs from here on (crash recovery, if any, is
    // its first step: status shows it, and a long one is not cut short by a start timeout).
    systemd::ready(&format!("replaying onto {}", replica.display()));
    let signals = tokio::spawn(forward_signals(signals, shutdown_tx.clone()));
    let result = agent.run(shutdown_rx).await;
    signals.abort();
    let _ = shutdown_tx.send(true);
    let _ = server.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(&control_path);
    let outcome = result?;
    let status = board.snapshot().await;
    let why = match outcome {
        Outcome::CaughtUp => "caught up",
        Outcome::ReachedUntil => "reached --until",
        Outcome::Shutdown => "stopped",
    };
    if !status.seed_vouched {
        say(format!("tinylag replay: the replica is {}", status.seed));
    }
    let t = status.time_spent;
    say(format!(
        "tinylag replay: {why}: applied LSN {} ({}), consistent LSN {}; this run: {} records in {} batches, time in pre-images {} ms, undo log {} ms, apply {} ms, fsync {} ms, commits {} ms",
        status.applied_lsn,
        status
            .applied_time
            .clone()
            .unwrap_or_else(|| format_ns(SystemClock.now_ns())),
        status.consistent_lsn,
        status.records_applied,
        status.batches_applied,
        t.preimage_ms,
        t.undo_ms,
        t.apply_ms,
        t.sync_ms,
        t.commit_ms
    ));
    Ok(())
}

/// Turns SIGINT and SIGTERM into a shutdown request.
pub async fn forward_signals(mut signals: StopSignals, shutdown: watch::Sender<bool>) {
    signals.recv().await;
    systemd::stopping();
    tracing::info!("signal received: finishing the current batch");
    let _ = shutdown.send(true);
}
