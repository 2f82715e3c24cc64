//! Trim against in-memory journals written with the codec: what is kept and why, plugs and
//! orphans, the request bound, and a crash at every request.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::*;
use crate::journal::consumer::{self, ConsumerState, TrimPointer, UndoPosition};
use crate::journal::head::plan_restart_from_trim_pointer;
use crate::journal::manifest::ManifestParams;
use crate::journal::reader::{Cursor, JournalReader, Step};
use crate::journal::segment::{encode_plug, encode_segment};
use crate::journal::{Manifest, Op, Record};
use crate::replayer::undo::{UndoLog, UndoManifest, UNDO_FORMAT_VERSION};
use crate::store::counting::CountingStore;
use crate::store::flaky::{Call, FailureKind, FlakyStore};
use crate::store::list_all;
use crate::store::memory::MemoryStore;

const SEC: u64 = 1_000_000_000;
const NOW: u64 = 100_000 * SEC;

/// A journal in memory; segment `seq` holds 3 records stamped `ts(seq)`.
struct Journal {
    store: Arc<MemoryStore>,
    manifest: Manifest,
    next_seq: u64,
    next_lsn: u64,
}

/// The timestamp of the records of segment `seq`: one second per segment, ending at NOW.
fn ts(seq: u64, of: u64) -> u64 {
    NOW - (of - seq) * SEC
}

fn records(first_lsn: u64, n: u64, ts: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            lsn: first_lsn + i,
            timestamp_ns: ts,
            dev: 0,
            op: Op::Write {
                offset: 4096 * i,
                data: Bytes::from(vec![i as u8; 100]),
            },
        })
        .collect()
}

impl Journal {
    async fn new() -> Journal {
        Journal::with(
            Manifest::new(
                &ManifestParams {
                    device_name: "d".into(),
                    size: 1 << 20,
                    block_size: 4096,
                    region_size: 1 << 20,
                    splay_width: 4,
                    segment_size: 1 << 20,
                },
                1,
            )
            .unwrap(),
        )
        .await
    }

    /// A new journal with this manifest (the same UUID as another).
    async fn with(manifest: Manifest) -> Journal {
        let store = Arc::new(MemoryStore::new());
        manifest.create(store.as_ref()).await.unwrap();
        Journal {
            store,
            manifest,
            next_seq: 0,
            next_lsn: 1,
        }
    }

    /// Appends `n` segments, segment `s` stamped `ts(s, of)`.
    async fn append(&mut self, n: u64, of: u64) {
        for _ in 0..n {
            let seq = self.next_seq;
            let body = encode_segment(
                self.manifest.uuid,
                1,
                seq,
                self.next_lsn,
                &records(self.next_lsn, 3, ts(seq, of)),
            )
            .unwrap();
            self.store
                .put_if_absent(&self.manifest.segment_key(seq), body)
                .await
                .unwrap();
            self.next_seq += 1;
            self.next_lsn += 3;
        }
    }

    /// What a writer that died with uploads in flight leaves, once the next writer plugged
    /// it: a plug at `next_seq` pointing past `orphans` abandoned segments.
    async fn plug_over(&mut self, orphans: u64, of: u64) {
        let plug = self.next_seq;
        let resume = plug + orphans + 1;
        for seq in plug + 1..resume {
            // An orphan's LSNs are never part of the chain.
            let body = encode_segment(
                self.manifest.uuid,
                1,
                seq,
                999_999,
                &records(999_999, 1, ts(seq, of)),
            )
            .unwrap();
            self.store
                .put_if_absent(&self.manifest.segment_key(seq), body)
                .await
                .unwrap();
        }
        let body = encode_plug(self.manifest.uuid, 2, plug, self.next_lsn, resume);
        self.store
            .put_if_absent(&self.manifest.segment_key(plug), body)
            .await
            .unwrap();
        self.next_seq = resume;
    }

