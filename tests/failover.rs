//! Failover and failback through the epoch chain, with the real binary and real clients
//! (fio's nbd engine, qemu-io): `demote` then `promote` moves production between two sites
//! and back with zero bytes resynced, each step leaving the replica byte-identical to the
//! primary and the journal verifying; `promote --force` after `kill -9` of the primary under
//! fio leaves the new primary equal to the journal's head; and the refusals (promote while
//! the primary is live, two promotes racing, demote of a fenced writer) change nothing.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::daemon::{init, tinylag, tinylag_ok, wait_applied, wait_control, Daemon};
use support::nbd::{fio_cmd, qemu_io, run_ok as run_cmd_ok};
use support::procs::{path, wait_for, ChildGuard};
use support::replay::{replay_args, run_ok, spawn};

const MIB: u64 = 1 << 20;

/// fio's nbd engine: random writes of 4-64 KiB over the first 32 MiB for `seconds`.
fn fio(uri: &str, workdir: &Path, seconds: u64) -> Command {
    fio_cmd(uri, workdir, 0, 32 * MIB, seconds)
}

fn files_equal(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// `tinylag promote` of `replica` as consumer `name`, as a daemon (sockets beside it).
fn promote(replica: &Path, journal: &str, name: &str, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec![
        "promote".into(),
        "--replica".into(),
        path(replica).into(),
        "--journal".into(),
        journal.into(),
        "--name".into(),
        name.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_args(replica, None, &args, &[])
}

fn demote(control: &Path) -> serde_json::Value {
    let out = tinylag_ok(&["demote", "--control", path(control), "--json"], &[]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("demote JSON: {e}: {out}"))
}

/// A promoted (or started) primary that began in `logging` and resynced nothing.
fn assert_zero_resync(daemon: &Daemon) {
    let s = daemon.status();
    assert_eq!(s["mode"], "logging", "{s:#}");
    assert_eq!(s["start"]["kind"], "clean", "{s:#}");
    assert_eq!(s["resync"]["bytes_done"], 0, "{s:#}");
    assert_eq!(s["resync"]["regions_done"], 0, "{s:#}");
}

fn verify_journal(journal: &str) {
    let out = tinylag_ok(&["journal", "verify", "--journal", journal], &[]);
    assert!(out.contains("every checksum is good"), "{out}");
}

/// Site A serves, site B replays; A demotes, B is promoted; B takes fio, demotes; A (which
/// follows B as a replica from A's own DEMOTE, vouched by the demote's seed stamp) is
/// promoted; twice. Every switch resyncs nothing and leaves both images equal.
#[test]
fn planned_failover_and_failback_twice_under_fio_resync_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal = path(&journal).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    init(&journal, &a, "64M", &[], &[]);
    let mut primary = Daemon::start(&a, &journal, &[], &[]);
    let mut args = replay_args(&journal, &b, "siteb");
    args.push("--assume-seeded".into());
    let mut agent_log = dir.path().join("b.replay.log");
    let mut agent = spawn(&args, &agent_log);

    // Refused while the primary is live and not demoted: nothing changes.
    let out = tinylag(
        &[
            "promote",
            "--replica",
            path(&b),
            "--journal",
            &journal,
            "--name",
            "siteb",
        ],
        &[],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has not released its lease") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(primary.status()["mode"], "logging");

    let sites = [(a.clone(), "sitea"), (b.clone(), "siteb")];
    let mut current = 0; // index of the serving site
    for round in 0..4 {
        run_cmd_ok(&mut fio(&primary.uri(), dir.path(), 2));
        let done = demote(&primary.control);
        let lsn = done["lsn"].as_u64().unwrap();
        assert_eq!(primary.status()["mode"], "demoted");
        // Writes fail (EPERM), reads go on.
        let (ok, text) = qemu_io(&primary.uri(), &["write -P 7 0 4k"]);
        assert!(!ok && text.contains("not permitted"), "{text}");
        let (ok, text) = qemu_io(&primary.uri(), &["read 0 4k"]);
        assert!(ok, "{text}");
        // The next site's agent reaches the DEMOTE, then stops for the promote.
        let next = 1 - current;
        let agent_control = {
            let mut p = sites[next].0.as_os_str().to_owned();
            p.push(".ctl");
            std::path::PathBuf::from(p)
        };
        wait_applied(&agent_control, &mut agent, lsn, Duration::from_secs(120));
        agent.terminate(Duration::from_secs(30)).unwrap();
        // SIGTERM after demote: exit 0, nothing more written (the seed stamp still vouches).
        let log = primary.stop_ok();
        assert!(log.contains("mode demoted"), "{log}");
        assert!(
            files_equal(&sites[0].0, &sites[1].0),
            "round {round}: images differ"
        );
        let promoted = promote(&sites[next].0, &journal, sites[next].1, &[]);
        assert_zero_resync(&promoted);
        promoted.wait_log(Duration::from_secs(30), &format!("promoted at LSN {lsn}:"));
        verify_journal(&journal);
        // The demoted site follows the new primary from its own DEMOTE.
        let mut follow = replay_args(&journal, &sites[current].0, sites[current].1);
        follow.push("--commit-every".into());
        follow.push("0s".into());
        agent_log = dir
            .path()
            .join(format!("{}.replay{round}.log", sites[current].1));
        agent = spawn(&follow, &agent_log);
        primary = promoted;
        current = next;
    }
    run_cmd_ok(&mut fio(&primary.uri(), dir.path(), 1));
    let done = demote(&primary.control);
    let other = {
        let mut p = sites[1 - current].0.as_os_str().to_owned();
        p.push(".ctl");
        std::path::PathBuf::from(p)
    };
    wait_applied(
        &other,
        &mut agent,
        done["lsn"].as_u64().unwrap(),
        Duration::from_secs(120),
    );
    agent.terminate(Duration::from_secs(30)).unwrap();
    primary.stop_ok();
    assert!(files_equal(&a, &b));
    verify_journal(&journal);
}

/// `kill -9` of the primary under fio; a plain promote is refused; `promote --force` serves
/// B clean, and B equals the journal's head (a fresh replay of the whole journal).
#[test]
fn forced_promote_after_kill_9_equals_the_journal_head() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal = path(&journal).to_string();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    init(&journal, &a, "64M", &[], &[]);
    let mut primary = Daemon::start(&a, &journal, &["--lease-time", "2s"], &[]);
    let mut args = replay_args(&journal, &b, "siteb");
    args.push("--assume-seeded".into());
    let mut agent = spawn(&args, &dir.path().join("b.replay.log"));
    let head = primary.status()["head_lsn"].as_u64().unwrap();
    let mut load = ChildGuard::spawn("fio", &mut fio(&primary.uri(), dir.path(), 30)).unwrap();
    // Killed under load: once fio's writes are flowing into the journal.
    primary.wait_status(Duration::from_secs(60), "fio writing", |s| {
        s["head_lsn"].as_u64().unwrap() > head + 200
    });
    primary.kill9();
    let killed = Instant::now();
    let _ = load.terminate(Duration::from_secs(10));
    agent.terminate(Duration::from_secs(30)).unwrap();

    let out = tinylag(
        &[
            "promote",
            "--replica",
            path(&b),
            "--journal",
            &journal,
            "--name",
            "siteb",
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "a plain promote after a crash is refused"
    );
    let mut promoted = promote(&b, &journal, "siteb", &["--force"]);
    eprintln!("kill -9 -> B serving: {:?}", killed.elapsed());
    assert_zero_resync(&promoted);
    promoted.stop_ok();
    let check = dir.path().join("check.img");
    let mut args = replay_args(&journal, &check, "check");
    args.push("--once".into());
    run_ok(&args);
    assert!(files_equal(&b, &check), "B differs from the journal's head");
    verify_journal(&journal);
}

/// Two promotes racing after one demote: exactly one serves, the other is refused; a
/// fenced writer cannot demote, and with --on-fence read-only its clients' writes fail.
#[test]
fn racing_promotes_have_one_winner_and_a_fenced_writer_cannot_demote() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal = path(&journal).to_string();
    let a = dir.path().join("a.img");
    init(&journal, &a, "64M", &[], &[]);
    let mut primary = Daemon::start(&a, &journal, &["--on-fence", "read-only"], &[]);
    let replicas: Vec<_> = ["b", "c"]
        .iter()
        .map(|n| {
            let r = dir.path().join(format!("{n}.img"));
            let mut args = replay_args(&journal, &r, &format!("site{n}"));
            args.extend(["--assume-seeded".into(), "--once".into()]);
            run_ok(&args);
            r
        })
        .collect();
    support::nbd::qemu_io_ok(&primary.uri(), &["write -P 3 0 1M"]);
    demote(&primary.control);
    primary.stop_ok();
    let mut racers: Vec<ChildGuard> = replicas
        .iter()
        .zip(["siteb", "sitec"])
        .map(|(r, name)| {
            let mut cmd = Command::new(support::daemon::tinylag_bin());
            cmd.args([
                "promote",
                "--replica",
                path(r),
                "--journal",
                &journal,
                "--name",
                name,
            ])
            .env("TINYLAG_LOG", "warn");
            let mut log = r.as_os_str().to_owned();
            log.push(".log");
            ChildGuard::spawn_logged("promote", &mut cmd, Path::new(&log)).unwrap()
        })
        .collect();
    // The loser exits; the winner keeps serving.
    let loser = wait_for(
        "one promote to be refused",
        Duration::from_secs(120),
        || {
            racers
                .iter_mut()
                .position(|r| r.exited().is_some())
                .ok_or_else(|| "both still run".to_string())
        },
    );
    let status = racers[loser].exited().unwrap();
    assert!(!status.success(), "the loser fails");
    let winner = 1 - loser;
    let mut ctl = replicas[winner].as_os_str().to_owned();
    ctl.push(".ctl");
    // The winner serves: its control socket answers with the next epoch.
    wait_control(
        Path::new(&ctl),
        &mut racers[winner],
        Duration::from_secs(60),
        "the winner to serve",
        |s| s["epoch"] == 2,
    );
    assert!(racers[winner].exited().is_none(), "the winner serves");
    let out = tinylag_ok(
        &["status", "--control", path(Path::new(&ctl)), "--json"],
        &[],
    );
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["epoch"], 2, "exactly the next epoch: {s:#}");
    racers[winner].terminate(Duration::from_secs(30)).unwrap();

    // A fenced writer: D serves, a takeover on E fences it; D refuses to demote.
    let d = &replicas[winner];
    let e = dir.path().join("e.img");
    std::fs::copy(d, &e).unwrap();
    let fenced = Daemon::start(d, &journal, &["--on-fence", "read-only"], &[]);
    let _new = Daemon::start(&e, &journal, &["--takeover"], &[]);
    fenced.wait_status(Duration::from_secs(60), "fenced", |s| s["mode"] == "fenced");
    let out = tinylag(&["demote", "--control", path(&fenced.control)], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fenced") && err.lines().count() == 1, "{err}");
    let (ok, text) = qemu_io(&fenced.uri(), &["write -P 9 0 4k"]);
    assert!(!ok && text.contains("not permitted"), "{text}");
    assert_eq!(fenced.status()["mode"], "fenced");
}
