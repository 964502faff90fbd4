//! The stream's in-process views: the status API and /metrics. (The Node consumer is in
//! `node.rs`; alert delivery and repair join here as more consumers.)

use std::sync::Arc;

use super::stream::{Consumer, FindingsDelta};
use crate::serve::{Metrics, StatusHandle};

/// Keeps the status API's findings, peers, devices and check figures current.
pub(super) struct StatusConsumer {
    pub status: StatusHandle,
}

impl Consumer for StatusConsumer {
    const NAME: &'static str = "status";

    async fn consume(&mut self, delta: Arc<FindingsDelta>, _missed: u64) {
        // Every delta is the whole picture: nothing to catch up on after missed ones.
        self.status
            .update(|s| {
                if let Some(ds) = &delta.datastore {
                    s.datastore = ds.clone();
                }
                if let Some(node) = delta.local_node.as_ref().filter(|n| !n.is_empty()) {
                    s.node.clone_from(node);
                }
                s.set_findings(delta.open.clone(), &delta.peers);
                s.devices = delta.devices.clone();
                s.checks.routes_checked = delta.routes_checked as u64;
                s.checks.last_duration_seconds = Some(delta.duration.as_secs_f64());
                s.checks.last_run = Some(delta.at);
                s.in_sync = delta.in_sync;
            })
            .await;
    }
}

/// The finding, peer and route gauges.
pub(super) struct MetricsConsumer {
    pub metrics: Arc<Metrics>,
}

impl Consumer for MetricsConsumer {
    const NAME: &'static str = "metrics";

    async fn consume(&mut self, delta: Arc<FindingsDelta>, _missed: u64) {
        self.metrics.set_findings(&delta.open);
        self.metrics.set_peer_verdicts(&delta.peers);
        self.metrics.set_routes_checked(delta.routes_checked as u64);
    }
}
