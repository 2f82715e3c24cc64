//! Several connections with deep queues writing overlapping ranges through `tinylag serve`:
//! the range lock keeps the journal's order the disk's order, so the journal still rebuilds
//! the primary exactly.

mod support;

use std::path::Path;
use std::process::Command;

use support::daemon::{init, Daemon};
use support::nbd::run_ok;
use support::oracle::{assert_same_image, rebuild_local};
use support::procs::path;

/// fio with `jobs` connections of queue depth 32, random sizes from 4 KiB to 64 KiB, all in
/// the same 4 MiB: most writes overlap writes in flight on other connections.
fn fio_overlapping(uri: &str, workdir: &Path, jobs: u32, rw: &str) -> String {
    let out = run_ok(Command::new("fio").current_dir(workdir).args([
        "--name=overlap",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        &format!("--rw={rw}"),
        "--bsrange=4k-64k",
        "--iodepth=32",
        &format!("--numjobs={jobs}"),
        "--size=4m",
        "--io_size=24m",
        "--norandommap",
        "--randrepeat=0",
        "--group_reporting",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("err= 0"), "fio reported errors:\n{text}");
    text
}

#[test]
fn overlapping_writes_from_many_connections_replay_to_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(
        path(&journal),
        &primary,
        "64M",
        &["--segment-size", "1M"],
        &[],
    );
    let mut daemon = Daemon::start(&primary, path(&journal), &["--linger", "20ms"], &[]);
    fio_overlapping(&daemon.uri(), dir.path(), 4, "randwrite");
    // Then writes and trims on the same range at once, from separate fio processes: the
    // journal must hold them in the disk's order too.
    let uri = daemon.uri();
    std::thread::scope(|s| {
        let writes = s.spawn(|| fio_overlapping(&uri, dir.path(), 3, "randwrite"));
        let trims = s.spawn(|| fio_overlapping(&uri, dir.path(), 2, "randtrim"));
        writes.join().unwrap();
        trims.join().unwrap();
    });
    let status = daemon.status();
    assert_eq!(status["mode"], "logging", "{status:#}");
    assert!(status["head_lsn"].as_u64().unwrap() > 1000, "{status:#}");
    daemon.stop_ok();
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(&journal, &rebuilt, None);
    assert_same_image(&rebuilt, &primary);
}

#[test]
fn ack_journal_under_a_deep_queue_is_durable_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(path(&journal), &primary, "64M", &[], &[]);
    let mut daemon = Daemon::start(&primary, path(&journal), &["--ack", "journal"], &[]);
    fio_overlapping(&daemon.uri(), dir.path(), 2, "randwrite");
    let status = daemon.status();
    // Every write was acknowledged only once durable, so nothing is left behind.
    assert_eq!(status["durable_lsn"], status["head_lsn"], "{status:#}");
    assert_eq!(status["ack"]["effective"], "journal");
    daemon.stop_ok();
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(&journal, &rebuilt, None);
    assert_same_image(&rebuilt, &primary);
}

/// The primary's I/O engines `serve` can run on here: io_uring when this kernel and process
/// allow it, and always the thread-pool fallback.
fn engines() -> Vec<&'static str> {
    match tinylag::block::engine::probe_uring() {
        Ok(()) => vec!["uring", "threads"],
        Err(reason) => {
            eprintln!("io_uring unavailable ({reason}): testing the threads engine only");
            vec!["threads"]
        }
    }
}

/// On each engine: six connections at once, four writing random data of random sizes over
/// the same 4 MiB (most writes overlap writes in flight elsewhere) and two writing their own
/// megabyte with fio's checksummed verify (every block read back through the server and
/// checked). Then the journal rebuilds the primary exactly: overlapping writes reached the
/// journal in the disk's order on this engine too.
#[test]
fn overlapping_and_verified_writes_journal_in_disk_order_on_every_engine() {
    for engine in engines() {
        let dir = tempfile::tempdir().unwrap();
        let primary = dir.path().join("primary.img");
        let journal = dir.path().join("journal");
        init(
            path(&journal),
            &primary,
            "64M",
            &["--segment-size", "1M"],
            &[],
        );
        let env = [("TINYLAG_IO_ENGINE", engine.to_string())];
        let mut daemon = Daemon::start(&primary, path(&journal), &["--linger", "20ms"], &env);
        let out = run_ok(Command::new("fio").current_dir(dir.path()).args([
            "--ioengine=nbd",
            &format!("--uri={}", daemon.uri()),
            "--iodepth=32",
            "--randrepeat=0",
            "--group_reporting",
            // The overlapping writers (blocks may be written many times, also by one job
            // with two writes in flight: only the journal comparison can judge these).
            "--name=overlap",
            "--norandommap",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--numjobs=4",
            "--size=4m",
            "--io_size=16m",
            // The verifying writers, each on its own megabyte after them, every block
            // written once.
            "--name=checked",
            "--rw=randwrite",
            "--bs=4k",
            "--numjobs=2",
            "--offset=4m",
            "--offset_increment=1m",
            "--size=1m",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("err= 0"),
            "[{engine}] fio reported errors:\n{text}"
        );
        // fio exits non-zero on a verify mismatch (run_ok); make sure the reads happened.
        assert!(
            text.contains("read: IOPS="),
            "[{engine}] fio never read back what it wrote:\n{text}"
        );
        let status = daemon.status();
        assert_eq!(status["mode"], "logging", "[{engine}] {status:#}");
        daemon.stop_ok();
        let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        let expected = match engine {
            "uring" => "primary I/O engine: io_uring",
            _ => "primary I/O engine: threads",
        };
        assert!(
            log.contains(expected),
            "[{engine}] log lacks {expected:?}:\n{log}"
        );
        let rebuilt = dir.path().join("rebuilt.img");
        rebuild_local(&journal, &rebuilt, None);
        assert_same_image(&rebuilt, &primary);
    }
}
