//! The daemon's link to the Kubernetes source: connect in the background (an API server that is
//! down at boot must not stop the kernel-only checks), then follow the list/watch snapshots and
//! restart them when they end. Publishing to the Node is the Node consumer's (`node.rs`).

use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::{
    desired::{kubernetes::KubeSnapshot, KubeSource, KubeSourceConfig},
    serve::StatusHandle,
};

/// What [`KubeLink::next`] saw.
pub(super) enum KubeUpdate {
    /// The source connected; the watch is started.
    Connected(String),
    /// A new snapshot is in [`KubeLink::latest`].
    Snapshot,
    /// The connect task or the watch is gone, and why.
    Closed(String),
}

/// First and largest delay before the list/watch is started again after it ended.
const RESTART_FIRST: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);

pub(super) struct KubeLink {
    connecting: Option<oneshot::Receiver<KubeSource>>,
    /// How to connect again when the connect task itself is gone.
    reconnect: Option<(KubeSourceConfig, StatusHandle)>,
    /// The list/watch ended: start it again at this instant.
    restart_at: Option<tokio::time::Instant>,
    restart_delay: Duration,
    source: Option<KubeSource>,
    /// Kept for the daemon's lifetime: dropping it stops the watch tasks.
    snaps: Option<watch::Receiver<KubeSnapshot>>,
    latest: Option<KubeSnapshot>,
    mismatches: u64,
    /// The connected source, for the Node consumer (which publishes through it).
    sources: watch::Sender<Option<KubeSource>>,
}

impl KubeLink {
    /// Connect with retry in a task; failures go to the log and the status `datastore.error`.
    pub(super) fn connect(cfg: KubeSourceConfig, status: StatusHandle) -> Self {
        let mut link = KubeLink::empty();
        link.spawn_connect(cfg, status);
        link
    }

    fn empty() -> Self {
        KubeLink {
            connecting: None,
            reconnect: None,
            restart_at: None,
            restart_delay: RESTART_FIRST,
            source: None,
            snaps: None,
            latest: None,
            mismatches: 0,
            sources: watch::Sender::new(None),
        }
    }

    fn spawn_connect(&mut self, cfg: KubeSourceConfig, status: StatusHandle) {
        self.reconnect = Some((cfg.clone(), status.clone()));
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let src = KubeSource::connect_retrying(cfg, |e| {
                warn!(error = %e, "Kubernetes API not reachable; checking the kernel only meanwhile");
                let msg = format!("connecting: {e}");
                let status = status.clone();
                tokio::spawn(async move {
                    status.update(|s| s.datastore.error = Some(msg)).await;
                });
            })
            .await;
            let _ = tx.send(src);
        });
        self.connecting = Some(rx);
    }

    /// An already connected source.
    pub(super) fn connected(src: KubeSource) -> Self {
        let mut link = KubeLink::empty();
        link.start(src);
        link
    }

    /// After [`KubeUpdate::Closed`]: start the list/watch again (or reconnect, if the connect
    /// task is what ended) after a delay that doubles up to 30 s while it keeps ending and
    /// resets once a complete snapshot arrives. The last snapshot stays in [`latest`] meanwhile
    /// only as far as the caller keeps its desired state; the link reports nothing until then.
    ///
    /// [`latest`]: KubeLink::latest
    pub(super) fn restart(&mut self) -> Duration {
        let delay = self.restart_delay;
        self.restart_delay = (self.restart_delay * 2).min(RESTART_MAX);
        self.snaps = None;
        self.latest = None;
        self.connecting = None;
        if self.reconnect.is_some() {
            // A fresh connection re-reads the kubeconfig: rotated credentials take effect.
            self.source = None;
        }
        self.restart_at = Some(tokio::time::Instant::now() + delay);
        delay
    }

    /// A complete snapshot arrived: the next restart waits the shortest delay again.
    pub(super) fn healthy_again(&mut self) {
        self.restart_delay = RESTART_FIRST;
    }

    fn start(&mut self, src: KubeSource) {
        let rx = src.spawn();
        self.latest = Some(rx.borrow().clone());
        self.snaps = Some(rx);
        self.sources.send_replace(Some(src.clone()));
        self.source = Some(src);
    }

    pub(super) fn is_connected(&self) -> bool {
        self.source.is_some()
    }

    pub(super) fn latest(&self) -> Option<&KubeSnapshot> {
        self.latest.as_ref()
    }

    /// Cancel-safe: waits for the connection, then for each announced snapshot.
    pub(super) async fn next(&mut self) -> KubeUpdate {
        if let Some(at) = self.restart_at {
            tokio::time::sleep_until(at).await;
            self.restart_at = None;
            match (self.source.clone(), self.reconnect.clone()) {
                (Some(src), _) => {
                    let name = src.source_name();
                    self.start(src);
                    return KubeUpdate::Connected(name);
                }
                (None, Some((cfg, status))) => self.spawn_connect(cfg, status),
                (None, None) => return std::future::pending().await,
            }
        }
        if let Some(rx) = self.connecting.as_mut() {
            let got = rx.await;
            self.connecting = None;
            return match got {
                Ok(src) => {
                    let name = src.source_name();
                    self.start(src);
                    KubeUpdate::Connected(name)
                }
                Err(_) => KubeUpdate::Closed("the connect task ended".into()),
            };
        }
        match self.snaps.as_mut() {
            Some(rx) => {
                if rx.changed().await.is_ok() {
                    self.latest = Some(rx.borrow_and_update().clone());
                    KubeUpdate::Snapshot
                } else {
                    let why = rx.borrow().ended.clone();
                    self.snaps = None;
                    KubeUpdate::Closed(why.unwrap_or_else(|| "the list/watch ended".into()))
                }
            }
            None => std::future::pending().await,
        }
    }

    /// Take the current value without an announcement (its ages are kept fresh in place).
    pub(super) fn refresh(&mut self) {
        if let Some(rx) = &self.snaps {
            self.latest = Some(rx.borrow().clone());
        }
    }

    /// How many relist mismatches are new since the last call.
    pub(super) fn new_mismatches(&mut self) -> u64 {
        let now = self.latest.as_ref().map_or(0, |s| s.relist_mismatches);
        let new = now.saturating_sub(self.mismatches);
        self.mismatches = self.mismatches.max(now);
        new
    }

    /// The source as it (re)connects: what the Node condition and Events are published with.
    pub(super) fn sources(&self) -> watch::Receiver<Option<KubeSource>> {
        self.sources.subscribe()
    }
}

/// Status/metrics age of the datastore from the snapshot.
pub(super) fn age(snap: &KubeSnapshot, now: SystemTime) -> Option<Duration> {
    snap.last_event_age(now)
}

pub(super) fn log_connected(name: &str) {
    info!(source = %name, "Kubernetes datastore connected; list+watch started");
}
