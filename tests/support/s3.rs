//! Local S3 servers (s3s-fs, moto) for tests, on 127.0.0.1 free ports, killed on drop.
//!
//! The servers come from `scripts/install-test-deps.sh`: s3s-fs in
//! `$TINYLAG_TOOLS/bin` (default `~/.cache/tinylag/tools`), moto in the virtualenv
//! `$TINYLAG_MOTO_VENV` (default `~/.cache/tinylag/moto-venv`). A missing server fails the
//! test with the command to run, unless `TINYLAG_SKIP_S3=1` asks to skip S3 tests.
//!
//! Clients use the fixed dummy credentials below, set on the client explicitly, so a
//! developer's real AWS environment is never read, let alone sent to a test server.
//!
//! Must never: print the credentials; bind anything but 127.0.0.1; leave a server running.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use tempfile::TempDir;
use tinylag::store::{S3Options, S3Store};

use super::procs::{free_port, ChildGuard};

/// Dummy credentials for local test servers only (public so tests can check that no
/// message ever contains them).
pub const ACCESS_KEY: &str = "tinylag-test-access";
pub const SECRET_KEY: &str = "tinylag-test-secret-not-real";
/// The bucket every test server gets.
pub const BUCKET: &str = "tinylag-test";

/// How long a server may take to listen (moto imports a lot of Python).
const STARTUP: Duration = Duration::from_secs(30);

/// Which S3 implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3ServerKind {
    /// s3s-fs: s3s's file-system-backed server (Rust).
    S3sFs,
    /// moto's standalone server (Python).
    Moto,
}

impl S3ServerKind {
    pub fn name(self) -> &'static str {
        match self {
            S3ServerKind::S3sFs => "s3s-fs",
            S3ServerKind::Moto => "moto",
        }
    }

    fn program(self) -> PathBuf {
        match self {
            S3ServerKind::S3sFs => tools_dir().join("bin/s3s-fs"),
            S3ServerKind::Moto => moto_venv().join("bin/moto_server"),
        }
    }
}

/// `$TINYLAG_TOOLS`, default `~/.cache/tinylag/tools`.
pub fn tools_dir() -> PathBuf {
    env_dir("TINYLAG_TOOLS", ".cache/tinylag/tools")
}

/// `$TINYLAG_MOTO_VENV`, default `~/.cache/tinylag/moto-venv`.
pub fn moto_venv() -> PathBuf {
    env_dir("TINYLAG_MOTO_VENV", ".cache/tinylag/moto-venv")
}

fn env_dir(var: &str, under_home: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(under_home)
        }
    }
}

/// Whether `TINYLAG_SKIP_S3=1` asks to skip every test that needs an S3 server.
pub fn skip_s3() -> bool {
    std::env::var("TINYLAG_SKIP_S3").is_ok_and(|v| v == "1")
}

/// A running S3 server with bucket [`BUCKET`].
#[derive(Debug)]
pub struct S3Server {
    kind: S3ServerKind,
    endpoint: String,
    port: u16,
    child: ChildGuard,
    /// Data directory (s3s-fs) and the server's log.
    _dir: TempDir,
}

impl S3Server {
    /// Starts a server of `kind` and creates [`BUCKET`]; `None` (after saying so) when
    /// `TINYLAG_SKIP_S3=1`. Panics, naming the install script, when the server is missing.
    pub async fn start(kind: S3ServerKind) -> Option<S3Server> {
        if skip_s3() {
            // Straight to the stream: libtest would swallow `eprintln!` of a passing test.
            let _ = writeln!(
                std::io::stderr(),
                "skipped: {} tests (TINYLAG_SKIP_S3=1)",
                kind.name()
            );
            return None;
        }
        let program = kind.program();
        assert!(
            program.is_file(),
            "{} not found at {}: run scripts/install-test-deps.sh \
             (or set TINYLAG_SKIP_S3=1 to skip the S3 tests)",
            kind.name(),
            program.display()
        );
        let mut last_error = String::new();
        // A free port can be taken by someone else before the server binds it: retry.
        for _ in 0..3 {
            match Self::try_start(kind, &program) {
                Ok(server) => {
                    server.create_bucket(BUCKET).await;
                    return Some(server);
                }
                Err(e) => last_error = e,
            }
        }
        panic!("{} did not start: {last_error}", kind.name());
    }

