//! One memory bound across all NBD connections of `tinylag serve` (`--max-buffered`):
//! clients that pipeline large reads and never take the replies are stopped from being
//! read once the server holds the cap, the real process's memory stays bounded, and a
//! bystander on another connection keeps writing and reading.

mod support;

use std::time::Duration;

use support::daemon::{init, Daemon};
use support::nbd::{pattern, wire, RawClient};
use support::procs::path;

const MIB: u64 = 1 << 20;
/// Connections that pipeline reads and never read a reply.
const HOGS: usize = 32;
/// Reads each of them sends: 128 MiB per connection, what one connection alone was
/// allowed to make the server hold before the bound.
const READS_PER_HOG: u64 = 4;
/// The largest read the server accepts.
const READ_LEN: u32 = 32 << 20;
const POOL: u64 = 64 * MIB;
const MAX_BUFFERED: u64 = 256 * MIB;

#[test]
fn hogs_pipelining_large_reads_are_bounded_and_a_bystander_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let primary = dir.path().join("primary.img");
    let journal = dir.path().join("journal");
    init(path(&journal), &primary, "2G", &[], &[]);
    let daemon = Daemon::start(
        &primary,
        path(&journal),
        &["--pool-size", "64M", "--max-buffered", "256M"],
        &[],
    );
    let (idle_rss, _) = daemon.memory();

    let mut hogs = Vec::new();
    for hog in 0..HOGS as u64 {
        let (mut client, size, _) = RawClient::go(&daemon.socket, "");
        for read in 0..READS_PER_HOG {
            let offset = ((hog * READS_PER_HOG + read) * u64::from(READ_LEN)) % size;
            client.request(0, wire::CMD_READ, read, offset, READ_LEN, &[]);
        }
        hogs.push(client);
    }
    // Every hog has sent its reads; once the server holds what it may, the hogs are
    // waiting for bytes (none will come back: nobody reads the replies). All but one: the
    // shared part of the cap (3/4, 192 MiB) fits one hog's four reads whole.
    let status = daemon.wait_status(Duration::from_secs(60), "the hogs throttled", |s| {
        s["nbd_buffers"]["throttled"].as_u64() >= Some(HOGS as u64 - 1)
    });
    let held = status["nbd_buffers"]["held"].as_u64().unwrap();
    assert!(held >= 4 * u64::from(READ_LEN), "{status:#}");
    assert!(held <= MAX_BUFFERED, "{status:#}");

    // A bystander connects, writes and reads back, while the hogs hold their share.
    let (mut bystander, _, _) = RawClient::go(&daemon.socket, "");
    for i in 0..32u64 {
        let len = if i % 4 == 0 { MIB as usize } else { 4096 };
        let offset = 1536 * MIB + i * 2 * MIB;
        let data = pattern(i, len);
        bystander.write(offset, &data);
        assert!(
            bystander.read(offset, len as u32) == data,
            "bystander read back other data at {offset}"
        );
    }

    let (rss, _) = daemon.memory();
    let status = daemon.status();
    let buffers = &status["nbd_buffers"];
    eprintln!(
        "serve RSS {} MiB (idle {} MiB), NBD buffers held {} MiB",
        rss / MIB,
        idle_rss / MIB,
        buffers["held"].as_u64().unwrap_or(0) / MIB
    );
    assert!(
        rss < POOL + MAX_BUFFERED + 64 * MIB,
        "serve RSS {} MiB (idle {} MiB) is over pool + cap + 64 MiB; status:\n{status:#}",
        rss / MIB,
        idle_rss / MIB
    );
    assert!(
        buffers["peak"].as_u64().unwrap() <= MAX_BUFFERED,
        "{status:#}"
    );
    assert!(
        buffers["throttled_total"].as_u64().unwrap() >= HOGS as u64 - 1,
        "{status:#}"
    );
    assert_eq!(buffers["cap"].as_u64(), Some(MAX_BUFFERED));
    // And `status` says so to a person.
    let text = support::daemon::tinylag_ok(&["status", "--control", path(&daemon.control)], &[]);
    let line = text
        .lines()
        .find(|l| l.starts_with("nbd buffers"))
        .unwrap_or_else(|| panic!("no nbd buffers line in:\n{text}"));
    assert!(
        line.contains("of 256.0 MiB held") && line.contains("connections throttled now"),
        "{line}"
    );

    // The hogs hang up: everything they held comes back, the bystander's own buffers
    // are all that is left.
    drop(hogs);
    let status = daemon.wait_status(Duration::from_secs(60), "the hogs' bytes back", |s| {
        s["nbd_buffers"]["held"].as_u64().unwrap() < MIB
            && s["nbd_buffers"]["throttled"].as_u64() == Some(0)
    });
    assert_eq!(status["mode"], "logging", "{status:#}");
    bystander.write(0, &pattern(99, 4096));
    assert!(bystander.read(0, 4096) == pattern(99, 4096));
    drop(bystander);
    let mut daemon = daemon;
    daemon.stop_ok();
}

#[test]
fn a_max_buffered_below_two_requests_is_refused_by_name() {
    let out = support::daemon::tinylag(
        &[
            "serve",
            "--primary",
            "/nonexistent",
            "--journal",
            "/nonexistent",
            "--max-buffered",
            "32M",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-buffered") && stderr.contains("at least 64M"),
        "{stderr}"
    );
}
