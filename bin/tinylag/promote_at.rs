//! `tinylag promote --at TIME|--mark NAME`: a past point X of the chain (before a
//! ransomware or an operator's error) becomes the new chain's start (DESIGN.md, "Failover
//! and failback").
//!
//! In this order, each step safe to repeat after a crash: the replica's agent applies what
//! is durable (as plain promote); X is resolved on the replica's lineage as time travel
//! resolves it (a mark's LSN, or the last record at or before TIME; never inside a resync
//! span); the replica is wound back to X through its undo log (`Agent::wind_back_to`: its
//! position is committed at X); the old epoch's records after X become a branch
//! (`branches/<name>`, before the claim, so trim keeps them from then on); the next epoch is
//! claimed with the fork X, and `serve` starts on the replica as plain promote does.
//!
//! A group is promoted at X as one set (`--replica NAME=PATH` per device): X is resolved
//! and the set wound back by its one agent and undo log, so every device starts the new
//! chain at the same LSN.
//!
//! Liveness: like `--force`, it needs no `DEMOTE`; without `--force` the old primary's lease
//! must be released (a live primary would keep writing to what becomes the branch).
//!
//! Must never: claim before the replica is back at X; fork from a point off the chain or
//! inside a resync span; drop a record of the old epoch after X without naming it in the
//! branch (records a live old primary uploads after the branch was named are past its end
//! and off the chain too, see the report).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::chain::{self, Branch};
use tinylag::journal::epoch::{ClaimBasis, EpochReason, Predecessor};
use tinylag::journal::{lease, Manifest};
use tinylag::store::LocalStore;
use tinylag::store::{open_store, ObjectStore};
use tinylag::timetravel::restore;
use tinylag::timetravel::{Sources, Target};
use tinylag::writer::CatchUp;
use tokio::sync::Mutex;

use crate::cmd::output::tell;
use crate::cmd::promote::{replay_args, start_serving, PromoteArgs, Promoted, ReplicaCatchUp};
use crate::cmd::replay;

/// The catch-up the core asks once it has planned: the replica holds the new chain through
/// any end at or past the fork, because every record after the fork up to the new epoch's
/// first is off the chain (the claim committed to that).
pub(crate) struct AtFork {
    pub(crate) fork: u64,
}

#[async_trait::async_trait]
impl CatchUp for AtFork {
    async fn through(&self, last_lsn: u64) -> Result<u64, String> {
        if last_lsn < self.fork {
            return Err(format!(
                "the journal ends at LSN {last_lsn}, before the fork at LSN {}",
                self.fork
            ));
        }
        Ok(last_lsn)
    }
}

pub async fn run(
    args: PromoteArgs,
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    current: u64,
    started: Instant,
) -> anyhow::Result<()> {
    let name = check_fork(&args, store.as_ref(), current).await?;
    let new_epoch = current + 1;
    let catch_up = Arc::new(ReplicaCatchUp {
        args: replay_args(&args)?,
        journal: store.clone(),
        applied: Arc::new(Mutex::new(0)),
    });
    catch_up.run_once().await?;

    // The point, resolved on the replica's lineage as `restore` resolves it.
    let replica = std::path::absolute(args.serve.first_primary())?;
    let undo: Arc<dyn ObjectStore> = match &catch_up.args.undo {
        Some(uri) => open_store(uri, &args.serve.s3.options()).await?,
        None => {
            let mut p = replica.as_os_str().to_owned();
            p.push(".undo");
            Arc::new(LocalStore::new(std::path::PathBuf::from(p)))
        }
    };
    // Each device's image by its name (a group's set; one device's image is unnamed or named).
    let given: Vec<(Option<String>, std::path::PathBuf)> = args
        .serve
        .primary
        .iter()
        .map(|p| (p.name.clone(), p.path.clone()))
        .collect();
    let sources = Sources::open(store.clone(), &given, Some(&args.name), undo).await?;
    let window = sources.window().await?;
    let target = match (&args.at, &args.mark) {
        (Some(t), _) => Target::Time(*t),
        (None, Some(m)) => Target::Mark(m.clone()),
        (None, None) => unreachable!("run only with --at or --mark"),
    };
    let point = sources
        .resolve(&target, &window, SystemClock.now_ns())
        .await?;
    // Refuses a point inside a resync span, or beyond the undo log's reach.
    restore::plan(&sources, &window, point).await?;
    let fork_epoch = sources.chain.epoch_of(point.lsn).unwrap_or(current);
    drop(sources);

    // The replica back at X.
    let mut opened = replay::open(&catch_up.args, store.clone(), false)
        .await
        .context("cannot open the replica to wind it back")?;
    let wound = opened
        .agent
        .wind_back_to(point.lsn, point.timestamp_ns)
        .await?;
    let resume_seq = opened.agent.position().next_seq;
    drop(opened);
    *catch_up.applied.lock().await = point.lsn;
    tell(format!(
        "wound the replica back from LSN {} to {}: {} records undone",
        wound.from_lsn,
        point.describe(),
        wound.undone_records
    ));

    // The old epoch's records after X: a branch, named before the claim.
    name_branch(&store, &manifest, &name, new_epoch, point.lsn, resume_seq).await?;
    let caught_up = started.elapsed();
    start_serving(
        args,
        store,
        current,
        ClaimBasis {
            reason: EpochReason::PromoteAt,
            owner: String::new(),
            fork: Some(Predecessor {
                epoch: fork_epoch,
                lsn: point.lsn,
            }),
        },
        catch_up.applied.clone(),
        Arc::new(AtFork { fork: point.lsn }),
        Promoted::FileReplica,
        (started, caught_up),
    )
    .await
}

