//! `tinylag init` and `tinylag journal info|inspect` through the real binary, on a local
//! directory and on a real S3 server; epoch claims racing on a local store.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use bytes::Bytes;
use tinylag::journal::consumer::{self, ConsumerState};
use tinylag::journal::epoch::{claim_next, ensure_not_fenced};
use tinylag::journal::segment::encode_segment;
use tinylag::journal::{JournalError, Manifest, Op, Record};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;

fn tinylag(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinylag"))
        .args(args)
        .env("TINYLAG_LOG", "warn")
        .output()
        .expect("run tinylag")
}

fn ok(args: &[&str]) -> String {
    let out = tinylag(args);
    assert!(
        out.status.success(),
        "tinylag {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = tinylag(args);
    assert!(!out.status.success(), "tinylag {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if dir.exists() {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                out.extend(tree(&e.path()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn init_then_info_on_a_local_directory() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let primary = dir.path().join("primary.img");
    let j = journal.to_str().unwrap();
    let p = primary.to_str().unwrap();
    ok(&[
        "init",
        "--journal",
        j,
        "--size",
        "64M",
        "--primary",
        p,
        "--splay",
        "3",
    ]);
    let meta = std::fs::metadata(&primary).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) < 64,
        "primary is sparse"
    );

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["journal", "info", "--journal", j, "--json"])).unwrap();
    assert_eq!(info["manifest"]["devices"][0]["size"], 64 << 20);
    assert_eq!(info["manifest"]["splay_width"], 3);
    assert_eq!(info["manifest"]["block_size"], 4096);
    assert_eq!(info["head"]["next_seq"], 0);
    assert_eq!(info["head"]["last_lsn"], 0);
    assert_eq!(info["consumers"].as_array().unwrap().len(), 0);
    let text = ok(&["journal", "info", "--journal", j]);
    assert!(text.contains("64.0 MiB"), "{text}");

    // A second init is refused and changes nothing.
    let before = std::fs::read(journal.join("tinylag.json")).unwrap();
    let err = fails(&["init", "--journal", j, "--size", "1G"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(journal.join("tinylag.json")).unwrap(), before);
}

#[test]
fn bad_values_name_the_flag_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let j = journal.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--size", "4X"], "--size"),
        (&["--size", "4G", "--block-size", "1000"], "block-size"),
        (&["--size", "4G", "--region-size", "3M"], "region-size"),
        (&["--size", "4G", "--splay", "0"], "--splay"),
        (&["--size", "4G", "--segment-size", "1K"], "segment-size"),
        (&["--size", "4097"], "size"),
    ];
    for (extra, flag) in cases {
        let mut args = vec!["init", "--journal", j];
        args.extend_from_slice(extra);
        let err = fails(&args);
        assert!(err.contains(flag), "{args:?}: {err}");
    }
    let err = fails(&["init", "--journal", "ftp://x", "--size", "4G"]);
    assert!(err.contains("s3://"), "{err}");
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));

    // An existing primary of the wrong size is refused before the journal is created.
    let primary = dir.path().join("p.img");
    std::fs::write(&primary, vec![0u8; 8192]).unwrap();
    let err = fails(&[
        "init",
        "--journal",
        j,
        "--size",
        "4G",
        "--primary",
        primary.to_str().unwrap(),
    ]);
    assert!(err.contains("--primary"), "{err}");
    assert!(!journal.exists());
    let err = fails(&["journal", "info", "--journal", j]);
    assert!(err.contains("tinylag init"), "{err}");
}

