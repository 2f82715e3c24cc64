//! `tinylag restore`, `tinylag timeline` and `tinylag mount`: time travel over a replica, its
//! undo log and the journal (the work is in `tinylag::timetravel`).

use anyhow::bail;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tinylag::block::BlockDevice;
use tinylag::block::DeviceSlice;
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::DeviceLayout;
use tinylag::nbd::{self, DirtyBitmap, Export, ListenAddr, NbdServer, Security};
use tinylag::store::LocalStore;
use tinylag::store::{open_store_for_command, ObjectStore, StoreUri};
use tinylag::timetravel::restore::{self, Direction, Stage};
use tinylag::timetravel::TimeView;
use tinylag::timetravel::{gather_timeline, Point, Sources, Target};

use crate::cmd::args::{
    parse_listen, parse_store_uri, parse_time, usage, JournalArgs, NamedPath, TlsArgs,
};
use crate::cmd::output::{tell, warn_logged};
use crate::cmd::serve::wait_for_signal;
use crate::cmd::ublk::{check_frontend, Frontend, UblkArgs};

/// The replica and where its history is.
#[derive(Debug, Args)]
pub struct ReplicaArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// The replica a `tinylag replay` keeps (file or block device); for a group journal one
    /// `--replica NAME=PATH` per device, as `replay` was given them. An object replica is its
    /// store address (s3://bucket/prefix, file:///dir): restore, timeline and mount take it.
    #[arg(long, value_name = "[NAME=]PATH", value_parser = NamedPath::parse, required = true)]
    pub replica: Vec<NamedPath>,
    /// Its undo log: a directory or store URI (default: <replica>.undo/ beside it).
    #[arg(long, value_name = "DIR|URI", value_parser = parse_store_uri)]
    pub undo: Option<StoreUri>,
    /// The replay agent's consumer name (default: the one registered for --replica).
    #[arg(long)]
    pub name: Option<String>,
}

/// The point to travel to: a time, a mark, or the end of a branch.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct PointArgs {
    /// The disk as of the last record at or before TIME (RFC 3339, @unix, "10m ago").
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<u64>,
    /// The disk as of a mark (see `tinylag timeline`).
    #[arg(long, value_name = "NAME", value_parser = parse_mark_name)]
    pub mark: Option<String>,
    /// The disk as the old primary left it on a branch (records a `promote --at` left off
    /// the chain; see `tinylag timeline`): the branch's last record.
    #[arg(long, value_name = "NAME")]
    pub branch: Option<String>,
}

fn parse_mark_name(s: &str) -> Result<String, String> {
    tinylag::journal::mark::validate_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

impl PointArgs {
    fn target(&self) -> Target {
        match (&self.at, &self.mark, &self.branch) {
            (Some(t), _, _) => Target::Time(*t),
            (None, Some(m), _) => Target::Mark(m.clone()),
            (None, None, Some(b)) => Target::Branch(b.clone()),
            (None, None, None) => unreachable!("clap requires one of --at, --mark and --branch"),
        }
    }
}

/// `<path><suffix>` beside `path`.
fn beside(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl ReplicaArgs {
    /// Opens the journal, the consumer and the undo log (nothing is created).
    pub async fn open(&self) -> anyhow::Result<Sources> {
        if let Some(uri) = crate::cmd::objrep::object_replica(&self.replica)? {
            bail!(
                "--replica {uri} is an object replica: restore, timeline and mount take it; \
                 this command does not yet (restore a point to a file and use that)"
            );
        }
        let journal = self.journal.open_for_command().await?;
        let undo: Arc<dyn ObjectStore> = match &self.undo {
            Some(uri) => open_store_for_command(uri, &self.journal.s3.options()).await?,
            None => {
                let replica = std::path::absolute(self.first_replica())?;
                Arc::new(LocalStore::new(beside(&replica, ".undo")))
            }
        };
        let given: Vec<(Option<String>, PathBuf)> = self
            .replica
            .iter()
            .map(|r| (r.name.clone(), r.path.clone()))
            .collect();
        Ok(Sources::open(journal, &given, self.name.as_deref(), undo).await?)
    }

    /// The first (or only) replica image: the undo log and sockets default to beside it.
    pub fn first_replica(&self) -> &Path {
        &self.replica[0].path
    }
}

/// Opens the sources and resolves the point (refusing one outside the window).
pub async fn open_at(replica: &ReplicaArgs, point: &PointArgs) -> anyhow::Result<(Sources, Point)> {
    let mut sources = replica.open().await?;
    if let Some(name) = &point.branch {
        sources.follow_branch(name).await?;
    }
    let window = sources.window().await?;
    let point = sources
        .resolve(&point.target(), &window, SystemClock.now_ns())
        .await?;
    Ok((sources, point))
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub replica: ReplicaArgs,
    #[command(flatten)]
    pub point: PointArgs,
    /// The new image file to write (must not exist).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "output_dir",
        conflicts_with = "output_dir"
    )]
    pub output: Option<PathBuf>,
    /// A group journal: the directory (new, or empty) to write one image per device into,
    /// `<device>.img`, all as of the same point.
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Print the plan (direction, objects, bytes) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the plan or the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Progress on a terminal (a bar); elsewhere (a log, a pipe) one summary line per stage, once
/// it is done.
struct Reporter {
    bar: Option<ProgressBar>,
    /// The stages whose summary line is printed.
    finished: Mutex<Vec<Stage>>,
}

impl Reporter {
    fn new() -> Reporter {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar
        });
        Reporter {
            bar,
            finished: Mutex::new(Vec::new()),
        }
    }

    fn report(&self, stage: Stage, done: u64, total: u64) {
        let (name, unit) = match stage {
            Stage::Copy => ("copy", "bytes of the replica copied"),
            Stage::Undo => ("undo", "undo segments applied"),
            Stage::Journal => ("journal", "journal segments applied"),
        };
        if let Some(bar) = &self.bar {
            bar.set_message(name);
            bar.set_length(total);
            bar.set_position(done);
            return;
        }
        let mut finished = self.finished.lock().expect("not poisoned");
        if done >= total && !finished.contains(&stage) {
            finished.push(stage);
            eprintln!("{name}: done, {done} {unit}");
        }
    }
}

