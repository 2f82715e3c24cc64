//! `tinylag mark`, `tinylag verify`, `tinylag resync` and `tinylag demote`: clients of a running `serve`'s
//! control socket (see `tinylag::writer::control_records` for what the daemon does); a mark's
//! freezes and application hooks are in [`crate::cmd::freeze`].

use std::path::PathBuf;

use clap::Args;
use tinylag::control::{self, Request};
use tinylag::units::format_size;
use tinylag::writer::{
    DemoteArgs as DemoteRequest, DemoteDone, MarkArgs as MarkRequest, MarkDone, RegionList,
    ResyncArgs as ResyncRequest, ResyncDone, VerifyArgs as VerifyRequest, VerifyDone,
};

use crate::cmd::args::parse_size;
use crate::cmd::freeze::{self, ConsistencyArgs};
use crate::cmd::serve::default_control_path;

/// Where the daemon answers.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// The `serve` daemon's control socket.
    #[arg(long, value_name = "PATH", required_unless_present = "primary")]
    pub control: Option<PathBuf>,
    /// The daemon's primary; implies the default control socket <PATH>.ctl.
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    pub primary: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ControlArgs {
    fn path(&self) -> PathBuf {
        match (&self.control, &self.primary) {
            (Some(c), _) => c.clone(),
            (None, Some(p)) => default_control_path(p),
            (None, None) => unreachable!("clap requires --control or --primary"),
        }
    }

    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        cmd: &str,
        args: impl serde::Serialize,
    ) -> anyhow::Result<(T, serde_json::Value)> {
        let request = Request {
            cmd: cmd.into(),
            args: serde_json::to_value(args)?,
        };
        let answer = control::request(&self.path(), &request).await?;
        let parsed = serde_json::from_value(answer.clone()).map_err(|e| {
            anyhow::anyhow!(
                "the daemon answered {cmd} with something this tinylag cannot read: {e}"
            )
        })?;
        Ok((parsed, answer))
    }
}

#[derive(Debug, Args)]
pub struct MarkArgs {
    /// The mark's name: 1 to 64 of A-Z a-z 0-9 . _ -, unique in the journal.
    #[arg(value_name = "NAME", value_parser = parse_mark_name)]
    pub name: String,
    #[command(flatten)]
    pub control: ControlArgs,
    #[command(flatten)]
    pub consistency: ConsistencyArgs,
}

fn parse_mark_name(s: &str) -> Result<String, String> {
    tinylag::journal::mark::validate_name(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Regions to verify: `all`, or indexes and ranges like 0,3,8-11 (region size: see
    /// `journal info`).
    #[arg(long, default_value = "all", value_name = "LIST|all", value_parser = parse_regions)]
    pub regions: RegionList,
    /// Read the primary at most this fast (bytes per second, e.g. 200M); 0 = unpaced.
    #[arg(long, default_value = "200M", value_name = "SIZE", value_parser = parse_size)]
    pub rate: u64,
    /// Afterwards re-journal the same regions as a resync span, repairing every replica.
    #[arg(long)]
    pub repair: bool,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// Regions to re-journal from the primary: `all`, or indexes and ranges like 0,3,8-11.
    #[arg(long, value_name = "LIST|all", value_parser = parse_regions)]
    pub regions: RegionList,
    #[command(flatten)]
    pub control: ControlArgs,
}

fn parse_regions(s: &str) -> Result<RegionList, String> {
    s.parse()
}

pub async fn mark(args: MarkArgs) -> anyhow::Result<()> {
    if args.consistency.any() {
        // Before any hook runs or anything is frozen: a daemon that is not there fails now.
        let control = args.control.path();
        std::os::unix::net::UnixStream::connect(&control).map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the serve daemon at {}: {e}; nothing was run or frozen",
                control.display()
            )
        })?;
    }
    let request = args.control.ask(
        "mark",
        MarkRequest {
            name: args.name.clone(),
        },
    );
    let (done, raw): (MarkDone, _) = freeze::around(&args.consistency, request).await?;
    if args.control.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
    } else {
        println!("mark {} at LSN {}, {}", done.name, done.lsn, done.time);
    }
    Ok(())
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let request = VerifyRequest {
        regions: args.regions.to_string(),
        rate: (args.rate > 0).then_some(args.rate),
        repair: args.repair,
    };
    let (done, raw): (VerifyDone, _) = args.control.ask("verify", request).await?;
    if args.control.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    println!(
        "verify journaled for {} regions ({}) as LSN {}..={} in {:.1}s ({}/s); each replay \
         agent compares its replica when it applies them (see its status)",
        done.regions,
        format_size(done.bytes),
        done.first_lsn,
        done.last_lsn,
        done.seconds,
        format_size(done.rate as u64)
    );
    if done.repaired > 0 {
        println!("{} regions marked for a resync", done.repaired);
    }
    Ok(())
}

pub async fn resync(args: ResyncArgs) -> anyhow::Result<()> {
    let request = ResyncRequest {
        regions: args.regions.to_string(),
    };
    let (done, raw): (ResyncDone, _) = args.control.ask("resync", request).await?;
    if args.control.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    println!(
        "{} regions ({}) marked for a resync; {} dirty regions, mode {}",
        done.regions,
        format_size(done.bytes),
        done.dirty_regions,
        done.mode
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct DemoteArgs {
    /// How long to wait for a pending resync to drain before giving up (nothing demoted).
    #[arg(long, default_value = "60s", value_name = "DURATION", value_parser = crate::cmd::args::parse_duration)]
    pub resync_timeout: std::time::Duration,
    #[command(flatten)]
    pub control: ControlArgs,
}

pub async fn demote(args: DemoteArgs) -> anyhow::Result<()> {
    let request = DemoteRequest {
        resync_timeout_s: Some(args.resync_timeout.as_secs().max(1)),
    };
    let (done, raw): (DemoteDone, _) = args.control.ask("demote", request).await?;
    if args.control.json {
        println!("{}", serde_json::to_string_pretty(&raw)?);
        return Ok(());
    }
    println!(
        "demoted: epoch {} ends with DEMOTE at LSN {} (seq {}); the primary is exactly the \
         journal through it, writes are refused, the lease is released; promote a replica \
         with `tinylag promote`",
        done.epoch, done.lsn, done.seq
    );
    Ok(())
}
