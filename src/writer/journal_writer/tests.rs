//! Journal writer scenarios against the memory store, with failures injected by
//! `FlakyStore`: ordering, segment cutting, the durable prefix under out-of-order uploads,
//! ambiguous creates, fencing, and restart planning.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::clock::SystemClock;
use crate::journal::manifest::ManifestParams;
use crate::journal::reader::{Cursor, JournalReader, Step};
use crate::store::flaky::{FailureKind, FlakyStore};
use crate::store::memory::MemoryStore;
use crate::writer::dirty::DirtyRegions;
use crate::writer::mode::{Mode, ModeState};
use crate::writer::pool::Pool;
use crate::writer::shared::record_cost;

fn manifest() -> Manifest {
    Manifest::new(
        &ManifestParams {
            device_name: "disk0".into(),
            size: 64 << 20,
            block_size: 4096,
            region_size: 1 << 20,
            splay_width: 4,
            segment_size: 64 << 10,
        },
        1,
    )
    .unwrap()
}

fn config() -> WriterConfig {
    WriterConfig {
        segment_size: 64 << 10,
        linger: Duration::from_millis(20),
        max_uploads: 4,
        compress: true,
        outage_bound: Duration::from_secs(60),
        retry_base: Duration::from_millis(2),
        retry_max: Duration::from_millis(20),
    }
}

fn shared() -> Shared {
    Shared {
        mode: Arc::new(ModeState::new()),
        dirty: Arc::new(DirtyRegions::new(64 << 20, 1 << 20)),
        pool: Pool::new(64 << 20).unwrap(),
    }
}

async fn start(store: Arc<dyn ObjectStore>, m: &Manifest, shared: &Shared) -> JournalWriter {
    prepare(store, m.clone(), &SystemClock, false)
        .await
        .unwrap()
        .start(Arc::new(SystemClock), config(), shared.clone(), false)
        .await
        .unwrap()
}

/// Queues `ops` (consecutive LSNs); returns the last LSN.
fn send(w: &JournalWriter, shared: &Shared, ops: Vec<Op>) -> u64 {
    let mut last = 0;
    for op in ops {
        let permit = shared.pool.try_reserve(record_cost(&op)).unwrap();
        let make = |lsn| Record {
            lsn,
            timestamp_ns: w.timestamps.next(),
            dev: 0,
            op,
        };
        last = w.intake.append(make, permit, false).unwrap();
    }
    last
}

/// Bytes zstd cannot shrink, so segment sizes are predictable.
fn noise(seed: u64, len: usize) -> Bytes {
    Bytes::from(crate::testing::noise(seed, len))
}

/// A 70 KB write at the `i`-th 64 KiB offset: with the tests' 64 KiB segments, it fills a
/// segment alone, so seqs follow writes one to one.
fn segment_filling_write(i: u64) -> Op {
    Op::Write {
        offset: i * 65536,
        data: noise(i, 70_000),
    }
}

fn write(offset: u64, len: usize, byte: u8) -> Op {
    Op::Write {
        offset,
        data: Bytes::from(vec![byte; len]),
    }
}

/// Every record from the start of the journal, in order (checks LSNs are gap-free).
async fn read_all(store: Arc<dyn ObjectStore>, m: &Manifest) -> Vec<Record> {
    let reader = JournalReader::new(store, m.clone());
    let mut cursor = Cursor {
        seq: 0,
        next_lsn: 1,
    };
    let mut out: Vec<Record> = Vec::new();
    while let Step::Segment(s) = reader.step(&mut cursor).await.unwrap() {
        for r in s.records {
            assert_eq!(r.lsn, out.len() as u64 + 1, "gap-free from LSN 1");
            out.push(r);
        }
    }
    out
}

async fn wait_durable(w: &JournalWriter, lsn: u64) {
    let mut rx = w.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|p| p.durable_lsn >= lsn),
    )
    .await
    .expect("durable in time")
    .unwrap();
}

