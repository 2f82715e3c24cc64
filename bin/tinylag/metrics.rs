//! `--metrics-listen IP:PORT` of `serve`, `replay` and `up`: binds the Prometheus endpoint
//! ([`tinylag::metrics`]) and hands the daemon the hub its sources join. `up` binds one
//! endpoint and shares its hub with the primary and the replay agent it runs.
//!
//! Any address is accepted, loopback or not: the metrics carry no credentials (journal
//! names as `status` shows them, numbers). Must never: bind anything when the flag is absent.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use tinylag::metrics::{self, Hub, MetricsListener};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://IP:PORT/metrics (e.g. 127.0.0.1:9469) [default:
    /// off].
    #[arg(long, value_name = "IP:PORT", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<SocketAddr>,
}

/// `--metrics-listen`: an IP address and a port.
pub fn parse_metrics_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not IP:PORT; expected e.g. 127.0.0.1:9469 or [::1]:9469"))
}

/// The metrics endpoint of one daemon: its own listener, or a hub shared by `up`.
pub struct Endpoint {
    pub hub: Arc<Hub>,
    own: Option<MetricsListener>,
}

impl Endpoint {
    /// Binds `--metrics-listen` when given; with `shared`, joins that hub instead.
    pub async fn open(
        args: &MetricsArgs,
        shared: Option<Arc<Hub>>,
    ) -> anyhow::Result<Option<Self>> {
        if let Some(hub) = shared {
            return Ok(Some(Endpoint { hub, own: None }));
        }
        let Some(addr) = args.metrics_listen else {
            return Ok(None);
        };
        let listener = metrics::bind(addr).await?;
        Ok(Some(Endpoint {
            hub: Hub::new(),
            own: Some(listener),
        }))
    }

    /// `http://IP:PORT/metrics`, when this endpoint has its own listener.
    pub fn url(&self) -> Option<String> {
        self.own
            .as_ref()
            .map(|l| format!("http://{}/metrics", l.local_addr()))
    }

    /// Starts answering scrapes (own listener only) until `shutdown`.
    pub fn start(self, shutdown: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
        let listener = self.own?;
        Some(tokio::spawn(metrics::serve(listener, self.hub, shutdown)))
    }
}
