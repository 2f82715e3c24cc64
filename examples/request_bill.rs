//! The request bill for `bench/requests.sh`: what 1 GiB of 1 MiB writes and one agent
//! catching up cost the journal store, and what an idle `serve` plus one idle agent cost an
//! hour, by request kind, measured in-process with the counting store (the same
//! measurements `tests/requests.rs` asserts). Prints one JSON object.
//!
//! ```text
//! request_bill
//! ```

// The test-support files the measurements need (the rest of `tests/support` expects to be
// built as a test); `request_bill` finds `pattern` as `super::nbd`, which re-exports the
// tear-down of `teardown` (itself using `procs`).
#[path = "../tests/support/nbd.rs"]
#[allow(dead_code, unused_imports)]
mod nbd;
#[path = "../tests/support/procs.rs"]
#[allow(dead_code)]
mod procs;
#[path = "../tests/support/request_bill.rs"]
#[allow(dead_code)]
mod request_bill;
#[path = "../tests/support/teardown.rs"]
#[allow(dead_code)]
mod teardown;

use serde_json::json;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (polls, agent_per_minute, lease_per_minute, lease, renewals) =
        request_bill::idle_minute().await;
    let per_renewal = |n: u64| n as f64 / renewals as f64;
    let renewals_an_hour = 60.0 * 60.0 / (request_bill::DEFAULT_LEASE.as_secs_f64() / 3.0);
    let commits_an_hour = agent_per_minute * 60.0 - polls.total() as f64 * 60.0;
    let idle_hour = json!({
        "agent_get": polls.get * 60,
        "agent_head": polls.head * 60,
        "agent_list": polls.list * 60,
        "agent_put_commits": commits_an_hour,
        "lease_head": per_renewal(lease.head) * renewals_an_hour,
        "lease_put": per_renewal(lease.put) * renewals_an_hour,
        "total": (agent_per_minute + lease_per_minute) * 60.0,
        "per_second": (agent_per_minute + lease_per_minute) / 60.0,
    });
    let bill = request_bill::gib_bill().await;
    let kinds = |c: tinylag::store::RequestCounts| {
        json!({
            "put": c.put_if_absent + c.put,
            "get": c.get + c.get_range + c.get_tail,
            "head": c.head,
            "list": c.list,
            "delete": c.delete_many,
            "total": c.total(),
        })
    };
    let gib = json!({
        "segments": bill.segments,
        "full_segments": bill.full_segments,
        "write": kinds(bill.written),
        "replay": kinds(bill.replayed),
        "lease_during_replay": kinds(bill.renewals),
        "agent_open": kinds(bill.opening),
        "total": bill.total(),
        "per_8mib_segment": bill.total() as f64 / bill.full_segments as f64,
        "replica_matches": bill.applied_lsn == bill.last_lsn,
    });
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"idle_hour": idle_hour, "gib": gib})).unwrap()
    );
}
