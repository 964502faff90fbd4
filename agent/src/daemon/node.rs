//! The Node consumer: the `VXLANDataplaneHealthy` condition and a Warning Event per critical
//! finding on the local Node, fed by the finding stream. One publisher, the latest verdict
//! wins, so a slow API server can never leave a stale verdict on the Node.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::stream::{Consumer, FindingsDelta};
use crate::{
    desired::KubeSource,
    model::{Finding, Severity},
};

/// The condition is re-offered this often; the source itself only re-patches an unchanged one
/// every `condition_refresh`.
const CONDITION_EVERY: Duration = Duration::from_secs(30);

/// A verdict for the `VXLANDataplaneHealthy` condition.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ConditionUpdate {
    pub healthy: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Sends verdicts one at a time; a verdict superseded while one is in flight is never sent,
/// so the Node ends on the latest verdict whatever the API server's latency.
async fn publish_latest<F, Fut>(mut rx: watch::Receiver<Option<ConditionUpdate>>, mut publish: F)
where
    F: FnMut(ConditionUpdate) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while rx.changed().await.is_ok() {
        let Some(update) = rx.borrow_and_update().clone() else {
            continue;
        };
        publish(update).await;
    }
}

async fn condition_publisher(src: KubeSource, rx: watch::Receiver<Option<ConditionUpdate>>) {
    publish_latest(rx, |u| {
        let src = src.clone();
        async move {
            match src.publish_condition(u.healthy, u.reason, &u.message).await {
                Ok(sent) => debug!(healthy = u.healthy, sent, "node condition published"),
                Err(e) => warn!(error = %e, "cannot publish the node condition"),
            }
        }
    })
    .await;
}

pub(super) struct NodeConsumer {
    sources: watch::Receiver<Option<KubeSource>>,
    /// The open set of the last delta: what ticks re-offer, and what a consumer that missed
    /// deltas compares against to find what opened meanwhile.
    open: Arc<Vec<Arc<Finding>>>,
    last_healthy: Option<bool>,
    last_condition: Option<Instant>,
    /// The one condition publisher's input (for the current source).
    condition: Option<watch::Sender<Option<ConditionUpdate>>>,
    /// The local node as the loop resolved it (found by address when the host name is not a
    /// node's).
    local_node: Option<String>,
}

impl NodeConsumer {
    pub(super) fn new(sources: watch::Receiver<Option<KubeSource>>) -> Self {
        NodeConsumer {
            sources,
            open: Arc::default(),
            last_healthy: None,
            last_condition: None,
            condition: None,
            local_node: None,
        }
    }

    /// After an evaluation: the Node condition when the verdict changed (or now and then), an
    /// Event per newly opened critical finding. Spawned; errors are logged.
    fn publish(&mut self, open: &[Arc<Finding>], opened: &[&Finding], periodic: bool) {
        if self.sources.has_changed().unwrap_or(false) {
            // A new connection: its publisher starts fresh and the verdict is sent again.
            self.sources.mark_unchanged();
            self.condition = None;
            self.last_healthy = None;
        }
        let Some(src) = self.sources.borrow().clone() else {
            return;
        };
        if let Some(node) = &self.local_node {
            src.adopt_local_node(node);
        }
        let critical: Vec<&Finding> = open
            .iter()
            .filter(|f| f.severity == Severity::Critical)
            .map(|f| &**f)
            .collect();
        let healthy = critical.is_empty();
        let due = self.last_healthy != Some(healthy)
            || (periodic
                && self
                    .last_condition
                    .is_none_or(|t| t.elapsed() >= CONDITION_EVERY));
        if src.config().publish_condition && due {
            self.last_healthy = Some(healthy);
            self.last_condition = Some(Instant::now());
            let (reason, message) = condition_text(&critical);
            let tx = self.condition.get_or_insert_with(|| {
                let (tx, rx) = watch::channel(None);
                tokio::spawn(condition_publisher(src.clone(), rx));
                tx
            });
            tx.send_replace(Some(ConditionUpdate {
                healthy,
                reason,
                message,
            }));
        }
        if src.config().publish_events {
            for f in opened.iter().filter(|f| f.severity == Severity::Critical) {
                let src = src.clone();
                let f = (*f).clone();
                tokio::spawn(async move {
                    match src.publish_event(&f).await {
                        Ok(outcome) => debug!(?outcome, check = %f.check, "event published"),
                        Err(e) => warn!(error = %e, check = %f.check, "cannot publish an event"),
                    }
                });
            }
        }
    }
}

impl Consumer for NodeConsumer {
    const NAME: &'static str = "node";
    const TICK: Option<Duration> = Some(Duration::from_secs(1));

    async fn consume(&mut self, delta: Arc<FindingsDelta>, missed: u64) {
        let opened: Vec<&Finding> = if missed > 0 {
            // Deltas were dropped: what opened meanwhile is what is open now and was not.
            let before: HashSet<_> = self.open.iter().map(|f| f.key()).collect();
            delta
                .open
                .iter()
                .filter(|f| !before.contains(&f.key()))
                .map(|f| &**f)
                .collect()
        } else {
            delta.opened().collect()
        };
        self.open = delta.open.clone();
        if let Some(node) = delta.local_node.as_ref().filter(|n| !n.is_empty()) {
            self.local_node = Some(node.clone());
        }
        self.publish(&delta.open, &opened, false);
    }

    async fn tick(&mut self) {
        let open = self.open.clone();
        self.publish(&open, &[], true);
    }
}

/// Reason and message of `VXLANDataplaneHealthy`, like node-problem-detector's.
fn condition_text(critical: &[&Finding]) -> (&'static str, String) {
    if critical.is_empty() {
        return (
            "DataplaneHealthy",
            "VXLAN routes, neighbours and FDB entries match the datastore".to_string(),
        );
    }
    let mut checks: Vec<String> = critical.iter().map(|f| f.check.to_string()).collect();
    checks.sort();
    checks.dedup();
    let first = &critical[0].message;
    (
        "CriticalFindings",
        format!(
            "{} critical finding(s) ({}); first: {first}",
            critical.len(),
            checks.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn verdict(healthy: bool) -> Option<ConditionUpdate> {
        Some(ConditionUpdate {
            healthy,
            reason: if healthy {
                "DataplaneHealthy"
            } else {
                "CriticalFindings"
            },
            message: String::new(),
        })
    }

    #[tokio::test]
    async fn the_node_ends_on_the_latest_verdict_however_slow_the_api_server() {
        // The first patch takes 300 ms, later ones 1 ms: one task per verdict would land the
        // stale "unhealthy" last.
        let landed = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(None);
        let recorder = landed.clone();
        let publisher = tokio::spawn(publish_latest(rx, move |u: ConditionUpdate| {
            let landed = recorder.clone();
            async move {
                let slow = !u.healthy;
                tokio::time::sleep(Duration::from_millis(if slow { 300 } else { 1 })).await;
                landed.lock().unwrap().push(u.healthy);
            }
        }));
        tx.send_replace(verdict(false));
        tokio::time::sleep(Duration::from_millis(1)).await;
        tx.send_replace(verdict(true));
        tx.send_replace(verdict(false));
        tx.send_replace(verdict(true));
        tokio::time::sleep(Duration::from_millis(600)).await;
        drop(tx);
        publisher.await.unwrap();
        let landed = landed.lock().unwrap().clone();
        assert_eq!(landed.last(), Some(&true), "{landed:?}");
        assert_eq!(
            landed,
            vec![false, true],
            "superseded verdicts are not sent"
        );
    }
}
