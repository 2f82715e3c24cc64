//! The request bill's measurements, shared by `tests/requests.rs` (which asserts the
//! budget) and `examples/request_bill.rs` (which `bench/requests.sh` runs on this tree and
//! on the build before, for BENCHMARKS.md). Everything is in-process on the memory store
//! behind the counting store: one call counted is one request on S3.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use tinylag::block::file::{self, FileOptions};
use tinylag::block::BlockDevice;
use tinylag::clock::{Clock, ManualClock, SystemClock};
use tinylag::journal::consumer;
use tinylag::journal::epoch;
use tinylag::journal::JournalReader;
use tinylag::journal::{Manifest, ManifestParams};
use tinylag::replayer::AgentState;
use tinylag::replayer::{
    Agent, AgentConfig, BatchLimits, PollPolicy, ReplicaFile, SeedChoice, Timer, TokioTimer,
};
use tinylag::store::MemoryStore;
use tinylag::store::ObjectStore;
use tinylag::store::{CountingStore, RequestCounts};
use tinylag::writer::resync_requests::{self, ResyncTarget};
use tinylag::writer::LeaseKeeper;
use tinylag::writer::{AckMode, HookError, JournalSetup, Labels, Mode, PrimaryCore, WriterConfig};

use super::nbd::pattern;

