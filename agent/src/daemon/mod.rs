//! `watchdog run`: the long-running agent.
//!
//! One loop, Felix-style:
//! - kernel change events (netlink multicast) are applied to the model as they arrive — cheap,
//!   they only note what changed ([`Engine::apply`]);
//! - when the burst is drained, the checks run once for what the burst changed (the whole model
//!   after a resync or a datastore change) ([`Engine::evaluate`], [`crate::checks::Evaluator`]),
//!   so a finding appears within a millisecond of the change that caused it;
//! - a full resync (netlink dump + datastore reload) runs every `resync_interval` regardless of
//!   events, because the incident was caused by an event-only design that missed one event;
//!   a lost notification (ENOBUFS) or a change the kernel does not announce (device down or
//!   re-created) triggers one immediately;
//! - the datastore may also push new desired state ([`Daemon::with_desired_feed`]); the file
//!   source is re-read when the file changes;
//! - eBPF drop counters are polled every second; drops that rose within the last 10 s are
//!   evidence for the checks.
//!
//! After each evaluation the status API and metrics are refreshed; each loop pass marks the
//! loop alive (`/healthz`, systemd `WATCHDOG=1`), so a hung loop gets the service restarted.
//! `READY=1` goes out only after the first full sync.

mod consumers;
mod counters;
mod drops;
mod engine;
mod feed;
mod findings;
mod kube;
mod kubelet;
mod node;
mod publish;
mod repair;
mod startup;
mod stream;

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle, time::MissedTickBehavior};
use tracing::{debug, error, info, warn};

pub use drops::{RecentDrops, DEFAULT_DROP_WINDOW};
pub use feed::datastore_from_config;

use counters::{disabled_ebpf, lock_counters, open_ebpf};
pub use engine::{Engine, Evaluation};
use feed::{feed_changed, file_stamp, kube_next, kubelet_changed};
pub use findings::{FindingTracker, Transitions};
pub use startup::Daemon;
pub use stream::{Consumer, Fanout, FindingsDelta};

use crate::{
    checks::DatastoreHealth,
    config::{Config, DatastoreSource},
    desired::{AnyDatastore, Datastore, FileDatastore, KubeSourceConfig, NoDatastore},
    ebpf::{self, DropCounterSource, DropSnapshot, EbpfState, NeighTarget},
    model::{DesiredState, Finding},
    observe::{
        self, Applied, KernelObserver, Monitor, MonitorOptions, NetlinkObserver, ObservedEvent,
    },
    scan::Summary,
    serve::{
        self, notify, status::EbpfSummary, Metrics, MetricsServer, ServeError, Status,
        StatusHandle, StatusServer, StatusServerOptions,
    },
};

/// Why the daemon could not start (after startup it reports problems instead of failing).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Serve(#[from] ServeError),
    #[error("kernel: {0}")]
    Kernel(#[from] observe::Error),
    #[error("datastore.source = {0:?} is not supported by this build yet")]
    UnsupportedDatastore(&'static str),
    #[error("starting the status and metrics servers' thread: {0}")]
    ApiThread(#[source] std::io::Error),
}

/// Longest a burst of events is applied without letting timers and the API run.
const MAX_EVENTS_PER_PASS: usize = 20_000;
/// tokio's timer wheel ticks in milliseconds.
const TIMER_RESOLUTION: Duration = Duration::from_millis(1);
/// Minimum gap between two resyncs forced by overruns, so a storm does not become a dump loop.
const MIN_RESYNC_GAP: Duration = Duration::from_millis(100);
/// Retry delay when a resync or the netlink subscription fails.
const RETRY: Duration = Duration::from_secs(1);
/// eBPF counters, datastore file change, liveness.
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// How long the first evaluation waits for the datastore's first load. Until then the checks
/// would run without the datastore (less precise findings that are replaced a moment later);
/// after it they do, so a datastore that is down at boot never keeps the node unchecked.
const DATASTORE_WAIT: Duration = Duration::from_secs(10);
/// Liveness is refreshed at most this often during event storms.
const TICK_EVERY: Duration = Duration::from_millis(250);

/// Why a full resync runs (the `reason` label of `resyncs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResyncReason {
    Startup,
    Periodic,
    /// Netlink notifications were lost (ENOBUFS) or the subscription died.
    Overrun,
    /// The kernel changed something it does not announce (device down, re-created, address).
    Kernel,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Startup => "startup",
            ResyncReason::Periodic => "periodic",
            ResyncReason::Overrun => "overrun",
            ResyncReason::Kernel => "kernel",
        }
    }

    /// Whether the datastore is re-read too (the kernel-triggered ones only need a dump).
    fn reloads_datastore(self) -> bool {
        matches!(self, ResyncReason::Startup | ResyncReason::Periodic)
    }
}