    async fn consumer(&self, name: &str, next_seq: u64, consistent_seq: u64, updated_at_ns: u64) {
        let state = ConsumerState {
            name: name.into(),
            next_seq,
            applied_lsn: 0,
            applied_timestamp_ns: 0,
            consistent_lsn: 0,
            consistent_seq,
            consistent_timestamp_ns: 0,
            delay_ns: 0,
            replica: format!("/r/{name}"),
            registered_at_ns: 1,
            updated_at_ns,
            undo: UndoPosition::default(),
            verify: Default::default(),
            seed: Default::default(),
            chain_epoch: 0,
        };
        consumer::commit(self.store.as_ref(), &state).await.unwrap();
    }

    async fn segment_seqs(&self) -> Vec<u64> {
        let mut seqs: Vec<u64> = list_all(self.store.as_ref(), paths::JOURNAL_PREFIX)
            .await
            .unwrap()
            .iter()
            .filter_map(|m| paths::parse_segment_key(&m.key, self.manifest.splay_width))
            .collect();
        seqs.sort_unstable();
        seqs
    }

    async fn pointer(&self) -> TrimPointer {
        consumer::load_trim_pointer(self.store.as_ref())
            .await
            .unwrap()
    }
}

fn opts(retain_s: u64) -> JournalTrimOptions {
    JournalTrimOptions {
        retain_ns: retain_s * SEC,
        drop_consumer_after_ns: None,
        dry_run: false,
        now_ns: NOW,
        drop_branches: Vec::new(),
    }
}

/// What every reader needs: the pointer names an existing segment (or the journal never
/// had one), the chain from it reads gap-free to the end a restarting writer plans, and
/// nothing below the pointer is read by anyone.
async fn assert_readable(store: Arc<dyn ObjectStore>, manifest: &Manifest, end: (u64, u64)) {
    let (pointer, plan) = plan_restart_from_trim_pointer(store.as_ref(), manifest)
        .await
        .unwrap();
    assert_eq!(
        (plan.next_seq, plan.next_lsn),
        end,
        "a restarting writer continues at the end"
    );
    let reader = JournalReader::new(store, manifest.clone());
    let mut cursor = Cursor {
        seq: pointer.first_seq,
        next_lsn: pointer.first_lsn,
    };
    while let Step::Segment(_) = reader.step(&mut cursor).await.unwrap() {}
    assert_eq!(
        (cursor.seq, cursor.next_lsn),
        end,
        "the chain reads to the end"
    );
}

#[tokio::test]
async fn trim_stops_at_the_slowest_consumer_and_names_it() {
    let mut j = Journal::new().await;
    j.append(20, 20).await;
    j.consumer("fast", 18, 18, NOW).await;
    // Inside a resync span: its consistent seq holds it back, not its next seq.
    j.consumer("slow", 12, 7, NOW).await;
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.deleted_segments, 7);
    assert_eq!(
        report.after,
        TrimPointer {
            first_seq: 7,
            first_lsn: 22
        }
    );
    assert!(
        matches!(&report.held_by, HeldBy::Consumer { name, floor_seq: 7, .. } if name == "slow")
    );
    assert_eq!(j.segment_seqs().await, (7..20).collect::<Vec<_>>());
    assert_eq!(j.pointer().await, report.after);
    assert_readable(j.store.clone(), &j.manifest, (20, 61)).await;

    // A second run deletes nothing and costs a handful of requests.
    let counting = Arc::new(CountingStore::new(j.store.clone()));
    let again = trim_journal(counting.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!((again.deleted_segments, again.after), (0, report.after));
    assert_eq!(counting.counts().delete_many, 0);
    assert_eq!(counting.counts().put, 0);
}

