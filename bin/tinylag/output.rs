//! How `tinylag` talks to people: the one error printer, colour choice, and the command name
//! to print in hints so they work as printed.
//!
//! Must never: print a cause twice, colour text that is not going to a terminal (unless
//! `--color always`), or print a credential (errors come from our own types, which never
//! hold one).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// `--color`: when log lines carry ANSI colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    /// Only when stderr is a terminal and NO_COLOR is unset.
    Auto,
    /// Always, even into a file or a pipe.
    Always,
    /// Never.
    Never,
}

impl ColorChoice {
    /// Whether stderr output gets colours.
    pub fn ansi(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stderr().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        }
    }
}

/// `--log-format`: how log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (timestamp, level, message and fields), for log shippers.
    Json,
}

/// Whether `--log-format json` is on (set once by `main` before any subcommand runs).
static JSON_LOGS: AtomicBool = AtomicBool::new(false);

pub fn set_json_logs(on: bool) {
    JSON_LOGS.store(on, Ordering::Relaxed);
}

/// A line for the operator on stderr (a banner, a notice): as it is, or with `--log-format
/// json` one JSON object shaped like the log events (`timestamp`, `level`, `message`,
/// `target`). Like the text, it is written whatever `--log` filters: it is the command's
/// output, not a log event.
pub fn say(line: impl std::fmt::Display) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        json_line("INFO", &line.to_string());
    } else {
        eprintln!("{line}");
    }
}

/// A warning for the operator on stderr: as it is, or with `--log-format json` a JSON
/// object at level `WARN`.
pub fn warn(line: impl std::fmt::Display) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        json_line("WARN", &line.to_string());
    } else {
        eprintln!("{line}");
    }
}

/// A warning that also belongs in the log (the plaintext-TCP warning): on stderr and as a
/// `WARN` event, or with `--log-format json` one JSON object (not two).
pub fn warn_logged(line: impl std::fmt::Display) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        json_line("WARN", &line.to_string());
    } else {
        tracing::warn!("{line}");
        eprintln!("{line}");
    }
}

/// The final error of a command with `--log-format json`: one JSON object at level `ERROR`.
pub fn error_line(line: impl std::fmt::Display) {
    json_line("ERROR", &line.to_string());
}

/// A line on stdout (a daemon's start and stop banners, a report): as it is, or with
/// `--log-format json` a JSON object on stderr, so a daemon under systemd writes JSON lines
/// only.
pub fn tell(line: impl std::fmt::Display) {
    if JSON_LOGS.load(Ordering::Relaxed) {
        json_line("INFO", &line.to_string());
    } else {
        println!("{line}");
    }
}

fn json_line(level: &str, message: &str) {
    let line = serde_json::json!({
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "level": level,
        "message": message,
        "target": "tinylag",
    });
    eprintln!("{line}");
}

/// An error and its causes on one line, each cause once: a cause whose text its wrapper
/// already shows (`cannot open x: No such file…` over `No such file…`) is left out.
pub fn error_text(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// How to run this very binary from a shell: `tinylag` when that name on `PATH` is this
/// binary, else its full path (e.g. `target/release/tinylag` after `cargo run`), so the
/// commands `up`, `serve` and `replay` print work when pasted.
pub fn self_command() -> String {
    let Ok(me) = std::env::current_exe().and_then(|p| p.canonicalize()) else {
        return "tinylag".into();
    };
    if on_path("tinylag").is_some_and(|p| p == me) {
        return "tinylag".into();
    }
    shell_word(&me)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .and_then(|p| p.canonicalize().ok())
}

/// `path` quoted for a POSIX shell when it needs it.
pub fn shell_word(path: &Path) -> String {
    let s = path.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let wrapped = anyhow::Error::new(io)
            .context(format!(
                "cannot reach x.ctl: {}",
                std::io::Error::from(std::io::ErrorKind::NotFound)
            ))
            .context("status");
        let text = error_text(&wrapped);
        assert_eq!(text.matches("not found").count(), 1, "{text}");
        assert!(text.starts_with("status: cannot reach x.ctl: "), "{text}");
    }

    #[test]
    fn quoting() {
        assert_eq!(
            shell_word(Path::new("/usr/bin/tinylag")),
            "/usr/bin/tinylag"
        );
        assert_eq!(shell_word(Path::new("/a b/it's")), r"'/a b/it'\''s'");
    }
}
