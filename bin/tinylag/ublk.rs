//! `serve --frontend ublk`: the flags of the ublk frontend and their checks. The frontend
//! itself is `tinylag::ublk`; this only turns flags into its options.

use clap::{Args, ValueEnum};
use tinylag::ublk::UblkOptions;

use tinylag::nbd::TlsMode;

use crate::cmd::args::{parse_size, usage, TlsArgs};

/// How `serve` hands the primary to its users.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Frontend {
    /// An NBD server (--listen): any client, any kernel, over a socket.
    Nbd,
    /// A local block device /dev/ublkbN through the kernel's ublk driver (Linux >= 6.0).
    Ublk,
}

/// Options of `--frontend ublk`.
#[derive(Debug, Args)]
pub struct UblkArgs {
    /// ublk: hardware queues, one serving thread each [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: Option<u16>,
    /// ublk: requests in flight per queue [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub depth: Option<u16>,
    /// ublk: the largest read or write the kernel sends in one request [default: 512K].
    #[arg(long, value_name = "SIZE", value_parser = parse_io_buf_size)]
    pub io_buf_size: Option<u32>,
    /// ublk: make an unprivileged device (UBLK_F_UNPRIVILEGED_DEV).
    #[arg(long)]
    pub unprivileged: bool,
    /// ublk: keep the device when the daemon dies; a daemon started again with the same
    /// --dev-id re-attaches to it.
    #[arg(long)]
    pub user_recovery: bool,
    /// ublk: serve /dev/ublkbN with this N [default: the kernel picks].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub dev_id: Option<u32>,
}

fn parse_io_buf_size(s: &str) -> Result<u32, String> {
    let size = parse_size(s)?;
    if !(4096..=32 << 20).contains(&size) || size % 4096 != 0 {
        return Err(format!(
            "{s} is not usable: use a multiple of 4K from 4K to 32M (e.g. 512K)"
        ));
    }
    Ok(size as u32)
}

/// Refuses flags of the frontend not chosen: NBD flags (`nbd_flags`: given or not, and the
/// flag's name) with `--frontend ublk`, ublk flags without it; and, for ublk, a kernel without
/// the driver. Runs before anything is opened.
pub fn check_frontend(
    frontend: Frontend,
    ublk: &UblkArgs,
    nbd_flags: &[(bool, &str)],
) -> anyhow::Result<()> {
    match frontend {
        Frontend::Ublk => {
            if let Some((_, flag)) = nbd_flags.iter().find(|(given, _)| *given) {
                return Err(usage(format!(
                    "{flag} is an NBD option; --frontend ublk serves /dev/ublkbN instead"
                )));
            }
            tinylag::ublk::check_driver()?;
        }
        Frontend::Nbd => {
            if let Some(flag) = ublk.given().first() {
                return Err(usage(format!(
                    "{flag} is a ublk option: add --frontend ublk, or leave it out for NBD"
                )));
            }
        }
    }
    Ok(())
}

impl TlsArgs {
    /// The TLS flags given on the command line, for refusing them where there is no NBD.
    pub fn given(&self) -> [(bool, &'static str); 4] {
        [
            (self.tls != TlsMode::Off, "--tls"),
            (self.tls_certificates.is_some(), "--tls-certificates"),
            (self.tls_verify_peer, "--tls-verify-peer"),
            (self.insecure_no_tls, "--insecure-no-tls"),
        ]
    }
}

impl UblkArgs {
    /// The ublk flags given, for refusing them with `--frontend nbd`.
    pub fn given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        if self.queues.is_some() {
            given.push("--queues");
        }
        if self.depth.is_some() {
            given.push("--depth");
        }
        if self.io_buf_size.is_some() {
            given.push("--io-buf-size");
        }
        if self.unprivileged {
            given.push("--unprivileged");
        }
        if self.user_recovery {
            given.push("--user-recovery");
        }
        if self.dev_id.is_some() {
            given.push("--dev-id");
        }
        given
    }

    /// The frontend's options for a journal of `region_size`.
    pub fn options(&self, region_size: u64) -> UblkOptions {
        let d = UblkOptions::default();
        UblkOptions {
            queues: self.queues.unwrap_or(d.queues),
            depth: self.depth.unwrap_or(d.depth),
            io_buf_size: self.io_buf_size.unwrap_or(d.io_buf_size),
            unprivileged: self.unprivileged,
            user_recovery: self.user_recovery,
            dev_id: self.dev_id,
            region_size,
        }
    }
}