#[tokio::test]
async fn retention_and_the_head_hold_trim_back() {
    let mut j = Journal::new().await;
    j.append(20, 20).await;
    // No consumer: only the retention (segments 15.. hold records of the last 5 s).
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(5))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 15);
    assert!(matches!(report.held_by, HeldBy::Retention { seq: 15, .. }));
    assert_eq!(report.first_live_timestamp_ns, Some(ts(15, 20)));
    // Without retention the newest segment still stays.
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 19);
    assert_eq!(report.held_by, HeldBy::Head { seq: 19 });
    assert_eq!(j.segment_seqs().await, [19]);
    assert_readable(j.store.clone(), &j.manifest, (20, 61)).await;
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let mut j = Journal::new().await;
    j.append(10, 10).await;
    j.consumer("old", 5, 5, 1).await;
    let before = list_all(j.store.as_ref(), "").await.unwrap();
    let report = trim_journal(
        j.store.clone(),
        &j.manifest,
        &JournalTrimOptions {
            dry_run: true,
            drop_consumer_after_ns: Some(60 * SEC),
            ..opts(0)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        report.deleted_segments, 9,
        "as if the silent consumer were gone"
    );
    assert_eq!(report.dropped_consumers.len(), 1);
    assert_eq!(list_all(j.store.as_ref(), "").await.unwrap(), before);
}

#[tokio::test]
async fn silent_consumers_are_dropped_and_live_ones_kept() {
    let mut j = Journal::new().await;
    j.append(10, 10).await;
    j.consumer("dead", 2, 2, NOW - 3600 * SEC).await;
    j.consumer("idle", 6, 6, NOW - 30 * SEC).await;
    let report = trim_journal(
        j.store.clone(),
        &j.manifest,
        &JournalTrimOptions {
            drop_consumer_after_ns: Some(60 * SEC),
            ..opts(0)
        },
    )
    .await
    .unwrap();
    assert_eq!(report.dropped_consumers.len(), 1);
    assert_eq!(report.dropped_consumers[0].name, "dead");
    assert!(matches!(&report.held_by, HeldBy::Consumer { name, .. } if name == "idle"));
    assert_eq!(report.after.first_seq, 6);
    let names: Vec<_> = consumer::list(j.store.as_ref())
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["idle"]);
}

#[tokio::test]
async fn plugs_are_followed_and_their_orphans_deleted_with_them() {
    let mut j = Journal::new().await;
    j.append(3, 12).await;
    j.plug_over(2, 12).await; // plug at 3, orphans 4 and 5, chain resumes at 6
    j.append(6, 12).await;
    let end = (j.next_seq, j.next_lsn);
    assert_readable(j.store.clone(), &j.manifest, end).await;
    j.consumer("c", 9, 9, NOW).await;
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.deleted_segments, 7, "0, 1, 2, the plug, 6, 7, 8");
    assert_eq!(report.deleted_orphans, 2);
    assert_eq!(j.segment_seqs().await, (9..12).collect::<Vec<_>>());
    assert_readable(j.store.clone(), &j.manifest, end).await;

    // A consumer between the plug and where it points (impossible on the chain) keeps it.
    let mut j = Journal::new().await;
    j.append(3, 12).await;
    j.plug_over(2, 12).await;
    j.append(2, 12).await;
    j.consumer("c", 4, 4, NOW).await;
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 3);
}

#[tokio::test]
async fn a_damaged_chain_stops_trim_before_it() {
    let mut j = Journal::new().await;
    j.append(3, 10).await;
    // Segment 3 starts at the wrong LSN.
    let body = encode_segment(j.manifest.uuid, 1, 3, 500, &records(500, 1, ts(3, 10))).unwrap();
    j.store
        .put_if_absent(&j.manifest.segment_key(3), body)
        .await
        .unwrap();
    let err = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, TrimError::BrokenChain { .. }), "{err}");
    assert!(
        err.to_string().contains(&j.manifest.segment_key(3)),
        "{err}"
    );
    assert_eq!(j.segment_seqs().await, [0, 1, 2, 3], "nothing deleted");
}

