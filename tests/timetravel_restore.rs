//! `tinylag restore` and `tinylag timeline` against journals written in phases of known
//! content at controlled times: restoring to every mark and every recorded time gives exactly
//! that phase's image, backwards through the undo log and forwards through the journal (a
//! delayed replica); refusals (before the window, inside a resync span, an unknown mark)
//! write nothing; and a restore while `replay` applies is still exact.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::replay::{file_hash, now_ns, replay_args, run, run_ok, spawn, TestJournal};
use support::timetravel::{assert_phase, phase, Model, PhaseEnd, SEC};
use tinylag::clock::format_ns;
use tinylag::journal::Op;

const SIZE: u64 = 16 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A whole second two hours ago: phases are in the past, so an agent without delay
/// applies them at once.
fn base_time() -> u64 {
    (now_ns() - 7200 * SEC) / SEC * SEC
}

/// `tinylag restore` arguments.
fn restore_args(
    journal: &TestJournal,
    replica: &Path,
    point: &[&str],
    output: &Path,
) -> Vec<String> {
    let mut args = vec![
        "restore".to_string(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(replica),
        "--output".into(),
        s(output),
    ];
    args.extend(point.iter().map(|p| p.to_string()));
    args
}

fn replay_once(journal: &TestJournal, replica: &Path, extra: &[&str]) {
    let mut args = replay_args(journal.uri(), replica, "dr");
    args.push("--once".into());
    args.extend(extra.iter().map(|a| a.to_string()));
    run_ok(&args);
}

/// Every file under `dir`, with its size, to say "unchanged".
fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len()));
            }
        }
    }
    out.sort();
    out
}

/// Restores to `point` into a fresh file under `dir` and checks it is `phase`'s image.
fn restore_is(journal: &TestJournal, replica: &Path, dir: &Path, point: &[&str], phase: &PhaseEnd) {
    let out = dir.join(format!("out-{}", rand_name()));
    let said = run_ok(&restore_args(journal, replica, point, &out));
    // Not a terminal: one summary line per stage, no running `copy: N/M` counts.
    let stderr = String::from_utf8_lossy(&said.stderr);
    assert!(
        stderr.contains("copy: done, "),
        "restore {point:?}: {stderr}"
    );
    for line in stderr.lines() {
        let stage = line.split(':').next().unwrap_or_default();
        if ["copy", "undo", "journal"].contains(&stage) {
            assert!(
                line.starts_with(&format!("{stage}: done, ")),
                "restore {point:?}: {line}"
            );
        }
    }
    assert_phase(&out, phase, &format!("restore {point:?}"));
    std::fs::remove_file(&out).unwrap();
}

fn rand_name() -> String {
    format!("{:x}", now_ns())
}

/// Runs a restore that must be refused: exit 1, `needles` in the message, no output.
fn refused(journal: &TestJournal, replica: &Path, dir: &Path, point: &[&str], needles: &[&str]) {
    let out = dir.join("refused.img");
    let o = run(&restore_args(journal, replica, point, &out));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "restore {point:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "restore {point:?}: {n:?} not in {err}");
    }
    assert!(!out.exists(), "a refused restore wrote {}", out.display());
}

