//! `tinylag completions SHELL` and `tinylag manpage DIR`: shell completion scripts and man
//! pages generated from the clap definitions, so they list exactly the commands and flags
//! the binary takes.
//!
//! The man pages add to clap_mangen's sections EXAMPLES (the command lines of [`EXAMPLES`],
//! checked to parse by a test), EXIT STATUS, ENVIRONMENT (the variables of the command's
//! flags and parts), FILES (the files of its flags) and SEE ALSO (parent and subcommands).
//!
//! Must never: write anywhere but stdout (completions) or the directory it is given (man pages).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Arg, Command};
use clap_mangen::roff::{bold, italic, roman, Roff};

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
pub struct ManpageArgs {
    /// Directory to write tinylag.1 and tinylag-<subcommand>.1 into (created if absent).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

pub fn completions(args: CompletionsArgs, mut root: Command) -> anyhow::Result<()> {
    clap_complete::generate(args.shell, &mut root, "tinylag", &mut std::io::stdout());
    Ok(())
}

pub fn manpage(args: ManpageArgs, root: Command) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut root = root.disable_help_subcommand(true);
    root.build();
    write_pages(&root, &args.dir)
        .with_context(|| format!("cannot write the man pages into {}", args.dir.display()))?;
    println!("man pages written to {}", args.dir.display());
    Ok(())
}

/// Writes the page of `cmd` and of each of its subcommands.
fn write_pages(cmd: &Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir)?;
    }
    let man = clap_mangen::Man::new(cmd.clone());
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join(man.get_filename()))?);
    render_page(cmd, &mut file)?;
    file.flush()
}