#[tokio::test]
async fn trimming_thousands_of_segments_costs_at_most_two_requests_each() {
    let mut j = Journal::new().await;
    j.append(2500, 2500).await;
    j.consumer("c", 2400, 2400, NOW).await;
    let counting = Arc::new(CountingStore::new(j.store.clone()));
    let report = trim_journal(counting.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.deleted_segments, 2400);
    let c = counting.counts();
    assert_eq!(
        c.list,
        2 * (1 + 3),
        "only the consumers and the branches are listed: at the start and after each pointer move"
    );
    assert_eq!(c.delete_many, 3 + 1, "three batches and trim.pending");
    assert!(
        c.total() <= 2 * report.deleted_segments,
        "{} requests for {} segments: {c:?}",
        c.total(),
        report.deleted_segments
    );
    assert!(j.store.head(paths::TRIM_PENDING).await.is_err());
    assert_eq!(j.segment_seqs().await, (2400..2500).collect::<Vec<_>>());
}

/// A store killed at request `budget + 1`: the first `budget` calls pass and every later one
/// fails; a batch delete that is the last call let through dies half-way, newest keys first
/// (S3 promises no order).
fn dies_after(inner: Arc<dyn ObjectStore>, budget: u64) -> Arc<FlakyStore> {
    let store = Arc::new(FlakyStore::new(inner));
    store.fail_after(budget, FailureKind::Permanent);
    store.set_hook(move |call: Call| {
        Box::pin(async move {
            if call.op == "delete_many" && call.number == budget {
                let mut torn = call.keys.clone();
                torn.reverse();
                torn.truncate(call.keys.len() / 2);
                call.inner.delete_many(&torn).await?;
                return Err(StoreError::Permanent {
                    store: "dies-after".into(),
                    key: String::new(),
                    message: "killed during a batch delete".into(),
                });
            }
            Ok(())
        })
    });
    store
}

async fn crash_at_every_request(segments: u64, floor: u64, step: usize) {
    // The clean run, for comparison.
    let mut clean = Journal::new().await;
    clean.append(segments, segments).await;
    clean.consumer("c", floor, floor, NOW).await;
    let counting = Arc::new(CountingStore::new(clean.store.clone()));
    trim_journal(counting.clone(), &clean.manifest, &opts(0))
        .await
        .unwrap();
    let calls = counting.counts().total();
    let end = (clean.next_seq, clean.next_lsn);
    let expected = list_all(clean.store.as_ref(), "").await.unwrap();

    for budget in (0..calls).step_by(step) {
        let mut j = Journal::with(clean.manifest.clone()).await;
        j.append(segments, segments).await;
        j.consumer("c", floor, floor, NOW).await;
        let dying = dies_after(j.store.clone(), budget);
        assert!(
            trim_journal(dying.clone(), &j.manifest, &opts(0))
                .await
                .is_err(),
            "killed at request {budget}"
        );
        // Every reader accepts what the kill left.
        let pointer = j.pointer().await;
        assert!(pointer.first_seq <= floor, "killed at request {budget}");
        assert_readable(j.store.clone(), &j.manifest, end).await;
        // The next trim finishes the job exactly.
        trim_journal(j.store.clone(), &j.manifest, &opts(0))
            .await
            .unwrap();
        assert_eq!(
            list_all(j.store.as_ref(), "").await.unwrap(),
            expected,
            "killed at request {budget}: the next trim left another journal"
        );
    }
}

#[tokio::test]
async fn a_trim_killed_at_any_request_leaves_a_readable_journal_the_next_trim_finishes() {
    crash_at_every_request(30, 25, 1).await;
}

#[tokio::test]
async fn a_trim_killed_between_chunks_leaves_a_readable_journal() {
    crash_at_every_request(2300, 2200, 97).await;
}

/// An undo log in memory for consumer `c` of journal `j`: segment `s` holds records
/// stamped `ts(s, of)`.
async fn undo_log(j: &Journal, segments: u64, of: u64) -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let log = UndoLog::open_or_create(
        store.clone(),
        &UndoManifest {
            format_version: UNDO_FORMAT_VERSION,
            journal_uuid: j.manifest.uuid,
            consumer: "c".into(),
            replica: "/r/c".into(),
            device_size: 1 << 20,
            created_ns: 1,
        },
    )
    .await
    .unwrap();
    for seq in 0..segments {
        log.write(seq, records(1 + 3 * seq, 3, ts(seq, of)))
            .await
            .unwrap();
    }
    store
}

