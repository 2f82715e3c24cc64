//! A journal segment deleted behind tinylag's back (an operator's mistake, a lifecycle rule, a
//! bad copy) is a hole, never the end (issue 18). For the first, a middle and the
//! last-but-one segment of a cleanly stopped journal, in a local directory and on the local
//! S3 server: `journal verify`, `journal inspect`, `replay --once`, `restore --at now` and
//! `timeline` exit non-zero naming the missing seq; the replica gets nothing from past the
//! hole; `journal trim` never moves its pointer across it; a restarted `serve` refuses with
//! the choices, and `serve --abandon-after-hole` resyncs the whole device so that the
//! replica converges byte-identical to the primary. Deleting the trim pointer of a trimmed
//! journal is a hole too.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use support::daemon::{init, tinylag, tinylag_bin, tinylag_ok, Daemon};
use support::nbd::{qemu_io_ok, run as run_with_timeout};
use support::s3::{S3Server, S3ServerKind};
use tinylag::journal::{paths, Manifest};
use tinylag::store::LocalStore;
use tinylag::store::ObjectStore;

/// 1 MiB writes into 1 MiB segments: about one segment per write.
const WRITES: u64 = 16;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where the hole goes.
#[derive(Clone, Copy, Debug)]
enum Position {
    First,
    Middle,
    LastButOne,
}

impl Position {
    fn seq(self, next_seq: u64) -> u64 {
        match self {
            Position::First => 0,
            Position::Middle => next_seq / 2,
            Position::LastButOne => next_seq - 2,
        }
    }
}

/// One journal under test: its URI, the environment its commands need and a store handle
/// for deleting objects behind tinylag's back.
struct Journal {
    uri: String,
    env: Vec<(&'static str, String)>,
    store: Arc<dyn ObjectStore>,
}

impl Journal {
    fn run(&self, args: &[&str]) -> Output {
        tinylag(args, &self.env)
    }

    fn ok(&self, args: &[&str]) -> String {
        tinylag_ok(args, &self.env)
    }

    /// Runs `tinylag serve` expecting it to exit by itself (a refusal) within a minute.
    fn serve_refused(&self, primary: &Path, extra: &[&str]) -> Output {
        let mut cmd = Command::new(tinylag_bin());
        cmd.args(["serve", "--primary", s(primary), "--journal", &self.uri])
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TINYLAG_LOG", "warn");
        run_with_timeout(&mut cmd, Duration::from_secs(60))
    }

    fn info(&self) -> serde_json::Value {
        let out = self.ok(&["journal", "info", "--journal", &self.uri, "--json"]);
        serde_json::from_str(&out).expect("journal info --json prints JSON")
    }

