//! `tinylag rejoin` with the real binary: an old primary killed under fio comes back as a
//! replica of the new chain, moving only what diverged (its activity log's regions and its
//! records after the fork), and ends byte-identical to the new primary; a journal trimmed
//! past the fork is refused with one line and nothing changed.
//!
//! The forced failover is `promote --force` on site B's replica: it serves in `logging`
//! (nothing resynced), so the rejoin's span is the only way A's diverged regions come back.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_ok, Daemon};
use support::ext4::NbdLoop;
use support::nbd::{fio_cmd, pattern, qemu_io_ok, run_ok as run_cmd_ok, ChildGuard as FioGuard};
use support::oracle::assert_same_image;
use support::procs::{path, wait_until};
use support::replay::{consumer_seed, replay_args, run_ok, spawn, will_move};
use support::verdict::judge_ext4;
use tinylag::journal::Seed;

const MIB: u64 = 1 << 20;
const DEVICE: &str = "64M";

/// `(activity-log regions, post-fork record regions)` from rejoin's "diverged:" line.
fn diverged_parts(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("diverged:"))
        .unwrap_or_else(|| panic!("no 'diverged:' line in:\n{out}"));
    let numbers: Vec<u64> = line.split(' ').filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

/// Site A serving under fio is killed with SIGKILL; its last uploads are lost.
fn kill_a_under_fio(dir: &Path, journal: &str, a: &Path) {
    let mut daemon = Daemon::start(a, journal, &["--lease-time", "3s", "--linger", "50ms"], &[]);
    let fio = FioGuard::spawn(
        fio_cmd(&daemon.uri(), dir, 0, 8 * MIB, 30)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    daemon.wait_status(Duration::from_secs(60), "fio's writes journaled", |s| {
        s["durable_lsn"].as_u64().unwrap_or(0) > 500
    });
    daemon.kill9();
    drop(fio);
}

/// B takes over with `promote --force`: its replica applies everything durable, the next
/// epoch is claimed (fencing A) and B serves in `logging` (nothing resynced).
fn take_over_on_b(journal: &str, b: &Path) -> Daemon {
    let args: Vec<String> = [
        "promote",
        "--force",
        "--replica",
        path(b),
        "--journal",
        journal,
        "--name",
        "siteb",
        "--lease-time",
        "3s",
        "--linger",
        "50ms",
    ]
    .map(String::from)
    .to_vec();
    let daemon = Daemon::start_args(b, None, &args, &[]);
    let status = daemon.status();
    assert_eq!(status["mode"], "logging", "promoted clean: {status:#}");
    daemon
}

/// Unplanned: A is killed under fio, B takes over and writes; A rejoins moving at most the
/// regions of its activity log plus its post-fork records (a fraction of the device), is
/// vouched for once the writer's span arrives, and ends byte-identical to B.
#[test]
fn a_killed_primary_rejoins_moving_only_what_diverged() {
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    let journal = path(&journal_dir).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    init(&journal, &a, DEVICE, &["--region-size", "1M"], &[]);
    // B follows from the start (blank, created by its agent).
    let mut b_agent = spawn(
        &replay_args(&journal, &b, "siteb"),
        &dir.path().join("b-agent.log"),
    );
    kill_a_under_fio(dir.path(), &journal, &a);
    b_agent.terminate(Duration::from_secs(30)).unwrap();

    let mut b_daemon = take_over_on_b(&journal, &b);
    // B writes after the fork, in regions A never touched and in one it did.
    qemu_io_ok(
        &b_daemon.uri(),
        &["write -P 0x5b 40M 2M", "write -P 0x5c 1M 64k", "flush"],
    );

    // A rejoins (a daemon: the writer serves its request at its next lease renewal).
    let rejoin_log = dir.path().join("rejoin.log");
    let mut args = replay_args(&journal, &a, "sitea");
    args[0] = "rejoin".into();
    let mut a_agent = spawn(&args, &rejoin_log);
    let request = journal_dir.join("requests/resync/sitea");
    wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&rejoin_log).is_ok_and(|l| l.contains("will move"))
    })
    .unwrap_or_else(|()| panic!("rejoin printed no plan: {}", a_agent.log_tail(4096)));
    let out = std::fs::read_to_string(&rejoin_log).unwrap();
    let (bytes, regions) = will_move(&out);
    let (logged, recorded) = diverged_parts(&out);
    eprintln!("{out}");
    assert!(regions >= 1, "A wrote under fio: something diverged\n{out}");
    assert!(
        regions <= logged + recorded,
        "moved regions ≤ the activity log's plus the post-fork records'\n{out}"
    );
    assert!(bytes <= regions * MIB, "{out}");
    assert!(
        bytes <= 8 * MIB,
        "fio wrote only the first 8 MiB of 64: {bytes} bytes is not only what diverged"
    );
    // Registered at the fork, checking exactly the diverged regions (printed before it is
    // registered: wait for the registration).
    wait_until(Duration::from_secs(60), || {
        consumer_seed(&journal_dir, "sitea").is_some()
    })
    .unwrap_or_else(|()| panic!("not registered: {}", a_agent.log_tail(4096)));
    match consumer_seed(&journal_dir, "sitea") {
        Some(Seed::Checking { unproven, .. }) => assert!(unproven.count() <= regions),
        Some(Seed::Checked { .. }) => {}
        other => panic!("seed {other:?}"),
    }
    // The writer journals the span and deletes the request once it is durable.
    wait_until(Duration::from_secs(120), || !request.exists()).unwrap_or_else(|()| {
        panic!(
            "the request was never served; B's log:\n{}",
            b_daemon.log_tail()
        )
    });
    // Writes stop; B stops cleanly (everything durable); A applies the rest and is vouched.
    b_daemon.stop_ok();
    a_agent.terminate(Duration::from_secs(30)).unwrap();
    let mut once = replay_args(&journal, &a, "sitea");
    once.push("--once".into());
    run_ok(&once);
    assert!(
        matches!(
            consumer_seed(&journal_dir, "sitea"),
            Some(Seed::Checked { .. })
        ),
        "every diverged region proven by the span: {:?}",
        consumer_seed(&journal_dir, "sitea")
    );
    assert_same_image(&a, &b);
}

