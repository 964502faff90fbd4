//! The daemon's model, without I/O: observed + desired state, the dirty flag, and evaluation.
//!
//! Felix's split: [`Engine::apply`] is cheap (update the model, note what changed) and never
//! evaluates; [`Engine::evaluate`] runs the checks once when the caller has drained its burst
//! of events, again only for what the burst changed ([`checks::Evaluator`]): one peer's route
//! at 5,000 peers is one peer's checks, not 5,000.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::findings::{FindingTracker, Transitions};
use crate::{
    checks::{
        self, CheckInput, CheckReport, DatastoreHealth, DeviceSpec, DropSummary, Evaluator,
        ExplainedDrops, PeerVerdicts,
    },
    model::{DesiredState, Finding, ObservedState},
    observe::{Applied, ObservedEvent},
};

/// How long after its explaining finding cleared a peer's drops are still put down to it:
/// packets queued behind a wrong gateway are freed (and counted) only when the neighbour
/// entry fails, seconds after the route was repaired.
pub const DROPS_EXPLAINED_GRACE: Duration = Duration::from_secs(10);

/// The result of one evaluation.
#[derive(Debug)]
pub struct Evaluation {
    /// The checks' report; its `findings` are moved to `open` and its `peers` list is left
    /// empty (see `verdicts`).
    pub report: CheckReport,
    /// The open findings as tracked (each with `since`), shared with the tracker.
    pub open: Arc<Vec<Arc<Finding>>>,
    /// Every peer's verdict, from the open findings.
    pub verdicts: PeerVerdicts,
    /// What the checks computed again (everything, or the parts the changes concern).
    pub recomputed: checks::Recomputed,
    pub transitions: Transitions,
    pub duration: Duration,
}

/// Observed and desired state of one node, and the findings they produce.
#[derive(Debug)]
pub struct Engine {
    devices: Vec<String>,
    specs: Vec<DeviceSpec>,
    observed: ObservedState,
    /// `None` in offline mode (no datastore) or before the first successful load.
    desired: Option<DesiredState>,
    drops: DropSummary,
    tracker: FindingTracker,
    /// The datastore's own freshness report (Kubernetes), judged by the checks.
    datastore: Option<DatastoreHealth>,
    /// The peers a finding that explains drops toward them was open for lately.
    explained: ExplainedDrops,
    /// `node_name` was not configured: a local node missing from the datastore is looked up
    /// by address.
    local_by_address: bool,
    /// The kubelet watch-stall check's latest findings.
    kubelet: Vec<Finding>,
    /// Findings raised outside the checks (repair's `repair-contested`), tracked like theirs.
    extra: Vec<Finding>,
    /// The checks' parts from the last evaluation, and what changed since.
    evaluator: Evaluator,
    dirty: bool,
}

impl Engine {
    pub fn new(devices: &[String]) -> Self {
        Self::with_specs(devices.iter().map(|d| DeviceSpec::for_name(d)).collect())
    }

    /// For devices whose expected settings differ from the conventional ones.
    pub fn with_specs(specs: Vec<DeviceSpec>) -> Self {
        Engine {
            devices: specs.iter().map(|s| s.name.clone()).collect(),
            specs,
            observed: ObservedState::default(),
            desired: None,
            drops: DropSummary::default(),
            tracker: FindingTracker::default(),
            datastore: None,
            explained: ExplainedDrops::new(DROPS_EXPLAINED_GRACE),
            local_by_address: false,
            kubelet: Vec::new(),
            extra: Vec::new(),
            evaluator: Evaluator::without_peer_list(),
            dirty: true,
        }
    }

    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    pub fn observed(&self) -> &ObservedState {
        &self.observed
    }

    pub fn desired(&self) -> Option<&DesiredState> {
        self.desired.as_ref()
    }

    pub fn open_findings(&self) -> &[Arc<Finding>] {
        self.tracker.open()
    }

    /// Something changed since the last evaluation.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Apply one kernel event to the model.
    pub fn apply(&mut self, event: &ObservedEvent) -> Applied {
        let applied = self.observed.apply(event, &self.devices);
        match applied {
            Applied::Changed => self.evaluator.note(event),
            Applied::ResyncNeeded => self.evaluator.invalidate(),
            Applied::Unchanged => return applied,
        }
        self.dirty = true;
        applied
    }

    /// Replace the model with a full snapshot.
    pub fn replace_observed(&mut self, mut observed: ObservedState) {
        // Snapshots arrive normalized: checking is cheaper than sorting again.
        if !observed.is_normalized() {
            observed.normalize();
        }
        self.observed = observed;
        // A resync always re-evaluates everything: that is its point.
        self.dirty = true;
        self.evaluator.invalidate();
        if self.local_by_address {
            // The local node may be another one now (found by this host's addresses).
            self.evaluator.desired_changed();
        }
        if let Some(mut d) = self.desired.take() {
            self.adopt_local(&mut d);
            self.desired = Some(d);
        }
    }

