use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus_client::collector::Collector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::primary::PrimaryScrape;
use super::replica::ReplicaScrape;
use super::*;
use crate::replayer::ReplicaStatus;
use crate::store::memory::MemoryStore;
use crate::store::ObjectStore;
use crate::writer::{sample_status, LagBuckets, Mode};

/// A source that hands out a fixed scrape.
struct Fixed(fn() -> Box<dyn Collector>);

#[async_trait]
impl Source for Fixed {
    async fn collect(&self) -> Box<dyn Collector> {
        (self.0)()
    }
}

fn primary() -> Box<dyn Collector> {
    Box::new(PrimaryScrape {
        status: sample_status(Mode::ForwardPart),
        durable_lag: Some(LagBuckets {
            buckets: vec![(0.001, 2), (0.002, 3), (f64::INFINITY, 1)],
            count: 6,
            sum_seconds: 0.25,
        }),
    })
}

fn replica() -> Box<dyn Collector> {
    let status: ReplicaStatus = serde_json::from_value(serde_json::json!({
        "role": "replica", "name": "dr", "journal": "/j", "replica": "/r.img",
        "undo": "/r.img.undo", "delay_ns": 3_000_000_000u64, "state": "catching-up",
        "error": null, "applied_lsn": 40, "applied_timestamp_ns": 1, "applied_time": null,
        "consistent_lsn": 40, "consistent_time": null, "in_resync_span": false,
        "head_lsn": 100, "head_time": null, "lag_records": 60, "lag_bytes": 6000,
        "lag_bytes_estimated": false, "lag_seconds": 4.5, "lag_beyond_delay_seconds": 1.5,
        "delay": "3s", "next_due_time": null, "undo_bytes": 123, "undo_segments": 2,
        "verify": {"checked": 5, "mismatches": 1, "skipped": 0, "last_lsn": 9,
                   "mismatched": [{"lsn": 9, "timestamp_ns": 1, "offset": 0, "len": 4096}]},
        "seed": {"by": "checking", "lsn": 0, "unproven": [[1, 3], [5, 6]], "mismatched": [[5, 6]]},
        "records_applied": 40, "bytes_applied": 4096, "batches_applied": 3, "recovery": null,
        "time_spent": {"preimage_ms": 1500, "undo_ms": 0, "apply_ms": 0, "sync_ms": 0,
                       "commit_ms": 0},
        "started_time": "2026-01-01T00:00:00Z"
    }))
    .expect("a replica status");
    Box::new(ReplicaScrape(status))
}

fn line_value(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(str::to_string)
    })
}

