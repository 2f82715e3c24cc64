//! `tinylag init`: creates a journal's manifest (one device, or a consistency group of
//! several with `--device`), and sparse primary files if asked.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use tinylag::block::file::{self, FileOptions};
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::{valid_device_name, DeviceSpec, Manifest, ManifestParams};
use tinylag::units::format_size;

use crate::cmd::args::{parse_size, JournalArgs};

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Device size, e.g. 4G, 512MiB.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, allow_hyphen_values = true, required_unless_present = "devices", conflicts_with = "devices")]
    pub size: Option<u64>,
    /// A device of a consistency group (repeat for each, in order): name, size and optionally
    /// a sparse primary file to create. All devices of a group share one journal and one
    /// order of writes.
    #[arg(long = "device", value_name = "NAME=SIZE[:PRIMARY]", value_parser = parse_device, conflicts_with_all = ["name", "primary"])]
    pub devices: Vec<DeviceArg>,
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

/// One `--device NAME=SIZE[:PRIMARY]`.
#[derive(Clone, Debug)]
pub struct DeviceArg {
    pub spec: DeviceSpec,
    pub primary: Option<PathBuf>,
}

fn parse_device(s: &str) -> Result<DeviceArg, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: use NAME=SIZE or NAME=SIZE:PRIMARY"))?;
    if !valid_device_name(name) {
        return Err(format!(
            "invalid device name {name:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)"
        ));
    }
    let (size, primary) = match rest.split_once(':') {
        Some((size, path)) if !path.is_empty() => (size, Some(PathBuf::from(path))),
        Some(_) => return Err(format!("{s:?}: no path after the ':'")),
        None => (rest, None),
    };
    Ok(DeviceArg {
        spec: DeviceSpec {
            name: name.to_string(),
            size: parse_size(size)?,
        },
        primary,
    })
}

/// Whether a primary must be created at `path` (`false`: it exists with exactly `size`
/// bytes). Checked before anything is written, so a refusal changes nothing.
fn check_primary(path: &Path, size: u64, block_size: u32, flag: &str) -> anyhow::Result<bool> {
    if path.exists() {
        let mut options = FileOptions::new(block_size);
        options.read_only = true;
        let found = file::open(path, options)
            .map(|d| d.info().size)
            .with_context(|| flag.to_string())?;
        if found != size {
            bail!(
                "{flag} {} exists with {found} bytes, not the device's {size} bytes",
                path.display(),
            );
        }
        return Ok(false);
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{flag} {}: the directory {} does not exist",
            path.display(),
            parent.display()
        );
    }
    Ok(true)
}

pub async fn run(args: InitArgs) -> anyhow::Result<()> {
    let params = ManifestParams {
        device_name: args.name.clone(),
        size: args.size.unwrap_or(0),
        block_size: u32::try_from(args.block_size).unwrap_or(0),
        region_size: args.region_size,
        splay_width: args.splay,
        segment_size: args.segment_size,
    };
    let (mut manifest, primaries) = if args.devices.is_empty() {
        let manifest = Manifest::new(&params, SystemClock.now_ns())?;
        let primaries: Vec<(PathBuf, u64, String)> = args
            .primary
            .iter()
            .map(|p| (p.clone(), params.size, "--primary".to_string()))
            .collect();
        (manifest, primaries)
    } else {
        let specs = args.devices.iter().map(|d| d.spec.clone()).collect();
        let manifest = Manifest::new_group(&params, specs, SystemClock.now_ns())?;
        let primaries = args
            .devices
            .iter()
            .filter_map(|d| {
                d.primary
                    .clone()
                    .map(|p| (p, d.spec.size, format!("--device {}", d.spec.name)))
            })
            .collect();
        (manifest, primaries)
    };
    // Check every primary before writing anything, so a refusal changes nothing.
    let mut create = Vec::new();
    for (i, (path, size, flag)) in primaries.iter().enumerate() {
        if primaries[..i].iter().any(|(other, ..)| other == path) {
            bail!("{flag}: {} is the primary of two devices", path.display());
        }
        if check_primary(path, *size, manifest.block_size, flag)? {
            create.push((path.clone(), *size, flag.clone()));
        }
    }
    manifest.encrypt_if_keyed();
    let store = args.journal.open_for_command().await?;
    manifest.create(store.as_ref()).await?;
    for (path, size, flag) in &create {
        file::create_sparse(path, *size).with_context(|| flag.clone())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        let devices = manifest
            .devices
            .iter()
            .map(|d| format!("{} of {}", d.name, format_size(d.size)))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "initialized journal {} (uuid {}): {} {devices}, block {} B, region {}, splay {}, segments of {}",
            store.describe(),
            manifest.uuid,
            if manifest.devices.len() > 1 { "devices" } else { "device" },
            manifest.block_size,
            format_size(manifest.region_size),
            manifest.splay_width,
            format_size(manifest.segment_size),
        );
        for (path, ..) in &create {
            println!("created sparse primary {}", path.display());
        }
    }
    Ok(())
}