    /// Replace the desired state (`None`: offline checks only).
    pub fn set_desired(&mut self, mut desired: Option<DesiredState>) -> bool {
        if let Some(d) = desired.as_mut() {
            self.adopt_local(d);
        }
        let changed = desired != self.desired;
        if changed {
            self.desired = desired;
            self.dirty = true;
            self.evaluator.desired_changed();
        }
        changed
    }

    /// The local node's name was not configured: when it is not in the datastore either,
    /// find it by this host's addresses (the overlay devices' `local`, which both CNIs set to
    /// the node's address).
    pub fn resolve_local_by_address(&mut self, on: bool) {
        self.local_by_address = on;
    }

    fn adopt_local(&self, desired: &mut DesiredState) {
        if !self.local_by_address {
            return;
        }
        let addresses: Vec<std::net::IpAddr> = self
            .observed
            .devices
            .values()
            .filter_map(|d| d.link.local)
            .collect();
        let configured = desired.local_node.clone();
        if let Some(name) = desired.adopt_local_by_address(&addresses) {
            tracing::info!(
                configured = %configured,
                local_node = %name,
                "this host's name is not a node in the datastore; using the node with this host's address"
            );
        }
    }

    /// What the datastore says about its freshness; `datastore-stale` is decided from it.
    pub fn set_datastore_health(&mut self, health: Option<DatastoreHealth>) {
        if health != self.datastore {
            self.datastore = health;
            self.dirty = true;
        }
    }

    /// The kubelet watch-stall check's latest findings (they join every evaluation).
    pub fn set_kubelet_findings(&mut self, findings: Vec<Finding>) {
        if findings != self.kubelet {
            self.kubelet = findings;
            self.dirty = true;
        }
    }

    /// Findings raised outside the checks (repair's `repair-contested`): part of every
    /// evaluation until replaced.
    pub fn set_extra_findings(&mut self, extra: Vec<Finding>) {
        if extra != self.extra {
            self.extra = extra;
            self.dirty = true;
        }
    }

    /// Evaluate again even though the model did not change (what annotates findings did).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Drops toward peers in the recent window (eBPF).
    pub fn set_drops(&mut self, drops: DropSummary) {
        if drops != self.drops {
            self.drops = drops;
            self.dirty = true;
        }
    }

    /// The ifindexes of the watched devices that exist now (for the eBPF device filter).
    pub fn watched_ifindexes(&self) -> BTreeSet<u32> {
        self.observed
            .devices
            .values()
            .map(|d| d.link.ifindex)
            .collect()
    }

    /// Run every check over the whole model; clears the dirty flag.
    pub fn evaluate(&mut self, now: SystemTime) -> Evaluation {
        let started = Instant::now();
        self.explained.expire(now);
        // What the checks compute again comes stamped as the tracker will see it: the
        // findings they keep are then shared with the open list, never copied for `since`.
        let tracker = &self.tracker;
        let stamp = |f: &mut Finding| f.since = Some(tracker.first_seen(f, now));
        let input = CheckInput {
            devices: &self.specs,
            observed: &self.observed,
            desired: self.desired.as_ref(),
            drops: Some(&self.drops),
            explained_recently: Some(&self.explained),
            datastore: self.datastore.as_ref(),
        };
        let mut report = self.evaluator.evaluate_stamped(&input, &stamp);
        for f in &report.findings {
            if let Some(peer) = f
                .peer_node
                .as_ref()
                .filter(|_| checks::explains_drops(f.check))
            {
                self.explained.note(peer, now);
            }
        }
        report.findings.extend(
            self.kubelet
                .iter()
                .chain(&self.extra)
                .cloned()
                .map(Arc::new),
        );
        let transitions = self
            .tracker
            .update(std::mem::take(&mut report.findings), now);
        let open = self.tracker.open_shared();
        let verdicts = self
            .desired
            .as_ref()
            .map(|d| PeerVerdicts::of(d, &open))
            .unwrap_or_default();
        self.dirty = false;
        Evaluation {
            report,
            open,
            verdicts,
            recomputed: self.evaluator.last,
            transitions,
            duration: started.elapsed(),
        }
    }
}

impl Engine {
    /// Peers whose drops a finding explained within [`DROPS_EXPLAINED_GRACE`] of the last
    /// evaluation: the daemon acknowledges their drops so far in its drop window.
    pub fn explained_drops(&self) -> &ExplainedDrops {
        &self.explained
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        checks::PeerDrops,
        model::{
            v4, CheckId, LinkInfo, MacAddr, NeighState, Neighbour, ObservedDevice, PeerNode, Route,
            RouteKind,
        },
    };

