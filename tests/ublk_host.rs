//! `serve --frontend ublk` on a machine whose kernel has no ublk driver (this one: no
//! /dev/ublk-control): it fails at once, naming the driver and the way out, and changes
//! nothing (no epoch claimed, no socket left). Also the ublk flags' own checks, which hold
//! on any machine.

mod support;

use std::path::Path;

use support::daemon::{init, tinylag};

/// Every file under `dir`, with its size, sorted: the journal as a listing.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path().display().to_string(), meta.len()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn without_the_driver_serve_ublk_names_it_and_changes_nothing() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!(
            "SKIPPED: this kernel has ublk_drv loaded; the no-driver path cannot be shown here"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    let j = journal.to_str().unwrap();
    init(j, &primary, "16M", &[], &[]);
    let before = listing(dir.path());
    let p = primary.to_str().unwrap();
    let out = tinylag(
        &[
            "serve",
            "--primary",
            p,
            "--journal",
            j,
            "--frontend",
            "ublk",
            "--queues",
            "2",
            "--user-recovery",
            "--dev-id",
            "3",
        ],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for needle in [
        "ublk driver",
        "/dev/ublk-control",
        "modprobe ublk_drv",
        "--frontend nbd",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    assert!(!stderr.contains("other failure"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
    assert_eq!(listing(dir.path()), before, "serve changed files");
}

#[test]
fn ublk_flags_are_checked_before_anything_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    let j = journal.to_str().unwrap();
    init(j, &primary, "16M", &[], &[]);
    let before = listing(dir.path());
    let p = primary.to_str().unwrap();
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--primary", p, "--journal", j];
        args.extend_from_slice(extra);
        let out = tinylag(&args, &[]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Values: clap names the flag and the accepted form (exit 2).
    for (extra, flag) in [
        (
            &["--frontend", "ublk", "--io-buf-size", "5000"][..],
            "--io-buf-size",
        ),
        (
            &["--frontend", "ublk", "--io-buf-size", "64M"][..],
            "--io-buf-size",
        ),
        (&["--frontend", "ublk", "--queues", "0"][..], "--queues"),
        (&["--frontend", "ublk", "--depth", "5000"][..], "--depth"),
        (&["--frontend", "scsi"][..], "--frontend"),
    ] {
        let (code, stderr) = serve(extra);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    // Combinations: a ublk flag without ublk, an NBD flag with it (usage errors: exit 2,
    // named).
    for (extra, flag) in [
        (&["--queues", "2"][..], "--queues"),
        (&["--user-recovery"][..], "--user-recovery"),
        (&["--frontend", "nbd", "--dev-id", "1"][..], "--dev-id"),
        (
            &["--frontend", "ublk", "--listen", "tcp:127.0.0.1:1"][..],
            "--listen",
        ),
        (&["--frontend", "ublk", "--tls", "require"][..], "--tls"),
    ] {
        let (code, stderr) = serve(extra);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    assert_eq!(listing(dir.path()), before, "serve changed files");
}

/// `mount --frontend ublk` takes the same flags and the same checks, before the replica,
/// its undo log or the journal is opened (here there is no replica at all).
#[test]
fn mount_ublk_checks_its_flags_and_names_a_missing_driver() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let j = journal.to_str().unwrap();
    init(j, &dir.path().join("primary.img"), "16M", &[], &[]);
    let before = listing(dir.path());
    let replica = dir.path().join("replica.img");
    let r = replica.to_str().unwrap();
    let mount = |extra: &[&str]| {
        let mut args = vec!["mount", "--journal", j, "--replica", r, "--mark", "m1"];
        args.extend_from_slice(extra);
        let out = tinylag(&args, &[]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (extra, flag) in [
        (&["--queues", "2"][..], "--queues"),
        (&["--frontend", "nbd", "--dev-id", "1"][..], "--dev-id"),
        (&["--frontend", "ublk", "--export", "x"][..], "--export"),
        (
            &[
                "--frontend",
                "ublk",
                "--user-recovery",
                "--writable",
                "/nonexistent/s",
            ][..],
            "--writable",
        ),
        (&["--frontend", "ublk", "--depth", "0"][..], "--depth"),
    ] {
        let (code, stderr) = mount(extra);
        assert_eq!(code, Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(flag), "{extra:?}: {stderr}");
    }
    if !Path::new("/dev/ublk-control").exists() {
        let (code, stderr) = mount(&["--frontend", "ublk"]);
        assert_eq!(code, Some(1), "{stderr}");
        for needle in ["ublk driver", "modprobe ublk_drv", "--frontend nbd"] {
            assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
        }
    }
    assert_eq!(listing(dir.path()), before, "mount changed files");
}