async fn commit_undo_position(j: &Journal, consistent_seq: u64, next_seq: u64) {
    let mut state = consumer::load(j.store.as_ref(), "c").await.unwrap();
    state.undo.consistent_seq = consistent_seq;
    state.undo.next_seq = next_seq;
    consumer::commit(j.store.as_ref(), &state).await.unwrap();
}

fn undo_opts(retain_s: u64) -> UndoTrimOptions {
    UndoTrimOptions {
        retain_ns: retain_s * SEC,
        dry_run: false,
        now_ns: NOW,
    }
}

async fn undo_seqs(store: &MemoryStore) -> Vec<u64> {
    list_all(store, paths::UNDO_PREFIX)
        .await
        .unwrap()
        .iter()
        .filter_map(|m| paths::parse_undo_segment_key(&m.key))
        .collect()
}

#[tokio::test]
async fn undo_trim_keeps_the_window_and_what_crash_recovery_needs() {
    let mut j = Journal::new().await;
    j.append(1, 1).await;
    j.consumer("c", 1, 1, NOW).await;
    let undo = undo_log(&j, 20, 20).await;
    commit_undo_position(&j, 20, 20).await;

    // The window: records of the last 5 seconds are in segments 15..
    let report = trim_undo(undo.clone(), j.store.as_ref(), &undo_opts(5))
        .await
        .unwrap();
    assert_eq!(report.deleted_segments, 15);
    assert_eq!(
        report.after,
        TrimPointer {
            first_seq: 15,
            first_lsn: 46
        }
    );
    assert!(matches!(report.held_by, HeldBy::Retention { seq: 15, .. }));
    assert_eq!(undo_seqs(&undo).await, (15..20).collect::<Vec<_>>());
    assert_eq!(
        consumer::load_trim_pointer(undo.as_ref()).await.unwrap(),
        report.after
    );

    // Inside a resync span the agent's consistent point is back at 17: never past it.
    commit_undo_position(&j, 17, 20).await;
    let report = trim_undo(undo.clone(), j.store.as_ref(), &undo_opts(0))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 17);
    assert_eq!(
        report.held_by,
        HeldBy::CrashRecovery {
            consumer: "c".into(),
            consistent_seq: 17
        }
    );
    assert_eq!(undo_seqs(&undo).await, [17, 18, 19]);

    // A second run is a no-op; a dry run changes nothing.
    let again = trim_undo(undo.clone(), j.store.as_ref(), &undo_opts(0))
        .await
        .unwrap();
    assert_eq!(again.deleted_segments, 0);
    commit_undo_position(&j, 20, 20).await;
    let dry = trim_undo(
        undo.clone(),
        j.store.as_ref(),
        &UndoTrimOptions {
            dry_run: true,
            ..undo_opts(0)
        },
    )
    .await
    .unwrap();
    assert_eq!(dry.deleted_segments, 3);
    assert_eq!(undo_seqs(&undo).await, [17, 18, 19]);
}

#[tokio::test]
async fn undo_trim_refuses_what_it_cannot_check() {
    let mut j = Journal::new().await;
    j.append(1, 1).await;
    let undo = undo_log(&j, 3, 3).await;
    // The consumer is not registered.
    let err = trim_undo(undo.clone(), j.store.as_ref(), &undo_opts(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TrimError::UnregisteredConsumer { .. }),
        "{err}"
    );
    // No undo log there.
    let empty = Arc::new(MemoryStore::new());
    let err = trim_undo(empty.clone(), j.store.as_ref(), &undo_opts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, TrimError::NoUndoLog { .. }), "{err}");
    assert!(
        list_all(empty.as_ref(), "").await.unwrap().is_empty(),
        "nothing created"
    );
    // Another journal's undo log.
    let other = Journal::new().await;
    other.consumer("c", 0, 0, NOW).await;
    let err = trim_undo(undo.clone(), other.store.as_ref(), &undo_opts(0))
        .await
        .unwrap_err();
    assert!(matches!(err, TrimError::ForeignUndoLog { .. }), "{err}");
    assert_eq!(undo_seqs(&undo).await, [0, 1, 2]);
}

