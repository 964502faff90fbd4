//! Serving state: the read-only status API on a Unix socket (`watchdog status`/`check` are its
//! clients), Prometheus metrics over TCP, and systemd readiness/watchdog notifications.
//!
//! The daemon owns a [`StatusHandle`] and an `Arc<`[`Metrics`]`>` and updates them; the servers
//! only read. Rendering for humans and for Nagios is pure ([`render`]).

pub mod api;
pub mod client;
mod http;
pub mod metrics;
pub mod notify;
pub mod render;
pub mod status;

use std::{io, net::SocketAddr, path::PathBuf};

pub use api::{StatusServer, StatusServerOptions, DEFAULT_HEALTHZ_MAX_AGE, DEFAULT_SOCKET};
pub use client::{run_check, run_status, CheckArgs, StatusArgs};
pub use metrics::{Metrics, MetricsServer, DEFAULT_METRICS_LISTEN};
pub use status::{Status, StatusHandle};

/// Errors setting up or running the status and metrics servers.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create directory {path} for the status socket: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("status socket {path} is in use: another dataplane-watchdog is listening on it")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it (status.socket)")]
    NotASocket { path: PathBuf },
    #[error("cannot remove stale status socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind status socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set owner/permissions of status socket {path}: {source}")]
    Permissions { path: PathBuf, source: io::Error },
    #[error("unknown group {group:?} for the status socket (status.group)")]
    UnknownGroup { group: String },
    #[error("cannot listen for metrics on {addr} (metrics.listen): {source}")]
    MetricsBind { addr: SocketAddr, source: io::Error },
    #[error("accepting connections on the {server} server: {source}")]
    Accept {
        server: &'static str,
        source: io::Error,
    },
}
