//! A journal written by the previous release — tinylag at commit 5935f71, before consistency
//! groups and encryption changed the journal's objects — opens with today's tinylag:
//! `journal info` and `journal verify` read it, a replay builds the disk as it was at the
//! last mark, a restore gives the first mark, and `serve` takes new writes on it that a
//! replay then follows. The fixture is committed (tests/fixtures/journal-5935f71/, with the
//! script that made it and the SHA-256 of the disk at each mark), so the check does not
//! depend on today's writer to produce the old format.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use support::daemon::{tinylag_ok, Daemon};
use support::procs::path;
use support::replay::run_ok;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-5935f71")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn sha256(file: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(file).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `expected.txt`: mark name → SHA-256 of the disk at that mark.
fn expected() -> HashMap<String, String> {
    std::fs::read_to_string(fixture().join("expected.txt"))
        .unwrap()
        .lines()
        .map(|l| {
            let (mark, sum) = l.split_once(' ').expect("mark and sum");
            (mark.to_string(), sum.to_string())
        })
        .collect()
}

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// `replay --once` of journal `j` onto `replica`, as the consumer `today`.
fn replay_once(j: &str, replica: &Path) {
    run_ok(&s(&[
        "replay",
        "--journal",
        j,
        "--replica",
        path(replica),
        "--name",
        "today",
        "--once",
    ]));
}

#[test]
fn a_journal_of_the_previous_release_opens_replays_restores_and_takes_new_writes() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    copy_dir(&fixture().join("journal"), &journal);
    let j = path(&journal).to_string();
    let sums = expected();

    let info = tinylag_ok(&["journal", "info", "--journal", &j], &[]);
    assert!(
        info.contains("342dc799-c01e-4317-8887-0a978ddc66fd"),
        "{info}"
    );
    assert!(info.contains("disk0"), "{info}");
    tinylag_ok(&["journal", "verify", "--journal", &j], &[]);

    // Replay: the disk as of the last mark; restore: as of the first.
    let replica = dir.path().join("replica.img");
    replay_once(&j, &replica);
    assert_eq!(sha256(&replica), sums["two"], "the replica is not mark two");
    let one = dir.path().join("one.img");
    run_ok(&s(&[
        "restore",
        "--journal",
        &j,
        "--replica",
        path(&replica),
        "--mark",
        "one",
        "--output",
        path(&one),
    ]));
    assert_eq!(sha256(&one), sums["one"], "the restore is not mark one");

    // Today's writer continues the old journal on a copy of the replayed disk, and the
    // replay follows it to the new primary's bytes.
    let primary = dir.path().join("primary.img");
    std::fs::copy(&replica, &primary).unwrap();
    let mut daemon = Daemon::start(&primary, &j, &[], &[]);
    daemon.wait_status(Duration::from_secs(60), "logging", |st| {
        st["mode"] == "logging"
    });
    support::nbd::run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &daemon.uri()])
            .args(["-c", "write -P 0x55 512k 96k", "-c", "flush"]),
    );
    tinylag_ok(
        &[
            "mark",
            "three",
            "--control",
            path(&daemon.control),
            "--json",
        ],
        &[],
    );
    daemon.wait_status(Duration::from_secs(60), "the journal to drain", |st| {
        st["durable_lsn"] == st["head_lsn"]
    });
    daemon.stop_ok();
    assert_ne!(
        sha256(&primary),
        sums["two"],
        "the new writes changed nothing"
    );
    replay_once(&j, &replica);
    assert_eq!(
        sha256(&replica),
        sha256(&primary),
        "the replica did not follow today's writes on the old journal"
    );
    tinylag_ok(&["journal", "verify", "--journal", &j], &[]);
}
