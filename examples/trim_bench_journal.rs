//! Journals for `bench/trim.sh`, and its baseline.
//!
//! ```text
//! trim_bench_journal make URI SEGMENTS   a journal of SEGMENTS segments (4 records of 4 KiB
//!                                        each, stamped now) with consumer "bench" committed
//!                                        at the head, so `journal trim --retain 0` deletes
//!                                        all but the newest segment
//! trim_bench_journal baseline URI        the least any tool pays to delete those segments
//!                                        blindly: list `journal/` and delete every key, 1000
//!                                        per request; prints {"seconds","requests","objects"}
//! ```
//!
//! URIs as everywhere (`/dir`, `s3://bucket/prefix`); S3 from the standard AWS environment
//! (`AWS_ENDPOINT_URL`, credentials).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tinylag::journal::consumer::{self, ConsumerState};
use tinylag::journal::paths;
use tinylag::journal::segment::encode_segment;
use tinylag::journal::ManifestParams;
use tinylag::journal::{Manifest, Op, Record};
use tinylag::store::CountingStore;
use tinylag::store::{list_all, open_store, ObjectStore, S3Options, StoreUri};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: trim_bench_journal make URI SEGMENTS | baseline URI";
    let (Some(cmd), Some(uri)) = (args.get(1), args.get(2)) else {
        anyhow::bail!(usage);
    };
    let uri: StoreUri = uri.parse()?;
    let store = open_store(&uri, &S3Options::default()).await?;
    match cmd.as_str() {
        "make" => {
            let segments: u64 = args.get(3).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
            make(store, segments).await
        }
        "baseline" => baseline(store).await,
        _ => anyhow::bail!(usage),
    }
}

async fn make(store: Arc<dyn ObjectStore>, segments: u64) -> anyhow::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let manifest = Manifest::new(
        &ManifestParams {
            device_name: "bench".into(),
            size: 1 << 30,
            block_size: 4096,
            region_size: 4 << 20,
            splay_width: 4,
            segment_size: 8 << 20,
        },
        now,
    )?;
    manifest.create(store.as_ref()).await?;
    const PER: u64 = 4;
    let mut tasks = tokio::task::JoinSet::new();
    for seq in 0..segments {
        let first = 1 + seq * PER;
        let records: Vec<Record> = (0..PER)
            .map(|i| Record {
                lsn: first + i,
                timestamp_ns: now,
                dev: 0,
                op: Op::Write {
                    offset: ((seq * PER + i) % 262_144) * 4096,
                    data: Bytes::from(vec![(seq + i) as u8; 4096]),
                },
            })
            .collect();
        let body = encode_segment(manifest.uuid, 1, seq, first, &records)?;
        let (store, key) = (store.clone(), manifest.segment_key(seq));
        tasks.spawn(async move { store.put_if_absent(&key, body).await });
        while tasks.len() >= 32 {
            tasks.join_next().await.expect("a task")??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let state = ConsumerState {
        name: "bench".into(),
        next_seq: segments,
        applied_lsn: segments * PER,
        applied_timestamp_ns: now,
        consistent_lsn: segments * PER,
        consistent_seq: segments,
        consistent_timestamp_ns: now,
        delay_ns: 0,
        replica: "/bench.img".into(),
        registered_at_ns: now,
        updated_at_ns: now,
        undo: Default::default(),
        verify: Default::default(),
        seed: Default::default(),
        chain_epoch: 0,
    };
    consumer::commit(store.as_ref(), &state).await?;
    Ok(())
}

async fn baseline(store: Arc<dyn ObjectStore>) -> anyhow::Result<()> {
    let counting = CountingStore::new(store);
    let started = Instant::now();
    let keys: Vec<String> = list_all(&counting, paths::JOURNAL_PREFIX)
        .await?
        .into_iter()
        .map(|m| m.key)
        .collect();
    for batch in keys.chunks(1000) {
        counting.delete_many(batch).await?;
    }
    println!(
        "{{\"seconds\": {:.3}, \"requests\": {}, \"objects\": {}}}",
        started.elapsed().as_secs_f64(),
        counting.counts().total(),
        keys.len()
    );
    Ok(())
}
