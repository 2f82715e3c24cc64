//! Prometheus metrics (`--metrics-listen ADDR:PORT` on `serve`, `replay` and `up`): what
//! `status` shows, as series a Prometheus server scrapes from `GET /metrics`.
//!
//! Every value is read at scrape time from the same snapshot the control socket's
//! `{"cmd":"status"}` answers with ([`crate::writer::StatusSnapshot`] for the primary,
//! [`crate::replayer::ReplicaStatus`] for a replay agent), plus the counters the core already
//! keeps (the ack->durable histogram, requests per store call and outcome). So `status
//! --json` and a scrape taken at the same quiet moment agree, and nothing is counted twice.
//!
//! Names follow Prometheus conventions: `tinylag_` prefix, base units in the name
//! (`_bytes`, `_seconds`), counters end in `_total`. Primary series carry the labels
//! `journal` and `device`; replica series `journal` and `consumer`; store requests `role`
//! (`primary`/`replica`), `store` (`journal`/`undo`), `op` and `result`. The full list is
//! in README.md ("Metrics").
//!
//! The exposition is OpenMetrics when the scraper asks for it (Prometheus does) and the
//! Prometheus text format 0.0.4 otherwise (curl, `promtool check metrics`).
//!
//! Must never: carry credentials (labels are store display names, which never hold them);
//! block the daemon's I/O or the replay agent (a scrape reads atomics and takes the status
//! board's lock briefly, like `status`); serve anything but `GET /metrics`.

mod nbd;
mod primary;
mod replica;
mod server;

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::store::counting::{CountingStore, Operation, Outcome};

pub use nbd::NbdBuffersSource;
pub use primary::PrimarySource;
pub use replica::ReplicaSource;
pub use server::{bind, serve, MetricsListener};

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address given to `--metrics-listen` cannot be bound (in use, not local, no
    /// permission).
    #[error("cannot listen on --metrics-listen {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Something that contributes series to a scrape: the primary core, a replay agent.
#[async_trait]
pub trait Source: Send + Sync {
    /// The series as of now, as a collector the registry encodes.
    async fn collect(&self) -> Box<dyn Collector>;
}

/// The label set of one series.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// Which exposition format a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0` (ends with `# EOF`).
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Text,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it, the classic text format otherwise.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// A store wrapped in a [`CountingStore`], with the labels its requests are exported under.
struct CountedStore {
    role: &'static str,
    store: &'static str,
    counts: Arc<CountingStore>,
}

/// The sources and counted stores of one endpoint (`up` puts the primary and the replica
/// behind the same one).
#[derive(Default)]
pub struct Hub {
    sources: Mutex<Vec<Arc<dyn Source>>>,
    stores: Mutex<Vec<CountedStore>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    pub fn add_source(&self, source: Arc<dyn Source>) {
        lock(&self.sources).push(source);
    }

    /// Exports the requests made through `counts` as `tinylag_store_requests_total{role,
    /// store, op, result}`.
    pub fn add_store(&self, role: &'static str, store: &'static str, counts: Arc<CountingStore>) {
        lock(&self.stores).push(CountedStore {
            role,
            store,
            counts,
        });
    }

    /// One scrape: every source's series and the store requests, encoded as `format`.
    pub async fn render(&self, format: Format) -> String {
        let sources: Vec<Arc<dyn Source>> = lock(&self.sources).clone();
        let mut registry = Registry::with_prefix("tinylag");
        for source in sources {
            registry.register_collector(source.collect().await);
        }
        let stores = StoreRequests(
            lock(&self.stores)
                .iter()
                .flat_map(|s| {
                    Operation::ALL.iter().flat_map(move |&op| {
                        Outcome::ALL.iter().map(move |&outcome| {
                            (
                                vec![
                                    ("role", s.role.to_string()),
                                    ("store", s.store.to_string()),
                                    ("op", op.name().to_string()),
                                    ("result", outcome.name().to_string()),
                                ],
                                s.counts.count(op, outcome),
                            )
                        })
                    })
                })
                .collect(),
        );
        if !stores.0.is_empty() {
            registry.register_collector(Box::new(stores));
        }
        let mut out = String::new();
        let encoded = match format {
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
        };
        // Writing into a String cannot fail; an encoder error would be a bug in a name.
        if let Err(e) = encoded {
            tracing::error!("encoding metrics failed: {e}");
        }
        out
    }
}

// A scrape reads counters a panicking writer left whole (each update is one assignment).
use crate::sync::lock;

/// `tinylag_store_requests_total`, as of the scrape.
#[derive(Debug)]
struct StoreRequests(Vec<(Labels, u64)>);

impl Collector for StoreRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        counter(
            &mut encoder,
            "store_requests",
            "Object-store calls by the daemon, by operation and final outcome after retries \
             (not_found and already_exists are expected answers, error is a failure).",
            &self.0,
        )
    }
}

/// Writes one gauge family with a series per label set.
pub(crate) fn gauge<V: prometheus_client::encoding::EncodeGaugeValue + Copy + std::fmt::Debug>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, V)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// Writes one counter family (the encoder appends `_total`) with a series per label set.
pub(crate) fn counter<
    V: prometheus_client::encoding::EncodeCounterValue + Copy + std::fmt::Debug,
>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: &[(Labels, V)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

/// 1 for true, 0 for false (Prometheus has no booleans).
pub(crate) fn flag(b: bool) -> u64 {
    u64::from(b)
}

#[cfg(test)]
mod tests;
