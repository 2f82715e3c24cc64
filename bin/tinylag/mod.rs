//! The subcommands of `tinylag`, one file each, plus the argument types they share.

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
