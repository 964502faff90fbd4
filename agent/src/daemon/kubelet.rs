//! The kubelet watch-stall check in the daemon: a task reads both pod lists every
//! `interval` and hands its findings to the loop, which evaluates them with everything else
//! (so they reach status, metrics, the Node condition, Events and alerts like any finding).

use std::time::Duration;

use tokio::sync::watch;

use crate::{config::KubeletConfig, desired::kubernetes::KubeSource, model::Finding};

/// Starts the check; it runs while the returned receiver lives.
pub(super) fn spawn(
    cfg: KubeletConfig,
    mut sources: watch::Receiver<Option<KubeSource>>,
) -> watch::Receiver<Vec<Finding>> {
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(async move {
        let mut every = tokio::time::interval(cfg.interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = tx.closed() => return,
            }
            let src = sources.borrow_and_update().clone();
            let Some(src) = src else {
                continue; // Not connected yet: the datastore's own finding says so.
            };
            // A run never outlasts the interval: the lists are bounded by the request timeout.
            let budget = cfg.interval.max(Duration::from_secs(1));
            let found = match tokio::time::timeout(budget, src.kubelet_check(cfg.threshold)).await {
                Ok(found) => found,
                Err(_) => vec![crate::checks::kubelet::unverifiable(
                    &src.local_node(),
                    &format!("the pod lists took longer than {budget:?}"),
                )],
            };
            tx.send_if_modified(|cur| {
                let changed = *cur != found;
                *cur = found;
                changed
            });
        }
    });
    rx
}
