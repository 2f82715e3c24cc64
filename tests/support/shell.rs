//! Running documented command lines as a user would: one `bash` session fed line by line, so
//! shell variables (`dev=$(losetup …)`) and background jobs (`… &`) carry from one line to
//! the next, each line's exit status checked, and a transcript to show when one fails.
//!
//! Must never: leave a background job running — the session is its own process group,
//! ended (SIGTERM, then SIGKILL, by that group's id) on drop; wait without a bound.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// What the session prints after each line, followed by the line's exit status.
const STATUS_MARK: &str = "@@tinylag-walkthrough-status";

/// A `bash` session in a directory, with extra directories first on `PATH`.
pub struct ShellSession {
    child: Child,
    stdin: ChildStdin,
    output: Receiver<String>,
    transcript: String,
}

impl ShellSession {
    /// Starts `bash` in `dir` with `path_first` before `PATH` and `env` set.
    pub fn start(dir: &Path, path_first: &Path, env: &[(&str, String)]) -> ShellSession {
        let path = format!(
            "{}:{}",
            path_first.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(dir)
            .env("PATH", path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Its own process group: background jobs stay in it, so drop can end them all.
            .process_group(0)
            .spawn()
            .expect("start bash");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut session = ShellSession {
            child,
            stdin,
            output,
            transcript: String::new(),
        };
        // Every command's errors into the transcript too.
        session.send("exec 2>&1");
        session
    }

    fn send(&mut self, text: &str) {
        writeln!(self.stdin, "{text}").expect("write to bash");
        self.stdin.flush().expect("flush to bash");
    }

    /// Runs `line` (stdin from /dev/null, so nothing can read the next lines) and returns its
    /// exit status and output; fails the test if it outlives `timeout`.
    pub fn run(&mut self, line: &str, timeout: Duration) -> (i32, String) {
        self.transcript.push_str(&format!("$ {line}\n"));
        // The braces keep assignments in this shell; the newline ends a trailing comment.
        self.send(&format!(
            "{{ {line}\n}} </dev/null\necho \"{STATUS_MARK} $?\""
        ));
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(l) => {
                    if let Some(code) = l.strip_prefix(STATUS_MARK) {
                        let code = code.trim().parse().unwrap_or(-1);
                        self.transcript.push_str(&out);
                        return (code, out);
                    }
                    out.push_str(&l);
                    out.push('\n');
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{line}` did not finish within {timeout:?}; so far:\n{}{out}",
                    self.transcript
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("bash ended during `{line}`:\n{}{out}", self.transcript)
                }
            }
        }
    }

    /// Runs `line` and fails the test (with the transcript) unless it exits with 0.
    pub fn run_ok(&mut self, line: &str, timeout: Duration) -> String {
        let (code, out) = self.run(line, timeout);
        assert_eq!(
            code, 0,
            "`{line}` exited with {code}; the session so far:\n{}",
            self.transcript
        );
        out
    }

    /// Everything run so far and its output.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    /// Sends `signal` to the session's process group: bash and every job it started.
    fn signal_group(&self, signal: i32) {
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            // SAFETY: killpg(2) on the process group our own unreaped child leads.
            unsafe {
                libc::killpg(pgid, signal);
            }
        }
    }
}

impl Drop for ShellSession {
    fn drop(&mut self) {
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        // The group is gone once killpg finds no member (bash itself is reaped below).
        while Instant::now() < deadline {
            let _ = self.child.try_wait();
            // SAFETY: signal 0 only checks whether the group still has members.
            let alive = unsafe { libc::killpg(self.child.id() as i32, 0) } == 0;
            if !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}
