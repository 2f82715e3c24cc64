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

/// fio's nbd engine: random writes of 4-64 KiB over the first 32 MiB for `seconds` or
/// `mib` MiB, whichever ends first. Unbounded, a fast machine journals over a GiB a round
/// (6 GB at once across this file's tests were measured), which can fill a CI runner's
/// disk; what is tested here is the switch after and under writes, not their rate. (Not
/// `--rate`: fio 3.33's nbd engine with a rate limit spins printing errors for good once
/// the server is killed, and its job process outlives the fio that is killed.)
fn fio(uri: &str, workdir: &Path, seconds: u64, mib: u64) -> Command {
    let mut cmd = fio_cmd(uri, workdir, 0, 32 * MIB, seconds);
    cmd.args(["--time_based=0", &format!("--io_size={mib}m")]);
    cmd
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

/// `tinylag demote` of `daemon`; on a refusal, the daemon's status and log say why.
fn demote(daemon: &Daemon) -> serde_json::Value {
    let out = tinylag(
        &["demote", "--control", path(&daemon.control), "--json"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        panic!(
            "demote failed: {}\nstatus: {:#}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            daemon.try_status().unwrap_or_else(|e| e.into()),
            daemon.log_tail()
        );
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("demote JSON: {e}: {text}"))
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
        run_cmd_ok(&mut fio(&primary.uri(), dir.path(), 2, 64));
        let done = demote(&primary);
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
    run_cmd_ok(&mut fio(&primary.uri(), dir.path(), 1, 32));
    let done = demote(&primary);
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
    let mut load =
        ChildGuard::spawn("fio", &mut fio(&primary.uri(), dir.path(), 30, 1024)).unwrap();
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
    demote(&primary);
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

/// Failover from an object replica (no standby disk): A serves and an object replica follows
/// it; A demotes; `promote --replica URI --image PATH` is killed with -9 while it writes the
/// image (at random moments, several times: only `<image>.materializing` is left, nothing is
/// claimed), then run whole: it serves epoch 2 on the image, equal to A at its DEMOTE, takes
/// writes, and both a fresh replay of the journal and the object replica's own agent follow
/// them. The refusals change nothing.
#[test]
fn promote_from_an_object_replica_materialises_the_image_and_the_new_epoch_is_followed() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal = path(&journal).to_string();
    let a = dir.path().join("a.img");
    init(&journal, &a, "256M", &[], &[]);
    let mut primary = Daemon::start(&a, &journal, &[], &[]);
    let objrep = format!("file://{}", dir.path().join("objrep").display());
    let object_replay = [
        "replay",
        "--journal",
        &journal,
        "--replica",
        &objrep,
        "--name",
        "objrep",
        "--once",
    ]
    .map(String::from);
    // Enough data that writing the image takes a while (the kills must land inside it); a
    // checkpoint; then changes only the journal holds (the promote applies them).
    support::nbd::qemu_io_ok(
        &primary.uri(),
        &[
            "write -P 1 0 120M",
            "write -P 2 128M 64M",
            "write -P 5 250M 4k",
        ],
    );
    run_ok(&object_replay);
    support::nbd::qemu_io_ok(
        &primary.uri(),
        &["write -P 3 4M 4M", "write -z 8M 1M", "discard 130M 1M"],
    );
    let done = demote(&primary);
    let lsn = done["lsn"].as_u64().unwrap();
    primary.stop_ok();
    let epochs = || {
        std::fs::read_dir(dir.path().join("journal/epochs"))
            .unwrap()
            .count()
    };
    assert_eq!(epochs(), 1);

    let b = dir.path().join("b.img");
    let partial = dir.path().join("b.img.materializing");
    let promote_args: Vec<String> = [
        "promote",
        "--replica",
        &objrep,
        "--image",
        path(&b),
        "--journal",
        &journal,
        "--name",
        "siteb",
    ]
    .map(String::from)
    .to_vec();

    // Refused in one line, nothing changed: no --image; an --image holding data.
    for (extra, needle) in [(None, "--image PATH"), (Some(path(&a)), "holds")] {
        let mut args: Vec<&str> = vec!["promote", "--replica", &objrep, "--journal", &journal];
        args.extend(["--name", "siteb"]);
        if let Some(image) = extra {
            args.extend(["--image", image]);
        }
        let out = tinylag(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
        // One error line (a usage error adds clap's pointer to --help).
        assert_eq!(
            err.lines().filter(|l| l.contains("error")).count(),
            1,
            "{err}"
        );
        assert_eq!(epochs(), 1, "a refused promote claimed");
        assert!(!b.exists() && !partial.exists());
    }

    // Killed while the image is written: the rerun redoes it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(24);
    for kill in 0..3 {
        let mut cmd = Command::new(support::daemon::tinylag_bin());
        cmd.args(&promote_args).env("TINYLAG_LOG", "warn");
        let log = dir.path().join(format!("promote-killed{kill}.log"));
        let mut child = ChildGuard::spawn_logged("promote", &mut cmd, &log).unwrap();
        wait_for(
            "the image to be written",
            Duration::from_secs(60),
            || match (partial.exists(), child.exited()) {
                (true, _) => Ok(()),
                (false, Some(status)) => {
                    panic!("promote exited ({status}): {}", child.log_tail(4096))
                }
                (false, None) => Err("no partial image yet".to_string()),
            },
        );
        // The random moment inside the write (not a wait for a condition).
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..60)));
        child.child_mut().kill().unwrap();
        child.child_mut().wait().unwrap();
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            !said.contains("materialised "),
            "kill {kill} came after the image was whole; make the image bigger: {said}"
        );
        assert!(
            !b.exists(),
            "kill {kill}: a partial image under the target's name"
        );
        assert_eq!(
            epochs(),
            1,
            "kill {kill}: claimed before the image was whole"
        );
    }

    let mut promoted = Daemon::start_args(&b, None, &promote_args, &[]);
    promoted.wait_log(Duration::from_secs(120), &format!("promoted at LSN {lsn}:"));
    let log = promoted.log_tail();
    assert!(
        log.contains("materialised ") && log.contains("stays a replica"),
        "{log}"
    );
    assert!(!partial.exists());
    assert_zero_resync(&promoted);
    assert!(
        files_equal(&a, &b),
        "the image differs from A at its DEMOTE"
    );
    // Sparse: the never-written ranges hold no blocks.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&b).unwrap()) * 512;
    assert!(
        allocated < 200 << 20,
        "{allocated} bytes allocated for 188 MiB of data"
    );

    // The new primary takes writes; a mark names the point.
    support::nbd::qemu_io_ok(
        &promoted.uri(),
        &["write -P 9 1M 2M", "write -P 8 200M 64k"],
    );
    tinylag_ok(
        &["mark", "--control", path(&promoted.control), "after"],
        &[],
    );
    promoted.stop_ok();
    verify_journal(&journal);
    // A fresh replay of the whole chain equals B.
    let check = dir.path().join("check.img");
    let mut args = replay_args(&journal, &check, "check");
    args.push("--once".into());
    run_ok(&args);
    assert!(
        files_equal(&b, &check),
        "a replay of the chain differs from B"
    );
    // The object replica's agent follows epoch 2 from its checkpoint.
    run_ok(&object_replay);
    let out = dir.path().join("restored.img");
    tinylag_ok(
        &[
            "restore",
            "--journal",
            &journal,
            "--replica",
            &objrep,
            "--mark",
            "after",
            "--output",
            path(&out),
        ],
        &[],
    );
    assert!(
        files_equal(&b, &out),
        "the object replica did not follow the new epoch"
    );
}

