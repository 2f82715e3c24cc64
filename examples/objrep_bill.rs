//! The object replica's request bill, for `bench/object_replica.sh`: 1 GiB of writes of one
//! pattern journaled as the writer cuts segments (8 MiB), at a paced rate, while a real
//! object replica agent (`tinylag::objrep::ObjectAgent`, default checkpoint interval) follows
//! it; every request to the journal and to the replica store is counted (`CountingStore`,
//! one counted call is one S3 request). Then the agent idle with its timers scaled down by
//! `IDLE_SCALE` (default 60: a minute of running stands for an hour).
//!
//! ```text
//! objrep_bill PATTERN TOTAL RATE      PATTERN: rand4k | seq1m; TOTAL, RATE (per second): sizes
//! objrep_bill idle SECONDS
//! objrep_bill compact TOTAL DEVICE    TOTAL of 4 KiB writes at random blocks of a DEVICE,
//!                                     a checkpoint a segment; then compact and trim
//! objrep_bill journal DIR TOTAL       a journal of TOTAL in 1 MiB writes, in directory DIR
//! ```
//!
//! Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tinylag::journal::consumer;
use tinylag::journal::segment::SegmentBuilder;
use tinylag::journal::JournalReader;
use tinylag::journal::ManifestParams;
use tinylag::journal::{Manifest, Op, Record};
use tinylag::objrep::{ObjectAgent, ObjectAgentConfig};
use tinylag::store::CountingStore;
use tinylag::store::MemoryStore;
use tinylag::store::ObjectStore;
use tinylag::units::parse_size;
use tokio::sync::watch;

#[path = "support/noise.rs"]
mod noise;
use noise::Noise;

const GIB: f64 = (1u64 << 30) as f64;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

struct Stores {
    journal_inner: Arc<dyn ObjectStore>,
    /// The writer's requests (segment uploads).
    writer: Arc<CountingStore>,
    /// The agent's requests to the journal.
    agent_journal: Arc<CountingStore>,
    /// The agent's requests to the replica's store.
    replica: Arc<CountingStore>,
    manifest: Manifest,
}

async fn stores(size: u64) -> anyhow::Result<Stores> {
    let journal_inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let manifest = Manifest::new(
        &ManifestParams {
            device_name: "disk0".into(),
            size,
            block_size: 4096,
            region_size: 4 << 20,
            splay_width: 4,
            segment_size: 8 << 20,
        },
        now_ns(),
    )?;
    manifest.create(journal_inner.as_ref()).await?;
    Ok(Stores {
        writer: Arc::new(CountingStore::new(journal_inner.clone())),
        agent_journal: Arc::new(CountingStore::new(journal_inner.clone())),
        replica: Arc::new(CountingStore::new(Arc::new(MemoryStore::new()))),
        journal_inner,
        manifest,
    })
}

async fn agent(s: &Stores, config: ObjectAgentConfig) -> anyhow::Result<ObjectAgent> {
    Ok(ObjectAgent::open(
        JournalReader::new(s.agent_journal.clone(), s.manifest.clone()),
        s.replica.clone(),
        config,
    )
    .await?)
}

