//! The cache shared by the per-resource list/watch loops, and the publisher task that turns
//! it into [`KubeSnapshot`]s: rebuilt when the cache changed, re-aged every second.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::{watch, Notify},
    task::JoinSet,
};

use super::{
    build_desired,
    health::{join_causes, stale_causes},
    AffinityInfo, BlockInfo, CacheView, FelixConfigInfo, KubeSnapshot, KubeSourceConfig, NodeInfo,
    PoolInfo, ResourceHealth, Store,
};
use crate::model::DesiredState;

/// Every resource's compact cache and health, behind one lock: a snapshot sees them together.
pub(super) struct Shared {
    pub(super) nodes: Store<NodeInfo>,
    pub(super) blocks: Store<BlockInfo>,
    pub(super) affinities: Store<AffinityInfo>,
    /// `None` when the resource is not read (not served, or forbidden): see `notes`.
    pub(super) pools: Option<Store<PoolInfo>>,
    pub(super) felix: Option<Store<FelixConfigInfo>>,
    /// Why a resource is not read, for the status.
    pub(super) notes: Vec<String>,
    pub(super) health: BTreeMap<String, ResourceHealth>,
}

fn items<T: Clone>(s: &Store<T>) -> BTreeMap<String, T> {
    s.items
        .iter()
        .map(|(k, e)| (k.clone(), e.item.clone()))
        .collect()
}

impl Shared {
    pub(super) fn build(&self, cfg: &KubeSourceConfig, source: &str) -> DesiredState {
        let (n, b, a) = (
            items(&self.nodes),
            items(&self.blocks),
            items(&self.affinities),
        );
        let pools = self.pools.as_ref().map(items);
        let felix = self.felix.as_ref().map(items);
        let mut desired = build_desired(
            cfg.profile,
            &cfg.node_name,
            &CacheView {
                pools: pools.as_ref(),
                felix: felix.as_ref(),
                notes: &self.notes,
                ..CacheView::new(&n, &b, &a)
            },
        );
        desired.source = source.to_string();
        desired
    }
}

/// The cache survives a panic in one of its tasks: the publisher notices the task ended and
/// closes the channel (the daemon keeps the last good state, marks it stale and reconnects);
/// a poisoned lock must not turn that into panics everywhere else.
pub(super) fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every resource loop and the publisher share.
pub(super) struct Runtime {
    pub(super) shared: Mutex<Shared>,
    /// Signalled when the cache changed: the publisher rebuilds the desired state.
    pub(super) dirty: Notify,
    pub(super) cfg: Arc<KubeSourceConfig>,
    /// [`KubeSource::source_name`](super::KubeSource::source_name), stamped on every desired state.
    pub(super) source: String,
    started: SystemTime,
}

impl Runtime {
    /// An empty cache, as before the first list.
    pub(super) fn new(cfg: Arc<KubeSourceConfig>, source: String) -> Self {
        Runtime {
            shared: Mutex::new(Shared {
                nodes: Store::default(),
                blocks: Store::default(),
                affinities: Store::default(),
                pools: None,
                felix: None,
                notes: Vec::new(),
                health: BTreeMap::new(),
            }),
            dirty: Notify::new(),
            cfg,
            source,
            started: SystemTime::now(),
        }
    }

    pub(super) fn health(&self, key: &str, f: impl FnOnce(&mut ResourceHealth)) {
        let mut s = lock(&self.shared);
        if let Some(h) = s.health.get_mut(key) {
            f(h);
        }
    }

    pub(super) fn snapshot(&self, desired: Arc<DesiredState>) -> KubeSnapshot {
        let s = lock(&self.shared);
        let now = SystemTime::now();
        let causes = stale_causes(&s.health, &self.cfg, self.started, now);
        KubeSnapshot {
            desired,
            synced: !s.health.is_empty() && s.health.values().all(|h| h.synced),
            stale: !causes.is_empty(),
            stale_reason: join_causes(&causes),
            stale_causes: causes,
            relist_mismatches: s.health.values().map(|h| h.relist_mismatches).sum(),
            resources: s.health.clone(),
            ipam_api: None,
            ended: None,
        }
    }
}

/// Publishes a snapshot whenever the cache or the staleness verdict changes, and closes the
/// channel (with `ended` set) when a resource loop ends.
pub(super) async fn run_publisher(
    rt: Arc<Runtime>,
    tx: watch::Sender<KubeSnapshot>,
    mut tasks: JoinSet<String>,
    ipam: Option<String>,
) {
    let mut desired = tx.borrow().desired.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let rebuild = tokio::select! {
            _ = rt.dirty.notified() => true,
            _ = tick.tick() => false,
            _ = tx.closed() => break,
            // The resource loops never return: one that ended panicked or was cancelled. Its
            // cache would freeze while looking healthy; end the channel so the consumer
            // keeps its last good state, marks it stale and starts over.
            Some(ended) = tasks.join_next() => {
                let why = match ended {
                    Err(e) => {
                        tracing::error!(error = %e, "a Kubernetes list/watch task failed; closing the snapshot channel");
                        format!("a list/watch task failed ({e})")
                    }
                    Ok(why) => {
                        tracing::warn!(reason = %why, "a Kubernetes list/watch ended; closing the snapshot channel");
                        why
                    }
                };
                // Left in place for the receiver to read after the close; no announcement.
                tx.send_if_modified(|cur| {
                    cur.ended = Some(why);
                    false
                });
                break;
            }
        };
        if rebuild {
            // Let a burst of events land before rebuilding.
            tokio::time::sleep(rt.cfg.debounce).await;
            let built = lock(&rt.shared).build(&rt.cfg, &rt.source);
            desired = Arc::new(built);
        }
        let snap = rt.snapshot(desired.clone()).with_ipam(ipam.as_deref());
        tx.send_if_modified(|cur| {
            let announce = rebuild
                || cur.stale != snap.stale
                || cur.stale_reason != snap.stale_reason
                || cur.synced != snap.synced
                || cur.relist_mismatches != snap.relist_mismatches;
            *cur = snap;
            announce
        });
    }
    // Dropping `tasks` aborts the resource loops; dropping `tx` closes the channel.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_watch_task_closes_the_channel_instead_of_freezing_it() {
        let rt = Arc::new(Runtime::new(
            Arc::new(KubeSourceConfig::default()),
            "kubernetes".into(),
        ));
        let mut tasks: JoinSet<String> = JoinSet::new();
        let poisoner = rt.clone();
        tasks.spawn(async move {
            let _guard = lock(&poisoner.shared);
            panic!("a bug in a resource loop");
        });
        let first = rt.snapshot(Arc::default());
        let (tx, mut rx) = watch::channel(first);
        let publisher = tokio::spawn(run_publisher(rt.clone(), tx, tasks, None));
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while rx.changed().await.is_ok() {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "the channel stayed open after its task died"
        );
        publisher
            .await
            .expect("the publisher itself does not panic");
        let why = rx.borrow().ended.clone().unwrap_or_default();
        assert!(why.contains("task failed"), "{why:?}");
        // The poisoned cache is still readable.
        assert!(lock(&rt.shared).nodes.items.is_empty());
    }
}
