//! The NBD server's buffer budget as series (`serve` with the NBD frontend): what all
//! clients together make the server hold, and how often they had to wait for it.
//!
//! Must never: compute a value differently from `status` (every number is a field of the
//! same [`crate::nbd::BudgetStatus`] that `status` shows as `nbd_buffers`).

use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, gauge, Labels, Source};
use crate::nbd::{BudgetStatus, BufferBudget};

/// Scrapes the buffer budget of one NBD server.
#[derive(Debug)]
pub struct NbdBuffersSource {
    pub budget: BufferBudget,
    /// The same `journal` and `device` labels as the primary's series.
    pub labels: Vec<(&'static str, String)>,
}

#[async_trait]
impl Source for NbdBuffersSource {
    async fn collect(&self) -> Box<dyn Collector> {
        Box::new(NbdBuffersScrape {
            status: self.budget.status(),
            labels: self.labels.clone(),
        })
    }
}

#[derive(Debug)]
struct NbdBuffersScrape {
    status: BudgetStatus,
    labels: Labels,
}

impl Collector for NbdBuffersScrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.status;
        let one = |v: u64| [(self.labels.clone(), v)];
        gauge(
            &mut e,
            "nbd_buffered_bytes",
            "Memory NBD clients make the server hold now: read replies not yet sent, write \
             payloads in flight, socket and TLS buffers.",
            &one(s.held),
        )?;
        gauge(
            &mut e,
            "nbd_buffered_capacity_bytes",
            "Cap of that memory (--max-buffered).",
            &one(s.cap),
        )?;
        gauge(
            &mut e,
            "nbd_buffered_peak_bytes",
            "Most of that memory held at once since start.",
            &one(s.peak),
        )?;
        gauge(
            &mut e,
            "nbd_connections_throttled",
            "Connections the server is not reading requests from now, until their replies \
             drain.",
            &one(s.throttled),
        )?;
        counter(
            &mut e,
            "nbd_throttle_waits",
            "Times a connection had to wait for buffer memory, since start.",
            &one(s.throttled_total),
        )?;
        Ok(())
    }
}
