//! Primary core scenarios over an in-memory disk and the memory store: the journal replays
//! to the disk, overlapping writes keep their order, a full pool or a dead store never
//! blocks a write, acknowledgement modes, and restart modes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::*;
use crate::block::{check_range, BlockError};
use crate::clock::SystemClock;
use crate::journal::manifest::ManifestParams;
use crate::journal::reader::{Cursor, JournalReader, Step};
use crate::journal::RecordKind;
use crate::journal::{Manifest, Op, Record};
use crate::store::flaky::{FailureKind, FlakyStore};
use crate::store::memory::MemoryStore;
use crate::store::ObjectStore;
use crate::writer::journal_writer::WriterConfig;
use crate::writer::mode::MaxLag;
use crate::writer::pool::RECORD_OVERHEAD;

const SIZE: u64 = 16 << 20;

/// A disk in memory; each write may be slowed down to widen races.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    write_delay: Duration,
}

impl MemDisk {
    fn new(write_delay: Duration) -> Arc<Self> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; SIZE as usize]),
            write_delay,
        })
    }

    fn snapshot(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }
}

#[async_trait]
impl BlockDevice for MemDisk {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: SIZE,
            block_size: 4096,
            read_only: false,
            supports_trim: true,
            supports_write_zeroes: true,
            flush_covers_all_connections: true,
        }
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BlockError> {
        check_range(offset, u64::from(len), SIZE)?;
        let d = self.data.lock().unwrap();
        Ok(Bytes::copy_from_slice(
            &d[offset as usize..(offset + u64::from(len)) as usize],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), BlockError> {
        check_range(offset, data.len() as u64, SIZE)?;
        if !self.write_delay.is_zero() {
            tokio::time::sleep(self.write_delay).await;
        }
        self.data.lock().unwrap()[offset as usize..offset as usize + data.len()]
            .copy_from_slice(&data);
        Ok(())
    }
    async fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.write_zeroes(offset, len, false).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), BlockError> {
        check_range(offset, len, SIZE)?;
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    flaky: Arc<FlakyStore>,
    manifest: Manifest,
}

impl Fixture {
    async fn new() -> Fixture {
        let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
        let store: Arc<dyn ObjectStore> = flaky.clone();
        let manifest = Manifest::new(
            &ManifestParams {
                device_name: "disk0".into(),
                size: SIZE,
                block_size: 4096,
                region_size: 1 << 20,
                splay_width: 4,
                segment_size: 256 << 10,
            },
            1,
        )
        .unwrap();
        manifest.create(store.as_ref()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        // The path only serves the "does the primary hold data" check and the marker.
        std::fs::File::create(dir.path().join("primary.img"))
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        Fixture {
            dir,
            store,
            flaky,
            manifest,
        }
    }

    fn setup(&self, ack: AckMode, pool_size: u64) -> JournalSetup {
        JournalSetup {
            store: self.store.clone(),
            manifest: self.manifest.clone(),
            writer: WriterConfig {
                linger: Duration::from_millis(20),
                retry_base: Duration::from_millis(2),
                retry_max: Duration::from_millis(20),
                ..WriterConfig::for_manifest(&self.manifest)
            },
            pool_size,
            ack,
            clock: Arc::new(SystemClock),
            primary_path: self.dir.path().join("primary.img"),
            member_paths: Vec::new(),
            activity_log: Some(self.dir.path().join("primary.img.tinylag-al")),
            abandon_after_hole: false,
            claim: Default::default(),
            on_fence: Default::default(),
            promotion: None,
        }
    }

    async fn core(&self, disk: &Arc<MemDisk>, ack: AckMode, pool_size: u64) -> PrimaryCore {
        PrimaryCore::start(
            disk.clone(),
            Labels::default(),
            Some(self.setup(ack, pool_size)),
        )
        .await
        .unwrap()
    }

    /// Every record of the journal, in LSN order, gap-free from 1.
    async fn records(&self) -> Vec<Record> {
        let reader = JournalReader::new(self.flaky.inner().clone(), self.manifest.clone());
        let mut cursor = Cursor {
            seq: 0,
            next_lsn: 1,
        };
        let mut out: Vec<Record> = Vec::new();
        while let Step::Segment(s) = reader.step(&mut cursor).await.unwrap() {
            for r in s.records {
                assert_eq!(r.lsn, out.len() as u64 + 1);
                out.push(r);
            }
        }
        out
    }

    /// The image the journal rebuilds on a zeroed disk.
    async fn replay(&self) -> Vec<u8> {
        let mut image = vec![0u8; SIZE as usize];
        for r in self.records().await {
            match r.op {
                Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                    image[offset as usize..offset as usize + data.len()].copy_from_slice(&data)
                }
                Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                    image[offset as usize..(offset + len) as usize].fill(0)
                }
                _ => {}
            }
        }
        image
    }
}