/// Everything the loop owns.
struct LoopState {
    /// Where each evaluation's [`FindingsDelta`] goes.
    fanout: Fanout,
    /// `mode = "repair"`: what repair did, to annotate findings with.
    repair: Option<crate::act::repair::RepairLink>,
    config: Config,
    netns: Option<PathBuf>,
    engine: Engine,
    window: RecentDrops,
    monitor: Option<Monitor>,
    monitor_options: MonitorOptions,
    observer: NetlinkObserver,
    datastore: AnyDatastore,
    offline: bool,
    file_stamp: Option<(SystemTime, u64)>,
    feed: Option<watch::Receiver<DesiredState>>,
    /// The Kubernetes source: desired state, staleness, condition/event publishing.
    kube: Option<kube::KubeLink>,
    /// The kubelet watch-stall check's latest findings (`[kubelet] enabled`).
    kubelet: Option<watch::Receiver<Vec<Finding>>>,
    /// The list/watch ended (why) and is being started again: `datastore-stale` until its
    /// first complete snapshot.
    watch_ended: Option<String>,
    /// Shared with the blocking thread that reads the per-CPU maps (about a thousand
    /// syscalls per device each second), so the runtime keeps serving meanwhile.
    ebpf: Arc<std::sync::Mutex<Box<dyn DropCounterSource>>>,
    status: StatusHandle,
    metrics: Arc<Metrics>,
    /// ifindexes last given to eBPF.
    watched: BTreeSet<u32>,
    /// A resync is due at this instant, for this reason.
    pending_resync: Option<(Instant, ResyncReason)>,
    last_resync: Option<Instant>,
    last_tick: Option<Instant>,
    last_desired_ok: Option<Instant>,
    /// Per (device, ifindex): neighbour FAILED transitions already counted in metrics.
    neigh_failed_last: std::collections::BTreeMap<(String, u32), u64>,
    /// Per-peer drop totals last written into the status' peer list; `None` after the list was
    /// rebuilt. Unchanged totals (most seconds) leave the 5,000-entry list untouched.
    status_peer_drops: Option<std::collections::BTreeMap<String, u64>>,
    /// At least one kernel dump succeeded.
    synced: bool,
    /// When the loop started (for [`DATASTORE_WAIT`]).
    started: Instant,
    ready: bool,
    last_summary: Option<(usize, usize, usize)>,
    /// Earliest next evaluation during an event storm (see `evaluate_when_due`).
    eval_not_before: Option<Instant>,
    /// Memory was freed in bulk (eBPF load, resync, datastore reload, evaluation) since it
    /// was last handed back to the system.
    heap_dirty: bool,
}

impl LoopState {
    /// The kernel was dumped and the datastore loaded once (or it was given
    /// [`DATASTORE_WAIT`] and did not answer): findings mean something from here on.
    fn in_sync(&self) -> bool {
        self.synced
            && (self.offline
                || self.engine.desired().is_some()
                || self.started.elapsed() >= DATASTORE_WAIT)
    }

    async fn run(&mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.resync(ResyncReason::Startup).await;
        self.poll_drops().await;
        if self.in_sync() {
            self.evaluate_and_publish().await;
        }

        let mut periodic = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.resync_interval,
            self.config.resync_interval,
        );
        periodic.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        if let Some(wd) = notify::watchdog_interval() {
            info!(interval = ?wd, "systemd watchdog enabled; pinging from the main loop");
        }