    const DEV: &str = "vxlan.calico";

    fn peer(name: &str, last: u8) -> PeerNode {
        PeerNode {
            name: name.into(),
            node_ip: v4(192, 168, 77, last),
            vtep_ip: v4(10, 1, last, 0),
            vtep_mac: MacAddr::derive_like_felix(name),
            vtep_mac_derived: true,
            blocks: vec![format!("10.1.{last}.0/26").parse().unwrap()],
            borrowed: vec![],
            ipv6: None,
        }
    }

    fn desired() -> DesiredState {
        let mut d = DesiredState {
            source: "test".into(),
            local_node: "node1".into(),
            ..Default::default()
        };
        for (n, i) in [("node1", 1), ("node2", 2)] {
            d.nodes.insert(n.into(), peer(n, i));
        }
        d
    }

    fn route(dst: &str, via: std::net::IpAddr) -> Route {
        Route {
            destination: dst.parse().unwrap(),
            gateway: Some(via),
            onlink: true,
            protocol: 3,
            table: 254,
            kind: RouteKind::Unicast,
            metric: None,
        }
    }

    /// node1's healthy view of node2.
    fn healthy() -> ObservedState {
        let p = peer("node2", 2);
        let mut o = ObservedState::default();
        o.devices.insert(
            DEV.into(),
            ObservedDevice {
                link: LinkInfo {
                    name: DEV.into(),
                    ifindex: 5,
                    kind: Some("vxlan".into()),
                    vni: Some(4096),
                    port: Some(4789),
                    learning: Some(false),
                    up: true,
                    mac: Some(MacAddr::derive_like_felix("node1")),
                    mtu: Some(1450),
                    addresses: vec!["10.1.1.0/32".parse().unwrap()],
                    ..Default::default()
                },
                routes: vec![route("10.1.2.0/26", p.vtep_ip)],
                neighbours: vec![Neighbour {
                    ip: p.vtep_ip,
                    mac: Some(p.vtep_mac),
                    state: NeighState(NeighState::PERMANENT),
                }],
                fdb: vec![crate::model::FdbEntry {
                    mac: p.vtep_mac,
                    destination: Some(p.node_ip),
                    permanent: true,
                }],
            },
        );
        o
    }

    #[test]
    fn kept_findings_are_shared_with_the_open_list_not_copied() {
        let mut e = Engine::new(&[DEV.to_string()]);
        e.set_desired(Some(desired()));
        let mut observed = healthy();
        observed.devices.get_mut(DEV).unwrap().routes = vec![route("10.1.2.0/26", v4(10, 1, 2, 9))];
        e.replace_observed(observed);
        let t1 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let first = e.evaluate(t1);
        assert_eq!(first.open.len(), 1, "{:#?}", first.open);
        // A change the finding's part does not depend on (a stray route, a finding of its
        // own): the part is kept, the open list is a new one.
        let event = ObservedEvent::RouteAdded {
            ifindex: 5,
            route: route("10.7.0.0/26", v4(10, 1, 2, 0)),
            replace: false,
        };
        assert_eq!(e.apply(&event), Applied::Changed);
        let second = e.evaluate(t1 + Duration::from_secs(5));
        assert_eq!(e.evaluator.last.peers, 0, "the peer's part was kept");
        assert_eq!(second.transitions.opened.len(), 1, "{:#?}", second.open);
        let kept = second
            .open
            .iter()
            .find(|f| f.check == first.open[0].check)
            .expect("still open");
        assert_eq!(kept.since, Some(t1));
        assert!(
            Arc::ptr_eq(&first.open[0], kept),
            "the evaluator's kept finding is the open one: stamped when computed, not copied \
             by the tracker for its `since`"
        );
    }

