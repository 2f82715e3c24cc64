//! `tinylag key generate` and the global `--encryption-key FILE` (encryption at rest,
//! DESIGN.md "Encryption at rest").
//!
//! Must never: print or log a key's bytes (only its id); overwrite a key file; take a key
//! from the command line or the environment (file only: a command line is visible in `ps`).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use tinylag::crypto::{self, generate_key_file, Keyring};

/// Encryption keys.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random encryption key to a file (mode 0600; an existing file is refused).
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The key file to create.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Add the new key to an existing keyring as its newest (rotation: new objects use it,
    /// old ones keep the key their header names).
    #[arg(long)]
    pub append: bool,
}

pub fn run(cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::Generate(a) => {
            let id = generate_key_file(&a.output, a.append)?;
            println!("key {id} written to {}", a.output.display());
            Ok(())
        }
    }
}

/// Loads `--encryption-key FILE` and installs it as the process keyring (before any store is
/// touched); returns the ids it holds, for one log line.
pub fn install(path: &Path) -> anyhow::Result<()> {
    let ring = Keyring::load(path)?;
    crypto::install(&ring);
    let ids: Vec<String> = ring.keys().iter().map(|k| k.id().to_string()).collect();
    tracing::debug!(keys = %ids.join(","), newest = %ring.newest().id(), "encryption keyring loaded");
    Ok(())
}
