//! Replay-agent test helpers: journals written directly with the library (exact control of
//! records, timestamps and corruption), and `tinylag replay` started as a child process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tinylag::journal::chain::{self, ChainEntry, Lineage};
use tinylag::journal::consumer::{self, ConsumerState};
use tinylag::journal::epoch::{ClaimBasis, EpochReason, Predecessor};
use tinylag::journal::segment::encode_segment;
use tinylag::journal::ManifestParams;
use tinylag::journal::Seed;
use tinylag::journal::{Cursor, JournalReader, Step};
use tinylag::journal::{Manifest, Op, Record};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;

use super::procs::ChildGuard;

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64
}

/// A journal in a local directory, appended to segment by segment.
pub struct TestJournal {
    pub dir: PathBuf,
    pub store: Arc<dyn ObjectStore>,
    pub manifest: Manifest,
    pub next_seq: u64,
    pub next_lsn: u64,
    last_ts: u64,
    rng: StdRng,
    /// The writer epoch segments are written under (1 unless [`begin_epoch`](Self::begin_epoch)).
    pub epoch: u64,
}

impl TestJournal {
    /// Creates a journal of one device of `size` bytes at `dir`.
    pub async fn create(dir: &Path, size: u64, seed: u64) -> TestJournal {
        Self::create_with_block_size(dir, size, seed, 4096).await
    }

    /// [`create`](Self::create) with a logical block size of `block_size` (512 for exports a
    /// loop device on nbdfuse reads).
    pub async fn create_with_block_size(
        dir: &Path,
        size: u64,
        seed: u64,
        block_size: u32,
    ) -> TestJournal {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
        let manifest = Manifest::new(
            &ManifestParams {
                device_name: "disk0".into(),
                size,
                block_size,
                region_size: 1 << 20,
                splay_width: 4,
                segment_size: 8 << 20,
            },
            now_ns(),
        )
        .expect("valid manifest");
        manifest.create(store.as_ref()).await.expect("create");
        TestJournal {
            dir: dir.to_path_buf(),
            store,
            manifest,
            next_seq: 0,
            next_lsn: 1,
            last_ts: 0,
            rng: StdRng::seed_from_u64(seed),
            epoch: 1,
        }
    }

