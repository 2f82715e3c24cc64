//! `--metrics-listen` under a real Prometheus: a running `serve` and a delayed `replay`
//! (real daemons, written through qemu-io) are scraped every second; Prometheus' HTTP API
//! must return the right lag and mode values; `promtool check metrics` accepts both
//! expositions; and `status --json` and a scrape taken at the same quiet moment agree. Also
//! `up`'s shared endpoint, `status --watch`, and a bad flag value.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::daemon::{control_status, init, tinylag, tinylag_bin, tinylag_ok, Daemon};
use support::nbd::qemu_io_ok;
use support::procs::{free_port, wait_for, ChildGuard};
use support::prometheus::{http_get, promtool_check, Prometheus};
use support::replay::{replay_args, spawn};

const WAIT: Duration = Duration::from_secs(60);

/// The value of the one series of `name` whose label set contains every `labels` pair.
fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse().expect("a number"))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} {labels:?}: {found:?} in\n{exposition}"
    );
    found[0]
}

/// `tinylag status --json` of the daemon at `control`.
fn status_json(control: &Path) -> serde_json::Value {
    let out = tinylag_ok(
        &["status", "--control", control.to_str().unwrap(), "--json"],
        &[],
    );
    serde_json::from_str(&out).expect("status --json is JSON")
}

/// Polls the replay agent's status until `ready` holds.
fn wait_replica(
    control: &Path,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for(what, WAIT, || match control_status(control) {
        Ok(s) if ready(&s) => Ok(s),
        Ok(s) => Err(format!("status {s:#}")),
        Err(e) => Err(format!("the replay agent does not answer: {e}")),
    })
}