        loop {
            let resync_at = self
                .pending_resync
                .map(|(at, _)| tokio::time::Instant::from_std(at));
            // A postponed evaluation (storm coalescing); a pending resync comes first.
            let eval_at = self
                .eval_not_before
                .filter(|_| self.engine.is_dirty() && self.pending_resync.is_none())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    info!("shutting down");
                    break;
                }
                _ = sleep_until_opt(resync_at) => {
                    if let Some((_, reason)) = self.pending_resync.take() {
                        self.resync(reason).await;
                    }
                }
                _ = periodic.tick() => self.resync(ResyncReason::Periodic).await,
                event = next_event(&mut self.monitor) => match event {
                    Some(event) => self.on_events(event).await,
                    None => self.monitor_died(),
                },
                changed = feed_changed(&mut self.feed) => {
                    if changed {
                        self.adopt_feed().await;
                    } else {
                        warn!("datastore feed closed; relying on periodic reloads");
                        self.feed = None;
                    }
                }
                update = kube_next(&mut self.kube) => self.on_kube(update).await,
                _ = kubelet_changed(&mut self.kubelet) => {
                    if let Some(rx) = &mut self.kubelet {
                        let found = rx.borrow_and_update().clone();
                        self.engine.set_kubelet_findings(found);
                    }
                }
                _ = housekeeping.tick() => self.housekeeping().await,
                _ = sleep_until_opt(eval_at) => {}
            }
            if self.monitor.is_none() && self.pending_resync.is_none() {
                self.schedule_resync(ResyncReason::Overrun, RETRY);
            }
            if self.engine.is_dirty()
                && self.in_sync()
                && self.pending_resync.is_none()
                && self.eval_not_before.is_none_or(|t| Instant::now() >= t)
            {
                // Adaptive coalescing: an isolated change is evaluated at once; in a storm the
                // next evaluation waits as long as the last one took, so checks never take more
                // than half the loop while events keep coming.
                let started = Instant::now();
                self.evaluate_and_publish().await;
                self.eval_not_before = coalesce_until(started.elapsed(), Instant::now());
            }
            self.tick(false).await;
        }
    }

    /// Apply a burst: this event and every one already queued, then yield once and take what
    /// arrived meanwhile. Evaluation happens after the burst.
    async fn on_events(&mut self, first: ObservedEvent) {
        let mut next = Some(first);
        let mut n = 0usize;
        let mut ifindexes_changed = false;
        loop {
            while let Some(event) = next.take() {
                n += 1;
                let link_event = matches!(
                    event,
                    ObservedEvent::LinkChanged { .. } | ObservedEvent::LinkRemoved { .. }
                );
                match self.engine.apply(&event) {
                    Applied::ResyncNeeded if event == ObservedEvent::Overrun => {
                        self.metrics.inc_netlink_overrun();
                        self.status.update(|s| s.resync.overruns += 1).await;
                        warn!("netlink notifications lost (socket overrun, ENOBUFS): full resync");
                        let gap = self
                            .last_resync
                            .map(|t| MIN_RESYNC_GAP.saturating_sub(t.elapsed()))
                            .unwrap_or_default();
                        self.schedule_resync(ResyncReason::Overrun, gap);
                    }
                    Applied::ResyncNeeded => {
                        debug!(?event, "change the kernel does not fully announce: resync");
                        self.schedule_resync(ResyncReason::Kernel, Duration::ZERO);
                        ifindexes_changed |= link_event;
                    }
                    Applied::Changed => ifindexes_changed |= link_event,
                    Applied::Unchanged => {}
                }
                if n >= MAX_EVENTS_PER_PASS {
                    break;
                }
                next = self.monitor.as_mut().and_then(Monitor::try_next);
            }
            if n >= MAX_EVENTS_PER_PASS {
                break;
            }
            // Let the reader move what the socket holds into the queue, then look again.
            tokio::task::yield_now().await;
            next = self.monitor.as_mut().and_then(Monitor::try_next);
            if next.is_none() {
                break;
            }
        }
        if ifindexes_changed {
            self.update_ebpf_devices();
        }
    }

    fn monitor_died(&mut self) {
        warn!("netlink subscription ended; re-subscribing and resyncing");
        self.monitor = None;
        self.metrics.inc_netlink_overrun();
        self.schedule_resync(ResyncReason::Overrun, Duration::ZERO);
    }

    /// Keep the earliest pending resync; a stronger reason wins the label.
    fn schedule_resync(&mut self, reason: ResyncReason, after: Duration) {
        let at = Instant::now() + after;
        self.pending_resync = Some(match self.pending_resync {
            Some((t, r)) => (t.min(at), r.max(reason)),
            None => (at, reason),
        });
    }

    /// Full resync: (re-)subscribe if needed, dump the kernel, and for startup/periodic ones
    /// reload the datastore too.
    async fn resync(&mut self, reason: ResyncReason) {
        let started = Instant::now();
        self.pending_resync = None;
        self.last_resync = Some(started);
        if self.monitor.is_none() {
            match Monitor::start_off_loop(self.netns.as_deref(), &self.monitor_options).await {
                Ok(m) => self.monitor = Some(m),
                Err(e) => {
                    error!(error = %e, "cannot subscribe to netlink; retrying");
                    self.schedule_resync(reason, RETRY);
                    return;
                }
            }
        }
        // Queued events happened before the dump, which supersedes them.
        if let Some(m) = self.monitor.as_mut() {
            while m.try_next().is_some() {}
        }
        match self.observer.snapshot(self.engine.devices()).await {
            Ok(observed) => {
                self.engine.replace_observed(observed);
                self.synced = true;
            }
            Err(e) => {
                error!(error = %e, reason = reason.as_str(), "kernel dump failed; retrying");
                self.schedule_resync(reason, RETRY);
                return;
            }
        }
        let kernel = started.elapsed();
        // A file whose modification time and size are unchanged is not re-parsed (5,000 nodes of
        // YAML cost more than the kernel dump); any other source is reloaded.
        let file_unchanged = matches!(self.datastore, AnyDatastore::File(_))
            && file_stamp(&self.datastore) == self.file_stamp
            && self.file_stamp.is_some();
        if self.last_desired_ok.is_none() || (reason.reloads_datastore() && !file_unchanged) {
            self.reload_datastore().await;
        } else if reason.reloads_datastore() {
            self.last_desired_ok = Some(Instant::now());
        }
        self.update_ebpf_devices();
        self.metrics.inc_resync(reason.as_str());
        let now = SystemTime::now();
        self.status
            .update(|s| {
                s.resync.count += 1;
                s.resync.last_full_resync = Some(now);
            })
            .await;
        self.heap_dirty = true;
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1e3);
        info!(
            reason = reason.as_str(),
            ms = %ms(started.elapsed()),
            kernel_ms = %ms(kernel),
            "full resync"
        );
    }

    /// Once a second: drop counters, datastore file changes, datastore age, liveness.
    async fn housekeeping(&mut self) {
        if std::mem::take(&mut self.heap_dirty) {
            // Loads, dumps and full evaluations build large transient structures over the
            // whole model and free them; glibc keeps those pages (at 5,000 peers ~15 MiB of
            // RSS) unless asked. At most once a second, only after such work (1-5 ms at 5,000
            // peers): incremental evaluations do not ask for it.
            trim_heap();
        }
        self.poll_drops().await;
        if let Some(link) = self
            .repair
            .as_ref()
            .filter(|l| l.take_changed() || l.holding())
        {
            // Repair recorded something: publish it (annotations, repair-contested).
            self.engine.set_extra_findings(link.contested());
            self.engine.mark_dirty();
        }
        if let AnyDatastore::File(_) = &self.datastore {
            let stamp = file_stamp(&self.datastore);
            if stamp != self.file_stamp {
                info!("datastore file changed; reloading");
                self.reload_datastore().await;
            }
        }
        if let Some(link) = self.kube.as_mut() {
            link.refresh();
            self.kube_bookkeeping();
            if let Some(snap) = self.kube.as_ref().and_then(|k| k.latest()) {
                let now = SystemTime::now();
                if let Some(age) = kube::age(snap, now) {
                    self.metrics.set_datastore_last_event_age(age);
                }
                let ds = snap.datastore_status(now);
                self.status.update(|s| s.datastore = ds).await;
            }
        } else if let Some(ok) = self.last_desired_ok {
            let age = ok.elapsed();
            self.metrics.set_datastore_last_event_age(age);
            let stale = age > self.config.datastore.stale_after;
            self.status
                .update(|s| {
                    s.datastore.last_event_age_seconds = Some(age.as_secs_f64());
                    s.datastore.stale = stale;
                })
                .await;
        }
        self.tick(true).await;
    }
}

/// When the next evaluation may run after one that took `took` and ended at `now`. A wait
/// shorter than the runtime timer's millisecond would be rounded up to it (a change behind a
/// 0.1 ms evaluation would wait 1-2 ms): such evaluations are cheap enough to run after each
/// pass, whose draining of the queue already batches what arrived meanwhile.
fn coalesce_until(took: Duration, now: Instant) -> Option<Instant> {
    (took >= TIMER_RESOLUTION).then(|| now + took)
}

fn trim_heap() {
    #[cfg(target_env = "gnu")]
    {
        let started = Instant::now();
        // SAFETY: malloc_trim only releases free heap pages; no pointers are invalidated.
        unsafe {
            libc::malloc_trim(0);
        }
        debug!(us = started.elapsed().as_micros() as u64, "heap trimmed");
    }
}

async fn next_event(monitor: &mut Option<Monitor>) -> Option<ObservedEvent> {
    match monitor {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_evaluations_longer_than_a_timer_tick_postpone_the_next() {
        let now = Instant::now();
        assert_eq!(coalesce_until(Duration::from_micros(120), now), None);
        assert_eq!(
            coalesce_until(Duration::from_millis(3), now),
            Some(now + Duration::from_millis(3))
        );
    }
}