#[tokio::test]
async fn primary_series_carry_the_status_values() {
    let hub = Hub::new();
    hub.add_source(Arc::new(Fixed(primary)));
    let text = hub.render(Format::Text).await;
    let l = r#"journal="s3://bucket/j",device="""#;
    let v = |name: &str| line_value(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    assert_eq!(
        v(&format!("tinylag_mode{{{l},mode=\"forward-part\"}}")),
        "1"
    );
    assert_eq!(v(&format!("tinylag_mode{{{l},mode=\"logging\"}}")), "0");
    assert_eq!(v(&format!("tinylag_head_lsn{{{l}}}")), "100");
    assert_eq!(v(&format!("tinylag_durable_lsn{{{l}}}")), "90");
    assert_eq!(v(&format!("tinylag_journal_lag_records{{{l}}}")), "10");
    assert_eq!(v(&format!("tinylag_journal_lag_seconds{{{l}}}")), "0.25");
    assert_eq!(
        v(&format!("tinylag_pool_capacity_bytes{{{l}}}")),
        "536870912"
    );
    assert_eq!(v(&format!("tinylag_segments_uploaded_total{{{l}}}")), "7");
    assert_eq!(
        v(&format!(
            "tinylag_primary_requests_total{{{l},op=\"write\"}}"
        )),
        "110"
    );
    // Regions left times the region size, plus what is done.
    assert_eq!(
        v(&format!("tinylag_resync_total_bytes{{{l}}}")),
        ((8u64 << 20) + 3 * (4 << 20)).to_string()
    );
    // Buckets are cumulative in the exposition.
    assert_eq!(
        v(&format!(
            "tinylag_ack_to_durable_seconds_bucket{{{l},le=\"0.002\"}}"
        )),
        "5"
    );
    assert_eq!(
        v(&format!(
            "tinylag_ack_to_durable_seconds_bucket{{{l},le=\"+Inf\"}}"
        )),
        "6"
    );
    assert_eq!(
        v(&format!("tinylag_ack_to_durable_seconds_count{{{l}}}")),
        "6"
    );
    assert!(
        text.contains("# TYPE tinylag_uploaded_bytes_total counter"),
        "{text}"
    );
    assert!(
        !text.contains("# EOF"),
        "the 0.0.4 text format has no EOF marker"
    );
    assert!(
        !text.contains("s3://bucket/j:"),
        "no credentials or endpoints beyond the name"
    );
}

#[tokio::test]
async fn replica_series_carry_the_status_values() {
    let hub = Hub::new();
    hub.add_source(Arc::new(Fixed(replica)));
    let text = hub.render(Format::OpenMetrics).await;
    let l = r#"journal="/j",consumer="dr""#;
    let v = |name: &str| line_value(&text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    assert_eq!(
        v(&format!(
            "tinylag_replica_state{{{l},state=\"catching-up\"}}"
        )),
        "1"
    );
    assert_eq!(
        v(&format!("tinylag_replica_state{{{l},state=\"idle\"}}")),
        "0"
    );
    assert_eq!(v(&format!("tinylag_replica_lag_records{{{l}}}")), "60");
    assert_eq!(v(&format!("tinylag_replica_lag_seconds{{{l}}}")), "4.5");
    assert_eq!(
        v(&format!("tinylag_replica_lag_beyond_delay_seconds{{{l}}}")),
        "1.5"
    );
    assert_eq!(v(&format!("tinylag_replica_delay_seconds{{{l}}}")), "3.0");
    assert_eq!(v(&format!("tinylag_undo_log_bytes{{{l}}}")), "123");
    assert_eq!(v(&format!("tinylag_verify_mismatches_total{{{l}}}")), "1");
    assert_eq!(
        v(&format!("tinylag_verify_mismatching_regions{{{l}}}")),
        "1"
    );
    assert_eq!(
        v(&format!("tinylag_replica_seed_unproven_regions{{{l}}}")),
        "3"
    );
    assert_eq!(v(&format!("tinylag_replica_seed_assumed{{{l}}}")), "0");
    assert_eq!(
        v(&format!(
            "tinylag_replica_phase_seconds_total{{{l},phase=\"preimage\"}}"
        )),
        "1.5"
    );
    assert!(
        text.ends_with("# EOF\n"),
        "OpenMetrics ends with EOF:\n{text}"
    );
}

#[tokio::test]
async fn store_requests_are_counted_by_operation_and_outcome() {
    let counting = Arc::new(CountingStore::new(Arc::new(MemoryStore::new())));
    counting.put("a", Bytes::from_static(b"1")).await.unwrap();
    counting.head("missing").await.unwrap_err();
    let hub = Hub::new();
    hub.add_store("primary", "journal", counting);
    let text = hub.render(Format::Text).await;
    let series = |op: &str, result: &str| {
        line_value(
            &text,
            &format!(
                "tinylag_store_requests_total{{role=\"primary\",store=\"journal\",op=\"{op}\",result=\"{result}\"}}"
            ),
        )
    };
    assert_eq!(series("put", "ok").as_deref(), Some("1"), "{text}");
    assert_eq!(series("head", "not_found").as_deref(), Some("1"));
    assert_eq!(series("head", "ok").as_deref(), Some("0"));
}

#[test]
fn prometheus_gets_openmetrics_and_curl_gets_text() {
    let prometheus =
        "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3";
    assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
    assert_eq!(Format::from_accept(Some("*/*")), Format::Text);
    assert_eq!(Format::from_accept(None), Format::Text);
}

/// `GET path` over a fresh connection; the whole response.
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn the_endpoint_serves_metrics_and_nothing_else() {
    let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr();
    let hub = Hub::new();
    hub.add_source(Arc::new(Fixed(primary)));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(serve(listener, hub, stopped));
    let ok = get(addr, "GET", "/metrics").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("content-type: text/plain; version=0.0.4"),
        "{ok}"
    );
    assert!(ok.contains("tinylag_head_lsn{"), "{ok}");
    let other = get(addr, "GET", "/").await;
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post = get(addr, "POST", "/metrics").await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    // A second bind of the same port names the flag.
    let busy = bind(addr).await.unwrap_err().to_string();
    assert!(
        busy.starts_with("cannot listen on --metrics-listen 127.0.0.1:"),
        "{busy}"
    );
    stop.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn every_series_is_documented() {
    let doc = include_str!("../../docs/METRICS.md");
    let hub = Hub::new();
    hub.add_source(Arc::new(Fixed(primary)));
    hub.add_source(Arc::new(Fixed(replica)));
    hub.add_store(
        "primary",
        "journal",
        Arc::new(CountingStore::new(Arc::new(MemoryStore::new()))),
    );
    let text = hub.render(Format::Text).await;
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert!(families.len() > 40, "{families:?}");
    for name in families {
        assert!(
            doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}{{")),
            "{name} is not in docs/METRICS.md"
        );
    }
}
