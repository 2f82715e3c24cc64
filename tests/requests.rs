//! The request bill (issue 18), asserted with the counting store in front of the journal:
//!
//! - idle: an agent at the head, over 60 s of simulated time (a manual clock driven by its
//!   own poll timer), plus the writer's lease renewals measured over a short real window
//!   and scaled to the default lease term: together at most 1 request/s, no LIST;
//! - bulk: 1 GiB of 1 MiB writes through the primary core (in-process, memory store, the
//!   lease keeper's store as `serve` wires it), then one agent catching up from the start:
//!   at most 2.2 requests per 8 MiB segment for write and replay together, no HEAD per
//!   upload, no LIST once started, and the replica equal to the primary.
//!
//! In-process rather than the binaries: a debug `serve` behind NBD takes minutes for 1 GiB,
//! and the counting store sees exactly the calls a store would get (one call, one request
//! on S3).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use tinylag::block::file::{FileDevice, FileOptions};
use tinylag::block::BlockDevice;
use tinylag::clock::{Clock, ManualClock, SystemClock};
use tinylag::journal::consumer;
use tinylag::journal::epoch;
use tinylag::journal::manifest::{Manifest, ManifestParams};
use tinylag::journal::reader::JournalReader;
use tinylag::replayer::status::AgentState;
use tinylag::replayer::{
    Agent, AgentConfig, BatchLimits, PollPolicy, ReplicaFile, Timer, TokioTimer,
};
use tinylag::store::counting::{CountingStore, RequestCounts};
use tinylag::store::memory::MemoryStore;
use tinylag::store::ObjectStore;
use tinylag::writer::lease::LeaseKeeper;
use tinylag::writer::{AckMode, JournalSetup, Labels, Mode, PrimaryCore, WriterConfig};

const MIB: u64 = 1 << 20;
/// `serve --lease-time`'s default.
const DEFAULT_LEASE: Duration = Duration::from_secs(15);

fn manifest(size: u64) -> Manifest {
    Manifest::new(
        &ManifestParams {
            device_name: "disk0".into(),
            size,
            block_size: 4096,
            region_size: 4 * MIB,
            splay_width: 4,
            segment_size: 8 * MIB,
        },
        1,
    )
    .unwrap()
}

/// `after - before`, kind by kind.
fn delta(after: RequestCounts, before: RequestCounts) -> RequestCounts {
    RequestCounts {
        put_if_absent: after.put_if_absent - before.put_if_absent,
        put: after.put - before.put,
        get: after.get - before.get,
        get_range: after.get_range - before.get_range,
        get_tail: after.get_tail - before.get_tail,
        head: after.head - before.head,
        list: after.list - before.list,
        delete_many: after.delete_many - before.delete_many,
        deleted_keys: after.deleted_keys - before.deleted_keys,
    }
}

/// A poll timer on a manual clock: it notes the requests counted when simulated time
/// first passes `mark`, and stops time at `until` (a sleep that would pass it moves the
/// clock there and never returns), so the agent's requests inside the window can be read
/// once it is parked.
#[derive(Debug)]
struct WindowTimer {
    clock: Arc<ManualClock>,
    counting: Arc<CountingStore>,
    mark: u64,
    at_mark: Arc<Mutex<Option<RequestCounts>>>,
    until: u64,
    parked: Arc<AtomicBool>,
}

