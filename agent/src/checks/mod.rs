//! Pure checks: `(desired, observed, drops) -> findings`. No I/O, no clocks.
//!
//! Level-triggered: every evaluation looks at the whole state of the devices it is given, so the
//! daemon can call it after any event and on every resync and get the same answer for the same
//! state. One finding per root cause: a peer whose six blocks all point at one wrong gateway is
//! one `gateway-wrong-vtep` finding with six routes as evidence.

mod datastore;
mod device;
mod drops;
mod incremental;
pub mod kubelet;
mod lookup;
mod offline;
mod peers;
mod stray;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
pub(crate) mod tests_dual_stack;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use datastore::{findings as datastore_findings, DatastoreHealth, StaleNote};
pub use drops::{explains_drops, DropSummary, ExplainedDrops, PeerDrops};
pub use incremental::{Evaluator, Recomputed, Stamp};

use crate::model::{
    CheckId, ClusterSettings, DesiredState, Finding, MacAddr, ObservedState, Severity,
};
#[cfg(test)]
mod tests_incremental;

pub use crate::model::Family;

/// How one overlay device should be configured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSpec {
    pub name: String,
    pub family: Family,
    /// Expected VNI, when known (Calico 4096, flannel 1).
    pub vni: Option<u32>,
    /// Expected UDP port, when known (Calico 4789, flannel 8472).
    pub port: Option<u16>,
    /// Expected MTU, when configured (`vxlan_mtu`; Calico and flannel derive it otherwise).
    pub mtu: Option<u32>,
}

impl DeviceSpec {
    /// The conventional settings for a device name used by Calico or flannel; unknown names get
    /// no VNI/port expectation (checked only for presence, state and routes).
    pub fn for_name(name: &str) -> DeviceSpec {
        let (family, vni, port) = match name {
            "vxlan.calico" => (Family::V4, Some(4096), Some(4789)),
            "vxlan-v6.calico" => (Family::V6, Some(4096), Some(4789)),
            n if n.starts_with("flannel.") => {
                let vni = n["flannel.".len()..].parse().ok();
                (Family::V4, vni, Some(8472))
            }
            n if n.starts_with("flannel-v6.") => {
                let vni = n["flannel-v6.".len()..].parse().ok();
                (Family::V6, vni, Some(8472))
            }
            _ => (Family::V4, None, None),
        };
        DeviceSpec {
            name: name.to_string(),
            family,
            vni,
            port,
            mtu: None,
        }
    }

    /// The conventional settings overridden by what the cluster says (`vxlan_vni`,
    /// `vxlan_port`, `vxlan_mtu`; a cluster migrated from flannel keeps VNI 1 and port 8472).
    pub fn with_overrides(mut self, vni: Option<u32>, port: Option<u16>, mtu: Option<u32>) -> Self {
        self.vni = vni.or(self.vni);
        self.port = port.or(self.port);
        self.mtu = mtu.or(self.mtu);
        self
    }

    /// What the cluster's own configuration says (Calico's FelixConfiguration) wins over the
    /// config keys for Calico's devices: it is what Felix programs them with.
    pub fn with_cluster(&self, cluster: &ClusterSettings) -> DeviceSpec {
        let mut spec = self.clone();
        if !matches!(spec.name.as_str(), "vxlan.calico" | "vxlan-v6.calico") {
            return spec;
        }
        let felix = &cluster.felix;
        spec.vni = felix.vxlan_vni.or(spec.vni);
        spec.port = felix.vxlan_port.or(spec.port);
        let mtu = match spec.family {
            Family::V4 => felix.vxlan_mtu,
            Family::V6 => felix.vxlan_mtu_v6,
        };
        spec.mtu = mtu.or(spec.mtu);
        spec
    }
}

/// Everything a check evaluation looks at.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub devices: &'a [DeviceSpec],
    pub observed: &'a ObservedState,
    /// `None`: offline mode (no datastore); only the checks that need none run.
    pub desired: Option<&'a DesiredState>,
    /// Drops toward peers since the previous evaluation (eBPF), when available.
    pub drops: Option<&'a DropSummary>,
    /// Peers whose drops a finding explained shortly before this evaluation: packets queued
    /// behind a fault that was just repaired are freed (and counted) seconds later, and are
    /// not `drops-unexplained`.
    pub explained_recently: Option<&'a ExplainedDrops>,
    /// The datastore's own freshness (Kubernetes), when it reports one.
    pub datastore: Option<&'a DatastoreHealth>,
}

/// A remote node's health: the worst of its open findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Ok,
    Warning,
    Critical,
}

impl Verdict {
    /// Info findings do not degrade a peer.
    pub fn from_worst(worst: Option<Severity>) -> Self {
        match worst {
            Some(Severity::Critical) => Verdict::Critical,
            Some(Severity::Warning) => Verdict::Warning,
            _ => Verdict::Ok,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warning => "warning",
            Verdict::Critical => "critical",
        }
    }
}

/// Verdict for one remote node, for status views: computed here once, from the final findings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerVerdict {
    pub node: String,
    pub vtep: IpAddr,
    pub vtep_mac: MacAddr,
    pub node_ip: IpAddr,
    pub blocks: Vec<IpNet>,
    pub verdict: Verdict,
    pub findings: usize,
}

