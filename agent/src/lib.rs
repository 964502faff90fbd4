//! dataplane-watchdog: proves a node's VXLAN overlay dataplane matches the cluster datastore.
//!
//! Data flow, in folder order: `observe` (kernel) + `desired` (datastore) → `checks` (pure) →
//! findings → `act` (alerts, repair) and `serve` (status API, metrics).
pub mod act;
pub mod checks;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod ebpf;
pub mod model;
pub mod observe;
pub mod scan;
pub mod serve;
