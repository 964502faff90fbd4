//! The desired-state feeds of the loop: the datastore file (reloaded when it changes), a
//! test feed, and the Kubernetes link (snapshots, staleness, the watch ending and restarting).

use super::*;

impl LoopState {
    pub(super) async fn reload_datastore(&mut self) {
        if self.kube.is_some()
            || matches!(self.config.datastore.source, DatastoreSource::Kubernetes)
        {
            // The list/watch pushes the desired state; a relist is the source's business. The
            // placeholder datastore must never be loaded in its place ("no nodes").
            return;
        }
        self.file_stamp = file_stamp(&self.datastore);
        match self.datastore.load().await {
            Ok(desired) => {
                self.last_desired_ok = Some(Instant::now());
                let now = SystemTime::now();
                self.adopt_desired(desired).await;
                self.status
                    .update(|s| {
                        s.datastore.last_relist = Some(now);
                        s.datastore.error = None;
                        s.datastore.stale = false;
                        s.datastore.last_event_age_seconds = Some(0.0);
                    })
                    .await;
                self.heap_dirty = true;
            }
            Err(e) => {
                // Keep checking against the last good state; say so.
                error!(error = %e, "datastore load failed; keeping the previous desired state");
                let msg = e.to_string();
                let source = self.datastore.describe();
                self.status
                    .update(|s| {
                        s.datastore.error = Some(msg);
                        if s.datastore.source.is_empty() {
                            s.datastore.source = source;
                        }
                    })
                    .await;
            }
        }
    }

    pub(super) async fn adopt_desired(&mut self, desired: DesiredState) {
        let blocks = ebpf::peer_blocks_from_desired(&desired);
        let for_status = desired.clone();
        let changed = self.engine.set_desired((!self.offline).then_some(desired));
        // `Some`: the peer blocks were written (or refused) again; the status says which.
        let mut peer_blocks_error = None;
        if changed {
            let written = lock_counters(&self.ebpf).set_peer_blocks(&blocks);
            if let Err(e) = &written {
                warn!(error = %e, "eBPF peer blocks not updated; drops are not attributed to peers");
            }
            peer_blocks_error = Some(written.err().map(|e| e.to_string()));
            info!(
                source = %for_status.source,
                nodes = for_status.nodes.len(),
                problems = for_status.problems.len(),
                "desired state loaded"
            );
        }
        self.status
            .update(|s| {
                if let Some(error) = peer_blocks_error {
                    s.ebpf.peer_blocks_error = error;
                }
                s.set_desired(&for_status)
            })
            .await;
        // A rebuilt peer list: the next drop poll writes every peer's total again.
        self.status_peer_drops = None;
    }

    pub(super) async fn adopt_feed(&mut self) {
        let Some(feed) = self.feed.as_mut() else {
            return;
        };
        let desired = feed.borrow_and_update().clone();
        self.last_desired_ok = Some(Instant::now());
        self.adopt_desired(desired).await;
        self.status
            .update(|s| {
                s.datastore.last_event_age_seconds = Some(0.0);
                s.datastore.error = None;
                s.datastore.stale = false;
            })
            .await;
    }

    pub(super) async fn on_kube(&mut self, update: kube::KubeUpdate) {
        match update {
            kube::KubeUpdate::Connected(name) => {
                kube::log_connected(&name);
                self.status
                    .update(|s| {
                        s.datastore.source = name;
                        s.datastore.error = None;
                    })
                    .await;
            }
            kube::KubeUpdate::Snapshot => self.adopt_kube_snapshot().await,
            kube::KubeUpdate::Closed(why) => {
                // Never "no nodes": the last good desired state stays in the engine, marked
                // stale, until a new list/watch has a complete snapshot.
                let Some(link) = self.kube.as_mut() else {
                    return;
                };
                let delay = link.restart();
                warn!(
                    retry_in = ?delay,
                    reason = %why,
                    "Kubernetes list/watch ended; keeping the last desired state (stale) and starting it again"
                );
                let (source, nodes) = self.engine.desired().map_or(("kubernetes".into(), 0), |d| {
                    (d.source.clone(), d.nodes.len())
                });
                self.engine.set_datastore_health(Some(DatastoreHealth {
                    source,
                    nodes,
                    watch_ended: Some(why.clone()),
                    ..Default::default()
                }));
                self.watch_ended = Some(why.clone());
                self.status
                    .update(|s| {
                        s.datastore.stale = true;
                        s.datastore.error = Some(format!("list/watch ended: {why}; restarting"));
                    })
                    .await;
            }
        }
    }

    /// The snapshot's desired state (once synced) and its `datastore-stale` findings.
    pub(super) async fn adopt_kube_snapshot(&mut self) {
        let Some(snap) = self.kube.as_ref().and_then(|k| k.latest()).cloned() else {
            return;
        };
        if snap.synced {
            self.last_desired_ok = Some(Instant::now());
            self.adopt_desired((*snap.desired).clone()).await;
            self.watch_ended = None;
            if let Some(link) = self.kube.as_mut() {
                link.healthy_again();
            }
        }
        self.kube_bookkeeping();
    }

    /// Stale findings and relist mismatch metrics from the latest snapshot.
    pub(super) fn kube_bookkeeping(&mut self) {
        let Some(link) = self.kube.as_mut() else {
            return;
        };
        if let Some(snap) = link.latest().filter(|_| self.watch_ended.is_none()) {
            self.engine.set_datastore_health(Some(snap.health()));
        }
        for _ in 0..link.new_mismatches() {
            self.metrics.inc_datastore_relist_mismatch();
        }
    }
}

/// The configured datastore as the daemon's source. For `kubernetes` this is a placeholder:
/// [`Daemon::run`] connects in the background (with retry) so the kernel-only checks start
/// even while the API server is down.
pub fn datastore_from_config(config: &Config) -> Result<AnyDatastore, DaemonError> {
    match config.datastore.source {
        DatastoreSource::File => Ok(AnyDatastore::File(FileDatastore::new(
            config.datastore.path.clone(),
            &config.node_name,
        ))),
        DatastoreSource::None => Ok(AnyDatastore::None(NoDatastore {
            local_node: config.node_name.clone(),
        })),
        DatastoreSource::Kubernetes => Ok(AnyDatastore::None(NoDatastore {
            local_node: config.node_name.clone(),
        })),
    }
}

/// Modification time and length of the datastore file, to notice edits cheaply.
pub(super) fn file_stamp(datastore: &AnyDatastore) -> Option<(SystemTime, u64)> {
    let AnyDatastore::File(f) = datastore else {
        return None;
    };
    let meta = std::fs::metadata(f.path()).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// `true` when a new value arrived, `false` when the sender is gone; pending without a feed.
pub(super) async fn feed_changed(feed: &mut Option<watch::Receiver<DesiredState>>) -> bool {
    match feed {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The kubelet check published new findings (pending forever when it is off or ended).
pub(super) async fn kubelet_changed(rx: &mut Option<watch::Receiver<Vec<Finding>>>) {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    if r.changed().await.is_err() {
        *rx = None;
        std::future::pending::<()>().await
    }
}

pub(super) async fn kube_next(kube: &mut Option<kube::KubeLink>) -> kube::KubeUpdate {
    match kube {
        Some(k) => k.next().await,
        None => std::future::pending().await,
    }
}