#[tokio::test]
async fn records_reach_the_journal_in_order_after_the_epoch_record() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    assert_eq!((w.epoch, w.intake.head_lsn()), (1, 1));
    // 40 writes of 4 KiB of incompressible-enough data: several 64 KiB segments.
    let ops = (0..40u64)
        .map(|i| Op::Write {
            offset: i * 4096,
            data: noise(i, 4096),
        })
        .chain([
            Op::Flush,
            Op::Discard {
                offset: 0,
                len: 8192,
            },
            Op::WriteZeroes {
                offset: 8192,
                len: 4096,
            },
        ])
        .collect();
    let last = send(&w, &shared, ops);
    w.intake.close();
    let next_seq = w.task.await.unwrap();
    assert!(
        next_seq > 2,
        "several segments were cut, next seq {next_seq}"
    );
    assert_eq!(w.progress.borrow().durable_lsn, last);
    assert_eq!(shared.pool.used(), 0, "every permit released");
    assert_eq!(w.stats.segments_uploaded.load(Ordering::Acquire), next_seq);

    let records = read_all(store, &m).await;
    assert_eq!(records.len() as u64, last);
    assert_eq!(records[0].op, Op::Epoch { epoch: 1 });
    assert_eq!(records[41].op, Op::Flush);
    assert_eq!(
        records[43].op,
        Op::WriteZeroes {
            offset: 8192,
            len: 4096
        }
    );
    assert!(records
        .windows(2)
        .all(|p| p[0].timestamp_ns <= p[1].timestamp_ns));
}

#[tokio::test]
async fn a_lone_record_is_uploaded_after_the_linger() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    let lsn = send(&w, &shared, vec![write(0, 512, 1)]);
    assert!(shared.pool.used() > 0);
    wait_durable(&w, lsn).await;
    assert_eq!(shared.pool.used(), 0);
    assert_eq!(w.stats.oldest_pending_ns(), 0);
    // It waited at least the 20 ms linger between acknowledgement and durability.
    let lag = w.stats.durable_lag.summary();
    assert_eq!(lag.records, 1);
    assert!(lag.p99_seconds >= 0.019, "{lag:?}");
}

