//! `tinylag serve` with real NBD clients (qemu-io, nbdinfo, nbdcopy) on a local-directory
//! journal: what they write reaches the primary, the journal rebuilds the primary byte for
//! byte, `tinylag status` reports it, and restarts report their mode honestly.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_ok, Daemon};
use support::nbd::{pattern, qemu_io_ok, run_ok};
use support::oracle::{assert_same_image, rebuild_local};
use support::procs::path;

const MIB: u64 = 1 << 20;

/// A journal directory and a 64 MiB primary made by `tinylag init`.
fn setup(dir: &Path) -> (std::path::PathBuf, String) {
    let primary = dir.join("primary.img");
    let journal = dir.join("journal").display().to_string();
    init(&journal, &primary, "64M", &[], &[]);
    (primary, journal)
}

#[test]
fn qemu_io_patterns_reach_the_primary_and_the_journal_rebuilds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let uri = daemon.uri();
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4M 64k",
            "write -P 0x11 8M 4k",
            "write -z 8M 4k",
            "discard 4M 32k",
            "flush",
        ],
    );
    qemu_io_ok(
        &uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0 4M 32k",
            "read -P 0xcd 4128k 32k",
            "read -P 0 8M 4k",
        ],
    );
    let status = daemon.wait_status(Duration::from_secs(10), "the journal to catch up", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    assert_eq!(status["mode"], "logging", "{status:#}");
    // EPOCH, 3 writes, zeroes, discard and qemu-io's flushes.
    assert!(status["head_lsn"].as_u64().unwrap() >= 7, "{status:#}");
    assert_eq!(status["dirty"]["regions"], 0);
    assert_eq!(status["upload_errors"]["count"], 0);

    let log = daemon.stop_ok();
    assert!(log.contains("clean"), "{log}");
    let rebuilt = dir.path().join("rebuilt.img");
    let last = rebuild_local(Path::new(&journal), &rebuilt, None);
    assert_eq!(last, status["head_lsn"].as_u64().unwrap());
    assert_same_image(&rebuilt, &primary);
}

