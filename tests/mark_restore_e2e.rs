//! Marks and time travel end to end, through the real daemons: writes go through `tinylag
//! serve` with `qemu-io`, `tinylag mark` names points between phases, a replay agent
//! (with its undo log) follows the journal, and `tinylag restore --mark` gives back each
//! phase's exact image — winding the replica back through the undo log — while a second
//! mark of the same name and an unknown mark are refused with nothing written.

mod support;

use std::path::Path;

use support::daemon::{init, tinylag, tinylag_ok, Daemon};
use support::nbd::qemu_io_ok;
use support::oracle::assert_same_image;
use support::replay::{replay_args, run_ok};

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Writes phase `n`: a pattern over the first MiB (overwritten by every phase) and one MiB of
/// its own further out, so that every phase's image differs from every other.
fn write_phase(uri: &str, n: u64) {
    let common = format!("write -P {} 0 1M", 0x10 + n);
    let own = format!("write -P {} {}M 1M", 0x40 + n, 2 + 2 * n);
    qemu_io_ok(uri, &[&common, &own]);
}

/// `tinylag mark NAME` against the daemon; returns its JSON answer.
fn mark(daemon: &Daemon, name: &str) -> serde_json::Value {
    let out = tinylag_ok(
        &["mark", name, "--control", &s(&daemon.control), "--json"],
        &[],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("mark --json: {e}: {out}"))
}

#[test]
fn restore_to_each_mark_made_through_serve_gives_that_phase_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(
        &s(&journal),
        &primary,
        "16M",
        &["--segment-size", "1M"],
        &[],
    );
    let mut daemon = Daemon::start(&primary, &s(&journal), &[], &[]);
    let uri = daemon.uri();
    // Let the start-up resync (a new journal over a fresh, all-zero primary) finish first.
    daemon.wait_status(std::time::Duration::from_secs(60), "logging", |st| {
        st["mode"] == "logging"
    });

    let mut expected = Vec::new();
    let mut lsns = Vec::new();
    for n in 0..3u64 {
        write_phase(&uri, n);
        let name = format!("phase-{n}");
        let answer = mark(&daemon, &name);
        lsns.push(answer["lsn"].as_u64().expect("mark prints its LSN"));
        // The primary's bytes at the mark: serve wrote them before qemu-io returned.
        let copy = dir.path().join(format!("{name}.expected"));
        std::fs::copy(&primary, &copy).unwrap();
        expected.push((name, copy));
    }
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "{lsns:?}");
    // A fourth phase after the last mark, so every restore winds back.
    write_phase(&uri, 3);
    qemu_io_ok(&uri, &[&format!("write -P 0x77 {} 4k", 15 << 20)]);

    // Names are unique per journal.
    let dup = tinylag(&["mark", "phase-1", "--control", &s(&daemon.control)], &[]);
    assert_eq!(dup.status.code(), Some(1), "{dup:?}");
    let stderr = String::from_utf8_lossy(&dup.stderr);
    assert!(
        stderr.contains("phase-1") && stderr.contains("already"),
        "{stderr}"
    );

    let status = daemon.wait_status(
        std::time::Duration::from_secs(60),
        "the journal to drain",
        |st| st["durable_lsn"] == st["head_lsn"],
    );
    let head = status["head_lsn"].as_u64().unwrap();
    daemon.stop_ok();

    // The replica follows the whole journal, keeping pre-images in its undo log.
    let replica = dir.path().join("replica.img");
    let mut args = replay_args(&s(&journal), &replica, "dr");
    args.push("--once".into());
    run_ok(&args);
    assert_same_image(&replica, &primary);
    let replica_before = std::fs::read(&replica).unwrap();

    for (name, want) in &expected {
        let out = dir.path().join(format!("{name}.restored"));
        let args: Vec<String> = [
            "restore",
            "--mark",
            name,
            "--replica",
            &s(&replica),
            "--journal",
            &s(&journal),
            "--output",
            &s(&out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        run_ok(&args);
        assert_same_image(&out, want);
    }
    // Restore never touches the replica.
    assert!(std::fs::read(&replica).unwrap() == replica_before);

    // An unknown mark is refused and nothing is written.
    let out = dir.path().join("nope.restored");
    let refused = tinylag(
        &[
            "restore",
            "--mark",
            "nope",
            "--replica",
            &s(&replica),
            "--journal",
            &s(&journal),
            "--output",
            &s(&out),
        ],
        &[],
    );
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("nope"));
    assert!(!out.exists());
    assert!(
        head > lsns[2],
        "head {head} after the last mark {}",
        lsns[2]
    );
}
