//! `tinylag promote --replica s3://… --image PATH`: failover from an object replica
//! (DESIGN.md, "Failover from an object replica"). There is no replica disk to promote, so
//! the image is materialised first onto the local file or block device `--image` names
//! (sparse, one layer at a time: `objrep::materialize`), then promote goes on as for a file
//! replica: the next epoch is claimed and `serve` runs on that image.
//!
//! The point: plain, the epoch's `DEMOTE` (checked after the image is written: it must be
//! exactly there); `--force`, everything the journal holds (the newest checkpoint and the
//! journal's records after it, as a file replica's agent would have applied them), and what
//! the writer's plan then shows durable past it is applied too (the core's catch-up);
//! `--at|--mark`, that point on the chain, with the old epoch's later records named as a
//! branch before the claim, as `promote_at.rs` does.
//!
//! The object replica is read only: its consumer stays registered, so its agent (wherever it
//! runs) follows the new primary from its last checkpoint — no standby disk either way.
//!
//! Must never: write to the object replica; claim before the image is whole and durable at
//! its path; leave a partial image under `--image`'s name (a kill -9 leaves at most
//! `<image>.materializing`, which a rerun replaces).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use tinylag::clock::format_ns;
use tinylag::journal::chain;
use tinylag::journal::epoch::{ClaimBasis, EpochReason, Predecessor};
use tinylag::journal::Manifest;
use tinylag::objrep::{MaterializeTarget, Materialized, ObjPoint, ObjSources};
use tinylag::store::{open_store, ObjectStore, StoreUri};
use tinylag::writer::CatchUp;
use tokio::sync::Mutex;

use crate::cmd::args::NamedPath;
use crate::cmd::output::tell;
use crate::cmd::promote::{start_serving, PromoteArgs, Promoted};
use crate::cmd::promote_at::{check_fork, name_branch, AtFork};

/// The core's catch-up on a materialised image: the journal's records after it, through the
/// planned end, applied onto it.
struct ImageCatchUp {
    sources: ObjSources,
    image: Mutex<Materialized>,
    applied: Arc<Mutex<u64>>,
}

#[async_trait::async_trait]
impl CatchUp for ImageCatchUp {
    async fn through(&self, last_lsn: u64) -> Result<u64, String> {
        let mut image = self.image.lock().await;
        let lsn = self
            .sources
            .extend_materialized(&mut image, last_lsn)
            .await
            .map_err(|e| format!("{e:#}"))?;
        *self.applied.lock().await = lsn;
        Ok(lsn)
    }
}

/// Promotes object replica `replica` onto `--image`. `demote` is the epoch's `DEMOTE`
/// (LSN, seq) for a plain promote, `None` with `--force` or `--at|--mark`; the lease and
/// `DEMOTE` checks of a plain or forced promote were made by the caller.
pub async fn run(
    mut args: PromoteArgs,
    replica: StoreUri,
    store: Arc<dyn ObjectStore>,
    manifest: Manifest,
    current: u64,
    demote: Option<(u64, u64)>,
    started: Instant,
) -> anyhow::Result<()> {
    let Some(image_path) = args.image.clone() else {
        bail!("--image PATH names where the object replica's image is written");
    };
    if manifest.devices.len() > 1 {
        bail!(
            "journal {} is a group of {} devices; an object replica is of one device (a \
             group is promoted from file replicas: --replica NAME=PATH per device); nothing \
             changed",
            store.describe(),
            manifest.devices.len()
        );
    }
    let fork_point = match (&args.at, &args.mark) {
        (Some(t), _) => Some(ObjPoint::Time(*t)),
        (None, Some(m)) => Some(ObjPoint::Mark(m.clone())),
        (None, None) => None,
    };
    let branch = match fork_point {
        Some(_) => Some(check_fork(&args, store.as_ref(), current).await?),
        None => None,
    };
    let replica_store = open_store(&replica, &args.serve.s3.options()).await?;
    let sources = ObjSources::open(store.clone(), replica_store)
        .await
        .with_context(|| format!("cannot open object replica {replica}"))?;
    let target = MaterializeTarget::check(&image_path, sources.identity.size)?;
    let point = fork_point.clone().unwrap_or(ObjPoint::End);

    tell(format!(
        "materialising object replica {} onto {} ...",
        sources.replica.describe(),
        image_path.display()
    ));
    let materialising = Instant::now();
    let image = sources
        .materialize(&point, target)
        .await
        .with_context(|| format!("materialise object replica {replica}"))?;
    let took = materialising.elapsed();
    let r = image.report().clone();
    tell(format!(
        "materialised {} as of LSN {} ({}) in {:.2}s: checkpoint LSN {} ({} layers{}, {} \
         bytes) and {} journal records",
        image_path.display(),
        r.lsn,
        format_ns(r.timestamp_ns),
        took.as_secs_f64(),
        r.checkpoint_lsn,
        r.layers,
        r.image_lsn
            .map(|l| format!(" over the image at LSN {l}"))
            .unwrap_or_default(),
        r.layer_bytes,
        r.journal_records
    ));
    // Refusals past this point remove the image again: nothing is left changed.
    let undo_image = |why: String| -> anyhow::Error {
        if matches!(image.target, MaterializeTarget::File(_)) {
            let _ = std::fs::remove_file(&image_path);
        }
        anyhow::anyhow!("{why}; nothing was claimed")
    };
    if let Some((lsn, _)) = demote {
        if r.lsn != lsn {
            return Err(undo_image(format!(
                "the object replica's image reached LSN {}, not the DEMOTE at LSN {lsn}",
                r.lsn
            )));
        }
    }
    // The new primary is the image.
    args.serve.primary = vec![NamedPath {
        name: None,
        path: image_path.clone(),
    }];
    let applied = Arc::new(Mutex::new(r.lsn));
    let promoted = Promoted::ObjectReplica(sources.replica.describe());
    let caught_up = started.elapsed();
    let Some(branch) = branch else {
        let reason = if args.force {
            EpochReason::PromoteForce
        } else {
            EpochReason::Promote
        };
        let catch_up = Arc::new(ImageCatchUp {
            sources,
            image: Mutex::new(image),
            applied: applied.clone(),
        });
        return start_serving(
            args,
            store,
            current,
            ClaimBasis {
                reason,
                owner: String::new(),
                fork: None,
            },
            applied,
            catch_up,
            promoted,
            (started, caught_up),
        )
        .await;
    };

    // --at|--mark: the fork must be a point of the chain (as time travel refuses a mark on a
    // branch), and the old epoch's records after it become a branch before the claim.
    let chain = chain::load(store.as_ref()).await?;
    if r.lsn > 0 && !chain.lineage().contains(r.lsn) {
        return Err(undo_image(format!(
            "LSN {} is not on the current chain (it is on a branch): promote forks only from \
             a point of the chain",
            r.lsn
        )));
    }
    let fork_epoch = chain.epoch_of(r.lsn).unwrap_or(current);
    name_branch(
        &store,
        &manifest,
        &branch,
        current + 1,
        r.lsn,
        image.next_seq(),
    )
    .await?;
    start_serving(
        args,
        store,
        current,
        ClaimBasis {
            reason: EpochReason::PromoteAt,
            owner: String::new(),
            fork: Some(Predecessor {
                epoch: fork_epoch,
                lsn: r.lsn,
            }),
        },
        applied,
        Arc::new(AtFork { fork: r.lsn }),
        promoted,
        (started, caught_up),
    )
    .await
}
