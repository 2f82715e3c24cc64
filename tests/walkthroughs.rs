//! What the documentation tells a new user to type, run as they would type it: every command
//! `tinylag up` prints (the nbdfuse + loop device + mkfs + mount chain and its undo, the watch
//! commands, the time-travel commands), and the README's walkthroughs ("Time travel, step by
//! step", "Incremental backup over NBD", and "S3 from nothing" against the local S3 server). Each runs in one
//! bash session, line by line; a line ending in `&` is a daemon, and the next line waits until
//! its socket is there (as a user waits for its start line).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::procs::{wait_until, ChildGuard};
use support::s3::{S3Server, S3ServerKind, ACCESS_KEY, SECRET_KEY};
use support::shell::ShellSession;
use support::teardown::Cleanup;

/// How long one documented command may take.
const LINE_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory of the `tinylag` under test, put first on the session's `PATH`.
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tinylag"))
        .parent()
        .unwrap()
        .to_owned()
}

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

/// The lines of the ```sh blocks of the README section headed `heading`.
fn walkthrough(heading: &str) -> Vec<String> {
    let text = readme();
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .collect();
    assert!(!section.is_empty(), "README.md has no section {heading:?}");
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in section {
        match (in_sh, line.trim_end()) {
            (false, "```sh") => in_sh = true,
            (true, "```") => in_sh = false,
            (true, l) if !l.is_empty() && !l.starts_with('#') => lines.push(l.to_owned()),
            _ => {}
        }
    }
    assert!(!lines.is_empty(), "{heading:?} has no ```sh block");
    lines
}

/// The value after `flag` on a command line.
fn flag_value<'a>(line: &'a str, flag: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == flag)?;
    words.next()
}

/// What a background command has made once it is ready: its control or NBD sockets, or the
/// file nbdfuse shows (relative paths are relative to `cwd`).
fn ready_paths(line: &str, cwd: &Path) -> Vec<PathBuf> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let command = |name: &str| {
        words
            .windows(2)
            .any(|w| w[0].ends_with("tinylag") && w[1] == name)
    };
    let with_suffix = |path: &str, suffix: &str| cwd.join(format!("{path}{suffix}"));
    let mut paths = Vec::new();
    if command("up") {
        let dir = flag_value(line, "--dir").unwrap_or("./tinylag-data");
        paths.push(cwd.join(dir).join("primary.img.ctl"));
        paths.push(cwd.join(dir).join("replica.img.ctl"));
    } else if command("serve") {
        paths.push(with_suffix(flag_value(line, "--primary").unwrap(), ".ctl"));
    } else if command("replay") {
        paths.push(with_suffix(flag_value(line, "--replica").unwrap(), ".ctl"));
    } else if command("mount") {
        match flag_value(line, "--listen").and_then(|l| l.strip_prefix("unix:")) {
            Some(socket) => paths.push(cwd.join(socket)),
            None => paths.push(with_suffix(
                flag_value(line, "--replica").unwrap(),
                ".at.sock",
            )),
        }
    } else if let Some(i) = words.iter().position(|w| *w == "nbdfuse") {
        paths.push(cwd.join(words[i + 1]).join("nbd"));
    } else {
        panic!("a background line the test does not know how to wait for: {line}");
    }
    paths
}

/// Runs `lines` in `session` as a user would: each must succeed, a qemu-io must not report a
/// failed command (it exits 0 anyway), and after a background line the next waits for it.
fn run_lines(session: &mut ShellSession, cwd: &Path, lines: &[String]) {
    for line in lines {
        let out = session.run_ok(line, LINE_TIMEOUT);
        let command = line.split('#').next().unwrap().trim_end();
        if command.ends_with('&') {
            for path in ready_paths(command, cwd) {
                let ready = wait_until(Duration::from_secs(60), || path.exists());
                assert!(
                    ready.is_ok(),
                    "{} did not appear after `{line}`:\n{}",
                    path.display(),
                    session.transcript()
                );
            }
        }
        if line.starts_with("qemu-io") {
            let lower = out.to_lowercase();
            assert!(
                !lower.contains("fail") && !lower.contains("error"),
                "`{line}` reported a failure:\n{}",
                session.transcript()
            );
        }
    }
}

