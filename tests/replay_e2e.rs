//! `tinylag serve` written by real clients (qemu-io, nbdcopy, ext4 on nbdfuse + a loop
//! device) with `tinylag replay` following the journal beside it: once the agent has caught
//! up, the replica is byte for byte the primary; with `--delay`, no write shows early.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::{init, Daemon};
use support::ext4::{NbdLoop, ReadOnlyMount};
use support::nbd::{pattern, qemu_io_ok, run_ok};
use support::oracle::assert_same_image;
use support::procs::{self, path};
use support::replay::{now_ns, replay_args, spawn};
use tinylag::control::{request, Request};

/// A replay agent started beside a daemon, with its control socket.
struct Agent {
    guard: procs::ChildGuard,
    control: PathBuf,
}

impl Agent {
    fn start(journal: &str, replica: &Path, name: &str, extra: &[&str], log: &Path) -> Agent {
        let control = PathBuf::from(format!("{}.ctl", replica.display()));
        let mut args = replay_args(journal, replica, name);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut guard = spawn(&args, log);
        guard.wait_for_path(&control, Duration::from_secs(30));
        Agent { guard, control }
    }

    fn status(&self) -> serde_json::Value {
        replica_status(&self.control)
            .unwrap_or_else(|e| panic!("replay status: {e}\n{}", self.guard.log_tail(4000)))
    }

    /// Waits until the agent has applied `lsn`.
    fn wait_applied(&self, lsn: u64, timeout: Duration) -> serde_json::Value {
        procs::wait_for(&format!("the agent to apply LSN {lsn}"), timeout, || {
            let status = self.status();
            if status["applied_lsn"].as_u64() >= Some(lsn) {
                Ok(status)
            } else {
                Err(format!("status {status:#}"))
            }
        })
    }

    fn stop(mut self) {
        let status = self.guard.terminate(Duration::from_secs(20)).unwrap();
        assert!(
            status.success(),
            "replay exited {status}: {}",
            self.guard.log_tail(4000)
        );
    }
}

/// `{"cmd":"status"}` on a replay agent's control socket.
fn replica_status(control: &Path) -> Result<serde_json::Value, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime
        .block_on(request(
            control,
            &Request {
                cmd: "status".into(),
                args: serde_json::Value::Null,
            },
        ))
        .map_err(|e| e.to_string())
}

/// Stops the daemon (it drains the journal) and returns the last LSN it journaled.
fn stop_daemon(daemon: &mut Daemon) -> u64 {
    let status = daemon.wait_status(Duration::from_secs(30), "the journal to drain", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    daemon.stop_ok();
    status["head_lsn"].as_u64().unwrap()
}

#[test]
fn qemu_io_and_nbdcopy_through_serve_reach_the_replica_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal").display().to_string();
    init(&journal, &primary, "64M", &[], &[]);
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let replica = dir.path().join("replica.img");
    let agent = Agent::start(
        &journal,
        &replica,
        "dr",
        &[],
        &dir.path().join("replay.log"),
    );

    let uri = daemon.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -z 4M 4k",
            "discard 4128k 32k",
            "flush",
        ],
    );
    let source = dir.path().join("random.img");
    std::fs::write(&source, pattern(42, 48 << 20)).unwrap();
    run_ok(Command::new("nbdcopy").args([path(&source), &uri]));
    qemu_io_ok(&uri, &["write -P 0x77 60M 2M", "discard 0 64k"]);

    let head = stop_daemon(&mut daemon);
    let status = agent.wait_applied(head, Duration::from_secs(60));
    assert_eq!(status["consistent_lsn"], head);
    assert_same_image(&replica, &primary);
    agent.stop();
}

#[test]
fn ext4_through_serve_is_replicated_and_the_replica_is_a_clean_filesystem() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal").display().to_string();
    // nbdfuse passes the loop device's 512-byte requests through unchanged.
    init(
        &journal,
        &primary,
        "128M",
        &["--segment-size", "1M", "--block-size", "512"],
        &[],
    );
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let replica = dir.path().join("replica.img");
    let agent = Agent::start(
        &journal,
        &replica,
        "dr",
        &[],
        &dir.path().join("replay.log"),
    );

    let mut disk = NbdLoop::attach(&daemon.uri(), dir.path());
    let mnt = disk.mnt.clone();
    disk.mkfs_ext4();
    disk.mount();
    let mut files = Vec::new();
    for i in 0..40u64 {
        let rel = format!("d{}/f{i}.bin", i % 4);
        std::fs::create_dir_all(mnt.join(format!("d{}", i % 4))).unwrap();
        let content = pattern(i + 7, 4096 + (i as usize * 37 % 50) * 4096);
        std::fs::write(mnt.join(&rel), &content).unwrap();
        files.push((rel, content));
    }
    run_ok(Command::new("sync").arg("-f").arg(path(&mnt)));
    std::fs::remove_dir_all(mnt.join("d3")).unwrap();
    disk.finish();

    let head = stop_daemon(&mut daemon);
    agent.wait_applied(head, Duration::from_secs(60));
    agent.stop();
    assert_same_image(&replica, &primary);
    if let Err(verdict) = support::verdict::judge_ext4(&replica) {
        panic!("e2fsck judged the replica corrupt:\n{verdict}");
    }
    let mounted = ReadOnlyMount::new(&replica, &mnt);
    for (rel, content) in files.iter().filter(|(rel, _)| !rel.starts_with("d3")) {
        assert!(std::fs::read(mnt.join(rel)).unwrap() == *content, "{rel}");
    }
    mounted.unmount();
}