/// A check that could not run, and why (offline mode, missing device, …).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedCheck {
    pub check: CheckId,
    pub reason: String,
}

/// The result of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckReport {
    /// Shared, not copied, with the evaluator's kept parts (and in the daemon the open
    /// list); `Arc::make_mut` copies the one finding a holder changes.
    pub findings: Vec<Arc<Finding>>,
    pub skipped: Vec<SkippedCheck>,
    pub peers: Vec<PeerVerdict>,
    /// Routes on overlay devices that were evaluated.
    pub routes_checked: usize,
}

impl CheckReport {
    /// Worst severity present, if any finding exists.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }
}

/// Runs every check that the inputs allow, from scratch (the daemon keeps an [`Evaluator`]
/// and re-checks only what changed).
pub fn evaluate(input: &CheckInput<'_>) -> CheckReport {
    if input.observed.is_normalized() {
        return Evaluator::default().evaluate(input);
    }
    let mut observed = input.observed.clone();
    observed.normalize();
    Evaluator::default().evaluate(&CheckInput {
        observed: &observed,
        ..*input
    })
}

/// What every evaluation does after the checks proper: offline notes, drop evidence, the
/// family of each finding, the order, the verdicts.
fn finish(
    input: &CheckInput<'_>,
    specs: &[DeviceSpec],
    peer_list: bool,
    mut report: CheckReport,
) -> CheckReport {
    if input.desired.is_none() {
        for check in [
            CheckId::GatewayWrongVtep,
            CheckId::RouteMissing,
            CheckId::RouteStale,
            CheckId::NeighbourMacMismatch,
            CheckId::FdbWrongDestination,
        ] {
            report.skipped.push(SkippedCheck {
                check,
                reason: "no datastore (offline mode): expected VTEPs and blocks are unknown"
                    .to_string(),
            });
        }
    }
    if let Some(drops) = input.drops {
        drops::apply(drops, input.explained_recently, &mut report.findings);
    }
    // Every finding about an overlay device names the family that device carries.
    for f in &mut report.findings {
        if let Some(spec) = specs.iter().find(|s| s.name == f.device) {
            // Parts come with it: written only where missing, so nothing shared is copied.
            if f.family != Some(spec.family) {
                Arc::make_mut(f).family = Some(spec.family);
            }
        }
    }
    report.findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.peer_node.cmp(&b.peer_node))
            .then_with(|| a.check.cmp(&b.check))
            .then_with(|| a.route.cmp(&b.route))
    });
    if let Some(desired) = input.desired.filter(|_| peer_list) {
        report.peers = verdicts(desired, &report.findings);
    }
    report
}

/// Routes Calico and flannel program live in the main table.
pub const MAIN_TABLE: u32 = 254;

fn verdicts(desired: &DesiredState, findings: &[Arc<Finding>]) -> Vec<PeerVerdict> {
    let summary = PeerVerdicts::of(desired, findings);
    desired
        .peers()
        .map(|p| {
            let (verdict, findings) = summary.get(&p.name);
            PeerVerdict {
                node: p.name.clone(),
                vtep: p.vtep_ip,
                vtep_mac: p.vtep_mac,
                node_ip: p.node_ip,
                blocks: p.blocks.clone(),
                verdict,
                findings,
            }
        })
        .collect()
}

/// Every peer's verdict, held as the peers with findings (every other one is ok): what the
/// daemon passes on after each evaluation, a few entries however many peers there are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerVerdicts {
    /// Remote nodes judged.
    pub peers: usize,
    /// Per remote node with findings: its verdict and how many.
    pub with_findings: BTreeMap<String, (Verdict, usize)>,
}

impl PeerVerdicts {
    /// The verdicts `findings` give the datastore's remote nodes.
    pub fn of(desired: &DesiredState, findings: &[Arc<Finding>]) -> Self {
        let mut by_peer: BTreeMap<&str, (usize, Option<Severity>)> = BTreeMap::new();
        for f in findings {
            if let Some(p) = &f.peer_node {
                let e = by_peer.entry(p.as_str()).or_default();
                e.0 += 1;
                e.1 = e.1.max(Some(f.severity));
            }
        }
        let is_peer = |name: &str| name != desired.local_node && desired.nodes.contains_key(name);
        PeerVerdicts {
            peers: desired.nodes.len()
                - usize::from(desired.nodes.contains_key(&desired.local_node)),
            with_findings: by_peer
                .into_iter()
                .filter(|(name, _)| is_peer(name))
                .map(|(name, (n, worst))| (name.to_string(), (Verdict::from_worst(worst), n)))
                .collect(),
        }
    }

    /// One peer's verdict and finding count.
    pub fn get(&self, peer: &str) -> (Verdict, usize) {
        self.with_findings
            .get(peer)
            .copied()
            .unwrap_or((Verdict::Ok, 0))
    }

    /// How many peers have this verdict.
    pub fn count(&self, verdict: Verdict) -> usize {
        let judged = self
            .with_findings
            .values()
            .filter(|(v, _)| *v == verdict)
            .count();
        match verdict {
            // Peers with only info findings are ok too.
            Verdict::Ok => self.peers - self.with_findings.len() + judged,
            _ => judged,
        }
    }
}
