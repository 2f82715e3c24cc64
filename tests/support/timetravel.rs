//! Time-travel test helpers: a journal written in phases of known content at controlled
//! times, each ending with a `MARK` record and its `marks/<name>`, with the image expected
//! after every phase kept as a hash (one image in memory at a time).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tinylag::clock::format_ns;
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::Op;

use super::procs;
use super::replay::{file_hash, now_ns, tinylag, TestJournal};

/// One second in nanoseconds.
pub const SEC: u64 = 1_000_000_000;

/// What the disk was after a phase.
#[derive(Clone, Debug)]
pub struct PhaseEnd {
    pub mark: String,
    /// The LSN of the phase's MARK record (its last).
    pub lsn: u64,
    /// The timestamp of every record of the phase (whole seconds).
    pub time_ns: u64,
    /// FNV-1a of the image after the phase.
    pub hash: u64,
}

impl PhaseEnd {
    /// `--at` a time inside the phase's quiet interval (after it, before the next).
    pub fn at(&self) -> String {
        format_ns(self.time_ns + SEC)
    }

    /// `--at` exactly the phase's records' time.
    pub fn at_exactly(&self) -> String {
        format_ns(self.time_ns)
    }
}

/// The expected image, kept in memory and changed like a replica.
pub struct Model {
    pub image: Vec<u8>,
}

impl Model {
    pub fn new(size: u64) -> Model {
        Model {
            image: vec![0; size as usize],
        }
    }

    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                self.image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
            }
            Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                self.image[*offset as usize..(*offset + *len) as usize].fill(0)
            }
            _ => {}
        }
    }

    pub fn hash(&self) -> u64 {
        self.image.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// Appends phase `name`: `segments` segments of `per_segment` random operations, all at
/// `time_ns`, then a MARK record (and `marks/<name>`) at the same time.
pub async fn phase(
    journal: &mut TestJournal,
    model: &mut Model,
    name: &str,
    time_ns: u64,
    segments: usize,
    per_segment: usize,
) -> PhaseEnd {
    for _ in 0..segments {
        let ops: Vec<Op> = (0..per_segment).map(|_| journal.random_op()).collect();
        for op in &ops {
            model.apply(op);
        }
        journal.append_at(ops, time_ns).await;
    }
    let lsns = journal
        .append_at(vec![Op::Mark { name: name.into() }], time_ns)
        .await;
    let point = MarkPoint {
        name: name.into(),
        lsn: lsns.start,
        timestamp_ns: time_ns,
    };
    mark::create(journal.store.as_ref(), &point)
        .await
        .expect("create mark");
    PhaseEnd {
        mark: name.into(),
        lsn: lsns.start,
        time_ns,
        hash: model.hash(),
    }
}

/// Asserts `file` is the image of `phase`.
pub fn assert_phase(file: &Path, phase: &PhaseEnd, what: &str) {
    assert_eq!(
        file_hash(file),
        phase.hash,
        "{what}: {} is not the image of phase {}",
        file.display(),
        phase.mark
    );
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A running `tinylag mount`.
pub struct Mount {
    pub guard: procs::ChildGuard,
    pub socket: PathBuf,
}

impl Mount {
    pub fn start(
        journal: &TestJournal,
        replica: &Path,
        point: &[&str],
        extra: &[&str],
        dir: &Path,
    ) -> Mount {
        let mut args = vec![
            "--journal".to_string(),
            journal.uri().to_string(),
            "--replica".to_string(),
            s(replica),
        ];
        args.extend(point.iter().chain(extra).map(|a| a.to_string()));
        Mount::spawn(&args, dir)
    }

    /// `tinylag mount ARGS --listen unix:<new socket in dir>`, once it listens.
    pub fn spawn(args: &[String], dir: &Path) -> Mount {
        Mount::spawn_env(args, &[], dir)
    }

    /// [`spawn`](Self::spawn) with `env` set for the child (e.g. an S3 server's
    /// credentials and endpoint).
    pub fn spawn_env(args: &[String], env: &[(&'static str, String)], dir: &Path) -> Mount {
        let socket = dir.join(format!("mount-{:x}.sock", now_ns()));
        let mut cmd = tinylag();
        cmd.arg("mount")
            .args(args)
            .args(["--listen", &format!("unix:{}", s(&socket))])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let mut guard =
            procs::ChildGuard::spawn_logged("tinylag mount", &mut cmd, &dir.join("mount.log"))
                .unwrap();
        guard.wait_for_path(&socket, Duration::from_secs(30));
        Mount { guard, socket }
    }

    /// The NBD URI of export `name` (the empty name: the default export).
    pub fn uri_of(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", s(&self.socket))
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///disk0?socket={}", s(&self.socket))
    }

    /// The whole export copied into `out` with nbdcopy.
    pub fn copy_to(&self, out: &Path) {
        let _ = std::fs::remove_file(out);
        super::nbd::run_ok(Command::new("nbdcopy").args([&self.uri(), &s(out)]));
    }

    pub fn stop(mut self) {
        self.guard.terminate(Duration::from_secs(10)).unwrap();
    }
}