/// Stripe 1 fails while the other stripes succeed: later segments land first, but the
/// durable LSN stops before the missing one until it lands too.
#[tokio::test]
async fn durable_lsn_only_covers_the_gap_free_prefix() {
    let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    // The first segment was seq 0 (stripe 0); the writer continues at seq 1 (stripe 1).
    flaky.fail_prefix("journal/1/", FailureKind::Permanent);
    let first_of_seq1 = w.intake.head_lsn() + 1;
    // Enough for ~4 segments: seqs 1..=4.
    let ops = (0..60u64)
        .map(|i| Op::Write {
            offset: i * 4096,
            data: noise(i, 4096),
        })
        .collect();
    let last = send(&w, &shared, ops);
    // Segments 2, 3, ... land (after seq 0, the first); seq 1 keeps failing.
    tokio::time::timeout(Duration::from_secs(5), async {
        while w.stats.segments_uploaded.load(Ordering::Acquire) < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        w.progress.borrow().durable_lsn,
        first_of_seq1 - 1,
        "seq 1 is missing, so nothing after it is durable"
    );
    assert!(w.stats.upload_errors.load(Ordering::Acquire) > 0);
    assert!(w.stats.last_error().unwrap().contains("journal/1/"));
    assert!(shared.pool.used() > 0, "pool memory held until durable");
    flaky.clear_prefix();
    wait_durable(&w, last).await;
    assert_eq!(shared.pool.used(), 0);
    assert!(
        w.stats.failing_for().is_none(),
        "a success clears the failure clock"
    );
    w.intake.close();
    w.task.await.unwrap();
    assert_eq!(read_all(store, &m).await.len() as u64, last);
}

/// One upload that keeps failing (a stuck or slow PUT) holds back every seq past the upload
/// window: later segments may land, but only within `max_uploads` seqs of it. A writer killed
/// now leaves its holes among its last `W` seqs, where a restart's plan looks for them
/// (`head::plan_restart`). Bounding only the number in flight let seqs far above a stuck
/// one land, and the restart then took the deep hole for part of the durable prefix.
#[tokio::test]
async fn a_stuck_upload_holds_later_seqs_within_the_upload_window() {
    let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    // The first segment was seq 0; seq 1 keeps failing (transient: retried until it lands).
    flaky.fail_prefix(&m.segment_key(1), FailureKind::Transient);
    // Enough for ~15 segments of 64 KiB.
    let ops = (0..240u64)
        .map(|i| Op::Write {
            offset: i * 4096,
            data: noise(i, 4096),
        })
        .collect();
    let last = send(&w, &shared, ops);
    let window = config().max_uploads as u64;
    // Seq 0 and seqs 2..=window land (seq 1 holds one of the `window` slots).
    tokio::time::timeout(Duration::from_secs(5), async {
        while w.stats.segments_uploaded.load(Ordering::Acquire) < window {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    // Time for uploads past the window to land, if the writer started them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for seq in 1 + window..=15 {
        let key = m.segment_key(seq);
        assert!(
            flaky.inner().head(&key).await.is_err(),
            "seq {seq} landed while seq 1 was still missing: the hole is {} seqs below it",
            seq - 1
        );
    }
    flaky.clear_prefix();
    wait_durable(&w, last).await;
    w.intake.close();
    w.task.await.unwrap();
    assert_eq!(read_all(store, &m).await.len() as u64, last);
}

/// A crash gap deeper than the plan's look near the end (an older writer without the upload
/// window, or a stuck upload when it died) is still the previous writer's own when it lies
/// at or above the known end: the restart plugs it and continues the prefix before it,
/// instead of taking the gap for part of the durable prefix (silent loss for every reader).
#[tokio::test]
async fn a_restart_plugs_a_crash_gap_deeper_than_the_last_uploads() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared1 = shared();
    let w1 = start(store.clone(), &m, &shared1).await;
    // Each 70 KB write fills a 64 KiB segment alone: seq 1, then seqs 2..=12.
    let l1 = send(&w1, &shared1, vec![segment_filling_write(0)]);
    let last = send(&w1, &shared1, (1..=11).map(segment_filling_write).collect());
    wait_durable(&w1, last).await;
    w1.task.abort(); // the writer "dies"
                     // Seq 2 never landed; 10 seqs past it did (more than the plan's 2W look-back).
    store.delete_many(&[m.segment_key(2)]).await.unwrap();

    let prepared = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap();
    assert_eq!(prepared.plan.holes, vec![2]);
    assert_eq!(prepared.plan.next_seq, 13);
    assert_eq!(
        prepared.plan.next_lsn,
        l1 + 1,
        "the prefix ends before the gap"
    );
    let shared2 = shared();
    let w2 = prepared
        .start(Arc::new(SystemClock), config(), shared2.clone(), true)
        .await
        .unwrap();
    let l2 = send(&w2, &shared2, vec![write(0, 4096, 7)]);
    w2.intake.close();
    w2.task.await.unwrap();
    let records = read_all(store.clone(), &m).await;
    assert_eq!(
        records.len() as u64,
        l2,
        "gap-free LSNs to the new writer's last"
    );
    let kinds: Vec<_> = records.iter().map(|r| r.kind().name()).collect();
    assert_eq!(
        kinds,
        vec!["EPOCH", "WRITE", "EPOCH", "RESYNC_BEGIN", "WRITE"],
        "the orphans past the gap are skipped"
    );
}

/// A create whose answer is lost is retried; the retry meets our own object and accepts it.
#[tokio::test]
async fn an_ambiguous_create_is_recognised_as_ours() {
    let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    flaky.ambiguous_creates(1);
    let last = send(&w, &shared, vec![write(0, 4096, 9)]);
    wait_durable(&w, last).await;
    assert_eq!(shared.mode.mode(), Mode::Logging);
    assert_eq!(w.stats.upload_errors.load(Ordering::Acquire), 1);
}

/// A takeover while the old writer keeps writing (the case the per-upload fence check used
/// to cover): the new writer reserves `W` seqs past the end, so every later upload of the
/// old one meets a key it did not create, however many segments it has queued; the old
/// writer is fenced, marks its records dirty, and the journal holds only what it uploaded
/// before the takeover, then the new writer's.
#[tokio::test]
async fn a_takeover_fences_a_writer_that_keeps_writing_and_none_of_its_late_uploads_land() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared1 = shared();
    let w1 = start(store.clone(), &m, &shared1).await;
    let before = send(&w1, &shared1, vec![write(0, 4096, 1)]);
    wait_durable(&w1, before).await;

    // Another writer takes over; its predecessor may still upload (what
    // `lease::predecessor_may_still_write` says of a live or paused holder).
    let mut prepared = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap();
    let end = prepared.plan.next_seq;
    prepared.plan.reserve(u64::from(m.splay_width));
    assert_eq!(prepared.plan.next_seq, end + 3);
    assert_eq!(prepared.plan.holes, vec![end, end + 1, end + 2]);
    let shared2 = shared();
    let w2 = prepared
        .start(Arc::new(SystemClock), config(), shared2.clone(), false)
        .await
        .unwrap();

    // The old writer goes on: many segments' worth, W uploads at a time.
    let ops = (0..40).map(|i| Op::Write {
        offset: (3 << 20) + i * (64 << 10),
        data: noise(i, 64 << 10),
    });
    let lsn = send(&w1, &shared1, ops.collect());
    let mut rx = w1.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|p| p.released_lsn >= lsn),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(shared1.mode.mode(), Mode::Fenced);
    assert!(
        shared1.dirty.is_dirty(3),
        "the lost records' region is dirty"
    );
    assert!(w1
        .stats
        .stopped_reason()
        .unwrap()
        .contains("another writer: writer epoch 1 was fenced by epoch 2"));
    w1.intake.close();
    w1.task.await.unwrap();
    assert_eq!(shared1.pool.used(), 0);

    let after = send(&w2, &shared2, vec![write(8 << 20, 4096, 2)]);
    wait_durable(&w2, after).await;
    w2.intake.close();
    w2.task.await.unwrap();
    let records = read_all(store.clone(), &m).await;
    let kinds: Vec<_> = records.iter().map(|r| r.kind().name()).collect();
    assert_eq!(kinds, vec!["EPOCH", "WRITE", "EPOCH", "WRITE"]);
    // Nothing of the old epoch past the new writer's seqs: it never started those uploads.
    let next = end + 3 + 2;
    for seq in next..next + 8 {
        assert!(
            !crate::journal::head::segment_exists(store.as_ref(), &m, seq)
                .await
                .unwrap(),
            "seq {seq} exists"
        );
    }
}

