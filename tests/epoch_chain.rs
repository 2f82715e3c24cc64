//! The epoch chain as readers see it, with the real `tinylag` binary: a replica that
//! applied what a later `promote --at` left as a branch is wound back and follows the new
//! chain; without undo records reaching the fork it refuses, unchanged, naming `rejoin`.
//! The forked journals are written with the library, as a promoting writer writes them
//! (claim, chain entry, then segments).

mod support;

use std::path::Path;

use support::replay::{file_hash, first_difference, replay_args, run, run_ok, TestJournal};

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn assert_image(replica: &Path, expected: &[u8], what: &str) {
    let got = std::fs::read(replica).unwrap();
    if let Some(at) = first_difference(&got, expected) {
        panic!("{what}: the replica differs at byte {at}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_on_a_branch_is_wound_back_and_follows_the_new_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 20).await;
    journal.begin_epoch(1, None).await;
    for _ in 0..3 {
        journal.append_random(30).await;
    }
    let fork = journal.next_lsn - 1;
    // What the old primary wrote after the point another site will promote.
    for _ in 0..2 {
        journal.append_random(30).await;
    }
    let replica = dir.path().join("dr.img");
    let bare = dir.path().join("bare.img");
    run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));
    run_ok(&with(
        replay_args(journal.uri(), &bare, "bare"),
        &["--once", "--no-undo"],
    ));
    assert_image(
        &replica,
        &journal.chain_image(None).await,
        "before the fork",
    );
    let bare_hash = file_hash(&bare);

    // Site B runs `promote --at` the fork: epoch 2 continues from there.
    journal.begin_epoch(2, Some((1, fork))).await;
    for _ in 0..2 {
        journal.append_random(20).await;
    }
    let out = run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));
    let chain = journal.chain_image(None).await;
    assert_image(&replica, &chain, "after following the fork");
    assert_ne!(
        chain,
        journal
            .image_on(&tinylag::journal::chain::Lineage::everything(), None)
            .await,
        "the branch changes the image, so the test can tell"
    );
    let position = journal.position("dr").await;
    assert_eq!(position.chain_epoch, 2);
    assert_eq!(position.applied_lsn, journal.next_lsn - 1);
    let _ = out;

    // The replica without an undo log cannot leave the branch: refused, untouched.
    let before = journal.position("bare").await;
    let out = run(&with(
        replay_args(journal.uri(), &bare, "bare"),
        &["--once", "--no-undo"],
    ));
    assert!(
        !out.status.success(),
        "replay onto a branch without undo must fail"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tinylag rejoin") && stderr.contains(&format!("LSN {fork}")),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.contains("error")).count(),
        1,
        "one error line: {stderr}"
    );
    assert_eq!(file_hash(&bare), bare_hash, "the replica was touched");
    assert_eq!(journal.position("bare").await, before);
}

