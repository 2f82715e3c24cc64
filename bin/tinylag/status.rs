//! `tinylag status`: asks a running daemon (the primary, or a replay agent: its answer's
//! `role` says which) for its status over the control socket and prints it (text for people,
//! `--json` for scripts). With `--watch` it asks again every second and redraws (clear
//! screen and home, plain ANSI, on a terminal; frames one after another otherwise) until
//! Ctrl-C.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tinylag::clock::{format_ns, Clock, SystemClock};
use tinylag::control::{self, Request};
use tinylag::replayer::{render_text, ReplicaStatus};
use tinylag::writer::StatusSnapshot;

use crate::cmd::serve::default_control_path;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", required_unless_present = "primary")]
    pub control: Option<PathBuf>,
    /// The daemon's primary; implies the default control socket <PATH>.ctl.
    #[arg(long, value_name = "PATH", conflicts_with = "control")]
    pub primary: Option<PathBuf>,
    /// Print the daemon's answer as JSON.
    #[arg(long)]
    pub json: bool,
    /// Ask again every second and redraw, until Ctrl-C (with --json: one line per answer).
    #[arg(long)]
    pub watch: bool,
}

/// How often `--watch` asks.
const WATCH_EVERY: Duration = Duration::from_secs(1);

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let path = match (args.control, args.primary) {
        (Some(control), _) => control,
        (None, Some(primary)) => default_control_path(&primary),
        (None, None) => anyhow::bail!("give --control PATH or --primary PATH"),
    };
    if !args.watch {
        print!("{}", ask(&path, args.json, false).await?);
        return Ok(());
    }
    // A daemon that is not there at all is an error; one that goes away later is shown.
    let mut frame = ask(&path, args.json, true).await?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let mut out = std::io::stdout().lock();
        if terminal {
            // Clear the screen and go home, then the frame.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        if !args.json {
            writeln!(
                out,
                "tinylag status --watch {} at {} (Ctrl-C to stop)\n",
                path.display(),
                format_ns(SystemClock.now_ns())
            )?;
        }
        write!(out, "{frame}")?;
        out.flush()?;
        drop(out);
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        frame = match ask(&path, args.json, true).await {
            Ok(f) => f,
            Err(e) => format!("cannot get the status: {e:#}\n"),
        };
    }
}

/// One status request, rendered as `status` prints it (`compact`: JSON on one line).
async fn ask(path: &Path, json: bool, compact: bool) -> anyhow::Result<String> {
    let request = Request {
        cmd: "status".into(),
        args: serde_json::Value::Null,
    };
    let answer = control::request(path, &request).await?;
    if json {
        let mut text = match compact {
            true => serde_json::to_string(&answer)?,
            false => serde_json::to_string_pretty(&answer)?,
        };
        text.push('\n');
        return Ok(text);
    }
    if answer["role"] == "replica" {
        let status: ReplicaStatus = serde_json::from_value(answer).map_err(|e| {
            anyhow::anyhow!(
                "the replay agent at {} answered a status this tinylag cannot read ({e}); try --json",
                path.display()
            )
        })?;
        return Ok(render_text(&status));
    }
    let lease = answer.get("lease").cloned();
    let buffers = answer.get("nbd_buffers").cloned();
    let status: StatusSnapshot = serde_json::from_value(answer).map_err(|e| {
        anyhow::anyhow!(
            "the daemon at {} answered a status this tinylag cannot read ({e}); try --json",
            path.display()
        )
    })?;
    let mut text = status.render_text();
    if let Some(l) = lease {
        text.push_str(&format!(
            "{:<16}{}: epoch {} held by {} pid {} since {}, renewed {} (every {:.0}s of a \
             {:.0}s term, {} renewals, {} errors), expires in {:.1}s\n",
            "lease",
            l["state"].as_str().unwrap_or("?"),
            l["epoch"],
            l["host"].as_str().unwrap_or("?"),
            l["pid"],
            l["since"].as_str().unwrap_or("-"),
            l["renewed_at"].as_str().unwrap_or("-"),
            l["ttl_seconds"].as_f64().unwrap_or(0.0) / 3.0,
            l["ttl_seconds"].as_f64().unwrap_or(0.0),
            l["renewals"],
            l["renewal_errors"],
            l["expires_in_seconds"].as_f64().unwrap_or(0.0)
        ));
    }
    if let Some(b) = buffers {
        let size = |key: &str| tinylag::units::format_size(b[key].as_u64().unwrap_or(0));
        text.push_str(&format!(
            "{:<16}{} of {} held by NBD clients (peak {}), {} connections throttled now, {} \
             waits since start\n",
            "nbd buffers",
            size("held"),
            size("cap"),
            size("peak"),
            b["throttled"],
            b["throttled_total"]
        ));
    }
    Ok(text)
}
