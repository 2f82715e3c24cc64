//! `tinylag journal trim`, `journal unregister` and `undo trim` as an operator runs them
//! from cron: never past the slowest consumer, replay resumes from the commit positions
//! afterwards, a second run is a no-op, a dry run deletes nothing, trim racing a live
//! `serve` + `replay` (and a writer restart) loses nothing, a `kill -9` of trim at random
//! moments leaves a journal every reader accepts, `--drop-consumer-after` drops a silent
//! consumer and never a live idle one, and undo trim keeps crash recovery working.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use support::daemon::{init, Daemon};
use support::nbd::qemu_io_ok;
use support::oracle::{assert_same_image, OracleImage};
use support::procs::wait_for_async;
use support::replay::{first_difference, now_ns, replay_args, run, run_ok, spawn, TestJournal};
use tinylag::journal::consumer::{self, ConsumerState};
use tinylag::journal::paths;
use tinylag::journal::plan_restart_from_trim_pointer;
use tinylag::journal::Op;
use tinylag::journal::{Cursor, JournalReader, Step};
use tinylag::store::list_all;

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn with(mut base: Vec<String>, extra: &[&str]) -> Vec<String> {
    base.extend(extra.iter().map(|s| s.to_string()));
    base
}

/// `tinylag journal trim --journal J extra… --json`, which must succeed; its JSON.
fn trim_json(journal: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(&with(
        args(&["journal", "trim", "--journal", journal, "--json"]),
        extra,
    ));
    serde_json::from_slice(&out.stdout).expect("trim --json prints JSON")
}

/// The seqs of the segment files in a local journal.
async fn segment_seqs(journal: &TestJournal) -> Vec<u64> {
    let mut seqs: Vec<u64> = list_all(journal.store.as_ref(), paths::JOURNAL_PREFIX)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| paths::parse_segment_key(&m.key, journal.manifest.splay_width))
        .collect();
    seqs.sort_unstable();
    seqs
}

