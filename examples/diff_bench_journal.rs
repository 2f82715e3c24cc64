//! Writes a journal for `bench/diff.sh`: a mark `before`, then `RECORDS` random 4 KiB writes
//! (incompressible, timestamps spread over the last hour), then a mark `after`; and the two
//! images those marks name, `before.img` (all zeroes, sparse) and `after.img`, as `restore`
//! would write them (tests/diff.rs and tests/timetravel_restore.rs check that restore is
//! exact), so the benchmark's baseline can read and compare them without replaying gigabytes.
//!
//! ```text
//! diff_bench_journal JOURNAL_DIR IMAGE_DIR SIZE RECORDS
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tinylag::journal::mark::{self, MarkPoint};
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
    let [_, dir, images, size, records] = args.as_slice() else {
        anyhow::bail!("usage: diff_bench_journal JOURNAL_DIR IMAGE_DIR SIZE RECORDS");
    };
    let size = parse_size(size).map_err(anyhow::Error::msg)?;
    let records: u64 = records.parse()?;
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
    std::fs::create_dir_all(images)?;
    let before = File::create(format!("{images}/before.img"))?;
    before.set_len(size)?;
    let after = File::create(format!("{images}/after.img"))?;
    after.set_len(size)?;
    let t0 = now - 3600 * SEC;
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let blocks = size / 4096;
    let (mut seq, mut lsn) = (0u64, 1u64);
    let mut builder = SegmentBuilder::new(manifest.uuid, 1, seq, lsn);
    let total = records + 2;
    for i in 0..total {
        let (ts, op) = if i == 0 || i + 1 == total {
            let name = if i == 0 { "before" } else { "after" };
            let ts = if i == 0 { t0 } else { now - 60 * SEC };
            mark::create(
                store.as_ref(),
                &MarkPoint {
                    name: name.into(),
                    lsn,
                    timestamp_ns: ts,
                },
            )
            .await?;
            (ts, Op::Mark { name: name.into() })
        } else {
            let offset = (noise.next() % blocks) * 4096;
            let data = noise.bytes(4096);
            after.write_all_at(&data, offset)?;
            (t0 + 3500 * SEC * i / total, Op::Write { offset, data })
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
    after.sync_all()?;
    eprintln!("{seq} segments, {} records", lsn - 1);
    Ok(())
}