/// One man page: clap_mangen's NAME, DESCRIPTION and OPTIONS (required flags marked), our
/// SYNOPSIS (required flags first, with their values), then EXAMPLES, EXIT STATUS,
/// ENVIRONMENT, FILES and SEE ALSO, each from the command's own definition.
fn render_page(cmd: &Command, out: &mut dyn Write) -> std::io::Result<()> {
    let marked = mark_required(cmd.clone());
    let man = clap_mangen::Man::new(marked.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    synopsis(&marked).to_writer(out)?;
    man.render_description_section(out)?;
    if marked.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if marked.has_subcommands() {
        man.render_subcommands_section(out)?;
    }
    let path = command_path(cmd);
    let mut roff = Roff::new();
    let examples: Vec<&Example> = EXAMPLES
        .iter()
        .filter(|e| {
            let rest = e.command.strip_prefix("tinylag").unwrap_or_default();
            let rest = rest.trim_start().strip_prefix(path.as_str()).unwrap_or("-");
            path.is_empty() || rest.is_empty() || rest.starts_with(' ')
        })
        .collect();
    if !examples.is_empty() {
        roff.control("SH", ["EXAMPLES"]);
        for example in examples {
            roff.control("TP", []).text([roman(example.what)]);
            roff.control("nf", [])
                .text([bold(example.command)])
                .control("fi", []);
        }
    }
    roff.control("SH", ["EXIT STATUS"]);
    for (code, what) in EXIT_STATUS {
        roff.control("TP", [])
            .text([bold(code)])
            .text([roman(what)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    for (name, what) in environment(cmd) {
        roff.control("TP", [])
            .text([bold(name)])
            .text([roman(what)]);
    }
    let files = files(cmd);
    if !files.is_empty() {
        roff.control("SH", ["FILES"]);
        for (file, what) in files {
            roff.control("TP", [])
                .text([italic(file)])
                .text([roman(what)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(see_also(cmd, &path).join(", "))]);
    roff.to_writer(out)?;
    man.render_version_section(out)
}

/// `journal trim` for the command `tinylag-journal-trim` (its display name after build).
fn command_path(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or(cmd.get_name())
        .trim_start_matches("tinylag")
        .trim_start_matches('-')
        .replace('-', " ")
}

/// Required flags say so in OPTIONS (clap_mangen shows them like optional ones).
fn mark_required(mut cmd: Command) -> Command {
    let required: Vec<(clap::Id, String)> = cmd
        .get_arguments()
        .filter(|a| a.is_required_set() && !a.is_positional())
        .map(|a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            (a.get_id().clone(), format!("Required. {help}"))
        })
        .collect();
    for (id, help) in required {
        cmd = cmd.mut_arg(id, |a| a.help(help));
    }
    cmd
}

/// `tinylag journal info --journal URI [--json] [OPTIONS]`: required flags with their
/// values first, then the command's own optional flags; global and S3 flags are summed up.
fn synopsis(cmd: &Command) -> Roff {
    let name = cmd.get_bin_name().unwrap_or(cmd.get_name()).to_string();
    let mut line = vec![bold(name), roman(" ")];
    let shown = |a: &&Arg| !a.is_hide_set() && !a.is_positional() && a.get_long().is_some();
    let value = |a: &Arg| {
        a.get_value_names()
            .filter(|_| a.get_action().takes_values())
            .map(|v| format!(" {}", v.join(" ")))
            .unwrap_or_default()
    };
    for arg in cmd
        .get_arguments()
        .filter(shown)
        .filter(|a| a.is_required_set())
    {
        line.push(bold(format!("--{}", arg.get_long().unwrap_or_default())));
        line.push(italic(value(arg)));
        line.push(roman(" "));
    }
    for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        let names = arg
            .get_value_names()
            .map(|v| v.join(" "))
            .unwrap_or_default();
        let (open, close) = if arg.is_required_set() {
            ("", "")
        } else {
            ("[", "]")
        };
        line.extend([roman(open), italic(names), roman(close), roman(" ")]);
    }
    let heading = |a: &Arg| a.get_help_heading().map(str::to_owned);
    for arg in cmd.get_arguments().filter(shown).filter(|a| {
        !a.is_required_set()
            && heading(a).is_none()
            && !matches!(a.get_long(), Some("help" | "version"))
    }) {
        line.push(roman("["));
        line.push(bold(format!("--{}", arg.get_long().unwrap_or_default())));
        line.push(italic(value(arg)));
        line.push(roman("] "));
    }
    let mut headings: Vec<String> = cmd
        .get_arguments()
        .filter(shown)
        .filter_map(heading)
        .collect();
    headings.dedup();
    for h in headings {
        line.push(roman(format!("[{}] ", h.to_uppercase())));
    }
    if cmd.has_subcommands() {
        line.push(italic("COMMAND"));
    }
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]).text(line);
    roff
}

/// A command line the man page of its command shows under EXAMPLES (each one is checked to
/// parse by the tests of bin/tinylag/doc_examples.rs).
pub struct Example {
    pub what: &'static str,
    pub command: &'static str,
}

pub const EXAMPLES: &[Example] = &[
    Example {
        what: "Primary, journal and replica in ./tinylag-data, one process:",
        command: "tinylag up",
    },
    Example {
        what: "Create a journal in S3 for a 4 GiB disk, and the sparse primary file:",
        command: "tinylag init --journal s3://backups/db1 --size 4G --primary /srv/db1.img",
    },
    Example {
        what: "Serve the primary over NBD on a Unix socket, journaling to S3:",
        command: "tinylag serve --primary /srv/db1.img --journal s3://backups/db1 --listen unix:/run/db1.sock",
    },
    Example {
        what: "Run a serve, replay, journal trim or undo trim configured in a file:",
        command: "tinylag serve --config /etc/tinylag/db1.toml",
    },
    Example {
        what: "Follow the journal onto a replica an hour behind:",
        command: "tinylag replay --journal s3://backups/db1 --replica /srv/db1-replica.img --name dr --delay 1h",
    },
    Example {
        what: "Planned failover, on the primary: stop taking writes and end the epoch:",
        command: "tinylag demote --control /srv/db1.img.ctl",
    },
    Example {
        what: "Planned failover, on the replica (its agent stopped): serve it as the primary:",
        command: "tinylag promote --replica /srv/db1-replica.img --journal s3://backups/db1 --name dr --listen unix:/run/db1.sock",
    },
    Example {
        what: "Forced failover: the primary is gone; promote everything durable:",
        command: "tinylag promote --force --replica /srv/db1-replica.img --journal s3://backups/db1 --name dr",
    },
    Example {
        what: "Name the current point of a running serve:",
        command: "tinylag mark before-upgrade --control /srv/db1.img.ctl",
    },
    Example {
        what: "What a running daemon is doing, redrawn every second:",
        command: "tinylag status --control /srv/db1.img.ctl --watch",
    },
    Example {
        what: "The restorable window, its holes and the marks:",
        command: "tinylag timeline --replica /srv/db1-replica.img --journal s3://backups/db1",
    },
    Example {
        what: "The byte ranges written between last night's mark and now (segment indexes only):",
        command: "tinylag diff --journal s3://backups/db1 --from nightly --to now",
    },
    Example {
        what: "The change between two marks as an rbd diff v1 stream (for rbd import-diff):",
        command: "tinylag export-diff --from monday --to tuesday --replica /srv/db1-replica.img --journal s3://backups/db1 --output monday-tuesday.rbddiff",
    },
    Example {
        what: "Apply it to a raw image that holds monday:",
        command: "tinylag import-diff monday-tuesday.rbddiff --image /srv/copy.img --base monday",
    },
    Example {
        what: "The disk as of a mark, into a new file:",
        command: "tinylag restore --mark before-upgrade --output /srv/db1-then.img --replica /srv/db1-replica.img --journal s3://backups/db1",
    },
    Example {
        what: "The disk as of ten minutes ago, served read-only over NBD at once:",
        command: "tinylag mount --at '10m ago' --replica /srv/db1-replica.img --journal s3://backups/db1 --listen unix:/run/db1-then.sock",
    },
    Example {
        what: "Head, live bytes and consumers of a journal on a local S3 server:",
        command: "tinylag journal info --journal s3://backups/db1 --s3-endpoint http://127.0.0.1:9000",
    },
    Example {
        what: "Keep a day of journal, and forget consumers silent for a week:",
        command: "tinylag journal trim --journal s3://backups/db1 --retain 24h --drop-consumer-after 7d",
    },
    Example {
        what: "Keep a week of time travel in a replica's undo log:",
        command: "tinylag undo trim --undo /srv/db1-replica.img.undo --journal s3://backups/db1 --retain 7d",
    },
    Example {
        what: "Check a config file and show the command line each section gives:",
        command: "tinylag config check /etc/tinylag/db1.toml",
    },
];

const EXIT_STATUS: [(&str, &str); 3] = [
    ("0", "Success."),
    (
        "1",
        "A runtime failure (a store, a file, a daemon that cannot be reached), printed once as `tinylag: error: ...`.",
    ),
    (
        "2",
        "Bad arguments or a bad config file (a flag, its value, a rule between flags, a key of --config FILE), printed as `error: ...`; nothing was changed.",
    ),
];

/// The variables `cmd` reads: those its flags name (`TINYLAG_LOG`), and those of the parts
/// it has (logging, colours, S3).
fn environment(cmd: &Command) -> Vec<(String, String)> {
    let has = |long: &str| cmd.get_arguments().any(|a| a.get_long() == Some(long));
    let mut vars: Vec<(String, String)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let var = a.get_env()?.to_string_lossy().into_owned();
            Some((var, format!("Sets --{}.", a.get_long()?)))
        })
        .collect();
    if has("log") {
        vars.push((
            "RUST_LOG".into(),
            "The log filter when neither --log nor TINYLAG_LOG is given.".into(),
        ));
    }
    if has("color") {
        vars.push((
            "NO_COLOR".into(),
            "When set, log lines carry no colours (--color auto).".into(),
        ));
    }
    if has("s3-endpoint") {
        vars.extend([
            ("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN".to_string(), "S3 credentials (the standard AWS chain: then AWS_PROFILE, web identity, ECS and EC2 instance metadata). Never in a config file or on the command line.".to_string()),
            ("AWS_PROFILE".into(), "The profile of ~/.aws/credentials and ~/.aws/config to use.".into()),
            ("AWS_REGION".into(), "The region when --s3-region is not given (else us-east-1).".into()),
            ("AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3".into(), "The S3 endpoint when --s3-endpoint is not given.".into()),
        ]);
    }
    if has("replica") || has("primary") {
        vars.push((
            "TINYLAG_IO_ENGINE".into(),
            "threads: read and write files with pread/pwrite instead of io_uring.".into(),
        ));
    }
    vars
}

