//! One conformance suite for every object store (Litestream's pattern): each case is written
//! once, as an async fn taking a fresh `Arc<dyn ObjectStore>`, and every backend runs every
//! case. A backend is done when it passes them all.
//!
//! Backends: local directory (a tempdir), memory, and two real S3 servers started on
//! 127.0.0.1 by `support::s3` (s3s-fs and moto). The wrappers (retrying, counting, flaky)
//! run the same suite around a memory store: wrapping a backend never changes what it
//! promises. Each backend test prints one line per
//! case and a pass count, runs every case even after a failure, then fails listing the
//! failed cases.
//!
//! Also here: racing conditional creates (threads and processes), the retrying wrapper
//! against injected failures, and S3 error mapping.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tinylag::store::CountingStore;
use tinylag::store::LocalStore;
use tinylag::store::MemoryStore;
use tinylag::store::{list_all, ObjectStore, StoreError};
use tinylag::store::{Call, FailureKind, FlakyStore};
use tinylag::store::{RetryPolicy, RetryingStore};
use tinylag::store::{S3Options, S3Store};
use tokio::task::JoinSet;

use support::procs::{free_port, wait_for_path, ChildGuard};
use support::s3::{S3Server, S3ServerKind, SECRET_KEY};

type Store = Arc<dyn ObjectStore>;
type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type Case = (&'static str, fn(Store) -> CaseFuture);

/// Builds a `&[Case]` from case function names.
macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), |store: Store| -> CaseFuture { Box::pin($name(store)) })),*]
    };
}

/// Cases every backend must pass.
const COMMON: &[Case] = cases![
    put_get_head,
    binary_content_and_empty_object,
    get_range_inside_at_end_and_outside,
    get_tail_shorter_and_longer_than_object,
    put_if_absent_first_wins,
    put_overwrites,
    missing_keys_are_not_found,
    list_prefix_start_after_and_folder_order,
    list_pagination_and_bulk_delete,
    delete_many_ignores_missing_keys,
    invalid_keys_are_rejected,
    unusual_key_characters,
    object_of_20_mib,
];

/// Reading a "folder" name (`dir` while `dir/x` exists) must say NotFound. s3s-fs stores
/// keys as files and answers such a GET with 500 (it opens the directory), so it skips this
/// case; real S3 has no folders and answers NoSuchKey.
const FOLDER_NAMES: &[Case] = cases![folder_names_are_not_objects];

/// Cases that need a truly atomic conditional create. s3s-fs and moto check
/// `If-None-Match` and then write, without a lock in between, so concurrent creates of
/// one key can both succeed on them; real S3 (and the local and memory stores) cannot.
const ATOMIC: &[Case] = cases![racing_put_if_absent];

// ---------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------