fn assert_replica_is(replica: &Path, oracle: &OracleImage, what: &str) {
    let bytes = std::fs::read(replica).unwrap();
    if let Some(at) = first_difference(&bytes, oracle.image()) {
        panic!(
            "{what}: {} differs from the journal's image at LSN {} from byte {at}",
            replica.display(),
            oracle.lsn()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_never_passes_the_slower_consumer_and_replay_resumes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 3).await;
    let (slow, fast) = (dir.path().join("slow.img"), dir.path().join("fast.img"));
    for _ in 0..10 {
        journal.append_random(8).await;
    }
    run_ok(&with(
        replay_args(journal.uri(), &slow, "slow"),
        &["--once"],
    ));
    for _ in 0..10 {
        journal.append_random(8).await;
    }
    run_ok(&with(
        replay_args(journal.uri(), &fast, "fast"),
        &["--once"],
    ));
    for _ in 0..5 {
        journal.append_random(8).await;
    }
    // The image the journal describes, while all of it is still there.
    let mut oracle = OracleImage::new(journal.store.clone(), &journal.manifest);
    oracle.advance(None).await;
    let floor = journal.position("slow").await.trim_floor();
    assert_eq!(floor, 10);

    let all: Vec<u64> = (0..25).collect();
    let dry = trim_json(journal.uri(), &["--retain", "0", "--dry-run"]);
    assert_eq!(dry["deleted_segments"], 10);
    assert_eq!(
        segment_seqs(&journal).await,
        all,
        "--dry-run deleted something"
    );

    let report = trim_json(journal.uri(), &["--retain", "0"]);
    assert_eq!(report["deleted_segments"], 10, "{report:#}");
    assert_eq!(report["after"]["first_seq"], 10);
    assert_eq!(report["held_by"]["reason"], "consumer");
    assert_eq!(report["held_by"]["name"], "slow");
    let requests = report["requests"]["get_tail"].as_u64().unwrap()
        + report["requests"]["delete_many"].as_u64().unwrap();
    assert!(requests <= 2 * 10 + 2, "{report:#}");
    assert_eq!(segment_seqs(&journal).await, (10..25).collect::<Vec<_>>());

    // Text output names the holder; a second run deletes nothing.
    let out = run_ok(&args(&[
        "journal",
        "trim",
        "--journal",
        journal.uri(),
        "--retain",
        "0",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("nothing to trim"), "{text}");
    assert!(text.contains("held back by consumer slow"), "{text}");
    assert_eq!(segment_seqs(&journal).await, (10..25).collect::<Vec<_>>());

    // Both consumers continue from their commits and reach the same image.
    run_ok(&with(
        replay_args(journal.uri(), &slow, "slow"),
        &["--once"],
    ));
    run_ok(&with(
        replay_args(journal.uri(), &fast, "fast"),
        &["--once"],
    ));
    assert_replica_is(&slow, &oracle, "the slower consumer");
    assert_replica_is(&fast, &oracle, "the faster consumer");

    // `journal info` and `inspect` start at the pointer.
    let info = run_ok(&args(&[
        "journal",
        "info",
        "--journal",
        journal.uri(),
        "--json",
    ]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["trim"]["first_seq"], 10);
    assert_eq!(info["segments"], 15);
    run_ok(&args(&[
        "journal",
        "inspect",
        "--journal",
        journal.uri(),
        "--limit",
        "3",
    ]));

    // A new replica cannot be built from the trimmed journal.
    let out = run(&with(
        replay_args(journal.uri(), &dir.path().join("new.img"), "new"),
        &["--once"],
    ));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("trimmed"));
}

#[test]
fn bad_arguments_are_refused_naming_the_flag_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j").display().to_string();
    init(&journal, &dir.path().join("p.img"), "16M", &[], &[]);
    for (flags, named) in [
        (vec!["journal", "trim", "--retain", "5x"], "--retain"),
        (
            vec!["journal", "trim", "--drop-consumer-after", "soon"],
            "--drop-consumer-after",
        ),
    ] {
        let out = run(&with(args(&flags), &["--journal", &journal]));
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(named),
            "{flags:?}"
        );
    }
    let out = run(&args(&[
        "undo",
        "trim",
        "--undo",
        &journal,
        "--journal",
        &journal,
    ]));
    assert_eq!(
        out.status.code(),
        Some(2),
        "--retain is required for undo trim"
    );
    // An unknown consumer, a bad name, a missing undo log: exit 1, named.
    for (flags, expect) in [
        (vec!["journal", "unregister", "--name", "ghost"], "ghost"),
        (
            vec!["journal", "unregister", "--name", "../x"],
            "invalid consumer name",
        ),
    ] {
        let out = run(&with(args(&flags), &["--journal", &journal]));
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expect), "{flags:?}: {stderr}");
    }
    let nowhere = dir.path().join("nowhere");
    let out = run(&args(&[
        "undo",
        "trim",
        "--undo",
        nowhere.to_str().unwrap(),
        "--journal",
        &journal,
        "--retain",
        "1d",
    ]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no undo log"));
    assert!(!nowhere.exists(), "undo trim created an undo log");
}

/// A consumer position written with the library, as a dead agent left it.
async fn silent_consumer(journal: &TestJournal, name: &str, silent_for: Duration) {
    let at = now_ns() - silent_for.as_nanos() as u64;
    let state = ConsumerState {
        name: name.into(),
        next_seq: 0,
        applied_lsn: 0,
        applied_timestamp_ns: 0,
        consistent_lsn: 0,
        consistent_seq: 0,
        consistent_timestamp_ns: 0,
        delay_ns: 0,
        replica: "/gone.img".into(),
        registered_at_ns: at,
        updated_at_ns: at,
        undo: Default::default(),
        verify: Default::default(),
        seed: Default::default(),
        chain_epoch: 0,
    };
    consumer::commit(journal.store.as_ref(), &state)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_consumer_after_drops_a_silent_consumer_and_never_a_live_idle_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 5).await;
    for _ in 0..6 {
        journal.append_random(4).await;
    }
    silent_consumer(&journal, "dead", Duration::from_secs(3600)).await;
    let replica = dir.path().join("live.img");
    let mut agent = spawn(
        &with(
            replay_args(journal.uri(), &replica, "live"),
            &["--idle-commit", "1s"],
        ),
        &dir.path().join("replay.log"),
    );
    // Caught up: the agent has read every segment.
    let caught_up = journal
        .wait_applied(
            "live",
            journal.next_lsn - 1,
            &mut agent,
            Duration::from_secs(60),
        )
        .await;
    assert!(caught_up.next_seq >= 6, "{caught_up:?}");
    // Idle longer than --drop-consumer-after (4 s): only its idle commits keep it. Waited
    // for on the position itself: an idle commit made more than 4 s after catching up.
    let idle_since = caught_up.updated_at_ns;
    let journal_ref = &journal;
    let idle_commit = move || async move {
        let pos = journal_ref.position("live").await;
        if pos.updated_at_ns > idle_since + 4_500_000_000 {
            Ok(())
        } else {
            Err(format!(
                "last commit {} ns after catching up",
                pos.updated_at_ns.saturating_sub(idle_since)
            ))
        }
    };
    wait_for_async(
        "an idle commit past 4 s",
        Duration::from_secs(60),
        idle_commit,
    )
    .await;
    let out = run_ok(&args(&[
        "journal",
        "trim",
        "--journal",
        journal.uri(),
        "--retain",
        "0",
        "--drop-consumer-after",
        "4s",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dropped: Vec<_> = report["dropped_consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(dropped, ["dead"], "{report:#}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unregistered consumer dead"),
        "not loud: {stderr}"
    );
    // The live consumer is at the head, so only the newest segment stays.
    assert_eq!(report["held_by"]["reason"], "head", "{report:#}");
    assert_eq!(report["after"]["first_seq"], 5, "{report:#}");
    let names: Vec<_> = consumer::list(journal.store.as_ref())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["live"]);
    assert!(agent.exited().is_none(), "{}", agent.log_tail(4000));
    agent.terminate(Duration::from_secs(20)).unwrap();

    // By hand.
    let out = run_ok(&args(&[
        "journal",
        "unregister",
        "--journal",
        journal.uri(),
        "--name",
        "live",
    ]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unregistered consumer live"));
    assert!(consumer::list(journal.store.as_ref())
        .await
        .unwrap()
        .is_empty());
}

/// Every reader accepts the journal: a restarting writer plans to continue at `end`, the
/// chain reads gap-free from the pointer to it, and `journal info` / `inspect` work.
async fn assert_readable(journal: &TestJournal, end: (u64, u64), what: &str) {
    let (pointer, plan) = plan_restart_from_trim_pointer(journal.store.as_ref(), &journal.manifest)
        .await
        .unwrap_or_else(|e| panic!("{what}: planning a restart: {e}"));
    assert_eq!((plan.next_seq, plan.next_lsn), end, "{what}: restart plan");
    assert!(plan.holes.is_empty(), "{what}: {plan:?}");
    let reader = JournalReader::new(journal.store.clone(), journal.manifest.clone());
    let mut cursor = Cursor {
        seq: pointer.first_seq,
        next_lsn: pointer.first_lsn,
    };
    while let Step::Segment(_) = reader
        .step(&mut cursor)
        .await
        .unwrap_or_else(|e| panic!("{what}: reading from the pointer: {e}"))
    {}
    assert_eq!((cursor.seq, cursor.next_lsn), end, "{what}: chain");
    let info = run_ok(&args(&[
        "journal",
        "info",
        "--journal",
        journal.uri(),
        "--json",
    ]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["head"]["next_seq"], end.0, "{what}: {info:#}");
    run_ok(&args(&[
        "journal",
        "inspect",
        "--journal",
        journal.uri(),
        "--limit",
        "1",
    ]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_killed_at_random_moments_leaves_a_journal_every_reader_accepts() {
    const SEGMENTS: u64 = 2500;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 9).await;
    for _ in 0..SEGMENTS {
        journal.append(vec![Op::Flush]).await;
    }
    // A real consumer at the head.
    let replica = dir.path().join("r.img");
    let once = with(replay_args(journal.uri(), &replica, "dr"), &["--once"]);
    run_ok(&once);
    assert_eq!(journal.position("dr").await.next_seq, SEGMENTS);
    let end = (journal.next_seq, journal.next_lsn);

    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let trim = args(&[
        "journal",
        "trim",
        "--journal",
        journal.uri(),
        "--retain",
        "0",
    ]);
    let log = dir.path().join("trim.log");
    let mut kills = 0;
    let mut kills_while_deleting = 0;
    for attempt in 0.. {
        assert!(attempt < 200, "trim never finished");
        let before = segment_seqs(&journal).await.len();
        let mut child = spawn(&trim, &log);
        if attempt % 2 == 0 {
            // Kill once trim has deleted a random share of what is left: a
            // kill in the middle of the deletions, however fast this machine
            // deletes (a wall-clock guess alone let a fast run finish first).
            let stop_at = rng.gen_range(1..before.max(2));
            // Polled at once (1 ms): a condition with two ends (trim finished, or deleted
            // down to `stop_at`), where any lateness lets trim finish first.
            while child.exited().is_none() && segment_seqs(&journal).await.len() > stop_at {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            // A kill at a random moment: before the listing, during the
            // pointer write, between deletions.
            // (The random moment is the scenario, not a wait for something.)
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..300))).await;
        }
        if let Some(status) = child.exited() {
            assert!(status.success(), "{}", child.log_tail(4000));
            break;
        }
        child.child_mut().kill().expect("SIGKILL");
        child.child_mut().wait().expect("reap");
        kills += 1;
        let after = segment_seqs(&journal).await.len();
        if after < before && after > 1 {
            kills_while_deleting += 1;
        }
        assert_readable(&journal, end, &format!("after kill {kills}")).await;
        run_ok(&once);
    }
    eprintln!(
        "trim was killed {kills} times before a run finished, {kills_while_deleting} of them between deletions"
    );
    assert!(
        kills_while_deleting > 0,
        "no kill landed while trim was deleting ({kills} kills)"
    );
    // Whatever the kills left is gone; the journal keeps its newest segment.
    let report = trim_json(journal.uri(), &["--retain", "0"]);
    assert_eq!(report["after"]["first_seq"], SEGMENTS - 1, "{report:#}");
    assert_eq!(segment_seqs(&journal).await, [SEGMENTS - 1]);
    assert!(!journal.dir.join(paths::TRIM_PENDING).exists());
    assert_readable(&journal, end, "at the end").await;

    // The consumer still follows: new writes reach the replica.
    let data = Bytes::from(vec![0x5a; 64 << 10]);
    journal
        .append(vec![Op::Write {
            offset: 1 << 20,
            data: data.clone(),
        }])
        .await;
    run_ok(&once);
    let bytes = std::fs::read(&replica).unwrap();
    assert_eq!(&bytes[1 << 20..(1 << 20) + data.len()], &data[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undo_trim_between_kills_of_the_agent_keeps_crash_recovery_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), 32 << 20, 11).await;
    let replica = dir.path().join("replica.img");
    let undo = format!("{}.undo", replica.display());
    let base = with(
        replay_args(journal.uri(), &replica, "dr"),
        &[
            "--batch-records",
            "16",
            "--batch-bytes",
            "512K",
            "--undo-part-bytes",
            "128K",
        ],
    );
    let once = with(base.clone(), &["--once"]);
    let recover_only = with(base, &["--recover-only"]);
    let undo_trim = args(&[
        "undo",
        "trim",
        "--undo",
        &undo,
        "--journal",
        journal.uri(),
        "--retain",
        "0",
        "--json",
    ]);
    let mut oracle = OracleImage::new(journal.store.clone(), &journal.manifest);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let log = dir.path().join("replay.log");
    let (mut kills, mut committed_lsn, mut trimmed) = (0, 0, 0u64);
    while kills < 8 {
        while journal.next_lsn - committed_lsn < 400 {
            journal.append_random(40).await;
        }
        let mut agent = spawn(&once, &log);
        // A kill at a random moment is the scenario, not a wait for something.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        if agent.exited().is_none() {
            agent.child_mut().kill().expect("SIGKILL");
            agent.child_mut().wait().expect("reap");
            kills += 1;
        }
        // Trim the undo log with recovery pending: it must keep what recovery needs.
        let committed = journal.position("dr").await;
        let out = run_ok(&undo_trim);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let first = report["after"]["first_seq"].as_u64().unwrap();
        assert!(first <= committed.undo.consistent_seq, "{report:#}");
        trimmed += report["deleted_segments"].as_u64().unwrap();

        run_ok(&recover_only);
        committed_lsn = committed.applied_lsn;
        oracle.advance(Some(committed_lsn)).await;
        assert_replica_is(
            &replica,
            &oracle,
            &format!("kill {kills}, after undo trim and recovery"),
        );
    }
    run_ok(&once);
    oracle.advance(None).await;
    assert_replica_is(&replica, &oracle, "after the final run");
    // Everything is applied and consistent: the whole log is past the window.
    let out = run_ok(&undo_trim);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    trimmed += report["deleted_segments"].as_u64().unwrap();
    assert_eq!(report["held_by"]["reason"], "crash_recovery", "{report:#}");
    eprintln!("undo trim deleted {trimmed} undo segments over {kills} kills");
    assert!(trimmed > 0, "undo trim never deleted anything");
    // Recovery after that trim still finds nothing to undo, and the agent goes on.
    run_ok(&recover_only);
    journal.append_random(40).await;
    run_ok(&once);
    oracle.advance(None).await;
    assert_replica_is(&replica, &oracle, "after trimming the whole window");
    // The pointer is where the window starts, and the log below it is gone.
    let undo_dir = PathBuf::from(&undo);
    let pointer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(undo_dir.join("trim")).unwrap()).unwrap();
    let first = pointer["first_seq"].as_u64().unwrap();
    assert!(first > 0);
    let below = (0..first)
        .filter(|s| undo_dir.join(paths::undo_segment_key(*s)).exists())
        .count();
    assert_eq!(below, 0, "undo segments left below the pointer");
}

/// Stops the daemon (it drains the journal) and returns the last LSN it journaled.
fn stop_daemon(daemon: &mut Daemon) -> u64 {
    let status = daemon.wait_status(Duration::from_secs(30), "the journal to drain", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    daemon.stop_ok();
    status["head_lsn"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_racing_serve_and_replay_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let uri = dir.path().join("journal").display().to_string();
    init(
        &uri,
        &primary,
        "32M",
        &["--segment-size", "64K", "--splay", "4"],
        &[],
    );
    let journal = TestJournal::open(Path::new(&uri)).await;
    let replica = dir.path().join("replica.img");
    let mut agent = spawn(
        &replay_args(&uri, &replica, "dr"),
        &dir.path().join("replay.log"),
    );

    // Trim in a loop, as fast as it goes, while everything else runs.
    let stop = Arc::new(AtomicBool::new(false));
    let trimmer = {
        let (stop, uri) = (stop.clone(), uri.clone());
        std::thread::spawn(move || {
            let (mut runs, mut deleted) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let out = run_ok(&args(&[
                    "journal",
                    "trim",
                    "--journal",
                    &uri,
                    "--retain",
                    "0",
                    "--json",
                ]));
                let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                deleted += report["deleted_segments"].as_u64().unwrap();
                runs += 1;
            }
            (runs, deleted)
        })
    };

    // Two daemon lifetimes: the second plans its restart from a pointer trim keeps moving.
    for round in 0..2u8 {
        let mut daemon = Daemon::start(&primary, &uri, &["--linger", "10ms"], &[]);
        let nbd = daemon.uri();
        for i in 0..12u8 {
            let fill = round * 16 + i;
            qemu_io_ok(
                &nbd,
                &[
                    &format!("write -P {fill} {}k 192k", (u32::from(i) * 1216) % 30000),
                    "flush",
                ],
            );
        }
        let head = stop_daemon(&mut daemon);
        journal
            .wait_applied("dr", head, &mut agent, Duration::from_secs(120))
            .await;
        assert_same_image(&replica, &primary);
    }
    stop.store(true, Ordering::Relaxed);
    let (runs, deleted) = trimmer.join().expect("the trim loop");
    eprintln!("{runs} trims deleted {deleted} segments while serve and replay ran");
    assert!(deleted > 0, "trim never deleted anything");
    agent.terminate(Duration::from_secs(20)).unwrap();
}

/// A branch `promote --at` left holds trim at its first segment as a consumer would, and
/// names itself; `--drop-branch NAME` lets its segments go; an unknown name changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branch_holds_trim_until_dropped() {
    use tinylag::journal::chain::{self, Branch};
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 31).await;
    journal.begin_epoch(1, None).await;
    for _ in 0..4 {
        journal.append_random(8).await;
    }
    let fork = journal.next_lsn - 1;
    let first_seq = journal.next_seq;
    for _ in 0..3 {
        journal.append_random(8).await;
    }
    let branch = Branch {
        name: "before-e2".into(),
        forked_by: 2,
        from_lsn: fork + 1,
        to_lsn: journal.next_lsn - 1,
        first_seq,
        last_seq: journal.next_seq - 1,
        created_at_ns: now_ns(),
    };
    chain::create_branch(journal.store.as_ref(), &branch)
        .await
        .unwrap();
    journal.begin_epoch(2, Some((1, fork))).await;
    for _ in 0..3 {
        journal.append_random(8).await;
    }
    let replica = dir.path().join("dr.img");
    run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));

    // More for the consumer to follow after the trims; the image while all is there.
    journal.append_random(8).await;
    let image = journal.chain_image(None).await;
    let report = trim_json(journal.uri(), &["--retain", "0"]);
    assert_eq!(report["held_by"]["reason"], "branch", "{report:#}");
    assert_eq!(report["held_by"]["name"], "before-e2");
    assert_eq!(report["after"]["first_seq"], first_seq);
    let seqs = segment_seqs(&journal).await;
    assert!((first_seq..=branch.last_seq).all(|s| seqs.contains(&s)));
    let out = run_ok(&args(&[
        "journal",
        "trim",
        "--journal",
        journal.uri(),
        "--retain",
        "0",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("held back by branch before-e2"), "{text}");

    let before = list_all(journal.store.as_ref(), "").await.unwrap();
    let out = run(&args(&[
        "journal",
        "trim",
        "--journal",
        journal.uri(),
        "--retain",
        "0",
        "--drop-branch",
        "nope",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no branch named nope") && stderr.contains("before-e2"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert_eq!(list_all(journal.store.as_ref(), "").await.unwrap(), before);

    let report = trim_json(
        journal.uri(),
        &["--retain", "0", "--drop-branch", "before-e2"],
    );
    assert_eq!(report["dropped_branches"][0], "before-e2", "{report:#}");
    assert_ne!(report["held_by"]["reason"], "branch", "{report:#}");
    assert!(report["after"]["first_seq"].as_u64().unwrap() > branch.last_seq);
    assert!(chain::list_branches(journal.store.as_ref())
        .await
        .unwrap()
        .is_empty());
    // The consumer still follows the chain from its position.
    run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));
    assert!(first_difference(&std::fs::read(&replica).unwrap(), &image).is_none());
}