/// The other two ways to promote from an object replica. `--force` after kill -9 of the
/// primary: the image is the newest checkpoint plus everything the journal holds after it
/// (equal to a fresh replay of the journal's head). `--mark` (with `--force`): the image is
/// the primary as it was at the mark, the later records are kept as a branch, and the object
/// replica's agent, whose checkpoint lies past the fork, stops naming it rather than follow.
#[test]
fn promote_from_an_object_replica_with_force_or_at_a_mark() {
    let dir = tempfile::tempdir().unwrap();
    for at_mark in [false, true] {
        let sub = dir.path().join(if at_mark { "mark" } else { "force" });
        std::fs::create_dir(&sub).unwrap();
        let journal = sub.join("journal");
        let journal = path(&journal).to_string();
        let a = sub.join("a.img");
        init(&journal, &a, "64M", &[], &[]);
        let mut primary = Daemon::start(&a, &journal, &[], &[]);
        let objrep = format!("file://{}", sub.join("objrep").display());
        let object_replay = [
            "replay",
            "--journal",
            &journal,
            "--replica",
            &objrep,
            "--name",
            "objrep",
            "--once",
        ]
        .map(String::from);
        support::nbd::qemu_io_ok(&primary.uri(), &["write -P 1 0 16M", "write -P 2 32M 8M"]);
        tinylag_ok(&["mark", "--control", path(&primary.control), "m1"], &[]);
        let at_m1 = sub.join("at-m1.img");
        std::fs::copy(&a, &at_m1).unwrap();
        let durable = |primary: &Daemon| {
            primary.wait_status(Duration::from_secs(60), "everything durable", |s| {
                s["durable_lsn"] == s["head_lsn"]
            })
        };
        // The object replica's checkpoint lies past the mark.
        support::nbd::qemu_io_ok(&primary.uri(), &["write -P 3 4M 8M", "discard 32M 1M"]);
        durable(&primary);
        run_ok(&object_replay);
        support::nbd::qemu_io_ok(&primary.uri(), &["write -P 4 48M 2M"]);
        durable(&primary);
        primary.kill9();
        // The journal's head, as a fresh replay has it.
        let head = sub.join("head.img");
        let mut args = replay_args(&journal, &head, "head");
        args.push("--once".into());
        run_ok(&args);

        let b = sub.join("b.img");
        let mut promote_args: Vec<String> = [
            "promote",
            "--replica",
            &objrep,
            "--image",
            path(&b),
            "--journal",
            &journal,
            "--name",
            "siteb",
            "--force",
        ]
        .map(String::from)
        .to_vec();
        if at_mark {
            promote_args.extend(["--mark".into(), "m1".into()]);
        }
        let mut promoted = Daemon::start_args(&b, None, &promote_args, &[]);
        promoted.wait_log(Duration::from_secs(60), "promoted at LSN");
        assert_eq!(promoted.status()["epoch"], 2);
        let want = if at_mark { &at_m1 } else { &head };
        assert!(
            files_equal(&b, want),
            "at_mark {at_mark}: the image differs"
        );
        support::nbd::qemu_io_ok(&promoted.uri(), &["write -P 9 1M 1M"]);
        promoted.stop_ok();
        verify_journal(&journal);
        let check = sub.join("check.img");
        let mut args = replay_args(&journal, &check, "check");
        args.push("--once".into());
        run_ok(&args);
        assert!(
            files_equal(&b, &check),
            "at_mark {at_mark}: a replay of the chain differs"
        );
        let followed = support::replay::run(&object_replay);
        if at_mark {
            assert!(sub.join("journal/branches/before-e2").exists(), "no branch");
            let err = String::from_utf8_lossy(&followed.stderr);
            assert!(
                !followed.status.success() && err.contains("forked the journal"),
                "{err}"
            );
        } else {
            assert!(
                followed.status.success(),
                "{}",
                String::from_utf8_lossy(&followed.stderr)
            );
        }
    }
}
