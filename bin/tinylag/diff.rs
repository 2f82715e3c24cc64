//! `tinylag diff`, `tinylag export-diff` and `tinylag import-diff`: what changed between two
//! points, from segment indexes alone; that change set as Ceph's "rbd diff v1" stream; and
//! such a stream applied to a raw image (the work is in `tinylag::timetravel::{diff,
//! rbd_diff}`).

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;
use tinylag::block::BlockDevice;
use tinylag::clock::{Clock, SystemClock};
use tinylag::journal::chain;
use tinylag::journal::JournalReader;
use tinylag::journal::Manifest;
use tinylag::replayer::{ReplicaFile, ReplicaTarget};
use tinylag::store::CountingStore;
use tinylag::store::ObjectStore;
use tinylag::timetravel::rbd_diff::{self, DataRecord, Header, MAX_WRITE};
use tinylag::timetravel::TimeView;
use tinylag::timetravel::{changed_extents, ChangedExtent, Diff, LiveRange};
use tinylag::timetravel::{Point, Target};

use crate::cmd::args::{usage, JournalArgs};
use crate::cmd::timetravel::ReplicaArgs;

/// `--from`/`--to`: a time (RFC 3339, @unix, "10m ago", now) or a mark's name.
pub fn parse_point(s: &str) -> Result<Target, String> {
    if s.trim() == "now" {
        return Ok(Target::Time(SystemClock.now_ns()));
    }
    match tinylag::clock::parse_time(s, &SystemClock) {
        Ok(t) => Ok(Target::Time(t)),
        Err(time_err) => match tinylag::journal::mark::validate_name(s) {
            Ok(()) => Ok(Target::Mark(s.to_string())),
            Err(_) => Err(format!("{time_err}, now, or a mark's name")),
        },
    }
}

/// The two points of a diff.
#[derive(Debug, Args)]
pub struct IntervalArgs {
    /// The older point: a time (RFC 3339, @unix, "10m ago") or a mark's name.
    #[arg(long, value_name = "TIME|MARK", value_parser = parse_point)]
    pub from: Target,
    /// The newer point: a time, "now" or a mark's name.
    #[arg(long, value_name = "TIME|MARK", value_parser = parse_point)]
    pub to: Target,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    #[command(flatten)]
    pub interval: IntervalArgs,
    /// Print JSON: the points, one object per extent, and what was read.
    #[arg(long)]
    pub json: bool,
}

/// What `diff --json` prints.
#[derive(Serialize)]
struct DiffOutput<'a> {
    from: Point,
    to: Point,
    extents: &'a [ChangedExtent],
    changed_bytes: u64,
    resync_bytes: u64,
    records: u64,
    segments: std::ops::Range<u64>,
    /// Segment indexes read (never a payload).
    index_reads: u64,
    /// Every request made to the journal's store, and the bytes they returned.
    store_requests: u64,
    bytes_read: u64,
    /// What reading the interval's segments whole would have cost.
    segment_bytes: u64,
}

/// The journal (counted), its reader and the lineage of the current chain.
async fn open_journal(
    args: &JournalArgs,
) -> anyhow::Result<(Arc<CountingStore>, JournalReader, chain::Lineage)> {
    let store = Arc::new(CountingStore::new(args.open_for_command().await?));
    let dynstore: Arc<dyn ObjectStore> = store.clone();
    let manifest = Manifest::load(dynstore.as_ref()).await?;
    manifest.check_key_for_reading(&dynstore.describe())?;
    let lineage = chain::load(dynstore.as_ref()).await?.lineage();
    Ok((store, JournalReader::new(dynstore, manifest), lineage))
}

/// Resolves both points inside the live range and computes the diff.
async fn compute(
    reader: &JournalReader,
    lineage: &chain::Lineage,
    interval: &IntervalArgs,
) -> anyhow::Result<Diff> {
    let live = LiveRange::open(reader).await?;
    let now = SystemClock.now_ns();
    let from = live
        .resolve(reader, lineage, "--from", &interval.from, now)
        .await?;
    let to = live
        .resolve(reader, lineage, "--to", &interval.to, now)
        .await?;
    Ok(changed_extents(reader, lineage, &live, from, to).await?)
}