#[tokio::test]
async fn read_ahead_stays_near_what_the_walk_uses() {
    let mut j = Journal::new().await;
    j.append(1000, 1000).await;
    // The retention stops the walk at seq 10: read-ahead wastes at most half again.
    let counting = Arc::new(CountingStore::new(j.store.clone()));
    let report = trim_journal(counting.clone(), &j.manifest, &opts(990))
        .await
        .unwrap();
    assert_eq!(report.deleted_segments, 10);
    let reads = counting.counts().get_tail;
    assert!(reads <= 11 + 6, "{reads} index reads to delete 10 segments");
    // Never a read past the consumer's floor.
    j.consumer("c", 50, 50, NOW).await;
    let counting = Arc::new(CountingStore::new(j.store.clone()));
    let report = trim_journal(counting.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 50);
    assert_eq!(counting.counts().get_tail, 41, "seqs 10..=50, once each");
}

/// A store on which a replay agent registers at the old pointer the moment trim first moves
/// the pointer: the agent read the pointer before the move and registered after trim listed
/// the consumers, and its own re-read of the pointer happened before the move too. Or a
/// branch a `promote --at` creates at that moment.
fn registers_during_trim(
    inner: Arc<dyn ObjectStore>,
    late: Option<ConsumerState>,
    late_branch: Option<crate::journal::chain::Branch>,
) -> Arc<FlakyStore> {
    let store = Arc::new(FlakyStore::new(inner));
    let late = Arc::new(Mutex::new((late, late_branch)));
    store.set_hook(move |call: Call| {
        let late = late.clone();
        Box::pin(async move {
            if call.op == "put" && call.keys == [paths::TRIM_POINTER] {
                let (state, branch) = {
                    let mut late = late.lock().unwrap();
                    (late.0.take(), late.1.take())
                };
                if let Some(state) = state {
                    consumer::commit(call.inner.as_ref(), &state).await.unwrap();
                }
                if let Some(branch) = branch {
                    crate::journal::chain::create_branch(call.inner.as_ref(), &branch)
                        .await
                        .unwrap();
                }
            }
            Ok(())
        })
    });
    store
}

#[tokio::test]
async fn a_consumer_registering_while_trim_runs_keeps_its_segments() {
    let mut j = Journal::new().await;
    j.append(1500, 1500).await;
    let mut late = ConsumerState {
        name: "late".into(),
        next_seq: 0,
        applied_lsn: 0,
        applied_timestamp_ns: 0,
        consistent_lsn: 0,
        consistent_seq: 0,
        consistent_timestamp_ns: 0,
        delay_ns: 0,
        replica: "/r/late".into(),
        registered_at_ns: NOW,
        updated_at_ns: NOW,
        undo: UndoPosition::default(),
        verify: Default::default(),
        seed: Default::default(),
        chain_epoch: 0,
    };
    let store = registers_during_trim(j.store.clone(), Some(late.clone()), None);
    let report = trim_journal(store, &j.manifest, &opts(0)).await.unwrap();
    assert!(
        matches!(&report.held_by, HeldBy::Consumer { name, .. } if name == "late"),
        "{report:?}"
    );
    assert_eq!(report.deleted_segments, 0, "{report:?}");
    assert_eq!(j.segment_seqs().await, (0..1500).collect::<Vec<_>>());
    // The consumer reads on from seq 0; a writer restarts from the pointer.
    let reader = JournalReader::new(j.store.clone(), j.manifest.clone());
    let mut cursor = Cursor {
        seq: 0,
        next_lsn: 1,
    };
    assert!(matches!(
        reader.step(&mut cursor).await.unwrap(),
        Step::Segment(_)
    ));
    assert_readable(j.store.clone(), &j.manifest, (1500, 4501)).await;
    // Once it has moved on, a later trim deletes everything below it: nothing leaks.
    late.next_seq = 1400;
    late.consistent_seq = 1400;
    consumer::commit(j.store.as_ref(), &late).await.unwrap();
    trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(j.segment_seqs().await, (1400..1500).collect::<Vec<_>>());
    assert!(j.store.head(paths::TRIM_PENDING).await.is_err());
}