    /// Opens a journal made elsewhere (e.g. by `tinylag init`), to read its positions;
    /// `next_seq` and `next_lsn` are not known and start at 0 and 1.
    pub async fn open(dir: &Path) -> TestJournal {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(dir));
        let manifest = Manifest::load(store.as_ref()).await.expect("a journal");
        TestJournal {
            dir: dir.to_path_buf(),
            store,
            manifest,
            next_seq: 0,
            next_lsn: 1,
            last_ts: 0,
            rng: StdRng::seed_from_u64(0),
            epoch: 1,
        }
    }

    pub fn uri(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    pub fn size(&self) -> u64 {
        self.manifest.device_size(0).expect("device 0")
    }

    /// Appends one segment of `ops` stamped `timestamp_ns` (never before the previous
    /// record); returns the LSNs it holds.
    pub async fn append_at(&mut self, ops: Vec<Op>, timestamp_ns: u64) -> std::ops::Range<u64> {
        let ts = timestamp_ns.max(self.last_ts);
        let first = self.next_lsn;
        let records: Vec<Record> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| Record {
                lsn: first + i as u64,
                timestamp_ns: ts,
                dev: 0,
                op,
            })
            .collect();
        let body = encode_segment(
            self.manifest.uuid,
            self.epoch,
            self.next_seq,
            first,
            &records,
        )
        .expect("encode");
        self.store
            .put_if_absent(&self.manifest.segment_key(self.next_seq), body)
            .await
            .expect("put segment");
        self.next_seq += 1;
        self.next_lsn += records.len() as u64;
        self.last_ts = ts;
        first..self.next_lsn
    }

    /// Begins writer epoch `epoch` at the journal's end as a writer does: its claim and
    /// chain entry (continuing `fork` = (epoch, LSN), or the journal's end) before its
    /// first segment, which holds its `EPOCH` record.
    pub async fn begin_epoch(&mut self, epoch: u64, fork: Option<(u64, u64)>) {
        let fork = fork.map(|(epoch, lsn)| Predecessor { epoch, lsn });
        let reason = if fork.is_some() {
            EpochReason::PromoteAt
        } else {
            EpochReason::Start
        };
        let basis = ClaimBasis {
            reason,
            owner: "site".into(),
            fork,
        };
        tinylag::journal::epoch::claim_exact(self.store.as_ref(), epoch, now_ns(), basis)
            .await
            .expect("claim");
        let predecessor = fork.or((self.next_lsn > 1).then(|| Predecessor {
            epoch: self.epoch,
            lsn: self.next_lsn - 1,
        }));
        let entry = ChainEntry {
            epoch,
            first_seq: self.next_seq,
            first_lsn: self.next_lsn,
            predecessor,
            reason,
            owner: "site".into(),
            host: "test".into(),
            began_at_ns: now_ns(),
        };
        chain::write_entry(self.store.as_ref(), &entry)
            .await
            .expect("chain entry");
        self.epoch = epoch;
        // Stamped with the previous record's time: a test controls the times of the rest.
        self.append_at(vec![Op::Epoch { epoch }], self.last_ts.max(1))
            .await;
    }

    /// The device image of the chain as it stands: every record on its lineage up to
    /// `up_to_lsn` (all when `None`), applied in order to a blank image.
    pub async fn chain_image(&self, up_to_lsn: Option<u64>) -> Vec<u8> {
        let lineage = chain::load(self.store.as_ref())
            .await
            .expect("chain")
            .lineage();
        self.image_on(&lineage, up_to_lsn).await
    }

    /// The device image of the records of `lineage` up to `up_to_lsn`.
    pub async fn image_on(&self, lineage: &Lineage, up_to_lsn: Option<u64>) -> Vec<u8> {
        let reader = JournalReader::new(self.store.clone(), self.manifest.clone());
        let mut cursor = Cursor {
            seq: 0,
            next_lsn: 1,
        };
        let mut image = vec![0u8; self.size() as usize];
        let limit = up_to_lsn.unwrap_or(u64::MAX);
        while let Step::Segment(segment) = reader.step(&mut cursor).await.expect("read") {
            for r in segment.records {
                if r.lsn > limit || !lineage.contains(r.lsn) {
                    continue;
                }
                match &r.op {
                    Op::Write { offset, data } | Op::ResyncData { offset, data } => {
                        image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                    }
                    Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                        image[*offset as usize..(*offset + *len) as usize].fill(0)
                    }
                    _ => {}
                }
            }
        }
        image
    }

    /// Appends one segment of `ops` stamped now.
    pub async fn append(&mut self, ops: Vec<Op>) -> std::ops::Range<u64> {
        self.append_at(ops, now_ns()).await
    }

    /// A random operation: mostly writes of 4 KiB to 256 KiB (compressible, distinct
    /// content), some discards, zeroes and flushes.
    pub fn random_op(&mut self) -> Op {
        let size = self.size();
        let blocks = self.rng.gen_range(1..=64u64);
        let len = blocks * 4096;
        let offset = self.rng.gen_range(0..(size - len) / 4096) * 4096;
        match self.rng.gen_range(0..20) {
            0 => Op::Discard { offset, len },
            1 => Op::WriteZeroes { offset, len },
            2 => Op::Flush,
            _ => Op::Write {
                offset,
                data: self.data(len as usize),
            },
        }
    }

    /// `len` bytes of half-random content (compresses about 2:1, like real data).
    pub fn data(&mut self, len: usize) -> Bytes {
        let mut buf = vec![0u8; len];
        for chunk in buf.chunks_mut(16) {
            let word: u64 = self.rng.gen();
            let n = chunk.len().min(8);
            chunk[..n].copy_from_slice(&word.to_le_bytes()[..n]);
        }
        Bytes::from(buf)
    }

    pub async fn append_random(&mut self, n: usize) -> std::ops::Range<u64> {
        let ops = (0..n).map(|_| self.random_op()).collect();
        self.append(ops).await
    }

    /// The committed position of consumer `name`.
    pub async fn position(&self, name: &str) -> ConsumerState {
        consumer::load(self.store.as_ref(), name)
            .await
            .expect("consumer registered")
    }

    /// The committed position of consumer `name`, `None` while it is not registered.
    pub async fn try_position(&self, name: &str) -> Option<ConsumerState> {
        match consumer::load(self.store.as_ref(), name).await {
            Ok(state) => Some(state),
            Err(tinylag::journal::JournalError::UnknownConsumer { .. }) => None,
            Err(e) => panic!("reading the position of {name}: {e}"),
        }
    }

    /// Waits until consumer `name`'s committed position has applied `lsn`; fails at once,
    /// with its log, if `agent` (the consumer's replay agent) exits first.
    pub async fn wait_applied(
        &self,
        name: &str,
        lsn: u64,
        agent: &mut ChildGuard,
        timeout: std::time::Duration,
    ) -> ConsumerState {
        let agent = std::cell::RefCell::new(agent);
        let agent = &agent;
        let what = format!("{name} to apply LSN {lsn}");
        super::procs::wait_for_async(&what, timeout, move || async move {
            let applied = self.try_position(name).await;
            if let Some(pos) = applied.filter(|p| p.applied_lsn >= lsn) {
                return Ok(pos);
            }
            let mut agent = agent.borrow_mut();
            if let Some(status) = agent.exited() {
                panic!("{name}'s agent exited ({status}): {}", agent.log_tail(4000));
            }
            Err(format!("{name} has not applied LSN {lsn} yet"))
        })
        .await
    }

    /// Key of segment `seq` and its file in the journal directory.
    pub fn segment_file(&self, seq: u64) -> (String, PathBuf) {
        let key = self.manifest.segment_key(seq);
        let path = self.dir.join(&key);
        (key, path)
    }
}