pub const MIB: u64 = 1 << 20;
/// `serve --lease-time`'s default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

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
pub fn delta(after: RequestCounts, before: RequestCounts) -> RequestCounts {
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

pub async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
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
pub async fn idle_agent_polls(from: Duration, to: Duration) -> RequestCounts {
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
            // A replica file created just now: nothing to vouch for.
            seed: SeedChoice::Refuse,
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

/// Journal requests of the writer's lease keeper over at least `renewals` renewals with a
/// term of `ttl` (real time), and how many renewals that was.
pub async fn lease_requests(ttl: Duration, renewals: u64) -> (RequestCounts, u64) {
    let inner: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let counting = Arc::new(CountingStore::new(inner));
    let store: Arc<dyn ObjectStore> = counting.clone();
    let claim = epoch::claim_next(store.as_ref(), 1).await.unwrap();
    let keeper = LeaseKeeper::new(store.clone(), Arc::new(SystemClock), ttl);
    keeper.start(claim.epoch, 1, Box::new(|_| {})).await;
    // As `serve` runs it: the resync requests' doorbell looked at after each renewal.
    let (stop, shutdown) = watch::channel(false);
    let requests = tokio::spawn(resync_requests::watch(
        store.clone(),
        keeper.renewals(),
        Arc::new(NoRequests),
        shutdown,
    ));
    let first = keeper.status().unwrap().renewals;
    let before = counting.counts();
    wait_for(
        "the renewals",
        Duration::from_secs(30 + renewals * ttl.as_secs()),
        || keeper.status().unwrap().renewals >= first + renewals,
    )
    .await;
    let lease = delta(counting.counts(), before);
    let done = keeper.status().unwrap().renewals - first;
    stop.send_replace(true);
    requests.await.unwrap();
    keeper.release().await;
    (lease, done)
}

/// A writer without a core: the idle bill's request watcher finds no request to serve.
struct NoRequests;

#[async_trait]
impl ResyncTarget for NoRequests {
    fn region_count(&self) -> u64 {
        0
    }
    fn resync_regions(&self, _: &[u64]) -> Result<(), HookError> {
        Ok(())
    }
    async fn resync_durable(&self) -> bool {
        false
    }
}

/// Requests an idle `serve` and one idle agent make a minute with the default settings:
/// the agent's polls (after a minute at the head, over a simulated minute) and its
/// sign-of-life commit, and the lease renewals scaled from a short real window to the
/// default term. Returns (agent polls, agent requests a minute, lease requests a minute,
/// lease requests over the window, renewals in the window).
pub async fn idle_minute() -> (RequestCounts, f64, f64, RequestCounts, u64) {
    let polls = idle_agent_polls(Duration::from_secs(60), Duration::from_secs(120)).await;
    let commits = 60.0 / PollPolicy::default().idle_commit.as_secs_f64();
    let agent_per_minute = polls.total() as f64 + commits;
    let (lease, renewals) = lease_requests(Duration::from_millis(1500), 10).await;
    let renewals_per_minute = 60.0 / (DEFAULT_LEASE.as_secs_f64() / 3.0);
    let lease_per_minute = renewals_per_minute * lease.total() as f64 / renewals as f64;
    (polls, agent_per_minute, lease_per_minute, lease, renewals)
}

/// What 1 GiB of 1 MiB writes and one agent catching up cost (see
/// [`gib_bill`]). The primary and the replica stay in `dir` for comparison.
#[derive(Debug)]
pub struct GibBill {
    /// Holds the files until the bill is dropped.
    pub _dir: tempfile::TempDir,
    pub primary: PathBuf,
    pub replica: PathBuf,
    /// Journal segments written (some closed early by the waits that keep the pool from
    /// filling).
    pub segments: u64,
    /// The 8 MiB segments 1 GiB makes (the manifest's segment size).
    pub full_segments: u64,
    pub last_lsn: u64,
    pub applied_lsn: u64,
    /// The writer's requests while writing (the lease's renewals included).
    pub written: RequestCounts,
    /// The writer at rest for a second after the writes.
    pub at_rest: RequestCounts,
    /// Opening the agent (registering the consumer).
    pub opening: RequestCounts,
    /// The agent's catch-up, up to its stop.
    pub replayed: RequestCounts,
    /// The lease's requests during the catch-up.
    pub renewals: RequestCounts,
    pub mode: Mode,
}

impl GibBill {
    /// Write and replay together, opening the agent aside, and the lease's renewals during
    /// the catch-up aside too: they cost per second, not per segment (the idle test holds
    /// them to their own budget), and a loaded machine's slower catch-up made them push this
    /// per-segment figure over its bound (2.20 at load 6, 2.16 quiet).
    pub fn total(&self) -> u64 {
        self.written.total() + self.replayed.total()
    }
}

/// 1 GiB of incompressible 1 MiB writes through the primary core (the lease keeper's store,
/// as `serve` wires it; `--ack async`), then one agent from the start of the journal until
/// it is idle at the head.
pub async fn gib_bill() -> GibBill {
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
    file::create_sparse(&primary, DEVICE).unwrap();
    let device: Arc<dyn BlockDevice> = file::open(&primary, FileOptions::new(4096)).unwrap();
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
        member_paths: Vec::new(),
        activity_log: Some(dir.path().join("primary.img.tinylag-al")),
        abandon_after_hole: false,
        claim: Default::default(),
        on_fence: Default::default(),
        promotion: None,
    };
    let core = Arc::new(
        PrimaryCore::start(device, Labels::default(), Some(setup))
            .await
            .unwrap(),
    );
    keeper
        .start(core.epoch().unwrap(), clock.now_ns(), Box::new(|_| {}))
        .await;
    let (_stop_requests, shutdown) = watch::channel(false);
    tokio::spawn(resync_requests::watch(
        store.clone(),
        keeper.renewals(),
        core.clone(),
        shutdown,
    ));
    let started = counting.counts();

    // 1 GiB of incompressible 1 MiB writes over the device four times, acknowledged at
    // once (`--ack async`, the default); every 128 MiB the test waits for the journal, so
    // the pool never fills (which would turn writes into a resync).
    for i in 0..WRITES {
        let data = Bytes::from(pattern(i, MIB as usize));
        core.write((i * MIB) % DEVICE, data, false).await.unwrap();
        if (i + 1) % 128 == 0 {
            assert!(core.wait_durable(core.head_lsn()).await);
        }
    }
    let last_lsn = core.durable_lsn();
    let mode = core.mode();
    let written = delta(counting.counts(), started);

    // The writer at rest asks for nothing (the lease aside, which has its own budget).
    let rest = counting.counts();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_rest = delta(counting.counts(), rest);

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
            // A replica file created just now: nothing to vouch for.
            seed: SeedChoice::Refuse,
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
    keeper.release().await;
    core.shutdown(Duration::from_secs(30)).await;

    GibBill {
        segments: position.next_seq,
        full_segments: WRITES * MIB / m.segment_size,
        last_lsn,
        applied_lsn: position.applied_lsn,
        written,
        at_rest,
        opening,
        replayed,
        renewals,
        mode,
        _dir: dir,
        primary,
        replica: replica_path,
    }
}
