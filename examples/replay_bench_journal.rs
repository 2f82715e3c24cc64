//! Writes a journal for `bench/replay.sh`: one device, records of one I/O pattern, as the
//! primary daemon would journal them (segments of the manifest's size, timestamps now).
//!
//! ```text
//! replay_bench_journal DIR SIZE PATTERN TOTAL
//!   PATTERN: rand4k (4 KiB writes, every block once, in random order)
//!            seq1m  (1 MiB writes, front to back)
//! ```
//!
//! Payloads are incompressible (like `fio`'s buffers), so the segments store them raw and
//! the benchmark measures applying, not decompressing. With `TINYLAG_BENCH_KEY=FILE` the
//! journal is encrypted with that key file (`bench/encryption.sh`'s replay part).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tinylag::journal::segment::SegmentBuilder;
use tinylag::journal::ManifestParams;
use tinylag::journal::{Manifest, Op, Record};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;
use tinylag::units::parse_size;

#[path = "support/noise.rs"]
mod noise;
use noise::Noise;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, size, pattern, total] = args.as_slice() else {
        anyhow::bail!("usage: replay_bench_journal DIR SIZE rand4k|seq1m TOTAL");
    };
    let size = parse_size(size).map_err(anyhow::Error::msg)?;
    let total = parse_size(total).map_err(anyhow::Error::msg)?;
    let block: u64 = match pattern.as_str() {
        "rand4k" => 4096,
        "seq1m" => 1 << 20,
        other => anyhow::bail!("unknown pattern {other:?}: use rand4k or seq1m"),
    };
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
    let mut manifest = Manifest::new(
        &ManifestParams {
            device_name: "disk0".into(),
            size,
            block_size: 4096,
            region_size: 4 << 20,
            splay_width: 4,
            segment_size: 8 << 20,
        },
        now,
    )?;
    if let Some(key) = std::env::var_os("TINYLAG_BENCH_KEY") {
        let ring = tinylag::crypto::Keyring::load(std::path::Path::new(&key))?;
        tinylag::crypto::install(&ring);
        manifest.encrypt_if_keyed();
    }
    manifest.create(store.as_ref()).await?;

    let blocks = size / block;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    // Random order visits every block once (what fio's random map does).
    let mut order: Vec<u64> = (0..blocks).collect();
    if pattern == "rand4k" {
        for i in (1..order.len()).rev() {
            let j = (noise.next() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
    }
    let records = total / block;
    let (mut seq, mut lsn) = (0u64, 1u64);
    let mut builder = SegmentBuilder::new(manifest.uuid, 1, seq, lsn);
    for i in 0..records {
        let offset = order[(i % blocks) as usize] * block;
        builder.push(&Record {
            lsn,
            timestamp_ns: now,
            dev: 0,
            op: Op::Write {
                offset,
                data: noise.bytes(block as usize),
            },
        })?;
        lsn += 1;
        if builder.encoded_len() as u64 >= manifest.segment_size || i + 1 == records {
            let body = builder.finish();
            store
                .put_if_absent(&manifest.segment_key(seq), body)
                .await?;
            seq += 1;
            builder = SegmentBuilder::new(manifest.uuid, 1, seq, lsn);
        }
    }
    println!("{records} records in {seq} segments");
    Ok(())
}
