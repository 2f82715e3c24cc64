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

/// `tinylag ARGS` with nothing of this machine's environment (no AWS variables, no profile
/// files: `HOME` is an empty directory), plus `env`.
fn bare_tinylag(home: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinylag"));
    cmd.args(args)
        .env_clear()
        .env("HOME", home)
        .env("PATH", "/usr/bin:/bin")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("TINYLAG_LOG", "warn")
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    cmd
}

/// Without credentials, an S3 command says what to set (not the SDK's "IMDS is disabled"),
/// on one line, at once.
#[test]
fn s3_without_credentials_names_what_to_set() {
    let home = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", support::procs::free_port());
    let out = bare_tinylag(
        home.path(),
        &[
            "journal",
            "info",
            "--journal",
            "s3://bucket/j",
            "--s3-endpoint",
            &endpoint,
        ],
        &[],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    snapbox::assert_data_eq!(
        err.as_ref(),
        snapbox::str![[r#"
tinylag: error: store error on tinylag.json in s3://bucket/j/: no usable S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in ~/.aws/credentials); for an S3-compatible server also --s3-endpoint URL (the AWS SDK said: [..])

"#]]
    );
}

/// An endpoint nobody answers on: a one-shot command fails within a few seconds with one
/// line that sums up the retries (no WARN per retry), and never shows the credentials.
#[test]
fn an_unreachable_endpoint_fails_fast_with_one_line() {
    let home = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", support::procs::free_port());
    let secret = "wJalrXUtnFEMI-not-a-real-secret";
    let started = std::time::Instant::now();
    let out = bare_tinylag(
        home.path(),
        &[
            "journal",
            "info",
            "--journal",
            "s3://bucket/j",
            "--s3-endpoint",
            &endpoint,
        ],
        &[
            ("AWS_ACCESS_KEY_ID", "AKIDNOTAREALKEY"),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("TINYLAG_LOG", "info"),
        ],
    )
    .output()
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).replace(&endpoint, "[ENDPOINT]");
    // "A few seconds" (four attempts in under two); the margin is for a loaded CI machine.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}: {err}");
    assert!(
        !err.contains(secret) && !err.contains("AKIDNOTAREALKEY"),
        "{err}"
    );
    snapbox::assert_data_eq!(
        err,
        snapbox::str![[r#"
tinylag: error: transient error on tinylag.json in s3://bucket/j/: dispatch failure: io error: client error (Connect): tcp connect error: Connection refused (os error 111); is the S3 endpoint right and up? (--s3-endpoint URL, or AWS_ENDPOINT_URL) (gave up after 4 attempts in [..] s)

"#]]
    );
    assert!(out.stdout.is_empty());
}

/// A second `serve` on the same primary is refused with its error alone: no INFO line of
/// the start it did not make.
#[test]
fn a_refused_second_serve_prints_only_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_tinylag");
    let primary = dir.path().join("p.img");
    let journal = dir.path().join("j");
    let (p, j) = (primary.to_str().unwrap(), journal.to_str().unwrap());
    let init = Command::new(exe)
        .args(["init", "--journal", j, "--size", "64M", "--primary", p])
        .env("TINYLAG_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let mut first = Command::new(exe);
    first
        .args(["serve", "--primary", p, "--journal", j])
        .env("TINYLAG_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut first = ChildGuard::spawn("first serve", &mut first).unwrap();
    let control = dir.path().join("p.img.ctl");
    support::procs::wait_until(Duration::from_secs(60), || {
        std::os::unix::net::UnixStream::connect(&control).is_ok()
    })
    .unwrap_or_else(|()| panic!("the first serve never answered"));
    let second = Command::new(exe)
        .args(["serve", "--primary", p, "--journal", j])
        .env("TINYLAG_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err =
        String::from_utf8_lossy(&second.stderr).replace(dir.path().to_str().unwrap(), "[DIR]");
    snapbox::assert_data_eq!(
        err,
        snapbox::str![[r#"
tinylag: error: cannot listen on unix:[DIR]/p.img.sock: another server is listening on this socket

"#]]
    );
    assert!(
        second.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&second.stdout)
    );
    let status = first.terminate(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "the first serve exited with {status}");
}

/// The man pages carry EXAMPLES, EXIT STATUS, ENVIRONMENT, FILES and SEE ALSO, and show a
/// required flag as required, with its value.
#[test]
fn man_pages_have_the_operator_sections() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tinylag"))
        .args(["manpage", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    let serve = page("tinylag-serve.1");
    for section in [
        "EXAMPLES",
        "EXIT STATUS",
        "ENVIRONMENT",
        "FILES",
        "SEE ALSO",
    ] {
        assert!(
            serve.contains(&format!(".SH \"{section}\""))
                || serve.contains(&format!(".SH {section}")),
            "serve lacks {section}:\n{serve}"
        );
    }
    assert!(serve.contains("AWS_ACCESS_KEY_ID"), "{serve}");
    assert!(serve.contains("tinylag(1)"), "{serve}");
    let info = page("tinylag-journal-info.1");
    let synopsis = info
        .split(".SH SYNOPSIS")
        .nth(1)
        .and_then(|s| s.lines().nth(1))
        .unwrap_or_default()
        .to_string();
    assert!(
        synopsis.starts_with(r"\fBtinylag journal info\fR \fB\-\-journal\fR\fI URI\fR"),
        "{synopsis}"
    );
    assert!(info.contains("Required."), "{info}");
}