#[async_trait]
impl Timer for WindowTimer {
    async fn sleep(&self, d: Duration) {
        let now = self.clock.now_ns();
        let then = now.saturating_add(d.as_nanos() as u64);
        if then >= self.mark {
            let mut at_mark = self.at_mark.lock().unwrap();
            if at_mark.is_none() {
                *at_mark = Some(self.counting.counts());
            }
        }
        if then > self.until {
            self.clock.set(self.until.max(now));
            self.parked.store(true, Ordering::Release);
            std::future::pending::<()>().await;
        }
        self.clock.advance(d);
        tokio::task::yield_now().await;
    }
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Journal requests of an idle agent (at the head of an empty journal) from `from` to `to`
/// of simulated time after it started polling. Its sign-of-life commit runs on real time
/// (only a live process should look alive), so it is not in the window: the caller adds one
/// per [`PollPolicy::idle_commit`].
async fn idle_agent_polls(from: Duration, to: Duration) -> RequestCounts {
    let inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let counting = Arc::new(CountingStore::new(inner));
    let store: Arc<dyn ObjectStore> = counting.clone();
    let m = manifest(64 * MIB);
    m.create(store.as_ref()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (replica, created) =
        ReplicaFile::open_or_create(&dir.path().join("r.img"), 64 * MIB).unwrap();
    let t0 = 1_000_000_000_000_000_000u64;
    let clock = Arc::new(ManualClock::new(t0));
    let parked = Arc::new(AtomicBool::new(false));
    let at_mark = Arc::new(Mutex::new(None));
    let timer = WindowTimer {
        clock: clock.clone(),
        counting: counting.clone(),
        mark: t0 + from.as_nanos() as u64,
        at_mark: at_mark.clone(),
        until: t0 + to.as_nanos() as u64,
        parked: parked.clone(),
    };
    let agent = Agent::open(
        JournalReader::new(store, m),
        None,
        Arc::new(replica),
        created,
        AgentConfig {
            name: "dr".into(),
            replica: "r.img".into(),
            delay: Duration::ZERO,
            until_ns: None,
            once: false,
            limits: BatchLimits::default(),
            poll: PollPolicy::default(),
        },
        clock.clone(),
        Arc::new(timer),
    )
    .await
    .unwrap();
    let (_stop, rx) = watch::channel(false);
    let task = tokio::spawn(agent.run(rx));
    wait_for(
        "the agent reaches the window's end",
        Duration::from_secs(30),
        || parked.load(Ordering::Acquire),
    )
    .await;
    let end = counting.counts();
    task.abort();
    let start = at_mark
        .lock()
        .unwrap()
        .expect("the window's start was passed");
    delta(end, start)
}

/// Idle: the agent's polls back off and the lease costs two requests a renewal; with the
/// defaults, the two together stay under one request a second, with no LIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_serve_and_one_agent_cost_at_most_one_request_a_second() {
    // The agent after a minute at the head, for a minute.
    let polls = idle_agent_polls(Duration::from_secs(60), Duration::from_secs(120)).await;
    assert_eq!(
        polls.total(),
        polls.get,
        "only GETs of the next segment: {polls:?}"
    );
    assert!(
        polls.get <= 13,
        "polls back off to one per 5 s when idle: {polls:?}"
    );
    let commits = 60.0 / PollPolicy::default().idle_commit.as_secs_f64();
    let agent_per_minute = polls.total() as f64 + commits;

    // The lease, over a short real window with a short term, scaled to the default term.
    let inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let counting = Arc::new(CountingStore::new(inner));
    let store: Arc<dyn ObjectStore> = counting.clone();
    let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
    let ttl = Duration::from_millis(1500);
    let keeper = LeaseKeeper::new(store.clone(), Arc::new(SystemClock), ttl);
    keeper.start(claim.epoch, 1, Box::new(|_| {})).await;
    let first = keeper.status().unwrap().renewals;
    let before = counting.counts();
    wait_for("ten renewals", Duration::from_secs(30), || {
        keeper.status().unwrap().renewals >= first + 10
    })
    .await;
    let lease = delta(counting.counts(), before);
    let renewals = keeper.status().unwrap().renewals - first;
    keeper.release().await;
    assert_eq!(lease.list, 0, "{lease:?}");
    // Each renewal: the fence check and the PUT (one more may be on its way).
    assert!(
        lease.total() <= 2 * (renewals + 1),
        "{lease:?} for {renewals} renewals"
    );
    let renewals_per_minute = 60.0 / (DEFAULT_LEASE.as_secs_f64() / 3.0);
    let lease_per_minute = renewals_per_minute * lease.total() as f64 / renewals as f64;

    let per_second = (agent_per_minute + lease_per_minute) / 60.0;
    eprintln!(
        "idle: agent {polls:?} + {commits} commit a minute, lease {lease_per_minute:.1} a \
         minute: {per_second:.2} requests/s"
    );
    assert!(per_second <= 1.0, "{per_second:.2} requests/s");
}

/// 1 GiB of 1 MiB writes, then one agent catching up: about one PUT and one GET per 8 MiB
/// segment, nothing per upload beyond its create, no LIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_of_writes_and_its_catch_up_cost_at_most_2_2_requests_a_segment() {
    const DEVICE: u64 = 256 * MIB;
    const WRITES: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let counting = Arc::new(CountingStore::new(inner.clone()));
    let store: Arc<dyn ObjectStore> = counting.clone();
    let m = manifest(DEVICE);
    m.create(store.as_ref()).await.unwrap();

