//! `tinylag rejoin`: an old primary's image comes back as a replica of the current chain,
//! moving only what diverged (see `tinylag::replayer::rejoin` for the plan and DESIGN.md,
//! "rejoin"). It prints the bytes it will move, registers the consumer at the fork with a
//! `checking` seed over exactly the diverged regions, asks the writer for them through the
//! store (`requests/resync/<name>`), then runs the replay agent as `replay` does.
//!
//! A group's old primaries rejoin as one set (`--replica NAME=PATH` per device, as `replay`
//! takes them): one fork, the regions of every device in the group's numbering, one consumer
//! whose replica is the set, so every image is wound to and follows the same LSN.
//!
//! Must never: change anything (consumer, request, marker) when it refuses; proceed over a
//! trimmed fork or an image whose writes nothing bounds without `--full`.

use std::path::PathBuf;

use clap::Args;
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::chain;
use tinylag::journal::consumer;
use tinylag::journal::epoch::Predecessor;
use tinylag::journal::resync_request::{self, ResyncRequest};
use tinylag::journal::DivergenceError;
use tinylag::journal::{JournalError, Manifest};
use tinylag::replayer::rejoin::{self, region_bytes, RejoinError, RejoinPlan};
use tinylag::units::format_size;

use crate::cmd::output::{say, tell};
use crate::cmd::replay::{self, ReplayArgs};

#[derive(Debug, Args)]
// replay's seed choices mean nothing here (rejoin seeds its consumer itself): hidden, refused;
// nor does an object replica's checkpoint interval (an old primary's image is a file).
#[command(
    mut_arg("check_seed", |a| a.hide(true)),
    mut_arg("checkpoint_interval", |a| a.hide(true)),
    mut_arg("assume_seeded", |a| a.hide(true)),
    mut_arg("replica", |a| a.help(
        "The old primary's image, with its activity log and clean-stop marker beside it; a \
         group's old primaries, one NAME=PATH per device (the log and marker beside the first)"
    ))
)]
pub struct RejoinArgs {
    #[command(flatten)]
    pub replay: ReplayArgs,
    /// Move every region, not only what diverged: for an image whose writes nothing bounds
    /// (no activity log, no clean-stop marker) or a journal trimmed past the fork.
    #[arg(long)]
    pub full: bool,
    /// The old primary's activity log [default: <replica>.tinylag-al, where `serve` keeps it].
    #[arg(long, value_name = "PATH")]
    pub activity_log: Option<PathBuf>,
}

/// One line for a refusal, with what `--full` would cost where it would help.
fn refusal(e: RejoinError, full_bytes: u64, device: u64, group: bool) -> anyhow::Error {
    let full = || {
        format!(
            "; `--full` moves every region: {} of the {} {}",
            format_size(full_bytes),
            if group { "set's" } else { "device's" },
            format_size(device)
        )
    };
    match e {
        RejoinError::UnknownImage { .. }
        | RejoinError::Divergence(DivergenceError::Trimmed { .. })
        | RejoinError::Divergence(DivergenceError::Missing { .. }) => {
            anyhow::anyhow!("rejoin refused: {e}{}", full())
        }
        e => anyhow::anyhow!("rejoin refused: {e}"),
    }
}

