//! `tinylag status`: asks a running daemon (the primary, or a replay agent: its answer's
//! `role` says which) for its status over the control socket and prints it (text for people,
//! `--json` for scripts).

use std::path::PathBuf;

use clap::Args;
use tinylag::control::{self, Request};
use tinylag::replayer::status::{render_text, ReplicaStatus};
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
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let path = match (args.control, args.primary) {
        (Some(control), _) => control,
        (None, Some(primary)) => default_control_path(&primary),
        (None, None) => anyhow::bail!("give --control PATH or --primary PATH"),
    };
    let request = Request {
        cmd: "status".into(),
        args: serde_json::Value::Null,
    };
    let answer = control::request(&path, &request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    if answer["role"] == "replica" {
        let status: ReplicaStatus = serde_json::from_value(answer).map_err(|e| {
            anyhow::anyhow!(
                "the replay agent at {} answered a status this tinylag cannot read ({e}); try --json",
                path.display()
            )
        })?;
        print!("{}", render_text(&status));
        return Ok(());
    }
    let lease = answer.get("lease").cloned();
    let status: StatusSnapshot = serde_json::from_value(answer).map_err(|e| {
        anyhow::anyhow!(
            "the daemon at {} answered a status this tinylag cannot read ({e}); try --json",
            path.display()
        )
    })?;
    print!("{}", status.render_text());
    if let Some(l) = lease {
        println!(
            "{:<16}{}: epoch {} held by {} pid {} since {}, renewed {} (every {:.0}s of a \
             {:.0}s term, {} renewals, {} errors), expires in {:.1}s",
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
        );
    }
    Ok(())
}
