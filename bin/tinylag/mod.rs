//! The subcommands of `tinylag`, one file each, plus the argument types they share.
//!
//! Conventions every subcommand follows:
//!
//! - **Bad flag values** are rejected by clap value parsers from `args.rs` (`value_parser =
//!   parse_size`, `parse_duration`, `parse_max_lag`, `parse_listen`, …, returning
//!   `Result<T, String>`): clap prints `error: invalid value 'V' for '--flag <FORM>': …` and
//!   exits 2 before anything is opened. Size and duration flags take
//!   `allow_hyphen_values = true` so `-1` reaches the parser. A rule over several flags that
//!   clap cannot express returns `args::usage(…)` from `run`: the same form, exit 2.
//! - **Runtime errors** are `anyhow`/`thiserror` errors that bubble up to `main`, which prints
//!   one line `tinylag: error: …` (`output::error_text`: each cause once) and exits 1. Add
//!   context that names the flag (`--primary`), not text that repeats the source.
//! - **Hints printed to the user** (`up`'s banner, `replay`'s status hint) name the running
//!   binary (`output::self_command`), so they work as printed after `cargo run`.
//! - **Config files** (`config.rs`): `--config FILE` is read before clap parses; each key is
//!   looked up among the subcommand's own long flags in the clap definition and run through
//!   the flag's own value parser, so a new flag is a new key with no second list to update.
//!   Keys that look like credentials are refused by name; every problem of a file is
//!   reported at once, each at `FILE:LINE`.
//! - **Help and man pages**: a flag's placeholder names its kind (`DURATION`, `SIZE`, `PATH`,
//!   …); flags every command takes are `global` ("Global options"), the S3 flags under "S3
//!   options". `shell_docs.rs` renders man pages and completions from the same definitions;
//!   `doc_examples.rs` (tests only) parses every `tinylag` command line of the README and the
//!   man pages' examples.
//! - **Logs** (`output.rs`, `log_redact.rs`): every event goes through
//!   `log_redact::RedactingStderr`, which blanks the access key id the AWS SDK's debug text
//!   carries, and the SDK's TRACE events are never written. Banners, reports and warnings go
//!   through `output::tell` / `say` / `warn`: plain text, or one JSON object per line.
//! - **systemd** (`systemd.rs`): `serve` sends `READY=1` once its NBD listener accepts and its
//!   control socket answers, `replay` once its agent runs; both send `STOPPING=1` on
//!   SIGTERM, and catch SIGTERM/SIGINT before their sockets answer, so a stop during start
//!   is a clean stop.
//! - The texts are snapshot-tested: `tests/cmd/*.trycmd` for `--help` and every error
//!   message, `tests/cli_texts.rs` for the `up` banner; `tests/readme_commands.rs` fails when
//!   README's command table misses a subcommand or a flag.

pub mod args;
pub mod config;
pub mod control_cmd;
pub mod diff;
#[cfg(test)]
mod doc_examples;
pub mod freeze;
pub mod init;
pub mod journal_cmd;
pub mod key_cmd;
pub mod log_redact;
pub mod metrics;
pub mod objrep;
pub mod output;
pub mod promote;
pub mod promote_at;
pub mod promote_obj;
pub mod rejoin;
pub mod replay;
pub mod serve;
pub mod shell_docs;
pub mod status;
pub mod systemd;
pub mod timetravel;
pub mod trim;
pub mod ublk;
pub mod up;