/// The files `cmd` reads or creates by default, from the flags it has.
fn files(cmd: &Command) -> Vec<(&'static str, &'static str)> {
    const BY_FLAG: [(&str, &str, &str); 6] = [
        (
            "config",
            "/etc/tinylag/NAME.toml",
            "A config file (--config): one section per command, keys are its long flags.",
        ),
        (
            "config",
            "/etc/tinylag/NAME.env",
            "The environment of the systemd units (S3 credentials; mode 0600).",
        ),
        (
            "activity-log",
            "PRIMARY.tinylag-al",
            "The activity log: the regions to resync after a crash (--activity-log).",
        ),
        (
            "undo",
            "REPLICA.undo/",
            "The replica's undo log (--undo), which restore, mount and timeline read.",
        ),
        (
            "control",
            "PRIMARY.ctl, REPLICA.ctl",
            "A daemon's control socket (--control), which status, mark, verify, resync and demote use.",
        ),
        (
            "dir",
            "./tinylag-data",
            "up's directory: primary.img, journal/, replica.img and their sockets.",
        ),
    ];
    BY_FLAG
        .iter()
        .filter(|(flag, _, _)| cmd.get_arguments().any(|a| a.get_long() == Some(*flag)))
        .map(|(_, file, what)| (*file, *what))
        .collect()
}

/// The parent's page and the subcommands' pages, or, for the top page, every page.
fn see_also(cmd: &Command, path: &str) -> Vec<String> {
    let page = |p: &str| {
        if p.is_empty() {
            "tinylag(1)".to_string()
        } else {
            format!("tinylag-{}(1)", p.replace(' ', "-"))
        }
    };
    let mut pages: Vec<String> = Vec::new();
    if !path.is_empty() {
        let parent = path.rsplit_once(' ').map_or("", |(p, _)| p);
        pages.push(page(parent));
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_path = format!("{path} {}", sub.get_name());
        pages.push(page(sub_path.trim()));
    }
    pages.extend(
        ["systemd.exec(5)".into(), "nbdinfo(1)".into()]
            .into_iter()
            .filter(|_| path.is_empty()),
    );
    pages
}
