//! The request bill (issue 18), asserted with the counting store in front of the journal:
//!
//! - idle: an agent at the head, over 60 s of simulated time (a manual clock driven by its
//!   own poll timer), plus the writer's lease renewals measured over a short real window
//!   and scaled to the default lease term: together at most 1 request/s, no LIST (the
//!   writer looks for resync requests with one HEAD of their doorbell a renewal);
//! - bulk: 1 GiB of 1 MiB writes through the primary core (in-process, memory store, the
//!   lease keeper's store as `serve` wires it), then one agent catching up from the start:
//!   at most 2.2 requests per 8 MiB segment for write and replay together, no HEAD per
//!   upload, no LIST once started, and the replica equal to the primary.
//!
//! In-process rather than the binaries: a debug `serve` behind NBD takes minutes for 1 GiB,
//! and the counting store sees exactly the calls a store would get (one call, one request
//! on S3).

mod support;

use support::oracle::assert_same_image;
use support::request_bill::{gib_bill, idle_minute};
use tinylag::writer::Mode;

/// Idle: the agent's polls back off and the lease costs three requests a renewal (the fence
/// check, the PUT, the HEAD of the resync requests' doorbell); with the defaults, the two
/// together stay under one request a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_serve_and_one_agent_cost_at_most_one_request_a_second() {
    let (polls, agent_per_minute, lease_per_minute, lease, renewals) = idle_minute().await;
    assert_eq!(
        polls.total(),
        polls.get,
        "only GETs of the next segment: {polls:?}"
    );
    assert!(
        polls.get <= 13,
        "polls back off to one per 5 s when idle: {polls:?}"
    );
    // At most the resync requests' one LIST when their watcher started, none a renewal.
    assert!(lease.list <= 1, "no LIST a renewal: {lease:?}");
    // Each renewal: the fence check, the PUT and the doorbell (one more may be on its way).
    assert!(
        lease.total() <= 3 * (renewals + 1),
        "{lease:?} for {renewals} renewals"
    );
    let per_second = (agent_per_minute + lease_per_minute) / 60.0;
    eprintln!(
        "idle: agent {polls:?}, {agent_per_minute} a minute with its commit; lease \
         {lease_per_minute:.1} a minute: {per_second:.2} requests/s"
    );
    assert!(per_second <= 1.0, "{per_second:.2} requests/s");
}

/// 1 GiB of 1 MiB writes, then one agent catching up: about one PUT and one GET per 8 MiB
/// segment, nothing per upload beyond its create, no LIST once started, and the replica
/// equal to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_of_writes_and_its_catch_up_cost_at_most_2_2_requests_a_segment() {
    let bill = gib_bill().await;
    assert_eq!(bill.mode, Mode::Logging, "every write journaled");
    assert_eq!(bill.applied_lsn, bill.last_lsn);
    let (written, replayed, at_rest) = (bill.written, bill.replayed, bill.at_rest);
    let per_segment = bill.total() as f64 / bill.full_segments as f64;
    eprintln!(
        "{} segments: write {written:?}, agent open {:?}, catch-up {replayed:?}, lease \
         meanwhile {:?}: {} requests, {per_segment:.2} a segment of 8 MiB",
        bill.segments,
        bill.opening,
        bill.renewals,
        bill.total()
    );
    assert!(bill.segments >= 128, "{} segments for 1 GiB", bill.segments);
    assert_eq!(
        at_rest.total(),
        at_rest.head + at_rest.put + at_rest.list,
        "only lease renewals at rest: {at_rest:?}"
    );
    assert!(
        written.list <= 1,
        "no LIST but the resync requests' watcher's first look: {written:?}"
    );
    assert_eq!(replayed.list, 0, "{replayed:?}");
    assert!(
        written.head <= 2 * (written.put + 1),
        "no HEAD per upload, only the lease renewals' fence check and resync doorbell: \
         {written:?}"
    );
    assert_eq!(replayed.head, 0, "no HEAD before a GET: {replayed:?}");
    assert!(
        replayed.put <= 1 + replayed.get / 16,
        "commits at most every few seconds, not per batch: {replayed:?}"
    );
    assert!(per_segment <= 2.2, "{per_segment:.2} requests a segment");
    assert_same_image(&bill.primary, &bill.replica);
}
