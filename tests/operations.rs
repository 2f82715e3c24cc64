//! Running tinylag like real infrastructure: daemons started from a config file (`--config`),
//! the systemd units (`systemd-analyze verify`) and their `Type=notify` handshake
//! (`READY=1` once the socket accepts, `STOPPING=1` at SIGTERM), JSON logs that parse line
//! by line with no credential in them or anywhere else the operator looks, and the shell
//! completions and man pages generated from the clap definitions.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_bin, tinylag_ok, Daemon};
use support::nbd::{qemu_io_ok, run_ok};
use support::procs::{path, text, wait_for, ChildGuard};
use support::s3::{S3Server, S3ServerKind, ACCESS_KEY, SECRET_KEY};

/// A file primary and a local-directory journal in `dir`.
fn primary_and_journal(dir: &Path) -> (PathBuf, String) {
    let primary = dir.join("primary.img");
    let journal = dir.join("journal").display().to_string();
    init(&journal, &primary, "64M", &[], &[]);
    (primary, journal)
}

// ---------------------------------------------------------------------------------------
// The config file
// ---------------------------------------------------------------------------------------

#[test]
fn a_daemon_started_from_a_config_file_behaves_as_with_the_same_flags() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = primary_and_journal(dir.path());
    let config = dir.path().join("db1.toml");
    std::fs::write(
        &config,
        format!(
            "# the primary of db1\n\
             [serve]\n\
             primary = \"{}\"\n\
             journal = \"{journal}\"\n\
             pool-size = \"24M\"\n\
             linger = \"50ms\"\n\
             export = \"db1\"\n\
             no-activity-log = true\n\
             \n\
             [replay]\n\
             journal = \"{journal}\"\n\
             name = \"dr\"\n\
             delay = \"0\"\n\
             \n\
             [journal-trim]\n\
             journal = \"{journal}\"\n\
             retain = \"0\"\n\
             log-format = \"json\"\n",
            path(&primary)
        ),
    )
    .unwrap();

    // `config check` validates every section and shows what each gives.
    let checked = tinylag_ok(&["config", "check", path(&config)], &[]);
    assert!(checked.contains("3 sections"), "{checked}");
    assert!(
        checked.contains("--pool-size=24M") && checked.contains("--export=db1"),
        "{checked}"
    );
    assert!(
        checked.contains("the command line must add: --replica <[NAME=]PATH>"),
        "{checked}"
    );

    // From the file alone...
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["serve".into(), "--config".into(), path(&config).into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let mut from_file = Daemon::start_args(&primary, None, &args(&[]), &[]);
    let status = from_file.status();
    qemu_io_ok(
        &format!("nbd+unix:///db1?socket={}", from_file.socket.display()),
        &["write -P 0x5a 0 1M", "flush"],
    );
    from_file.stop_ok();

    // ...as with the same flags on the command line.
    let flags: Vec<String> = [
        "serve",
        "--primary",
        path(&primary),
        "--journal",
        &journal,
        "--pool-size",
        "24M",
        "--linger",
        "50ms",
        "--export",
        "db1",
        "--no-activity-log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut from_flags = Daemon::start_args(&primary, None, &flags, &[]);
    let same = from_flags.status();
    from_flags.stop_ok();
    for key in ["export", "primary", "journal", "device_size"] {
        assert_eq!(status[key], same[key], "{key}: {status:#} vs {same:#}");
    }
    assert_eq!(status["pool"]["cap"], 24 << 20, "{status:#}");
    assert_eq!(status["pool"]["cap"], same["pool"]["cap"]);
    assert_eq!(status["activity_log"], same["activity_log"], "{status:#}");
    assert!(
        status["activity_log"].is_null(),
        "no-activity-log = true reached the daemon: {status:#}"
    );

    // A flag on the command line wins over the file; one that conflicts with a key of the
    // file (--activity-log against no-activity-log = true) drops that key.
    let al = dir.path().join("primary.al");
    let mut overridden = Daemon::start_args(
        &primary,
        None,
        &args(&["--pool-size", "8M", "--activity-log", path(&al)]),
        &[],
    );
    let status = overridden.status();
    overridden.stop_ok();
    assert_eq!(status["pool"]["cap"], 8 << 20, "{status:#}");
    assert_eq!(
        status["export"], "db1",
        "the rest of the file still applies"
    );
    assert_eq!(status["activity_log"]["path"], path(&al), "{status:#}");

    // The replay section, completed on the command line, replays what serve journaled.
    let replica = dir.path().join("replica.img");
    let out = tinylag(
        &[
            "replay",
            "--config",
            path(&config),
            "--replica",
            path(&replica),
            "--once",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out));
    let image = std::fs::read(&replica).unwrap();
    assert!(
        image[..1 << 20].iter().all(|&b| b == 0x5a),
        "the replica has the write"
    );

    // The trim job from its section, logging JSON as the file says: its report is JSON
    // log lines too.
    let out = tinylag(&["journal", "trim", "--config", path(&config)], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let lines = text(&out);
    assert!(assert_json_lines("journal trim", &lines) >= 3, "{lines}");
    assert!(lines.contains("held back by"), "{lines}");
}

#[test]
fn a_typo_or_a_bad_value_in_the_config_file_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = primary_and_journal(dir.path());
    let control = dir.path().join("primary.img.ctl");
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[serve]\nprimary = \"{}\"\njournal = \"{journal}\"\n{body}",
                path(&primary)
            ),
        )
        .unwrap();
        p
    };
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "typo.toml",
            "pool_size = \"1G\"\n",
            &["[serve] has no key `pool_size`", "did you mean `pool-size`"],
        ),
        (
            "unknown.toml",
            "poolsize = \"1G\"\n",
            &["[serve] has no key `poolsize`", "pool-size"],
        ),
        (
            "small.toml",
            "pool-size = \"1k\"\n",
            &["[serve] `pool-size`", "use at least 1M"],
        ),
        (
            "enum.toml",
            "ack = \"sometimes\"\n",
            &["[serve] `ack`", "async, journal, adaptive"],
        ),
        (
            "type.toml",
            "direct = \"yes\"\n",
            &["[serve] `direct`", "expects true or false"],
        ),
        (
            "secret.toml",
            "s3-secret-access-key = \"hunter2-not-printed\"\n",
            &["`s3-secret-access-key`", "credentials are not accepted"],
        ),
    ];
    for (name, body, expected) in cases {
        let file = write(name, body);
        let out = tinylag(&["serve", "--config", path(&file)], &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {said}");
        assert!(said.contains(path(&file)), "{name} names the file: {said}");
        for e in expected {
            assert!(said.contains(e), "{name}: expected {e:?} in: {said}");
        }
        assert!(
            !said.contains("hunter2"),
            "a value of an unknown key printed: {said}"
        );
        assert!(!control.exists(), "{name}: nothing may start");
        // `config check` refuses the same file with the same words and exit code.
        let out = tinylag(&["config", "check", path(&file)], &[]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(text(&out).contains(expected[0]), "{}", text(&out));
    }

    // A TOML syntax error is placed by line and column, without the line's text.
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[serve]\nexport = \"hunter2-not-printed\n").unwrap();
    let out = tinylag(&["config", "check", path(&broken)], &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("broken.toml:2:"), "{said}");
    assert!(!said.contains("hunter2"), "{said}");

    // Unknown sections, and a file without the section a command needs.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "[serv]\nexport = \"x\"\n").unwrap();
    let said = text(&tinylag(&["config", "check", path(&other)], &[]));
    assert!(said.contains("unknown section [serv]"), "{said}");
    assert!(said.contains("[journal-trim]"), "{said}");
    let only_trim = dir.path().join("trim.toml");
    std::fs::write(&only_trim, "[journal-trim]\nretain = \"2h\"\n").unwrap();
    let out = tinylag(&["serve", "--config", path(&only_trim)], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("has no [serve] section (it has: [journal-trim])"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_readme_config_example_is_valid_and_complete() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let start = readme
        .find("```toml\n")
        .expect("a ```toml block in README.md")
        + 8;
    let end = start + readme[start..].find("```").expect("the block's end");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("example.toml");
    std::fs::write(&file, &readme[start..end]).unwrap();
    let said = tinylag_ok(&["config", "check", path(&file)], &[]);
    assert!(said.contains("4 sections"), "{said}");
    for section in ["serve", "replay", "journal trim", "undo trim"] {
        assert!(
            said.contains(&format!("complete: `tinylag {section} --config")),
            "{section}: {said}"
        );
    }
    // A conflict inside a section is refused by `config check` too, naming both flags.
    let conflict = dir.path().join("conflict.toml");
    std::fs::write(
        &conflict,
        "[serve]\nactivity-log = \"/a\"\nno-activity-log = true\n",
    )
    .unwrap();
    let out = tinylag(&["config", "check", path(&conflict)], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("[serve]")
            && said.contains("--activity-log")
            && said.contains("--no-activity-log"),
        "{said}"
    );
    assert!(!said.contains("all keys and values valid"), "{said}");
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/systemd")
}

/// `systemd-analyze verify` of every unit file in `dir` (ExecStart pointing at the binary
/// under test, `man:` links resolved in `manpath`): the warnings it prints, per unit.
fn verify_units(dir: &Path, manpath: &Path) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for unit in names {
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .env("MANPATH", manpath)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("systemd-analyze (scripts/install-test-deps.sh installs it)");
        let said = text(&out);
        if !out.status.success() || !said.trim().is_empty() {
            problems.push((unit.display().to_string(), said));
        }
    }
    problems
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    // The units name /usr/local/bin/tinylag and man:tinylag-serve(1), …: point them at the
    // binary under test and at man pages it generates.
    let man = dir.path().join("man");
    tinylag_ok(&["manpage", path(&man.join("man1"))], &[]);
    let units = dir.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let body = std::fs::read_to_string(entry.path()).unwrap();
        if name.ends_with(".service") {
            assert!(
                body.contains("ExecStart=/usr/local/bin/tinylag "),
                "{name}: ExecStart names /usr/local/bin/tinylag"
            );
            for hardening in [
                "ProtectSystem=strict",
                "NoNewPrivileges=yes",
                "PrivateTmp=yes",
            ] {
                assert!(body.contains(hardening), "{name} lacks {hardening}");
            }
            if !name.contains("trim") {
                assert!(body.contains("Type=notify"), "{name} is Type=notify");
                assert!(body.contains("Restart=on-failure"), "{name}");
                assert!(body.contains("--config /etc/tinylag/%i.toml"), "{name}");
            }
        }
        std::fs::write(
            units.join(&name),
            body.replace("/usr/local/bin/tinylag", tinylag_bin()),
        )
        .unwrap();
        seen.push(name);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "tinylag-journal-trim@.service",
            "tinylag-journal-trim@.timer",
            "tinylag-replay@.service",
            "tinylag-serve@.service",
            "tinylag-undo-trim@.service",
            "tinylag-undo-trim@.timer"
        ]
    );
    let problems = verify_units(&units, &man);
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");

    // The hardening keeps each service's exposure in systemd's "OK" band (below 5.0 of 10).
    for name in seen.iter().filter(|n| n.ends_with(".service")) {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--threshold=50", "--no-pager"])
            .arg(units.join(name))
            .env("SYSTEMD_COLORS", "0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: exposure above 5.0:\n{}",
            text(&out)
        );
    }

    // The same check catches a broken unit: a bad value and an unknown key (which
    // systemd-analyze only warns about, exiting 0).
    let serve = units.join("tinylag-serve@.service");
    let body = std::fs::read_to_string(&serve).unwrap();
    std::fs::write(
        &serve,
        body.replace(
            "Restart=on-failure",
            "Restart=sometimes\nProtectSytem=strict",
        ),
    )
    .unwrap();
    let problems = verify_units(&units, &man);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(problems[0].1.contains("sometimes"), "{problems:#?}");
    assert!(problems[0].1.contains("ProtectSytem"), "{problems:#?}");
}

