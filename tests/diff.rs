//! `tinylag diff`, `export-diff` and `import-diff` against journals written in phases of
//! known content (random writes, trims, write-zeroes, a resync span, a rewrite of the same
//! bytes), each ending with a mark:
//! - for random pairs of marks, the extents `diff` reports are exactly the ranges of the data
//!   records in between (which the test logged itself), every byte that differs between the
//!   two phases' images lies inside them, and resync bytes are flagged;
//! - the library reads segment indexes only, one per segment in the interval plus a binary
//!   search, counted with the counting store: no payload, no whole-object read;
//! - `export-diff` → `import-diff` on the image restored at the first mark gives the image
//!   restored at the second, byte for byte; the stream is checked by a reader written here
//!   from Ceph's format description (doc/dev/rbd-diff.rst), not the product's parser;
//! - bad input (a truncated stream, an unknown tag, a mismatched base, points outside the
//!   journal, a journal hole) is refused with one line and changes nothing.

mod support;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::replay::{file_hash, now_ns, replay_args, run, run_ok, TestJournal};
use support::timetravel::{Model, SEC};
use tinylag::journal::chain;
use tinylag::journal::mark::{self, MarkPoint};
use tinylag::journal::JournalReader;
use tinylag::journal::Op;
use tinylag::store::CountingStore;
use tinylag::store::ObjectStore;
use tinylag::timetravel::{changed_extents, LiveRange, READ_AHEAD};
use tinylag::timetravel::{Point, Target};

const SIZE: u64 = 4 << 20;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// A data record the test wrote: its LSN, range and whether it is resync data.
#[derive(Clone, Debug)]
struct Logged {
    lsn: u64,
    range: Range<u64>,
    resync: bool,
}

/// What the test knows about the journal it wrote.
struct History {
    /// Data records in LSN order.
    log: Vec<Logged>,
    /// Per mark: name, LSN, the image after it.
    marks: Vec<(String, u64, Vec<u8>)>,
    /// The mark `rewrite`, just before phase 4 writes bytes that are there already.
    rewrite: Option<(u64, Vec<u8>)>,
}

/// Appends a MARK record `name` at `time` and its `marks/<name>`; returns its LSN.
async fn add_mark(journal: &mut TestJournal, name: &str, time: u64) -> u64 {
    let lsns = journal
        .append_at(vec![Op::Mark { name: name.into() }], time)
        .await;
    mark::create(
        journal.store.as_ref(),
        &MarkPoint {
            name: name.into(),
            lsn: lsns.start,
            timestamp_ns: time,
        },
    )
    .await
    .expect("create mark");
    lsns.start
}

fn range_of(op: &Op) -> Option<(Range<u64>, bool)> {
    match op {
        Op::Write { offset, data } => Some((*offset..*offset + data.len() as u64, false)),
        Op::ResyncData { offset, data } => Some((*offset..*offset + data.len() as u64, true)),
        Op::Discard { offset, len } | Op::WriteZeroes { offset, len } => {
            Some((*offset..*offset + *len, false))
        }
        _ => None,
    }
}

/// Appends `ops` as one segment at `time`, logging their data ranges and applying them.
async fn append(
    journal: &mut TestJournal,
    model: &mut Model,
    history: &mut History,
    ops: Vec<Op>,
    time: u64,
) -> Range<u64> {
    for op in &ops {
        model.apply(op);
    }
    let ranges: Vec<_> = ops.iter().map(range_of).collect();
    let lsns = journal.append_at(ops, time).await;
    for (lsn, r) in lsns.clone().zip(ranges) {
        if let Some((range, resync)) = r {
            history.log.push(Logged { lsn, range, resync });
        }
    }
    lsns
}