/// qemu-io writes one block at a time through `serve`; the agent runs with `--delay 3s`.
/// A record's timestamp is taken when its write is acknowledged, after the client sent it,
/// so no block may show on the replica before the client started writing it plus 3 s, and
/// each must show within a bound after the client finished plus 3 s.
#[test]
fn with_a_delay_writes_through_serve_show_on_time() {
    const DELAY_NS: u64 = 3_000_000_000;
    const BLOCKS: usize = 6;
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal").display().to_string();
    init(&journal, &primary, "16M", &[], &[]);
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let replica = dir.path().join("replica.img");
    let agent = Agent::start(
        &journal,
        &replica,
        "late",
        &["--delay", "3s"],
        &dir.path().join("replay.log"),
    );
    let file = std::fs::File::open(&replica).unwrap();
    let shows = |i: usize| {
        let mut buf = vec![0u8; 4096];
        file.read_exact_at(&mut buf, i as u64 * 65536).unwrap();
        buf.iter().all(|&b| b == 0x10 + i as u8)
    };
    let mut windows = Vec::new();
    let mut seen = vec![None; BLOCKS];
    let check = |seen: &mut Vec<Option<u64>>, windows: &Vec<(u64, u64)>| {
        let now = now_ns();
        for (i, (sent, _)) in windows.iter().enumerate() {
            if seen[i].is_none() && shows(i) {
                assert!(
                    now >= sent + DELAY_NS,
                    "block {i} showed {} ms early",
                    (sent + DELAY_NS - now) / 1_000_000
                );
                seen[i] = Some(now);
            }
        }
    };
    for i in 0..BLOCKS {
        let sent = now_ns();
        qemu_io_ok(
            &daemon.uri(),
            &[&format!("write -P {} {} 4k", 0x10 + i, i * 65536)],
        );
        windows.push((sent, now_ns()));
        // This test measures time (no block may show before it is due), so between writes
        // it looks at the replica at a fixed pace for a fixed span.
        let until = Instant::now() + Duration::from_millis(400);
        while Instant::now() < until {
            check(&mut seen, &windows);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    procs::wait_for("every block to show", Duration::from_secs(20), || {
        check(&mut seen, &windows);
        if seen.iter().all(Option::is_some) {
            Ok(())
        } else {
            Err(format!("seen {seen:?}"))
        }
    });
    for (i, ((_, acked), at)) in windows.iter().zip(&seen).enumerate() {
        let late = at.unwrap().saturating_sub(acked + DELAY_NS);
        assert!(
            late < 2_500_000_000,
            "block {i} showed {} ms after it was due",
            late / 1_000_000
        );
    }
    stop_daemon(&mut daemon);
    agent.stop();
}

/// `tinylag up`: one process creates primary, journal and replica, serves and replays; the
/// guide names what to run; `tinylag status` reads both sides; SIGTERM stops it cleanly and
/// a second `up` resumes the same directory.
#[test]
fn up_serves_and_replicates_in_one_process_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("up.log");
    let primary = data.join("primary.img");
    let replica = data.join("replica.img");
    let uri = format!(
        "nbd+unix:///disk0?socket={}",
        data.join("primary.img.sock").display()
    );
    for (round, byte) in [(1, 0x5a), (2, 0xa5)] {
        let mut up = procs::ChildGuard::spawn_logged(
            "tinylag up",
            support::replay::tinylag().args(["up", "--dir", path(&data), "--size", "32M"]),
            &log,
        )
        .unwrap();
        let ctl = PathBuf::from(format!("{}.ctl", replica.display()));
        for socket in [&ctl, &data.join("primary.img.ctl")] {
            up.wait_for_path(socket, Duration::from_secs(30));
        }
        let guide = up.log_tail(8000);
        for needle in [
            "qemu-io",
            "nbdfuse",
            "nbd-client",
            "tinylag status --control",
            &uri,
        ] {
            assert!(
                guide.contains(needle),
                "the guide lacks {needle:?}:\n{guide}"
            );
        }
        qemu_io_ok(&uri, &[&format!("write -P {byte} {}M 1M", round), "flush"]);
        procs::wait_for("the replica to catch up", Duration::from_secs(30), || {
            let status = replica_status(&ctl).unwrap();
            let caught_up = status["lag_records"] == 0
                && status["applied_lsn"].as_u64() > Some(0)
                && std::fs::read(&replica).unwrap() == std::fs::read(&primary).unwrap();
            if caught_up {
                Ok(())
            } else {
                Err(format!("status {status:#}"))
            }
        });
        for control in [&ctl, &data.join("primary.img.ctl")] {
            let out = run_ok(Command::new(env!("CARGO_BIN_EXE_tinylag")).args([
                "status",
                "--control",
                path(control),
            ]));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("role"), "{text}");
        }
        let status = up.terminate(Duration::from_secs(30)).unwrap();
        assert!(
            status.success(),
            "up exited {status}: {}",
            up.log_tail(4000)
        );
    }
    assert_same_image(&replica, &primary);
}