/// A journal trimmed past the fork: rejoin refuses with one line naming the bytes `--full`
/// costs, and registers nothing, asks for nothing.
#[test]
fn rejoin_after_a_trim_past_the_fork_is_refused_without_full() {
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    let journal = path(&journal_dir).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    init(&journal, &a, DEVICE, &["--region-size", "1M"], &[]);
    let mut a_daemon = Daemon::start(&a, &journal, &["--lease-time", "3s"], &[]);
    qemu_io_ok(&a_daemon.uri(), &["write -P 0xa1 0 3M", "flush"]);
    a_daemon.wait_status(Duration::from_secs(60), "A's writes durable", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    a_daemon.kill9();
    let mut b_daemon = take_over_on_b(&journal, &b);
    qemu_io_ok(&b_daemon.uri(), &["write -P 0xb1 8M 1M", "flush"]);
    b_daemon.stop_ok();
    // No agent holds trim (B's old consumer is dropped): everything but the newest goes.
    tinylag_ok(
        &[
            "journal",
            "trim",
            "--journal",
            &journal,
            "--retain",
            "0s",
            "--drop-consumer-after",
            "0s",
        ],
        &[],
    );
    let before = std::fs::read(&a).unwrap();
    let mut args = replay_args(&journal, &a, "sitea");
    args[0] = "rejoin".into();
    args.push("--once".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tinylag(&argv, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains("trimmed past the fork"), "{stderr}");
    assert!(
        lines[0].contains("--full") && lines[0].contains("64.0 MiB"),
        "{stderr}"
    );
    assert!(
        consumer_seed(&journal_dir, "sitea").is_none(),
        "nothing registered"
    );
    assert!(
        !journal_dir.join("requests/resync/sitea").exists(),
        "nothing asked"
    );
    assert_eq!(std::fs::read(&a).unwrap(), before, "the image untouched");
}

/// A real file system across a forced failover and a rejoin: ext4 made and filled on A
/// (nbdfuse + a loop device), A killed right after writes the journal may not have, B takes
/// over and changes the file system, A rejoins. B's image and A's after the rejoin are both
/// judged clean by e2fsck, and are the same bytes.
#[test]
fn ext4_stays_clean_across_a_forced_failover_and_a_rejoin() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    let journal = path(&journal_dir).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    // nbdfuse passes the loop device's 512-byte requests through: the export takes them.
    init(
        &journal,
        &a,
        "128M",
        &[
            "--block-size",
            "512",
            "--region-size",
            "1M",
            "--segment-size",
            "1M",
        ],
        &[],
    );
    let mut a_daemon = Daemon::start(
        &a,
        &journal,
        &["--lease-time", "3s", "--linger", "50ms"],
        &[],
    );
    let on_a = dir.path().join("on-a");
    std::fs::create_dir(&on_a).unwrap();
    let mut disk = NbdLoop::attach(&a_daemon.uri(), &on_a);
    disk.mkfs_ext4();
    disk.mount();
    for i in 0..20u64 {
        std::fs::write(disk.mnt.join(format!("a{i}.bin")), pattern(i, 200_000)).unwrap();
    }
    run_cmd_ok(Command::new("sync").arg("-f").arg(path(&disk.mnt)));
    disk.finish();
    // The activity log starts with every region (nothing proves them journaled yet) and
    // retires the quiet ones within a second or two: wait for that, as a primary that has
    // run a while would be.
    a_daemon.wait_status(Duration::from_secs(60), "A's activity log retired", |s| {
        s["activity_log"]["regions"]
            .as_u64()
            .is_some_and(|r| r <= 32)
    });
    // Writes the journal may not have yet (the device's last MiBs, outside the file system's
    // blocks), then SIGKILL.
    qemu_io_ok(&a_daemon.uri(), &["write -P 0xee 120M 4M"]);
    a_daemon.kill9();

    let mut b_daemon = take_over_on_b(&journal, &b);
    let on_b = dir.path().join("on-b");
    std::fs::create_dir(&on_b).unwrap();
    let mut disk = NbdLoop::attach(&b_daemon.uri(), &on_b);
    disk.mount();
    for i in 0..5u64 {
        std::fs::remove_file(disk.mnt.join(format!("a{i}.bin"))).unwrap();
        std::fs::write(
            disk.mnt.join(format!("b{i}.bin")),
            pattern(100 + i, 300_000),
        )
        .unwrap();
    }
    run_cmd_ok(Command::new("sync").arg("-f").arg(path(&disk.mnt)));
    disk.finish();

    let rejoin_log = dir.path().join("rejoin.log");
    let mut args = replay_args(&journal, &a, "sitea");
    args[0] = "rejoin".into();
    let mut a_agent = spawn(&args, &rejoin_log);
    wait_until(Duration::from_secs(60), || {
        consumer_seed(&journal_dir, "sitea").is_some()
            && !journal_dir.join("requests/resync/sitea").exists()
    })
    .unwrap_or_else(|()| panic!("rejoin not served: {}", a_agent.log_tail(4096)));
    let out = std::fs::read_to_string(&rejoin_log).unwrap();
    eprintln!("{out}");
    let (bytes, _) = will_move(&out);
    assert!(
        bytes <= 48 * MIB,
        "only what diverged, not the device: {bytes}"
    );
    b_daemon.stop_ok();
    if let Err(verdict) = judge_ext4(&b) {
        panic!("e2fsck judged B corrupt after the failover:\n{verdict}");
    }
    a_agent.terminate(Duration::from_secs(30)).unwrap();
    let mut once = replay_args(&journal, &a, "sitea");
    once.push("--once".into());
    run_ok(&once);
    if let Err(verdict) = judge_ext4(&a) {
        panic!("e2fsck judged A corrupt after the rejoin:\n{verdict}");
    }
    assert_same_image(&a, &b);
}

/// Planned: A demotes, B promotes (zero bytes), B writes, A rejoins: nothing diverged, so it
/// moves zero bytes, asks the writer for nothing, is vouched for at once, and follows B.
#[test]
fn after_demote_and_promote_rejoin_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    let journal = path(&journal_dir).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    init(&journal, &a, DEVICE, &["--region-size", "1M"], &[]);
    let mut a_daemon = Daemon::start(&a, &journal, &["--lease-time", "3s"], &[]);
    qemu_io_ok(&a_daemon.uri(), &["write -P 0xa1 0 3M", "flush"]);
    tinylag_ok(&["demote", "--control", path(&a_daemon.control)], &[]);
    a_daemon.stop_ok();
    let args: Vec<String> = [
        "promote",
        "--replica",
        path(&b),
        "--journal",
        &journal,
        "--name",
        "siteb",
        "--lease-time",
        "3s",
    ]
    .map(String::from)
    .to_vec();
    let mut b_daemon = Daemon::start_args(&b, None, &args, &[]);
    qemu_io_ok(&b_daemon.uri(), &["write -P 0xb1 1M 2M", "flush"]);

    let mut args = replay_args(&journal, &a, "sitea");
    args[0] = "rejoin".into();
    args.push("--once".into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tinylag(&argv, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(will_move(&stdout), (0, 0), "{stdout}");
    assert!(
        !journal_dir.join("requests/resync/sitea").exists(),
        "nothing asked"
    );
    assert!(
        matches!(
            consumer_seed(&journal_dir, "sitea"),
            Some(Seed::Checked { .. })
        ),
        "vouched at once"
    );
    b_daemon.stop_ok();
    let mut once = replay_args(&journal, &a, "sitea");
    once.push("--once".into());
    run_ok(&once);
    assert_same_image(&a, &b);
}