/// The checks of `--at|--mark` before anything changes: without `--force` the old primary's
/// lease must be released (a live one would keep writing to what becomes the branch), and
/// the branch name must be free. Returns the branch's name.
pub(crate) async fn check_fork(
    args: &PromoteArgs,
    store: &dyn ObjectStore,
    current: u64,
) -> anyhow::Result<String> {
    if !args.force {
        match lease::read(store, current).await? {
            Some(l) if l.released => {}
            Some(l) => bail!(
                "the primary of epoch {current} (pid {} on {}) has not released its lease; \
                 nothing changed. Demote or stop it first, or add --force to fence it (what it \
                 writes meanwhile is off the new chain)",
                l.pid,
                l.host
            ),
            None => {}
        }
    }
    let name = args
        .branch_name
        .clone()
        .unwrap_or_else(|| format!("before-e{}", current + 1));
    if chain::list_branches(store)
        .await?
        .iter()
        .any(|b| b.name == name)
    {
        bail!("a branch named {name} exists already; nothing changed; choose --branch-name");
    }
    Ok(name)
}

/// Names the old epoch's records after the fork `fork_lsn` (from seq `resume_seq`, the one
/// holding `fork_lsn + 1`, to the journal's end) as branch `name`, before the claim, so trim
/// keeps them from then on. Nothing to name when the journal ends at the fork.
pub(crate) async fn name_branch(
    store: &Arc<dyn ObjectStore>,
    manifest: &Manifest,
    name: &str,
    new_epoch: u64,
    fork_lsn: u64,
    resume_seq: u64,
) -> anyhow::Result<()> {
    let (_, plan) =
        tinylag::journal::plan_restart_from_trim_pointer(store.as_ref(), manifest).await?;
    let end_lsn = plan.next_lsn.saturating_sub(1);
    if end_lsn <= fork_lsn {
        return Ok(());
    }
    let branch = Branch {
        name: name.to_string(),
        forked_by: new_epoch,
        from_lsn: fork_lsn + 1,
        to_lsn: end_lsn,
        first_seq: resume_seq,
        last_seq: plan.next_seq.saturating_sub(1),
        created_at_ns: SystemClock.now_ns(),
    };
    chain::create_branch(store.as_ref(), &branch)
        .await
        .with_context(|| format!("cannot create branch {name}"))?;
    tell(format!(
        "branch {name}: LSNs {}..={end_lsn} (seqs {}..={}) are kept off the chain; \
         `tinylag restore --branch {name}` reads them, `journal trim --drop-branch {name}` \
         lets them go",
        branch.from_lsn, branch.first_seq, branch.last_seq
    ));
    Ok(())
}