async fn phases(journal: &mut TestJournal, t0: u64, n: usize) -> Vec<PhaseEnd> {
    let mut model = Model::new(SIZE);
    let mut ends = Vec::new();
    for i in 0..n {
        let end = phase(
            journal,
            &mut model,
            &format!("p{}", i + 1),
            t0 + 60 * SEC * i as u64,
            3,
            20,
        )
        .await;
        ends.push(end);
    }
    ends
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_goes_back_to_every_mark_and_time_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 1).await;
    let replica = dir.path().join("replica.img");
    let t0 = base_time();
    let ends = phases(&mut journal, t0, 4).await;
    replay_once(&journal, &replica, &[]);
    assert_phase(&replica, &ends[3], "the replica");
    let replica_hash = file_hash(&replica);
    let undo_dir = dir.path().join("replica.img.undo");
    let undo_before = tree(&undo_dir);
    let journal_before = tree(&journal.dir);

    for end in &ends {
        restore_is(&journal, &replica, dir.path(), &["--mark", &end.mark], end);
        restore_is(&journal, &replica, dir.path(), &["--at", &end.at()], end);
        restore_is(
            &journal,
            &replica,
            dir.path(),
            &["--at", &end.at_exactly()],
            end,
        );
    }
    // `@unix` and relative forms resolve too (the head: the last phase).
    restore_is(
        &journal,
        &replica,
        dir.path(),
        &["--at", "1m ago"],
        &ends[3],
    );
    let unix = format!("@{}", (ends[1].time_ns + SEC) / SEC);
    restore_is(&journal, &replica, dir.path(), &["--at", &unix], &ends[1]);

    // The dry run says where it goes and writes nothing.
    let out = dir.path().join("dry.img");
    let mut args = restore_args(&journal, &replica, &["--mark", "p1"], &out);
    args.push("--dry-run".into());
    let o = run_ok(&args);
    let plan = String::from_utf8_lossy(&o.stdout);
    assert!(plan.contains("backward through the undo log"), "{plan}");
    assert!(!out.exists());

    // Refusals: before the window, an unknown mark, an existing output.
    let before = format_ns(t0 - 60 * SEC);
    refused(
        &journal,
        &replica,
        dir.path(),
        &["--at", &before],
        &["before the restorable window", &format_ns(t0)],
    );
    refused(
        &journal,
        &replica,
        dir.path(),
        &["--mark", "nosuch"],
        &["nosuch"],
    );
    let o = run(&restore_args(
        &journal,
        &replica,
        &["--at", "nonsense"],
        &out,
    ));
    assert_eq!(o.status.code(), Some(2), "a bad --at is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--at"));
    std::fs::write(&out, b"keep me").unwrap();
    let o = run(&restore_args(&journal, &replica, &["--mark", "p1"], &out));
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    // Nothing the restores read was changed.
    assert_eq!(file_hash(&replica), replica_hash);
    assert_eq!(tree(&undo_dir), undo_before);
    assert_eq!(tree(&journal.dir), journal_before);

    // The timeline shows the window and every mark inside it.
    let o = run_ok(&[
        "timeline".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(&replica),
        "--json".into(),
    ]);
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["window_start_time"], format_ns(t0));
    assert_eq!(t["window_end"]["lsn"], ends[3].lsn);
    assert_eq!(t["holes"].as_array().unwrap().len(), 0);
    let marks = t["marks"].as_array().unwrap();
    assert_eq!(marks.len(), 4);
    assert!(marks.iter().all(|m| m["in_window"] == true), "{t}");
    assert_eq!(t["applied"]["lsn"], ends[3].lsn);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delayed_replica_restores_forward_through_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 2).await;
    let replica = dir.path().join("replica.img");
    let t0 = base_time();
    let ends = phases(&mut journal, t0, 3).await;
    // The agent stops after phase 1: the replica is behind the journal.
    let mut args = replay_args(journal.uri(), &replica, "dr");
    args.extend(["--until".into(), ends[0].at()]);
    run_ok(&args);
    assert_phase(&replica, &ends[0], "the delayed replica");
    let replica_hash = file_hash(&replica);

    let out = dir.path().join("dry.img");
    let mut args = restore_args(&journal, &replica, &["--mark", "p3"], &out);
    args.push("--dry-run".into());
    let plan = String::from_utf8_lossy(&run_ok(&args).stdout).to_string();
    assert!(plan.contains("forward through the journal"), "{plan}");

    for end in &ends {
        restore_is(&journal, &replica, dir.path(), &["--mark", &end.mark], end);
        restore_is(&journal, &replica, dir.path(), &["--at", &end.at()], end);
    }
    assert_eq!(file_hash(&replica), replica_hash);
    // A time in the future is refused.
    let future = format_ns(now_ns() + 3600 * SEC);
    refused(
        &journal,
        &replica,
        dir.path(),
        &["--at", &future],
        &["in the future"],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_time_inside_a_resync_span_is_refused_naming_the_valid_times() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 3).await;
    let replica = dir.path().join("replica.img");
    let t0 = base_time();
    let mut model = Model::new(SIZE);
    let p1 = phase(&mut journal, &mut model, "p1", t0, 2, 10).await;
    let data = journal.data(1 << 20);
    let begin = journal
        .append_at(vec![Op::ResyncBegin], t0 + 10 * SEC)
        .await;
    let resync = Op::ResyncData { offset: 0, data };
    model.apply(&resync);
    journal.append_at(vec![resync], t0 + 20 * SEC).await;
    let end = journal.append_at(vec![Op::ResyncEnd], t0 + 30 * SEC).await;
    let p2 = phase(&mut journal, &mut model, "p2", t0 + 60 * SEC, 2, 10).await;
    replay_once(&journal, &replica, &[]);
    assert_phase(&replica, &p2, "the replica");

    for inside in [10, 20, 25] {
        refused(
            &journal,
            &replica,
            dir.path(),
            &["--at", &format_ns(t0 + inside * SEC)],
            &[
                "resync span",
                &format!("LSN {}", begin.start - 1),
                &format_ns(t0),
                &format_ns(t0 + 30 * SEC),
            ],
        );
    }
    // At RESYNC_END the replica equals the primary again.
    let out = dir.path().join("after-span.img");
    run_ok(&restore_args(
        &journal,
        &replica,
        &["--at", &format_ns(t0 + 30 * SEC)],
        &out,
    ));
    let p1_out = dir.path().join("p1.img");
    run_ok(&restore_args(
        &journal,
        &replica,
        &["--mark", "p1"],
        &p1_out,
    ));
    assert_phase(&p1_out, &p1, "p1");
    let (a, b) = (
        std::fs::read(&out).unwrap(),
        std::fs::read(&p1_out).unwrap(),
    );
    assert_eq!(
        &a[1 << 20..],
        &b[1 << 20..],
        "the span only changed its first MiB"
    );
    assert_ne!(&a[..1 << 20], &b[..1 << 20]);

    let o = run_ok(&[
        "timeline".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(&replica),
        "--json".into(),
    ]);
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let holes = t["holes"].as_array().unwrap();
    assert_eq!(holes.len(), 1, "{t}");
    assert_eq!(holes[0]["begin_lsn"], begin.start);
    assert_eq!(holes[0]["end"]["lsn"], end.start);
    assert_eq!(holes[0]["valid_before"]["lsn"], begin.start - 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn restore_while_replay_applies_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 4).await;
    let replica = dir.path().join("replica.img");
    let t0 = base_time();
    let mut model = Model::new(SIZE);
    let p1 = phase(&mut journal, &mut model, "p1", t0, 3, 20).await;
    let p2 = phase(&mut journal, &mut model, "p2", t0 + 60 * SEC, 3, 20).await;
    replay_once(&journal, &replica, &[]);
    // Much more to apply, in small batches, while restores run.
    let p3 = phase(&mut journal, &mut model, "p3", t0 + 120 * SEC, 150, 8).await;
    let mut args = replay_args(journal.uri(), &replica, "dr");
    args.extend(["--batch-records".into(), "4".into()]);
    let mut agent = spawn(&args, &dir.path().join("replay.log"));

    let mut overlapped = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    loop {
        let before = journal.position("dr").await.applied_lsn;
        for (point, end) in [(vec!["--mark", "p2"], &p2), (vec!["--mark", "p1"], &p1)] {
            restore_is(&journal, &replica, dir.path(), &point, end);
        }
        let after = journal.position("dr").await.applied_lsn;
        rounds += 1;
        if after > before {
            overlapped += 1;
        }
        if after >= p3.lsn || Instant::now() > deadline {
            break;
        }
    }
    assert!(
        overlapped > 0,
        "no restore ran while the agent applied ({rounds} rounds); the test proves nothing"
    );
    // Caught up: the head is phase 3.
    let (journal_ref, until) = (&journal, p3.lsn);
    let caught_up = move || async move {
        let applied = journal_ref.position("dr").await.applied_lsn;
        if applied >= until {
            Ok(())
        } else {
            Err(format!("at LSN {applied}"))
        }
    };
    support::procs::wait_for_async(
        "the agent to apply phase 3",
        Duration::from_secs(120),
        caught_up,
    )
    .await;
    restore_is(&journal, &replica, dir.path(), &["--mark", "p3"], &p3);
    agent.terminate(Duration::from_secs(10)).unwrap();
    assert_phase(&replica, &p3, "the replica");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_undo_trim_pointer_moves_the_window_start() {
    use std::sync::Arc;
    use tinylag::journal::consumer::{store_trim_pointer, TrimPointer};
    use tinylag::journal::paths::undo_segment_key;
    use tinylag::store::LocalStore;
    use tinylag::store::ObjectStore;

    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 5).await;
    let replica = dir.path().join("replica.img");
    let ends = phases(&mut journal, base_time(), 4).await;
    // Phase by phase, so each phase has undo segments of its own.
    for end in &ends[..3] {
        let mut args = replay_args(journal.uri(), &replica, "dr");
        args.extend(["--until".into(), end.at()]);
        run_ok(&args);
    }
    replay_once(&journal, &replica, &[]);
    assert_phase(&replica, &ends[3], "the replica");
    // What `undo trim` does: delete the segments of phases 1 and 2, then move the pointer.
    let undo: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir.path().join("replica.img.undo")));
    let kept = journal.position("dr").await.undo.next_seq;
    let mut first_kept = kept;
    for seq in 0..kept {
        let (segment, _) =
            tinylag::replayer::UndoLog::open_existing(undo.clone(), journal.manifest.uuid)
                .await
                .unwrap()
                .read(seq)
                .await
                .unwrap()
                .unwrap();
        if segment.records.iter().all(|r| r.lsn <= ends[1].lsn) {
            undo.delete_many(&[undo_segment_key(seq)]).await.unwrap();
        } else {
            first_kept = first_kept.min(seq);
        }
    }
    store_trim_pointer(
        undo.as_ref(),
        &TrimPointer {
            first_seq: first_kept,
            first_lsn: ends[1].lsn + 1,
        },
    )
    .await
    .unwrap();

    restore_is(&journal, &replica, dir.path(), &["--mark", "p2"], &ends[1]);
    restore_is(&journal, &replica, dir.path(), &["--mark", "p3"], &ends[2]);
    refused(
        &journal,
        &replica,
        dir.path(),
        &["--mark", "p1"],
        &["outside the restorable window"],
    );
    refused(
        &journal,
        &replica,
        dir.path(),
        &["--at", &ends[0].at()],
        &["before the restorable window", &format_ns(ends[2].time_ns)],
    );
    let o = run_ok(&[
        "timeline".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(&replica),
        "--json".into(),
    ]);
    let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(t["window_start"]["lsn"], ends[1].lsn, "{t}");
    assert_eq!(t["window_start_time"], format_ns(ends[2].time_ns));
    assert_eq!(t["undo_segments"][0], first_kept);
    let marks = t["marks"].as_array().unwrap();
    assert_eq!(marks[0]["in_window"], false, "{t}");
    assert_eq!(marks[1]["in_window"], true, "{t}");
}

/// A garbage journal `trim` pointer is refused by restore as by every other command, naming
/// the object, and nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_journal_trim_pointer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 7).await;
    let replica = dir.path().join("replica.img");
    let ends = phases(&mut journal, base_time(), 2).await;
    replay_once(&journal, &replica, &[]);
    assert_phase(&replica, &ends[1], "the replica");
    std::fs::write(journal.dir.join("trim"), b"{\"first_seq\": \"what\"").unwrap();
    let info = run(&[
        "journal".to_string(),
        "info".into(),
        "--journal".into(),
        journal.uri().into(),
    ]);
    let said = String::from_utf8_lossy(&info.stderr).to_string();
    assert!(!info.status.success() && said.contains("trim"), "{said}");
    let replica_hash = file_hash(&replica);
    for point in [&["--mark", "p1"][..], &["--at", &ends[1].at()]] {
        refused(&journal, &replica, dir.path(), point, &["trim"]);
    }
    assert_eq!(file_hash(&replica), replica_hash);
}