fn u(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn prometheus_scrapes_serve_and_a_delayed_replica() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal").display().to_string();
    let primary = dir.path().join("primary.img");
    init(&journal, &primary, "64M", &[], &[]);
    let (serve_port, replay_port) = (free_port(), free_port());
    let serve_addr = format!("127.0.0.1:{serve_port}");
    let mut serve = Daemon::start(&primary, &journal, &["--metrics-listen", &serve_addr], &[]);
    qemu_io_ok(
        &serve.uri(),
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 64k",
            "write -P 0x33 2M 128k",
        ],
    );
    let primary_status = serve.wait_status(WAIT, "the journal to catch up", |s| {
        s["durable_lsn"] == s["head_lsn"]
    });
    let head = u(&primary_status["head_lsn"]);
    assert!(head >= 3.0, "{primary_status:#}");

    // A replica an hour behind: it applies nothing, so its lag is the whole journal.
    let replica = dir.path().join("replica.img");
    let mut args = replay_args(&journal, &replica, "dr");
    args.extend([
        "--delay".into(),
        "1h".into(),
        "--metrics-listen".into(),
        format!("127.0.0.1:{replay_port}"),
    ]);
    let _replay = spawn(&args, &dir.path().join("replay.log"));
    let replica_ctl = dir.path().join("replica.img.ctl");
    wait_replica(&replica_ctl, "the agent to see the whole journal", |s| {
        s["state"] == "waiting-for-delay" && u(&s["lag_records"]) == head
    });

    let prom = Prometheus::start(
        dir.path(),
        &[("serve", serve_port), ("replay", replay_port)],
    );
    let exactly = |want: f64| move |v: f64| v == want;
    prom.wait_value(r#"up{job="serve"}"#, WAIT, exactly(1.0));
    prom.wait_value(r#"up{job="replay"}"#, WAIT, exactly(1.0));
    prom.wait_value(
        r#"tinylag_mode{job="serve",mode="logging"}"#,
        WAIT,
        exactly(1.0),
    );
    prom.wait_value(r#"sum(tinylag_mode{job="serve"})"#, WAIT, exactly(1.0));
    prom.wait_value(r#"tinylag_head_lsn{job="serve"}"#, WAIT, exactly(head));
    prom.wait_value(
        r#"tinylag_journal_lag_records{job="serve"}"#,
        WAIT,
        exactly(0.0),
    );
    prom.wait_value(
        r#"tinylag_primary_requests_total{job="serve",op="write"}"#,
        WAIT,
        exactly(3.0),
    );
    prom.wait_value(
        r#"tinylag_replica_lag_records{job="replay",consumer="dr"}"#,
        WAIT,
        exactly(head),
    );
    prom.wait_value(
        r#"tinylag_replica_state{job="replay",state="waiting-for-delay"}"#,
        WAIT,
        exactly(1.0),
    );
    // Written seconds ago, an hour of delay: behind, but not late.
    prom.wait_value(r#"tinylag_replica_lag_seconds{consumer="dr"}"#, WAIT, |v| {
        v > 0.0 && v < 600.0
    });
    prom.wait_value(
        r#"tinylag_replica_lag_beyond_delay_seconds{consumer="dr"}"#,
        WAIT,
        exactly(0.0),
    );
    // The same lag, across daemons: the journal head minus what the replica applied.
    prom.wait_value(
        r#"max(tinylag_head_lsn) - max(tinylag_replica_applied_lsn)"#,
        WAIT,
        exactly(head),
    );

    // promtool accepts both expositions (the 0.0.4 text format a plain GET gets).
    for port in [serve_port, replay_port] {
        let (code, text) = http_get(port, "/metrics");
        assert_eq!(code, 200, "{text}");
        promtool_check(&text).unwrap_or_else(|e| panic!("promtool on port {port}: {e}\n{text}"));
    }

    // status --json and a scrape at the same quiet moment agree.
    let before = status_json(&serve.control);
    let (_, text) = http_get(serve_port, "/metrics");
    let after = status_json(&serve.control);
    assert_eq!(before["head_lsn"], after["head_lsn"], "not quiet");
    let s = &before;
    for (metric, field) in [
        ("tinylag_head_lsn", &s["head_lsn"]),
        ("tinylag_durable_lsn", &s["durable_lsn"]),
        ("tinylag_journal_lag_records", &s["lag"]["records"]),
        ("tinylag_journal_lag_bytes", &s["lag"]["bytes"]),
        ("tinylag_pool_used_bytes", &s["pool"]["used"]),
        ("tinylag_pool_capacity_bytes", &s["pool"]["cap"]),
        ("tinylag_segments_uploaded_total", &s["segments_uploaded"]),
        ("tinylag_uploaded_bytes_total", &s["bytes_uploaded"]),
        ("tinylag_upload_errors_total", &s["upload_errors"]["count"]),
        ("tinylag_dirty_regions", &s["dirty"]["regions"]),
        (
            "tinylag_primary_written_bytes_total",
            &s["io"]["bytes_written"],
        ),
    ] {
        assert_eq!(sample(&text, metric, &[]), u(field), "{metric}");
    }
    let mode = s["mode"].as_str().unwrap();
    assert_eq!(sample(&text, "tinylag_mode", &[("mode", mode)]), 1.0);
    assert_eq!(
        sample(&text, "tinylag_ack_to_durable_seconds_count", &[]),
        u(&s["durable_lag"]["records"])
    );

    let before = status_json(&replica_ctl);
    let (_, text) = http_get(replay_port, "/metrics");
    let after = status_json(&replica_ctl);
    let r = &before;
    let who = [("consumer", "dr")];
    for (metric, field) in [
        ("tinylag_replica_applied_lsn", &r["applied_lsn"]),
        ("tinylag_replica_consistent_lsn", &r["consistent_lsn"]),
        ("tinylag_replica_head_lsn", &r["head_lsn"]),
        ("tinylag_replica_lag_records", &r["lag_records"]),
        ("tinylag_replica_lag_bytes", &r["lag_bytes"]),
        ("tinylag_undo_log_bytes", &r["undo_bytes"]),
        (
            "tinylag_replica_applied_records_total",
            &r["records_applied"],
        ),
    ] {
        assert_eq!(sample(&text, metric, &who), u(field), "{metric}");
    }
    let state = r["state"].as_str().unwrap();
    assert_eq!(
        sample(&text, "tinylag_replica_state", &[("state", state)]),
        1.0
    );
    // Age grows between the three reads, never backwards.
    let lag = sample(&text, "tinylag_replica_lag_seconds", &who);
    assert!(
        u(&before["lag_seconds"]) <= lag && lag <= u(&after["lag_seconds"]),
        "{} <= {lag} <= {}",
        before["lag_seconds"],
        after["lag_seconds"]
    );

    drop(prom);
    serve.stop_ok();
}

#[test]
fn up_serves_the_primary_and_the_replica_on_one_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let mut cmd = Command::new(tinylag_bin());
    cmd.args(["up", "--size", "16M", "--dir"])
        .arg(&data)
        .args(["--metrics-listen", &format!("127.0.0.1:{port}")])
        .env("TINYLAG_LOG", "warn");
    let mut up = ChildGuard::spawn_logged("tinylag up", &mut cmd, &dir.path().join("up.log"))
        .expect("spawn tinylag up");
    up.wait_for_port(port, WAIT)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = wait_for("both sides in one scrape", WAIT, || {
        let (code, text) = http_get(port, "/metrics");
        assert_eq!(code, 200, "{text}");
        if text.contains("tinylag_mode{") && text.contains("tinylag_replica_state{") {
            Ok(text)
        } else {
            Err(format!("one side missing:\n{text}"))
        }
    });
    promtool_check(&text).unwrap_or_else(|e| panic!("promtool: {e}\n{text}"));
    for (role, store) in [
        ("primary", "journal"),
        ("replica", "journal"),
        ("replica", "undo"),
    ] {
        assert!(
            text.contains(&format!(
                "tinylag_store_requests_total{{role=\"{role}\",store=\"{store}\",op=\"put_if_absent\",result=\"ok\"}}"
            )),
            "{role} {store}:\n{text}"
        );
    }
    let status = up.terminate(WAIT).expect("stop tinylag up");
    assert!(status.success(), "{}", up.log_tail(4096));
}

#[test]
fn status_watch_redraws_every_second_until_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal").display().to_string();
    let primary = dir.path().join("primary.img");
    init(&journal, &primary, "16M", &[], &[]);
    let mut serve = Daemon::start(&primary, &journal, &[], &[]);
    let log = dir.path().join("watch.out");
    let mut cmd = Command::new(tinylag_bin());
    cmd.args(["status", "--watch", "--control"])
        .arg(&serve.control)
        .env("TINYLAG_LOG", "warn");
    let mut watch = ChildGuard::spawn_logged("tinylag status --watch", &mut cmd, &log).unwrap();
    let frames = |text: &str| text.matches("tinylag status --watch ").count();
    let frames_at_least = |n: usize| {
        wait_for(&format!("{n} frames"), WAIT, || {
            let seen = frames(&std::fs::read_to_string(&log).unwrap());
            if seen >= n {
                Ok(())
            } else {
                Err(format!("{seen} frames"))
            }
        })
    };
    // A write between frames shows in the next one.
    frames_at_least(1);
    qemu_io_ok(&serve.uri(), &["write -P 0x5a 0 4k"]);
    frames_at_least(3);
    assert!(watch.exited().is_none(), "--watch stopped on its own");
    // SIGINT (Ctrl-C), by pid: a clean exit.
    // SAFETY: kill(2) on the pid of our own child.
    unsafe {
        libc::kill(watch.pid() as i32, libc::SIGINT);
    }
    let status = watch.wait_timeout(WAIT).expect("--watch stops on SIGINT");
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("\x1b["), "no escape codes off a terminal");
    let shown: Vec<&str> = text
        .split("tinylag status --watch ")
        .skip(1)
        .map(|f| {
            f.lines()
                .find(|l| l.starts_with("served"))
                .unwrap_or_else(|| panic!("no served line in frame:\n{f}"))
        })
        .collect();
    assert!(shown[0].contains(" 0 writes"), "{shown:?}");
    assert!(
        shown.last().unwrap().contains(" 1 writes (4.0 KiB)"),
        "{shown:?}"
    );

    // On a terminal (script(1) gives it a pty), each frame clears the screen first.
    let command = format!(
        "timeout --preserve-status -s INT 2.5 {} status --watch --control {}",
        tinylag_bin(),
        serve.control.display()
    );
    let out = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("TINYLAG_LOG", "warn")
        .output()
        .expect("script (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Ctrl-C is a clean stop: {:?} {text:?}",
        out.status
    );
    let clears = text.matches("\x1b[H\x1b[2J").count();
    assert!(clears >= 2, "{clears} screen clears in {text:?}");
    assert_eq!(text.matches("tinylag status --watch ").count(), clears);
    serve.stop_ok();
}

