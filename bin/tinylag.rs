//! The one tinylag command line: parses arguments and wires the library's parts together.
//!
//! Must never: print credentials, or change anything on disk or in a store when an argument
//! is invalid (every value is parsed and checked before the first write).
//!
//! Exit codes: 0 success; 2 bad arguments (clap's value parsers and `args::usage` errors,
//! printed as `error: …`); 1 any other failure, printed once as `tinylag: error: …` with
//! each cause once (see `output::error_text`).

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

// The subcommands live in bin/tinylag/, one file each, declared in bin/tinylag/mod.rs.
#[path = "tinylag/mod.rs"]
mod cmd;

use cmd::args::{UsageError, GLOBAL_OPTIONS};
use cmd::output::{error_text, ColorChoice, LogFormat};
use cmd::{
    config, control_cmd, diff, init, journal_cmd, key_cmd, objrep, promote, rejoin, replay, serve,
    shell_docs, status, timetravel, trim, up,
};

/// Asynchronous block-device replication through a journal in object storage,
/// with delayed replicas and time travel.
#[derive(Debug, Parser)]
#[command(name = "tinylag", version, about, propagate_version = true)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter like tinylag=debug)
    /// [default: $RUST_LOG, else info]. The AWS SDK's own chatter (e.g. "no IMDS here") is
    /// kept at error unless named.
    #[arg(
        long,
        global = true,
        env = "TINYLAG_LOG",
        value_name = "FILTER",
        help_heading = GLOBAL_OPTIONS
    )]
    log: Option<String>,
    /// Log lines as text, or as one JSON object per line on stderr (with json, banners,
    /// reports and the final error are JSON objects too, so a daemon writes JSON lines only).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        value_name = "text|json",
        hide_possible_values = true,
        help_heading = GLOBAL_OPTIONS
    )]
    log_format: LogFormat,
    /// Colours in log lines.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        value_name = "auto|always|never",
        help_heading = GLOBAL_OPTIONS
    )]
    color: ColorChoice,
    /// Key file (or keyring: one key a line, the last one writes) for an encrypted journal
    /// and undo log; `tinylag key generate` makes one. File only, mode 0600.
    #[arg(long, global = true, value_name = "FILE", help_heading = GLOBAL_OPTIONS)]
    encryption_key: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched at once: the size of the largest arguments is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new journal (and, if asked, a sparse primary file).
    Init(init::InitArgs),
    /// Look at a journal.
    #[command(subcommand)]
    Journal(journal_cmd::JournalCommand),
    /// Record a named point in the journal through a running `serve` (restore can target it).
    Mark(control_cmd::MarkArgs),
    /// Follow a journal onto a replica (a replay agent), optionally with a delay.
    Replay(Box<replay::ReplayArgs>),
    /// Bring an old primary back as a replica of the new chain, moving only what diverged.
    Rejoin(Box<rejoin::RejoinArgs>),
    /// Serve the primary over NBD and journal every acknowledged change (the primary daemon).
    Serve(serve::ServeArgs),
    /// Re-journal regions of the primary as a resync span through a running `serve`.
    Resync(control_cmd::ResyncArgs),
    /// End a running `serve`'s epoch for a planned failover: writes refused, everything
    /// durable, a DEMOTE record last, the lease released.
    Demote(control_cmd::DemoteArgs),
    /// Make a replica the primary: catch it up, claim the next epoch and serve it (as
    /// `serve` does, with its flags); --force when the old primary is gone.
    #[command(mut_arg("primary", |a| a.long("replica").help(
        "The replica to promote: it becomes the primary (serve's --primary)"
    )))]
    // promote refuses these two (it fences only with --force, and always journals).
    #[command(mut_arg("takeover", |a| a.hide(true)), mut_arg("no_journal", |a| a.hide(true)))]
    Promote(Box<promote::PromoteArgs>),
    /// Have a running `serve` journal a checksum of regions in order; each replay agent
    /// compares its replica when it applies them and reports mismatches.
    Verify(control_cmd::VerifyArgs),
    /// Write the disk as of a time or mark into a new image file (time travel).
    Restore(Box<timetravel::RestoreArgs>),
    /// Show the restorable window, its holes, the marks and where the replica stands.
    Timeline(Box<timetravel::TimelineArgs>),
    /// Serve the disk as of a time or mark over NBD at once, without a full copy.
    Mount(Box<timetravel::MountArgs>),
    /// List the byte ranges changed between two times or marks (segment indexes only).
    Diff(Box<diff::DiffArgs>),
    /// Write the change between two times or marks as Ceph's rbd diff v1 stream.
    ExportDiff(Box<diff::ExportDiffArgs>),
    /// Apply an rbd diff v1 stream to a raw image (checked whole first).
    ImportDiff(Box<diff::ImportDiffArgs>),
    /// Look after an undo log.
    #[command(subcommand)]
    Undo(trim::UndoCommand),
    /// Look after an object replica: compact its layers into images, trim what no retained
    /// point needs.
    #[command(subcommand)]
    Replica(objrep::ReplicaCommand),
    /// Show a running daemon's mode, pool, LSNs, lag, uploads and dirty regions.
    Status(status::StatusArgs),
    /// Primary, journal and replica in one directory, one process: serve + replay.
    Up(up::UpArgs),
    /// Encryption keys for encryption at rest.
    #[command(subcommand)]
    Key(key_cmd::KeyCommand),
    /// Check a config file (the settings of --config FILE).
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(shell_docs::CompletionsArgs),
    /// Write the man pages (tinylag.1 and one per subcommand) into a directory.
    Manpage(shell_docs::ManpageArgs),
}

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let json = cli.log_format == LogFormat::Json;
    init_logging(cli.log.as_deref(), cli.color.ansi(), json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tinylag: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        if let Some(path) = &cli.encryption_key {
            key_cmd::install(path)?;
        }
        match cli.command {
            Command::Init(a) => init::run(a).await,
            Command::Journal(c) => journal_cmd::run(c).await,
            Command::Mark(a) => control_cmd::mark(a).await,
            Command::Resync(a) => control_cmd::resync(a).await,
            Command::Demote(a) => control_cmd::demote(a).await,
            Command::Promote(a) => promote::run(*a).await,
            Command::Verify(a) => control_cmd::verify(a).await,
            Command::Replay(a) => replay::run(*a).await,
            Command::Rejoin(a) => rejoin::run(*a).await,
            Command::Serve(a) => serve::run(a).await,
            Command::Restore(a) => timetravel::run_restore(*a).await,
            Command::Timeline(a) => timetravel::run_timeline(*a).await,
            Command::Mount(a) => timetravel::run_mount(*a).await,
            Command::Diff(a) => diff::run_diff(*a).await,
            Command::ExportDiff(a) => diff::run_export_diff(*a).await,
            Command::ImportDiff(a) => diff::run_import_diff(*a).await,
            Command::Status(a) => status::run(a).await,
            Command::Undo(trim::UndoCommand::Trim(a)) => trim::undo_trim(a).await,
            Command::Replica(c) => objrep::run_replica(c).await,
            Command::Up(a) => up::run(a).await,
            Command::Key(c) => key_cmd::run(c),
            Command::Config(config::ConfigCommand::Check(a)) => config::check(a, Cli::command()),
            Command::Completions(a) => shell_docs::completions(a, Cli::command()),
            Command::Manpage(a) => shell_docs::manpage(a, Cli::command()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<UsageError>() {
            Some(usage) => {
                eprintln!("error: {usage}\n\nFor more information, try '--help'.");
                ExitCode::from(2)
            }
            None if json => {
                cmd::output::error_line(format!("tinylag: error: {}", error_text(&e)));
                ExitCode::FAILURE
            }
            None => {
                eprintln!("tinylag: error: {}", error_text(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// The command line, with the settings of `--config FILE` added (see `config::merge`); on a
/// bad command line or config file, prints the error and gives the exit code (2).
fn parse_command_line() -> Result<Cli, ExitCode> {
    let merged = match config::merge(&Cli::command(), std::env::args_os().collect()) {
        Ok(merged) => merged,
        Err(e) => {
            eprintln!("error: {e}\n\nFor more information, try '--help'.");
            return Err(ExitCode::from(2));
        }
    };
    match Cli::try_parse_from(&merged.argv) {
        Ok(cli) => Ok(cli),
        Err(e) => {
            let _ = e.print();
            match &merged.from_file {
                Some((file, section, keys)) if e.use_stderr() && !keys.is_empty() => eprintln!(
                    "note: --config {} [{section}] added: {}",
                    file.display(),
                    keys.join(", ")
                ),
                _ => {}
            }
            Err(ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2)))
        }
    }
}

/// Logging on stderr: `--log`, else `RUST_LOG`, else `info`; text or JSON lines.
fn init_logging(filter: Option<&str>, ansi: bool, json: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|f| !f.trim().is_empty());
    let filter = filter.map(str::to_string).or(from_env);
    let filter = filter.as_deref().unwrap_or("info");
    let filter = if filter.contains("aws") {
        filter.to_string()
    } else {
        format!("{filter},aws_config=error,aws_smithy_runtime=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    cmd::output::set_json_logs(json);
    let format = tracing_subscriber::fmt::layer().with_writer(cmd::log_redact::RedactingStderr);
    let format = if json {
        format
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed()
    } else {
        format.with_ansi(ansi).with_target(false).boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(no_credentials))
        .with(format)
        .init();
}

/// The AWS SDK's crates log each request's signing parameters, access key id included, at
/// TRACE (aws-sigv4's "signing request"): their TRACE events are never written, whatever the
/// filter says. Their DEBUG events, and everything else, pass.
fn no_credentials(meta: &tracing::Metadata<'_>) -> bool {
    !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("aws_"))
}