#[test]
fn nbdinfo_reports_the_size_flags_and_export() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let out = run_ok(Command::new("nbdinfo").args(["--json", &daemon.uri()]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-name"], "disk0", "{info:#}");
    assert_eq!(export["export-size"], 64 * MIB);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag}: {info:#}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 4096);
    // The named export and the default (empty) name are the same device.
    let named = format!("nbd+unix:///disk0?socket={}", daemon.socket.display());
    let out = run_ok(Command::new("nbdinfo").args(["--size", &named]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (64 * MIB).to_string()
    );
    let out = run_ok(Command::new("nbdinfo").args(["--list", "--json", &daemon.uri()]));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["exports"].as_array().unwrap().len(), 1, "{list:#}");
    daemon.stop_ok();
}

#[test]
fn nbdcopy_of_64_mib_round_trips_and_the_journal_rebuilds_the_primary() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let source = dir.path().join("source.bin");
    let copied = dir.path().join("copied.bin");
    let data = pattern(7, (64 * MIB) as usize);
    std::fs::write(&source, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([
        "--connections=4",
        "--flush",
        path(&source),
        &daemon.uri(),
    ]));
    run_ok(Command::new("nbdcopy").args(["--connections=2", &daemon.uri(), path(&copied)]));
    assert!(std::fs::read(&copied).unwrap() == data, "copy out differs");
    let log = daemon.stop_ok();
    assert!(
        std::fs::read(&primary).unwrap() == data,
        "primary differs\n{log}"
    );
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(Path::new(&journal), &rebuilt, None);
    assert_same_image(&rebuilt, &primary);
}

#[test]
fn status_answers_in_text_and_json_and_fails_clearly_without_a_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let ctl = dir.path().join("custom.ctl");
    let mut daemon = Daemon::start_args(
        &primary,
        Some(&ctl),
        &[
            "serve".into(),
            "--primary".into(),
            path(&primary).into(),
            "--journal".into(),
            journal.clone(),
            "--control".into(),
            path(&ctl).into(),
            "--ack".into(),
            "adaptive".into(),
            "--max-lag".into(),
            "64M".into(),
        ],
        &[],
    );
    let text = tinylag_ok(&["status", "--control", path(&ctl)], &[]);
    assert!(text.contains("mode               logging"), "{text}");
    assert!(
        text.contains("adaptive (max lag 64.0 MiB), now async"),
        "{text}"
    );
    assert!(!text.contains("WARNING"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&tinylag_ok(
        &["status", "--control", path(&ctl), "--json"],
        &[],
    ))
    .unwrap();
    assert_eq!(json["role"], "primary");
    assert_eq!(json["epoch"], 1);
    assert_eq!(json["pool"]["cap"], 512 * MIB);
    assert_eq!(json["journal"], journal);
    assert_eq!(json["primary"], path(&primary));
    daemon.stop_ok();
    assert!(!ctl.exists(), "the control socket is removed at exit");

    let out = tinylag(&["status", "--primary", path(&primary)], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the daemon's control socket"),
        "{err}"
    );
    assert!(err.contains("primary.img.ctl"), "{err}");
}

#[test]
fn a_clean_stop_restarts_logging_and_a_kill_resyncs_what_the_activity_log_names() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    qemu_io_ok(&daemon.uri(), &["write -P 1 0 64k"]);
    daemon.stop_ok();

    let daemon = Daemon::start(&primary, &journal, &[], &[]);
    let status = daemon.status();
    assert_eq!(status["mode"], "logging", "{status:#}");
    assert_eq!(status["epoch"], 2);
    qemu_io_ok(&daemon.uri(), &["write -P 2 64k 64k"]);
    daemon.wait_status(Duration::from_secs(10), "durability", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    drop(daemon); // SIGKILL: no drain, no clean-stop marker

    // The activity log names the region written since the clean start: it alone is
    // resynced, and the restart says so.
    let daemon = Daemon::start(&primary, &journal, &[], &[]);
    let status = daemon.wait_status(Duration::from_secs(30), "logging", |s| {
        s["mode"] == "logging" && s["durable_lsn"] == s["head_lsn"]
    });
    assert_eq!(status["start"]["kind"], "activity-log", "{status:#}");
    assert_eq!(status["start"]["regions"], 1, "{status:#}");
    assert_eq!(status["resync"]["lifetime_regions"], 1, "{status:#}");
    // The control socket answers before serve prints its start-up lines: wait for them.
    daemon.wait_log(Duration::from_secs(10), "resyncing the 1 regions");
    drop(daemon);

    // Without its activity log, a kill means the whole device: forward-full, said loudly.
    std::fs::remove_file(format!("{}.tinylag-al", primary.display())).unwrap();
    let mut daemon = Daemon::start(&primary, &journal, &[], &[]);
    let status = daemon.status();
    let reason = status["start"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no usable activity log") && reason.contains("missing"),
        "{status:#}"
    );
    assert_eq!(status["transitions"][0]["to"], "forward-full", "{status:#}");
    // The control socket answers before serve prints its start-up lines: wait for them.
    daemon.wait_log(Duration::from_secs(10), "the WHOLE device is resynced");
    daemon.wait_status(Duration::from_secs(60), "logging", |s| {
        s["mode"] == "logging" && s["durable_lsn"] == s["head_lsn"]
    });
    daemon.stop_ok();
    // The journal is still one gap-free chain (the oracle checks), and it holds the data.
    let rebuilt = dir.path().join("rebuilt.img");
    rebuild_local(Path::new(&journal), &rebuilt, None);
    assert_same_image(&rebuilt, &primary);
}

#[test]
fn bad_arguments_and_a_wrong_primary_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = setup(dir.path());
    let other = dir.path().join("small.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let err = |args: &[&str]| {
        let out = tinylag(args, &[]);
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let serve = |extra: &[&str]| {
        let mut a = vec!["serve", "--primary", path(&primary), "--journal", &journal];
        a.extend_from_slice(extra);
        err(&a)
    };
    let e = err(&["serve", "--primary", path(&other), "--journal", &journal]);
    assert!(e.contains("33554432") && e.contains("67108864"), "{e}");
    assert!(serve(&["--ack", "sync"]).contains("--ack"));
    assert!(serve(&["--ack", "adaptive"]).contains("--max-lag"));
    assert!(serve(&["--pool-size", "12Q"]).contains("--pool-size"));
    assert!(serve(&["--listen", "udp:1.2.3.4:5"]).contains("unix:/path"));
    assert!(serve(&["--segment-size", "1K"]).contains("--segment-size"));
    // Nothing was claimed by the refused starts.
    assert!(
        !Path::new(&journal).join("epochs").exists()
            || std::fs::read_dir(Path::new(&journal).join("epochs"))
                .unwrap()
                .count()
                == 0
    );
}

#[test]
fn no_journal_mode_serves_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("bare.img");
    std::fs::File::create(&primary)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let mut daemon = Daemon::start(&primary, "", &["--no-journal"], &[]);
    qemu_io_ok(&daemon.uri(), &["write -P 9 0 1M", "read -P 9 0 1M"]);
    let status = daemon.status();
    assert_eq!(status["mode"], "no-journal");
    let text = tinylag_ok(&["status", "--primary", path(&primary)], &[]);
    assert!(text.contains("WARNING: mode no-journal"), "{text}");
    daemon.stop_ok();
}