    // The primary core as `serve` starts it: through the lease keeper's store.
    let primary = dir.path().join("primary.img");
    FileDevice::create_sparse(&primary, DEVICE).unwrap();
    let device: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&primary, FileOptions::new(4096)).unwrap());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let keeper = LeaseKeeper::new(store.clone(), clock.clone(), DEFAULT_LEASE);
    let setup = JournalSetup {
        store: keeper.store(),
        manifest: m.clone(),
        writer: WriterConfig::for_manifest(&m),
        pool_size: 256 * MIB,
        ack: AckMode::parse("async", None).unwrap(),
        clock: clock.clone(),
        primary_path: primary.clone(),
        activity_log: Some(dir.path().join("primary.img.tinylag-al")),
    };
    let core = Arc::new(
        PrimaryCore::start(device, Labels::default(), Some(setup))
            .await
            .unwrap(),
    );
    keeper
        .start(core.epoch().unwrap(), clock.now_ns(), Box::new(|_| {}))
        .await;
    let started = counting.counts();

    // 1 GiB of incompressible 1 MiB writes over the device four times, acknowledged at
    // once (`--ack async`, the default); every 128 MiB the test waits for the journal, so
    // the pool never fills (which would turn writes into a resync).
    for i in 0..WRITES {
        let data = Bytes::from(noise(i, MIB as usize));
        core.write((i * MIB) % DEVICE, data, false).await.unwrap();
        if (i + 1) % 128 == 0 {
            assert!(core.wait_durable(core.head_lsn()).await);
        }
    }
    let last_lsn = core.durable_lsn();
    assert_eq!(last_lsn, core.head_lsn());
    assert_eq!(core.mode(), Mode::Logging, "every write journaled");
    let written = delta(counting.counts(), started);

    // The writer at rest asks for nothing (the lease aside, which has its own budget).
    let rest = counting.counts();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_rest = delta(counting.counts(), rest);
    assert_eq!(
        at_rest.total(),
        at_rest.head + at_rest.put,
        "only lease renewals at rest: {at_rest:?}"
    );

    // One agent from the start of the journal, counted on its own (the lease renews on).
    let agent_counting = Arc::new(CountingStore::new(inner.clone()));
    let agent_store: Arc<dyn ObjectStore> = agent_counting.clone();
    let counted_before_agent = counting.counts();
    let replica_path = dir.path().join("replica.img");
    let (replica, created) = ReplicaFile::open_or_create(&replica_path, DEVICE).unwrap();
    let agent = Agent::open(
        JournalReader::new(agent_store, m.clone()),
        None,
        Arc::new(replica),
        created,
        AgentConfig {
            name: "dr".into(),
            replica: replica_path.display().to_string(),
            delay: Duration::ZERO,
            until_ns: None,
            once: false,
            limits: BatchLimits::default(),
            poll: PollPolicy::default(),
        },
        clock.clone(),
        Arc::new(TokioTimer),
    )
    .await
    .unwrap();
    let opened = agent_counting.counts();
    let board = agent.board();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(agent.run(rx));
    wait_for("the agent caught up", Duration::from_secs(600), || {
        board.state() == AgentState::Idle
    })
    .await;
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
    let replayed = delta(agent_counting.counts(), opened);
    let opening = opened;
    let renewals = delta(counting.counts(), counted_before_agent);
    let position = consumer::load(inner.as_ref(), "dr").await.unwrap();
    assert_eq!(position.applied_lsn, last_lsn);
    keeper.release().await;
    core.shutdown(Duration::from_secs(30)).await;

    let segments = position.next_seq;
    let total = written.total() + renewals.total() + replayed.total();
    // Per 8 MiB of writes, the manifest's segment size (a segment closed early by the
    // test's waits holds less).
    let per_segment = total as f64 / (WRITES * MIB / m.segment_size) as f64;
    eprintln!(
        "{segments} segments: write {written:?}, agent open {opening:?}, catch-up \
         {replayed:?}, lease meanwhile {renewals:?}: {total} requests, {per_segment:.2} a \
         segment of 8 MiB"
    );
    assert!(segments >= 128, "{segments} segments for 1 GiB");
    assert_eq!(written.list, 0, "{written:?}");
    assert_eq!(replayed.list, 0, "{replayed:?}");
    assert!(
        written.head <= written.put + 1,
        "no HEAD per upload, only the lease renewals' fence checks: {written:?}"
    );
    assert_eq!(replayed.head, 0, "no HEAD before a GET: {replayed:?}");
    assert!(
        replayed.put <= 1 + replayed.get / 16,
        "commits at most every few seconds, not per batch: {replayed:?}"
    );
    assert!(per_segment <= 2.2, "{per_segment:.2} requests a segment");
    assert_same(&primary, &replica_path);
}

/// Deterministic incompressible bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn assert_same(a: &std::path::Path, b: &std::path::Path) {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut offset = 0u64;
    loop {
        let na = fa.read(&mut ba).unwrap();
        let nb = fb.read(&mut bb).unwrap();
        assert_eq!(na, nb, "sizes differ at {offset}");
        if na == 0 {
            return;
        }
        assert!(
            ba[..na] == bb[..nb],
            "the replica differs in the MiB at {offset}"
        );
        offset += na as u64;
    }
}