    #[test]
    fn events_mark_dirty_and_evaluation_tracks_findings() {
        let mut e = Engine::new(&[DEV.to_string()]);
        e.set_desired(Some(desired()));
        e.replace_observed(healthy());
        let ev = e.evaluate(SystemTime::UNIX_EPOCH);
        assert!(ev.open.is_empty(), "{:#?}", ev.open);
        assert!(!e.is_dirty());

        // Another device's connected route is kept (it decides which next hops are on-link
        // there) and finds nothing wrong.
        let mut connected = route("10.1.2.0/26", v4(10, 9, 9, 9));
        connected.gateway = None;
        let other = ObservedEvent::RouteAdded {
            ifindex: 99,
            route: connected,
            replace: false,
        };
        assert_eq!(e.apply(&other), Applied::Changed);
        assert!(e.evaluate(SystemTime::UNIX_EPOCH).open.is_empty());
        assert_eq!(e.apply(&other), Applied::Unchanged, "the same route again");
        assert!(!e.is_dirty());

        // The incident: the route is replaced with one via a non-VTEP gateway.
        let bad = ObservedEvent::RouteAdded {
            ifindex: 5,
            route: route("10.1.2.0/26", v4(10, 1, 2, 9)),
            replace: true,
        };
        assert_eq!(e.apply(&bad), Applied::Changed);
        assert!(e.is_dirty());
        let t1 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let ev = e.evaluate(t1);
        assert_eq!(ev.transitions.opened.len(), 1, "{:#?}", ev.open);
        // Only what the event concerns was checked again: node2, and the route's destination.
        assert_eq!(
            e.evaluator.last,
            checks::Recomputed {
                rebuilt: false,
                peers: 1,
                routes: 1
            }
        );
        let f = &ev.open[0];
        assert_eq!(f.peer_node.as_deref(), Some("node2"));
        assert_eq!(f.since, Some(t1));

        // Recent drops toward the peer are attached as evidence without a new finding.
        let mut drops = DropSummary::default();
        drops.per_peer.insert(
            "node2".into(),
            PeerDrops {
                device: DEV.into(),
                packets: 12,
                reasons: BTreeMap::from([("NEIGH_FAILED".to_string(), 12)]),
                unexplained: BTreeMap::from([("NEIGH_FAILED".to_string(), 12)]),
                ..Default::default()
            },
        );
        e.set_drops(drops);
        assert!(e.is_dirty());
        let ev = e.evaluate(t1 + Duration::from_secs(5));
        let opened: Vec<CheckId> = ev
            .transitions
            .opened
            .iter()
            .map(|&i| ev.open[i].check)
            .collect();
        assert_eq!(
            opened,
            [CheckId::TrafficBlackholed],
            "{:#?}",
            ev.transitions
        );
        let original = ev
            .open
            .iter()
            .find(|f| f.check != CheckId::TrafficBlackholed)
            .unwrap();
        assert_eq!(original.evidence.drops, Some(12));
        assert_eq!(original.since, Some(t1), "evidence does not reset since");

        // Restored.
        let good = ObservedEvent::RouteAdded {
            ifindex: 5,
            route: route("10.1.2.0/26", v4(10, 1, 2, 0)),
            replace: true,
        };
        e.apply(&good);
        let ev = e.evaluate(t1 + Duration::from_secs(9));
        assert!(ev.open.is_empty(), "{:#?}", ev.open);
        assert!(!ev.transitions.cleared.is_empty());
        assert_eq!(e.explained_drops().peers().collect::<Vec<_>>(), ["node2"]);

        // Packets queued behind the bad gateway are freed after the repair: still its drops.
        let late = |n: u64| {
            let mut drops = DropSummary::default();
            let reasons = BTreeMap::from([("NEIGH_FAILED".to_string(), n)]);
            drops.per_peer.insert(
                "node2".into(),
                PeerDrops {
                    device: DEV.into(),
                    packets: n,
                    reasons: reasons.clone(),
                    unexplained: reasons,
                    ..Default::default()
                },
            );
            drops
        };
        e.set_drops(late(3));
        let ev = e.evaluate(t1 + Duration::from_secs(12));
        assert!(ev.open.is_empty(), "{:#?}", ev.open);
        // Long after the repair, new drops with nothing to explain them are a finding.
        e.set_drops(late(4));
        let ev = e.evaluate(t1 + Duration::from_secs(30));
        let checks: Vec<CheckId> = ev.open.iter().map(|f| f.check).collect();
        assert_eq!(checks, [CheckId::DropsUnexplained]);
        assert_eq!(e.explained_drops().len(), 0);
    }

    #[test]
    fn device_removed_then_recreated() {
        let mut e = Engine::new(&[DEV.to_string()]);
        e.set_desired(Some(desired()));
        e.replace_observed(healthy());
        e.evaluate(SystemTime::UNIX_EPOCH);
        assert_eq!(e.watched_ifindexes(), BTreeSet::from([5]));
        e.apply(&ObservedEvent::LinkRemoved {
            ifindex: 5,
            name: DEV.into(),
        });
        let ev = e.evaluate(SystemTime::UNIX_EPOCH);
        assert!(
            ev.open.iter().any(|f| f.check == CheckId::DeviceMissing),
            "{:#?}",
            ev.open
        );
        assert!(e.watched_ifindexes().is_empty());
        let mut link = healthy().devices[DEV].link.clone();
        link.ifindex = 9;
        link.addresses.clear();
        assert_eq!(
            e.apply(&ObservedEvent::LinkChanged { link }),
            Applied::ResyncNeeded
        );
        assert_eq!(e.watched_ifindexes(), BTreeSet::from([9]));
    }
}
