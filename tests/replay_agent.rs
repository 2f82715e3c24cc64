//! `tinylag replay` as an operator runs it, on journals written with the library: corrupt
//! and foreign objects are refused before the replica is touched, a delay holds every write
//! back exactly as long as asked, several agents follow one journal, and the control socket
//! and `journal info` report them.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::oracle::OracleImage;
use support::replay::{
    file_hash, first_difference, now_ns, replay_args, run, run_ok, spawn, TestJournal,
};
use tinylag::control::{request, Request};
use tinylag::journal::Op;

/// How long an agent may take to reach an LSN.
const WAIT: Duration = Duration::from_secs(30);

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn assert_equals_journal(replica: &Path, journal: &TestJournal) {
    let mut oracle = OracleImage::new(journal.store.clone(), &journal.manifest);
    oracle.advance(None).await;
    let bytes = std::fs::read(replica).unwrap();
    if let Some(at) = first_difference(&bytes, oracle.image()) {
        panic!(
            "{} differs from the journal's image at LSN {} from byte {at}",
            replica.display(),
            oracle.lsn()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_segment_stops_the_agent_and_leaves_the_replica_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 1).await;
    for _ in 0..3 {
        journal.append_random(20).await;
    }
    let replica = dir.path().join("r.img");
    let once = with(replay_args(journal.uri(), &replica, "dr"), &["--once"]);
    run_ok(&once);
    assert_equals_journal(&replica, &journal).await;
    let hash = file_hash(&replica);
    let position = journal.position("dr").await;

    journal.append_random(20).await;
    let (key, path) = journal.segment_file(3);
    let original = std::fs::read(&path).unwrap();
    // A byte of the header, of a payload, and of the index.
    for at in [20, original.len() / 2, original.len() - 40] {
        let mut bad = original.clone();
        bad[at] ^= 0x20;
        std::fs::write(&path, &bad).unwrap();
        let out = run(&once);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "byte {at} flipped: the agent did not stop"
        );
        assert!(
            stderr.contains(&key),
            "byte {at} flipped: the error does not name {key}: {stderr}"
        );
        assert_eq!(
            file_hash(&replica),
            hash,
            "byte {at} flipped: replica touched"
        );
        assert_eq!(journal.position("dr").await, position);
    }
    std::fs::write(&path, &original).unwrap();
    run_ok(&once);
    assert_equals_journal(&replica, &journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_segment_or_undo_log_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 2).await;
    let mut other = TestJournal::create(&dir.path().join("other"), 16 << 20, 3).await;
    journal.append_random(10).await;
    let replica = dir.path().join("r.img");
    let once = with(replay_args(journal.uri(), &replica, "dr"), &["--once"]);
    run_ok(&once);
    let hash = file_hash(&replica);

    // Segment 1 of the other journal, copied where this journal's segment 1 belongs.
    other.append_random(10).await;
    other.append_random(10).await;
    let (key, theirs) = other.segment_file(1);
    let ours = journal.dir.join(&key);
    std::fs::create_dir_all(ours.parent().unwrap()).unwrap();
    std::fs::copy(&theirs, &ours).unwrap();
    let out = run(&once);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&key) && stderr.contains("device group"),
        "{stderr}"
    );
    assert_eq!(file_hash(&replica), hash);

    // This agent's undo log, offered to an agent of the other journal.
    let undo = dir.path().join("r.img.undo");
    let theirs = with(
        replay_args(other.uri(), &dir.path().join("r2.img"), "dr"),
        &["--once", "--undo", undo.to_str().unwrap()],
    );
    let out = run(&theirs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("belongs to journal"), "{stderr}");
}

/// Records written every 250 ms, each to its own block with its own pattern; the agent runs
/// with `--delay 3s`. Polling the replica, no block may show its pattern before its record's
/// timestamp plus 3 s, and every block must show it soon after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_delay_no_write_shows_early_and_every_write_shows_after() {
    const DELAY: Duration = Duration::from_secs(3);
    const WRITES: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 4).await;
    let replica = dir.path().join("r.img");
    let args = with(
        replay_args(journal.uri(), &replica, "late"),
        &["--delay", "3s"],
    );
    let mut agent = spawn(&args, &dir.path().join("agent.log"));

    let mut written: Vec<u64> = Vec::new();
    let mut seen: Vec<Option<u64>> = vec![None; WRITES];
    let start = Instant::now();
    let mut next_write = start;
    agent.wait_for_path(&replica, Duration::from_secs(30));
    let file = std::fs::File::open(&replica).unwrap();
    while seen.iter().any(Option::is_none) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "writes never showed: seen {seen:?}\n{}",
            agent.log_tail(2000)
        );
        if written.len() < WRITES && Instant::now() >= next_write {
            let i = written.len() as u64;
            let ts = now_ns();
            let op = Op::Write {
                offset: i * 4096,
                data: Bytes::from(vec![i as u8 + 1; 4096]),
            };
            journal.append_at(vec![op], ts).await;
            written.push(ts);
            next_write += Duration::from_millis(250);
        }
        let mut buf = vec![0u8; WRITES * 4096];
        file.read_exact_at(&mut buf, 0).unwrap();
        let now = now_ns();
        for (i, ts) in written.iter().enumerate() {
            let shown = buf[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1);
            if shown && seen[i].is_none() {
                let due = ts + DELAY.as_nanos() as u64;
                assert!(
                    now >= due,
                    "write {i} showed {} ms before its time plus the delay",
                    (due - now) / 1_000_000
                );
                seen[i] = Some(now);
            }
        }
        // This loop measures time (when each write shows against when it was due), so it
        // looks at the replica at a fixed pace rather than waiting for a condition.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (i, (ts, at)) in written.iter().zip(&seen).enumerate() {
        let late = at.unwrap() - (ts + DELAY.as_nanos() as u64);
        assert!(
            late < 2_000_000_000,
            "write {i} showed {} ms after it was due",
            late / 1_000_000
        );
    }
    let status = agent.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "SIGTERM ends the agent cleanly: {status}");
}