fn rec(lsn: u64, op: Op) -> Record {
    Record {
        lsn,
        timestamp_ns: 1_795_000_000_000_000_000 + lsn * 1_000_000,
        dev: 0,
        op,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_lists_records_and_info_shows_consumer_lag() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let j = journal.to_str().unwrap().to_string();
    ok(&["init", "--journal", &j, "--size", "16M", "--splay", "2"]);
    let store = LocalStore::new(&journal);
    let manifest = Manifest::load(&store).await.unwrap();
    let data = Bytes::from(vec![7u8; 8192]);
    let seg0 = vec![
        rec(1, Op::Epoch { epoch: 1 }),
        rec(
            2,
            Op::Write {
                offset: 0,
                data: data.clone(),
            },
        ),
        rec(
            3,
            Op::Discard {
                offset: 4096,
                len: 4096,
            },
        ),
    ];
    let seg1 = vec![rec(4, Op::Flush), rec(5, Op::Write { offset: 8192, data })];
    for (seq, records) in [(0u64, &seg0), (1, &seg1)] {
        let first = records[0].lsn;
        let bytes = encode_segment(manifest.uuid, 1, seq, first, records).unwrap();
        store
            .put_if_absent(&manifest.segment_key(seq), bytes)
            .await
            .unwrap();
    }
    consumer::register(
        &store,
        &ConsumerState {
            name: "dr".into(),
            next_seq: 1,
            applied_lsn: 3,
            applied_timestamp_ns: seg0[2].timestamp_ns,
            consistent_lsn: 3,
            consistent_seq: 1,
            consistent_timestamp_ns: seg0[2].timestamp_ns,
            delay_ns: 0,
            replica: "/r.img".into(),
            registered_at_ns: 0,
            updated_at_ns: 0,
            undo: Default::default(),
            verify: Default::default(),
            seed: Default::default(),
            chain_epoch: 0,
        },
    )
    .await
    .unwrap();

    let lines = ok(&["journal", "inspect", "--journal", &j, "--json"]);
    let recs: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<_> = recs.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["EPOCH", "WRITE", "DISCARD", "FLUSH", "WRITE"]);
    assert_eq!(recs[1]["length"], 8192);
    assert!(
        recs[1]["compressed"].as_bool().unwrap(),
        "zeros-ish data compresses"
    );
    assert_eq!(recs[4]["seq"], 1);

    let from1 = ok(&[
        "journal",
        "inspect",
        "--journal",
        &j,
        "--seq",
        "1",
        "--json",
    ]);
    assert_eq!(from1.lines().count(), 2);
    let t = format!("@{}", (seg1[0].timestamp_ns as f64) / 1e9);
    let from_t = ok(&[
        "journal",
        "inspect",
        "--journal",
        &j,
        "--from-time",
        &t,
        "--json",
    ]);
    assert_eq!(from_t.lines().count(), 2, "{from_t}");
    let limited = ok(&["journal", "inspect", "--journal", &j, "--limit", "2"]);
    assert_eq!(limited.lines().count(), 3, "header + 2: {limited}");

    let info: serde_json::Value =
        serde_json::from_str(&ok(&["journal", "info", "--journal", &j, "--json"])).unwrap();
    assert_eq!(info["head"]["next_seq"], 2);
    assert_eq!(info["head"]["last_lsn"], 5);
    assert_eq!(info["segments"], 2);
    let c = &info["consumers"][0];
    assert_eq!(c["name"], "dr");
    assert_eq!(c["lag_records"], 2);
    assert!(c["lag_bytes"].as_u64().unwrap() > 0);
    assert!((c["lag_seconds"].as_f64().unwrap() - 0.002).abs() < 1e-6);
}

