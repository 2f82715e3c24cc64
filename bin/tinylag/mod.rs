//! The subcommands of `tinylag`, one file each, plus the argument types they share.

pub mod args;
pub mod init;
pub mod journal_cmd;
pub mod replay;
pub mod serve;
pub mod status;
pub mod ublk;
pub mod up;