/// Two agents with different delays follow a journal while it is written; both converge to
/// the journal's image, and status and `journal info` describe them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_different_delays_both_converge() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 32 << 20, 5).await;
    journal.append_random(30).await;
    let near = dir.path().join("near.img");
    let far = dir.path().join("far.img");
    let near_ctl = dir.path().join("near.ctl");
    let mut a = spawn(
        &with(
            replay_args(journal.uri(), &near, "near"),
            &["--control", near_ctl.to_str().unwrap()],
        ),
        &dir.path().join("near.log"),
    );
    let mut b = spawn(
        &with(replay_args(journal.uri(), &far, "far"), &["--delay", "2s"]),
        &dir.path().join("far.log"),
    );
    // Written while both follow (they run from the start; nothing here waits for them).
    for _ in 0..10 {
        journal.append_random(30).await;
    }
    let head = journal.next_lsn - 1;
    for (name, agent) in [("near", &mut a), ("far", &mut b)] {
        journal.wait_applied(name, head, agent, WAIT).await;
    }
    assert_equals_journal(&near, &journal).await;
    assert_equals_journal(&far, &journal).await;

    let status = request(
        &near_ctl,
        &Request {
            cmd: "status".into(),
            args: serde_json::Value::Null,
        },
    )
    .await
    .unwrap();
    assert_eq!(status["role"], "replica");
    assert_eq!(status["name"], "near");
    assert_eq!(status["applied_lsn"], head);
    assert_eq!(status["consistent_lsn"], head);
    assert_eq!(status["head_lsn"], head);
    assert_eq!(status["lag_records"], 0);
    assert_eq!(status["delay"], "0s");
    assert!(status["undo_segments"].as_u64().unwrap() > 0, "{status}");
    assert!(status["undo_bytes"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["state"], "idle");
    // The default control socket sits beside the replica.
    let far_status = request(
        &dir.path().join("far.img.ctl"),
        &Request {
            cmd: "status".into(),
            args: serde_json::json!({"format": "text"}),
        },
    )
    .await
    .unwrap();
    let text = far_status["text"].as_str().unwrap();
    assert!(text.contains("delay") && text.contains("2s"), "{text}");

    let out = run_ok(&[
        "journal".into(),
        "info".into(),
        "--journal".into(),
        journal.uri().into(),
        "--json".into(),
    ]);
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let consumers = info["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 2);
    for c in consumers {
        assert_eq!(c["applied_lsn"], head);
        assert_eq!(c["consistent_lsn"], head);
        assert_eq!(c["lag_records"], 0);
        assert!(c["undo"]["bytes"].as_u64().unwrap() > 0, "{c}");
    }
    assert_eq!(
        consumers.iter().find(|c| c["name"] == "far").unwrap()["delay_ns"],
        2_000_000_000u64
    );
    let out = run_ok(&[
        "journal".into(),
        "info".into(),
        "--journal".into(),
        journal.uri().into(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in ["near", "far"] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!("consumer     {name}:")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{text}"));
        assert!(
            line.contains(&format!("applied lsn {head}")) && line.contains("undo log"),
            "{line}"
        );
    }
    for agent in [&mut a, &mut b] {
        assert!(agent.terminate(Duration::from_secs(10)).unwrap().success());
    }
    assert!(!near_ctl.exists(), "the control socket is removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_name_the_flag_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 6).await;
    let replica = dir.path().join("r.img");
    for (extra, needle) in [
        (&["--delay", "soon"][..], "--delay"),
        (&["--until", "tomorrow"][..], "--until"),
        (&["--undo", "ftp://x"][..], "--undo"),
    ] {
        let out = run(&with(replay_args(journal.uri(), &replica, "dr"), extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
    }
    let out = run(&replay_args(journal.uri(), &replica, "../evil"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("consumer name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !replica.exists(),
        "a refused start leaves no replica behind"
    );
}