/// Waits until the core reports `mode` (the resync runs in the background).
async fn wait_mode(core: &PrimaryCore, mode: Mode, within: Duration) {
    let deadline = Instant::now() + within;
    while core.mode() != mode {
        assert!(
            Instant::now() < deadline,
            "still {} after {within:?}: {}",
            core.mode(),
            core.status().render_text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kinds_of(records: &[Record]) -> Vec<RecordKind> {
    records.iter().map(|r| r.kind()).collect()
}

fn pattern(seed: u64, len: usize) -> Bytes {
    Bytes::from(crate::testing::noise(seed, len))
}

#[tokio::test]
async fn every_change_is_journaled_and_the_journal_rebuilds_the_disk() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = f.core(&disk, AckMode::Async, 64 << 20).await;
    assert_eq!(core.mode(), Mode::Logging);
    for i in 0..50u64 {
        core.write(i * 12_288 % (SIZE - 65536), pattern(i, 8192), false)
            .await
            .unwrap();
    }
    core.trim(0, 16384).await.unwrap();
    core.write_zeroes(1 << 20, 65536, false).await.unwrap();
    core.flush().await.unwrap();
    // Empty and refused requests change nothing and journal nothing.
    core.write(4096, Bytes::new(), false).await.unwrap();
    assert!(matches!(
        core.write(SIZE - 4096, pattern(1, 8192), false).await,
        Err(BlockError::OutOfRange { .. })
    ));
    assert_eq!(core.head_lsn(), 1 + 50 + 3);
    let report = core.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained && report.clean, "{report:?}");
    assert_eq!(report.durable_lsn, report.head_lsn);
    let kinds: Vec<_> = f.records().await.iter().map(|r| r.kind()).collect();
    assert_eq!(kinds[0], RecordKind::Epoch);
    assert_eq!(
        kinds[51..],
        [
            RecordKind::Discard,
            RecordKind::WriteZeroes,
            RecordKind::Flush
        ]
    );
    assert!(
        f.replay().await == disk.snapshot(),
        "journal replay equals the disk"
    );
}

/// Many tasks write overlapping ranges while the disk is slow: the range lock makes the
/// journal's order the disk's order, so the replay still equals the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_concurrent_writes_replay_to_the_same_disk() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::from_micros(300));
    let core = Arc::new(f.core(&disk, AckMode::Async, 64 << 20).await);
    let tasks: Vec<_> = (0..16u64)
        .map(|t| {
            let core = core.clone();
            tokio::spawn(async move {
                for i in 0..40u64 {
                    // All tasks hammer the same 64 KiB with 4..16 KiB writes.
                    let offset = ((t * 5 + i * 3) % 12) * 4096;
                    let len = 4096 * (1 + (t + i) % 4) as usize;
                    core.write(offset, pattern(t * 1000 + i, len), false)
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let report = core.shutdown(Duration::from_secs(10)).await;
    assert!(report.clean, "{report:?}");
    assert!(f.replay().await == disk.snapshot());
}

/// The store is down and the pool is tiny: writes keep completing at disk speed, memory
/// stays under the cap, the mode turns forward-part with dirty regions, and exactly one
/// RESYNC_BEGIN marks where the journal stopped being complete.
#[tokio::test]
async fn a_full_pool_never_blocks_writes_and_marks_them_dirty() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = f.core(&disk, AckMode::Async, 1 << 20).await;
    f.flaky.fail_all(Some(FailureKind::Transient));
    let started = Instant::now();
    for i in 0..256u64 {
        core.write(i * 65536 % SIZE, pattern(i, 16384), false)
            .await
            .unwrap();
    }
    core.flush().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "writes were not held up"
    );
    assert_eq!(core.mode(), Mode::ForwardPart);
    tokio::time::timeout(Duration::from_secs(5), async {
        while core.status().upload_errors.count == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the writer tried and failed to upload");
    let status = core.status();
    assert!(
        status.pool.peak <= (1 << 20) + RECORD_OVERHEAD,
        "{:?}",
        status.pool
    );
    assert!(status.dirty.regions > 0);
    assert!(status.upload_errors.count > 0);
    assert!(status.render_text().contains("WARNING: mode forward-part"));

    // The store comes back: what was queued drains, the resync journals the dirty regions,
    // the mode returns to logging, and the journal rebuilds the disk exactly.
    f.flaky.heal();
    wait_mode(&core, Mode::Logging, Duration::from_secs(20)).await;
    let status = core.status();
    assert_eq!(status.resync.episodes_ended, 1, "{status:?}");
    assert!(status.resync.lifetime_regions >= status.dirty.regions);
    let t = &status.transitions;
    assert_eq!(t.last().map(|t| t.to), Some(Mode::Logging), "{t:?}");
    assert!(t[0].cause.contains("pool is full"), "{t:?}");
    let report = core.shutdown(Duration::from_secs(10)).await;
    assert!(report.drained && report.clean, "{report:?}");
    let records = f.records().await;
    let kinds = kinds_of(&records);
    let count = |k| kinds.iter().filter(|x| **x == k).count();
    assert_eq!(count(RecordKind::ResyncBegin), 1);
    assert_eq!(count(RecordKind::ResyncEnd), 1);
    assert!(count(RecordKind::ResyncData) > 0);
    assert!(f.replay().await == disk.snapshot());
}

/// Writes keep coming, some of them to the regions being resynced, while the store goes
/// down and comes back: the resync converges anyway (its regions are read under their range
/// locks, and a write that goes dirty again is picked up by the next pass).
#[tokio::test]
async fn the_resync_converges_under_continuous_writes() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::from_micros(200));
    let core = Arc::new(f.core(&disk, AckMode::Async, 2 << 20).await);
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let core = core.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let offset = (i * 7 + w * 13) % (SIZE / 16384) * 16384;
                    core.write(offset, pattern(i * 3 + w, 16384), false)
                        .await
                        .unwrap();
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.flaky.fail_all(Some(FailureKind::Transient));
    wait_mode(&core, Mode::ForwardPart, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.flaky.heal();
    // Back to logging while the writers still write.
    wait_mode(&core, Mode::Logging, Duration::from_secs(30)).await;
    assert!(!writers.iter().any(|w| w.is_finished()));
    stop.store(true, Ordering::Release);
    for w in writers {
        w.await.unwrap();
    }
    let report = core.shutdown(Duration::from_secs(10)).await;
    assert!(report.clean, "{report:?}");
    assert!(f.replay().await == disk.snapshot());
}

#[tokio::test]
async fn ack_journal_replies_only_once_the_record_is_durable() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = Arc::new(f.core(&disk, AckMode::Journal, 64 << 20).await);
    f.flaky.set_latency(Duration::from_millis(30));
    let started = Instant::now();
    let tasks: Vec<_> = (0..8u64)
        .map(|i| {
            let core = core.clone();
            tokio::spawn(async move {
                core.write(i * 4096, pattern(i, 4096), false).await.unwrap();
                core.durable_lsn()
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap() >= 2, "durable when acknowledged");
    }
    // Group commit: 8 concurrent writes need far fewer than 8 serial uploads, and no
    // linger (20 ms) is added to any of them.
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(core.durable_lsn(), core.head_lsn());
    assert_eq!(core.status().ack.effective, "journal");
    core.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn adaptive_switches_to_journal_over_the_bound_and_back() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = f
        .core(&disk, AckMode::Adaptive(MaxLag::Bytes(256 << 10)), 64 << 20)
        .await;
    f.flaky.fail_all(Some(FailureKind::Transient));
    // 15 writes of 16 KiB stay under the 256 KiB bound: async, at once.
    for i in 0..15u64 {
        core.write(i * 65536, pattern(i, 16384), false)
            .await
            .unwrap();
    }
    assert!(core.status().pool.used < 256 << 10);
    assert_eq!(core.status().ack.effective, "async");
    // The 16th passes the bound: it waits for durability, which needs the store.
    let waiting = core.write(0, pattern(99, 16384), false);
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut waiting)
            .await
            .is_err()
    );
    assert_eq!(core.status().ack.effective, "journal");
    f.flaky.heal();
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    // Drained below half the bound: async again.
    core.write(0, pattern(100, 4096), false).await.unwrap();
    assert_eq!(core.status().ack.effective, "async");
    core.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn restart_modes_follow_the_clean_stop_marker() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = f.core(&disk, AckMode::Async, 8 << 20).await;
    core.write(0, pattern(1, 4096), false).await.unwrap();
    assert!(core.shutdown(Duration::from_secs(5)).await.clean);
    drop(core);

    // A clean stop: logging again, LSNs continue.
    let core = f.core(&disk, AckMode::Async, 8 << 20).await;
    assert_eq!(core.mode(), Mode::Logging);
    assert_eq!(core.epoch(), Some(2));
    core.write(4096, pattern(2, 4096), false).await.unwrap();
    let lsn = core.head_lsn();
    assert!(core.wait_durable(lsn).await);
    drop(core); // a crash: no shutdown, no marker

    // The activity log names the one region written since: only it is resynced, as one
    // span, and the mode returns to logging.
    let core = f.core(&disk, AckMode::Async, 8 << 20).await;
    let status = core.status();
    assert_eq!(
        status.start.as_ref().map(|s| s["regions"].clone()),
        Some(serde_json::json!(1)),
        "{status:?}"
    );
    wait_mode(&core, Mode::Logging, Duration::from_secs(10)).await;
    let report = core.shutdown(Duration::from_secs(5)).await;
    assert!(report.clean, "{report:?}");
    let kinds = kinds_of(&f.records().await);
    assert_eq!(
        kinds,
        [
            RecordKind::Epoch,
            RecordKind::Write,
            RecordKind::Epoch,
            RecordKind::Write,
            RecordKind::Epoch,
            RecordKind::ResyncBegin,
            RecordKind::ResyncData,
            RecordKind::ResyncEnd
        ]
    );
    assert!(f.replay().await == disk.snapshot());
    drop(core);

    // A crash with the activity log gone: forward-full, said in the mode's reason.
    let core = f.core(&disk, AckMode::Async, 8 << 20).await;
    drop(core);
    std::fs::remove_file(f.dir.path().join("primary.img.tinylag-al")).unwrap();
    let core = f.core(&disk, AckMode::Async, 8 << 20).await;
    assert_eq!(core.mode(), Mode::ForwardFull);
    let reason = core.status().mode_reason.unwrap();
    assert!(reason.contains("no usable activity log"), "{reason}");
    assert!(reason.contains("missing"), "{reason}");
    wait_mode(&core, Mode::Logging, Duration::from_secs(20)).await;
    assert_eq!(core.status().resync.regions_done, SIZE >> 20);
    core.shutdown(Duration::from_secs(5)).await;
    assert!(f.replay().await == disk.snapshot());
}

#[tokio::test]
async fn a_primary_of_the_wrong_size_is_refused() {
    let f = Fixture::new().await;
    let mut setup = f.setup(AckMode::Async, 8 << 20);
    setup.manifest.devices[0].size = SIZE * 2;
    let err = PrimaryCore::start(MemDisk::new(Duration::ZERO), Labels::default(), Some(setup))
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::SizeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&(SIZE * 2).to_string()));
}

#[tokio::test]
async fn without_a_journal_the_core_just_serves_the_disk() {
    let disk = MemDisk::new(Duration::ZERO);
    let core = PrimaryCore::start(disk.clone(), Labels::default(), None)
        .await
        .unwrap();
    core.write(8192, pattern(5, 4096), false).await.unwrap();
    assert_eq!(core.read(8192, 4096).await.unwrap(), pattern(5, 4096));
    let status = core.status();
    assert_eq!(status.mode, Mode::NoJournal);
    assert!(status.render_text().contains("--no-journal"));
}

#[tokio::test]
async fn requests_outside_the_device_are_not_counted_as_io() {
    let disk = MemDisk::new(Duration::ZERO);
    let core = PrimaryCore::start(disk.clone(), Labels::default(), None)
        .await
        .unwrap();
    core.write(0, pattern(1, 4096), false).await.unwrap();
    core.read(0, 4096).await.unwrap();
    core.trim(4096, 4096).await.unwrap();
    core.write_zeroes(8192, 4096, false).await.unwrap();
    let before = core.status().io;
    assert_eq!(
        (
            before.reads,
            before.writes,
            before.trims,
            before.write_zeroes
        ),
        (1, 1, 1, 1)
    );
    assert_eq!((before.bytes_read, before.bytes_written), (4096, 4096));
    let past = SIZE - 4096;
    assert!(core.write(past, pattern(2, 8192), false).await.is_err());
    assert!(core.read(past, 8192).await.is_err());
    assert!(core.trim(past, 8192).await.is_err());
    assert!(core
        .write_zeroes(u64::MAX - 4095, 4096, false)
        .await
        .is_err());
    assert_eq!(core.status().io, before);
}

#[tokio::test]
async fn a_new_journal_over_a_primary_with_data_starts_forward_full() {
    let f = Fixture::new().await;
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(f.dir.path().join("primary.img"))
        .unwrap();
    file.write_all_at(b"old data", 3 << 20).unwrap();
    file.sync_all().unwrap();
    let core = f
        .core(&MemDisk::new(Duration::ZERO), AckMode::Async, 8 << 20)
        .await;
    assert_eq!(core.mode(), Mode::ForwardFull);
    assert!(core
        .status()
        .mode_reason
        .unwrap()
        .contains("already held data"));
    assert_eq!(
        core.status().activity_log.unwrap().regions,
        SIZE >> 20,
        "every region is in the activity log until resynced"
    );
    wait_mode(&core, Mode::Logging, Duration::from_secs(20)).await;
    core.shutdown(Duration::from_secs(5)).await;
    let kinds = kinds_of(&f.records().await);
    assert_eq!(kinds[..2], [RecordKind::Epoch, RecordKind::ResyncBegin]);
    assert_eq!(kinds.last(), Some(&RecordKind::ResyncEnd));
}

/// Forward-full over a sparse file reads only its data: holes need no record on a new
/// journal, pieces of zeroes become WRITE_ZEROES, and the journal rebuilds the file.
#[tokio::test]
async fn forward_full_reads_only_allocated_nonzero_data() {
    use crate::block::file::{self, FileOptions};
    use std::os::unix::fs::FileExt;
    let f = Fixture::new().await;
    let path = f.dir.path().join("primary.img");
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&pattern(1, 65536), 3 << 20).unwrap();
    file.write_all_at(&vec![0u8; 1 << 20], 9 << 20).unwrap(); // allocated zeroes
    file.sync_all().unwrap();
    let device = file::open(&path, FileOptions::new(4096)).unwrap();
    let core = PrimaryCore::start(
        device,
        Labels::default(),
        Some(f.setup(AckMode::Async, 8 << 20)),
    )
    .await
    .unwrap();
    assert_eq!(core.mode(), Mode::ForwardFull);
    wait_mode(&core, Mode::Logging, Duration::from_secs(20)).await;
    let resync = core.status().resync;
    assert_eq!(resync.regions_done, SIZE >> 20);
    assert_eq!(
        resync.bytes_read,
        1 << 20,
        "only the region with data: {resync:?}"
    );
    core.shutdown(Duration::from_secs(5)).await;
    let records = f.records().await;
    let data = records
        .iter()
        .filter(|r| r.kind() == RecordKind::ResyncData)
        .count();
    assert_eq!(data, 1);
    let mut image = vec![0u8; SIZE as usize];
    image[3 << 20..(3 << 20) + 65536].copy_from_slice(&pattern(1, 65536));
    assert!(f.replay().await == image);
}

