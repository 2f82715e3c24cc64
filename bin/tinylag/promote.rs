//! `tinylag promote`: a replica becomes the primary (DESIGN.md, "Failover and failback").
//! Run where the replica is, with `serve`'s flags (`--replica` stands for `--primary`):
//!
//! - plain: the current epoch must end with its `DEMOTE` and its lease be released; the
//!   replica's consumer is caught up through the `DEMOTE` (the `replay --once` path), the
//!   next epoch is claimed exactly (of two racing promotes one wins), and `serve` runs
//!   in-process on the replica, starting in `logging`: zero bytes resynced.
//! - `--force`: no `DEMOTE` or lease needed (the old primary is gone): everything durable is
//!   applied (a hole stops it, with the hole's error), the next epoch is claimed (fencing the
//!   old owner), whatever the writer's plan then shows durable past what was applied is
//!   applied too, and serving starts clean.
//!
//! The core's start asks the replica's catch-up ([`tinylag::writer::CatchUp`]) to hold the
//! journal exactly through the planned end: that, not a clean-stop marker, is what lets the
//! promoted writer start in `logging` (a forced promote's plan has plugs, which a marker
//! cannot vouch for). The consumer entry of `--name` is removed once serving.
//!
//! A consistency group is promoted as a unit: `--replica NAME=PATH` per device; the one agent
//! catches the whole set up to one LSN, one epoch is claimed, and `serve` runs on the set (one
//! export per device); `--at|--mark` winds the whole set back to the one point.
//!
//! - `--at TIME|--mark NAME` (`promote_at.rs`): a past point X becomes the new chain's
//!   start: the replica is wound back to X through its undo log, the old epoch's records
//!   after X are kept as a branch, and the claim commits to the fork X.
//! - `--replica s3://… --image PATH` (`promote_obj.rs`): an object replica's image is
//!   written onto a local file or block device first, which then becomes the primary.
//!
//! Must never: claim an epoch other than the one after the epoch it checked; start serving
//! a replica that does not hold the journal through the planned end; change anything when
//! it refuses (a refused plain promote has applied records at most, as its agent would).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, FromArgMatches};
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::epoch::{self, ClaimBasis, EpochReason};
use tinylag::journal::{consumer, lease, Manifest, RecordKind};
use tinylag::replayer::Outcome;
use tinylag::store::{open_store, ObjectStore};
use tinylag::writer::{CatchUp, Promotion};
use tokio::sync::{watch, Mutex};

use crate::cmd::output::tell;
use crate::cmd::replay::{self, ReplayArgs};
use crate::cmd::serve::{self, PromoteStart, ServeArgs};

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The consumer name the replica's agent replays as; its entry ends once serving. (With
    /// an object replica, only the new primary's site name: its consumer stays.)
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The old primary is gone (or will be fenced): promote without its DEMOTE or a
    /// released lease. What it never uploaded is not on the new chain.
    #[arg(long)]
    pub force: bool,
    /// Promote the replica as of the last record at or before TIME (RFC 3339, @unix, "10m
    /// ago"), wound back through its undo log: the old primary's later records become a
    /// branch (kept, listed by `timeline`, readable with `restore --branch`).
    #[arg(long, value_name = "TIME", value_parser = crate::cmd::args::parse_time, conflicts_with = "mark")]
    pub at: Option<u64>,
    /// Promote the replica as of a mark (see `tinylag timeline`), as --at does.
    #[arg(long, value_name = "NAME")]
    pub mark: Option<String>,
    /// The name of the branch --at/--mark leaves (default: before-e<the new epoch>).
    #[arg(long, value_name = "NAME")]
    pub branch_name: Option<String>,
    /// With an object replica (--replica s3://…): the local file or block device its image
    /// is written onto first (sparse; a new or empty file, or a block device not in use),
    /// which then becomes the primary. The object replica stays a replica of the chain.
    #[arg(long, value_name = "PATH")]
    pub image: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The replica's agent, run as `replay --once` up to the journal's current end.
pub(crate) struct ReplicaCatchUp {
    pub(crate) args: ReplayArgs,
    pub(crate) journal: Arc<dyn ObjectStore>,
    /// The last LSN the replica holds, as far as this promote knows.
    pub(crate) applied: Arc<Mutex<u64>>,
}

impl ReplicaCatchUp {
    /// Runs the agent once: applies what is durable now; returns the applied LSN.
    pub(crate) async fn run_once(&self) -> anyhow::Result<u64> {
        let opened = replay::open(&self.args, self.journal.clone(), false)
            .await
            .with_context(|| {
                format!(
                    "cannot open the replica {} as consumer {} (is its replay agent still \
                     running? stop it first)",
                    self.args.first_replica().display(),
                    self.args.name
                )
            })?;
        let board = opened.agent.board();
        let (_tx, rx) = watch::channel(false);
        let outcome = opened.agent.run(rx).await?;
        let applied = board.snapshot().await.applied_lsn;
        if !matches!(outcome, Outcome::CaughtUp) {
            bail!("the replica's agent stopped before the journal's end ({outcome:?})");
        }
        *self.applied.lock().await = applied;
        Ok(applied)
    }
}