/// A branch `promote --at` left: seqs `first..=last` (3 records each).
async fn branch(j: &Journal, name: &str, first: u64, last: u64) -> crate::journal::chain::Branch {
    let b = crate::journal::chain::Branch {
        name: name.into(),
        forked_by: 2,
        from_lsn: first * 3 + 1,
        to_lsn: last * 3 + 3,
        first_seq: first,
        last_seq: last,
        created_at_ns: NOW,
    };
    crate::journal::chain::create_branch(j.store.as_ref(), &b)
        .await
        .unwrap();
    b
}

#[tokio::test]
async fn a_branch_holds_trim_until_it_is_dropped() {
    let mut j = Journal::new().await;
    j.append(10, 10).await;
    j.consumer("dr", 9, 9, NOW).await;
    branch(&j, "before-e2", 4, 6).await;
    let report = trim_journal(j.store.clone(), &j.manifest, &opts(0))
        .await
        .unwrap();
    assert_eq!(report.after.first_seq, 4, "the branch's first seq stays");
    assert!(
        matches!(&report.held_by, HeldBy::Branch { name, first_seq: 4, .. } if name == "before-e2"),
        "{:?}",
        report.held_by
    );
    assert!(report
        .held_by
        .describe()
        .contains("--drop-branch before-e2"));
    assert_eq!(j.segment_seqs().await, (4..10).collect::<Vec<_>>());

    // An unknown name changes nothing, not even the branches named before it.
    let all = list_all(j.store.as_ref(), "").await.unwrap();
    let err = trim_journal(
        j.store.clone(),
        &j.manifest,
        &JournalTrimOptions {
            drop_branches: vec!["before-e2".into(), "nope".into()],
            ..opts(0)
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, TrimError::UnknownBranch { ref name, .. } if name == "nope"),
        "{err}"
    );
    assert!(err.to_string().contains("before-e2"), "{err}");
    assert_eq!(list_all(j.store.as_ref(), "").await.unwrap(), all);

    // A dry run drops nothing but says what would go.
    let dry = trim_journal(
        j.store.clone(),
        &j.manifest,
        &JournalTrimOptions {
            drop_branches: vec!["before-e2".into()],
            dry_run: true,
            ..opts(0)
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.deleted_segments, dry.dropped_branches.len()), (5, 1));
    assert_eq!(list_all(j.store.as_ref(), "").await.unwrap(), all);

    let report = trim_journal(
        j.store.clone(),
        &j.manifest,
        &JournalTrimOptions {
            drop_branches: vec!["before-e2".into()],
            ..opts(0)
        },
    )
    .await
    .unwrap();
    assert_eq!(report.dropped_branches, vec!["before-e2".to_string()]);
    assert_eq!(report.after.first_seq, 9);
    assert!(matches!(&report.held_by, HeldBy::Consumer { name, .. } if name == "dr"));
    assert!(crate::journal::chain::list_branches(j.store.as_ref())
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_branch_created_while_trim_runs_keeps_its_segments() {
    let mut j = Journal::new().await;
    j.append(1500, 1500).await;
    let late = crate::journal::chain::Branch {
        name: "before-e2".into(),
        forked_by: 2,
        from_lsn: 301,
        to_lsn: 600,
        first_seq: 100,
        last_seq: 199,
        created_at_ns: NOW,
    };
    let store = registers_during_trim(j.store.clone(), None, Some(late));
    let report = trim_journal(store, &j.manifest, &opts(0)).await.unwrap();
    assert!(
        matches!(&report.held_by, HeldBy::Branch { name, .. } if name == "before-e2"),
        "{report:?}"
    );
    assert_eq!(report.deleted_segments, 100, "{report:?}");
    assert_eq!(j.segment_seqs().await, (100..1500).collect::<Vec<_>>());
}