/// Fenced by the lease keeper (a renewal found a newer epoch, nothing uploaded since): the
/// lease wrapper refuses the next upload, and the writer stops for good, releasing what it
/// holds, instead of retrying a refused upload forever.
#[tokio::test]
async fn a_writer_fenced_by_its_lease_renewal_stops_at_its_next_upload() {
    use crate::writer::lease::LeaseKeeper;
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let keeper = LeaseKeeper::new(
        store.clone(),
        Arc::new(SystemClock),
        Duration::from_millis(1500),
    );
    let shared = shared();
    let w = start(keeper.store(), &m, &shared).await;
    let (stats, mode) = (w.stats.clone(), shared.mode.clone());
    // What `PrimaryCore::fence` does.
    keeper
        .start(
            w.epoch,
            1,
            Box::new(move |reason| {
                stats.set_stopped(reason.clone());
                mode.fence(&reason);
            }),
        )
        .await;
    epoch::claim_next(store.as_ref(), 5).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while keeper.status().unwrap().state != "fenced" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a renewal finds epoch 2");
    let lsn = send(&w, &shared, vec![write(3 << 20, 4096, 1)]);
    let mut rx = w.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|p| p.released_lsn >= lsn),
    )
    .await
    .unwrap()
    .unwrap();
    w.intake.close();
    w.task.await.unwrap();
    assert_eq!(shared.mode.mode(), Mode::Fenced);
    assert!(
        shared.dirty.is_dirty(3),
        "the lost record's region is dirty"
    );
    assert!(w.stats.stopped_reason().unwrap().contains("found epoch 2"));
    assert_eq!(shared.pool.used(), 0);
    assert!(!crate::journal::head::segment_exists(store.as_ref(), &m, 1)
        .await
        .unwrap());
}