/// `tinylag` with test logging: warnings only, or the filter in `TINYLAG_TEST_LOG` (say
/// `info,tinylag=debug`) when chasing a failure.
pub fn tinylag() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinylag"));
    let filter = std::env::var("TINYLAG_TEST_LOG").unwrap_or_else(|_| "warn".into());
    cmd.env("TINYLAG_LOG", filter);
    cmd
}

/// `tinylag replay` arguments for `journal`, `replica` and `name`.
pub fn replay_args(journal: &str, replica: &Path, name: &str) -> Vec<String> {
    vec![
        "replay".into(),
        "--journal".into(),
        journal.into(),
        "--replica".into(),
        replica.display().to_string(),
        "--name".into(),
        name.into(),
    ]
}

/// Runs `tinylag` to completion.
pub fn run(args: &[String]) -> Output {
    tinylag().args(args).output().expect("run tinylag")
}

/// Runs `tinylag`, panicking with its stderr if it fails.
pub fn run_ok(args: &[String]) -> Output {
    let out = run(args);
    assert!(
        out.status.success(),
        "tinylag {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Starts `tinylag` in the background, its output in `log`.
pub fn spawn(args: &[String], log: &Path) -> ChildGuard {
    ChildGuard::spawn_logged("tinylag replay", tinylag().args(args), log).expect("spawn tinylag")
}

/// FNV-1a of a file, to say "unchanged" without keeping copies.
pub fn file_hash(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    bytes_hash(&data)
}

/// FNV-1a of bytes (an image read back), as [`file_hash`] of a file.
pub fn bytes_hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The first offset where `a` and `b` differ, for messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// `(bytes, regions)` from `tinylag rejoin`'s "will move" line.
pub fn will_move(out: &str) -> (u64, u64) {
    let line = out
        .lines()
        .find(|l| l.contains("will move"))
        .unwrap_or_else(|| panic!("no 'will move' line in:\n{out}"));
    let inner = &line[line.find('(').unwrap() + 1..];
    let mut words = inner.split([' ', ',']).filter(|w| !w.is_empty());
    let bytes = words.next().unwrap().parse().unwrap();
    words.next(); // "bytes"
    let regions = words.next().unwrap().parse().unwrap();
    (bytes, regions)
}

/// How consumer `name` of the journal in directory `journal` is vouched for (`None`: it is
/// not registered).
pub fn consumer_seed(journal: &Path, name: &str) -> Option<Seed> {
    let store = LocalStore::new(journal);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(consumer::load(&store, name))
        .ok()
        .map(|c| c.seed)
}