/// `inspect` reads only indexes, yet a segment whose header is zeroed or damaged is an
/// error naming the object, not a listing that exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_fails_on_a_segment_with_a_zeroed_or_corrupt_header() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j");
    let j = journal.to_str().unwrap().to_string();
    ok(&["init", "--journal", &j, "--size", "16M", "--splay", "2"]);
    let store = LocalStore::new(&journal);
    let manifest = Manifest::load(&store).await.unwrap();
    for seq in 0..2u64 {
        let lsn = seq + 1;
        let records = [rec(lsn, Op::Flush)];
        let bytes = encode_segment(manifest.uuid, 1, seq, lsn, &records).unwrap();
        store
            .put_if_absent(&manifest.segment_key(seq), bytes)
            .await
            .unwrap();
    }
    assert_eq!(
        ok(&["journal", "inspect", "--journal", &j, "--json"])
            .lines()
            .count(),
        2
    );
    let key = manifest.segment_key(1);
    let path = journal.join(&key);
    let good = std::fs::read(&path).unwrap();
    let mut zeroed = good.clone();
    zeroed[..72].fill(0);
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    for (what, bad) in [("zeroed", zeroed), ("one flipped bit", flipped)] {
        std::fs::write(&path, &bad).unwrap();
        for json in [false, true] {
            let mut args = vec!["journal", "inspect", "--journal", &j];
            if json {
                args.push("--json");
            }
            let err = fails(&args);
            assert!(err.contains(&key), "{what}: {err}");
        }
    }
}

/// Two writers starting at once on one local directory: exactly one ends up the owner.
#[test]
fn concurrent_epoch_claims_on_a_local_store_give_one_owner() {
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (path, barrier) = (dir.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    // Separate store instances: nothing shared but the directory.
                    let store = LocalStore::new(&path);
                    barrier.wait();
                    rt.block_on(claim_next(&store, i))
                })
            })
            .collect();
        let claims: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let store = LocalStore::new(dir.path());
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut owners = 0;
        for claim in &claims {
            match claim {
                Ok(c) => {
                    if rt.block_on(ensure_not_fenced(&store, c.epoch)).is_ok() {
                        owners += 1;
                    }
                }
                Err(JournalError::EpochContended { .. }) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        assert_eq!(owners, 1, "round {round}: {claims:?}");
    }
}

fn tinylag_with_env(args: &[&str], env: &[(&'static str, String)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinylag"))
        .args(args)
        .env("TINYLAG_LOG", "debug")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run tinylag")
}

async fn init_and_info_on(kind: support::s3::S3ServerKind) {
    let Some(server) = support::s3::S3Server::start(kind).await else {
        return;
    };
    let env = server.child_env();
    let uri = server.uri("journals/j1");
    let init = tinylag_with_env(&["init", "--journal", &uri, "--size", "1G"], &env);
    let all_output = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(init.status.success(), "{}", all_output(&init));
    let info = tinylag_with_env(&["journal", "info", "--journal", &uri, "--json"], &env);
    assert!(info.status.success(), "{}", all_output(&info));
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(json["manifest"]["devices"][0]["size"], 1u64 << 30);
    assert_eq!(
        json["journal"],
        format!("s3://{}/journals/j1/", support::s3::BUCKET)
    );

    let again = tinylag_with_env(&["init", "--journal", &uri, "--size", "1G"], &env);
    assert!(!again.status.success());
    assert!(
        all_output(&again).contains("already exists"),
        "{}",
        all_output(&again)
    );

    // Wrong credentials: a clear error, and the secret never appears in any output.
    let mut bad_env = env.clone();
    bad_env.retain(|(k, _)| *k != "AWS_SECRET_ACCESS_KEY");
    bad_env.push(("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print".into()));
    let denied = tinylag_with_env(&["journal", "info", "--journal", &uri], &bad_env);
    // moto accepts any credentials; s3s-fs checks signatures.
    if kind == support::s3::S3ServerKind::S3sFs {
        assert!(!denied.status.success(), "{}", all_output(&denied));
    }
    for out in [&init, &info, &again, &denied] {
        let text = all_output(out);
        assert!(
            !text.contains(support::s3::SECRET_KEY),
            "secret leaked: {text}"
        );
        assert!(
            !text.contains("wrong-secret-do-not-print"),
            "secret leaked: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_info_on_s3s_fs() {
    init_and_info_on(support::s3::S3ServerKind::S3sFs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_then_info_on_moto() {
    init_and_info_on(support::s3::S3ServerKind::Moto).await;
}