/// A datagram socket standing in for systemd's `$NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        NotifySocket { socket, path }
    }

    /// The next notification, or `None` within `timeout`.
    fn recv(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }
}

fn spawn_logged(name: &str, args: &[&str], env: &[(&str, String)], log: &Path) -> ChildGuard {
    let mut cmd = Command::new(tinylag_bin());
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("TINYLAG_LOG", "info");
    ChildGuard::spawn_logged(name, &mut cmd, log).expect("spawn tinylag")
}

fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

#[test]
fn serve_and_replay_tell_systemd_when_they_are_ready_and_when_they_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = primary_and_journal(dir.path());
    let notify = NotifySocket::bind(dir.path());
    let env = [("NOTIFY_SOCKET", notify.path.display().to_string())];
    let log = dir.path().join("serve.log");
    let socket = dir.path().join("primary.img.sock");
    let mut serve = spawn_logged(
        "tinylag serve",
        &["serve", "--primary", path(&primary), "--journal", &journal],
        &env,
        &log,
    );
    let ready = notify
        .recv(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no READY=1 from serve; log:\n{}", log_of(&log)));
    // At once, no retry: the socket accepts when READY=1 arrives.
    let info =
        run_ok(Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={}", socket.display())));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=serving nbd+unix://"), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("67108864"),
        "nbdinfo sees the 64 MiB export"
    );

    // The replay agent: READY=1 once its control socket answers.
    let replica = dir.path().join("replica.img");
    let rlog = dir.path().join("replay.log");
    let mut replay = spawn_logged(
        "tinylag replay",
        &[
            "replay",
            "--journal",
            &journal,
            "--replica",
            path(&replica),
            "--name",
            "dr",
        ],
        &env,
        &rlog,
    );
    let ready = notify
        .recv(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no READY=1 from replay; log:\n{}", log_of(&rlog)));
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=replaying onto"), "{ready:?}");
    let control = dir.path().join("replica.img.ctl");
    let status = tinylag_ok(&["status", "--control", path(&control), "--json"], &[]);
    assert!(status.contains("\"applied_lsn\""), "{status}");

    // SIGTERM: STOPPING=1 first, then a clean exit.
    let exited = replay.terminate(Duration::from_secs(60)).unwrap();
    assert!(
        exited.success(),
        "replay: {exited}; log:\n{}",
        log_of(&rlog)
    );
    assert_eq!(
        notify.recv(Duration::from_secs(5)).as_deref(),
        Some("STOPPING=1\n")
    );
    let exited = serve.terminate(Duration::from_secs(60)).unwrap();
    assert!(exited.success(), "serve: {exited}; log:\n{}", log_of(&log));
    assert_eq!(
        notify.recv(Duration::from_secs(5)).as_deref(),
        Some("STOPPING=1\n")
    );
    assert_eq!(
        notify.recv(Duration::from_millis(200)),
        None,
        "nothing else"
    );
}