pub async fn run_restore(args: RestoreArgs) -> anyhow::Result<()> {
    if let Some(uri) = crate::cmd::objrep::object_replica(&args.replica.replica)? {
        return crate::cmd::objrep::run_restore(args, uri).await;
    }
    let (sources, point) = open_at(&args.replica, &args.point).await?;
    let output = match (&args.output, &args.output_dir, sources.members.len()) {
        (Some(file), None, 1) => file.clone(),
        (None, Some(dir), n) if n > 1 => dir.clone(),
        (Some(_), _, n) => anyhow::bail!(
            "--output: journal {} is a group of {n} devices; restore it with --output-dir DIR \
             (one image per device)",
            sources.journal().describe()
        ),
        (None, _, _) => anyhow::bail!(
            "--output-dir is for a group journal; this one has one device: use --output FILE"
        ),
    };
    let window = sources.window().await?;
    let plan = restore::plan(&sources, &window, point).await?;
    if args.dry_run {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            let direction = match plan.direction {
                Direction::Backward => "backward through the undo log",
                Direction::Forward => "forward through the journal",
            };
            println!(
                "restore to {} from the replica at {}",
                point.describe(),
                plan.base.describe()
            );
            println!("direction       {direction}");
            println!(
                "undo segments   {}..{} ({} records, {} bytes), newest first",
                plan.undo_segments.start,
                plan.undo_segments.end,
                plan.undo_records,
                plan.undo_bytes
            );
            println!(
                "journal         segments {}..{} ({} records, {} bytes)",
                plan.journal_segments.start,
                plan.journal_segments.end,
                plan.journal_records,
                plan.journal_bytes
            );
            println!(
                "copy            {} ({} bytes, sparse)",
                sources.replica.display(),
                sources.size
            );
            println!(
                "output          {} (not written: --dry-run)",
                output.display()
            );
        }
        return Ok(());
    }
    let reporter = Reporter::new();
    let progress = |stage, done, total| reporter.report(stage, done, total);
    let report = restore::restore(&sources, &plan, &output, &progress).await?;
    if let Some(bar) = &reporter.bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored {} as of {}: copied {} bytes, undid {} records, applied {} journal records",
            report.output.display(),
            report.point.describe(),
            report.copied_bytes,
            report.undo_records,
            report.journal_records
        );
        match &report.seed_stamp {
            Some(_) if sources.members.len() > 1 => println!(
                "seed stamps beside every image: `tinylag replay --replica NAME={}/NAME.img` per \
                 device with a new --name adopts the set and starts at LSN {}",
                report.output.display(),
                report.point.lsn
            ),
            Some(stamp) => println!(
                "seed stamp {}: `tinylag replay --replica {}` with a new --name adopts the image and starts at LSN {}",
                stamp.display(),
                report.output.display(),
                report.point.lsn
            ),
            None => println!(
                "no seed stamp: the replica restored from is not vouched for (see its status), so replay will not adopt this image as it is"
            ),
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct TimelineArgs {
    #[command(flatten)]
    pub replica: ReplicaArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run_timeline(args: TimelineArgs) -> anyhow::Result<()> {
    if let Some(uri) = crate::cmd::objrep::object_replica(&args.replica.replica)? {
        return crate::cmd::objrep::run_timeline(args, uri).await;
    }
    let sources = args.replica.open().await?;
    let t = gather_timeline(&sources).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        print!("{t}");
    }
    if let Some(hole) = &t.journal_hole {
        bail!("the window ends early: {hole}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub replica: ReplicaArgs,
    #[command(flatten)]
    pub point: PointArgs,
    /// How the past disk is served: nbd (a socket, see --listen) or ublk (a local
    /// /dev/ublkbN, read-only unless --writable; needs the kernel's ublk_drv).
    #[arg(long, value_enum, default_value = "nbd", value_name = "nbd|ublk")]
    pub frontend: Frontend,
    #[command(flatten)]
    pub ublk: UblkArgs,
    /// NBD address: unix:PATH or tcp:IP:PORT [default: unix:<replica>.at.sock]. TCP on an
    /// address other than loopback needs --tls require (or --insecure-no-tls).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Option<ListenAddr>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// NBD export name [default: the journal's device name].
    #[arg(long, value_name = "NAME")]
    pub export: Option<String>,
    /// Accept writes into this new copy-on-write scratch file (without it, writes get
    /// EPERM). The replica, undo log and journal are never written either way.
    #[arg(long, value_name = "PATH")]
    pub writable: Option<PathBuf>,
    /// Also offer what was written between TIME|MARK and the mounted point as the NBD
    /// metadata context qemu:dirty-bitmap:<MARK> (qemu:dirty-bitmap:changes for a time), as
    /// qemu's incremental backups read it (e.g. nbdinfo --map=qemu:dirty-bitmap:MARK).
    /// Found from segment indexes alone: no payload is read.
    #[arg(long, value_name = "TIME|MARK", value_parser = parse_since)]
    pub changes_since: Option<Since>,
    /// An object replica's mount: the directory its local cache of fetched ranges lives
    /// under, one subdirectory per mount, removed at stop [default: <tmp>/tinylag-<uid>].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// An object replica's mount: the cache's hard size cap [default: 1G].
    #[arg(long, value_name = "SIZE", value_parser = crate::cmd::objrep::parse_cache_size)]
    pub cache_size: Option<u64>,
}

/// `--changes-since`: a time, or else a mark's name; and the dirty bitmap's name.
#[derive(Clone, Debug)]
pub struct Since {
    target: Target,
    bitmap: String,
}

fn parse_since(s: &str) -> Result<Since, String> {
    if let Ok(ns) = parse_time(s) {
        return Ok(Since {
            target: Target::Time(ns),
            bitmap: "changes".to_string(),
        });
    }
    tinylag::journal::mark::validate_name(s).map_err(|e| {
        format!("{s:?} is neither a time (RFC 3339, @unix, \"10m ago\") nor a mark name: {e}")
    })?;
    Ok(Since {
        target: Target::Mark(s.to_string()),
        bitmap: s.to_string(),
    })
}

/// The writes between `since` and `point` as one dirty bitmap per device (index order), from
/// segment indexes.
async fn changes_bitmaps(
    sources: &Sources,
    since: &Since,
    point: Point,
) -> anyhow::Result<(Vec<DirtyBitmap>, tinylag::timetravel::Diff)> {
    use tinylag::timetravel::{changed_extents, LiveRange};
    let live = LiveRange::open(&sources.reader).await?;
    let from = live
        .resolve(
            &sources.reader,
            &sources.lineage,
            "--changes-since",
            &since.target,
            SystemClock.now_ns(),
        )
        .await?;
    let diff = changed_extents(&sources.reader, &sources.lineage, &live, from, point).await?;
    let mut bitmaps = Vec::new();
    for dev in 0..sources.reader.manifest().devices.len() as u32 {
        bitmaps.push(DirtyBitmap::new(
            &since.bitmap,
            diff.extents
                .iter()
                .filter(|e| e.dev == dev)
                .map(|e| e.offset..e.end()),
        )?);
    }
    Ok((bitmaps, diff))
}

/// What a mount serves: one device per export, `(name, device)` in device order. A one-device
/// journal's view is served whole as `export`; a group's as one slice per device, named as the
/// device, all of the one view (so every device is as of the same point).
fn mount_targets(
    view: Arc<TimeView>,
    layout: &DeviceLayout,
    export: &str,
) -> Vec<(String, Arc<dyn BlockDevice>)> {
    if layout.is_single() {
        return vec![(export.to_string(), view)];
    }
    layout
        .devices()
        .iter()
        .map(|placed| {
            let slice: Arc<dyn BlockDevice> =
                Arc::new(DeviceSlice::new(view.clone(), placed.base, placed.size));
            (placed.name.clone(), slice)
        })
        .collect()
}

impl MountArgs {
    /// Refuses flags of the other frontend and combinations that cannot work, before
    /// anything is opened.
    fn check_frontend(&self) -> anyhow::Result<()> {
        // A re-attached device would keep the kernel's view of writes that went to a
        // scratch file the new daemon cannot reopen (it must be new).
        if self.ublk.user_recovery && self.writable.is_some() {
            return Err(usage(
                "--user-recovery cannot be used with --writable: a re-attaching daemon \
                 would lose the scratch file's writes under a mounted filesystem",
            ));
        }
        let mut nbd_flags = vec![
            (self.listen.is_some(), "--listen"),
            (self.export.is_some(), "--export"),
            (self.changes_since.is_some(), "--changes-since"),
        ];
        nbd_flags.extend(self.tls.given());
        check_frontend(self.frontend, &self.ublk, &nbd_flags)
    }
}

pub async fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    args.check_frontend()?;
    if let Some(uri) = crate::cmd::objrep::object_replica(&args.replica.replica)? {
        return crate::cmd::objrep::run_mount(args, uri).await;
    }
    if args.cache_dir.is_some() || args.cache_size.is_some() {
        bail!(
            "--cache-dir and --cache-size are for the mount of an object replica (--replica \
             URI); a file replica is read in place, with no cache"
        );
    }
    if args.frontend == Frontend::Ublk {
        let (sources, point) = open_at(&args.replica, &args.point).await?;
        if sources.members.len() > 1 && args.ublk.dev_id.is_some() {
            bail!("--dev-id: a group gets one /dev/ublkbN per device, numbered by the kernel");
        }
        return run_mount_ublk(args, sources, point).await;
    }
    let listen = match &args.listen {
        Some(l) => l.clone(),
        None => ListenAddr::Unix(beside(
            &std::path::absolute(args.replica.first_replica())?,
            ".at.sock",
        )),
    };
    // Before anything is opened: plaintext on an address other hosts reach is refused.
    let security = args.tls.security_of(&listen, args.writable.is_none())?;
    let (sources, point) = open_at(&args.replica, &args.point).await?;
    let layout = sources.reader.manifest().layout();
    if !layout.is_single() && args.export.is_some() {
        bail!("--export: a group's exports are its device names (see `tinylag journal info`)");
    }
    let export = args.export.clone().unwrap_or_else(|| {
        sources
            .reader
            .manifest()
            .devices
            .first()
            .map_or_else(|| "disk0".to_string(), |d| d.name.clone())
    });
    let replica = sources.replica.display().to_string();
    let members = sources.members.clone();
    let changes = match &args.changes_since {
        Some(since) => Some(changes_bitmaps(&sources, since, point).await?),
        None => None,
    };
    let view = Arc::new(TimeView::open(sources, point, args.writable.as_deref()).await?);
    let summary = view.summary().clone();
    let targets = mount_targets(view, &layout, &export);
    let exports = targets
        .iter()
        .zip(&members)
        .map(|((name, device), path)| Export {
            name: name.clone(),
            description: format!("tinylag {} as of {}", path.display(), point.describe()),
            device: device.clone(),
        })
        .collect();
    let mut server = NbdServer::new(exports, &export)?
        .with_security(security.clone())
        .with_buffer_budget(args.tls.buffer_budget()?);
    let mut bitmap_line = None;
    if let Some((bitmaps, diff)) = changes {
        let ranges: usize = bitmaps.iter().map(|b| b.ranges().len()).sum();
        bitmap_line = Some(format!(
            "changes since {}: {}{} ({} extents, {} bytes, {} segment indexes read)",
            diff.from.describe(),
            nbd::DIRTY_BITMAP_PREFIX,
            since_name(&args),
            ranges,
            diff.changed_bytes(),
            diff.objects_read,
        ));
        for ((name, _), bitmap) in targets.iter().zip(bitmaps) {
            server = server.with_dirty_bitmap(name, bitmap)?;
        }
    }
    serve_nbd_until_signal(
        server,
        &listen,
        &security,
        &args.tls,
        &export,
        |served_as| {
            announce(&replica, &point, &summary, &served_as, &args.writable);
            if let Some(line) = bitmap_line {
                tell(line);
            }
        },
    )
    .await
}

/// Serves `server` on `listen` until SIGINT or SIGTERM, then lets its connections finish.
/// Once the socket is bound, `announce` gets what clients connect to (the NBD URI and the
/// security in force), and then the security warning, if any, is logged. The tail of both
/// mounts: of a replica image and of an object replica.
pub async fn serve_nbd_until_signal(
    server: NbdServer,
    listen: &ListenAddr,
    security: &Security,
    tls: &TlsArgs,
    export: &str,
    announce: impl FnOnce(String),
) -> anyhow::Result<()> {
    let listener = nbd::bind(listen).await?;
    let listen = listener.local_addr().clone();
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let nbd_task = tokio::spawn(nbd::serve(listener, Arc::new(server), shutdown_rx));
    announce(format!(
        "{} ({})",
        tls.nbd_uri(&listen, export),
        security.describe()
    ));
    if let Some(w) = security.warning(&listen) {
        warn_logged(&w);
    }
    let signal = wait_for_signal().await?;
    tracing::info!(signal, "stopping");
    let _ = shutdown_tx.send(true);
    match nbd_task.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(anyhow::anyhow!("the NBD server task failed: {e}")),
    }
}

/// The name the dirty bitmap of `--changes-since` carries.
fn since_name(args: &MountArgs) -> String {
    args.changes_since
        .as_ref()
        .map_or_else(String::new, |s| s.bitmap.clone())
}

/// `mount --frontend ublk`: the past disk as a local `/dev/ublkbN` (a group: one per device,
/// in device order; read-only unless `--writable`), until SIGINT/SIGTERM, which deletes them.
async fn run_mount_ublk(args: MountArgs, sources: Sources, point: Point) -> anyhow::Result<()> {
    let region_size = sources.reader.manifest().region_size;
    let layout = sources.reader.manifest().layout();
    let replica = sources.replica.display().to_string();
    let view = Arc::new(TimeView::open(sources, point, args.writable.as_deref()).await?);
    let summary = view.summary().clone();
    let options = args.ublk.options(region_size);
    let mut devices = Vec::new();
    for (_, target) in mount_targets(view, &layout, "") {
        match tinylag::ublk::start(target, options.clone(), tokio::runtime::Handle::current()).await
        {
            Ok(d) => devices.push(d),
            Err(e) => {
                // None of the set is left behind without the rest.
                for d in devices {
                    d.stop().await;
                }
                return Err(e.into());
            }
        }
    }
    let served_as = devices
        .iter()
        .map(|d| {
            let how = if d.recovered() { " (re-attached)" } else { "" };
            format!("{}{how}", d.block_path())
        })
        .collect::<Vec<_>>()
        .join(", ");
    announce(&replica, &point, &summary, &served_as, &args.writable);
    let signal = wait_for_signal().await?;
    for device in devices {
        tracing::info!(signal, "stopping: deleting {}", device.block_path());
        device.stop().await;
    }
    Ok(())
}

/// The two lines `mount` prints once it serves: what, as of when, served as what; then
/// read-only or where writes go.
fn announce(
    replica: &str,
    point: &Point,
    summary: &tinylag::timetravel::ViewSummary,
    served_as: &str,
    writable: &Option<PathBuf>,
) {
    tell(format!(
        "tinylag mount: {replica} as of {} ({}, {} extents mapped) as {served_as}",
        point.describe(),
        match summary.direction {
            Direction::Backward => "back through the undo log",
            Direction::Forward => "forward through the journal",
        },
        summary.extents,
    ));
    tell(match writable {
        Some(p) => format!("writable: writes go to {}", p.display()),
        None => "read-only".to_string(),
    });
}
