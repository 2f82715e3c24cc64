//! `tinylag journal trim`, `tinylag journal unregister` and `tinylag undo trim`: the cron
//! jobs that keep a journal and an undo log bounded, and the hand tool that removes a
//! consumer.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde::Serialize;
use tinylag::clock::{format_ns, Clock, SystemClock};
use tinylag::journal::{consumer, Manifest};
use tinylag::store::{open_store_for_command, ObjectStore, StoreUri};
use tinylag::store::{CountingStore, RequestCounts};
use tinylag::trim::{trim_journal, trim_undo, JournalTrimOptions, TrimReport, UndoTrimOptions};
use tinylag::units::format_size;

use crate::cmd::args::{parse_store_uri, JournalArgs};
use crate::cmd::output::{tell, warn};

fn parse_duration(s: &str) -> Result<Duration, String> {
    tinylag::units::parse_duration(s)
}

#[derive(Debug, Args)]
pub struct JournalTrimArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Keep every segment holding a record younger than this (0 keeps only what consumers need).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub retain: Duration,
    /// Unregister consumers that have not committed for longer than this (a live agent
    /// commits at least every minute, even when idle; an object replica's agent every 10
    /// minutes).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub drop_consumer_after: Option<Duration>,
    /// Delete branch NAME (records a `promote --at` left off the chain; see `timeline`)
    /// first, so its segments go with this trim (repeatable).
    #[arg(long, value_name = "NAME")]
    pub drop_branch: Vec<String>,
    /// Print what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: crate::cmd::config::ConfigArg,
}

#[derive(Debug, Args)]
pub struct UnregisterArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// The consumer to remove (it no longer holds trim back).
    #[arg(long)]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum UndoCommand {
    /// Delete the undo segments older than the retention (never those crash recovery needs).
    Trim(UndoTrimArgs),
}

#[derive(Debug, Args)]
pub struct UndoTrimArgs {
    /// The undo log: a directory or store URI (the replay agent's --undo, default <replica>.undo).
    #[arg(long, value_name = "DIR|URI", value_parser = parse_store_uri)]
    pub undo: StoreUri,
    /// The journal the undo log's consumer follows (its commit position bounds the trim).
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Keep the undo segments needed to go back this far (the time-travel window).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub retain: Duration,
    /// Print what would be deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub config: crate::cmd::config::ConfigArg,
}

/// `--json` output: the report and the store requests it cost.
#[derive(Serialize)]
struct Output<'a> {
    #[serde(flatten)]
    report: &'a TrimReport,
    requests: RequestCounts,
}

pub async fn journal_trim(args: JournalTrimArgs) -> anyhow::Result<()> {
    let store = Arc::new(CountingStore::new(args.journal.open_for_command().await?));
    let manifest = Manifest::load(store.as_ref()).await?;
    let opts = JournalTrimOptions {
        retain_ns: args.retain.as_nanos() as u64,
        drop_consumer_after_ns: args.drop_consumer_after.map(|d| d.as_nanos() as u64),
        dry_run: args.dry_run,
        now_ns: SystemClock.now_ns(),
        drop_branches: args.drop_branch,
    };
    let report = trim_journal(store.clone(), &manifest, &opts).await?;
    for d in &report.dropped_consumers {
        warn(format!(
            "tinylag: warning: {} consumer {} of {}: silent since {}, at applied LSN {}; its replica can no longer follow this journal",
            if report.dry_run { "would unregister" } else { "unregistered" },
            d.name,
            report.store,
            format_ns(d.updated_at_ns),
            d.applied_lsn
        ));
    }
    print(&report, store.counts(), args.json, "segments")
}

pub async fn undo_trim(args: UndoTrimArgs) -> anyhow::Result<()> {
    let journal = args.journal.open_for_command().await?;
    let undo: Arc<dyn ObjectStore> =
        open_store_for_command(&args.undo, &args.journal.s3.options()).await?;
    let undo = Arc::new(CountingStore::new(undo));
    let opts = UndoTrimOptions {
        retain_ns: args.retain.as_nanos() as u64,
        dry_run: args.dry_run,
        now_ns: SystemClock.now_ns(),
    };
    let report = trim_undo(undo.clone(), journal.as_ref(), &opts).await?;
    print(&report, undo.counts(), args.json, "undo segments")
}

pub async fn unregister(args: UnregisterArgs) -> anyhow::Result<()> {
    let store = args.journal.open_for_command().await?;
    let state = consumer::load(store.as_ref(), &args.name).await?;
    consumer::unregister(store.as_ref(), &args.name).await?;
    println!(
        "unregistered consumer {} of {} (it was at applied LSN {}, last commit {}); it no longer holds trim back",
        state.name,
        store.describe(),
        state.applied_lsn,
        format_ns(state.updated_at_ns)
    );
    Ok(())
}

fn print(
    report: &TrimReport,
    requests: RequestCounts,
    json: bool,
    what: &str,
) -> anyhow::Result<()> {
    if json {
        let out = Output { report, requests };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let verb = if report.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for name in &report.dropped_branches {
        tell(format!(
            "{}: {} branch {name}",
            report.store,
            if report.dry_run {
                "would drop"
            } else {
                "dropped"
            }
        ));
    }
    if report.leftovers > 0 {
        tell(format!(
            "{}: {verb} {} seqs an interrupted trim left below seq {}",
            report.store, report.leftovers, report.before.first_seq
        ));
    }
    if report.deleted_segments == 0 {
        tell(format!("{}: nothing to trim", report.store));
    } else {
        tell(format!(
            "{}: {verb} {} {what} ({}), seqs {}..{}{}",
            report.store,
            report.deleted_segments,
            format_size(report.deleted_bytes),
            report.before.first_seq,
            report.after.first_seq,
            if report.deleted_orphans > 0 {
                format!(
                    ", with {} orphaned seqs behind plugs",
                    report.deleted_orphans
                )
            } else {
                String::new()
            }
        ));
    }
    tell(format!(
        "first live   seq {}, LSN {}{}",
        report.after.first_seq,
        report.after.first_lsn,
        report
            .first_live_timestamp_ns
            .map_or(String::new(), |t| format!(
                ", oldest record {}",
                format_ns(t)
            ))
    ));
    tell(format!("held back by {}", report.held_by.describe()));
    tell(format!(
        "requests     {} ({} index reads, {} deletes, {} writes)",
        requests.total(),
        requests.get_tail + requests.get_range,
        requests.delete_many,
        requests.put + requests.put_if_absent
    ));
    Ok(())
}
