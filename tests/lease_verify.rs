//! Writer leases, in-band verify, resync and marks through the real `tinylag serve` and
//! `tinylag replay` binaries, with qemu-io as the client:
//! - a second `serve` on a live journal is refused naming the holder; `--takeover` fences it;
//! - a writer stopped (SIGSTOP) past its lease and continued finds itself fenced, keeps
//!   serving, and the journal and the replica follow the surviving writer only;
//! - a region corrupted on purpose in a replica is reported after `tinylag verify`;
//!   `tinylag resync` marks it for a resync span (end to end once resync spans exist);
//! - `tinylag mark` records a durable MARK and refuses a duplicate name.

mod support;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_ok, wait_lease_expired, Daemon};
use support::nbd::{pattern, qemu_io_ok};
use support::procs::{wait_for, ChildGuard};
use support::replay::{first_difference, replay_args, spawn};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn journal_info(journal: &str) -> serde_json::Value {
    let out = tinylag_ok(&["journal", "info", "--journal", journal, "--json"], &[]);
    serde_json::from_str(&out).expect("journal info JSON")
}

/// The consumer `name` in `journal info`.
fn consumer(journal: &str, name: &str) -> serde_json::Value {
    let info = journal_info(journal);
    info["consumers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// Waits until consumer `name` has applied the journal's last LSN.
fn wait_caught_up(journal: &str, name: &str, agent: &mut ChildGuard, timeout: Duration) {
    wait_for(&format!("agent {name} to catch up"), timeout, || {
        let info = journal_info(journal);
        let head = info["head"]["last_lsn"].as_u64().unwrap_or(0);
        let applied = info["consumers"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["name"] == name))
            .and_then(|c| c["applied_lsn"].as_u64())
            .unwrap_or(0);
        assert!(
            agent.exited().is_none(),
            "replay agent exited; log:\n{}",
            agent.log_tail(8192)
        );
        if head > 0 && applied == head {
            Ok(())
        } else {
            Err(format!(
                "at LSN {applied}, head {head}; log:\n{}",
                agent.log_tail(8192)
            ))
        }
    });
}

/// Waits until the daemon's journal is durable up to its head.
fn wait_durable(d: &Daemon) {
    d.wait_status(Duration::from_secs(60), "durable == head", |st| {
        st["durable_lsn"] == st["head_lsn"] && st["head_lsn"].as_u64() > Some(0)
    });
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        x == y,
        "{} and {} differ first at byte {:?}",
        a.display(),
        b.display(),
        first_difference(&x, &y)
    );
}

fn write_pattern(uri: &str, seed: u64, offset: u64, len: u64) {
    // qemu-io's pattern byte: distinct per seed.
    qemu_io_ok(
        uri,
        &[&format!("write -P {} {offset} {len}", 0x10 + seed % 200)],
    );
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: sends a signal to a child process this test started and still owns.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig})");
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    journal: String,
}