#[tokio::test]
async fn a_segment_key_taken_by_someone_else_fences_the_writer() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = start(store.clone(), &m, &shared).await;
    store
        .put_if_absent(&m.segment_key(1), Bytes::from_static(b"someone else"))
        .await
        .unwrap();
    send(&w, &shared, vec![write(0, 4096, 1)]);
    w.intake.close();
    w.task.await.unwrap();
    assert_eq!(shared.mode.mode(), Mode::Fenced);
    assert!(w.stats.stopped_reason().unwrap().contains("another writer"));
}

/// A writer dies with segment 2 missing but 3 uploaded: the next writer writes its EPOCH
/// segment after the orphan and plugs the hole, and a reader gets a gap-free journal that
/// skips the orphan.
#[tokio::test]
async fn a_restart_continues_after_the_prefix_and_plugs_holes() {
    let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared1 = shared();
    let w1 = start(store.clone(), &m, &shared1).await;
    // Each 70 KB write fills a 64 KiB segment alone. Seq 1 gets through; seq 2 never does;
    // seq 3 does (an orphan past the hole).
    let l1 = send(&w1, &shared1, vec![segment_filling_write(0)]);
    wait_durable(&w1, l1).await;
    flaky.fail_prefix("journal/2/", FailureKind::Permanent);
    send(
        &w1,
        &shared1,
        vec![segment_filling_write(1), segment_filling_write(2)],
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !crate::journal::head::segment_exists(store.as_ref(), &m, 3)
            .await
            .unwrap()
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    w1.task.abort(); // the writer "dies"
    flaky.clear_prefix();

    let prepared = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap();
    assert_eq!(prepared.plan.holes, vec![2]);
    assert_eq!(prepared.plan.next_seq, 4);
    assert_eq!(prepared.plan.next_lsn, l1 + 1);
    let shared2 = shared();
    let w2 = prepared
        .start(Arc::new(SystemClock), config(), shared2.clone(), true)
        .await
        .unwrap();
    assert_eq!(w2.epoch, 2);
    let l2 = send(&w2, &shared2, vec![write(0, 4096, 7)]);
    w2.intake.close();
    w2.task.await.unwrap();

    let records = read_all(store.clone(), &m).await;
    assert_eq!(records.len() as u64, l2);
    let kinds: Vec<_> = records.iter().map(|r| r.kind().name()).collect();
    assert_eq!(
        kinds,
        vec!["EPOCH", "WRITE", "EPOCH", "RESYNC_BEGIN", "WRITE"],
        "the orphan's records are skipped"
    );
    assert_eq!(records[2].op, Op::Epoch { epoch: 2 });
}

#[tokio::test]
async fn a_long_outage_releases_journal_waiters_until_the_store_answers() {
    let flaky = Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())));
    let store: Arc<dyn ObjectStore> = flaky.clone();
    let m = manifest();
    m.create(store.as_ref()).await.unwrap();
    let shared = shared();
    let w = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap()
        .start(
            Arc::new(SystemClock),
            WriterConfig {
                outage_bound: Duration::from_millis(100),
                ..config()
            },
            shared.clone(),
            false,
        )
        .await
        .unwrap();
    flaky.fail_all(Some(FailureKind::Transient));
    let lsn = send(&w, &shared, vec![write(0, 4096, 1)]);
    let mut rx = w.progress.clone();
    tokio::time::timeout(
        Duration::from_secs(5),
        rx.wait_for(|p| p.released_lsn >= lsn),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(w.stats.outage.load(Ordering::Acquire));
    assert!(w.progress.borrow().durable_lsn < lsn);
    flaky.heal();
    wait_durable(&w, lsn).await;
    assert!(!w.stats.outage.load(Ordering::Acquire));
    assert_eq!(w.progress.borrow().released_lsn, 0);
    assert_eq!(shared.mode.mode(), Mode::Logging);
}

