//! `tinylag completions SHELL` and `tinylag manpage DIR`: shell completion scripts and man
//! pages generated from the clap definitions, so they list exactly the commands and flags
//! the binary takes.
//!
//! Must never: write anywhere but stdout (completions) or the directory it is given (man pages).

use std::path::PathBuf;

use anyhow::Context;
use clap::Command;

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
    clap_mangen::generate_to(root, &args.dir)
        .with_context(|| format!("cannot write the man pages into {}", args.dir.display()))?;
    println!("man pages written to {}", args.dir.display());
    Ok(())
}
