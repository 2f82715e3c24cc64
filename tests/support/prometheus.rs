//! A real Prometheus server (Debian's `prometheus` package, installed by
//! scripts/install-test-deps.sh) scraping the daemons' `/metrics` every second, its HTTP API
//! queried for instant values; `promtool check metrics` on an exposition; a plain HTTP GET.
//!
//! Must never: listen beyond 127.0.0.1, keep its data outside the test's directory, or stay
//! running after the test (the guard kills it by pid).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::procs::{free_port, ChildGuard};

/// How long Prometheus may take to listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `GET path` on 127.0.0.1:`port` (HTTP/1.1, one request per connection): (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the HTTP response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// The body of a chunked response.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `promtool check metrics` on `exposition`: Ok, or promtool's complaint.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A running Prometheus.
pub struct Prometheus {
    guard: ChildGuard,
    pub port: u16,
}

impl Prometheus {
    /// Starts Prometheus in `dir` scraping every second the jobs `(name, port)` at
    /// 127.0.0.1:`port`/metrics.
    pub fn start(dir: &Path, jobs: &[(&str, u16)]) -> Prometheus {
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (name, port) in jobs {
            config.push_str(&format!(
                "  - job_name: {name}\n    scrape_timeout: 1s\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // A port free a moment ago may be taken before Prometheus binds it: retry on another.
        let mut failures = Vec::new();
        for attempt in 0..3 {
            let port = free_port();
            let mut cmd = Command::new("prometheus");
            cmd.arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join(format!("prometheus-data-{attempt}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn");
            let log = dir.join(format!("prometheus-{attempt}.log"));
            let mut guard = ChildGuard::spawn_logged("prometheus", &mut cmd, &log)
                .expect("prometheus (Debian package prometheus; scripts/install-test-deps.sh)");
            match guard.wait_for_port(port, START_TIMEOUT) {
                Ok(()) => {
                    let prometheus = Prometheus { guard, port };
                    prometheus.wait_ready();
                    return prometheus;
                }
                Err(e) => failures.push(e),
            }
        }
        panic!("Prometheus did not start:\n{}", failures.join("\n"));
    }

    /// Waits until `/-/ready` says 200: the API answers 503 while the storage opens.
    fn wait_ready(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let (status, body) = http_get(self.port, "/-/ready");
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready after {START_TIMEOUT:?} ({status} {body}); log:\n{}",
                self.guard.log_tail(4096)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The instant vector of `query`: (labels, value) per series.
    pub fn query(&self, query: &str) -> Vec<(serde_json::Value, f64)> {
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={}", encode(query)));
        assert_eq!(status, 200, "query {query}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from the API");
        assert_eq!(v["status"], "success", "query {query}: {body}");
        v["data"]["result"]
            .as_array()
            .expect("a vector result")
            .iter()
            .map(|s| {
                let value = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .expect("a sample value");
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// Polls `query` until it has exactly one series and `ok` holds on its value; returns the
    /// value, or fails the test with the last answer and Prometheus' log.
    pub fn wait_value(&self, query: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.query(query);
            if let [(_, v)] = got.as_slice() {
                if ok(*v) {
                    return *v;
                }
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {query} is {got:?} after {timeout:?}; log:\n{}",
                self.guard.log_tail(4096)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}