/// After a fork, `timeline` and `journal info` show the chain and the branch, `restore
/// --branch` writes exactly the state the old primary left, and `restore --at` the head
/// gives the chain's state, never the branch's records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_lists_the_branch_and_restore_reads_either_side_of_the_fork() {
    use tinylag::journal::chain::{self, Branch, Lineage};
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("j"), 16 << 20, 21).await;
    // Epoch 1 an hour ago, a minute per segment; what became the branch from minute 10.
    let t0 = support::replay::now_ns() - 3600 * SEC;
    journal.begin_epoch(1, None).await;
    for i in 0..3 {
        append_at(&mut journal, t0 + i * 60 * SEC).await;
    }
    let fork = journal.next_lsn - 1;
    let first_seq = journal.next_seq;
    for i in 0..2 {
        append_at(&mut journal, t0 + (10 + i) * 60 * SEC).await;
    }
    let old_end = journal.next_lsn - 1;
    let replica = dir.path().join("dr.img");
    run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));
    // What `promote --at` records: the branch, then the new epoch from the fork.
    let branch = Branch {
        name: "before-e2".into(),
        forked_by: 2,
        from_lsn: fork + 1,
        to_lsn: old_end,
        first_seq,
        last_seq: journal.next_seq - 1,
        created_at_ns: support::replay::now_ns(),
    };
    chain::create_branch(journal.store.as_ref(), &branch)
        .await
        .unwrap();
    journal.begin_epoch(2, Some((1, fork))).await;
    journal.append_random(25).await;
    run_ok(&with(
        replay_args(journal.uri(), &replica, "dr"),
        &["--once"],
    ));
    let head = journal.next_lsn - 1;

    let j = journal.uri();
    let r = replica.to_str().unwrap();
    let out = run_ok(&args(&[
        "timeline",
        "--journal",
        j,
        "--replica",
        r,
        "--json",
    ]));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["chain"]["branches"][0]["name"], "before-e2", "{t:#}");
    assert_eq!(t["chain"]["epochs"][1]["reason"], "promote-at", "{t:#}");
    assert_eq!(
        t["chain"]["off_lineage"][0],
        serde_json::json!([fork + 1, old_end]),
        "{t:#}"
    );
    let out = run_ok(&args(&["timeline", "--journal", j, "--replica", r]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("branch    before-e2"), "{text}");
    let out = run_ok(&args(&["journal", "info", "--journal", j]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "leaves LSNs {}..={old_end} off the chain",
            fork + 1
        )),
        "{text}"
    );
    let out = run_ok(&args(&["journal", "info", "--journal", j, "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["chain"]["epochs"][1]["predecessor"]["lsn"], fork);

    // The branch's end: the old primary's last durable state, byte for byte.
    let out_branch = dir.path().join("branch.img");
    run_ok(&args(&[
        "restore",
        "--journal",
        j,
        "--replica",
        r,
        "--branch",
        "before-e2",
        "--output",
        out_branch.to_str().unwrap(),
    ]));
    let old = journal
        .image_on(&Lineage::everything(), Some(old_end))
        .await;
    assert_image(&out_branch, &old, "restore --branch");
    // The chain's head: the new epoch on top of the fork, no branch record.
    let out_head = dir.path().join("head.img");
    run_ok(&args(&[
        "restore",
        "--journal",
        j,
        "--replica",
        r,
        "--at",
        "1m ago",
        "--output",
        out_head.to_str().unwrap(),
    ]));
    let _ = head;
    let out_now = dir.path().join("now.img");
    run_ok(&args(&[
        "restore",
        "--journal",
        j,
        "--replica",
        r,
        "--at",
        &tinylag::clock::format_ns(support::replay::now_ns()),
        "--output",
        out_now.to_str().unwrap(),
    ]));
    assert_image(
        &out_now,
        &journal.chain_image(None).await,
        "restore of the head",
    );
    let out = run(&args(&[
        "restore",
        "--journal",
        j,
        "--replica",
        r,
        "--branch",
        "nope",
        "--output",
        dir.path().join("x.img").to_str().unwrap(),
    ]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no branch named nope") && stderr.contains("before-e2"),
        "{stderr}"
    );
    assert!(!dir.path().join("x.img").exists());
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const SEC: u64 = 1_000_000_000;

/// Appends a segment of 25 random records stamped `ts`.
async fn append_at(journal: &mut TestJournal, ts: u64) {
    let ops = (0..25).map(|_| journal.random_op()).collect();
    journal.append_at(ops, ts).await;
}

/// Waits until the replay agent of `replica` (control socket beside it) has applied `lsn`.
fn wait_applied(replica: &Path, lsn: u64, guard: &mut support::procs::ChildGuard) {
    let control = std::path::PathBuf::from(format!("{}.ctl", replica.display()));
    support::daemon::wait_applied(&control, guard, lsn, std::time::Duration::from_secs(60));
}

fn head_lsn(journal: &str) -> u64 {
    let out = run_ok(&args(&["journal", "info", "--journal", journal, "--json"]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    info["head"]["last_lsn"].as_u64().unwrap()
}

/// The test of the issue: site A serves, B and C replay; A writes, marks `good`, writes on
/// (the "ransomware"), stops. `promote --mark good` on B winds B back to the mark and
/// serves it; A's later records become branch `before-e2`. C, tailing, winds back and
/// follows B. `timeline` lists the branch, `restore --branch` gives exactly A's last durable
/// image, and trim keeps the branch until `--drop-branch`.
#[test]
fn promote_at_a_mark_keeps_the_old_primarys_tail_as_a_branch() {
    use support::daemon::{init, tinylag_ok, Daemon};
    use support::nbd::qemu_io_ok;
    use support::procs::path;
    use support::replay::spawn;
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let journal = path(&journal).to_string();
    let (a, b, c) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("c.img"),
    );
    init(&journal, &a, "16M", &[], &[]);
    let mut primary = Daemon::start(&a, &journal, &[], &[]);
    let mut agent_b = spawn(
        &with(
            replay_args(&journal, &b, "siteb"),
            &["--commit-every", "0s"],
        ),
        &dir.path().join("b.log"),
    );
    let mut agent_c = spawn(
        &with(
            replay_args(&journal, &c, "sitec"),
            &["--commit-every", "0s"],
        ),
        &dir.path().join("c.log"),
    );
    qemu_io_ok(&primary.uri(), &["write -P 1 0 1M", "write -P 4 6M 256k"]);
    let control = primary.control.clone();
    let out = tinylag_ok(
        &["mark", "good", "--control", path(&control), "--json"],
        &[],
    );
    let mark: serde_json::Value = serde_json::from_str(&out).unwrap();
    let good = mark["lsn"].as_u64().unwrap();
    qemu_io_ok(&primary.uri(), &["write -P 2 0 512k", "write -P 3 4M 1M"]);
    primary.stop_ok();
    let end = head_lsn(&journal);
    assert!(end > good + 1);
    wait_applied(&b, end, &mut agent_b);
    wait_applied(&c, end, &mut agent_c);
    agent_b
        .terminate(std::time::Duration::from_secs(30))
        .unwrap();
    let at_mark = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let j = TestJournal::open(Path::new(&journal)).await;
            j.chain_image(Some(good)).await
        })
    };

    let mut promoted = Daemon::start_args(
        &b,
        None,
        &args(&[
            "promote",
            "--replica",
            path(&b),
            "--journal",
            &journal,
            "--name",
            "siteb",
            "--mark",
            "good",
        ]),
        &[],
    );
    promoted.wait_log(
        std::time::Duration::from_secs(30),
        &format!("promoted at LSN {good}:"),
    );
    let s = promoted.status();
    assert_eq!(s["start"]["kind"], "clean", "{s:#}");
    // B serves the disk as of the mark; its writes go on the new chain.
    let (ok, text) = support::nbd::qemu_io(&promoted.uri(), &["read -P 1 0 1M", "read -P 0 4M 1M"]);
    assert!(ok, "B does not serve the mark's state: {text}");
    assert_image(&b, &at_mark, "B promoted at the mark");
    qemu_io_ok(&promoted.uri(), &["write -P 9 8M 64k"]);
    // A stop makes everything durable: then C must reach the journal's end.
    promoted.stop_ok();
    let new_end = head_lsn(&journal);
    wait_applied(&c, new_end, &mut agent_c);
    let status = support::daemon::tinylag_ok(
        &[
            "status",
            "--control",
            &format!("{}.ctl", c.display()),
            "--json",
        ],
        &[],
    );
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["chain_epoch"], 2, "{status:#}");
    agent_c
        .terminate(std::time::Duration::from_secs(30))
        .unwrap();
    assert_image(&c, &std::fs::read(&b).unwrap(), "C follows the new chain");

    let j = &journal;
    let cr = path(&c);
    let out = run_ok(&args(&[
        "timeline",
        "--journal",
        j,
        "--replica",
        cr,
        "--json",
    ]));
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(t["chain"]["branches"][0]["name"], "before-e2", "{t:#}");
    assert_eq!(t["chain"]["branches"][0]["from_lsn"], good + 1, "{t:#}");
    assert_eq!(t["chain"]["epochs"][1]["reason"], "promote-at", "{t:#}");
    let restored = dir.path().join("branch.img");
    run_ok(&args(&[
        "restore",
        "--journal",
        j,
        "--replica",
        cr,
        "--branch",
        "before-e2",
        "--output",
        path(&restored),
    ]));
    assert_image(
        &restored,
        &std::fs::read(&a).unwrap(),
        "restore --branch = A's last state",
    );

    // mount --branch serves the same image over NBD.
    let socket = dir.path().join("branch.sock");
    let mut mount = support::procs::ChildGuard::spawn_logged(
        "tinylag mount",
        support::replay::tinylag().args([
            "mount",
            "--journal",
            j,
            "--replica",
            cr,
            "--branch",
            "before-e2",
            "--listen",
            &format!("unix:{}", path(&socket)),
        ]),
        &dir.path().join("mount.log"),
    )
    .unwrap();
    mount.wait_for_path(&socket, std::time::Duration::from_secs(30));
    let mounted = dir.path().join("mounted.img");
    support::nbd::run_ok(std::process::Command::new("nbdcopy").args([
        &format!("nbd+unix:///disk0?socket={}", path(&socket)),
        path(&mounted),
    ]));
    mount.terminate(std::time::Duration::from_secs(10)).unwrap();
    assert_image(
        &mounted,
        &std::fs::read(&a).unwrap(),
        "mount --branch = A's last state",
    );

    let trim = run_ok(&args(&[
        "journal",
        "trim",
        "--journal",
        j,
        "--retain",
        "0",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&trim.stdout).unwrap();
    assert_eq!(report["held_by"]["reason"], "branch", "{report:#}");
    let trim = run_ok(&args(&[
        "journal",
        "trim",
        "--journal",
        j,
        "--retain",
        "0",
        "--drop-branch",
        "before-e2",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_slice(&trim.stdout).unwrap();
    assert_ne!(report["held_by"]["reason"], "branch", "{report:#}");
    assert_eq!(report["dropped_branches"][0], "before-e2");
}
