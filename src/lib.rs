//! tinylag: asynchronous block-device replication through a journal in object storage,
//! with delayed replicas and time travel.
//!
//! Layers, dependencies pointing down only (see ARCHITECTURE.md):
//! `bin/` wires everything; [`writer`], [`replayer`] and [`trim`] use [`journal`];
//! [`journal`] uses [`store`]. Frontends ([`nbd`]) know only [`block::BlockDevice`].

#![warn(unreachable_pub)]

pub(crate) mod aligned;
pub mod block;
pub mod clock;
pub mod control;
pub mod crypto;
pub mod journal;
pub mod metrics;
pub mod nbd;
pub mod objrep;
pub mod replayer;
pub mod store;
pub(crate) mod sync;
pub(crate) mod sys;
#[cfg(test)]
pub(crate) mod testing;
pub mod timetravel;
pub mod trim;
pub mod ublk;
pub mod units;
pub mod writer;