async fn written(pattern: &str, total: u64, rate: u64) -> anyhow::Result<serde_json::Value> {
    let block: u64 = match pattern {
        "rand4k" => 4096,
        "seq1m" => 1 << 20,
        other => anyhow::bail!("unknown pattern {other:?}: use rand4k or seq1m"),
    };
    // The device is the data written: every block once (4 KiB in random order).
    let s = stores(total).await?;
    let mut agent = agent(&s, ObjectAgentConfig::new("bill")).await?;
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(async move { agent.run(stopped).await });

    let blocks = total / block;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut order: Vec<u64> = (0..blocks).collect();
    if pattern == "rand4k" {
        for i in (1..order.len()).rev() {
            let j = (noise.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    let started = Instant::now();
    let (mut seq, mut lsn) = (0u64, 1u64);
    let mut builder = SegmentBuilder::new(s.manifest.uuid, 1, seq, lsn);
    for (i, &b) in order.iter().enumerate() {
        builder.push(&Record {
            lsn,
            timestamp_ns: now_ns(),
            dev: 0,
            op: Op::Write {
                offset: b * block,
                data: noise.bytes(block as usize),
            },
        })?;
        lsn += 1;
        if builder.encoded_len() as u64 >= s.manifest.segment_size || i + 1 == order.len() {
            s.writer
                .put_if_absent(&s.manifest.segment_key(seq), builder.finish())
                .await?;
            seq += 1;
            builder = SegmentBuilder::new(s.manifest.uuid, 1, seq, lsn);
            // Paced: the bytes written so far take this long at `rate`.
            let due = Duration::from_secs_f64((i as u64 + 1) as f64 * block as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    let wrote_for = started.elapsed();
    let end = lsn - 1;
    // The agent commits its last checkpoint when its interval comes round.
    loop {
        let pos = consumer::load(s.journal_inner.as_ref(), "bill").await?;
        if pos.applied_lsn >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let caught_up = started.elapsed();
    let _ = stop.send(true);
    let report = running.await??;
    let gib = total as f64 / GIB;
    let (w, j, r) = (
        s.writer.counts(),
        s.agent_journal.counts(),
        s.replica.counts(),
    );
    let replica_puts = r.put + r.put_if_absent;
    let consumer_puts = j.put + j.put_if_absent;
    let journal_puts = w.put + w.put_if_absent;
    Ok(json!({
        "pattern": pattern,
        "bytes": total,
        "rate_bytes_per_s": rate,
        "written_in_s": wrote_for.as_secs_f64(),
        "checkpointed_in_s": caught_up.as_secs_f64(),
        "journal_segment_puts_per_gib": journal_puts as f64 / gib,
        "replica_puts_per_gib": replica_puts as f64 / gib,
        "replica_plus_position_puts_per_gib": (replica_puts + consumer_puts) as f64 / gib,
        "ratio_to_journal_puts": (replica_puts + consumer_puts) as f64 / journal_puts as f64,
        "replica_gets_per_gib": (r.get + r.get_range + r.get_tail) as f64 / gib,
        "agent_journal_gets_per_gib": (j.get + j.get_range + j.get_tail + j.head) as f64 / gib,
        "replica_lists": r.list,
        "layers": report.layers,
        "checkpoints": report.checkpoints,
        "layer_bytes_per_data_byte": report.layer_bytes as f64 / total as f64,
        "writer": w, "agent_journal": j, "replica": r,
    }))
}

/// Bytes and objects under a store's root.
async fn stored(store: &dyn ObjectStore) -> anyhow::Result<(u64, usize)> {
    let all = tinylag::store::list_all(store, "").await?;
    Ok((all.iter().map(|o| o.size).sum(), all.len()))
}

/// Appends `records` as segments cut at the manifest's size, from `seq`/`lsn`.
async fn append(
    s: &Stores,
    seq: &mut u64,
    lsn: &mut u64,
    records: impl Iterator<Item = Op>,
) -> anyhow::Result<()> {
    let mut builder = SegmentBuilder::new(s.manifest.uuid, 1, *seq, *lsn);
    let mut any = false;
    for op in records {
        builder.push(&Record {
            lsn: *lsn,
            timestamp_ns: now_ns(),
            dev: 0,
            op,
        })?;
        *lsn += 1;
        any = true;
        if builder.encoded_len() as u64 >= s.manifest.segment_size {
            s.writer
                .put_if_absent(&s.manifest.segment_key(*seq), builder.finish())
                .await?;
            *seq += 1;
            builder = SegmentBuilder::new(s.manifest.uuid, 1, *seq, *lsn);
            any = false;
        }
    }
    if any {
        s.writer
            .put_if_absent(&s.manifest.segment_key(*seq), builder.finish())
            .await?;
        *seq += 1;
    }
    Ok(())
}

/// Bytes stored against bytes of live data after compaction and trim: TOTAL of 4 KiB writes
/// at random blocks of a DEVICE (so blocks are rewritten), a checkpoint after each segment.
async fn compacted(total: u64, device: u64) -> anyhow::Result<serde_json::Value> {
    use tinylag::objrep::{compact, trim, CompactConfig, ObjSources, TrimConfig};
    let s = stores(device).await?;
    let blocks = device / 4096;
    let mut noise = Noise(0x51_7cc1_b727_220a);
    let mut live = vec![false; blocks as usize];
    let (mut seq, mut lsn) = (0u64, 1u64);
    let ops: Vec<Op> = (0..total / 4096)
        .map(|_| {
            let b = noise.next() % blocks;
            live[b as usize] = true;
            Op::Write {
                offset: b * 4096,
                data: noise.bytes(4096),
            }
        })
        .collect();
    append(&s, &mut seq, &mut lsn, ops.into_iter()).await?;
    let mut config = ObjectAgentConfig::new("bill");
    config.once = true;
    config.checkpoint_interval = Duration::ZERO;
    agent(&s, config.clone())
        .await?
        .run(watch::channel(false).1)
        .await?;
    let live_bytes = live.iter().filter(|b| **b).count() as u64 * 4096;
    let (before, before_objects) = stored(s.replica.as_ref()).await?;
    let r0 = s.replica.counts();
    let started = Instant::now();
    let open = || ObjSources::open(s.journal_inner.clone(), s.replica.clone());
    let report = compact(&open().await?, &CompactConfig::new()).await?;
    let compact_s = started.elapsed().as_secs_f64();
    let r1 = s.replica.counts();
    let trim_config = TrimConfig {
        retain: Duration::ZERO,
        orphan_grace: Duration::from_secs(3600),
        now_ns: now_ns(),
    };
    let first = trim(&open().await?, &trim_config).await?;
    // What the trim dropped is named by the previous generation until a newer one exists: one
    // more write and checkpoint, then a second trim deletes it.
    append(
        &s,
        &mut seq,
        &mut lsn,
        std::iter::once(Op::Write {
            offset: 0,
            data: noise.bytes(4096),
        }),
    )
    .await?;
    agent(&s, config)
        .await?
        .run(watch::channel(false).1)
        .await?;
    let second = trim(
        &open().await?,
        &TrimConfig {
            now_ns: now_ns(),
            ..trim_config
        },
    )
    .await?;
    let (after, after_objects) = stored(s.replica.as_ref()).await?;
    let c = |a: u64, b: u64| a - b;
    Ok(json!({
        "bytes_written": total,
        "device": device,
        "live_bytes": live_bytes,
        "stored_before": before,
        "objects_before": before_objects,
        "stored_after": after,
        "objects_after": after_objects,
        "stored_before_per_live": before as f64 / live_bytes as f64,
        "stored_after_per_live": after as f64 / live_bytes as f64,
        "compaction": report,
        "compaction_s": compact_s,
        "compaction_puts": c(r1.put + r1.put_if_absent, r0.put + r0.put_if_absent),
        "compaction_gets": c(r1.get + r1.get_range + r1.get_tail, r0.get + r0.get_range + r0.get_tail),
        "trims": [first, second],
    }))
}

/// A journal of `total` bytes of 1 MiB incompressible writes in directory `dir` (for the
/// restore benchmark, which runs the real binary on it).
async fn journal_dir(dir: &str, total: u64) -> anyhow::Result<serde_json::Value> {
    let store: Arc<dyn ObjectStore> = Arc::new(tinylag::store::LocalStore::new(dir));
    let mut s = stores(total).await?;
    s.manifest.create(store.as_ref()).await?;
    s.writer = Arc::new(CountingStore::new(store));
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    let (mut seq, mut lsn) = (0u64, 1u64);
    let ops = (0..total >> 20).map(|i| Op::Write {
        offset: i << 20,
        data: noise.bytes(1 << 20),
    });
    append(&s, &mut seq, &mut lsn, ops).await?;
    Ok(json!({ "dir": dir, "bytes": total, "segments": seq, "last_lsn": lsn - 1 }))
}

async fn idle(seconds: u64) -> anyhow::Result<serde_json::Value> {
    let scale: u32 = std::env::var("IDLE_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let s = stores(64 << 20).await?;
    let mut config = ObjectAgentConfig::new("idle");
    config.idle_poll /= scale;
    config.idle_after /= scale;
    config.idle_commit /= scale;
    config.active_poll /= scale;
    let mut agent = agent(&s, config).await?;
    let (j0, r0) = (s.agent_journal.counts(), s.replica.counts());
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(async move { agent.run(stopped).await });
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let _ = stop.send(true);
    running.await??;
    let (j, r) = (s.agent_journal.counts(), s.replica.counts());
    let per_hour = |n: u64| n as f64 * 3600.0 / (seconds as f64 * scale as f64);
    Ok(json!({
        "seconds": seconds,
        "timer_scale": scale,
        "journal_requests_per_hour": per_hour(j.total() - j0.total()),
        "replica_requests_per_hour": per_hour(r.total() - r0.total()),
        "agent_journal": j, "replica": r,
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let out = match args.as_slice() {
        [_, idle_word, seconds] if idle_word == "idle" => idle(seconds.parse()?).await?,
        [_, word, total, device] if word == "compact" => {
            let total = parse_size(total).map_err(anyhow::Error::msg)?;
            let device = parse_size(device).map_err(anyhow::Error::msg)?;
            compacted(total, device).await?
        }
        [_, word, dir, total] if word == "journal" => {
            journal_dir(dir, parse_size(total).map_err(anyhow::Error::msg)?).await?
        }
        [_, pattern, total, rate] => {
            let total = parse_size(total).map_err(anyhow::Error::msg)?;
            let rate = parse_size(rate).map_err(anyhow::Error::msg)?;
            written(pattern, total, rate).await?
        }
        _ => anyhow::bail!("usage: objrep_bill rand4k|seq1m TOTAL RATE | objrep_bill idle SECONDS"),
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
