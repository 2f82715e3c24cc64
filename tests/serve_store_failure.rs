//! The journal store goes away under a running `tinylag serve` (an S3 server that is
//! stopped): the primary keeps serving at full speed, changes that no longer fit the pool
//! are marked dirty, the mode turns `forward-part`, memory stays under the cap, and
//! `--ack journal` stops waiting once the outage passes its bound.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::{init, tinylag_ok, Daemon};
use support::nbd::{pattern, qemu_io_ok, run_ok};
use support::procs::path;
use support::s3::{S3Server, S3ServerKind, SECRET_KEY};

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_store_never_blocks_the_primary_and_memory_stays_capped() {
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let env = s3.child_env();
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = s3.uri("dead-store");
    init(&journal, &primary, "128M", &["--segment-size", "1M"], &env);
    let pool = 8 * MIB;
    let mut daemon = Daemon::start(
        &primary,
        &journal,
        &["--pool-size", "8M", "--drain-timeout", "2s"],
        &env,
    );
    qemu_io_ok(&daemon.uri(), &["write -P 1 0 1M", "flush"]);
    daemon.wait_status(
        Duration::from_secs(20),
        "the first write to be durable",
        |s| s["durable_lsn"] == s["head_lsn"],
    );
    assert_eq!(daemon.status()["mode"], "logging");

    drop(s3); // the store is gone

    // 96 MiB of new data, twelve times the pool: every write succeeds, promptly.
    let source = dir.path().join("source.bin");
    let data = pattern(3, (96 * MIB) as usize);
    std::fs::write(&source, &data).unwrap();
    let started = Instant::now();
    run_ok(Command::new("nbdcopy").args([
        "--connections=2",
        "--flush",
        path(&source),
        &daemon.uri(),
    ]));
    let took = started.elapsed();
    eprintln!("copy took {took:?}");
    assert!(took < Duration::from_secs(60), "the copy took {took:?}");
    let on_primary = std::fs::read(&primary).unwrap();
    assert!(
        on_primary[..(96 * MIB) as usize] == data[..],
        "the primary holds the data"
    );

    let status = daemon.wait_status(Duration::from_secs(30), "upload errors", |s| {
        s["upload_errors"]["count"].as_u64().unwrap() > 0
    });
    assert_eq!(status["mode"], "forward-part", "{status:#}");
    let dirty = status["dirty"]["regions"].as_u64().unwrap();
    assert!(
        dirty >= 20,
        "most of the 24 regions written went dirty: {status:#}"
    );
    let peak = status["pool"]["peak"].as_u64().unwrap();
    assert!(
        peak <= pool + 4096,
        "pool peak {peak} over the cap: {status:#}"
    );
    let last_error = status["upload_errors"]["last"].as_str().unwrap();
    assert!(!last_error.contains(SECRET_KEY));
    let (rss, hwm) = daemon.memory();
    eprintln!(
        "daemon memory: VmRSS {} MiB, VmHWM {} MiB",
        rss / MIB,
        hwm / MIB
    );
    assert!(
        hwm <= pool + 64 * MIB,
        "peak RSS {} MiB is not bounded by the pool ({} MiB) plus a margin",
        hwm / MIB,
        pool / MIB
    );
    let text = tinylag_ok(&["status", "--primary", path(&primary)], &env);
    assert!(text.starts_with("WARNING: mode forward-part"), "{text}");
    assert!(text.contains("replicas are NOT consistent"), "{text}");

    // Stopping cannot drain to a dead store: it says so, within the bound, and exits 0.
    let started = Instant::now();
    let log = daemon.stop_ok();
    eprintln!("stop took {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(log.contains("could not be journaled"), "{log}");
    assert!(!log.contains(SECRET_KEY), "the log shows the secret key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_journal_waits_for_the_store_then_stops_waiting_after_the_outage_bound() {
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let env = s3.child_env();
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = s3.uri("outage");
    init(&journal, &primary, "64M", &[], &env);
    let mut daemon = Daemon::start(
        &primary,
        &journal,
        &[
            "--ack",
            "journal",
            "--store-outage",
            "2s",
            "--drain-timeout",
            "1s",
        ],
        &env,
    );
    qemu_io_ok(&daemon.uri(), &["write -P 1 0 64k"]);
    let status = daemon.status();
    assert_eq!(
        status["durable_lsn"], status["head_lsn"],
        "acknowledged means durable"
    );
    drop(s3);
    let started = Instant::now();
    qemu_io_ok(
        &daemon.uri(),
        &["write -P 2 64k 64k", "write -P 3 128k 64k"],
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(10),
        "the first write waited for the outage bound, then none did: {took:?}"
    );
    let status = daemon.status();
    assert_eq!(status["upload_errors"]["outage"], true, "{status:#}");
    assert_eq!(status["ack"]["effective"], "async", "{status:#}");
    assert_eq!(
        status["mode"], "logging",
        "queued in the pool, not lost: {status:#}"
    );
    daemon.stop_ok();
}
