//! Calibration of the ext4 judge (`tests/support/verdict.rs`) on a real write stream.
//!
//! A real ext4 workload runs on `tinylag serve` (nbdfuse + a loop device: mkfs, mount,
//! rounds of file creation, rewrites, renames and deletions with syncs between them, a file
//! unlinked while open, unmount), so the journal holds the device's writes in the order they
//! were acknowledged. From it the test builds images:
//! - cut at prefixes after mkfs (legal crash states): the judge must accept every one;
//! - with a few writes dropped from the middle (what a replica that lost writes would show):
//!   the judge must reject most of them. A judge that accepts everything fails here, and one
//!   that rejects everything fails on the prefixes.
//!
//! The classification rules are also checked on canned e2fsck output.

mod support;

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use support::daemon::{init, Daemon};
use support::ext4::NbdLoop;
use support::nbd::{pattern, run_ok};
use support::procs::path;
use support::verdict::{classify, judge_ext4};
use tinylag::journal::{Cursor, JournalReader, Step};
use tinylag::journal::{Manifest, Op};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;

/// Legal prefixes judged (spread evenly from the end of mkfs to the last write).
const PREFIX_CUTS: usize = 24;
/// Images with writes dropped.
const DROP_VARIANTS: u64 = 12;
/// Share of the writes after mkfs each of them loses.
const DROP_SHARE: f64 = 0.05;
/// Of the images with dropped writes, at least this many must be judged corrupt. Some
/// drops are undetectable by any fsck (file data, journal blocks already checkpointed, blocks
/// written again later). Calibration on a 2-core machine: 12 of 12 rejected in three runs
/// (~250 writes after mkfs, 12 dropped each); with 2% dropped (5 writes), 6 of 12.
const MIN_REJECTED: usize = 9;

/// The journal of an ext4 workload and where mkfs ended in it.
struct Capture {
    journal: PathBuf,
    /// Head LSN once mkfs had returned (and the device was flushed).
    mkfs_end: u64,
    /// The last LSN (after the unmount).
    last: u64,
}

/// Runs the workload on a fresh daemon and returns its journal.
fn capture(dir: &Path) -> Capture {
    let primary = dir.join("primary.img");
    let journal = dir.join("journal");
    // nbdfuse passes the loop device's 512-byte requests through unchanged.
    init(
        path(&journal),
        &primary,
        "64M",
        &["--segment-size", "1M", "--block-size", "512"],
        &[],
    );
    let mut daemon = Daemon::start(&primary, path(&journal), &[], &[]);
    let mut disk = NbdLoop::attach(&daemon.uri(), dir);
    let mnt = disk.mnt.clone();
    disk.mkfs_ext4();
    run_ok(Command::new("blockdev").args(["--flushbufs", &disk.device]));
    let mkfs_end = daemon.status()["head_lsn"].as_u64().unwrap();

    disk.mount();
    let mut held_open = None;
    for round in 0..8u64 {
        let d = mnt.join(format!("round{round}"));
        std::fs::create_dir_all(d.join("nested")).unwrap();
        for f in 0..12u64 {
            let seed = round * 100 + f;
            let len = 512 + (seed * 7919 % 96) as usize * 1024;
            std::fs::write(d.join(format!("f{f}.bin")), pattern(seed, len)).unwrap();
        }
        std::fs::write(d.join("nested/small"), b"tiny").unwrap();
        if round > 0 {
            let prev = mnt.join(format!("round{}", round - 1));
            // Rewrite, rename and delete in the previous round: directory updates, freed
            // blocks and inodes.
            std::fs::write(prev.join("f0.bin"), pattern(round, 40_000)).unwrap();
            std::fs::rename(prev.join("f1.bin"), d.join("moved.bin")).unwrap();
            for f in 2..6 {
                std::fs::remove_file(prev.join(format!("f{f}.bin"))).unwrap();
            }
        }
        if round == 3 {
            // A file unlinked while open stays on the orphan list until it is closed.
            let p = d.join("open-unlinked");
            let mut file = File::create(&p).unwrap();
            file.write_all(&pattern(7, 300_000)).unwrap();
            file.sync_all().unwrap();
            std::fs::remove_file(&p).unwrap();
            held_open = Some(file);
        }
        if round == 5 {
            drop(held_open.take());
        }
        run_ok(Command::new("sync").arg("-f").arg(path(&mnt)));
    }
    disk.finish();
    let last = daemon.status()["head_lsn"].as_u64().unwrap();
    daemon.stop_ok();
    assert!(
        last > mkfs_end + 200,
        "the workload wrote too little to calibrate with (LSN {mkfs_end}..{last})"
    );
    Capture {
        journal,
        mkfs_end,
        last,
    }
}