#[test]
fn a_bad_metrics_address_is_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = tinylag(
        &[
            "replay",
            "--journal",
            dir.path().to_str().unwrap(),
            "--replica",
            "r.img",
            "--name",
            "dr",
            "--metrics-listen",
            "localhost",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics-listen"), "{err}");
    assert!(err.contains("127.0.0.1:9469"), "{err}");
    // A port in use: the daemon refuses to start and says which flag.
    let port = free_port();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let journal = dir.path().join("journal").display().to_string();
    let primary = dir.path().join("primary.img");
    init(&journal, &primary, "16M", &[], &[]);
    let out = tinylag(
        &[
            "serve",
            "--primary",
            primary.to_str().unwrap(),
            "--journal",
            &journal,
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot listen on --metrics-listen 127.0.0.1:{port}"
        )),
        "{err}"
    );
    assert!(
        !dir.path().join("primary.img.ctl").exists(),
        "nothing left behind"
    );
}

#[test]
fn the_readme_scrape_config_and_alert_rules_pass_promtool() {
    let readme = include_str!("../README.md");
    let section = readme
        .split("## Metrics (Prometheus)")
        .nth(1)
        .expect("README has a metrics section");
    let blocks: Vec<&str> = section
        .split("```yaml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    let [config, rules] = blocks[..] else {
        panic!("expected a scrape config and a rules file, got {blocks:?}");
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    std::fs::write(dir.path().join("tinylag-rules.yml"), rules).unwrap();
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "tinylag-rules.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(dir.path())
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
