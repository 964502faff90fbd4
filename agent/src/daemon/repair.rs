//! The repair consumer (`mode = "repair"` only): each delta's open findings through one
//! [`Repairer`] pass, on the consumer's own thread, so a slow kernel or API never holds up the
//! loop. What it did goes to the shared [`RepairLink`] (the loop annotates findings with it and
//! raises `repair-contested`), the status API's `repairs`, metrics and the log.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::stream::{Consumer, FindingsDelta};
use crate::{
    act::repair::{
        report, Contest, NetlinkKernel, Outcome, Pass, RepairLink, RepairResult, Repairer,
    },
    config::{Config, Escalate, Profile},
    desired::KubeSource,
    serve::{Metrics, StatusHandle},
};

/// How soon a held-back repair (young finding, budget) is looked at again, and how often a
/// contest's backoff is checked for its end.
const RETRY_EVERY: Duration = Duration::from_millis(100);

pub(super) struct RepairConsumer {
    link: RepairLink,
    repairer: Repairer,
    /// Opened on the consumer's own runtime at the first pass.
    kernel: Option<NetlinkKernel>,
    netns: Option<PathBuf>,
    status: StatusHandle,
    metrics: Arc<Metrics>,
    profile: Profile,
    node: String,
    last: Option<Arc<FindingsDelta>>,
    /// The last pass held something back that passes by itself.
    retry: bool,
    connect_failed: bool,
    /// The Kubernetes source, for Events (`publish_events`) and the escalation.
    kube: Option<watch::Receiver<Option<KubeSource>>>,
    escalate: Escalate,
    backoff: Duration,
    last_escalation: Option<Instant>,
}

impl RepairConsumer {
    pub(super) fn new(
        config: &Config,
        netns: Option<PathBuf>,
        link: RepairLink,
        status: StatusHandle,
        metrics: Arc<Metrics>,
        kube: Option<watch::Receiver<Option<KubeSource>>>,
    ) -> Self {
        RepairConsumer {
            link,
            repairer: Repairer::new(config.repair.clone(), config.device_specs()),
            kernel: None,
            netns,
            status,
            metrics,
            profile: config.profile,
            node: config.node_name.clone(),
            last: None,
            retry: false,
            connect_failed: false,
            kube,
            escalate: config.repair.escalate,
            backoff: config.repair.contested_backoff,
            last_escalation: None,
        }
    }

    fn source(&self) -> Option<KubeSource> {
        self.kube.as_ref().and_then(|rx| rx.borrow().clone())
    }

    /// A Node Event per outcome that is news (`publish_events`); spawned, never awaited.
    fn events(&self, outcomes: &[Outcome]) {
        let Some(src) = self.source() else {
            return;
        };
        for o in outcomes
            .iter()
            .filter(|o| o.result != RepairResult::Planned)
        {
            let (reason, kind) = match o.result {
                RepairResult::Applied => ("RepairApplied", "Normal"),
                RepairResult::Failed => ("RepairFailed", "Warning"),
                RepairResult::Refused => ("RepairRefused", "Warning"),
                RepairResult::Contested => ("RepairContested", "Warning"),
                RepairResult::Planned => continue,
            };
            let key = format!("{} {}", o.object, o.result);
            let message = format!("{}: {}", o.remedy, o.message);
            let src = src.clone();
            tokio::spawn(async move {
                match src.publish_action_event(&key, reason, kind, &message).await {
                    Ok(outcome) => debug!(?outcome, reason, "repair event"),
                    Err(e) => warn!(error = %e, reason, "cannot publish a repair event"),
                }
            });
        }
    }

    /// `escalate = "restart-calico-node"`: at most once per `contested_backoff`.
    async fn escalate(&mut self, contests: &[Contest]) {
        if self.escalate != Escalate::RestartCalicoNode || contests.is_empty() {
            return;
        }
        if self
            .last_escalation
            .is_some_and(|t| t.elapsed() < self.backoff)
        {
            debug!("calico-node was restarted within contested_backoff; not again");
            return;
        }
        let Some(src) = self.source() else {
            warn!("escalate = restart-calico-node, but the API server is not connected");
            return;
        };
        self.last_escalation = Some(Instant::now());
        let objects: Vec<String> = contests.iter().map(|c| c.object.to_string()).collect();
        match src.restart_calico_node().await {
            Ok(Some(pod)) => {
                warn!(pod = %pod, objects = ?objects, "contested repair: deleted this node's calico-node pod so Felix resyncs");
                self.metrics.inc_repair("restart-calico-node", "applied");
                let message = format!(
                    "deleted {pod} so its DaemonSet recreates it and Felix resyncs: repairs of {} were undone {} times",
                    objects.join(", "),
                    contests[0].reverts
                );
                if let Err(e) = src
                    .publish_action_event(
                        "restart-calico-node",
                        "CalicoNodeRestarted",
                        "Warning",
                        &message,
                    )
                    .await
                {
                    warn!(error = %e, "cannot publish the calico-node restart event");
                }
            }
            Ok(None) => warn!("contested repair: no calico-node pod on this node to restart"),
            Err(e) => {
                self.metrics.inc_repair("restart-calico-node", "failed");
                warn!(error = %e, "contested repair: cannot restart calico-node")
            }
        }
    }

    async fn pass(&mut self) {
        let Some(delta) = self.last.clone() else {
            return;
        };
        if self.kernel.is_none() {
            match NetlinkKernel::new(self.netns.as_deref()) {
                Ok(k) => self.kernel = Some(k),
                Err(e) => {
                    if !std::mem::replace(&mut self.connect_failed, true) {
                        warn!(error = %e, "repair cannot reach the kernel; retrying");
                    }
                    self.retry = true;
                    return;
                }
            }
        }
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        let desired = self.link.desired();
        let down = self.link.datastore_down();
        let now = SystemTime::now();
        let clock = Instant::now();
        let done = self
            .repairer
            .run(
                kernel,
                Pass {
                    open: &delta.open,
                    desired: desired.as_deref(),
                    in_sync: delta.in_sync,
                    ignore_age: false,
                    dry_run: false,
                    now,
                    clock,
                    ledger: Some(&self.link),
                    datastore_down: down.as_deref(),
                },
            )
            .await;
        self.retry = done.retry;
        for o in &done.outcomes {
            report::log(o);
            self.metrics
                .inc_repair(o.remedy.action(), o.result.as_str());
            self.link.record(o);
        }
        self.events(&done.outcomes);
        self.escalate(&done.contested).await;
        if !done.outcomes.is_empty() {
            let outcomes = done.outcomes;
            self.status
                .update(|s| report::push_records(&mut s.repairs, &outcomes))
                .await;
        }
        self.publish_contests(clock);
    }

    fn publish_contests(&mut self, clock: Instant) {
        let findings = self
            .repairer
            .active_contests(clock)
            .iter()
            .map(|c| report::contested_finding(c, self.profile, &self.node))
            .collect();
        self.link.set_contested(findings);
    }
}

impl Consumer for RepairConsumer {
    const NAME: &'static str = "repair";
    const TICK: Option<Duration> = Some(RETRY_EVERY);

    async fn consume(&mut self, delta: Arc<FindingsDelta>, _missed: u64) {
        // Every delta carries the whole open set: the latest is all a pass needs.
        self.last = Some(delta);
        self.pass().await;
    }

    async fn tick(&mut self) {
        if self.retry {
            self.pass().await;
        } else {
            self.publish_contests(Instant::now());
        }
    }
}
