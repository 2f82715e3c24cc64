//! `tinylag replay` killed with SIGKILL at random moments while it applies a journal: after
//! every kill, crash recovery alone (before anything new is applied) must give back exactly
//! the image the primary had at the committed LSN, and in the end the replica must equal the
//! whole journal.

mod support;

use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use support::oracle::OracleImage;
use support::replay::{first_difference, replay_args, run_ok, spawn, TestJournal};

const KILLS: usize = 20;

fn assert_replica_equals(replica: &Path, oracle: &OracleImage, what: &str) {
    let bytes = std::fs::read(replica).expect("read replica");
    if let Some(at) = first_difference(&bytes, oracle.image()) {
        panic!(
            "{what}: the replica differs from the oracle at LSN {} from byte {at}",
            oracle.lsn()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_moments_the_replica_always_equals_the_image_at_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), 64 << 20, 7).await;
    let replica = dir.path().join("replica.img");
    let mut args = replay_args(journal.uri(), &replica, "crashy");
    // Small batches: many commit points, many places to die between them; each batch's
    // pre-images in up to four undo segments written at once (a kill leaves strays).
    args.extend(
        [
            "--batch-records",
            "16",
            "--batch-bytes",
            "1M",
            "--undo-part-bytes",
            "128K",
        ]
        .map(String::from),
    );
    let mut once = args.clone();
    once.push("--once".into());
    let mut recover_only = args.clone();
    recover_only.push("--recover-only".into());

    let mut oracle = OracleImage::new(journal.store.clone(), &journal.manifest);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let mut kills = 0;
    let mut committed_lsn = 0;
    let log = dir.path().join("replay.log");
    while kills < KILLS {
        // Keep ahead of the agent: each run must still have a few seconds of apply left, so
        // that the kill lands in the middle of it.
        while journal.next_lsn - committed_lsn < 640 {
            journal.append_random(64).await;
        }
        let mut agent = spawn(&once, &log);
        // A kill at a random moment is the scenario, not a wait for something.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(30..300))).await;
        let finished = agent.exited().is_some();
        if !finished {
            agent.child_mut().kill().expect("SIGKILL");
            agent.child_mut().wait().expect("reap");
            kills += 1;
        }

        // What the agent committed, then recovery only. On a slow machine the first kill can
        // come before the agent registered: it applied nothing, and there is nothing to check.
        let Some(committed) = journal.try_position("crashy").await else {
            assert_eq!(
                committed_lsn, 0,
                "kill {kills}: the registered consumer vanished"
            );
            eprintln!("kill {kills}: before the agent registered");
            continue;
        };
        run_ok(&recover_only);
        let recovered = journal.position("crashy").await;
        assert_eq!(
            recovered.applied_lsn, committed.applied_lsn,
            "kill {kills}: recovery moved the position (no resync spans here)"
        );
        assert!(
            committed.applied_lsn >= committed_lsn,
            "the position went back"
        );
        committed_lsn = committed.applied_lsn;
        eprintln!(
            "kill {kills}: committed LSN {committed_lsn} of {}",
            journal.next_lsn - 1
        );
        oracle.advance(Some(committed_lsn)).await;
        assert_replica_equals(
            &replica,
            &oracle,
            &format!("after kill {kills} (committed LSN {committed_lsn})"),
        );
    }
    let last_lsn = journal.next_lsn - 1;

    run_ok(&once);
    assert_eq!(journal.position("crashy").await.applied_lsn, last_lsn);
    oracle.advance(None).await;
    assert_eq!(oracle.lsn(), last_lsn);
    assert_replica_equals(&replica, &oracle, "after the final run");
}