/// Writes `n` phases at `t0`, `t0 + 60 s`, …: random operations in a few segments, with a
/// resync span in phase 3, a rewrite of unchanged bytes in phase 4 and a large zeroed
/// range in phase 2; each ends with a mark `pN`.
async fn write_phases(journal: &mut TestJournal, t0: u64, n: usize, seed: u64) -> History {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::new(SIZE);
    let mut history = History {
        log: Vec::new(),
        marks: Vec::new(),
        rewrite: None,
    };
    for i in 0..n {
        let time = t0 + 60 * SEC * i as u64;
        for _ in 0..rng.gen_range(2..5) {
            let ops: Vec<Op> = (0..rng.gen_range(5..25))
                .map(|_| journal.random_op())
                .collect();
            append(journal, &mut model, &mut history, ops, time).await;
        }
        match i {
            1 => {
                // A zeroed range that was data: `z` in the stream.
                let ops = vec![Op::WriteZeroes {
                    offset: 1 << 20,
                    len: 512 << 10,
                }];
                append(journal, &mut model, &mut history, ops, time).await;
            }
            2 => {
                let mut ops = vec![Op::ResyncBegin];
                ops.push(journal.random_op());
                let offset = 2 << 20;
                let data = bytes::Bytes::from(model.image[offset..offset + (256 << 10)].to_vec());
                ops.push(Op::ResyncData {
                    offset: offset as u64,
                    data,
                });
                ops.push(Op::ResyncEnd);
                append(journal, &mut model, &mut history, ops, time).await;
            }
            3 => {
                let lsn = add_mark(journal, "rewrite", time).await;
                history.rewrite = Some((lsn, model.image.clone()));
                // The same bytes written again: a change the images cannot show.
                let offset = 3 << 20;
                let data = bytes::Bytes::from(model.image[offset..offset + 8192].to_vec());
                let ops = vec![Op::Write {
                    offset: offset as u64,
                    data,
                }];
                append(journal, &mut model, &mut history, ops, time).await;
            }
            _ => {}
        }
        let name = format!("p{}", i + 1);
        let lsn = add_mark(journal, &name, time).await;
        history.marks.push((name, lsn, model.image.clone()));
    }
    history
}

/// The extents the log says changed in `(lo, hi]`, as (offset, end, resync) per byte run.
fn expected_extents(history: &History, lo: u64, hi: u64) -> Vec<(u64, u64, bool)> {
    // 0: untouched, 1: changed, 2: resync.
    let mut bytes = vec![0u8; SIZE as usize];
    for l in history.log.iter().filter(|l| l.lsn > lo && l.lsn <= hi) {
        for b in &mut bytes[l.range.start as usize..l.range.end as usize] {
            *b = (*b).max(if l.resync { 2 } else { 1 });
        }
    }
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b == 0 {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 == i as u64 && last.2 == (b == 2) => last.1 += 1,
            _ => out.push((i as u64, i as u64 + 1, b == 2)),
        }
    }
    out
}

fn diff_json(journal: &TestJournal, from: &str, to: &str) -> Value {
    let o = run_ok(&[
        "diff".into(),
        "--journal".into(),
        journal.uri().into(),
        "--from".into(),
        from.into(),
        "--to".into(),
        to.into(),
        "--json".into(),
    ]);
    serde_json::from_slice(&o.stdout).expect("diff --json prints JSON")
}