fn setup(size: &str, extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let journal = root.join("j").display().to_string();
    init(&journal, &root.join("a.img"), size, extra, &[]);
    Setup {
        _dir: dir,
        root,
        journal,
    }
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_and_takeover_fences_the_first() {
    let t = setup("16M", &[]);
    let (pa, pb) = (t.root.join("a.img"), t.root.join("b.img"));
    std::fs::File::create(&pb)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let mut a = Daemon::start(&pa, &t.journal, &["--lease-time", "30s"], &[]);
    let status = a.status();
    assert_eq!(status["lease"]["state"], "held", "{status:#}");
    assert_eq!(status["lease"]["pid"], a.pid());
    write_pattern(&a.uri(), 1, 0, MIB);
    wait_durable(&a);

    // A second serve (another primary, same journal) is refused, naming A.
    let out = tinylag(
        &["serve", "--primary", s(&pb), "--journal", &t.journal],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("owned by a live writer"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", a.pid())), "{stderr}");
    assert!(stderr.contains("epoch 1"), "{stderr}");
    assert!(stderr.contains("--takeover"), "{stderr}");
    assert!(
        !t.root.join("j/epochs/00000000000000000002").exists(),
        "a refused writer claims nothing"
    );
    assert!(!pb.with_extension("img.ctl").exists());
    assert_eq!(a.status()["mode"], "logging");

    // --takeover claims epoch 2 on purpose; A is fenced but keeps serving its clients.
    let mut b = Daemon::start(&pb, &t.journal, &["--takeover"], &[]);
    assert_eq!(b.status()["epoch"], 2);
    assert_eq!(b.status()["lease"]["state"], "held");
    write_pattern(&a.uri(), 2, MIB, MIB);
    // Fenced by the lease keeper or by the refused upload, whichever sees epoch 2 first; the
    // write A took then lands in its dirty regions when its upload is refused.
    let fenced = a.wait_status(Duration::from_secs(30), "A fenced, its write dirty", |st| {
        st["mode"] == "fenced" && st["dirty"]["regions"].as_u64() > Some(0)
    });
    assert!(
        fenced["mode_reason"]
            .as_str()
            .is_some_and(|r| r.contains("epoch 2")),
        "{fenced:#}"
    );
    qemu_io_ok(&a.uri(), &["read -P 0x12 1048576 1048576"]);
    let text = tinylag_ok(&["status", "--control", s(&a.control)], &[]);
    assert!(text.contains("fenced"), "{text}");

    write_pattern(&b.uri(), 3, 2 * MIB, MIB);
    wait_durable(&b);
    b.stop_ok();
    a.stop(Duration::from_secs(60));
    let verified = tinylag_ok(&["journal", "verify", "--journal", &t.journal], &[]);
    assert!(verified.contains("every checksum is good"), "{verified}");
    // B stopped cleanly: its lease is released, so a new writer starts without waiting.
    let mut c = Daemon::start(&pb, &t.journal, &[], &[]);
    assert_eq!(c.status()["epoch"], 3);
    c.stop_ok();
}

#[test]
fn a_writer_paused_past_its_lease_is_fenced_and_the_replica_follows_the_survivor() {
    let t = setup("16M", &[]);
    let (pa, pb) = (t.root.join("a.img"), t.root.join("b.img"));
    let replica = t.root.join("replica.img");
    let mut a = Daemon::start(&pa, &t.journal, &["--lease-time", "2s"], &[]);
    let mut agent = spawn(
        &replay_args(&t.journal, &replica, "dr"),
        &t.root.join("replay.log"),
    );
    for i in 0..4 {
        write_pattern(&a.uri(), i, i * 3 * MIB, 2 * MIB);
    }
    wait_durable(&a);

    // A is paused past its lease; B sees it expired and starts without --takeover, from a
    // copy of A's primary (what A had acknowledged and journaled).
    let epoch_a = a.status()["epoch"].as_u64().unwrap();
    signal(a.pid(), libc::SIGSTOP);
    wait_lease_expired(Path::new(&t.journal), epoch_a, Duration::from_secs(30));
    std::fs::copy(&pa, &pb).unwrap();
    let mut b = Daemon::start(&pb, &t.journal, &["--lease-time", "2s"], &[]);
    assert_eq!(b.status()["epoch"], 2);
    write_pattern(&b.uri(), 7, 5 * MIB, MIB);

    // A runs again: it must find itself fenced before any upload, and keep serving.
    signal(a.pid(), libc::SIGCONT);
    write_pattern(&a.uri(), 9, 8 * MIB, 4 * MIB);
    qemu_io_ok(&a.uri(), &["read -P 0x19 8388608 4194304"]);
    let st = a.wait_status(Duration::from_secs(30), "A fenced", |st| {
        st["mode"] == "fenced"
    });
    assert_eq!(st["lease"]["state"], "fenced", "{st:#}");
    assert!(st["dirty"]["regions"].as_u64() >= Some(1), "{st:#}");
    // Still fenced, still serving, a while later.
    write_pattern(&a.uri(), 10, 12 * MIB, MIB);
    assert_eq!(a.status()["mode"], "fenced");

    write_pattern(&b.uri(), 8, 6 * MIB, MIB);
    wait_durable(&b);
    wait_caught_up(&t.journal, "dr", &mut agent, Duration::from_secs(120));
    let verified = tinylag_ok(&["journal", "verify", "--journal", &t.journal], &[]);
    assert!(verified.contains("last writer epoch 2"), "{verified}");
    // Nothing of A's after the takeover is in the journal: the replica is B's primary.
    agent.terminate(Duration::from_secs(30)).unwrap();
    assert_same(&replica, &pb);
    b.stop_ok();
    a.stop(Duration::from_secs(60));
}

/// Corrupts `len` bytes of the replica at `offset` (what a bad disk or a stray write does).
fn corrupt(replica: &Path, offset: u64, len: usize) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(replica)
        .unwrap();
    f.write_all_at(&pattern(99, len), offset).unwrap();
    f.sync_all().unwrap();
}

fn verify_tally(journal: &str, name: &str) -> serde_json::Value {
    consumer(journal, name)["verify"].clone()
}

fn wait_tally(
    journal: &str,
    name: &str,
    agent: &mut ChildGuard,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for("the verify tally", Duration::from_secs(60), || {
        let tally = verify_tally(journal, name);
        if ready(&tally) {
            Ok(tally)
        } else {
            Err(format!(
                "tally {tally:#}; agent log:\n{}",
                agent.log_tail(8192)
            ))
        }
    })
}

#[test]
fn verify_reports_a_corrupted_replica_region_and_resync_marks_it() {
    let t = setup("16M", &["--region-size", "1M"]);
    let pa = t.root.join("a.img");
    let replica = t.root.join("replica.img");
    let a = Daemon::start(&pa, &t.journal, &[], &[]);
    let mut agent = spawn(
        &replay_args(&t.journal, &replica, "dr"),
        &t.root.join("replay.log"),
    );
    for i in 0..4 {
        write_pattern(&a.uri(), i, i * 4 * MIB, 3 * MIB);
    }
    wait_durable(&a);
    wait_caught_up(&t.journal, "dr", &mut agent, Duration::from_secs(120));
    assert_same(&replica, &pa);

    // A clean verify of everything: 16 regions checked, none mismatching.
    let out = tinylag_ok(
        &[
            "verify",
            "--control",
            s(&a.control),
            "--regions",
            "all",
            "--json",
        ],
        &[],
    );
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["regions"], 16, "{done:#}");
    let tally = wait_tally(&t.journal, "dr", &mut agent, |v| v["checked"] == 16);
    assert_eq!(tally["mismatches"], 0, "{tally:#}");

    // Region 5 goes bad on the replica only.
    corrupt(&replica, 5 * MIB + 4096, 512);
    let out = tinylag_ok(
        &[
            "verify",
            "--control",
            s(&a.control),
            "--regions",
            "4-6",
            "--rate",
            "100M",
        ],
        &[],
    );
    assert!(out.contains("3 regions"), "{out}");
    let tally = wait_tally(&t.journal, "dr", &mut agent, |v| v["checked"] == 19);
    assert_eq!(tally["mismatches"], 1, "{tally:#}");
    let listed = tally["mismatched"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), 1, "{tally:#}");
    assert_eq!(listed[0]["offset"], 5 * MIB);
    assert_eq!(listed[0]["len"], MIB);
    let info = tinylag_ok(&["journal", "info", "--journal", &t.journal], &[]);
    assert!(info.contains("mismatching now: 5242880+1048576"), "{info}");
    assert!(
        agent.log_tail(16384).contains("VERIFY mismatch"),
        "{}",
        agent.log_tail(8192)
    );

    // Bad input changes nothing.
    let out = tinylag(
        &["verify", "--control", s(&a.control), "--regions", "5-2"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--regions"));
    let out = tinylag(
        &["resync", "--control", s(&a.control), "--regions", "16"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("regions 0..16"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.status()["dirty"]["regions"], 0);

    // `resync` marks the region dirty and opens a resync span: its RESYNC_BEGIN follows the
    // last VERIFY in the journal. (With the resync spans of h/resync the region is then
    // re-journaled at once and the mode returns to logging: see the ignored test below.)
    let out = tinylag_ok(
        &[
            "resync",
            "--control",
            s(&a.control),
            "--regions",
            "5",
            "--json",
        ],
        &[],
    );
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["regions"], 1, "{done:#}");
    assert_eq!(done["bytes"], MIB, "{done:#}");
    wait_durable(&a);
    let listing = tinylag_ok(
        &["journal", "inspect", "--journal", &t.journal, "--json"],
        &[],
    );
    let kinds: Vec<serde_json::Value> = listing
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last_verify = kinds.iter().rposition(|r| r["kind"] == "VERIFY").unwrap();
    assert!(
        kinds[last_verify..]
            .iter()
            .any(|r| r["kind"] == "RESYNC_BEGIN"),
        "{listing}"
    );
    // While the resync is pending, verify is refused: replicas cannot match yet.
    let st = a.status();
    if st["mode"] != "logging" {
        assert!(st["dirty"]["regions"].as_u64() >= Some(1), "{st:#}");
        let out = tinylag(&["verify", "--control", s(&a.control)], &[]);
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("not logging"));
    }
    drop(agent);
}

/// The whole loop: corrupt, verify (reported), resync (re-journaled as a span), verify
/// again (clean) and the replica equals the primary.
#[test]
fn resync_repairs_a_region_that_verify_reported() {
    let t = setup("16M", &["--region-size", "1M"]);
    let pa = t.root.join("a.img");
    let replica = t.root.join("replica.img");
    let a = Daemon::start(&pa, &t.journal, &[], &[]);
    let mut agent = spawn(
        &replay_args(&t.journal, &replica, "dr"),
        &t.root.join("replay.log"),
    );
    write_pattern(&a.uri(), 1, 0, 16 * MIB);
    wait_durable(&a);
    wait_caught_up(&t.journal, "dr", &mut agent, Duration::from_secs(120));
    corrupt(&replica, 9 * MIB + 100, 4096);
    tinylag_ok(
        &["verify", "--control", s(&a.control), "--regions", "9"],
        &[],
    );
    wait_tally(&t.journal, "dr", &mut agent, |v| v["mismatches"] == 1);

    tinylag_ok(
        &["resync", "--control", s(&a.control), "--regions", "9"],
        &[],
    );
    a.wait_status(Duration::from_secs(60), "back to logging", |st| {
        st["mode"] == "logging" && st["dirty"]["regions"] == 0
    });
    wait_durable(&a);
    tinylag_ok(
        &["verify", "--control", s(&a.control), "--regions", "9"],
        &[],
    );
    let tally = wait_tally(&t.journal, "dr", &mut agent, |v| v["checked"] == 2);
    assert!(
        tally["mismatched"].as_array().is_none_or(|m| m.is_empty()),
        "{tally:#}"
    );
    wait_caught_up(&t.journal, "dr", &mut agent, Duration::from_secs(120));
    assert_same(&replica, &pa);

    // `verify --repair` journals the checks, then resyncs the same regions.
    corrupt(&replica, 3 * MIB, 4096);
    let out = tinylag_ok(
        &[
            "verify",
            "--control",
            s(&a.control),
            "--regions",
            "3",
            "--repair",
            "--json",
        ],
        &[],
    );
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["repaired"], 1, "{done:#}");
    a.wait_status(Duration::from_secs(60), "back to logging", |st| {
        st["mode"] == "logging" && st["dirty"]["regions"] == 0
    });
    wait_durable(&a);
    wait_caught_up(&t.journal, "dr", &mut agent, Duration::from_secs(120));
    assert_same(&replica, &pa);
}

#[test]
fn mark_appends_a_durable_mark_and_refuses_a_duplicate_name() {
    let t = setup("16M", &[]);
    let pa = t.root.join("a.img");
    let mut a = Daemon::start(&pa, &t.journal, &[], &[]);
    write_pattern(&a.uri(), 1, 0, MIB);
    let out = tinylag_ok(&["mark", "before-upgrade", "--control", s(&a.control)], &[]);
    assert!(out.starts_with("mark before-upgrade at LSN "), "{out}");
    let lsn: u64 = out
        .trim_start_matches("mark before-upgrade at LSN ")
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Durable before the name was recorded, with the record's LSN.
    assert!(a.status()["durable_lsn"].as_u64() >= Some(lsn));
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.root.join("j/marks/before-upgrade")).unwrap())
            .unwrap();
    assert_eq!(stored["lsn"], lsn);
    let listing = tinylag_ok(
        &["journal", "inspect", "--journal", &t.journal, "--json"],
        &[],
    );
    let marks: Vec<&str> = listing.lines().filter(|l| l.contains("\"MARK\"")).collect();
    assert_eq!(marks.len(), 1, "{listing}");
    assert!(marks[0].contains(&format!("\"lsn\":{lsn}")), "{}", marks[0]);

    let head = a.status()["head_lsn"].clone();
    let out = tinylag(&["mark", "before-upgrade", "--control", s(&a.control)], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert!(stderr.contains(&format!("LSN {lsn}")), "{stderr}");
    assert_eq!(
        a.status()["head_lsn"],
        head,
        "a refused mark appends nothing"
    );

    let out = tinylag(&["mark", "../etc", "--control", s(&a.control)], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid mark name"));
    a.stop_ok();
}