#[async_trait::async_trait]
impl CatchUp for ReplicaCatchUp {
    async fn through(&self, last_lsn: u64) -> Result<u64, String> {
        let applied = *self.applied.lock().await;
        if applied >= last_lsn {
            return Ok(applied);
        }
        tracing::info!(
            applied,
            last_lsn,
            "the journal moved past what the replica holds before the claim: applying the rest"
        );
        self.run_once().await.map_err(|e| format!("{e:#}"))
    }
}

/// `replay --once` arguments for the replica, parsed as `replay` parses them (every default
/// the agent has).
pub(crate) fn replay_args(args: &PromoteArgs) -> anyhow::Result<ReplayArgs> {
    let Some(journal) = &args.serve.journal else {
        bail!("promote needs --journal");
    };
    let mut argv: Vec<String> = vec!["--journal".into(), journal.to_string()];
    // A group's replica set: one `--replica NAME=PATH` per device, as promote was given them
    // (the agent checks them against the journal's devices, as `replay` does).
    for replica in &args.serve.primary {
        argv.push("--replica".into());
        argv.push(match &replica.name {
            Some(name) => format!("{name}={}", replica.path.display()),
            None => replica.path.display().to_string(),
        });
    }
    argv.extend([
        "--name".into(),
        args.name.clone(),
        "--once".into(),
        "--commit-every".into(),
        "0s".into(),
    ]);
    let s3 = &args.serve.s3;
    if let Some(e) = &s3.s3_endpoint {
        argv.extend(["--s3-endpoint".into(), e.clone()]);
    }
    if let Some(r) = &s3.s3_region {
        argv.extend(["--s3-region".into(), r.clone()]);
    }
    if s3.s3_path_style {
        argv.push("--s3-path-style".into());
    }
    let command =
        <ReplayArgs as Args>::augment_args(clap::Command::new("replay")).no_binary_name(true);
    let matches = command.try_get_matches_from(argv)?;
    Ok(ReplayArgs::from_arg_matches(&matches)?)
}

/// The epoch's `DEMOTE`, if its last durable record is one: (LSN, seq).
async fn demote_at_end(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    epoch: u64,
) -> anyhow::Result<Option<(u64, u64)>> {
    let (_, plan) = tinylag::journal::plan_restart_from_trim_pointer(store, manifest).await?;
    if plan.next_seq == 0 || plan.last_orphan.is_some() {
        return Ok(None);
    }
    let seq = plan.next_seq - 1;
    let index = tinylag::journal::prefix_index(store, manifest, seq).await?;
    Ok(index
        .entries
        .last()
        .and_then(|e| (e.kind == RecordKind::Demote && e.offset == epoch).then_some((e.lsn, seq))))
}

pub async fn run(args: PromoteArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.serve.takeover || args.serve.no_journal {
        bail!("promote takes neither --takeover (use --force) nor --no-journal");
    }
    let Some(uri) = &args.serve.journal else {
        bail!("promote needs --journal");
    };
    // An object replica is promoted onto the local image --image names; a file replica in
    // place. Checked before anything is opened.
    let object = crate::cmd::objrep::object_replica(&args.serve.primary)?;
    match (&object, &args.image) {
        (None, Some(_)) => {
            return Err(crate::cmd::args::usage(
                "--image is for an object replica (--replica s3://…); a file replica is \
                 promoted in place",
            ))
        }
        (Some(replica), None) => {
            return Err(crate::cmd::args::usage(format!(
                "--replica {replica} is an object replica: name the local file or block device \
                 its image is written onto, which becomes the primary, with --image PATH"
            )))
        }
        _ => {}
    }
    let store = open_store(uri, &args.serve.s3.options()).await?;
    let manifest = Manifest::load(store.as_ref()).await?;
    let Some(current) = epoch::current_epoch(store.as_ref()).await? else {
        bail!(
            "journal {} has had no writer yet: there is nothing to promote from; start \
             `tinylag serve` instead",
            store.describe()
        );
    };
    if args.at.is_some() || args.mark.is_some() {
        if let Some(replica) = object {
            return crate::cmd::promote_obj::run(
                args, replica, store, manifest, current, None, started,
            )
            .await;
        }
        return crate::cmd::promote_at::run(args, store, manifest, current, started).await;
    }
    if args.branch_name.is_some() {
        return Err(crate::cmd::args::usage(
            "--branch-name needs --at or --mark",
        ));
    }
    let demote = if args.force {
        None
    } else {
        match lease::read(store.as_ref(), current).await? {
            Some(l) if l.released => {}
            Some(l) => bail!(
                "the primary of epoch {current} (pid {} on {}) has not released its lease: it is \
                 live or died without a demote; nothing changed. Run `tinylag demote --control \
                 <its control socket>` there, or `tinylag promote --force` if it is gone{}",
                l.pid,
                l.host,
                if l.is_live(SystemClock.now_ns()) {
                    " (it is live now)"
                } else {
                    ""
                }
            ),
            None => bail!(
                "epoch {current} has no lease (its writer never started journaling); nothing \
                 changed; use --force"
            ),
        }
        match demote_at_end(store.as_ref(), &manifest, current).await? {
            Some(d) => Some(d),
            None => bail!(
                "epoch {current} does not end with a DEMOTE record (its primary stopped without \
                 `tinylag demote`); nothing changed; use --force to promote what is durable"
            ),
        }
    };
    if let Some(replica) = object {
        return crate::cmd::promote_obj::run(
            args, replica, store, manifest, current, demote, started,
        )
        .await;
    }
    let catch_up = Arc::new(ReplicaCatchUp {
        args: replay_args(&args)?,
        journal: store.clone(),
        applied: Arc::new(Mutex::new(0)),
    });
    let applied = catch_up.run_once().await?;
    if let Some((lsn, _)) = demote {
        if applied != lsn {
            bail!(
                "the replica reached LSN {applied}, not the DEMOTE at LSN {lsn}; nothing was \
                 claimed"
            );
        }
    }
    let caught_up = started.elapsed();
    let reason = if args.force {
        EpochReason::PromoteForce
    } else {
        EpochReason::Promote
    };
    let core_catch_up: Arc<dyn CatchUp> = catch_up.clone();
    start_serving(
        args,
        store,
        current,
        ClaimBasis {
            reason,
            owner: String::new(),
            fork: None,
        },
        catch_up.applied.clone(),
        core_catch_up,
        Promoted::FileReplica,
        (started, caught_up),
    )
    .await
}