#[test]
fn up_runs_from_its_config_section_and_tells_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("up.toml");
    std::fs::write(
        &config,
        format!(
            "[up]\ndir = \"{}\"\nsize = \"32M\"\ndelay = \"0\"\nlog-format = \"json\"\n",
            path(&data)
        ),
    )
    .unwrap();
    let notify = NotifySocket::bind(dir.path());
    let log = dir.path().join("up.log");
    let mut up = spawn_logged(
        "tinylag up",
        &["up", "--config", path(&config)],
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
        &log,
    );
    // Both halves say READY=1 (serve once its socket accepts, replay once its agent runs).
    let mut ready = Vec::new();
    while ready.len() < 2 {
        let got = notify
            .recv(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("READY=1 {ready:?}; log:\n{}", log_of(&log)));
        ready.push(got);
    }
    assert!(
        ready.iter().all(|r| r.starts_with("READY=1\n")),
        "{ready:?}"
    );
    let info = run_ok(Command::new("nbdinfo").arg(format!(
        "nbd+unix:///?socket={}",
        data.join("primary.img.sock").display()
    )));
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("33554432"),
        "size = \"32M\" from the file"
    );
    let exited = up.terminate(Duration::from_secs(60)).unwrap();
    assert!(exited.success(), "{exited}; log:\n{}", log_of(&log));
    let said = log_of(&log);
    assert!(assert_json_lines("up", &said) >= 5, "{said}");
}