#[test]
fn every_command_up_prints_works_as_printed() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("data");
    let log = work.path().join("up.log");
    let mut up = ChildGuard::spawn_logged(
        "tinylag up",
        std::process::Command::new(env!("CARGO_BIN_EXE_tinylag")).args([
            "up",
            "--dir",
            support::procs::path(&dir),
            "--size",
            "64M",
        ]),
        &log,
    )
    .unwrap();
    let ready = wait_until(Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("\nstop: "))
            && dir.join("primary.img.ctl").exists()
            && dir.join("replica.img.ctl").exists()
    });
    assert!(ready.is_ok(), "up did not start:\n{}", up.log_tail(8000));
    let guide = std::fs::read_to_string(&log).unwrap();
    let hints: Vec<String> = guide
        .lines()
        .skip_while(|l| *l != "connect:")
        .take_while(|l| !l.starts_with("stop: "))
        .filter(|l| l.starts_with("  "))
        .map(|l| l.trim().to_owned())
        .collect();

    // The kernel's nbd client attaches /dev/nbd0 machine-wide; tests/vm_kernel_nbd.rs covers
    // it in a VM. Everything else runs here.
    let (kernel_nbd, runnable): (Vec<String>, Vec<String>) = hints
        .into_iter()
        .partition(|l| l.starts_with("nbd-client "));
    assert_eq!(
        kernel_nbd.len(),
        1,
        "the guide names nbd-client once:\n{guide}"
    );
    for needle in [
        "losetup",
        "mkfs.ext4",
        "mount \"$dev\"",
        "fusermount3 -u",
        " mark ",
        " timeline ",
        " restore ",
        " mount --mark ",
    ] {
        assert!(
            runnable.iter().any(|l| l.contains(needle)),
            "the guide has no {needle:?} command:\n{guide}"
        );
    }
    let nbd_file = dir.join("mnt/nbd");
    assert!(
        runnable
            .iter()
            .all(|l| !l.contains(&format!("mkfs.ext4 {}", nbd_file.display()))),
        "the guide must not mkfs the nbdfuse file itself:\n{guide}"
    );

    // What the hints mount, undone even if a hint fails (newest first: the file system, the
    // loop device, the FUSE file); the session's jobs end after that, when it drops.
    let mut session = ShellSession::start(work.path(), &bin_dir(), &[]);
    let mut cleanup = Cleanup::default();
    cleanup.unmount_fuse(&dir.join("mnt"));
    cleanup.detach_loops_of(&nbd_file);
    cleanup.unmount(&dir.join("fs"));
    run_lines(&mut session, work.path(), &runnable);
    cleanup.run_all();

    // The hints mark after their file system was unmounted: the image at the mark is a clean
    // ext4 as it is, and the past disk `mount` serves holds the same bytes.
    let restored = dir.join("before-change.img");
    if let Err(e) = support::verdict::ext4_clean_without_recovery(&restored) {
        panic!("the restored image is not the unmounted ext4: {e}");
    }
    let past = format!(
        "nbd+unix:///disk0?socket={}.at.sock",
        dir.join("replica.img").display()
    );
    let served = work.path().join("served.img");
    support::nbd::run_ok(
        std::process::Command::new("nbdcopy").args([past.as_str(), support::procs::path(&served)]),
    );
    assert!(
        std::fs::read(&served).unwrap() == std::fs::read(&restored).unwrap(),
        "mount serves other bytes than restore wrote"
    );
    drop(session);
    let stopped = up.terminate(Duration::from_secs(30)).unwrap();
    assert!(
        stopped.success(),
        "up stopped with {stopped}:\n{}",
        up.log_tail(4000)
    );
}

#[test]
fn the_readme_time_travel_walkthrough_works_as_written() {
    let work = tempfile::tempdir().unwrap();
    let lines = walkthrough("## Time travel, step by step");
    let mut session = ShellSession::start(work.path(), &bin_dir(), &[]);
    run_lines(&mut session, work.path(), &lines);
}

#[test]
fn the_readme_incremental_backup_walkthrough_works_as_written() {
    let work = tempfile::tempdir().unwrap();
    let lines = walkthrough("## Incremental backup over NBD");
    let mut session = ShellSession::start(work.path(), &bin_dir(), &[]);
    run_lines(&mut session, work.path(), &lines);
    let transcript = session.transcript().to_owned();
    // nbdinfo's text map: the primary's data and holes, then Tuesday's one dirty extent
    // (offset, length, type, description).
    let rows = |description: &str| -> Vec<Vec<String>> {
        transcript
            .lines()
            .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .filter(|w| w.len() == 4 && w[3] == description)
            .collect()
    };
    assert_eq!(
        rows("dirty"),
        [["8388608", "65536", "1", "dirty"]],
        "{transcript}"
    );
    assert!(
        rows("data").contains(&vec![
            "0".into(),
            "1048576".into(),
            "0".into(),
            "data".into()
        ]),
        "{transcript}"
    );
    assert!(!rows("hole,zero").is_empty(), "{transcript}");
    drop(session);
    // nbdcopy's copy of Tuesday holds both days' writes.
    let copy = std::fs::read(work.path().join("tuesday.img")).unwrap();
    assert_eq!(copy.len(), 64 << 20);
    assert!(copy[..1 << 20].iter().all(|&b| b == 0xaa));
    assert!(copy[8 << 20..(8 << 20) + 65536].iter().all(|&b| b == 0xbb));
    assert!(copy[1 << 20..8 << 20].iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_s3_walkthrough_works_against_a_local_s3_server() {
    let Some(server) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    // The README's local server, keys and all, is the test's.
    let lines: Vec<String> = walkthrough("## S3 from nothing")
        .into_iter()
        .map(|l| {
            l.replace("http://127.0.0.1:9000", server.endpoint())
                .replace("demo-access-key", ACCESS_KEY)
                .replace("demo-secret-key", SECRET_KEY)
        })
        .collect();
    assert!(
        lines.iter().any(|l| l.contains(server.endpoint())),
        "the walkthrough names no endpoint: {lines:?}"
    );
    let mut session = ShellSession::start(work.path(), &bin_dir(), &[]);
    run_lines(&mut session, work.path(), &lines);
    drop(session);
    drop(server);
}
