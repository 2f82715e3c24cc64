//! Writes a journal for `bench/timetravel.sh`: one device filled front to back with 1 MiB
//! writes, then `WRITES` random 4 KiB writes whose timestamps are spread evenly over
//! `SPAN` seconds ("10 minutes of random writes" with controlled timestamps, generated in
//! seconds rather than waited for). Everything is stamped in the past, so an agent with no
//! delay applies it at once.
//!
//! ```text
//! timetravel_bench_journal DIR SIZE WRITES SPAN_SECS
//! ```
//! Prints the first random write's time (RFC 3339): restoring to it goes back SPAN seconds.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tinylag::clock::format_ns;
use tinylag::journal::segment::SegmentBuilder;
use tinylag::journal::ManifestParams;
use tinylag::journal::{Manifest, Op, Record};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;
use tinylag::units::parse_size;

#[path = "support/noise.rs"]
mod noise;
use noise::Noise;

const SEC: u64 = 1_000_000_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, size, writes, span] = args.as_slice() else {
        anyhow::bail!("usage: timetravel_bench_journal DIR SIZE WRITES SPAN_SECS");
    };
    let size = parse_size(size).map_err(anyhow::Error::msg)?;
    let writes: u64 = writes.parse()?;
    let span: u64 = span.parse()?;
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64 / SEC * SEC;
    let manifest = Manifest::new(
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
    manifest.create(store.as_ref()).await?;
    // The fill at t0, the random writes over t1..t1 + span, all before now.
    let t1 = now - (span + 60) * SEC;
    let t0 = t1 - 60 * SEC;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut ops: Vec<(u64, Op)> = (0..size >> 20)
        .map(|i| {
            (
                t0,
                Op::Write {
                    offset: i << 20,
                    data: Bytes::new(),
                },
            )
        })
        .collect();
    let blocks = size / 4096;
    for i in 0..writes {
        let ts = t1 + span * SEC * i / writes.max(1);
        let offset = (noise.next() % blocks) * 4096;
        ops.push((
            ts,
            Op::Write {
                offset,
                data: Bytes::new(),
            },
        ));
    }
    let (mut seq, mut lsn) = (0u64, 1u64);
    let mut builder = SegmentBuilder::new(manifest.uuid, 1, seq, lsn);
    let total = ops.len();
    for (i, (ts, op)) in ops.into_iter().enumerate() {
        let op = match op {
            Op::Write { offset, .. } => Op::Write {
                offset,
                data: noise.bytes(if ts == t0 { 1 << 20 } else { 4096 }),
            },
            other => other,
        };
        builder.push(&Record {
            lsn,
            timestamp_ns: ts,
            dev: 0,
            op,
        })?;
        lsn += 1;
        if builder.encoded_len() as u64 >= manifest.segment_size || i + 1 == total {
            store
                .put_if_absent(&manifest.segment_key(seq), builder.finish())
                .await?;
            seq += 1;
            builder = SegmentBuilder::new(manifest.uuid, 1, seq, lsn);
        }
    }
    println!("{}", format_ns(t1));
    Ok(())
}
