//! Heap allocations per NBD request on the primary's write and read paths (issue 23): a
//! counting global allocator in this test binary, 10,000 pipelined 4 KiB requests through
//! the real NBD server over the primary core (`serve --no-journal`'s stack: `PrimaryCore`
//! over a file target (`block::file::open`), on the engine `TINYLAG_IO_ENGINE` selects), and the count per
//! request held to the budget docs/DESIGN.md states under `# Invariants`.
//!
//! Only the server's allocations are counted: the client thread marks itself exempt, and
//! builds every request in one buffer before the counting starts.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use support::nbd::wire::*;
use support::nbd::{test_runtime, RawClient, TestServer};
use tinylag::block::file::{self, FileOptions};
use tinylag::nbd::Export;
use tinylag::writer::{Labels, PrimaryCore};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The client thread: its allocations are not the server's.
    static EXEMPT: Cell<bool> = const { Cell::new(false) };
}

// SAFETY: every call is passed on to the system allocator unchanged; counting touches only
// atomics and a const-initialised thread-local (neither allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

fn count() {
    if COUNTING.load(Ordering::Relaxed) && !EXEMPT.try_with(Cell::get).unwrap_or(true) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const REQUESTS: u64 = 10_000;
const DEPTH: u64 = 32;
const BLOCK: u64 = 4096;
const SIZE: u64 = 64 << 20;

/// The budgets of docs/DESIGN.md ("Invariants", "Per-request costs"): heap allocations per
/// 4 KiB request through the NBD server and the primary core without a journal. A write: its
/// request task, its payload (which becomes the journal record's), and the boxed futures of
/// the core's and the file's `BlockDevice::write`; a read the same with its reply buffer for
/// the payload. Anything more per request (a map node, a channel, a clone of a name) fails.
const WRITE_BUDGET: f64 = 4.0;
const READ_BUDGET: f64 = 4.0;
/// Allowed on top, per request: what is amortised over many (channel blocks, slab and queue
/// growth) and the engine's path for writes while inline writes pause after a slow one.
/// Less than one, so one more allocation per request still fails.
const AMORTISED: f64 = 0.75;

/// A server of one export: the primary core without a journal over a file.
fn server() -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("primary.img");
    file::create_sparse(&path, SIZE).expect("create image");
    let engine = tinylag::block::engine::select()
        .expect("TINYLAG_IO_ENGINE")
        .engine;
    // The io_uring engine completes on the runtime it was opened on: the server's.
    let runtime = test_runtime();
    let core = runtime.block_on(async {
        let device = file::open(
            &path,
            FileOptions {
                engine,
                ..FileOptions::new(512)
            },
        )
        .expect("open image");
        PrimaryCore::start(device, Labels::default(), None)
            .await
            .expect("core")
    });
    TestServer::serve_exports_on(
        runtime,
        dir,
        vec![Export {
            name: "primary".into(),
            description: String::new(),
            device: Arc::new(core),
        }],
        None,
    )
}

/// Sends `REQUESTS` requests of `command` (all built before counting starts) `DEPTH` at a
/// time and reads their replies; returns the server's allocations per request.
fn allocations_per_request(client: &mut RawClient, command: u16) -> f64 {
    EXEMPT.with(|e| e.set(true));
    let payload = if command == CMD_WRITE { BLOCK } else { 0 };
    let mut batches = Vec::new();
    for b in 0..REQUESTS / DEPTH {
        let mut buf = Vec::with_capacity((DEPTH * (28 + payload)) as usize);
        for i in 0..DEPTH {
            let n = b * DEPTH + i;
            // Spread over the device, never two in flight on the same block.
            let offset = (n * 7919 % (SIZE / BLOCK)) * BLOCK;
            buf.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            buf.extend_from_slice(&0u16.to_be_bytes());
            buf.extend_from_slice(&command.to_be_bytes());
            buf.extend_from_slice(&n.to_be_bytes());
            buf.extend_from_slice(&offset.to_be_bytes());
            buf.extend_from_slice(&(BLOCK as u32).to_be_bytes());
            buf.resize(buf.len() + payload as usize, (n % 251) as u8);
        }
        batches.push(buf);
    }
    let reply_len = (16 + if command == CMD_READ { BLOCK } else { 0 }) as usize;
    let mut replies = vec![0u8; reply_len * DEPTH as usize];
    // One round first, so that what is allocated once (buffers, rings, pools, task slots)
    // is not counted.
    round(client, &batches[0], &mut replies);
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for batch in &batches {
        round(client, batch, &mut replies);
    }
    COUNTING.store(false, Ordering::SeqCst);
    let sent = batches.len() as u64 * DEPTH;
    ALLOCATIONS.load(Ordering::SeqCst) as f64 / sent as f64
}

/// One batch out, all its replies back (checked: success, every handle once).
fn round(client: &mut RawClient, batch: &[u8], replies: &mut [u8]) {
    let stream = client.stream();
    stream.write_all(batch).expect("send batch");
    stream.read_exact(replies).expect("read replies");
    let each = replies.len() / DEPTH as usize;
    for reply in replies.chunks(each) {
        assert_eq!(
            &reply[0..4],
            &SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "reply magic"
        );
        assert_eq!(&reply[4..8], &[0; 4], "request failed");
    }
}

#[test]
fn a_4k_request_allocates_within_its_budget() {
    let server = server();
    let (mut client, _, _) = RawClient::go(server.socket(), "primary");
    let writes = allocations_per_request(&mut client, CMD_WRITE);
    let reads = allocations_per_request(&mut client, CMD_READ);
    eprintln!("heap allocations per 4 KiB request: write {writes:.3}, read {reads:.3}");
    assert!(
        writes <= WRITE_BUDGET + AMORTISED,
        "a 4 KiB write allocates {writes:.3} times, budget {WRITE_BUDGET} (+{AMORTISED})"
    );
    assert!(
        reads <= READ_BUDGET + AMORTISED,
        "a 4 KiB read allocates {reads:.3} times, budget {READ_BUDGET} (+{AMORTISED})"
    );
}