// ---------------------------------------------------------------------------------------
// Logs and credentials
// ---------------------------------------------------------------------------------------

/// Every line of `log` is a JSON object with a timestamp, a level and a target.
fn assert_json_lines(name: &str, log: &str) -> usize {
    let mut n = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{name}: not a JSON line ({e}): {line:?}\nlog:\n{log}"));
        for key in ["timestamp", "level", "target"] {
            assert!(v.get(key).is_some(), "{name}: no {key} in {line}");
        }
        n += 1;
    }
    n
}

fn assert_no_credential(what: &str, said: &str) {
    for secret in [ACCESS_KEY, SECRET_KEY] {
        assert!(
            !said.contains(secret),
            "{what} shows the credential {secret:?}:\n{said}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_no_credential_shows_anywhere() {
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let env = s3.child_env();
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = s3.uri("json-logs");
    init(&journal, &primary, "64M", &["--segment-size", "1M"], &env);

    // serve and replay with JSON logs at debug level, the AWS SDK's request handling
    // included (its debug text carries the access key id, which must come out redacted),
    // against the real S3 server.
    const VERBOSE: &str = "debug,aws_smithy_runtime=debug";
    const MOST_VERBOSE: &str = "trace,aws_sigv4=trace,aws_smithy_runtime=trace";
    let mut serve = Daemon::start(
        &primary,
        &journal,
        &["--log-format", "json", "--log", VERBOSE],
        &env,
    );
    qemu_io_ok(&serve.uri(), &["write -P 7 0 2M", "flush"]);
    serve.wait_status(Duration::from_secs(30), "durable", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    let replica = dir.path().join("replica.img");
    let rlog = dir.path().join("replay.log");
    let mut replay = spawn_logged(
        "tinylag replay",
        &[
            "replay",
            "--journal",
            &journal,
            "--replica",
            path(&replica),
            "--name",
            "dr",
            "--log-format",
            "json",
            "--log",
            VERBOSE,
        ],
        &env,
        &rlog,
    );
    let control = dir.path().join("replica.img.ctl");
    let replay_status = wait_for("replay to catch up", Duration::from_secs(60), || {
        let out = tinylag(&["status", "--control", path(&control), "--json"], &env);
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if v["applied_lsn"] == serve.status()["durable_lsn"] {
                return Ok(text(&out));
            }
        }
        Err(format!("{}; log:\n{}", text(&out), log_of(&rlog)))
    });

    // Everything an operator reads: both daemons' status, text and JSON, ...
    let mut shown = vec![("replay status --json".to_string(), replay_status)];
    for args in [
        vec!["status", "--primary", path(&primary)],
        vec!["status", "--primary", path(&primary), "--json"],
        vec!["status", "--control", path(&control)],
        vec!["journal", "info", "--journal", &journal],
    ] {
        let out = tinylag(&args, &env);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        shown.push((format!("{args:?}"), text(&out)));
    }
    // ... every --help ...
    for sub in [
        "", "serve", "replay", "up", "init", "journal", "status", "restore", "mount",
    ] {
        let mut args: Vec<&str> = sub.split_whitespace().collect();
        args.push("--help");
        let out = tinylag(&args, &env);
        shown.push((format!("{args:?}"), text(&out)));
    }
    // ... and the errors of failing S3 requests: a bucket that does not exist, a wrong
    // secret key (the request is refused), at the most verbose log level.
    let wrong_bucket = format!("s3://no-such-bucket-{}/j", std::process::id());
    let out = tinylag(
        &[
            "journal",
            "info",
            "--journal",
            &wrong_bucket,
            "--log",
            MOST_VERBOSE,
        ],
        &env,
    );
    assert!(!out.status.success(), "{}", text(&out));
    shown.push(("journal info on a missing bucket".into(), text(&out)));
    let out = tinylag(
        &[
            "serve",
            "--primary",
            path(&dir.path().join("other.img")),
            "--journal",
            &wrong_bucket,
            "--log-format",
            "json",
            "--log",
            MOST_VERBOSE,
        ],
        &env,
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert_json_lines("serve on a missing bucket", &text(&out));
    assert!(
        text(&out).contains("\"level\":\"ERROR\""),
        "the final error is a JSON event too: {}",
        text(&out)
    );
    shown.push(("serve on a missing bucket".into(), text(&out)));
    let mut bad_env = env.clone();
    for (k, v) in bad_env.iter_mut() {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = format!("{SECRET_KEY}-wrong");
        }
    }
    let out = tinylag(
        &[
            "journal",
            "info",
            "--journal",
            &journal,
            "--log",
            MOST_VERBOSE,
        ],
        &bad_env,
    );
    assert!(
        !out.status.success(),
        "s3s-fs checks signatures: {}",
        text(&out)
    );
    shown.push(("journal info with a wrong secret".into(), text(&out)));

    // Stop both; their logs are complete now.
    let exited = replay.terminate(Duration::from_secs(60)).unwrap();
    assert!(exited.success(), "replay: {exited}");
    let serve_log = serve.stop_ok();
    let serve_log = std::fs::read_to_string(&serve.log).unwrap_or(serve_log);
    let replay_log = log_of(&rlog);
    let n = assert_json_lines("serve", &serve_log);
    assert!(n >= 5, "serve logged {n} lines:\n{serve_log}");
    let n = assert_json_lines("replay", &replay_log);
    assert!(n >= 3, "replay logged {n} lines:\n{replay_log}");
    assert!(
        serve_log.contains("\"level\":\"DEBUG\""),
        "debug level reached the log"
    );
    assert!(
        serve_log.contains("access_key_id: \\\"** redacted **"),
        "the SDK's debug text with the credential reached the log, redacted"
    );
    shown.push(("serve log".into(), serve_log));
    shown.push(("replay log".into(), replay_log));
    for (what, said) in &shown {
        assert_no_credential(what, said);
    }
}

#[test]
fn rust_log_is_honoured_unless_log_or_tinylag_log_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (primary, journal) = primary_and_journal(dir.path());
    // Starts and stops `serve`; whether its INFO event at SIGTERM ("stopping: …") was logged.
    let logs_info = |n: usize, env: &[(&str, &str)], extra: &[&str]| -> bool {
        let log = dir.path().join(format!("serve-{n}.log"));
        let run_dir = tempfile::tempdir().unwrap();
        let notify = NotifySocket::bind(run_dir.path());
        let mut cmd = Command::new(tinylag_bin());
        cmd.args(["serve", "--primary", path(&primary), "--journal", &journal])
            .args(["--log-format", "json"])
            .args(extra)
            .env_remove("TINYLAG_LOG")
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .env("NOTIFY_SOCKET", &notify.path);
        let mut serve = ChildGuard::spawn_logged("tinylag serve", &mut cmd, &log).unwrap();
        notify
            .recv(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no READY=1; log:\n{}", log_of(&log)));
        let exited = serve.terminate(Duration::from_secs(60)).unwrap();
        assert!(exited.success(), "{exited}; log:\n{}", log_of(&log));
        let said = log_of(&log);
        assert_json_lines("serve", &said);
        said.contains("stopping: no new connections")
    };
    assert!(logs_info(1, &[], &[]), "the default is info");
    assert!(logs_info(2, &[("RUST_LOG", "info")], &[]));
    assert!(!logs_info(3, &[("RUST_LOG", "warn")], &[]), "RUST_LOG=warn");
    assert!(
        logs_info(4, &[("RUST_LOG", "warn"), ("TINYLAG_LOG", "info")], &[]),
        "TINYLAG_LOG wins over RUST_LOG"
    );
    assert!(
        !logs_info(5, &[("RUST_LOG", "info")], &["--log", "warn"]),
        "--log wins over RUST_LOG"
    );
}

// ---------------------------------------------------------------------------------------
// Completions and man pages
// ---------------------------------------------------------------------------------------

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let help = tinylag_ok(&["--help"], &[]);
    let subcommands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .expect("a Commands: section")
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|s| *s != "help")
        .collect();
    assert!(subcommands.len() >= 15, "{subcommands:?}");
    assert!(subcommands.contains(&"serve") && subcommands.contains(&"completions"));

    let bash = tinylag_ok(&["completions", "bash"], &[]);
    for sub in &subcommands {
        assert!(
            bash.contains(&format!("tinylag__{sub}")) || bash.contains(&format!("tinylag,{sub}")),
            "the bash completion lacks {sub}"
        );
    }
    assert!(bash.contains("--pool-size"), "flags are completed too");
    assert!(bash.contains("complete -F"), "a bash completion function");
    // bash itself accepts it.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("tinylag.bash");
    std::fs::write(&script, &bash).unwrap();
    run_ok(Command::new("bash").arg("-n").arg(&script));
    for shell in ["zsh", "fish"] {
        let out = tinylag_ok(&["completions", shell], &[]);
        assert!(
            out.contains("serve") && out.contains("pool-size"),
            "{shell}"
        );
    }
    let out = tinylag(&["completions", "tcsh"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let man1 = dir.path().join("man/man1");
    tinylag_ok(&["manpage", path(&man1)], &[]);
    for sub in subcommands
        .iter()
        .chain(["journal-trim", "config-check"].iter())
    {
        assert!(
            man1.join(format!("tinylag-{sub}.1")).exists(),
            "no tinylag-{sub}.1"
        );
    }
    let roff = std::fs::read_to_string(man1.join("tinylag-serve.1")).unwrap();
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH tinylag-serve 1"),
        "{roff}"
    );
    assert!(roff.contains("pool\\-size"), "options are documented");
    // The page renders (groff through man, as `man -l` shows it), with its options.
    let rendered = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(man1.join("tinylag-serve.1"))
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .output();
    match rendered {
        Ok(out) if out.status.success() => {
            // Bold and underline are overstrikes (`N\x08N`): keep the last of each.
            let raw = String::from_utf8_lossy(&out.stdout);
            let mut page = String::new();
            for c in raw.chars() {
                if c == '\x08' {
                    page.pop();
                } else {
                    page.push(c);
                }
            }
            let page = page.replace('\u{2010}', "-");
            assert!(page.contains("--pool-size"), "{page}");
            assert!(page.contains("NAME") && page.contains("SYNOPSIS"), "{page}");
        }
        Ok(out) => panic!("man -l failed: {}", text(&out)),
        Err(e) => {
            // Without man: the roff structure.
            eprintln!("man not installed ({e}); checking the roff text only");
            assert!(
                roff.contains(".SH NAME") && roff.contains(".SH SYNOPSIS"),
                "{roff}"
            );
        }
    }
}
