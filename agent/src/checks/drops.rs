//! Kernel drop counters turned into evidence: `traffic-blackholed` when packets toward a peer are
//! being dropped while a dataplane finding explains it, `drops-unexplained` when nothing does.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::{CheckId, Finding, Severity};

/// Data packets dropped toward one peer in the evaluation window, by kernel drop reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerDrops {
    /// The device most of the packets were dropped on.
    pub device: String,
    /// Every device packets toward the peer were dropped on (a dual-stack peer's IPv4 and
    /// IPv6 overlays): a finding explains only the drops of its own device's family. Empty:
    /// not known, any finding for the peer explains them.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub devices: BTreeSet<String>,
    pub packets: u64,
    pub reasons: BTreeMap<String, u64>,
    /// The part of `reasons` not yet acknowledged as explained: the daemon acknowledges drops
    /// toward a peer while (and shortly after) a finding explains them, so packets lost to a
    /// fault that was just repaired never turn into `drops-unexplained`. Equal to `reasons`
    /// when nothing was acknowledged (one-shot scan).
    pub unexplained: BTreeMap<String, u64>,
}

/// Drops since the previous evaluation, attributed to peers (control traffic such as ARP
/// solicits is not data loss and is not in here).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropSummary {
    pub per_peer: BTreeMap<String, PeerDrops>,
}

/// Checks whose finding explains data drops toward their peer.
pub fn explains_drops(check: CheckId) -> bool {
    matches!(
        check,
        CheckId::GatewayWrongVtep
            | CheckId::GatewayNotAVtep
            | CheckId::GatewayIsNetworkAddress
            | CheckId::NeighbourUnresolved
            | CheckId::NeighbourMacMismatch
            | CheckId::FdbMissing
            | CheckId::FdbWrongDestination
            | CheckId::RouteMissing
            | CheckId::RouteStale
    )
}

fn list(reasons: &BTreeMap<String, u64>) -> String {
    reasons
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn apply(
    drops: &DropSummary,
    explained_recently: Option<&BTreeSet<String>>,
    findings: &mut Vec<Finding>,
) {
    let mut added = Vec::new();
    for (peer, d) in &drops.per_peer {
        if d.packets == 0 {
            continue;
        }
        let mut explained = Vec::new();
        for f in findings.iter_mut() {
            let same_overlay = d.devices.is_empty() || d.devices.contains(&f.device);
            if f.peer_node.as_deref() == Some(peer.as_str())
                && explains_drops(f.check)
                && same_overlay
            {
                f.evidence.drops = Some(d.packets);
                f.evidence.drop_reasons = d.reasons.clone();
                explained.push(f.check.as_str());
            }
        }
        let recently = explained_recently.is_some_and(|r| r.contains(peer));
        let (mut f, packets, reasons) = if explained.is_empty() {
            if recently {
                continue;
            }
            let packets: u64 = d.unexplained.values().sum();
            if packets == 0 {
                continue;
            }
            let f = Finding::new(
                CheckId::DropsUnexplained,
                Severity::Warning,
                &d.device,
                format!(
                    "{packets} packets to {peer} dropped by the kernel ({}) although routes, \
                     neighbour and FDB entries look right",
                    list(&d.unexplained)
                ),
            );
            (f, packets, &d.unexplained)
        } else {
            explained.sort();
            explained.dedup();
            let f = Finding::new(
                CheckId::TrafficBlackholed,
                Severity::Critical,
                &d.device,
                format!(
                    "{} packets to {peer} dropped ({}), explained by {}",
                    d.packets,
                    list(&d.reasons),
                    explained.join(", ")
                ),
            );
            (f, d.packets, &d.reasons)
        };
        f.peer_node = Some(peer.clone());
        f.evidence.drops = Some(packets);
        f.evidence.drop_reasons = reasons.clone();
        added.push(f);
    }
    findings.extend(added);
}