pub async fn run(args: RejoinArgs) -> anyhow::Result<()> {
    let r = &args.replay;
    if r.check_seed || r.assume_seeded {
        anyhow::bail!(
            "rejoin refused: --check-seed and --assume-seeded are replay's; rejoin seeds its consumer itself (checking exactly the diverged regions)"
        );
    }
    let journal = r.journal.open().await?;
    let manifest = Manifest::load(journal.as_ref()).await?;
    manifest.check_key_for_reading(&journal.describe())?;
    let group = manifest.devices.len() > 1;
    // Each device's old primary, in device order (a group names every device once).
    let images = replay::match_replicas(&r.replica, &manifest)?;
    let replica = images[0].clone();
    let layout = manifest.layout();
    let device: u64 = layout.devices().iter().map(|d| d.size).sum();
    match consumer::load(journal.as_ref(), &r.name).await {
        Ok(pos) => {
            // A rejoin that registered already (and was stopped): its position and seed say
            // where the image stands; the agent continues (it refuses another replica).
            say(format!(
                "tinylag rejoin: consumer {} is registered already (applied LSN {}; {}): continuing its replay",
                r.name, pos.applied_lsn, pos.seed
            ));
            return replay::run(args.replay).await;
        }
        Err(JournalError::UnknownConsumer { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // A `serve` still running on the image (a fenced old primary keeps serving) answers on
    // the control socket the agent would take: refuse before anything changes.
    let control = r
        .control
        .clone()
        .unwrap_or_else(|| replay::default_control_path(&replica));
    if std::os::unix::net::UnixStream::connect(&control).is_ok() {
        anyhow::bail!(
            "rejoin refused: a daemon answers on {} (is `serve` still running on this image? stop it first)",
            control.display()
        );
    }
    if let Some(missing) = images.iter().find(|p| !p.exists()) {
        anyhow::bail!(
            "rejoin refused: the old primary's image {} does not exist (for a new replica use `replay`)",
            missing.display()
        );
    }
    let activity_log = args
        .activity_log
        .clone()
        .unwrap_or_else(|| tinylag::writer::default_activity_log_path(&replica));
    let marker = tinylag::writer::clean_marker_path(&replica);
    let chain = chain::load(journal.as_ref()).await?;
    let trim = consumer::load_trim_pointer(journal.as_ref()).await?;
    let image = rejoin::read_image_state(&activity_log, &marker, &manifest);
    let full_bytes = region_bytes(
        &tinylag::journal::RegionRanges::all(layout.span().div_ceil(manifest.region_size.max(1))),
        manifest.region_size,
        &layout,
    );
    let plan = rejoin::plan(journal.as_ref(), &manifest, &chain, trim, image, args.full)
        .await
        .map_err(|e| refusal(e, full_bytes, device, group))?;
    // What the agent calls the replica (a set: `NAME=PATH,…`), so the registration is its.
    let shown = if group {
        manifest
            .devices
            .iter()
            .zip(&images)
            .map(|(d, p)| format!("{}={}", d.name, p.display()))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        replica.display().to_string()
    };
    report(&plan, &shown, group);

    // The request first: should the registration fail, a request alone only re-journals
    // regions (harmless); a registration without its request would never be vouched for.
    let now = SystemClock.now_ns();
    if !plan.regions.is_empty() {
        let fork = plan.fork.as_ref().map_or(
            Predecessor {
                epoch: 0,
                lsn: plan.start_lsn,
            },
            |f| f.point,
        );
        resync_request::create(
            journal.as_ref(),
            &ResyncRequest::new(&r.name, &plan.regions, fork, now),
        )
        .await?;
    }
    // Registered at the fork, seeded `checking` over exactly the diverged regions.
    let initial = plan.consumer(&r.name, &shown, r.delay.as_nanos() as u64, now);
    let registered = consumer::register(journal.as_ref(), &initial).await?;
    // A `journal trim` that listed the consumers before this registration may have moved
    // the pointer past the start: undo the registration and say so.
    let again = consumer::load_trim_pointer(journal.as_ref()).await?;
    if registered != initial || again.first_seq > plan.start_seq {
        if registered == initial {
            consumer::unregister(journal.as_ref(), &r.name).await?;
        }
        resync_request::delete(journal.as_ref(), &r.name).await?;
        anyhow::bail!(
            "rejoin refused: {}; nothing is registered",
            if registered != initial {
                format!(
                    "consumer {} was registered by someone else meanwhile",
                    r.name
                )
            } else {
                format!(
                    "a `journal trim` moved past the fork (seq {}) while registering",
                    plan.start_seq
                )
            }
        );
    }
    if !plan.regions.is_empty() {
        say(format!(
            "tinylag rejoin: asked the writer for {} regions ({}) at {}",
            plan.regions.count(),
            plan.regions,
            tinylag::journal::paths::resync_request_key(&r.name)
        ));
    }
    // The image follows the chain from here: a clean-stop marker of its old epoch must not
    // make a later `serve` on it look clean.
    let _ = tinylag::writer::take_clean_marker(&marker);
    replay::run(args.replay).await
}

/// Prints what the rejoin found and will move, before it moves anything (stdout: the one
/// line a script reads, `bytes=` first).
fn report(plan: &RejoinPlan, replica: &str, group: bool) {
    if let (Some(image), Some(fork)) = (&plan.image, &plan.fork) {
        say(format!(
            "tinylag rejoin: {} owned writer epoch {} (from {}); the chain forked after LSN {} of epoch {}, continued by epoch {} ({}{})",
            replica,
            image.owned,
            image.source.name(),
            fork.point.lsn,
            fork.point.epoch,
            fork.successor.epoch,
            fork.successor.reason.name(),
            if fork.successor.host.is_empty() {
                String::new()
            } else {
                format!(" on {}", fork.successor.host)
            }
        ));
        say(format!(
            "tinylag rejoin: diverged: {} regions unjournaled in its activity log, {} regions of its {} records after the fork ({} written, from {} segment indexes)",
            image.unjournaled.count(),
            plan.records.regions.count(),
            plan.records.records,
            format_size(plan.records.bytes),
            plan.records.segments_read
        ));
    }
    let pct = if plan.device_size > 0 {
        100.0 * plan.bytes as f64 / plan.device_size as f64
    } else {
        0.0
    };
    tell(format!(
        "tinylag rejoin: will move {} ({} bytes, {} regions{}) of the {} {} ({pct:.1}%), then follow the chain from seq {} (LSN {})",
        format_size(plan.bytes),
        plan.bytes,
        plan.regions.count(),
        if plan.full { ", --full" } else { "" },
        if group { "set's" } else { "device's" },
        format_size(plan.device_size),
        plan.start_seq,
        plan.start_lsn + 1
    ));
}