/// Without an activity log nothing is written beside the primary, activation is free, and
/// a restart after a crash resyncs the whole device.
#[tokio::test]
async fn without_an_activity_log_a_crash_means_forward_full() {
    let f = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let setup = || {
        let mut s = f.setup(AckMode::Async, 8 << 20);
        s.activity_log = None;
        s
    };
    let core = PrimaryCore::start(disk.clone(), Labels::default(), Some(setup()))
        .await
        .unwrap();
    core.write(0, pattern(1, 4096), false).await.unwrap();
    assert!(core.status().activity_log.is_none());
    drop(core);
    assert!(!f.dir.path().join("primary.img.tinylag-al").exists());
    let core = PrimaryCore::start(disk.clone(), Labels::default(), Some(setup()))
        .await
        .unwrap();
    assert_eq!(core.mode(), Mode::ForwardFull);
    assert!(core
        .status()
        .mode_reason
        .unwrap()
        .contains("--no-activity-log"));
    wait_mode(&core, Mode::Logging, Duration::from_secs(20)).await;
    core.shutdown(Duration::from_secs(5)).await;
    assert!(f.replay().await == disk.snapshot());
}

/// `demote`: the `DEMOTE` is the journal's last record and covers every acknowledged write;
/// writes are refused (read-only) while reads and flushes go on; the marker and a seed stamp
/// at the `DEMOTE` are left; a second demote is refused; nothing is journaled afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demote_journals_demote_last_and_refuses_writes_after_it() {
    let fx = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = fx.core(&disk, AckMode::Async, 64 << 20).await;
    for i in 0..16u64 {
        core.write(i * 8192, Bytes::from(vec![i as u8 + 1; 4096]), false)
            .await
            .unwrap();
    }
    let done = core.demote(Duration::from_secs(10)).await.unwrap();
    assert_eq!(core.mode(), Mode::Demoted);
    assert!(matches!(
        core.write(0, Bytes::from(vec![9u8; 4096]), false).await,
        Err(BlockError::ReadOnly)
    ));
    assert!(matches!(
        core.trim(0, 4096).await,
        Err(BlockError::ReadOnly)
    ));
    assert_eq!(core.read(0, 4096).await.unwrap()[0], 1);
    core.flush().await.unwrap();
    assert!(matches!(
        core.demote(Duration::from_secs(1)).await,
        Err(HookError::Demoted { .. })
    ));
    let records = fx.records().await;
    let last = records.last().unwrap();
    assert_eq!(last.lsn, done.lsn);
    assert!(matches!(last.op, Op::Demote { epoch } if epoch == done.epoch));
    assert_eq!(fx.replay().await, disk.data.lock().unwrap().clone());
    let primary = fx.dir.path().join("primary.img");
    assert!(crate::writer::restart::marker_path(&primary).exists());
    let stamp = crate::replayer::SeedStamp::read_checked(&primary)
        .unwrap()
        .expect("a seed stamp at the DEMOTE");
    assert_eq!((stamp.lsn, stamp.epoch), (done.lsn, done.epoch));
    let report = core.shutdown(Duration::from_secs(5)).await;
    assert!(report.clean && report.head_lsn == done.lsn, "{report:?}");
    assert_eq!(fx.records().await.len(), records.len(), "nothing after it");
}