    /// Every WRITE record of the journal as (seq, offset, length), from `journal inspect`.
    fn writes(&self) -> Vec<(u64, u64, u64)> {
        let out = self.ok(&["journal", "inspect", "--journal", &self.uri, "--json"]);
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .filter(|r| r["kind"] == "WRITE")
            .map(|r| {
                (
                    r["seq"].as_u64().unwrap(),
                    r["offset"].as_u64().unwrap(),
                    r["length"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    async fn delete(&self, key: &str) {
        self.store.delete_many(&[key.to_string()]).await.unwrap();
    }
}

/// `init`, then `serve` writes [`WRITES`] distinct MiBs and stops cleanly.
fn write_and_stop(journal: &Journal, primary: &Path) {
    init(
        &journal.uri,
        primary,
        "32M",
        &["--segment-size", "1M"],
        &journal.env,
    );
    let mut daemon = Daemon::start(
        primary,
        &journal.uri,
        &["--linger", "50ms", "--compress", "off"],
        &journal.env,
    );
    let writes: Vec<String> = (0..WRITES)
        .map(|i| format!("write -P {} {}M 1M", i + 1, i))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io_ok(&daemon.uri(), &writes);
    daemon.wait_status(Duration::from_secs(60), "the journal to drain", |st| {
        st["durable_lsn"] == st["head_lsn"]
    });
    daemon.stop_ok();
}

fn assert_hole(out: &Output, what: &str, seq: u64) {
    let said = text(out);
    assert!(
        !out.status.success(),
        "{what} exited 0 over a hole:\n{said}"
    );
    assert!(
        said.contains(&format!("journal hole at seq {seq}")),
        "{what} does not name the hole at seq {seq}:\n{said}"
    );
    assert!(
        !said.contains("trimmed?"),
        "{what} gives the wrong advice:\n{said}"
    );
}

async fn scenario(journal: &Journal, dir: &Path, position: Position) {
    let primary = dir.join("primary.img");
    write_and_stop(journal, &primary);
    let next_seq = journal.info()["head"]["next_seq"].as_u64().unwrap();
    assert!(next_seq >= WRITES, "{next_seq} segments");
    let writes = journal.writes();
    let hole = position.seq(next_seq);
    let manifest = Manifest::load(journal.store.as_ref()).await.unwrap();
    journal.delete(&manifest.segment_key(hole)).await;
    eprintln!("{position:?}: deleted seq {hole} of 0..{next_seq}");

    let verify = journal.run(&["journal", "verify", "--journal", &journal.uri]);
    assert_hole(&verify, "journal verify", hole);
    let inspect = journal.run(&["journal", "inspect", "--journal", &journal.uri]);
    assert_hole(&inspect, "journal inspect", hole);

    // The replica gets everything before the hole and nothing after it.
    let replica = dir.join("replica.img");
    let replay = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--journal",
            &journal.uri,
            "--replica",
            s(&replica),
            "--name",
            "dr",
            "--once",
        ];
        args.extend_from_slice(extra);
        journal.run(&args)
    };
    assert_hole(&replay(&[]), "replay --once", hole);
    let image = std::fs::read(&replica).unwrap();
    let wanted = std::fs::read(&primary).unwrap();
    for &(seq, offset, len) in &writes {
        let range = offset as usize..(offset + len) as usize;
        if seq < hole {
            assert!(
                image[range.clone()] == wanted[range],
                "seq {seq} not applied"
            );
        } else {
            assert!(
                image[range].iter().all(|&b| b == 0),
                "the replica holds the write of seq {seq}, past the hole at {hole}"
            );
        }
    }

    let restored = dir.join("restored.img");
    // Now (rounded up to the second): after every write, so past the hole.
    let now = format!(
        "@{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1
    );
    let restore = journal.run(&[
        "restore",
        "--replica",
        s(&replica),
        "--journal",
        &journal.uri,
        "--at",
        &now,
        "--output",
        s(&restored),
    ]);
    assert_hole(&restore, "restore --at now", hole);
    assert!(!restored.exists(), "restore wrote an image past the hole");
    let timeline = journal.run(&[
        "timeline",
        "--replica",
        s(&replica),
        "--journal",
        &journal.uri,
    ]);
    assert_hole(&timeline, "timeline", hole);

    // Trim walks up to the consumer, which waits at the hole: it stops there with the hole as
    // its error, its pointer never across it.
    let trim = journal.run(&[
        "journal",
        "trim",
        "--journal",
        &journal.uri,
        "--retain",
        "0",
    ]);
    assert_hole(&trim, "journal trim", hole);
    assert!(journal.info()["trim"]["first_seq"].as_u64().unwrap() <= hole);

    // A restarted serve refuses, naming the hole and the choices; it claims nothing.
    let refused = journal.serve_refused(&primary, &[]);
    assert_hole(&refused, "serve", hole);
    assert!(
        text(&refused).contains("--abandon-after-hole"),
        "{}",
        text(&refused)
    );
    let verify = journal.run(&["journal", "verify", "--journal", &journal.uri]);
    assert_hole(&verify, "journal verify after the refused serve", hole);

    // --abandon-after-hole: the gap becomes a resync for every consumer, which converges.
    let mut daemon = Daemon::start(
        &primary,
        &journal.uri,
        &["--linger", "50ms", "--abandon-after-hole"],
        &journal.env,
    );
    let status = daemon.wait_status(Duration::from_secs(120), "the resync to end", |st| {
        st["mode"] == "logging" && st["durable_lsn"] == st["head_lsn"]
    });
    assert_eq!(status["start"]["kind"], "full", "{status:#}");
    // Serve says what it abandoned (its start-up lines may follow the first status).
    daemon.wait_log(Duration::from_secs(10), "abandon");
    qemu_io_ok(&daemon.uri(), &["write -P 0xee 30M 64k"]);
    daemon.wait_status(Duration::from_secs(60), "the journal to drain", |st| {
        st["durable_lsn"] == st["head_lsn"]
    });
    daemon.stop_ok();
    journal.ok(&["journal", "verify", "--journal", &journal.uri]);
    let converged = replay(&[]);
    assert!(converged.status.success(), "{}", text(&converged));
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&primary).unwrap(),
        "the replica differs from the primary after --abandon-after-hole"
    );
}

fn local(dir: &Path) -> Journal {
    let path = dir.join("journal");
    Journal {
        uri: path.display().to_string(),
        env: Vec::new(),
        store: Arc::new(LocalStore::new(&path)),
    }
}

async fn local_scenario(position: Position) {
    let dir = tempfile::tempdir().unwrap();
    scenario(&local(dir.path()), dir.path(), position).await;
}

async fn s3_scenario(position: Position) {
    let Some(s3) = S3Server::start(S3ServerKind::S3sFs).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("holes-{position:?}").to_lowercase();
    let journal = Journal {
        uri: s3.uri(&prefix),
        env: s3.child_env(),
        store: Arc::new(s3.store(&prefix)),
    };
    scenario(&journal, dir.path(), position).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_first_segment_missing() {
    local_scenario(Position::First).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_middle_segment_missing() {
    local_scenario(Position::Middle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_last_but_one_segment_missing() {
    local_scenario(Position::LastButOne).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_first_segment_missing() {
    s3_scenario(Position::First).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_middle_segment_missing() {
    s3_scenario(Position::Middle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_last_but_one_segment_missing() {
    s3_scenario(Position::LastButOne).await;
}

/// A trimmed journal whose `trim` pointer is deleted: readers would start at seq 0, long
/// gone. That is a hole (below what the writer and the consumer recorded), not an empty
/// journal, and a restarted `serve` must not write a second history from seq 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_trim_pointer_is_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let journal = local(dir.path());
    let primary = dir.path().join("primary.img");
    write_and_stop(&journal, &primary);
    let replica = dir.path().join("replica.img");
    journal.ok(&[
        "replay",
        "--journal",
        &journal.uri,
        "--replica",
        s(&replica),
        "--name",
        "dr",
        "--once",
    ]);
    journal.ok(&[
        "journal",
        "trim",
        "--journal",
        &journal.uri,
        "--retain",
        "0",
    ]);
    let first = journal.info()["trim"]["first_seq"].as_u64().unwrap();
    assert!(first > 0, "trim deleted nothing");
    journal.delete(paths::TRIM_POINTER).await;

    let verify = journal.run(&["journal", "verify", "--journal", &journal.uri]);
    assert_hole(&verify, "journal verify", 0);
    let refused = journal.serve_refused(&primary, &[]);
    assert_hole(&refused, "serve", 0);
    assert!(
        journal
            .store
            .head(
                &Manifest::load(journal.store.as_ref())
                    .await
                    .unwrap()
                    .segment_key(0)
            )
            .await
            .is_err(),
        "the refused serve wrote seq 0"
    );
}