/// What became of the replica that was promoted, once serving.
pub(crate) enum Promoted {
    /// The replica's image is the primary now: its consumer entry ends and its undo log (which
    /// can no longer wind a primary back) is moved aside.
    FileReplica,
    /// An object replica (its address) whose image was copied out: it stays a replica of the
    /// chain, its consumer registered (its agent follows the new primary).
    ObjectReplica(String),
}

/// Starts `serve` on the replica as the primary of epoch `current + 1`, claimed with
/// `claim` (its owner is `--name`); once serving, the replica is dealt with as `promoted`
/// says. `applied` is the LSN reported; `core_catch_up` is what the core asks to hold the
/// journal through its planned end.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_serving(
    args: PromoteArgs,
    store: Arc<dyn ObjectStore>,
    current: u64,
    mut claim: ClaimBasis,
    applied: Arc<Mutex<u64>>,
    core_catch_up: Arc<dyn CatchUp>,
    promoted: Promoted,
    (started, caught_up): (Instant, std::time::Duration),
) -> anyhow::Result<()> {
    let reason = claim.reason;
    claim.owner = args.name.clone();
    let name = args.name.clone();
    let replica = args.serve.first_primary().to_path_buf();
    let hook_store = store.clone();
    let serving: serve::ServingHook = Box::new(move |core| {
        Box::pin(async move {
            let lsn = *applied.lock().await;
            let epoch = core.epoch().unwrap_or(0);
            let report = |ended: &str| {
                format!(
                    "promoted at LSN {lsn}: epoch {epoch} ({}) serving after {:.2}s (replica \
                     caught up in {:.2}s); {ended}",
                    reason.name(),
                    started.elapsed().as_secs_f64(),
                    caught_up.as_secs_f64(),
                )
            };
            if let Promoted::ObjectReplica(uri) = &promoted {
                tell(report(&format!(
                    "object replica {uri} stays a replica of the chain (its agent follows \
                     epoch {epoch})"
                )));
                return;
            }
            match consumer::unregister(hook_store.as_ref(), &name).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    consumer = %name,
                    "promoted, but the consumer entry could not be removed; drop it with \
                     `tinylag journal trim --drop-consumer`"
                ),
            }
            // The ended consumer's undo log describes an image that is now a primary: it
            // cannot wind it back any more, and a later agent on this image (the way back)
            // would refuse it. Kept aside, not deleted.
            let undo = {
                let mut p = replica.as_os_str().to_owned();
                p.push(".undo");
                std::path::PathBuf::from(p)
            };
            if undo.is_dir() {
                let mut aside = undo.as_os_str().to_owned();
                aside.push(format!(".promoted-e{}", core.epoch().unwrap_or(0)));
                match std::fs::rename(&undo, &aside) {
                    Ok(()) => tell(format!(
                        "the ended consumer's undo log was moved aside to {}",
                        std::path::Path::new(&aside).display()
                    )),
                    Err(e) => tracing::warn!(error = %e, "cannot move the undo log aside"),
                }
            }
            tell(report(&format!("consumer {name} ended")));
        })
    });
    let promote = PromoteStart {
        claim,
        promotion: Promotion {
            epoch: current + 1,
            catch_up: core_catch_up,
        },
        serving,
    };
    serve::run_promoted(args.serve, promote).await
}