/// Runs `cases` against stores made by `fresh` (one per case), each case in its own task so
/// that a failed assertion fails that case only.
async fn run_suite(backend: &str, cases: &[Case], mut fresh: impl FnMut(&str) -> Store) {
    let mut failed = Vec::new();
    for (name, case) in cases {
        let store = fresh(name);
        let started = Instant::now();
        match tokio::spawn(case(store)).await {
            Ok(()) => eprintln!("{backend}: {name} ... ok ({:.2?})", started.elapsed()),
            Err(e) => {
                eprintln!("{backend}: {name} ... FAILED: {e}");
                failed.push(*name);
            }
        }
    }
    eprintln!(
        "{backend}: {} of {} cases passed",
        cases.len() - failed.len(),
        cases.len()
    );
    assert!(failed.is_empty(), "{backend}: failed cases: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conformance() {
    let mut dirs = Vec::new();
    let mut fresh = |_: &str| -> Store {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(LocalStore::new(dir.path().join("root")));
        dirs.push(dir);
        store
    };
    let all: Vec<Case> = [COMMON, FOLDER_NAMES, ATOMIC].concat();
    run_suite("local", &all, &mut fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conformance() {
    let all: Vec<Case> = [COMMON, FOLDER_NAMES, ATOMIC].concat();
    run_suite("memory", &all, |_| Arc::new(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_store_conformance() {
    let all: Vec<Case> = [COMMON, FOLDER_NAMES, ATOMIC].concat();
    run_suite("retrying(memory)", &all, |_| {
        Arc::new(RetryingStore::new(Arc::new(MemoryStore::new())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counting_store_conformance() {
    let all: Vec<Case> = [COMMON, FOLDER_NAMES, ATOMIC].concat();
    run_suite("counting(memory)", &all, |_| {
        Arc::new(CountingStore::new(Arc::new(MemoryStore::new())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_store_conformance() {
    let all: Vec<Case> = [COMMON, FOLDER_NAMES, ATOMIC].concat();
    // Passing everything through, it is the store it wraps.
    run_suite("flaky(memory)", &all, |_| flaky_memory()).await;
    // Failing now and then, under the retrying store: the retries hide every injected
    // failure, ambiguous creates included (each is read back and found to be ours).
    run_suite("retrying(flaky(memory))", &all, |_| {
        let flaky = flaky_memory();
        flaky.fail_next(2, FailureKind::Transient);
        flaky.ambiguous_creates(2);
        Arc::new(quick_retries(flaky, 5))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3s_fs_conformance() {
    s3_conformance(S3ServerKind::S3sFs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_conformance() {
    s3_conformance(S3ServerKind::Moto).await;
}

async fn s3_conformance(kind: S3ServerKind) {
    let Some(server) = S3Server::start(kind).await else {
        return;
    };
    // Each case under its own prefix of one bucket: a listing that leaked past the prefix
    // would see the other cases' keys.
    let cases = match kind {
        S3ServerKind::S3sFs => COMMON.to_vec(),
        S3ServerKind::Moto => [COMMON, FOLDER_NAMES].concat(),
    };
    run_suite(kind.name(), &cases, |case| {
        Arc::new(server.store(&format!("conformance/{case}")))
    })
    .await;
    s3_error_mapping(&server).await;
}

// ---------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------

fn bytes(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

/// Deterministic pseudo-random bytes (xorshift), so large objects are not compressible.
fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn keys_of(page: &[tinylag::store::ObjectMeta]) -> Vec<String> {
    page.iter().map(|o| o.key.clone()).collect()
}

fn assert_invalid_range(err: StoreError, (start, end, size): (u64, u64, u64)) {
    match err {
        StoreError::InvalidRange {
            start: s,
            end: e,
            size: z,
            ..
        } => assert_eq!((s, e, z), (start, end, size)),
        other => panic!("expected InvalidRange {start}..{end} of {size}, got {other}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, what: &str) {
    match result {
        Err(e) if e.is_not_found() => {}
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

async fn put_get_head(store: Store) {
    store
        .put("a/b/object", bytes("hello, store"))
        .await
        .expect("put");
    assert_eq!(store.get("a/b/object").await.expect("get"), "hello, store");
    let meta = store.head("a/b/object").await.expect("head");
    assert_eq!(meta.key, "a/b/object");
    assert_eq!(meta.size, 12);
    store
        .put_if_absent("top", bytes("level"))
        .await
        .expect("create at the root");
    assert_eq!(store.get("top").await.expect("get top"), "level");
}

async fn binary_content_and_empty_object(store: Store) {
    let all_bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    store
        .put("bin", Bytes::from(all_bytes.clone()))
        .await
        .expect("put binary");
    assert_eq!(store.get("bin").await.expect("get binary"), all_bytes);
    assert_eq!(
        store.get_range("bin", 250..262).await.expect("range"),
        all_bytes[250..262]
    );

    store
        .put_if_absent("empty", Bytes::new())
        .await
        .expect("create empty");
    assert_eq!(store.get("empty").await.expect("get empty"), Bytes::new());
    assert_eq!(store.head("empty").await.expect("head empty").size, 0);
    assert_eq!(
        store.get_range("empty", 0..0).await.expect("empty range"),
        Bytes::new()
    );
    assert_eq!(
        store.get_tail("empty", 16).await.expect("tail of empty"),
        (Bytes::new(), 0)
    );
    assert_invalid_range(
        store.get_range("empty", 0..1).await.expect_err("past end"),
        (0, 1, 0),
    );
}

async fn get_range_inside_at_end_and_outside(store: Store) {
    let data = pattern(100, 7);
    store.put("r", data.clone()).await.expect("put");
    for range in [0..10, 37..38, 90..100, 0..100, 50..50, 0..0, 100..100] {
        let got = store
            .get_range("r", range.clone())
            .await
            .unwrap_or_else(|e| panic!("range {range:?}: {e}"));
        assert_eq!(
            got,
            data[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    assert_invalid_range(
        store.get_range("r", 95..101).await.expect_err("95..101"),
        (95, 101, 100),
    );
    assert_invalid_range(
        store.get_range("r", 100..101).await.expect_err("100..101"),
        (100, 101, 100),
    );
    assert_invalid_range(
        store.get_range("r", 150..160).await.expect_err("150..160"),
        (150, 160, 100),
    );
    assert_invalid_range(
        store.get_range("r", 101..101).await.expect_err("101..101"),
        (101, 101, 100),
    );
    #[allow(clippy::reversed_empty_ranges)]
    let backwards = 10..5;
    assert_invalid_range(
        store.get_range("r", backwards).await.expect_err("10..5"),
        (10, 5, 100),
    );
}

async fn get_tail_shorter_and_longer_than_object(store: Store) {
    let data = pattern(1000, 11);
    store.put("t", data.clone()).await.expect("put");
    let (tail, size) = store.get_tail("t", 64).await.expect("short tail");
    assert_eq!((tail, size), (data.slice(936..), 1000));
    let (tail, size) = store.get_tail("t", 1000).await.expect("exact tail");
    assert_eq!((tail, size), (data.clone(), 1000));
    let (tail, size) = store.get_tail("t", 5000).await.expect("long tail");
    assert_eq!((tail, size), (data.clone(), 1000));
    let (tail, size) = store.get_tail("t", 0).await.expect("zero tail");
    assert_eq!((tail, size), (Bytes::new(), 1000));
    let (tail, size) = store.get_tail("t", 1).await.expect("one byte");
    assert_eq!((tail, size), (data.slice(999..), 1000));
}

async fn put_if_absent_first_wins(store: Store) {
    store
        .put_if_absent("epochs/00000000000000000001", bytes("first"))
        .await
        .expect("first create");
    let err = store
        .put_if_absent("epochs/00000000000000000001", bytes("second"))
        .await
        .expect_err("second create");
    assert!(err.is_already_exists(), "{err}");
    assert!(
        err.to_string().contains("epochs/00000000000000000001"),
        "message names the key: {err}"
    );
    assert_eq!(
        store.get("epochs/00000000000000000001").await.expect("get"),
        "first"
    );
    // An object made by a plain put is just as taken.
    store.put("plain", bytes("p")).await.expect("put");
    let err = store
        .put_if_absent("plain", bytes("q"))
        .await
        .expect_err("create over put");
    assert!(err.is_already_exists(), "{err}");
    assert_eq!(store.get("plain").await.expect("get"), "p");
    // After a delete the key is free again.
    store
        .delete_many(&["plain".to_string()])
        .await
        .expect("delete");
    store
        .put_if_absent("plain", bytes("again"))
        .await
        .expect("create after delete");
    assert_eq!(store.get("plain").await.expect("get"), "again");
}

async fn put_overwrites(store: Store) {
    store
        .put("consumers/replica-a", bytes("seq 1"))
        .await
        .expect("put");
    store
        .put("consumers/replica-a", bytes("seq 2 (longer)"))
        .await
        .expect("overwrite");
    assert_eq!(
        store.get("consumers/replica-a").await.expect("get"),
        "seq 2 (longer)"
    );
    store
        .put("consumers/replica-a", bytes("3"))
        .await
        .expect("shrink");
    assert_eq!(
        store.head("consumers/replica-a").await.expect("head").size,
        1
    );
    assert_eq!(store.get("consumers/replica-a").await.expect("get"), "3");
}

async fn missing_keys_are_not_found(store: Store) {
    assert_not_found(store.get("nope").await, "get");
    assert_not_found(store.get_range("nope", 0..1).await, "get_range");
    assert_not_found(store.get_range("nope", 0..0).await, "empty get_range");
    assert_not_found(store.get_tail("nope", 10).await, "get_tail");
    assert_not_found(store.get_tail("nope", 0).await, "empty get_tail");
    assert_not_found(store.head("nope").await, "head");
    // Nothing lives under an object.
    store.put("dir/x", bytes("x")).await.expect("put");
    assert_not_found(store.get("dir/x/y").await, "get under object");
    assert_not_found(store.head("dir/x/y").await, "head under object");
    let err = store.get("missing/key").await.expect_err("missing");
    assert!(
        err.to_string().contains("missing/key"),
        "names the key: {err}"
    );
}

async fn folder_names_are_not_objects(store: Store) {
    store.put("dir/x", bytes("x")).await.expect("put");
    assert_not_found(store.get("dir").await, "get folder");
    assert_not_found(store.head("dir").await, "head folder");
    assert_not_found(store.get_range("dir", 0..1).await, "get_range folder");
    assert_not_found(store.get_tail("dir", 1).await, "get_tail folder");
    assert_not_found(store.get("di").await, "get part of a folder name");
}

async fn list_prefix_start_after_and_folder_order(store: Store) {
    // Byte order puts '-' (0x2d) < '/' (0x2f) < '0' (0x30): folder contents must sort
    // between their neighbours exactly as flat keys do.
    let keys = [
        "tinylag.json",
        "trim",
        "epochs/00000000000000000001",
        "epochs/00000000000000000002",
        "consumers/a",
        "consumers/b",
        "journal/0/00000000000000000000",
        "journal/0/00000000000000000002",
        "journal/1/00000000000000000001",
        "journal/10/00000000000000000010",
        "journal/1-x",
        "journal-x",
        "journal0",
        "a/b/c/d",
        "a-b",
        "a0",
    ];
    for key in keys {
        store.put(key, Bytes::from(key)).await.expect("put");
    }
    let mut sorted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    sorted.sort();

    let page = store.list("", None, 1000).await.expect("list all");
    assert_eq!(keys_of(&page.objects), sorted);
    assert_eq!(page.next_start_after, None);
    for meta in &page.objects {
        assert_eq!(meta.size, meta.key.len() as u64, "size of {}", meta.key);
    }

    let under = |p: &str| -> Vec<String> {
        sorted
            .iter()
            .filter(|k| k.starts_with(p))
            .cloned()
            .collect()
    };
    for prefix in [
        "journal/",
        "journal/1",
        "journal/1/",
        "jour",
        "journal",
        "a",
        "a/b/",
        "e",
        "nothing/",
        "trim",
    ] {
        let page = store.list(prefix, None, 1000).await.expect("list prefix");
        assert_eq!(keys_of(&page.objects), under(prefix), "prefix {prefix:?}");
    }

    let after = |p: &str, a: &str| -> Vec<String> {
        sorted
            .iter()
            .filter(|k| k.starts_with(p) && k.as_str() > a)
            .cloned()
            .collect()
    };
    for (prefix, start_after) in [
        ("", "journal/0/00000000000000000000"),
        ("journal/", "journal/0/00000000000000000000"),
        ("journal/", "journal/0/5"), // not a key: the next one after it
        ("journal/", "journal/1"),   // a folder name
        ("journal/", "a"),           // before the prefix
        ("journal/", "zzz"),         // past everything
        ("", "a/b"),
        ("", "journal-x"),
    ] {
        let page = store
            .list(prefix, Some(start_after), 1000)
            .await
            .expect("list after");
        assert_eq!(
            keys_of(&page.objects),
            after(prefix, start_after),
            "prefix {prefix:?} after {start_after:?}"
        );
    }

    // Small pages walk the same order with exact boundaries.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list("", cursor.as_deref(), 3)
            .await
            .expect("list page");
        assert!(page.objects.len() <= 3);
        seen.extend(keys_of(&page.objects));
        match page.next_start_after {
            Some(next) => {
                assert_eq!(Some(&next), seen.last(), "cursor is the last key");
                cursor = Some(next);
            }
            None => break,
        }
    }
    assert_eq!(seen, sorted);
}

async fn list_pagination_and_bulk_delete(store: Store) {
    const N: usize = 2500;
    let all: Vec<String> = (0..N)
        .map(|i| format!("journal/{}/{:020}", i % 3, i))
        .collect();
    let mut puts = JoinSet::new();
    for chunk in all.chunks(N / 16 + 1) {
        let store = store.clone();
        let chunk = chunk.to_vec();
        puts.spawn(async move {
            for key in chunk {
                store
                    .put(&key, Bytes::from(key.clone()))
                    .await
                    .expect("put");
            }
        });
    }
    while let Some(done) = puts.join_next().await {
        done.expect("put task");
    }
    store
        .put("other/key", bytes("not journal"))
        .await
        .expect("put other");
    let mut sorted = all.clone();
    sorted.sort();

    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = store
            .list("journal/", cursor.as_deref(), 1000)
            .await
            .expect("list page");
        pages.push(page.objects.len());
        let last = page.next_start_after.clone();
        cursor = last;
        let keys = keys_of(&page.objects);
        let from = pages.iter().sum::<usize>() - keys.len();
        assert_eq!(
            keys,
            sorted[from..from + keys.len()],
            "page {}",
            pages.len()
        );
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages, [1000, 1000, 500]);

    let everything = list_all(store.as_ref(), "journal/")
        .await
        .expect("list_all");
    assert_eq!(keys_of(&everything), sorted);
    let stripe = list_all(store.as_ref(), "journal/1/")
        .await
        .expect("list stripe");
    assert_eq!(stripe.len(), N / 3);

    // More than one DeleteObjects batch on S3.
    store.delete_many(&all).await.expect("delete all");
    let page = store.list("journal/", None, 1000).await.expect("list");
    assert_eq!(page, Default::default());
    assert_eq!(
        store.get("other/key").await.expect("untouched"),
        "not journal"
    );
}

async fn delete_many_ignores_missing_keys(store: Store) {
    for key in ["d/1", "d/2", "d/3", "d/4", "d/5"] {
        store.put(key, bytes("x")).await.expect("put");
    }
    let doomed: Vec<String> = ["d/1", "d/3", "d/5", "d/missing", "never/there"]
        .iter()
        .map(|k| k.to_string())
        .collect();
    store.delete_many(&doomed).await.expect("delete");
    let left = store.list("d/", None, 100).await.expect("list");
    assert_eq!(keys_of(&left.objects), ["d/2", "d/4"]);
    assert_not_found(store.get("d/1").await, "deleted");
    store.delete_many(&[]).await.expect("delete nothing");
    store.delete_many(&doomed).await.expect("delete again");
}

async fn invalid_keys_are_rejected(store: Store) {
    let long = "k".repeat(901);
    for key in [
        "",
        "/abs",
        "a//b",
        "a/../b",
        "./a",
        "a/.",
        "a/",
        "ctl\nchar",
        long.as_str(),
    ] {
        let invalid = |what: &str, r: Result<(), StoreError>| match r {
            Err(StoreError::InvalidKey { .. }) => {}
            other => panic!("{what} {key:?}: expected InvalidKey, got {other:?}"),
        };
        invalid("put", store.put(key, bytes("x")).await);
        invalid("put_if_absent", store.put_if_absent(key, bytes("x")).await);
        invalid("get", store.get(key).await.map(drop));
        invalid("get_range", store.get_range(key, 0..1).await.map(drop));
        invalid("get_tail", store.get_tail(key, 1).await.map(drop));
        invalid("head", store.head(key).await.map(drop));
        invalid("delete_many", store.delete_many(&[key.to_string()]).await);
    }
    for prefix in ["/abs", "../x", "a//b/"] {
        match store.list(prefix, None, 10).await {
            Err(StoreError::InvalidKey { .. }) => {}
            other => panic!("list {prefix:?}: expected InvalidKey, got {other:?}"),
        }
    }
    // Nothing was written by any of that.
    assert_eq!(list_all(store.as_ref(), "").await.expect("list"), []);
}

async fn unusual_key_characters(store: Store) {
    let keys = [
        "consumers/replica with spaces",
        "consumers/plus+percent%equals=",
        "consumers/ünïcödé-名前",
        "consumers/quote'and\"double",
    ];
    for key in keys {
        store
            .put_if_absent(key, Bytes::from(key))
            .await
            .unwrap_or_else(|e| panic!("create {key:?}: {e}"));
        assert_eq!(store.get(key).await.expect("get"), key.as_bytes());
    }
    let mut sorted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    sorted.sort();
    let listed = list_all(store.as_ref(), "consumers/").await.expect("list");
    assert_eq!(keys_of(&listed), sorted);
    store
        .delete_many(&sorted)
        .await
        .expect("delete unusual keys");
    assert_eq!(
        list_all(store.as_ref(), "consumers/").await.expect("list"),
        []
    );
}

async fn object_of_20_mib(store: Store) {
    let data = pattern(20 << 20, 42);
    store
        .put_if_absent("journal/0/00000000000000000001", data.clone())
        .await
        .expect("create 20 MiB");
    let got = store
        .get("journal/0/00000000000000000001")
        .await
        .expect("get 20 MiB");
    assert!(got == data, "20 MiB object read back differently");
    let mid = store
        .get_range("journal/0/00000000000000000001", (7 << 20)..(8 << 20) + 3)
        .await
        .expect("range");
    assert!(mid == data.slice((7 << 20)..(8 << 20) + 3));
    let (tail, size) = store
        .get_tail("journal/0/00000000000000000001", 64 << 10)
        .await
        .expect("tail");
    assert_eq!(size, 20 << 20);
    assert!(tail == data.slice((20 << 20) - (64 << 10)..));
}

async fn racing_put_if_absent(store: Store) {
    const TASKS: usize = 16;
    const KEYS: usize = 20;
    let start = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut racers = JoinSet::new();
    for task in 0..TASKS {
        let store = store.clone();
        let start = start.clone();
        racers.spawn(async move {
            start.wait().await;
            let mut won = Vec::new();
            for k in 0..KEYS {
                let key = format!("epochs/{k:020}");
                match store
                    .put_if_absent(&key, Bytes::from(format!("claim by task {task}")))
                    .await
                {
                    Ok(()) => won.push(key),
                    Err(e) if e.is_already_exists() => {}
                    Err(e) => panic!("task {task} {key}: {e}"),
                }
            }
            (task, won)
        });
    }
    let mut winners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    while let Some(done) = racers.join_next().await {
        let (task, won) = done.expect("racer");
        for key in won {
            winners.entry(key).or_default().push(task);
        }
    }
    assert_eq!(winners.len(), KEYS, "every key has a winner");
    for (key, tasks) in &winners {
        assert_eq!(tasks.len(), 1, "{key} won by {tasks:?}");
        let stored = store.get(key).await.expect("get");
        assert_eq!(stored, format!("claim by task {}", tasks[0]), "{key}");
    }
}

// ---------------------------------------------------------------------------------------
// Several processes racing on one local directory
// ---------------------------------------------------------------------------------------

const RACE_DIR_ENV: &str = "TINYLAG_TEST_RACE_DIR";
const RACE_ID_ENV: &str = "TINYLAG_TEST_RACE_ID";
const RACE_KEYS: usize = 200;
const RACE_PROCESSES: usize = 3;

/// Runs itself as several processes (this test binary, filtered to this test, with the race
/// directory in the environment) that race `put_if_absent` on the same keys of one
/// directory, each through its own `LocalStore`. Exactly one process may win each key.
#[test]
fn local_multi_process_race() {
    if let Ok(dir) = std::env::var(RACE_DIR_ENV) {
        race_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut children = Vec::new();
    for id in 0..RACE_PROCESSES {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args([
            "local_multi_process_race",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RACE_DIR_ENV, dir.path())
        .env(RACE_ID_ENV, id.to_string());
        let log = dir.path().join(format!("child-{id}.log"));
        children.push(
            ChildGuard::spawn_logged("race child", &mut cmd, &log).expect("spawn race child"),
        );
    }
    // Children wait for this file, so that they start racing together.
    std::fs::write(dir.path().join("go"), b"go").expect("write go file");
    let mut winners: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (id, child) in children.iter_mut().enumerate() {
        let status = child
            .wait_timeout(Duration::from_secs(60))
            .expect("child finished");
        assert!(
            status.success(),
            "race child {id} failed: {status}\n{}",
            child.log_tail(4096)
        );
        let won = std::fs::read_to_string(dir.path().join(format!("won-{id}")))
            .expect("child's list of wins");
        for key in won.lines() {
            winners.entry(key.to_string()).or_default().push(id);
        }
    }
    assert_eq!(winners.len(), RACE_KEYS, "every key has a winner");
    let store = LocalStore::new(dir.path().join("root"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for (key, ids) in &winners {
        assert_eq!(ids.len(), 1, "{key} won by processes {ids:?}");
        let stored = rt.block_on(store.get(key)).expect("get");
        assert_eq!(stored, format!("claim by process {}", ids[0]));
    }
}

/// One racing process: creates every key through its own store, from two tasks, and writes
/// the keys it won to `won-<id>`.
fn race_child(dir: &Path) {
    let id = std::env::var(RACE_ID_ENV).expect("race id");
    wait_for_path(&dir.join("go"), Duration::from_secs(30)).expect("go signal");
    let store = LocalStore::new(dir.join("root"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let won = rt.block_on(async {
        let mut tasks = JoinSet::new();
        for half in 0..2 {
            let store = store.clone();
            let id = id.clone();
            tasks.spawn(async move {
                let mut won = Vec::new();
                // Each task starts on a different half, then tries every key.
                for k in (0..RACE_KEYS).filter(|k| k % 2 == half).chain(0..RACE_KEYS) {
                    let key = format!("epochs/{k:020}");
                    match store
                        .put_if_absent(&key, Bytes::from(format!("claim by process {id}")))
                        .await
                    {
                        Ok(()) => won.push(key),
                        Err(e) if e.is_already_exists() => {}
                        Err(e) => panic!("process {id} {key}: {e}"),
                    }
                }
                won
            });
        }
        let mut won = Vec::new();
        while let Some(done) = tasks.join_next().await {
            won.extend(done.expect("race task"));
        }
        won
    });
    let list: String = won.iter().map(|key| format!("{key}\n")).collect();
    std::fs::write(dir.join(format!("won-{id}")), list).expect("write wins");
}

// ---------------------------------------------------------------------------------------
// RetryingStore against injected failures
// ---------------------------------------------------------------------------------------

fn quick_retries(inner: Arc<FlakyStore>, attempts: u32) -> RetryingStore {
    RetryingStore::with_policy(
        inner,
        RetryPolicy {
            max_attempts: attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
        },
    )
}

fn flaky_memory() -> Arc<FlakyStore> {
    Arc::new(FlakyStore::new(Arc::new(MemoryStore::new())))
}

#[tokio::test]
async fn retry_reports_ambiguous_create_as_success() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 5);
    flaky.ambiguous_creates(1);
    store
        .put_if_absent(
            "journal/0/00000000000000000007",
            bytes("segment 7 of epoch 3"),
        )
        .await
        .expect("our own earlier create is not a conflict");
    assert_eq!(flaky.injected_failures(), 1);
    // create (lost answer), create (AlreadyExists), read back.
    assert_eq!(flaky.calls(), 3);
    assert_eq!(
        flaky
            .inner()
            .get("journal/0/00000000000000000007")
            .await
            .expect("get"),
        "segment 7 of epoch 3"
    );
}

#[tokio::test]
async fn retry_keeps_a_real_conflict_after_a_transient_failure() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 5);
    flaky
        .inner()
        .put_if_absent(
            "epochs/00000000000000000002",
            bytes("claim by the other writer"),
        )
        .await
        .expect("other writer");
    flaky.fail_next(1, FailureKind::Transient);
    let err = store
        .put_if_absent("epochs/00000000000000000002", bytes("claim by us"))
        .await
        .expect_err("someone else holds the key");
    assert!(err.is_already_exists(), "{err}");
    assert_eq!(
        flaky
            .inner()
            .get("epochs/00000000000000000002")
            .await
            .expect("get"),
        "claim by the other writer"
    );
}

#[tokio::test]
async fn retry_reports_a_plain_conflict_without_reading_back() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 5);
    flaky
        .inner()
        .put_if_absent("k", bytes("same bytes"))
        .await
        .expect("first");
    // Even identical bytes are a conflict when no attempt of ours failed.
    let err = store
        .put_if_absent("k", bytes("same bytes"))
        .await
        .expect_err("conflict");
    assert!(err.is_already_exists(), "{err}");
    assert_eq!(flaky.calls(), 1);
}

#[tokio::test]
async fn retry_rides_out_a_short_outage() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 5);
    flaky.inner().put("k", bytes("v")).await.expect("put");
    flaky.fail_next(3, FailureKind::Transient);
    assert_eq!(store.get("k").await.expect("fourth attempt works"), "v");
    assert_eq!(flaky.calls(), 4);
}

#[tokio::test]
async fn retry_gives_up_after_its_attempts() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 4);
    flaky.fail_all(Some(FailureKind::Transient));
    let err = store.list("", None, 10).await.expect_err("store down");
    assert!(err.is_transient(), "{err}");
    assert_eq!(flaky.calls(), 4);
    flaky.fail_all(None);
    store.list("", None, 10).await.expect("store back");
}

/// A one-shot command's store: while it has never answered, the short first-contact budget
/// applies and the error says what was spent; once it has answered, the full budget does.
#[tokio::test]
async fn a_store_that_never_answered_fails_fast_then_gets_the_full_budget() {
    let flaky = flaky_memory();
    let quick = RetryPolicy {
        max_attempts: 2,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
    };
    let store = quick_retries(flaky.clone(), 6).failing_fast_at_first(quick);
    flaky.fail_all(Some(FailureKind::Transient));
    let err = store.get("k").await.expect_err("store down");
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("(gave up after 2 attempts in "),
        "{err}"
    );
    assert_eq!(flaky.calls(), 2);
    flaky.fail_all(None);
    assert!(store.get("k").await.expect_err("missing").is_not_found());
    flaky.fail_all(Some(FailureKind::Transient));
    let before = flaky.calls();
    let err = store.get("k").await.expect_err("store down again");
    assert!(
        err.to_string().contains("(gave up after 6 attempts in "),
        "{err}"
    );
    assert_eq!(flaky.calls() - before, 6);
}

#[tokio::test]
async fn retry_does_not_retry_permanent_errors() {
    let flaky = flaky_memory();
    let store = quick_retries(flaky.clone(), 5);
    flaky.fail_next(1, FailureKind::Permanent);
    let err = store.put("k", bytes("v")).await.expect_err("permanent");
    assert!(matches!(err, StoreError::Permanent { .. }), "{err}");
    assert_eq!(flaky.calls(), 1);
    // A missing object is an answer, not a failure.
    assert!(store.get("k").await.expect_err("missing").is_not_found());
    assert_eq!(flaky.calls(), 2);
}

// ---------------------------------------------------------------------------------------
// S3 error mapping
// ---------------------------------------------------------------------------------------

/// Run by both S3 conformance tests after the suite, on the same server.
async fn s3_error_mapping(server: &S3Server) {
    let name = server.kind().name();
    let no_bucket = server.store_in("tinylag-no-such-bucket", "p");
    // A listing, because s3s-fs answers a GET in a missing bucket with NoSuchKey.
    let err = no_bucket
        .list("", None, 10)
        .await
        .expect_err("missing bucket");
    assert!(
        matches!(err, StoreError::Permanent { .. }),
        "{name}: missing bucket must be permanent: {err}"
    );
    assert!(
        err.to_string().contains("s3://tinylag-no-such-bucket/p/"),
        "{name}: message names the store: {err}"
    );
    assert!(
        !err.to_string().contains(SECRET_KEY),
        "{name}: secret in {err}"
    );

    if server.kind() == S3ServerKind::S3sFs {
        // moto accepts any signature; s3s-fs checks it.
        let wrong = S3Store::with_credentials(
            support::s3::BUCKET,
            "p",
            &server.options(),
            support::s3::ACCESS_KEY,
            "a-wrong-secret-value",
        )
        .expect("store");
        let err = wrong.put("k", bytes("v")).await.expect_err("bad signature");
        assert!(
            matches!(err, StoreError::Permanent { .. }),
            "{name}: a refused signature must be permanent: {err}"
        );
        let text = format!("{err} {err:?} {wrong:?}");
        assert!(
            !text.contains("a-wrong-secret-value"),
            "{name}: secret in {text}"
        );
    }
    eprintln!("{name}: error mapping ... ok");
}

#[tokio::test]
async fn s3_unreachable_endpoint_is_transient() {
    let port = free_port();
    let opts = S3Options {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..S3Options::default()
    };
    let store =
        S3Store::with_credentials("b", "", &opts, "id", "secret-never-shown").expect("store");
    let err = store.get("k").await.expect_err("nothing listens");
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("s3://b/"), "{err}");
    assert!(!err.to_string().contains("secret-never-shown"), "{err}");
}

/// Sanity check of the suite itself: a store that overwrites on a conditional create must
/// fail it (the flaky wrapper's hook deletes the key first, behind the caller's back).
#[tokio::test]
async fn suite_catches_a_broken_store() {
    let forgetful = || -> Store {
        let store = flaky_memory();
        store.set_hook(|call: Call| {
            Box::pin(async move {
                if call.op == "put_if_absent" {
                    // Overwrites instead of refusing: the bug the suite exists to catch.
                    call.inner.delete_many(&call.keys).await?;
                }
                Ok(())
            })
        });
        store
    };
    let result = tokio::spawn(async move {
        run_suite("forgetful", cases![put_if_absent_first_wins], |_| {
            forgetful()
        })
        .await
    })
    .await;
    assert!(
        result.is_err(),
        "the suite must fail a store that overwrites"
    );
}