fn extents_of(v: &Value) -> Vec<(u64, u64, bool)> {
    v["extents"]
        .as_array()
        .expect("extents")
        .iter()
        .map(|e| {
            assert_eq!(e["dev"], 0);
            let off = e["offset"].as_u64().unwrap();
            (
                off,
                off + e["length"].as_u64().unwrap(),
                e["resync"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// A whole second two hours ago.
fn base_time() -> u64 {
    (now_ns() - 7200 * SEC) / SEC * SEC
}

#[tokio::test(flavor = "multi_thread")]
async fn diff_between_random_marks_is_what_the_records_wrote_and_covers_every_changed_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 11).await;
    let t0 = base_time();
    let history = write_phases(&mut journal, t0, 6, 5).await;
    let mut rng = StdRng::seed_from_u64(99);
    let mut pairs: Vec<(usize, usize)> = (0..8)
        .map(|_| {
            let a = rng.gen_range(0..history.marks.len());
            let b = rng.gen_range(0..history.marks.len());
            (a.min(b), a.max(b))
        })
        .collect();
    // The resync span's phase, and the rewrite's phase alone.
    pairs.extend([(1, 2), (2, 3), (0, 5)]);
    let mut saw_resync = false;
    for (a, b) in pairs {
        let (from, lo, img_a) = &history.marks[a];
        let (to, hi, img_b) = &history.marks[b];
        let got = extents_of(&diff_json(&journal, from, to));
        assert_eq!(got, expected_extents(&history, *lo, *hi), "{from}..{to}");
        // Block by block: every block that differs is inside the extents.
        for block in 0..(SIZE / 4096) as usize {
            let r = block * 4096..(block + 1) * 4096;
            if img_a[r.clone()] == img_b[r.clone()] {
                continue;
            }
            for i in r.clone() {
                if img_a[i] != img_b[i] {
                    let i = i as u64;
                    assert!(
                        got.iter().any(|e| e.0 <= i && i < e.1),
                        "{from}..{to}: byte {i} differs and no extent holds it"
                    );
                }
            }
        }
        saw_resync |= got.iter().any(|e| e.2);
        // Either order: the same bytes.
        let back = extents_of(&diff_json(&journal, to, from));
        assert_eq!(back, got, "{to}..{from}");
    }
    assert!(saw_resync, "a resync span was in some interval");
    // A write of the bytes already there: the images agree, the diff reports it (the
    // superset the journal cannot avoid: it records writes, not differences).
    let (lsn, before) = history.rewrite.clone().expect("phase 4 ran");
    let after = &history.marks[3].2;
    let r = (3usize << 20)..(3usize << 20) + 8192;
    assert_eq!(before[r.clone()], after[r.clone()]);
    let got = extents_of(&diff_json(&journal, "rewrite", "p4"));
    assert_eq!(got, expected_extents(&history, lsn, history.marks[3].1));
    assert!(
        got.iter()
            .any(|e| e.0 <= r.start as u64 && r.end as u64 <= e.1),
        "{got:?}"
    );
    // Times resolve like marks: a time inside phase 2's quiet minute is mark p2.
    let at = |i: u64| tinylag::clock::format_ns(t0 + 60 * SEC * i + SEC);
    let by_time = extents_of(&diff_json(&journal, &at(1), &at(4)));
    let by_mark = extents_of(&diff_json(&journal, "p2", "p5"));
    assert_eq!(by_time, by_mark);
    // The text form lists the same extents, resync flagged.
    let o = run_ok(&[
        "diff".into(),
        "--journal".into(),
        journal.uri().into(),
        "--from".into(),
        "p2".into(),
        "--to".into(),
        "p3".into(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let expect = expected_extents(&history, history.marks[1].1, history.marks[2].1);
    assert_eq!(lines.len(), expect.len(), "{text}");
    assert!(text.lines().any(|l| l.ends_with(" resync")), "{text}");
    assert!(text.contains("no payload"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_diff_reads_one_index_per_segment_and_never_a_payload() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 12).await;
    let history = write_phases(&mut journal, base_time(), 8, 6).await;
    let counting = Arc::new(CountingStore::new(journal.store.clone()));
    let store: Arc<dyn ObjectStore> = counting.clone();
    let reader = JournalReader::new(store.clone(), journal.manifest.clone());
    let lineage = chain::load(store.as_ref()).await.unwrap().lineage();
    let live = LiveRange::open(&reader).await.unwrap();
    assert_eq!(live.end_seq, journal.next_seq);
    let now = now_ns();
    for (a, b) in [(0usize, 1usize), (2, 6), (0, 7), (5, 5)] {
        let from = live
            .resolve(
                &reader,
                &lineage,
                "--from",
                &Target::Mark(history.marks[a].0.clone()),
                now,
            )
            .await
            .unwrap();
        let to = live
            .resolve(
                &reader,
                &lineage,
                "--to",
                &Target::Mark(history.marks[b].0.clone()),
                now,
            )
            .await
            .unwrap();
        let before = counting.counts();
        let bytes_before = counting.bytes_read();
        let diff = changed_extents(&reader, &lineage, &live, from, to)
            .await
            .unwrap();
        let after = counting.counts();
        let tails = after.get_tail - before.get_tail;
        assert_eq!(after.get, before.get, "a whole object was read");
        assert_eq!(after.get_range, before.get_range, "a payload was read");
        assert_eq!(after.list, before.list);
        assert_eq!(tails, diff.objects_read, "objects read are tail reads");
        let in_interval = diff.segments.end - diff.segments.start;
        let search =
            64 - (live.end_seq - live.first_seq).leading_zeros() as u64 + 1 + READ_AHEAD as u64;
        assert!(
            diff.objects_read <= in_interval + search,
            "{} reads for {in_interval} segments",
            diff.objects_read
        );
        // Index bytes only: far less than the segments hold.
        let read = counting.bytes_read() - bytes_before;
        if a != b {
            assert!(read > 0 && diff.segment_bytes > 0);
            assert!(
                read <= (diff.objects_read) * (64 << 10),
                "{read} bytes for {} index reads",
                diff.objects_read
            );
        } else {
            assert!(diff.extents.is_empty() && tails == 0);
        }
    }
    // A point outside the live range is refused naming it.
    let far = Point {
        lsn: live.head.lsn + 1,
        timestamp_ns: 0,
    };
    let err = changed_extents(&reader, &lineage, &live, live.start(), far)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the journal's live range"), "{err}");
}

/// `tinylag replay --once` onto `replica` (undo log beside it).
fn replay_once(journal: &TestJournal, replica: &Path) {
    let mut args = replay_args(journal.uri(), replica, "dr");
    args.push("--once".into());
    run_ok(&args);
}

fn restore(journal: &TestJournal, replica: &Path, mark: &str, out: &Path) {
    run_ok(&[
        "restore".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(replica),
        "--mark".into(),
        mark.into(),
        "--output".into(),
        s(out),
    ]);
}

fn export(journal: &TestJournal, replica: &Path, from: &str, to: &str, out: &Path) {
    run_ok(&[
        "export-diff".into(),
        "--journal".into(),
        journal.uri().into(),
        "--replica".into(),
        s(replica),
        "--from".into(),
        from.into(),
        "--to".into(),
        to.into(),
        "--output".into(),
        s(out),
    ]);
}

/// A record of a v1 stream, as this test's own reader sees it.
#[derive(Debug, PartialEq)]
enum Rec {
    From(String),
    To(String),
    Size(u64),
    Write(u64, Vec<u8>),
    Zero(u64, u64),
}

/// Reads a whole "rbd diff v1" stream, written from doc/dev/rbd-diff.rst alone: banner
/// `rbd diff v1\n`; `f`/`t` u8 tag, le32 length, name; `s` le64 size; `w` le64 offset, le64
/// length, data; `z` le64 offset, le64 length; `e` last.
fn read_v1(bytes: &[u8]) -> Vec<Rec> {
    assert_eq!(&bytes[..12], b"rbd diff v1\n", "banner");
    let mut at = 12;
    let mut out = Vec::new();
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    loop {
        let tag = bytes[at];
        at += 1;
        match tag {
            b'f' | b't' => {
                let n = u32_at(at) as usize;
                let name = String::from_utf8(bytes[at + 4..at + 4 + n].to_vec()).unwrap();
                at += 4 + n;
                out.push(if tag == b'f' {
                    Rec::From(name)
                } else {
                    Rec::To(name)
                });
            }
            b's' => {
                out.push(Rec::Size(u64_at(at)));
                at += 8;
            }
            b'w' => {
                let (off, len) = (u64_at(at), u64_at(at + 8) as usize);
                out.push(Rec::Write(off, bytes[at + 16..at + 16 + len].to_vec()));
                at += 16 + len;
            }
            b'z' => {
                out.push(Rec::Zero(u64_at(at), u64_at(at + 8)));
                at += 16;
            }
            b'e' => {
                assert_eq!(at, bytes.len(), "nothing after 'e'");
                return out;
            }
            t => panic!("unknown tag {t:#x} at {}", at - 1),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn export_diff_then_import_diff_rebuilds_the_later_image_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut journal = TestJournal::create(&d.join("journal"), SIZE, 13).await;
    let history = write_phases(&mut journal, base_time(), 5, 7).await;
    let replica = d.join("replica.img");
    replay_once(&journal, &replica);

    // Base p1, then the chain p1 -> p2 -> p4 applied in turn.
    let image = d.join("image.raw");
    restore(&journal, &replica, "p1", &image);
    let chain = [("p1", "p2"), ("p2", "p4")];
    for (k, (from, to)) in chain.iter().enumerate() {
        let stream = d.join(format!("{from}-{to}.rbddiff"));
        export(&journal, &replica, from, to, &stream);
        let bytes = std::fs::read(&stream).unwrap();
        let recs = read_v1(&bytes);
        assert_eq!(recs[0], Rec::From(from.to_string()));
        assert_eq!(recs[1], Rec::To(to.to_string()));
        assert_eq!(recs[2], Rec::Size(SIZE));
        // Data records ascend, never overlap, no `w` over 4 MiB, no all-zero block in a `w`.
        let mut end = 0;
        let mut zeros = 0;
        for r in &recs[3..] {
            let (off, len) = match r {
                Rec::Write(off, data) => {
                    assert!(data.len() <= 4 << 20);
                    for (i, block) in data.chunks(4096).enumerate() {
                        let abs = off + (i * 4096) as u64;
                        assert!(
                            abs % 4096 != 0 || block.len() < 4096 || block.iter().any(|&b| b != 0),
                            "an all-zero block at {abs} was sent as data"
                        );
                    }
                    (*off, data.len() as u64)
                }
                Rec::Zero(off, len) => {
                    zeros += len;
                    (*off, *len)
                }
                other => panic!("metadata after data: {other:?}"),
            };
            assert!(off >= end, "records out of order");
            end = off + len;
        }
        if k == 0 {
            // Phase 2 zeroed 512 KiB of data: zero runs appear as `z`.
            assert!(zeros >= 512 << 10, "{zeros} bytes as z");
        }
        // Apply: the first with --base (a restored image has no name yet), then the name
        // the first import left.
        let mut args = vec![
            "import-diff".to_string(),
            s(&stream),
            "--image".into(),
            s(&image),
        ];
        if k == 0 {
            args.extend(["--base".to_string(), "p1".into()]);
        }
        let o = run_ok(&args);
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("holds snapshot {to}")));
        let want = &history.marks.iter().find(|m| m.0 == *to).expect("mark").2;
        let got = std::fs::read(&image).unwrap();
        assert!(got == *want, "after {from}->{to} the image is not {to}'s");
        let restored = d.join(format!("{to}.img"));
        restore(&journal, &replica, to, &restored);
        assert_eq!(file_hash(&restored), file_hash(&image));
    }

    // To standard output: the same bytes; over an existing file: refused, file unchanged.
    let file = std::fs::read(d.join("p2-p4.rbddiff")).unwrap();
    let args = |out: &str| -> Vec<String> {
        [
            "export-diff",
            "--journal",
            journal.uri(),
            "--replica",
            &s(&replica),
            "--from",
            "p2",
            "--to",
            "p4",
            "--output",
            out,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    assert_eq!(run_ok(&args("-")).stdout, file);
    let o = run(&args(&s(&d.join("p2-p4.rbddiff"))));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(d.join("p2-p4.rbddiff")).unwrap(), file);
    assert!(!d.join("p2-p4.rbddiff.partial").exists());

    // Bad input changes nothing: the image stays p4's, its name too.
    let good = std::fs::read(d.join("p2-p4.rbddiff")).unwrap();
    let before = file_hash(&image);
    let snap = d.join("image.raw.rbd-snap");
    let refused = |name: &str, bytes: &[u8], extra: &[&str], needle: &str| {
        let f = d.join(name);
        std::fs::write(&f, bytes).unwrap();
        let mut args = vec![
            "import-diff".to_string(),
            s(&f),
            "--image".into(),
            s(&image),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(needle), "{name}: {needle:?} not in {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        assert_eq!(file_hash(&image), before, "{name} changed the image");
        assert_eq!(std::fs::read_to_string(&snap).unwrap(), "p4\n");
    };
    refused("cut.rbddiff", &good[..good.len() - 1], &[], "truncated");
    refused("cut2.rbddiff", &good[..good.len() / 2], &[], "truncated");
    let mut bad_tag = good.clone();
    let first_data = 12 + 1 + 4 + 2 + 1 + 4 + 2 + 9;
    bad_tag[first_data] = b'x';
    refused("tag.rbddiff", &bad_tag, &[], "unknown record tag");
    refused(
        "banner.rbddiff",
        b"rbd diff v2\n",
        &[],
        "not an rbd diff v1",
    );
    // The stream p2 -> p4 on an image that holds p4: the names say no.
    refused("base.rbddiff", &good, &[], "holds p4");
    refused("base2.rbddiff", &good, &["--base", "p3"], "holds p3");
    let mut past = Vec::from(&b"rbd diff v1\ns"[..]);
    past.extend(SIZE.to_le_bytes());
    past.push(b'z');
    past.extend((SIZE - 4096).to_le_bytes());
    past.extend(8192u64.to_le_bytes());
    past.push(b'e');
    refused("past.rbddiff", &past, &[], "past the image size");
}

#[tokio::test(flavor = "multi_thread")]
async fn points_outside_the_journal_and_holes_are_refused_naming_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 14).await;
    let t0 = base_time();
    let history = write_phases(&mut journal, t0, 4, 8).await;
    let diff = |from: &str, to: &str| {
        run(&[
            "diff".into(),
            "--journal".into(),
            journal.uri().into(),
            "--from".into(),
            from.into(),
            "--to".into(),
            to.into(),
        ])
    };
    let refused_with = |code: i32, from: &str, to: &str, needle: &str| {
        let o = diff(from, to);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{from}..{to}: {err}{}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(
            err.contains(needle),
            "{from}..{to}: {needle:?} not in {err}"
        );
        assert!(o.stdout.is_empty(), "a refused diff printed extents");
    };
    let refused = |from: &str, to: &str, needle: &str| refused_with(1, from, to, needle);
    let before = tinylag::clock::format_ns(t0 - 3600 * SEC);
    refused(&before, "p2", "outside the journal's live range LSN 1..=");
    refused("p1", "nosuchmark", "nosuchmark");
    // A usage error (clap's exit code 2) names both accepted forms.
    refused_with(2, "p1", "not a time", "or a mark's name");
    // A replay agent that read to the end makes a missing segment below it a hole.
    replay_once(&journal, &dir.path().join("replica.img"));
    let hole = journal.next_seq / 2;
    let (_, victim) = journal.segment_file(hole);
    std::fs::remove_file(&victim).unwrap();
    let named = format!("journal hole at seq {hole}");
    refused("p1", "p4", &named);
    refused("p4", "p1", &named);
    // Times after the hole too (the live range ends before it).
    refused("p1", "now", &named);
    let _ = history;
}

#[tokio::test(flavor = "multi_thread")]
async fn records_a_fork_left_off_the_chain_are_not_changes() {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = TestJournal::create(&dir.path().join("journal"), SIZE, 15).await;
    let t0 = base_time();
    let mut model = Model::new(SIZE);
    let mut history = History {
        log: Vec::new(),
        marks: Vec::new(),
        rewrite: None,
    };
    journal.begin_epoch(1, None).await;
    let ops: Vec<Op> = (0..20).map(|_| journal.random_op()).collect();
    append(&mut journal, &mut model, &mut history, ops, t0).await;
    let fork = add_mark(&mut journal, "base", t0).await;
    // Epoch 1 goes on, then a `promote --at base` forks the chain there: these records are
    // a branch.
    let ops: Vec<Op> = (0..20).map(|_| journal.random_op()).collect();
    append(&mut journal, &mut model, &mut history, ops, t0 + SEC).await;
    add_mark(&mut journal, "onbranch", t0 + SEC).await;
    let branch_end = history.log.len();
    journal.begin_epoch(2, Some((1, fork))).await;
    let ops: Vec<Op> = (0..20).map(|_| journal.random_op()).collect();
    append(&mut journal, &mut model, &mut history, ops, t0 + 2 * SEC).await;
    let end = add_mark(&mut journal, "after", t0 + 2 * SEC).await;

    // Only epoch 2's records changed the chain's image since `base`.
    history.log.drain(..branch_end);
    let got = extents_of(&diff_json(&journal, "base", "after"));
    assert_eq!(got, expected_extents(&history, fork, end));
    let before = journal.chain_image(Some(fork)).await;
    let after = journal.chain_image(Some(end)).await;
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b {
            let i = i as u64;
            assert!(got.iter().any(|e| e.0 <= i && i < e.1), "byte {i} differs");
        }
    }
    // A mark on the branch is refused, naming the branch.
    let o = run(&[
        "diff".into(),
        "--journal".into(),
        journal.uri().into(),
        "--from".into(),
        "onbranch".into(),
        "--to".into(),
        "after".into(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("on a branch"), "{err}");
}
