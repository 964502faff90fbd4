//! One repair pass: the open findings' remedies through the guard rails, re-derived from a
//! fresh kernel read, written, read back. Felix's route-table shape (set desired cheaply, one
//! pass against a fresh read, netlink behind a shim) with one more rule: notice when someone
//! else undoes the write.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::Path,
    sync::Arc,
    time::{Instant, SystemTime},
};

use tracing::{debug, info};

use super::{
    contest::{Contest, ContestTracker, Revert},
    guard::{touches_only_overlay, Guard, Refusal, Situation},
    ledger::FindingKey,
    verify::holds,
    ObjectKey, RepairError, RepairResult,
};
use crate::{
    checks::{self, CheckInput, DeviceSpec},
    config::RepairConfig,
    model::{CheckId, DesiredState, Finding, ObservedState, Remedy},
    observe::{
        self, KernelObserver, KernelWriter, NetlinkObserver, NetlinkWriter, RecordingWriter,
    },
};

/// The kernel as repair sees it: a fresh read of the watched devices, and writes.
pub trait Kernel: Send {
    fn read(
        &mut self,
        devices: &[String],
    ) -> impl Future<Output = observe::Result<ObservedState>> + Send;
    fn write(&mut self, remedy: &Remedy) -> impl Future<Output = observe::Result<()>> + Send;
}

/// Netlink dumps and writes in the namespace the daemon watches.
#[derive(Debug)]
pub struct NetlinkKernel {
    observer: NetlinkObserver,
    writer: NetlinkWriter,
}

impl NetlinkKernel {
    /// Connect in `netns` (`None`: the current namespace). Call inside a tokio runtime.
    pub fn new(netns: Option<&Path>) -> Result<Self, RepairError> {
        Ok(NetlinkKernel {
            observer: NetlinkObserver::new(netns).map_err(RepairError::Connect)?,
            writer: NetlinkWriter::new(netns).map_err(RepairError::Connect)?,
        })
    }
}

impl Kernel for NetlinkKernel {
    async fn read(&mut self, devices: &[String]) -> observe::Result<ObservedState> {
        let mut o = self.observer.snapshot(devices).await?;
        o.normalize();
        Ok(o)
    }

    async fn write(&mut self, remedy: &Remedy) -> observe::Result<()> {
        self.writer.write(remedy).await
    }
}

/// The recording fake reads back its own model (unit tests).
impl Kernel for RecordingWriter {
    async fn read(&mut self, devices: &[String]) -> observe::Result<ObservedState> {
        self.state.snapshot(devices).await
    }

    async fn write(&mut self, remedy: &Remedy) -> observe::Result<()> {
        KernelWriter::write(self, remedy).await
    }
}

/// What one pass looks at.
#[derive(Debug, Clone, Copy)]
pub struct Pass<'a> {
    /// The open findings of the latest evaluation, each with `since`.
    pub open: &'a [Arc<Finding>],
    /// `None`: offline (no datastore), nothing is repaired.
    pub desired: Option<&'a DesiredState>,
    pub in_sync: bool,
    /// One-shot (`scan --repair`): the finding's age is not judged.
    pub ignore_age: bool,
    /// Plan only (`scan --dry-run`): nothing is written.
    pub dry_run: bool,
    pub now: SystemTime,
    pub clock: Instant,
    /// Told of each write just before it is sent, so a finding that clears meanwhile waits
    /// for the result.
    pub ledger: Option<&'a super::RepairLink>,
    /// Why the datastore is stale or down when no `datastore-stale` finding says so (the file
    /// source's last successful load older than `stale_after`).
    pub datastore_down: Option<&'a str>,
}

/// One action and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub at: SystemTime,
    /// The finding it is for ([`Finding::key`]).
    pub finding: FindingKey,
    pub check: CheckId,
    pub peer_node: Option<String>,
    pub object: ObjectKey,
    pub remedy: Remedy,
    pub result: RepairResult,
    /// Why (refused, failed, contested) or what (applied: read back).
    pub message: String,
}

/// Everything a pass did.
#[derive(Debug, Default)]
pub struct PassReport {
    pub outcomes: Vec<Outcome>,
    /// Objects this pass found contested.
    pub contested: Vec<Contest>,
    /// Something was held back for a reason that passes by itself (age, budget): run again
    /// soon even without a new evaluation.
    pub retry: bool,
    /// Writes sent to the kernel.
    pub writes: usize,
}

