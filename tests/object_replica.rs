//! The object replica (issue 24), through the real binary: `replay --replica URI` keeps the
//! replica as layers and checkpoints in a store; `restore --replica URI` of every mark
//! equals the journal's own image there (the oracle); a kill -9 at random moments leaves a
//! replica that restores to its last checkpoint exactly, from its layers alone; a corrupt or
//! missing layer is named and nothing else is touched.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::oracle::OracleImage;
use support::replay::{first_difference, run, spawn, tinylag, TestJournal};
use support::s3::{S3Server, S3ServerKind};
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;
use tinylag::objrep::manifest;
use tinylag::objrep::ReplicaManifest;
use tinylag::store::local::LocalStore;
use tinylag::store::ObjectStore;

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

/// Where the replica is and how a child process reaches it.
struct Replica {
    uri: String,
    env: Vec<(&'static str, String)>,
    store: Arc<dyn ObjectStore>,
}

impl Replica {
    fn local(dir: &Path) -> Replica {
        Replica {
            uri: format!("file://{}", dir.display()),
            env: Vec::new(),
            store: Arc::new(LocalStore::new(dir)),
        }
    }

    fn args(&self, journal: &TestJournal, command: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [command, "--journal", journal.uri(), "--replica", &self.uri]
            .map(String::from)
            .to_vec();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    fn run(&self, args: &[String]) -> std::process::Output {
        let mut cmd = tinylag();
        cmd.args(args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.output().expect("run tinylag")
    }

    fn run_ok(&self, args: &[String]) -> std::process::Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tinylag {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    async fn manifest(&self) -> Option<ReplicaManifest> {
        manifest::load_latest(self.store.as_ref())
            .await
            .expect("read the replica's manifest")
    }
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
    let done = replica.run_ok(&replica.args(journal, "restore", &extra));
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
        "replay",
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
    let t = replica.run_ok(&replica.args(&journal, "timeline", &["--json"]));
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
    let trim = support::replay::run_ok(
        &[
            "journal",
            "trim",
            "--journal",
            journal.uri(),
            "--retain",
            "0s",
        ]
        .map(String::from),
    );
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
    let refused =
        replica.run(&replica.args(&journal, "restore", &["--mark", name, "--output", &out_s]));
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
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica {
        uri: s3.uri("objrep/"),
        env: s3.child_env(),
        store: Arc::new(s3.store("objrep/")),
    };
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
        "replay",
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
        "replay",
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
        "restore",
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
    replica.run_ok(&replica.args(&journal, "replay", &["--name", "first", "--once"]));
    let before = rt.block_on(list_keys(&replica));
    let out = replica.run(&replica.args(&journal, "replay", &["--name", "second", "--once"]));
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
        "replay",
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
    let once = replica.args(&journal, "replay", &["--name", "holes", "--once"]);
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
        "restore",
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