/// `--compress auto` shrinks compressible payloads; `--compress off` stores them raw.
#[tokio::test]
async fn compression_follows_the_setting() {
    for compress in [true, false] {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let m = manifest();
        m.create(store.as_ref()).await.unwrap();
        let shared = shared();
        let w = prepare(store.clone(), m.clone(), &SystemClock, false)
            .await
            .unwrap()
            .start(
                Arc::new(SystemClock),
                WriterConfig {
                    compress,
                    ..config()
                },
                shared.clone(),
                false,
            )
            .await
            .unwrap();
        send(&w, &shared, vec![write(0, 8192, 0x61)]);
        w.intake.close();
        w.task.await.unwrap();
        let index = crate::journal::segment::read_index(
            store.as_ref(),
            &m.segment_key(1),
            &crate::journal::segment::Expected {
                uuid: m.uuid,
                seq: 1,
                first_lsn: Some(2),
            },
        )
        .await
        .unwrap();
        assert_eq!(index.entries[0].compressed, compress, "compress={compress}");
    }
}

/// Segments 0..12 of a stopped writer whose lease recorded 12 as durable: seq 5 deleted
/// behind its back is a hole, which `prepare` refuses (claiming no epoch) and names; with
/// `abandon_after_hole` it plugs every missing seq from 5 on and LSNs continue after seq 4.
/// The same gap above what the lease recorded is the writer's own crash gap: plugged.
#[tokio::test]
async fn a_hole_below_the_leases_durable_seq_refuses_the_restart_unless_abandoned() {
    use crate::journal::lease::{self, Lease};
    use crate::journal::segment::encode_segment;
    use crate::journal::verify::verify_journal;

    let journal = |durable_next_seq: u64| async move {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let m = manifest();
        m.create(store.as_ref()).await.unwrap();
        let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
        for seq in 0..12u64 {
            let record = Record {
                lsn: seq + 1,
                timestamp_ns: seq + 1,
                dev: 0,
                op: Op::Flush,
            };
            let body = encode_segment(m.uuid, claim.epoch, seq, seq + 1, &[record]).unwrap();
            store
                .put_if_absent(&m.segment_key(seq), body)
                .await
                .unwrap();
        }
        let mut l = Lease::new(claim.epoch, 1, 2, 15_000);
        l.durable_next_seq = durable_next_seq;
        l.released = true;
        lease::write(store.as_ref(), &l).await.unwrap();
        (store, m)
    };

    // A hole: deleted below what the lease recorded as durable.
    let (store, m) = journal(12).await;
    store.delete_many(&[m.segment_key(5)]).await.unwrap();
    let err = verify_journal(store.as_ref(), &m, None, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::Hole {
                first_missing: 5,
                known_end: 12,
                ..
            }
        ),
        "{err}"
    );
    let err = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("journal hole at seq 5"), "{msg}");
    assert!(msg.contains("--abandon-after-hole"), "{msg}");
    assert_eq!(epoch::current_epoch(store.as_ref()).await.unwrap(), Some(1));

    let prepared = prepare(store.clone(), m.clone(), &SystemClock, true)
        .await
        .unwrap();
    assert_eq!(prepared.abandoned, Some(5));
    assert_eq!(prepared.plan.holes, vec![5]);
    assert_eq!((prepared.plan.next_seq, prepared.plan.next_lsn), (12, 6));
    let shared = shared();
    let w = prepared
        .start(Arc::new(SystemClock), config(), shared.clone(), true)
        .await
        .unwrap();
    w.intake.close();
    w.task.await.unwrap();
    let report = verify_journal(store.as_ref(), &m, None, |_| {})
        .await
        .unwrap();
    assert_eq!(report.plugs, 1);
    assert_eq!(report.next_seq, 13);

    // The writer's own crash gap: seq 10 was in flight above the recorded durable seq 9.
    let (store, m) = journal(9).await;
    store.delete_many(&[m.segment_key(10)]).await.unwrap();
    let prepared = prepare(store.clone(), m.clone(), &SystemClock, false)
        .await
        .unwrap();
    assert_eq!(prepared.abandoned, None);
    assert_eq!(prepared.plan.holes, vec![10]);
}
