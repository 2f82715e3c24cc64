//! `tinylag journal info`, `inspect`, `verify` and `add-device` (and the dispatch of
//! `journal trim` and `journal unregister`, which live in `trim.rs`).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use tinylag::clock::{format_ns, Clock, SystemClock};
use tinylag::journal::consumer::load_trim_pointer;
use tinylag::journal::JournalReader;
use tinylag::journal::Manifest;
use tinylag::journal::{gather_info, ConsumerLag};
use tinylag::units::{format_duration, format_elapsed, format_size};

use crate::cmd::args::{parse_time, JournalArgs};

#[derive(Debug, Subcommand)]
pub enum JournalCommand {
    /// Manifest, head, live bytes, consumers and their lag.
    Info(InfoArgs),
    /// List records (from the segment indexes; payloads are not read).
    Inspect(InspectArgs),
    /// Read every live segment in full and check every checksum, LSN and epoch (one segment
    /// in memory at a time). Fails naming the first bad object.
    Verify(VerifyArgs),
    /// Delete the segments every consumer has committed and the retention no longer needs.
    Trim(crate::cmd::trim::JournalTrimArgs),
    /// Remove a consumer, so it no longer holds trim back.
    Unregister(crate::cmd::trim::UnregisterArgs),
    /// Add a device to the journal's consistency group, at the next index (existing devices
    /// keep theirs). A running `serve` or `replay` takes it at its next start.
    AddDevice(AddDeviceArgs),
}

#[derive(Debug, Args)]
pub struct AddDeviceArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// The new device's name (its NBD export name).
    #[arg(long)]
    pub name: String,
    /// Its size, e.g. 4G.
    #[arg(long, value_name = "SIZE", value_parser = crate::cmd::args::parse_size, allow_hyphen_values = true)]
    pub size: u64,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Start at segment N (default: the first live segment).
    #[arg(long, value_name = "N")]
    pub from_seq: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Start at segment N (default: the first live segment).
    #[arg(long, value_name = "N", conflicts_with = "from_time")]
    pub seq: Option<u64>,
    /// Start at the first segment holding a record at or after T (RFC 3339, @unix, or "10m ago").
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from_time: Option<u64>,
    /// Stop after this many records.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Print JSON Lines, one record per line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cmd: JournalCommand) -> anyhow::Result<()> {
    match cmd {
        JournalCommand::Info(a) => info(a).await,
        JournalCommand::Inspect(a) => inspect(a).await,
        JournalCommand::Verify(a) => verify(a).await,
        JournalCommand::Trim(a) => crate::cmd::trim::journal_trim(a).await,
        JournalCommand::Unregister(a) => crate::cmd::trim::unregister(a).await,
        JournalCommand::AddDevice(a) => add_device(a).await,
    }
}

async fn add_device(args: AddDeviceArgs) -> anyhow::Result<()> {
    let store = args.journal.open_for_command().await?;
    let spec = tinylag::journal::DeviceSpec {
        name: args.name.clone(),
        size: args.size,
    };
    let manifest = Manifest::add_device(store.as_ref(), spec).await?;
    println!(
        "added device {} ({}) to journal {} as device {}; restart serve and replay with a \
         --primary/--replica {}=PATH for it",
        args.name,
        format_size(args.size),
        store.describe(),
        manifest.devices.len() - 1,
        args.name
    );
    Ok(())
}