/// Streams the journal once, applying every record not in `dropped` to an image in memory;
/// at each LSN of `cuts` (ascending) hands the image to `at_cut`. Returns the LSNs of the
/// WRITE records after `after`.
fn replay(
    capture: &Capture,
    dropped: &HashSet<u64>,
    cuts: &[u64],
    after: u64,
    mut at_cut: impl FnMut(u64, &[u8]),
) -> Vec<u64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::new(capture.journal.clone()));
        let manifest = Manifest::load(store.as_ref()).await.unwrap();
        let mut image = vec![0u8; manifest.device_size(0).unwrap() as usize];
        let reader = JournalReader::new(store, manifest);
        let mut cursor = Cursor {
            seq: 0,
            next_lsn: 1,
        };
        let mut cuts = cuts.iter().copied().peekable();
        let mut writes = Vec::new();
        while let Step::Segment(segment) = reader.step(&mut cursor).await.unwrap() {
            for record in segment.records {
                if !dropped.contains(&record.lsn) {
                    match &record.op {
                        Op::Write { offset, data } => {
                            let o = *offset as usize;
                            image[o..o + data.len()].copy_from_slice(data);
                        }
                        Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
                            image[*offset as usize..(*offset + *len) as usize].fill(0);
                        }
                        _ => {}
                    }
                }
                if record.lsn > after && matches!(record.op, Op::Write { .. }) {
                    writes.push(record.lsn);
                }
                while cuts.peek() == Some(&record.lsn) {
                    at_cut(record.lsn, &image);
                    cuts.next();
                }
            }
        }
        assert!(cuts.peek().is_none(), "the journal ended before every cut");
        writes
    })
}

fn write_image(path: &Path, image: &[u8]) {
    std::fs::write(path, image).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[test]
fn the_judge_accepts_legal_prefixes_and_rejects_lost_writes() {
    if !Path::new("/dev/fuse").exists() || !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/fuse or loop devices are absent on this machine");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let capture = capture(dir.path());
    let image = dir.path().join("cut.img");

    // Legal crash states: every prefix after mkfs.
    let span = capture.last - capture.mkfs_end;
    let cuts: Vec<u64> = (1..=PREFIX_CUTS as u64)
        .map(|i| capture.mkfs_end + span * i / PREFIX_CUTS as u64)
        .collect();
    let mut refused = Vec::new();
    let writes = replay(
        &capture,
        &HashSet::new(),
        &cuts,
        capture.mkfs_end,
        |lsn, img| {
            write_image(&image, img);
            if let Err(why) = judge_ext4(&image) {
                refused.push(format!("prefix through LSN {lsn}: {why}"));
            }
        },
    );
    assert!(
        refused.is_empty(),
        "the judge refused {} of {PREFIX_CUTS} legal prefixes:\n{}",
        refused.len(),
        refused.join("\n\n")
    );

    // Lost writes: a few writes after mkfs missing, everything else applied.
    let mut rejected = 0;
    let mut accepted = Vec::new();
    for seed in 0..DROP_VARIANTS {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = ((writes.len() as f64 * DROP_SHARE) as usize).max(3);
        let dropped: HashSet<u64> = writes.choose_multiple(&mut rng, n).copied().collect();
        replay(&capture, &dropped, &[capture.last], 0, |_, img| {
            write_image(&image, img)
        });
        match judge_ext4(&image) {
            Err(_) => rejected += 1,
            Ok(()) => accepted.push(seed),
        }
    }
    eprintln!(
        "calibration: {PREFIX_CUTS}/{PREFIX_CUTS} legal prefixes accepted; {rejected}/{DROP_VARIANTS} images with {:.0}% of {} writes dropped rejected (accepted seeds {accepted:?})",
        DROP_SHARE * 100.0,
        writes.len()
    );
    assert!(
        rejected >= MIN_REJECTED,
        "the judge rejected only {rejected} of {DROP_VARIANTS} images with lost writes (accepted seeds {accepted:?}); it must reject at least {MIN_REJECTED}"
    );
}

#[test]
fn classify_accepts_journal_recovery_and_free_counts() {
    let out = "e2fsck 1.47.0 (5-Feb-2023)\nimg: recovering journal\nPass 1: Checking inodes, blocks, and sizes\n\
               Pass 5: Checking group summary information\nFree blocks count wrong (100, counted=90).\nFix? yes\n\n\
               Free inodes count wrong for group #0 (2030, counted=2029).\nFix? yes\n\n\
               img: Clearing orphaned inode 14 (uid=0, gid=0, mode=0100644, size=300000)\n\
               img: ***** FILE SYSTEM WAS MODIFIED *****\nimg: 11/2048 files (0.0% non-contiguous), 1300/8192 blocks\n";
    assert_eq!(classify(out, Some(1)), Ok(()));
}

#[test]
fn classify_rejects_any_other_problem() {
    let out = "e2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes, blocks, and sizes\n\
               Pass 2: Checking directory structure\nEntry 'f3.bin' in /round2 (12) has deleted/unused inode 40.  Clear? yes\n\n\
               Pass 5: Checking group summary information\nBlock bitmap differences:  -(9345--9360)\nFix? yes\n";
    let bad = classify(out, Some(1)).unwrap_err();
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].contains("deleted/unused inode"), "{bad:?}");
    assert!(bad[1].contains("Block bitmap differences"), "{bad:?}");
}

#[test]
fn classify_rejects_uncorrected_or_failed_runs() {
    let clean = "e2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes, blocks, and sizes\n";
    assert_eq!(classify(clean, Some(0)), Ok(()));
    assert!(classify(clean, Some(4)).is_err());
    assert!(classify(clean, Some(8)).is_err());
    assert!(classify(clean, None).is_err());
}