    fn try_start(kind: S3ServerKind, program: &PathBuf) -> Result<S3Server, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| format!("create {}: {e}", data.display()))?;
        let port = free_port();
        let child = Self::spawn_on(kind, program, &dir, port)?;
        Ok(S3Server {
            kind,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            child,
            _dir: dir,
        })
    }

    /// Freezes the server (SIGSTOP, by pid): connections hang, nothing answers, as with a
    /// store that is alive but far too slow. [`S3Server::thaw`] lets it go on.
    pub fn freeze(&self) {
        // SAFETY: kill only sends a signal to our own child's pid.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGSTOP) };
    }

    /// Undoes [`S3Server::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.child.pid() as i32, libc::SIGCONT) };
    }

    /// Stops the server (SIGKILL, by pid): its data stays on disk for [`S3Server::resume`].
    pub fn pause(&mut self) {
        let child = self.child.child_mut();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on the same port and data directory after
    /// [`S3Server::pause`].
    pub fn resume(&mut self) {
        let program = self.kind.program();
        let mut last = String::new();
        for _ in 0..20 {
            match Self::spawn_on(self.kind, &program, &self._dir, self.port) {
                Ok(child) => {
                    self.child = child;
                    return;
                }
                // The port may linger for a moment after the kill.
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{} did not restart on port {}: {last}",
            self.kind.name(),
            self.port
        );
    }

    fn spawn_on(
        kind: S3ServerKind,
        program: &PathBuf,
        dir: &TempDir,
        port: u16,
    ) -> Result<ChildGuard, String> {
        let data = dir.path().join("data");
        let mut cmd = Command::new(program);
        match kind {
            S3ServerKind::S3sFs => {
                cmd.arg("--host")
                    .arg("127.0.0.1")
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--access-key")
                    .arg(ACCESS_KEY)
                    .arg("--secret-key")
                    .arg(SECRET_KEY)
                    .arg(&data);
            }
            S3ServerKind::Moto => {
                cmd.arg("-H")
                    .arg("127.0.0.1")
                    .arg("-p")
                    .arg(port.to_string())
                    .current_dir(&data);
            }
        }
        let log = dir.path().join("server.log");
        let mut child =
            ChildGuard::spawn_logged(kind.name(), &mut cmd, &log).map_err(|e| e.to_string())?;
        child.wait_for_port(port, STARTUP)?;
        Ok(child)
    }

    pub fn kind(&self) -> S3ServerKind {
        self.kind
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Options that reach this server (path-style follows from the 127.0.0.1 endpoint).
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".to_string()),
            force_path_style: false,
        }
    }

    /// The `s3://` URI of `prefix` in [`BUCKET`], for the CLI.
    pub fn uri(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// Environment for a `tinylag` child process that must reach this server with the test
    /// credentials and nothing from the user's own AWS configuration.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_CONFIG_FILE", "/dev/null".to_string()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }

    /// A store on [`BUCKET`] under `prefix`, with the test credentials.
    pub fn store(&self, prefix: &str) -> S3Store {
        self.store_in(BUCKET, prefix)
    }

    /// A store on any bucket of this server (it need not exist).
    pub fn store_in(&self, bucket: &str, prefix: &str) -> S3Store {
        S3Store::with_credentials(bucket, prefix, &self.options(), ACCESS_KEY, SECRET_KEY)
            .unwrap_or_else(|e| panic!("configuring a store on {}: {e}", self.endpoint))
    }

    /// A raw SDK client with the test credentials, for setup the store does not do.
    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(tinylag::store::https_client())
            .region(Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "tinylag-tests",
            ))
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Creates `bucket`, panicking (with the server's log) if the server refuses.
    pub async fn create_bucket(&self, bucket: &str) {
        if let Err(e) = self.client().create_bucket().bucket(bucket).send().await {
            panic!(
                "creating bucket {bucket} on {} ({}): {}\nserver output ends with:\n{}",
                self.kind.name(),
                self.endpoint,
                aws_sdk_s3::error::DisplayErrorContext(&e),
                self.child.log_tail(2048)
            );
        }
    }
}
