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
//! ```
//!
//! Prints one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tinylag::journal::consumer;
use tinylag::journal::reader::JournalReader;
use tinylag::journal::segment::SegmentBuilder;
use tinylag::journal::ManifestParams;
use tinylag::journal::{Manifest, Op, Record};
use tinylag::objrep::{ObjectAgent, ObjectAgentConfig};
use tinylag::store::counting::CountingStore;
use tinylag::store::memory::MemoryStore;
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