pub async fn run_diff(args: DiffArgs) -> anyhow::Result<()> {
    let (store, reader, lineage) = open_journal(&args.journal).await?;
    let diff = compute(&reader, &lineage, &args.interval).await?;
    let requests = store.counts().total();
    let resync_bytes: u64 = diff
        .extents
        .iter()
        .filter(|e| e.resync)
        .map(|e| e.length)
        .sum();
    if args.json {
        let out = DiffOutput {
            from: diff.from,
            to: diff.to,
            extents: &diff.extents,
            changed_bytes: diff.changed_bytes(),
            resync_bytes,
            records: diff.records,
            segments: diff.segments.clone(),
            index_reads: diff.objects_read,
            store_requests: requests,
            bytes_read: store.bytes_read(),
            segment_bytes: diff.segment_bytes,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "# changed between {} and {}",
        diff.from.describe(),
        diff.to.describe()
    );
    println!("# dev offset length [resync]");
    let mut out = BufWriter::new(std::io::stdout().lock());
    for e in &diff.extents {
        writeln!(
            out,
            "{} {} {}{}",
            e.dev,
            e.offset,
            e.length,
            if e.resync { " resync" } else { "" }
        )?;
    }
    out.flush()?;
    drop(out);
    println!(
        "# {} extents, {} bytes changed ({} in resync spans); {} records in segments {}..{}; read {} segment indexes ({} store requests, {} bytes), no payload (the segments hold {} bytes)",
        diff.extents.len(),
        diff.changed_bytes(),
        resync_bytes,
        diff.records,
        diff.segments.start,
        diff.segments.end,
        diff.objects_read,
        requests,
        store.bytes_read(),
        diff.segment_bytes
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct ExportDiffArgs {
    #[command(flatten)]
    pub replica: ReplicaArgs,
    #[command(flatten)]
    pub interval: IntervalArgs,
    /// Where to write the stream: a new file, or - for standard output.
    #[arg(long, value_name = "FILE|-")]
    pub output: PathBuf,
}

/// `<output>.partial`, removed on drop unless renamed into place by [`PartialFile::finish`].
struct PartialFile(Option<(PathBuf, File)>);

impl PartialFile {
    fn new(output: &Path, to_stdout: bool) -> anyhow::Result<PartialFile> {
        if to_stdout {
            return Ok(PartialFile(None));
        }
        let mut name = output.as_os_str().to_owned();
        name.push(".partial");
        let path = PathBuf::from(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(PartialFile(Some((path, file))))
    }

    fn finish(mut self, output: &Path) -> anyhow::Result<()> {
        if let Some((path, file)) = self.0.take() {
            let done = file
                .sync_all()
                .and_then(|()| std::fs::hard_link(&path, output));
            let _ = std::fs::remove_file(&path);
            done.with_context(|| format!("cannot write --output {}", output.display()))?;
        }
        Ok(())
    }
}

impl Drop for PartialFile {
    fn drop(&mut self) {
        if let Some((path, _)) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Zero runs are found per block of this many bytes (aligned on the device).
const ZERO_BLOCK: u64 = 4096;

pub async fn run_export_diff(args: ExportDiffArgs) -> anyhow::Result<()> {
    let to_stdout = args.output.as_os_str() == "-";
    if !to_stdout && args.output.exists() {
        return Err(usage(format!(
            "--output {} exists; export-diff writes a new file only",
            args.output.display()
        )));
    }
    let sources = args.replica.open().await?;
    let reader = sources.reader.clone();
    let lineage = sources.lineage.clone();
    let size = sources.size;
    let diff = compute(&reader, &lineage, &args.interval).await?;
    if let Some(e) = diff.extents.iter().find(|e| e.dev != 0) {
        bail!(
            "the interval holds records of device {}; export-diff exports device 0 only",
            e.dev
        );
    }
    if diff.to.lsn < diff.from.lsn {
        return Err(usage(
            "--to is before --from; export-diff writes the change from --from to --to",
        ));
    }
    // The data as of --to, read through the same sources `restore` and `mount` use.
    let view = TimeView::open(sources, diff.to, None).await?;
    let name = |t: &Target| match t {
        Target::Mark(m) => Some(m.clone()),
        _ => None,
    };
    let header = Header {
        from: name(&args.interval.from),
        to: name(&args.interval.to),
        size,
    };
    // A file is written under a temporary name beside it and renamed when whole, so a failed
    // export leaves nothing that looks like a stream.
    let partial = PartialFile::new(&args.output, to_stdout)?;
    let out: Box<dyn Write> = match &partial.0 {
        Some((_, f)) => Box::new(BufWriter::with_capacity(1 << 20, f.try_clone()?)),
        None => Box::new(BufWriter::with_capacity(1 << 20, std::io::stdout().lock())),
    };
    let mut w = rbd_diff::Writer::start(out, &header)?;
    let (mut wbytes, mut zbytes) = (0u64, 0u64);
    for e in &diff.extents {
        let mut at = e.offset;
        while at < e.end() {
            let len = (e.end() - at).min(MAX_WRITE);
            let data = view.read(at, len as u32).await.with_context(|| {
                format!(
                    "cannot read {len} bytes at {at} as of {}",
                    diff.to.describe()
                )
            })?;
            for (offset, run, zero) in rbd_diff::zero_runs(at, &data, ZERO_BLOCK) {
                if zero {
                    w.zero(offset, run)?;
                    zbytes += run;
                } else {
                    let from = (offset - at) as usize;
                    w.write(offset, &data[from..from + run as usize])?;
                    wbytes += run;
                }
            }
            at += len;
        }
    }
    let written = w.written + 1;
    w.finish()?;
    partial.finish(&args.output)?;
    let line = format!(
        "export-diff: {} to {}: {} bytes of data ('w'), {} bytes of zeroes ('z') in {} extents; {} bytes written{}",
        diff.from.describe(),
        diff.to.describe(),
        wbytes,
        zbytes,
        diff.extents.len(),
        written,
        match (&header.from, &header.to) {
            (Some(f), Some(t)) => format!("; snapshots {f} -> {t}"),
            (Some(f), None) => format!("; from snapshot {f}"),
            (None, Some(t)) => format!("; to snapshot {t}"),
            (None, None) => String::new(),
        }
    );
    // Standard output may be the stream itself.
    eprintln!("{line}");
    Ok(())
}

#[derive(Debug, Args)]
pub struct ImportDiffArgs {
    /// The rbd diff v1 stream (a file: it is checked whole before the image is touched).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// The raw image to apply it to (a file or block device).
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// The snapshot the image holds now, when no earlier import-diff recorded it (a stream
    /// with a from-snapshot is refused unless it matches).
    #[arg(long, value_name = "NAME")]
    pub base: Option<String>,
}

/// `<image>.rbd-snap`: the snapshot an image holds, as the last import-diff left it.
fn snap_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".rbd-snap");
    PathBuf::from(s)
}

pub async fn run_import_diff(args: ImportDiffArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || import_diff(&args)).await?
}

fn import_diff(args: &ImportDiffArgs) -> anyhow::Result<()> {
    let mut input =
        File::open(&args.file).with_context(|| format!("cannot open {}", args.file.display()))?;
    let parsed = rbd_diff::parse(&mut input)
        .with_context(|| format!("{} is refused, the image is unchanged", args.file.display()))?;
    let snap = snap_path(&args.image);
    let recorded = match std::fs::read_to_string(&snap) {
        Ok(s) => Some(s.trim_end().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", snap.display())),
    };
    let current = args.base.clone().or(recorded.clone());
    if let Some(from) = &parsed.header.from {
        match &current {
            Some(c) if c == from => {}
            Some(c) => bail!(
                "{} starts from snapshot {from}, but {} holds {c}{}; the image is unchanged",
                args.file.display(),
                args.image.display(),
                if args.base.is_some() { " (--base)" } else { " (as the last import-diff recorded)" }
            ),
            None => bail!(
                "{} starts from snapshot {from}, and nothing says {} holds it; give --base {from} if it does (the image is unchanged)",
                args.file.display(),
                args.image.display()
            ),
        }
    }
    let meta = std::fs::metadata(&args.image)
        .with_context(|| format!("cannot open --image {}", args.image.display()))?;
    let size = parsed.header.size;
    if !meta.is_file() {
        let device = File::open(&args.image)
            .with_context(|| format!("cannot open --image {}", args.image.display()))?;
        let found = (&device).seek(SeekFrom::End(0))?;
        if found < size {
            bail!(
                "the stream's image size is {size} bytes and {} (a device) has {found}; the image is unchanged",
                args.image.display()
            );
        }
    }
    // From here the image changes: the name it held no longer holds until the end.
    match std::fs::remove_file(&snap) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", snap.display()))
        }
        _ => {}
    }
    let total = parsed.records.len();
    let mut apply = || -> anyhow::Result<()> {
        // `s` is the size at the end: a file grows or shrinks to it first, as rbd resizes.
        if meta.is_file() && meta.len() != size {
            // Refused before the resize when someone holds the image (its lock).
            drop(ReplicaFile::open(&args.image, meta.len())?);
            File::options()
                .write(true)
                .open(&args.image)?
                .set_len(size)?;
        }
        // Locked exclusively: a replay agent's replica is refused.
        let target = ReplicaFile::open(&args.image, size)?;
        let mut buf = Vec::new();
        for r in &parsed.records {
            match *r {
                DataRecord::Write {
                    offset,
                    len,
                    data_pos,
                } => {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(MAX_WRITE);
                        buf.resize(n as usize, 0);
                        input.seek(SeekFrom::Start(data_pos + done))?;
                        input.read_exact(&mut buf)?;
                        target.write_at(offset + done, &buf)?;
                        done += n;
                    }
                }
                DataRecord::Zero { offset, len } => target.zero_range(offset, len)?,
            }
        }
        target.sync()?;
        Ok(())
    };
    if let Err(e) = apply() {
        bail!(
            "{} was partly applied to {} and failed: {e:#}; the image is neither the base nor the result (its snapshot name is removed); apply the whole chain again from a good base",
            args.file.display(),
            args.image.display()
        );
    }
    if let Some(to) = &parsed.header.to {
        std::fs::write(&snap, format!("{to}\n"))
            .with_context(|| format!("cannot write {}", snap.display()))?;
    }
    let (w, z) = parsed.totals();
    println!(
        "import-diff: applied {total} records to {} ({w} bytes written, {z} bytes zeroed, size {size}){}",
        args.image.display(),
        match &parsed.header.to {
            Some(t) => format!("; it now holds snapshot {t} ({})", snap.display()),
            None => String::new(),
        }
    );
    Ok(())
}
