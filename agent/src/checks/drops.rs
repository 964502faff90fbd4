//! Kernel drop counters turned into evidence: `traffic-blackholed` when packets toward a peer are
//! being dropped while a dataplane finding explains it, `drops-unexplained` when nothing does.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

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

/// Peers whose drops a finding explained lately: packets queued behind a fault that was just
/// repaired are freed (and counted) seconds later, and are not `drops-unexplained`. Kept
/// across evaluations; after a mass reconvergence it holds every peer, so nothing here is
/// linear in it per evaluation except an expiry that is actually due.
#[derive(Debug, Clone)]
pub struct ExplainedDrops {
    grace: Duration,
    /// Per peer, when a finding last explained drops toward it.
    at: BTreeMap<String, SystemTime>,
    /// No entry expires before this (None: nothing to expire).
    next_expiry: Option<SystemTime>,
}

impl ExplainedDrops {
    /// Peers stay explained for `grace` after the last finding that explained them.
    pub fn new(grace: Duration) -> Self {
        ExplainedDrops {
            grace,
            at: BTreeMap::new(),
            next_expiry: None,
        }
    }

    /// A finding explains drops toward `peer` at `now`.
    pub fn note(&mut self, peer: &str, now: SystemTime) {
        match self.at.get_mut(peer) {
            Some(at) => *at = now,
            None => {
                self.at.insert(peer.to_string(), now);
            }
        }
        // An earlier bound than the true one only costs an early scan.
        if let Some(due) = now.checked_add(self.grace) {
            self.next_expiry = Some(self.next_expiry.map_or(due, |t| t.min(due)));
        }
    }

    /// Forgets the peers last explained more than `grace` before `now` (a clock step
    /// backwards forgets nothing). Scans only when some entry is due.
    pub fn expire(&mut self, now: SystemTime) {
        if self.next_expiry.is_none_or(|due| now <= due) {
            return;
        }
        let grace = self.grace;
        self.at
            .retain(|_, at| now.duration_since(*at).map_or(true, |age| age <= grace));
        self.next_expiry = self
            .at
            .values()
            .filter_map(|at| at.checked_add(grace))
            .min();
    }

    pub fn contains(&self, peer: &str) -> bool {
        self.at.contains_key(peer)
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    pub fn peers(&self) -> impl Iterator<Item = &str> {
        self.at.keys().map(String::as_str)
    }
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
    explained_recently: Option<&ExplainedDrops>,
    findings: &mut Vec<Arc<Finding>>,
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
                // The evaluator's parts share this finding: only this report's copy counts.
                let f = Arc::make_mut(f);
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
        added.push(Arc::new(f));
    }
    findings.extend(added);
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn explained_peers_last_the_grace_after_their_last_note() {
        let mut e = ExplainedDrops::new(GRACE);
        e.note("k8s02", at(0));
        e.note("k8s03", at(5));
        e.expire(at(10));
        assert_eq!(e.peers().collect::<Vec<_>>(), ["k8s02", "k8s03"]);
        e.expire(at(11));
        assert_eq!(e.peers().collect::<Vec<_>>(), ["k8s03"]);
        // A new note restarts the peer's grace: the earlier expiry bound must not drop it.
        e.note("k8s03", at(14));
        e.expire(at(20));
        assert!(e.contains("k8s03"));
        e.expire(at(24));
        assert!(e.contains("k8s03"));
        e.expire(at(25));
        assert!(e.is_empty());
    }

    #[test]
    fn a_clock_step_backwards_forgets_nothing() {
        let mut e = ExplainedDrops::new(GRACE);
        e.note("k8s03", at(100));
        e.expire(at(50));
        assert!(e.contains("k8s03"));
        e.expire(at(111));
        assert!(!e.contains("k8s03"));
    }

    #[test]
    fn recently_explained_peer_gets_no_unexplained_finding() {
        let drops = DropSummary {
            per_peer: BTreeMap::from([(
                "k8s03".to_string(),
                PeerDrops {
                    device: "vxlan.calico".into(),
                    packets: 7,
                    reasons: BTreeMap::from([("NEIGH_FAILED".to_string(), 7)]),
                    unexplained: BTreeMap::from([("NEIGH_FAILED".to_string(), 7)]),
                    ..PeerDrops::default()
                },
            )]),
        };
        let mut findings = Vec::new();
        apply(&drops, None, &mut findings);
        assert_eq!(findings.len(), 1, "{findings:?}");
        assert_eq!(findings[0].check, CheckId::DropsUnexplained);

        let mut explained = ExplainedDrops::new(GRACE);
        explained.note("k8s03", at(0));
        let mut findings = Vec::new();
        apply(&drops, Some(&explained), &mut findings);
        assert!(findings.is_empty(), "{findings:?}");
    }
}