/// A demote whose resync cannot drain (the store is down, the pool full) is refused in time,
/// saying what opened the episode and what the resync waits for; writes are taken again;
/// once the store is back, the same demote succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demote_waiting_on_a_stuck_resync_says_why_and_takes_writes_again() {
    let fx = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = fx.core(&disk, AckMode::Async, 1 << 20).await;
    fx.flaky.fail_all(Some(FailureKind::Transient));
    for i in 0..64u64 {
        core.write(i * 65536 % SIZE, pattern(i, 16384), false)
            .await
            .unwrap();
    }
    assert_eq!(core.mode(), Mode::ForwardPart);
    let refused = core.demote(Duration::from_millis(500)).await.unwrap_err();
    let text = refused.to_string();
    assert!(matches!(refused, HookError::ResyncPending { .. }), "{text}");
    assert!(
        text.contains("entered because the memory pool is full")
            && (text.contains("outage bound") || text.contains("the memory pool holds")),
        "{text}"
    );
    core.write(0, Bytes::from(vec![3u8; 4096]), false)
        .await
        .expect("writes are taken again after a refused demote");
    fx.flaky.heal();
    let done = core.demote(Duration::from_secs(20)).await.unwrap();
    assert_eq!(core.mode(), Mode::Demoted);
    core.shutdown(Duration::from_secs(5)).await;
    let records = fx.records().await;
    assert_eq!(records.last().unwrap().lsn, done.lsn);
    assert!(fx.replay().await == disk.snapshot());
}

/// A fenced writer refuses to demote, and the regions its clients write after the fence
/// stay in the activity log (never durable, so never retired): `rejoin` counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_writer_cannot_demote_and_keeps_its_writes_in_the_activity_log() {
    let fx = Fixture::new().await;
    let disk = MemDisk::new(Duration::ZERO);
    let core = fx.core(&disk, AckMode::Async, 64 << 20).await;
    core.fence("epoch 2 claimed by a test".into());
    core.write(5 << 20, Bytes::from(vec![7u8; 4096]), false)
        .await
        .unwrap();
    assert!(matches!(
        core.demote(Duration::from_secs(1)).await,
        Err(HookError::Fenced { .. })
    ));
    // Longer than the cleaner's period: a quiet, durable region would be retired by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let al = core.status().activity_log.unwrap();
    assert!(al.regions >= 1, "{al:?}");
    assert!(core.dirty().is_dirty(5));
}
