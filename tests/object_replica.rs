//! The object replica (issue 24), through the real binary: `replay --replica URI` keeps the
//! replica as layers and checkpoints in a store (a directory, s3s-fs, moto); `restore
//! --replica URI` of every mark equals the journal's own image there (the oracle); a kill -9 at random moments leaves a
//! replica that restores to its last checkpoint exactly, from its layers alone; a corrupt or
//! missing layer is named and nothing else is touched.

mod support;

use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::objrep::Replica;
use support::oracle::OracleImage;
use support::replay::{bytes_hash, first_difference, run, spawn, TestJournal};
use support::s3::{S3Server, S3ServerKind};
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;
use tinylag::objrep::manifest;

const SIZE: u64 = 16 << 20;
/// Segment `i` is stamped `T0 + i * 10 ms`: distinct times, so `--at` a checkpoint's time is
/// exactly that checkpoint.
const T0: u64 = 1_790_000_000_000_000_000;

fn at_arg(ns: u64) -> String {
    let t =
        chrono::DateTime::from_timestamp((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32)
            .expect("a time");
    t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// Appends `n` segments of random writes, discards and zeroes.
async fn append_segments(journal: &mut TestJournal, n: usize) {
    for _ in 0..n {
        let ops = (0..24).map(|_| journal.random_op()).collect();
        let ts = T0 + journal.next_seq * 10_000_000;
        journal.append_at(ops, ts).await;
    }
}

/// Appends a segment holding one `MARK` record and publishes the mark.
async fn append_mark(journal: &mut TestJournal, name: &str) -> u64 {
    let ts = T0 + journal.next_seq * 10_000_000;
    let lsns = journal
        .append_at(vec![Op::Mark { name: name.into() }], ts)
        .await;
    mark::create(
        journal.store.as_ref(),
        &MarkPoint {
            name: name.into(),
            lsn: lsns.start,
            timestamp_ns: ts,
        },
    )
    .await
    .expect("publish the mark");
    lsns.start
}

/// Restores `point` (`--mark NAME` or `--at TIME`) to a new file and returns its bytes and
/// the restore's JSON report.
fn restore(
    replica: &Replica,
    journal: &TestJournal,
    point: &[&str],
    out: &Path,
) -> (Vec<u8>, serde_json::Value) {
    let mut extra = point.to_vec();
    let out_s = out.display().to_string();
    extra.extend(["--output", &out_s, "--json"]);
    let done = replica.run_ok(&replica.args(journal, &["restore"], &extra));
    let report: serde_json::Value =
        serde_json::from_slice(&done.stdout).expect("restore prints JSON");
    let bytes = std::fs::read(out).expect("read the restored image");
    std::fs::remove_file(out).expect("remove the restored image");
    (bytes, report)
}

fn assert_image(got: &[u8], want: &[u8], what: &str) {
    if let Some(at) = first_difference(got, want) {
        panic!("{what}: the restored image differs from the oracle from byte {at}");
    }
}

/// Random writes with marks, replayed in several `--once` runs (each resumes from the
/// manifest the last one committed); every mark restores to the oracle's image.
async fn marks_scenario(replica: &Replica, dir: &Path) {
    let mut journal = TestJournal::create(&dir.join("journal"), SIZE, 24).await;
    let once = replica.args(
        &journal,
        &["replay"],
        &["--name", "objrep", "--once", "--layer-size", "512K"],
    );
    let mut marks = Vec::new();
    for round in 0..6 {
        append_segments(&mut journal, 3).await;
        let name = format!("m{round}");
        let lsn = append_mark(&mut journal, &name).await;
        marks.push((name, lsn));
        append_segments(&mut journal, 2).await;
        if round % 2 == 1 {
            replica.run_ok(&once);
        }
    }
    let end = journal.next_lsn - 1;
    let m = replica.manifest().await.expect("a manifest");
    assert_eq!(m.last().expect("a checkpoint").lsn, end);
    assert_eq!(m.checkpoints.len(), 3, "one checkpoint per --once run");
    // Generations before the previous one are deleted: the store does not keep every list.
    let generations: Vec<String> = list_keys(replica)
        .await
        .into_iter()
        .filter(|k| k.starts_with("checkpoints/"))
        .collect();
    assert_eq!(generations.len(), 2, "{generations:?}");
    // The consumer's position is the checkpoint's: journal trim keeps what it needs.
    let pos = journal.position("objrep").await;
    assert_eq!((pos.applied_lsn, pos.consistent_lsn), (end, end));

    let out = dir.join("restored.img");
    for (name, lsn) in &marks {
        let (bytes, report) = restore(replica, &journal, &["--mark", name], &out);
        assert_eq!(report["lsn"], *lsn, "mark {name}");
        assert_image(
            &bytes,
            &journal.chain_image(Some(*lsn)).await,
            &format!("mark {name}"),
        );
    }
    // A checkpoint's time restores from its layers alone.
    for cp in &m.checkpoints {
        let (bytes, report) = restore(replica, &journal, &["--at", &at_arg(cp.timestamp_ns)], &out);
        assert_eq!(report["lsn"], cp.lsn);
        assert_eq!(
            report["journal_records"], 0,
            "checkpoint {} from layers alone",
            cp.lsn
        );
        assert_image(
            &bytes,
            &journal.chain_image(Some(cp.lsn)).await,
            &format!("checkpoint {}", cp.lsn),
        );
    }
    // The timeline lists the checkpoints and the marks.
    let t = replica.run_ok(&replica.args(&journal, &["timeline"], &["--json"]));
    let t: serde_json::Value = serde_json::from_slice(&t.stdout).expect("timeline JSON");
    assert_eq!(t["checkpoints"].as_array().map(Vec::len), Some(3));
    assert_eq!(t["marks"].as_array().map(Vec::len), Some(6));

    // A rerun with nothing new writes nothing to the replica's store.
    let before = list_keys(replica).await;
    replica.run_ok(&once);
    assert_eq!(
        list_keys(replica).await,
        before,
        "an idle run wrote to the replica"
    );

    // The replica is a consumer like any other: `journal trim` deletes what it committed.
    let mut cp_images = Vec::new();
    for cp in &m.checkpoints {
        cp_images.push(journal.chain_image(Some(cp.lsn)).await);
    }
    let trim = support::objrep::trim_the_journal(&journal);
    let trimmed = tinylag::journal::consumer::load_trim_pointer(journal.store.as_ref())
        .await
        .unwrap();
    // Trim keeps the journal's newest segment whatever the consumers hold; everything
    // after the middle checkpoint but that one went.
    assert!(
        trimmed.first_lsn > m.checkpoints[1].lsn + 1 && trimmed.first_lsn <= end + 1,
        "trim kept records the object replica no longer needs (first live LSN {}, \
         checkpoints {:?}): {}",
        trimmed.first_lsn,
        m.checkpoints,
        String::from_utf8_lossy(&trim.stderr)
    );
    // Every checkpoint still restores from its layers alone...
    for (cp, image) in m.checkpoints.iter().zip(&cp_images) {
        let (bytes, report) = restore(replica, &journal, &["--at", &at_arg(cp.timestamp_ns)], &out);
        assert_eq!(report["lsn"], cp.lsn);
        assert_eq!(
            report["journal_records"], 0,
            "checkpoint {} after trim",
            cp.lsn
        );
        assert_image(&bytes, image, &format!("checkpoint {} after trim", cp.lsn));
    }
    // ...and a mark between checkpoints, whose records are gone, is refused, naming why.
    let (name, _) = &marks[4];
    let out_s = out.display().to_string();
    let refused = replica.run(&replica.args(
        &journal,
        &["restore"],
        &["--mark", name, "--output", &out_s],
    ));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a trimmed point was restored");
    assert!(err.contains("only its checkpoints are restorable"), "{err}");
    assert!(!out.exists(), "a refused restore left a file");
}

async fn list_keys(replica: &Replica) -> Vec<String> {
    tinylag::store::list_all(replica.store.as_ref(), "")
        .await
        .expect("list the replica")
        .into_iter()
        .map(|m| m.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mark_restores_from_an_object_replica_in_a_local_store() {
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::local(&dir.path().join("replica"));
    marks_scenario(&replica, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mark_restores_from_an_object_replica_on_s3s_fs() {
    marks_scenario_on(S3ServerKind::S3sFs).await;
}

/// moto (5.x) has every request the object replica makes: conditional create (`If-None-Match:
/// *` on PUT, answered 412 when the key exists), ranged GET, LIST with a prefix and
/// DeleteObjects. It checks the condition and then writes without a lock (as s3s-fs does), so
/// two creates racing on one key could both succeed there, never on S3; the scenario has one
/// writer per key at a time, so it does not depend on that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mark_restores_from_an_object_replica_on_moto() {
    marks_scenario_on(S3ServerKind::Moto).await;
}

/// [`marks_scenario`] with the replica on a local S3 server of `kind` (the journal stays in a
/// directory).
async fn marks_scenario_on(kind: S3ServerKind) {
    let Some(s3) = S3Server::start(kind).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::on_s3(&s3, "objrep/");
    marks_scenario(&replica, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_the_replica_restores_to_its_last_checkpoint_exactly() {
    const KILLS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 5).await;
    let replica = Replica::local(&dir.path().join("replica"));
    // A checkpoint after every segment and a layer every 256 KiB of records: many commit
    // points, and layers uploaded without their manifest for a kill to strand.
    let once = replica.args(
        &journal,
        &["replay"],
        &[
            "--name",
            "crashy",
            "--once",
            "--checkpoint-interval",
            "0s",
            "--layer-size",
            "256K",
        ],
    );
    let mut oracle = OracleImage::new(journal.store.clone(), &journal.manifest);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let out = dir.path().join("restored.img");
    let log = dir.path().join("replay.log");
    let (mut kills, mut last_cp) = (0, 0);
    while kills < KILLS {
        while journal.next_lsn - last_cp < 400 {
            append_segments(&mut journal, 4).await;
        }
        let mut agent = spawn(&once, &log);
        // The random moment of the kill (not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(20..250))).await;
        if agent.exited().is_none() {
            agent.child_mut().kill().expect("SIGKILL");
            agent.child_mut().wait().expect("reap");
            kills += 1;
        }
        let Some(m) = replica.manifest().await else {
            eprintln!("kill {kills}: before the first checkpoint");
            continue;
        };
        let cp = m.last().expect("a manifest holds a checkpoint").clone();
        assert!(cp.lsn >= last_cp, "the checkpoint went back");
        last_cp = cp.lsn;
        let (bytes, report) = restore(
            &replica,
            &journal,
            &["--at", &at_arg(cp.timestamp_ns)],
            &out,
        );
        assert_eq!(report["lsn"], cp.lsn, "kill {kills}");
        assert_eq!(
            report["journal_records"], 0,
            "kill {kills}: from layers alone"
        );
        oracle.advance(Some(cp.lsn)).await;
        assert_image(
            &bytes,
            oracle.image(),
            &format!("kill {kills} (checkpoint LSN {})", cp.lsn),
        );
        eprintln!(
            "kill {kills}: checkpoint LSN {} of {}",
            cp.lsn,
            journal.next_lsn - 1
        );
    }
    // Resumed after every kill, the agent reaches the end, and the end restores too.
    let name = "end";
    let lsn = append_mark(&mut journal, name).await;
    replica.run_ok(&once);
    let (bytes, _) = restore(&replica, &journal, &["--mark", name], &out);
    oracle.advance(Some(lsn)).await;
    assert_image(&bytes, oracle.image(), "after the final run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_layer_is_named_and_nothing_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 9).await;
    let root = dir.path().join("replica");
    let replica = Replica::local(&root);
    append_segments(&mut journal, 4).await;
    append_mark(&mut journal, "m").await;
    replica.run_ok(&replica.args(
        &journal,
        &["replay"],
        &["--name", "r", "--once", "--layer-size", "256K"],
    ));
    let m = replica.manifest().await.expect("a manifest");
    assert!(m.layers.len() >= 2, "several layers: {:?}", m.layers);
    let victim = m.layers[1].key.clone();
    let path = root.join(&victim);
    let good = std::fs::read(&path).unwrap();
    let out = dir.path().join("restored.img");
    let restore_args = replica.args(
        &journal,
        &["restore"],
        &["--mark", "m", "--output", out.to_str().unwrap()],
    );

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let before = list_keys(&replica).await;
    let failed = replica.run(&restore_args);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a corrupt layer was accepted");
    assert!(err.contains(&victim) && err.contains("corrupt"), "{err}");
    assert!(!out.exists(), "the partial output was left behind");
    assert_eq!(list_keys(&replica).await, before);
    assert_eq!(std::fs::read(&path).unwrap(), bad, "the layer was touched");

    std::fs::remove_file(&path).unwrap();
    let failed = replica.run(&restore_args);
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success(), "a missing layer was accepted");
    assert!(err.contains(&victim) && err.contains("missing"), "{err}");
    assert!(!out.exists(), "the partial output was left behind");

    // Put back, the replica restores again.
    std::fs::write(&path, &good).unwrap();
    replica.run_ok(&restore_args);
    assert!(out.exists());
}

#[test]
fn bad_replica_arguments_are_refused_with_one_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let journal = rt.block_on(TestJournal::create(&dir.path().join("journal"), SIZE, 1));
    let root = dir.path().join("replica");
    let uri = format!("file://{}", root.display());
    for (extra, needle) in [
        (vec!["--delay", "1h"], "--delay"),
        (vec!["--no-undo"], "--no-undo"),
    ] {
        let mut args: Vec<String> = [
            "replay",
            "--journal",
            journal.uri(),
            "--replica",
            &uri,
            "--name",
            "x",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{err}");
    }
    assert!(!root.exists(), "a refused start created the replica");

    // A replica kept by one consumer is refused to another name, naming the one it has.
    let replica = Replica::local(&root);
    replica.run_ok(&replica.args(&journal, &["replay"], &["--name", "first", "--once"]));
    let before = rt.block_on(list_keys(&replica));
    let out = replica.run(&replica.args(&journal, &["replay"], &["--name", "second", "--once"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--name first"),
        "{err}"
    );
    assert_eq!(rt.block_on(list_keys(&replica)), before);
}

/// A checkpoint never falls inside a resync span: the agent reads on through it and commits
/// at its end, and what it committed before the span restores exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_checkpoint_falls_inside_a_resync_span() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 3).await;
    let replica = Replica::local(&dir.path().join("replica"));
    let once = replica.args(
        &journal,
        &["replay"],
        &["--name", "spans", "--once", "--checkpoint-interval", "0s"],
    );
    append_segments(&mut journal, 2).await;
    let before_span = journal.next_lsn - 1;
    let ts = T0 + journal.next_seq * 10_000_000;
    let data = journal.data(1 << 20);
    let begin = journal
        .append_at(
            vec![
                Op::ResyncBegin,
                Op::ResyncData {
                    offset: 0,
                    data: data.clone(),
                },
            ],
            ts,
        )
        .await
        .start;
    append_segments(&mut journal, 1).await;
    replica.run_ok(&once);
    let m = replica.manifest().await.expect("a manifest");
    assert_eq!(
        m.last().unwrap().lsn,
        before_span,
        "checkpoints {:?} (the span begins at LSN {begin})",
        m.checkpoints
    );
    // The span ends: the next run commits past it.
    let ts = T0 + journal.next_seq * 10_000_000;
    // The LSN of RESYNC_END: the first consistent point after the span.
    let span_end = journal
        .append_at(
            vec![
                Op::ResyncData {
                    offset: 1 << 20,
                    data,
                },
                Op::ResyncEnd,
            ],
            ts,
        )
        .await
        .end
        - 1;
    append_segments(&mut journal, 1).await;
    let end = journal.next_lsn - 1;
    replica.run_ok(&once);
    let m = replica.manifest().await.expect("a manifest");
    assert_eq!(m.last().unwrap().lsn, end);
    assert!(
        m.checkpoints
            .iter()
            .all(|c| c.lsn < begin || c.lsn >= span_end),
        "a checkpoint inside the span: {:?}",
        m.checkpoints
    );
    let out = dir.path().join("restored.img");
    for cp in &m.checkpoints {
        let (bytes, _) = restore(
            &replica,
            &journal,
            &["--at", &at_arg(cp.timestamp_ns)],
            &out,
        );
        assert_image(
            &bytes,
            &journal.chain_image(Some(cp.lsn)).await,
            &format!("checkpoint {}", cp.lsn),
        );
    }
}

/// A segment missing below the journal's known end is a hole: a point after it is refused,
/// naming the seq, never restored as an earlier point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_after_a_journal_hole_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 11).await;
    let replica = Replica::local(&dir.path().join("replica"));
    let once = replica.args(&journal, &["replay"], &["--name", "holes", "--once"]);
    append_segments(&mut journal, 2).await;
    replica.run_ok(&once);
    append_segments(&mut journal, 4).await;
    replica.run_ok(&once);
    // Seq 3 goes; the consumer committed past it, so the journal knows it existed.
    let (_, path) = journal.segment_file(3);
    std::fs::remove_file(&path).unwrap();
    let inside = T0 + 4 * 10_000_000;
    let out = dir.path().join("restored.img");
    let refused = replica.run(&replica.args(
        &journal,
        &["restore"],
        &["--at", &at_arg(inside), "--output", out.to_str().unwrap()],
    ));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "a point after a hole was restored"
    );
    assert!(err.contains("hole") && err.contains('3'), "{err}");
    assert!(!out.exists(), "a refused restore left a file");
}

/// `tinylag replica compact|trim` arguments for `replica` (a job and its flags).
fn replica_job(replica: &Replica, journal: &TestJournal, job: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec!["replica".into()];
    args.extend(replica.args(journal, &[job], extra));
    args
}

/// Runs a compaction or trim with `--json` and returns its report.
fn job_ok(
    replica: &Replica,
    journal: &TestJournal,
    job: &str,
    extra: &[&str],
) -> serde_json::Value {
    let mut extra = extra.to_vec();
    extra.push("--json");
    let out = replica.run_ok(&replica_job(replica, journal, job, &extra));
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Layers and image parts in the store that no manifest generation in it names.
async fn unnamed_objects(replica: &Replica) -> Vec<String> {
    let keys = list_keys(replica).await;
    let mut named = std::collections::HashSet::new();
    for k in keys.iter().filter(|k| k.starts_with("checkpoints/")) {
        let gen = tinylag::journal::paths::objrep::parse_checkpoint_key(k).expect("a generation");
        if let Some(m) = manifest::load_generation(replica.store.as_ref(), gen)
            .await
            .expect("read a generation")
        {
            named.extend(m.keys().map(String::from));
        }
    }
    keys.into_iter()
        .filter(|k| (k.starts_with("layers/") || k.starts_with("images/")) && !named.contains(k))
        .collect()
}

/// Restores every checkpoint of the newest manifest at its time, from the replica alone, and
/// compares it with the journal's image there; returns how many started from an image, and
/// each checkpoint's image hash.
async fn every_checkpoint_restores(
    replica: &Replica,
    journal: &TestJournal,
    out: &Path,
    what: &str,
) -> (usize, Vec<(u64, u64)>) {
    let m = replica.manifest().await.expect("a manifest");
    let mut from_images = 0;
    let mut hashes = Vec::new();
    for cp in &m.checkpoints {
        let (bytes, report) = restore(replica, journal, &["--at", &at_arg(cp.timestamp_ns)], out);
        assert_eq!(report["lsn"], cp.lsn, "{what}");
        assert_eq!(
            report["journal_records"], 0,
            "{what}: checkpoint {} from layers alone",
            cp.lsn
        );
        if !report["image_lsn"].is_null() {
            from_images += 1;
        }
        assert_image(
            &bytes,
            &journal.chain_image(Some(cp.lsn)).await,
            &format!("{what}: checkpoint {}", cp.lsn),
        );
        hashes.push((cp.lsn, bytes_hash(&bytes)));
    }
    (from_images, hashes)
}

/// Compaction and trim run while the agent follows the journal: the agent's checkpoints, the
/// compactions' images and the trims' drops all land (each commit reapplied on the newest
/// generation), and every retained mark restores from the replica alone to the oracle, while
/// the marks trim dropped are gone with the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_trim_racing_the_agent_keep_every_retained_mark_exact() {
    const HOUR: u64 = 3_600_000_000_000;
    const MINUTE: u64 = 60_000_000_000;
    const ROUNDS: u64 = 8;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 31).await;
    let replica = Replica::local(&dir.path().join("replica"));
    let agent_args = replica.args(
        &journal,
        &["replay"],
        &[
            "--name",
            "racer",
            "--checkpoint-interval",
            "0s",
            "--poll",
            "20ms",
            "--layer-size",
            "256K",
        ],
    );
    let mut agent = spawn(&agent_args, &dir.path().join("agent.log"));
    // Rounds are stamped an hour apart and their segments a minute apart, so a `--retain`
    // computed from the wall clock cuts exactly between two marks, whatever the test's pace.
    let t = |round: u64, i: u64| T0 + round * HOUR + i * MINUTE;
    let retain_after = |round: u64| {
        let horizon = t(round, 10);
        format!("{}s", (support::replay::now_ns() - horizon) / 1_000_000_000)
    };
    let mut marks = Vec::new();
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..6 {
            let ops = (0..24).map(|_| journal.random_op()).collect();
            journal.append_at(ops, t(round, i)).await;
        }
        let name = format!("m{round}");
        let lsn = journal
            .append_at(vec![Op::Mark { name: name.clone() }], t(round, 10))
            .await
            .start;
        mark::create(
            journal.store.as_ref(),
            &MarkPoint {
                name: name.clone(),
                lsn,
                timestamp_ns: t(round, 10),
            },
        )
        .await
        .unwrap();
        marks.push((round, name, lsn));
        for i in 11..14 {
            let ops = (0..24).map(|_| journal.random_op()).collect();
            journal.append_at(ops, t(round, i)).await;
        }
        // A compaction and a trim start while the agent is still reading the round.
        let compact = replica_job(
            &replica,
            &journal,
            "compact",
            &["--force", "--part-size", "1M", "--json"],
        );
        let compact = std::thread::spawn(move || run(&compact));
        let trim = job_ok(
            &replica,
            &journal,
            "trim",
            &["--retain", &retain_after(round.saturating_sub(3))],
        );
        let compact = compact.join().unwrap();
        assert!(
            compact.status.success(),
            "compact: {}",
            String::from_utf8_lossy(&compact.stderr)
        );
        let compact: serde_json::Value = serde_json::from_slice(&compact.stdout).unwrap();
        outcomes.push((compact["outcome"].clone(), trim["gen"].clone()));
        assert!(
            agent.exited().is_none(),
            "the agent stopped (see agent.log)"
        );
    }
    // The agent catches up, then stops with a last checkpoint.
    let end = journal.next_lsn - 1;
    let mut caught_up = false;
    for _ in 0..600 {
        if replica
            .manifest()
            .await
            .and_then(|m| m.last().map(|c| c.lsn))
            == Some(end)
        {
            caught_up = true;
            break;
        }
        assert!(
            agent.exited().is_none(),
            "the agent stopped (see agent.log)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(caught_up, "the agent did not reach LSN {end}");
    let status = agent.terminate(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "the agent ended with {status}");
    eprintln!("compaction outcomes and trim generations: {outcomes:?}");
    assert!(
        outcomes.iter().any(|(o, _)| o == "compacted"),
        "no compaction committed: {outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|(_, gen)| gen.as_u64() > Some(0)),
        "no trim committed: {outcomes:?}"
    );

    // A last compaction and trim on the quiet replica, then the journal is trimmed behind it:
    // only the replica holds the points now.
    job_ok(
        &replica,
        &journal,
        "compact",
        &["--force", "--part-size", "1M"],
    );
    let oldest_kept = ROUNDS - 4;
    job_ok(
        &replica,
        &journal,
        "trim",
        &["--retain", &retain_after(oldest_kept)],
    );
    let m = replica.manifest().await.unwrap();
    assert!(!m.images.is_empty(), "no image layer: {m:?}");
    assert_eq!(
        m.checkpoints.first().map(|c| c.lsn),
        Some(marks[oldest_kept as usize].2),
        "the oldest retained checkpoint is the mark at the horizon"
    );
    let out = dir.path().join("restored.img");
    let (from_images, hashes) =
        every_checkpoint_restores(&replica, &journal, &out, "after the race").await;
    assert!(from_images > 0, "no checkpoint was read from an image");
    support::objrep::trim_the_journal(&journal);
    // The journal no longer holds the points: each retained mark (a checkpoint of its own)
    // restores from the replica alone, to the image checked against the oracle above.
    for (round, name, lsn) in &marks {
        if *round >= oldest_kept {
            let (bytes, report) = restore(&replica, &journal, &["--mark", name], &out);
            assert_eq!(report["lsn"], *lsn);
            assert_eq!(report["journal_records"], 0, "mark {name}");
            let want = hashes
                .iter()
                .find(|(l, _)| l == lsn)
                .expect("a checkpoint at the mark");
            assert_eq!(
                bytes_hash(&bytes),
                want.1,
                "mark {name} differs from the oracle"
            );
        } else {
            let out_s = out.display().to_string();
            let refused = replica.run(&replica.args(
                &journal,
                &["restore"],
                &["--mark", name, "--output", &out_s],
            ));
            assert!(
                !refused.status.success(),
                "mark {name}, before the retention, restored"
            );
        }
    }
    // What the last trim dropped is named by the previous generation, so it stays until two
    // newer ones exist; nothing else is left unnamed.
    assert_eq!(unnamed_objects(&replica).await, Vec::<String>::new());
}

/// Appends segments and runs the agent `--once` after each few, for many checkpoints.
async fn checkpoints_scenario(replica: &Replica, journal: &mut TestJournal, runs: usize) {
    let once = replica.args(
        journal,
        &["replay"],
        &["--name", "c", "--once", "--layer-size", "256K"],
    );
    for _ in 0..runs {
        append_segments(journal, 3).await;
        replica.run_ok(&once);
    }
}

/// A compaction killed with SIGKILL at random moments leaves the previous generation: every
/// checkpoint still restores exactly; trim then deletes the dead runs' parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compaction_killed_at_random_moments_leaves_every_checkpoint_exact() {
    const KILLS: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 41).await;
    let replica = Replica::local(&dir.path().join("replica"));
    checkpoints_scenario(&replica, &mut journal, 4).await;
    let out = dir.path().join("restored.img");
    let compact = replica_job(
        &replica,
        &journal,
        "compact",
        &["--force", "--part-size", "256K"],
    );
    let log = dir.path().join("compact.log");
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let mut kills = 0;
    for round in 0.. {
        if kills == KILLS {
            break;
        }
        assert!(
            round < 4 * KILLS,
            "the compaction always finished before its kill"
        );
        checkpoints_scenario(&replica, &mut journal, 1).await;
        let before = replica.manifest().await.unwrap();
        let mut job = spawn(&compact, &log);
        // The random moment of the kill (not a wait for a condition).
        tokio::time::sleep(Duration::from_millis(rng.gen_range(5..150))).await;
        if job.exited().is_none() {
            job.child_mut().kill().expect("SIGKILL");
            job.child_mut().wait().expect("reap");
            kills += 1;
        }
        let after = replica.manifest().await.unwrap();
        assert_eq!(
            after.checkpoints, before.checkpoints,
            "a compaction changed checkpoints"
        );
        assert_eq!(
            after.layers, before.layers,
            "a compaction changed the delta layers"
        );
        every_checkpoint_restores(&replica, &journal, &out, &format!("kill {kills}")).await;
    }
    // The dead runs' parts are unnamed; trim (past their grace) deletes them and nothing else.
    let named: Vec<String> = replica
        .manifest()
        .await
        .unwrap()
        .keys()
        .map(String::from)
        .collect();
    let report = job_ok(
        &replica,
        &journal,
        "trim",
        &["--retain", "1000d", "--orphan-grace", "0s"],
    );
    assert_eq!(report["checkpoints_dropped"], 0);
    assert_eq!(unnamed_objects(&replica).await, Vec::<String>::new());
    let keys = list_keys(&replica).await;
    assert!(
        named.iter().all(|k| keys.contains(k)),
        "trim deleted a named object"
    );
    every_checkpoint_restores(&replica, &journal, &out, "after trim").await;
}

/// Two compactions at once: one commits the image, the other finds it there and deletes its
/// own parts — harmless, nothing left behind, every checkpoint exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_compactor_is_harmless() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 43).await;
    let replica = Replica::local(&dir.path().join("replica"));
    checkpoints_scenario(&replica, &mut journal, 5).await;
    let compact = replica_job(
        &replica,
        &journal,
        "compact",
        &["--part-size", "512K", "--json"],
    );
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            let args = compact.clone();
            std::thread::spawn(move || run(&args))
        })
        .collect();
    let mut outcomes = Vec::new();
    for job in jobs {
        let out = job.join().unwrap();
        assert!(
            out.status.success(),
            "a compaction failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        outcomes.push(report["outcome"].as_str().unwrap().to_string());
    }
    outcomes.sort();
    assert!(
        outcomes == ["compacted", "raced"] || outcomes == ["compacted", "up-to-date"],
        "{outcomes:?}"
    );
    let m = replica.manifest().await.unwrap();
    assert_eq!(m.images.len(), 1, "{:?}", m.images);
    assert_eq!(m.images[0].lsn, m.last().unwrap().lsn);
    assert_eq!(unnamed_objects(&replica).await, Vec::<String>::new());
    let out = dir.path().join("restored.img");
    let (from_images, _) =
        every_checkpoint_restores(&replica, &journal, &out, "two compactors").await;
    assert_eq!(from_images, 1, "only the newest checkpoint has an image");
    // Run again: nothing to do, nothing written.
    let before = list_keys(&replica).await;
    let report = job_ok(&replica, &journal, "compact", &[]);
    assert_eq!(report["outcome"], "up-to-date");
    assert_eq!(list_keys(&replica).await, before);
}

/// A corrupt or missing image part stops a restore and a compaction with an error naming it;
/// nothing else is touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_missing_image_part_is_named_and_nothing_else_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 47).await;
    let root = dir.path().join("replica");
    let replica = Replica::local(&root);
    checkpoints_scenario(&replica, &mut journal, 3).await;
    job_ok(&replica, &journal, "compact", &["--part-size", "1M"]);
    // A checkpoint after the image: the next compaction reads the image's parts.
    checkpoints_scenario(&replica, &mut journal, 1).await;
    let m = replica.manifest().await.unwrap();
    let image = &m.images[0];
    assert!(image.parts.len() >= 2, "several parts: {:?}", image.parts);
    let victim = image.parts[image.parts.len() / 2].key.clone();
    let path = root.join(&victim);
    let good = std::fs::read(&path).unwrap();
    let out = dir.path().join("restored.img");
    let restore_args = replica.args(
        &journal,
        &["restore"],
        &[
            "--at",
            &at_arg(m.checkpoints[m.checkpoints.len() - 2].timestamp_ns),
            "--output",
            out.to_str().unwrap(),
        ],
    );
    let compact_args = replica_job(
        &replica,
        &journal,
        "compact",
        &["--force", "--part-size", "1M"],
    );

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let before = list_keys(&replica).await;
    for (args, what) in [(&restore_args, "restore"), (&compact_args, "compact")] {
        let failed = replica.run(args);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success(),
            "{what} accepted a corrupt image part"
        );
        assert!(
            err.contains(&victim) && err.contains("corrupt"),
            "{what}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(!out.exists(), "the partial output was left behind");
        assert_eq!(
            list_keys(&replica).await,
            before,
            "{what} touched the replica"
        );
        assert_eq!(std::fs::read(&path).unwrap(), bad, "the part was touched");
    }

    std::fs::remove_file(&path).unwrap();
    for (args, what) in [(&restore_args, "restore"), (&compact_args, "compact")] {
        let failed = replica.run(args);
        let err = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success(),
            "{what} accepted a missing image part"
        );
        assert!(
            err.contains(&victim) && err.contains("missing"),
            "{what}: {err}"
        );
        assert!(!out.exists(), "the partial output was left behind");
    }

    // Put back, the replica restores and compacts again.
    std::fs::write(&path, &good).unwrap();
    replica.run_ok(&restore_args);
    assert!(out.exists());
    std::fs::remove_file(&out).unwrap();
    replica.run_ok(&compact_args);
    every_checkpoint_restores(&replica, &journal, &out, "after repair").await;
}

