//! Serving state: status API on a Unix socket, Prometheus metrics.