/// The repairer's state across passes: the budgets, the contests, and which refusals were
/// already reported (each is reported once until it changes).
#[derive(Debug)]
pub struct Repairer {
    guard: Guard,
    contest: ContestTracker,
    specs: Vec<DeviceSpec>,
    devices: Vec<String>,
    reported: BTreeMap<(FindingKey, ObjectKey), &'static str>,
}

struct Candidate<'a> {
    finding: &'a Finding,
    remedy: &'a Remedy,
    object: ObjectKey,
}

impl Repairer {
    pub fn new(config: RepairConfig, specs: Vec<DeviceSpec>) -> Self {
        let contest = ContestTracker::new(
            config.contested_after,
            config.contested_window,
            config.contested_backoff,
        );
        Repairer {
            guard: Guard::new(config),
            contest,
            devices: specs.iter().map(|s| s.name.clone()).collect(),
            specs,
            reported: BTreeMap::new(),
        }
    }

    /// Contests whose backoff is running now.
    pub fn active_contests(&mut self, clock: Instant) -> Vec<Contest> {
        self.contest.active(clock)
    }

    pub async fn run<K: Kernel>(&mut self, kernel: &mut K, pass: Pass<'_>) -> PassReport {
        let mut report = PassReport::default();
        let (stale, invalid) = Situation::datastore_from(pass.open);
        let stale = stale.or(pass.datastore_down);
        let situation = Situation {
            in_sync: pass.in_sync,
            offline: pass.desired.is_none(),
            datastore_stale: stale,
            invalid_peers: &invalid,
            devices: &self.devices,
            ignore_age: pass.ignore_age,
            now: pass.now,
        };
        let open_keys: BTreeSet<FindingKey> = pass.open.iter().map(|f| f.key()).collect();
        self.reported.retain(|(k, _), _| open_keys.contains(k));

        let mut candidates: Vec<Candidate<'_>> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut refusals = Vec::new();
        for finding in pass
            .open
            .iter()
            .filter(|f| f.check != CheckId::RepairContested)
        {
            for remedy in &finding.remedies {
                let object = ObjectKey::of(remedy);
                if !seen.insert(object.clone()) {
                    continue; // Two findings share the write: once.
                }
                if let Err(refusal) = self.guard.check(&situation, finding, remedy) {
                    refusals.push((finding, remedy, object, refusal));
                    continue;
                }
                if let Some(left) = self.contest.contested(&object, pass.clock) {
                    refusals.push((
                        finding,
                        remedy,
                        object,
                        Refusal::Contested { backoff_left: left },
                    ));
                    continue;
                }
                candidates.push(Candidate {
                    finding,
                    remedy,
                    object,
                });
            }
        }
        for (finding, remedy, object, refusal) in refusals {
            self.refuse(&mut report, &pass, finding, remedy, object, refusal);
        }
        if candidates.is_empty() {
            return report;
        }

        // Immediately before writing: a fresh read, and the findings derived from it.
        let fresh = match kernel.read(&self.devices).await {
            Ok(o) => o,
            Err(e) => {
                for c in candidates {
                    let message = format!("cannot re-read the kernel before writing: {e}");
                    report.outcomes.push(outcome(
                        &pass,
                        c.finding,
                        c.remedy,
                        c.object,
                        RepairResult::Failed,
                        message,
                    ));
                }
                return report;
            }
        };
        let rederived = checks::evaluate(&CheckInput {
            devices: &self.specs,
            observed: &fresh,
            desired: pass.desired,
            drops: None,
            explained_recently: None,
            datastore: None,
        })
        .findings;
        let mut written: Vec<(Candidate<'_>, Remedy, String)> = Vec::new();
        for c in candidates {
            let key = c.finding.key();
            let Some(now_remedy) = rederived
                .iter()
                .filter(|f| f.key() == key)
                .flat_map(|f| &f.remedies)
                .find(|r| ObjectKey::of(r) == c.object)
                .cloned()
            else {
                debug!(object = %c.object, "no longer wrong in a fresh read; nothing to write");
                self.reported.remove(&(key, c.object));
                continue;
            };
            if let Err(refusal) = touches_only_overlay(&fresh, &now_remedy) {
                self.refuse(
                    &mut report,
                    &pass,
                    c.finding,
                    &now_remedy,
                    c.object,
                    refusal,
                );
                continue;
            }
            let mut note = String::new();
            if self.contest.was_ours(&c.object) {
                let describe = || {
                    (
                        now_remedy.to_string(),
                        now_remedy.device().to_string(),
                        c.finding.peer_node.clone(),
                    )
                };
                match self
                    .contest
                    .reverted(&c.object, pass.clock, pass.now, describe)
                {
                    Revert::Counted(n) => {
                        note = format!(" (undone {n} time(s) since the agent wrote it)");
                    }
                    Revert::Contested(contest) => {
                        // Reported here; the refusals of the backoff that follow are not news.
                        self.reported
                            .insert((key.clone(), c.object.clone()), "contested");
                        let message = format!(
                            "undone {} times within contested_window after the agent wrote it; \
                             left alone until {}",
                            contest.reverts,
                            humantime::format_rfc3339_seconds(contest.until)
                        );
                        report.outcomes.push(outcome(
                            &pass,
                            c.finding,
                            &now_remedy,
                            c.object,
                            RepairResult::Contested,
                            message,
                        ));
                        report.contested.push(contest);
                        continue;
                    }
                }
            }
            if let Err(refusal) = self.guard.admit(&c.object, &format!("{key:?}"), pass.clock) {
                self.refuse(
                    &mut report,
                    &pass,
                    c.finding,
                    &now_remedy,
                    c.object,
                    refusal,
                );
                continue;
            }
            if pass.dry_run {
                report.outcomes.push(outcome(
                    &pass,
                    c.finding,
                    &now_remedy,
                    c.object,
                    RepairResult::Planned,
                    format!("would write{note}"),
                ));
                continue;
            }
            info!(
                action = now_remedy.action(),
                result = "planned",
                object = %c.object,
                check = %c.finding.check,
                peer = c.finding.peer_node.as_deref().unwrap_or("-"),
                command = %now_remedy,
                "repair planned{note}"
            );
            report.writes += 1;
            if let Some(ledger) = pass.ledger {
                let writing = "writing".to_string();
                ledger.begin(&outcome(
                    &pass,
                    c.finding,
                    &now_remedy,
                    c.object.clone(),
                    RepairResult::Planned,
                    writing,
                ));
            }
            match kernel.write(&now_remedy).await {
                Ok(()) => written.push((c, now_remedy, note)),
                Err(e) => {
                    let message = format!("the kernel refused the write: {e}");
                    report.outcomes.push(outcome(
                        &pass,
                        c.finding,
                        &now_remedy,
                        c.object,
                        RepairResult::Failed,
                        message,
                    ));
                }
            }
        }
        if written.is_empty() {
            return report;
        }

        // Read back: `applied` only when the kernel holds the object.
        let back = kernel.read(&self.devices).await;
        for (c, remedy, note) in written {
            let key = c.finding.key();
            self.reported.remove(&(key, c.object.clone()));
            let (result, message) = match &back {
                Ok(o) if holds(o, &remedy) => {
                    self.contest.applied(&c.object);
                    (RepairResult::Applied, format!("written and read back{note}"))
                }
                Ok(_) => (
                    RepairResult::Failed,
                    "the kernel acknowledged the write but a read back does not show it (something changed it at once?)".to_string(),
                ),
                Err(e) => (RepairResult::Failed, format!("written, but cannot read it back: {e}")),
            };
            report.outcomes.push(outcome(
                &pass, c.finding, &remedy, c.object, result, message,
            ));
        }
        self.contest.prune(pass.clock);
        report
    }

    fn refuse(
        &mut self,
        report: &mut PassReport,
        pass: &Pass<'_>,
        finding: &Finding,
        remedy: &Remedy,
        object: ObjectKey,
        refusal: Refusal,
    ) {
        report.retry |= refusal.is_transient();
        if refusal == Refusal::ObjectRateLimited {
            // The per-object gap only paces a retry (a write just undone); not worth a record.
            debug!(object = %object, "repair paced: {refusal}");
            return;
        }
        let code = refusal.code();
        let first = self.reported.insert((finding.key(), object.clone()), code) != Some(code);
        if !first {
            return;
        }
        let (result, message) = match &refusal {
            Refusal::Contested { .. } => (RepairResult::Contested, refusal.to_string()),
            // Not refused: planned, once the finding is old enough.
            Refusal::TooYoung { .. } => (RepairResult::Planned, format!("waiting: {refusal}")),
            _ => (RepairResult::Refused, refusal.to_string()),
        };
        report
            .outcomes
            .push(outcome(pass, finding, remedy, object, result, message));
    }
}

fn outcome(
    pass: &Pass<'_>,
    finding: &Finding,
    remedy: &Remedy,
    object: ObjectKey,
    result: RepairResult,
    message: String,
) -> Outcome {
    Outcome {
        at: pass.now,
        finding: finding.key(),
        check: finding.check,
        peer_node: finding.peer_node.clone(),
        object,
        remedy: remedy.clone(),
        result,
        message,
    }
}
