//! `tinylag init`: creates a journal's manifest, and a sparse primary file if asked.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use tinylag::block::file::{FileDevice, FileOptions};
use tinylag::block::BlockDevice;
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::manifest::{Manifest, ManifestParams};
use tinylag::units::format_size;

use crate::cmd::args::{parse_size, JournalArgs};

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Device size, e.g. 4G, 512MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true)]
    pub size: u64,
    /// Logical block size: 512 or 4096.
    #[arg(long, value_name = "SIZE", default_value = "4096", value_parser = parse_size, allow_hyphen_values = true)]
    pub block_size: u64,
    /// Dirty-tracking region size (a power of two).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_size, allow_hyphen_values = true)]
    pub region_size: u64,
    /// Splay width W: segment uploads in flight, and stripes of the journal.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub splay: u32,
    /// Target segment size.
    #[arg(long, value_name = "SIZE", default_value = "8M", value_parser = parse_size, allow_hyphen_values = true)]
    pub segment_size: u64,
    /// Device name (the NBD export name).
    #[arg(long, default_value = "disk0")]
    pub name: String,
    /// Create a sparse primary file of --size here if it does not exist (an existing one must
    /// have exactly that size).
    #[arg(long, value_name = "PATH")]
    pub primary: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: InitArgs) -> anyhow::Result<()> {
    let params = ManifestParams {
        device_name: args.name.clone(),
        size: args.size,
        block_size: u32::try_from(args.block_size).unwrap_or(0),
        region_size: args.region_size,
        splay_width: args.splay,
        segment_size: args.segment_size,
    };
    let manifest = Manifest::new(&params, SystemClock.now_ns())?;
    // Check the primary before writing anything, so a refusal changes nothing.
    let create_primary = match &args.primary {
        Some(path) if path.exists() => {
            let mut options = FileOptions::new(manifest.block_size);
            options.read_only = true;
            let size = FileDevice::open(path, options)
                .map(|d| d.info().size)
                .context("--primary")?;
            if size != args.size {
                bail!(
                    "--primary {} exists with {} bytes, not the --size {} bytes",
                    path.display(),
                    size,
                    args.size
                );
            }
            false
        }
        Some(path) => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => std::path::Path::new("."),
            };
            if !parent.is_dir() {
                bail!(
                    "--primary {}: the directory {} does not exist",
                    path.display(),
                    parent.display()
                );
            }
            true
        }
        None => false,
    };
    let store = args.journal.open_for_command().await?;
    manifest.create(store.as_ref()).await?;
    if let (true, Some(path)) = (create_primary, &args.primary) {
        FileDevice::create_sparse(path, args.size).context("--primary")?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!(
            "initialized journal {} (uuid {}): device {} of {}, block {} B, region {}, splay {}, segments of {}",
            store.describe(),
            manifest.uuid,
            args.name,
            format_size(args.size),
            manifest.block_size,
            format_size(manifest.region_size),
            manifest.splay_width,
            format_size(manifest.segment_size),
        );
        if let (true, Some(path)) = (create_primary, &args.primary) {
            println!("created sparse primary {}", path.display());
        }
    }
    Ok(())
}
