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
