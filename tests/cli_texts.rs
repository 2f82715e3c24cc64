//! The CLI's texts, snapshot-tested with trycmd: `--help` of every command and every error
//! message a newcomer met (`tests/cmd/*.trycmd`, readable as Markdown). After a deliberate
//! change: `TRYCMD=overwrite cargo test --test cli_texts`, then review the diff.

#[test]
fn cli_texts() {
    trycmd::TestCases::new()
        .env("TINYLAG_LOG", "warn")
        .env("NO_COLOR", "1")
        .case("tests/cmd/*.trycmd");
}

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::procs::ChildGuard;

/// The `up` banner, with the temporary directory shown as `[DIR]` and the binary as `[EXE]`;
/// and a second `up` on the same directory fails at once, printing nothing but its error.
#[test]
fn up_banner_and_a_busy_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let exe = env!("CARGO_BIN_EXE_tinylag");
    let mut cmd = Command::new(exe);
    cmd.args(["up", "--dir", data.to_str().unwrap(), "--size", "64M"])
        .env("TINYLAG_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut up = ChildGuard::spawn("tinylag up", &mut cmd).unwrap();
    let stdout = up.child_mut().stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut banner = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("stop:");
        banner.push_str(&line);
        banner.push('\n');
        if done {
            break;
        }
    }
    // Keep reading what follows, so `up` never writes into a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    // Both daemons answer once their signal handlers are in place.
    for ctl in ["primary.img.ctl", "replica.img.ctl"] {
        support::procs::wait_until(Duration::from_secs(60), || {
            std::os::unix::net::UnixStream::connect(data.join(ctl)).is_ok()
        })
        .unwrap_or_else(|()| panic!("{ctl} never answered"));
    }
    let banner = banner
        .replace(data.to_str().unwrap(), "[DIR]")
        .replace(exe, "[EXE]");
    snapbox::assert_data_eq!(banner, snapbox::file!["cmd/up-banner.txt"]);

    let second = Command::new(exe)
        .args(["up", "--dir", data.to_str().unwrap()])
        .env("TINYLAG_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        second.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    let err = String::from_utf8_lossy(&second.stderr).replace(data.to_str().unwrap(), "[DIR]");
    snapbox::assert_data_eq!(
        err,
        snapbox::str![[r#"
tinylag: error: [DIR] is busy: another `tinylag up` runs there; stop it first or use another --dir

"#]]
    );
    let status = up.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "up exited with {status}");
}