/// ext4 through nbdfuse and a loop device on `serve`, followed by an object replica (a
/// checkpoint a segment) that is compacted and trimmed while the file system is written: 12
/// random checkpoints after the mount, restored from the replica, are each judged clean by
/// e2fsck (crash-consistent: an acknowledged prefix of the writes).
#[test]
fn ext4_on_serve_restores_clean_from_the_object_replica_at_12_random_checkpoints() {
    use support::daemon::Daemon;
    use support::ext4::{fuse_and_loop_or_skip, init_for_loop, NbdLoop};
    use support::nbd::{pattern, run_ok as run_cmd_ok};
    use support::procs::path;
    if !fuse_and_loop_or_skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init_for_loop(&journal, &primary, "64M");
    let mut daemon = Daemon::start(&primary, path(&journal), &[], &[]);
    let replica = Replica::local(&dir.path().join("replica"));
    let job = |job: &str, extra: &[&str]| {
        let mut args: Vec<String> = ["replica", job, "--journal", path(&journal), "--replica"]
            .map(String::from)
            .to_vec();
        args.push(replica.uri.clone());
        args.extend(extra.iter().map(|s| s.to_string()));
        replica.run_ok(&args);
    };
    let mut agent = spawn(
        &[
            "replay",
            "--journal",
            path(&journal),
            "--replica",
            replica.uri.as_str(),
            "--name",
            "fs",
            "--checkpoint-interval",
            "0s",
            "--poll",
            "20ms",
        ]
        .map(String::from),
        &dir.path().join("agent.log"),
    );

    let disk = NbdLoop::ext4(&daemon.uri(), dir.path());
    let mnt = disk.mnt.clone();
    run_cmd_ok(std::process::Command::new("sync").arg("-f").arg(path(&mnt)));
    let mounted_at = daemon.status()["head_lsn"].as_u64().unwrap();
    for round in 0..16u64 {
        let d = mnt.join(format!("r{round}"));
        std::fs::create_dir(&d).unwrap();
        for f in 0..6u64 {
            let len = 100_000 + ((round * 7 + f) * 7919 % 600) as usize * 1024;
            std::fs::write(d.join(format!("f{f}")), pattern(round * 10 + f, len)).unwrap();
        }
        if round >= 2 {
            std::fs::remove_dir_all(mnt.join(format!("r{}", round - 2))).unwrap();
        }
        run_cmd_ok(std::process::Command::new("sync").arg("-f").arg(path(&mnt)));
        if round == 5 {
            job("compact", &["--force", "--part-size", "4M"]);
        }
        if round == 9 {
            job("compact", &["--force", "--part-size", "4M"]);
            job("trim", &["--retain", "1000d"]);
        }
    }
    disk.finish();
    let head = daemon.status()["head_lsn"].as_u64().unwrap();
    daemon.stop_ok();
    let caught_up = support::procs::wait_until(Duration::from_secs(60), || {
        rt.block_on(replica.manifest())
            .and_then(|m| m.last().map(|c| c.lsn))
            .is_some_and(|lsn| lsn >= head)
    });
    assert!(caught_up.is_ok(), "the agent did not reach LSN {head}");
    assert!(agent.terminate(Duration::from_secs(20)).unwrap().success());

    let m = rt.block_on(replica.manifest()).unwrap();
    assert!(!m.images.is_empty(), "no image was committed");
    let after_mount: Vec<_> = m
        .checkpoints
        .iter()
        .filter(|c| c.lsn >= mounted_at)
        .collect();
    assert!(
        after_mount.len() >= 12,
        "only {} checkpoints after the mount",
        after_mount.len()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let picks = rand::seq::index::sample(&mut rng, after_mount.len(), 12);
    let out = dir.path().join("restored.img");
    let out_s = out.display().to_string();
    for i in picks.iter() {
        let cp = after_mount[i];
        let done = replica.run_ok(
            &[
                "restore",
                "--journal",
                path(&journal),
                "--replica",
                replica.uri.as_str(),
                "--at",
                &at_arg(cp.timestamp_ns),
                "--output",
                &out_s,
                "--json",
            ]
            .map(String::from),
        );
        let report: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
        assert_eq!(report["lsn"], cp.lsn);
        if let Err(verdict) = support::verdict::judge_ext4(&out) {
            panic!("checkpoint LSN {} is not a clean ext4:\n{verdict}", cp.lsn);
        }
        std::fs::remove_file(&out).unwrap();
    }
}