async fn info(args: InfoArgs) -> anyhow::Result<()> {
    let store = args.journal.open_for_command().await?;
    let manifest = Manifest::load(store.as_ref()).await?;
    manifest.check_key_for_reading(&store.describe())?;
    let info = gather_info(store.as_ref(), &manifest).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    let m = &info.manifest;
    println!("journal      {}", info.journal);
    println!("uuid         {}", m.uuid);
    for (i, d) in m.devices.iter().enumerate() {
        println!(
            "device {i}     {} ({}, {} bytes)",
            d.name,
            format_size(d.size),
            d.size
        );
    }
    println!(
        "layout       block {} B, region {}, splay {}, segments of {}",
        m.block_size,
        format_size(m.region_size),
        m.splay_width,
        format_size(m.segment_size)
    );
    println!("created      {}", format_ns(m.created_ns));
    println!(
        "writer       {}",
        info.writer_epoch
            .map_or("none yet".to_string(), |e| format!("epoch {e}"))
    );
    let head_time = if info.head.last_timestamp_ns == 0 {
        "-".to_string()
    } else {
        format_ns(info.head.last_timestamp_ns)
    };
    println!(
        "head         seq {}, lsn {}, time {}",
        info.head.next_seq, info.head.last_lsn, head_time
    );
    match (&m.encryption, &info.encryption_key) {
        (Some(e), Some(id)) => println!(
            "encryption   on since init (key {}); the head segment is sealed with key {id}",
            e.since_key
        ),
        (Some(e), None) => println!("encryption   on since init (key {})", e.since_key),
        (None, Some(id)) => println!("encryption   on: the head segment is sealed with key {id}"),
        (None, None) => {}
    }
    println!(
        "live         {} segments from seq {}, {}",
        info.segments,
        info.trim.first_seq,
        format_size(info.bytes)
    );
    for line in info.chain.lines() {
        println!("chain        {line}");
    }
    if info.consumers.is_empty() {
        println!("consumers    none");
    }
    for c in &info.consumers {
        println!(
            "consumer     {}: applied lsn {} at {} (consistent {}), behind: {}, delay {}, undo log {} in {} segments, replica {}",
            c.state.name,
            c.state.applied_lsn,
            if c.state.applied_timestamp_ns == 0 {
                "-".to_string()
            } else {
                format_ns(c.state.applied_timestamp_ns)
            },
            c.state.consistent_lsn,
            behind(c),
            format_duration(Duration::from_nanos(c.state.delay_ns)),
            format_size(c.state.undo.bytes),
            c.state.undo.segments,
            c.state.replica
        );
        if !matches!(
            c.state.seed,
            tinylag::journal::consumer::Seed::Blank | tinylag::journal::consumer::Seed::Unrecorded
        ) {
            println!("  seeded     {}", c.state.seed);
        }
        let v = &c.state.verify;
        if v.checked + v.skipped > 0 {
            println!(
                "  verify     {} regions checked (last LSN {}), {} mismatches ever, {} skipped in resync spans{}",
                v.checked,
                v.last_lsn,
                v.mismatches,
                v.skipped,
                if v.mismatched.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; mismatching now: {}",
                        v.mismatched
                            .iter()
                            .map(|m| format!("{}+{}", m.offset, m.len))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
        }
    }
    Ok(())
}

/// `nothing` or `3 records / 12.0 KiB, oldest written 4.500 s ago`.
fn behind(c: &ConsumerLag) -> String {
    if c.lag_records == 0 {
        return "nothing".into();
    }
    let age = c
        .oldest_unapplied_ns
        .map(|ts| {
            let ago = SystemClock.now_ns().saturating_sub(ts);
            format!(
                ", oldest written {} ago",
                format_elapsed(Duration::from_nanos(ago))
            )
        })
        .unwrap_or_default();
    format!(
        "{} records / {}{age}",
        c.lag_records,
        format_size(c.lag_bytes)
    )
}

/// One line of `inspect --json`.
#[derive(Serialize)]
struct RecordLine {
    seq: u64,
    lsn: u64,
    timestamp_ns: u64,
    time: String,
    kind: &'static str,
    dev: u32,
    offset: u64,
    length: u64,
    stored: u32,
    compressed: bool,
}

async fn inspect(args: InspectArgs) -> anyhow::Result<()> {
    let store = args.journal.open_for_command().await?;
    let manifest = Manifest::load(store.as_ref()).await?;
    manifest.check_key_for_reading(&store.describe())?;
    let trim = load_trim_pointer(store.as_ref()).await?;
    let reader = JournalReader::new(store.clone(), manifest.clone());
    let mut seq = match (args.seq, args.from_time) {
        (Some(s), _) => s.max(trim.first_seq),
        (None, Some(t)) => {
            let end =
                tinylag::journal::probe_end(store.as_ref(), &manifest, trim.first_seq).await?;
            reader.seek_time(trim.first_seq, end, t).await?
        }
        (None, None) => trim.first_seq,
    };
    if args.seq.is_some() && reader.index(seq).await?.is_none() {
        let end = tinylag::journal::probe_end(store.as_ref(), &manifest, trim.first_seq).await?;
        bail!(
            "--seq {seq}: segment {seq} does not exist in {}; the live segments are {}",
            store.describe(),
            if end > trim.first_seq {
                format!("{} to {}", trim.first_seq, end - 1)
            } else {
                "none (the journal is empty)".to_string()
            }
        );
    }
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if !args.json {
        writeln!(
            out,
            "{:>8} {:>12} {:<24} {:<12} {:>3} {:>14} {:>10} {:>10}",
            "SEQ", "LSN", "TIME", "KIND", "DEV", "OFFSET", "LENGTH", "STORED"
        )?;
    }
    'segments: loop {
        let Some(index) = reader.checked_index(seq).await? else {
            // The end, or a hole below the journal's known end: never silently the end.
            out.flush().context("writing to stdout")?;
            tinylag::journal::check_end(store.as_ref(), &manifest, seq).await?;
            break;
        };
        for e in &index.entries {
            if args.from_time.is_some_and(|t| e.timestamp_ns < t) {
                continue;
            }
            if args.limit.is_some_and(|l| printed >= l) {
                break 'segments;
            }
            if args.json {
                let line = RecordLine {
                    seq,
                    lsn: e.lsn,
                    timestamp_ns: e.timestamp_ns,
                    time: format_ns(e.timestamp_ns),
                    kind: e.kind.name(),
                    dev: e.dev,
                    offset: e.offset,
                    length: e.length,
                    stored: e.stored_len,
                    compressed: e.compressed,
                };
                writeln!(out, "{}", serde_json::to_string(&line)?)?;
            } else {
                writeln!(
                    out,
                    "{:>8} {:>12} {:<24} {:<12} {:>3} {:>14} {:>10} {:>10}{}",
                    seq,
                    e.lsn,
                    format_ns(e.timestamp_ns),
                    e.kind.name(),
                    e.dev,
                    e.offset,
                    e.length,
                    e.stored_len,
                    if e.compressed { " z" } else { "" }
                )?;
            }
            printed += 1;
        }
        seq = index.header.next_seq;
    }
    out.flush().context("writing to stdout")?;
    Ok(())
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let store = args.journal.open_for_command().await?;
    let manifest = Manifest::load(store.as_ref()).await?;
    let report =
        tinylag::journal::verify_journal(store.as_ref(), &manifest, args.from_seq, |_| {}).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "journal {}: segments {}..{} verified ({} segments, {} plugs, {} records, LSN {}..={}, \
         {} of payload, last writer epoch {}): every checksum is good",
        report.journal,
        report.from_seq,
        report.next_seq,
        report.segments,
        report.plugs,
        report.records,
        report.first_lsn,
        report.last_lsn,
        format_size(report.payload_bytes),
        report.last_epoch
    );
    if report.sealed_unopened > 0 {
        // Said apart, so "every checksum is good" is never read as "every tag is good".
        println!(
            "{} encrypted segments checked without their key (every CRC, of header, body and \
             index; not their authentication tags): pass --encryption-key to check those too",
            report.sealed_unopened
        );
    }
    Ok(())
}
