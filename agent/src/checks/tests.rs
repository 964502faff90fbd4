//! Table-driven tests: a consistent cluster (desired + what Felix/flannel would program) must give
//! zero findings; each way Felix breaks it must give exactly the expected finding.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::*;
use crate::model::{
    DatastoreProblem, FdbEntry, LinkInfo, NeighState, Neighbour, ObservedDevice, PeerNode, Route,
    RouteKind,
};

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}
pub(crate) fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A node's desired and observed state, consistent unless a test breaks it; shared with the
/// repair tests (`act`).
pub(crate) struct Cluster {
    pub(crate) device: &'static str,
    pub(crate) desired: DesiredState,
    pub(crate) observed: ObservedState,
}

pub(crate) fn node(name: &str, node_ip: &str, vtep: &str, blocks: &[&str]) -> PeerNode {
    PeerNode {
        name: name.into(),
        node_ip: ip(node_ip),
        vtep_ip: ip(vtep),
        vtep_mac: MacAddr::derive_like_felix(name),
        vtep_mac_derived: true,
        blocks: blocks.iter().map(|b| net(b)).collect(),
        borrowed: vec![],
        ipv6: None,
    }
}

impl Cluster {
    /// k8s01 (local), k8s02 (VTEP = its block's network address, as Calico does) and k8s03
    /// with the incident's six blocks and VTEP 10.1.235.133.
    pub(crate) fn calico() -> Cluster {
        let nodes = vec![
            node("k8s01", "192.168.77.1", "10.1.10.0", &["10.1.10.0/26"]),
            node(
                "k8s02",
                "192.168.77.2",
                "10.1.20.0",
                &["10.1.20.0/26", "10.1.20.64/26"],
            ),
            node(
                "k8s03",
                "192.168.77.3",
                "10.1.235.133",
                &[
                    "10.1.235.128/26",
                    "10.1.235.192/26",
                    "10.1.236.0/26",
                    "10.1.236.64/26",
                    "10.1.237.128/26",
                    "10.1.238.0/26",
                ],
            ),
        ];
        Cluster::programmed("vxlan.calico", 4096, 4789, nodes)
    }

    pub(crate) fn flannel() -> Cluster {
        let nodes = vec![
            node("n1", "172.16.0.1", "10.244.0.0", &["10.244.0.0/24"]),
            node("n2", "172.16.0.2", "10.244.1.0", &["10.244.1.0/24"]),
            node("n3", "172.16.0.3", "10.244.2.0", &["10.244.2.0/24"]),
        ];
        Cluster::programmed("flannel.1", 1, 8472, nodes)
    }

    /// The dataplane exactly as the CNI programs it for `nodes[0]`.
    pub(crate) fn programmed(
        device: &'static str,
        vni: u32,
        port: u16,
        nodes: Vec<PeerNode>,
    ) -> Cluster {
        let local = nodes[0].clone();
        let mut dev = ObservedDevice {
            link: LinkInfo {
                name: device.into(),
                ifindex: 7,
                kind: Some("vxlan".into()),
                vni: Some(vni),
                port: Some(port),
                learning: Some(false),
                local: Some(local.node_ip),
                up: true,
                mac: Some(local.vtep_mac),
                mtu: Some(1450),
                addresses: vec![IpNet::new(local.vtep_ip, 32).unwrap()],
                external: false,
            },
            ..Default::default()
        };
        for peer in &nodes[1..] {
            for dst in peer.blocks.iter().chain(&peer.borrowed) {
                dev.routes.push(route(dst, Some(peer.vtep_ip)));
            }
            dev.neighbours.push(Neighbour {
                ip: peer.vtep_ip,
                mac: Some(peer.vtep_mac),
                state: NeighState(NeighState::PERMANENT),
            });
            dev.fdb.push(FdbEntry {
                mac: peer.vtep_mac,
                destination: Some(peer.node_ip),
                permanent: true,
            });
        }
        let desired = DesiredState {
            source: "test".into(),
            local_node: local.name.clone(),
            nodes: nodes.into_iter().map(|n| (n.name.clone(), n)).collect(),
            problems: vec![],
            unverifiable: vec![],
            non_vxlan: Default::default(),
            ..Default::default()
        };
        let mut observed = ObservedState::default();
        observed.devices.insert(device.into(), dev);
        Cluster {
            device,
            desired,
            observed,
        }
    }

    pub(crate) fn dev(&mut self) -> &mut ObservedDevice {
        self.observed.devices.get_mut(self.device).unwrap()
    }

    pub(crate) fn peer(&self, name: &str) -> PeerNode {
        self.desired.nodes[name].clone()
    }

    pub(crate) fn set_gateway(&mut self, peer: &str, gateway: &str) {
        let blocks = self.peer(peer).blocks;
        for r in &mut self.dev().routes {
            if blocks.contains(&r.destination) {
                r.gateway = Some(ip(gateway));
            }
        }
    }

    pub(crate) fn report(&self) -> CheckReport {
        self.report_with(Some(&self.desired), None)
    }

    fn report_with(
        &self,
        desired: Option<&DesiredState>,
        drops: Option<&DropSummary>,
    ) -> CheckReport {
        self.report_for(DeviceSpec::for_name(self.device), desired, drops)
    }

    /// With device expectations other than the conventional ones (`vxlan_*` overrides).
    pub(crate) fn report_for(
        &self,
        spec: DeviceSpec,
        desired: Option<&DesiredState>,
        drops: Option<&DropSummary>,
    ) -> CheckReport {
        let specs = [spec];
        evaluate(&CheckInput {
            devices: &specs,
            observed: &self.observed,
            desired,
            drops,
            explained_recently: None,
            datastore: None,
        })
    }
}

pub(crate) fn route(dst: &IpNet, gateway: Option<IpAddr>) -> Route {
    Route {
        destination: *dst,
        gateway,
        onlink: true,
        protocol: 3,
        table: MAIN_TABLE,
        kind: RouteKind::Unicast,
        metric: None,
    }
}

/// (check, peer) pairs, sorted: what a test asserts exactly.
pub(crate) fn summary(r: &CheckReport) -> Vec<(CheckId, Option<String>)> {
    let mut v: Vec<_> = r
        .findings
        .iter()
        .map(|f| (f.check, f.peer_node.clone()))
        .collect();
    v.sort();
    v
}

pub(crate) fn only(r: &CheckReport, check: CheckId, peer: Option<&str>) -> Finding {
    assert_eq!(
        summary(r),
        vec![(check, peer.map(String::from))],
        "findings: {:#?}",
        r.findings
    );
    Finding::clone(&r.findings[0])
}

#[test]
fn healthy_calico_with_network_address_vteps_has_no_findings() {
    let c = Cluster::calico();
    let r = c.report();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert_eq!(r.routes_checked, 8);
    assert!(r.peers.iter().all(|p| p.verdict == Verdict::Ok));
    assert_eq!(r.peers.len(), 2);
}

#[test]
fn healthy_flannel_has_no_findings_online_or_offline() {
    let c = Cluster::flannel();
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    let offline = c.report_with(None, None);
    assert!(offline.findings.is_empty(), "{:#?}", offline.findings);
    assert!(
        !offline.skipped.is_empty(),
        "offline mode must say what it skipped"
    );
}

#[test]
fn healthy_calico_offline_has_no_findings() {
    let c = Cluster::calico();
    let r = c.report_with(None, None);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    assert!(r
        .skipped
        .iter()
        .any(|s| s.check == CheckId::GatewayWrongVtep));
}

#[test]
fn borrowed_addresses_routed_as_host_routes_are_healthy() {
    let mut c = Cluster::calico();
    // k8s02 borrowed 10.1.236.7 from k8s03's block: Calico routes the /32 to k8s02.
    let borrowed = net("10.1.236.7/32");
    c.desired
        .nodes
        .get_mut("k8s02")
        .unwrap()
        .borrowed
        .push(borrowed);
    c.dev().routes.push(route(&borrowed, Some(ip("10.1.20.0"))));
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);

    // Now point the borrowed /32 at k8s03 instead: the borrowed IP's owner is k8s02.
    c.dev().routes.last_mut().unwrap().gateway = Some(ip("10.1.235.133"));
    let f = only(&c.report(), CheckId::GatewayWrongVtep, Some("k8s02"));
    assert_eq!(f.expected_gateway, Some(ip("10.1.20.0")));
    assert_eq!(
        f.evidence
            .details
            .get("gateway_is_vtep_of")
            .map(String::as_str),
        Some("k8s03")
    );
}

#[test]
fn incident_replay_is_one_critical_finding_with_all_six_routes() {
    let mut c = Cluster::calico();
    c.set_gateway("k8s03", "10.1.235.128");
    // The kernel tried to resolve the bogus gateway.
    c.dev().neighbours.push(Neighbour {
        ip: ip("10.1.235.128"),
        mac: None,
        state: NeighState(NeighState::INCOMPLETE),
    });
    let r = c.report();
    let f = only(&r, CheckId::GatewayWrongVtep, Some("k8s03"));
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.route.as_deref(), Some("10.1.235.128/26"));
    assert_eq!(f.gateway, Some(ip("10.1.235.128")));
    assert_eq!(f.expected_gateway, Some(ip("10.1.235.133")));
    assert_eq!(f.evidence.routes.len(), 6);
    assert_eq!(f.evidence.neighbour_state.as_deref(), Some("incomplete"));
    assert_eq!(
        f.evidence.details["gateway_is_network_address"], "true",
        "the base-address pattern is recorded as evidence"
    );
    assert!(f.message.contains("nobody's VTEP"), "{}", f.message);
    assert!(
        f.hint
            .as_deref()
            .unwrap()
            .contains("via 10.1.235.133 dev vxlan.calico onlink"),
        "{:?}",
        f.hint
    );
    assert_eq!(r.worst(), Some(Severity::Critical));
    let k8s03 = r.peers.iter().find(|p| p.node == "k8s03").unwrap();
    assert_eq!(k8s03.verdict, Verdict::Critical);
    assert_eq!(
        r.peers.iter().find(|p| p.node == "k8s02").unwrap().verdict,
        Verdict::Ok
    );
}

#[test]
fn incident_offline_is_corroborated_network_address_gateway() {
    let mut c = Cluster::calico();
    c.set_gateway("k8s03", "10.1.235.128");
    c.dev().neighbours.push(Neighbour {
        ip: ip("10.1.235.128"),
        mac: None,
        state: NeighState(NeighState::FAILED),
    });
    let r = c.report_with(None, None);
    let f = only(&r, CheckId::GatewayIsNetworkAddress, None);
    assert_eq!(f.gateway, Some(ip("10.1.235.128")));
    assert_eq!(f.evidence.routes.len(), 6);
    assert_eq!(f.evidence.neighbour_state.as_deref(), Some("failed"));
}

#[test]
fn offline_gateway_resolving_to_mac_without_fdb_is_fdb_missing() {
    let mut c = Cluster::calico();
    let mac = c.peer("k8s02").vtep_mac;
    c.dev().fdb.retain(|e| e.mac != mac);
    let r = c.report_with(None, None);
    let f = only(&r, CheckId::FdbMissing, None);
    assert_eq!(f.gateway, Some(ip("10.1.20.0")));
}

#[test]
fn offline_unresolved_gateway_that_is_not_a_network_address() {
    let mut c = Cluster::calico();
    c.dev().neighbours.retain(|n| n.ip != ip("10.1.235.133"));
    let f = only(
        &c.report_with(None, None),
        CheckId::NeighbourUnresolved,
        None,
    );
    assert_eq!(f.evidence.neighbour_state.as_deref(), Some("missing"));
}

#[test]
fn route_via_another_nodes_vtep() {
    let mut c = Cluster::calico();
    c.set_gateway("k8s03", "10.1.20.0");
    let f = only(&c.report(), CheckId::GatewayWrongVtep, Some("k8s03"));
    assert_eq!(f.evidence.details["gateway_is_vtep_of"], "k8s02");
    assert_eq!(f.evidence.neighbour_state.as_deref(), Some("permanent"));
}

#[test]
fn previous_vtep_with_self_consistent_stale_entries() {
    // The datastore says k8s03 moved its VTEP to .140; the kernel still routes to .133 and has
    // a perfectly resolvable neighbour + FDB for it. Only the datastore comparison sees it.
    let mut c = Cluster::calico();
    c.desired.nodes.get_mut("k8s03").unwrap().vtep_ip = ip("10.1.235.140");
    let r = c.report();
    assert_eq!(
        summary(&r),
        vec![
            (CheckId::GatewayWrongVtep, Some("k8s03".into())),
            (CheckId::NeighbourUnresolved, Some("k8s03".into())),
        ],
        "{:#?}",
        r.findings
    );
    let f = r
        .findings
        .iter()
        .find(|f| f.check == CheckId::GatewayWrongVtep)
        .unwrap();
    assert_eq!(f.gateway, Some(ip("10.1.235.133")));
    assert_eq!(f.expected_gateway, Some(ip("10.1.235.140")));
}

#[test]
fn neighbour_removed() {
    let mut c = Cluster::calico();
    c.dev().neighbours.retain(|n| n.ip != ip("10.1.20.0"));
    let f = only(&c.report(), CheckId::NeighbourUnresolved, Some("k8s02"));
    assert_eq!(f.evidence.neighbour_state.as_deref(), Some("missing"));
    assert!(f
        .hint
        .unwrap()
        .starts_with("ip neigh replace 10.1.20.0 lladdr"));
}

#[test]
fn neighbour_failed_is_unresolved() {
    let mut c = Cluster::calico();
    for n in &mut c.dev().neighbours {
        if n.ip == ip("10.1.20.0") {
            n.state = NeighState(NeighState::FAILED);
            n.mac = None;
        }
    }
    only(&c.report(), CheckId::NeighbourUnresolved, Some("k8s02"));
}

#[test]
fn neighbour_with_wrong_mac() {
    let mut c = Cluster::calico();
    for n in &mut c.dev().neighbours {
        if n.ip == ip("10.1.20.0") {
            n.mac = Some("66:00:00:00:00:01".parse().unwrap());
        }
    }
    let f = only(&c.report(), CheckId::NeighbourMacMismatch, Some("k8s02"));
    assert_eq!(f.evidence.expected_mac, Some(c.peer("k8s02").vtep_mac));
}

#[test]
fn derived_mac_that_differs_is_a_finding_even_when_the_fdb_agrees() {
    // The derivation is Felix's own rule: neighbour and FDB both on another MAC are both
    // stale (a node re-created with a new name, a MAC left from another CNI).
    let mut c = Cluster::calico();
    let other: MacAddr = "66:12:34:56:78:9a".parse().unwrap();
    let mac = c.peer("k8s02").vtep_mac;
    for n in &mut c.dev().neighbours {
        if n.mac == Some(mac) {
            n.mac = Some(other);
        }
    }
    for e in &mut c.dev().fdb {
        if e.mac == mac {
            e.mac = other;
        }
    }
    let f = only(&c.report(), CheckId::NeighbourMacMismatch, Some("k8s02"));
    assert_eq!(
        f.remedies.len(),
        2,
        "FDB and neighbour both rewritten: {:?}",
        f.remedies
    );
    c.desired.nodes.get_mut("k8s02").unwrap().vtep_mac_derived = false;
    only(&c.report(), CheckId::NeighbourMacMismatch, Some("k8s02"));
}

#[test]
fn fdb_removed() {
    let mut c = Cluster::calico();
    let mac = c.peer("k8s03").vtep_mac;
    c.dev().fdb.retain(|e| e.mac != mac);
    let f = only(&c.report(), CheckId::FdbMissing, Some("k8s03"));
    assert_eq!(
        f.evidence.expected_fdb_destination,
        Some(ip("192.168.77.3"))
    );
    assert!(f.hint.unwrap().starts_with("bridge fdb replace"));
}

#[test]
fn fdb_wrong_destination() {
    let mut c = Cluster::calico();
    let mac = c.peer("k8s03").vtep_mac;
    for e in &mut c.dev().fdb {
        if e.mac == mac {
            e.destination = Some(ip("192.168.77.99"));
        }
    }
    let f = only(&c.report(), CheckId::FdbWrongDestination, Some("k8s03"));
    assert_eq!(f.evidence.fdb_destination, Some(ip("192.168.77.99")));
}

#[test]
fn routes_removed_are_one_finding_per_peer() {
    let mut c = Cluster::calico();
    let blocks = c.peer("k8s03").blocks;
    c.dev().routes.retain(|r| !blocks.contains(&r.destination));
    let f = only(&c.report(), CheckId::RouteMissing, Some("k8s03"));
    assert_eq!(f.evidence.routes.len(), 6);
    assert!(f.hint.unwrap().starts_with("for r in 10.1.235.128/26 "));
}

#[test]
fn stray_route_to_unknown_block_is_a_warning() {
    let mut c = Cluster::calico();
    c.dev()
        .routes
        .push(route(&net("10.1.99.0/26"), Some(ip("10.1.99.0"))));
    let f = only(&c.report(), CheckId::RouteStale, None);
    assert_eq!(f.severity, Severity::Warning);
    assert_eq!(f.route.as_deref(), Some("10.1.99.0/26"));
}

#[test]
fn more_specific_route_shadowing_a_peer_block_is_critical() {
    let mut c = Cluster::calico();
    c.dev()
        .routes
        .push(route(&net("10.1.236.0/27"), Some(ip("10.1.20.0"))));
    let f = only(&c.report(), CheckId::RouteStale, Some("k8s03"));
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.expected_gateway, Some(ip("10.1.235.133")));
}

#[test]
fn route_to_local_block_over_the_overlay_is_critical() {
    let mut c = Cluster::calico();
    c.dev()
        .routes
        .push(route(&net("10.1.10.0/26"), Some(ip("10.1.20.0"))));
    let f = only(&c.report(), CheckId::RouteStale, None);
    assert_eq!(f.severity, Severity::Critical);
}

#[test]
fn other_tables_and_higher_metric_duplicates_are_ignored() {
    let mut c = Cluster::calico();
    let mut other_table = route(&net("10.1.235.128/26"), Some(ip("10.9.9.9")));
    other_table.table = 100;
    let mut worse = route(&net("10.1.235.128/26"), Some(ip("10.9.9.9")));
    worse.metric = Some(1000);
    c.dev().routes.push(other_table);
    c.dev().routes.push(worse);
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
}

#[test]
fn missing_device_is_critical_when_there_are_peers() {
    let mut c = Cluster::calico();
    c.observed.devices.clear();
    let f = only(&c.report(), CheckId::DeviceMissing, None);
    assert_eq!(f.severity, Severity::Critical);
}

#[test]
fn device_misconfigurations_are_one_finding() {
    let mut c = Cluster::calico();
    c.dev().link.vni = Some(1);
    c.dev().link.learning = Some(true);
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.evidence.details["vni"], "1");
    assert_eq!(f.evidence.details["expected_vni"], "4096");
    assert_eq!(f.evidence.details["learning"], "on");

    let mut c = Cluster::calico();
    c.dev().link.up = false;
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.hint.as_deref(), Some("ip link set vxlan.calico up"));

    let mut c = Cluster::calico();
    c.dev().link.addresses.clear();
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.severity, Severity::Warning);
}

#[test]
fn datastore_problems_are_reported_and_local_node_must_exist() {
    let mut c = Cluster::calico();
    c.desired.problems.push(DatastoreProblem {
        object: "nodes.yaml".into(),
        node: Some("k8s04".into()),
        field: "vtep_ip".into(),
        message: "invalid IP address \"10.1.x\"".into(),
    });
    let f = only(&c.report(), CheckId::DatastoreInvalid, Some("k8s04"));
    assert!(f.message.contains("vtep_ip"));

    let mut c = Cluster::calico();
    c.desired.local_node = "not-a-node".into();
    let r = c.report();
    assert!(r
        .findings
        .iter()
        .any(|f| f.check == CheckId::DatastoreInvalid && f.message.contains("not-a-node")));
}

#[test]
fn drops_escalate_explained_findings_and_flag_unexplained_ones() {
    let mut c = Cluster::calico();
    c.set_gateway("k8s03", "10.1.235.128");
    let mut drops = DropSummary::default();
    for (peer, n) in [("k8s03", 1913), ("k8s02", 7)] {
        drops.per_peer.insert(
            peer.into(),
            PeerDrops {
                device: "vxlan.calico".into(),
                packets: n,
                reasons: BTreeMap::from([("NEIGH_QUEUEFULL".to_string(), n)]),
                unexplained: BTreeMap::from([("NEIGH_QUEUEFULL".to_string(), n)]),
                ..Default::default()
            },
        );
    }
    let r = c.report_with(Some(&c.desired), Some(&drops));
    assert_eq!(
        summary(&r),
        vec![
            (CheckId::GatewayWrongVtep, Some("k8s03".into())),
            (CheckId::TrafficBlackholed, Some("k8s03".into())),
            (CheckId::DropsUnexplained, Some("k8s02".into())),
        ]
    );
    let wrong = r
        .findings
        .iter()
        .find(|f| f.check == CheckId::GatewayWrongVtep)
        .unwrap();
    assert_eq!(wrong.evidence.drops, Some(1913));
    let unexplained = r
        .findings
        .iter()
        .find(|f| f.check == CheckId::DropsUnexplained)
        .unwrap();
    assert_eq!(unexplained.severity, Severity::Warning);
    // Critical findings sort first.
    assert_eq!(r.findings[0].severity, Severity::Critical);
}

#[test]
fn zero_drops_change_nothing() {
    let c = Cluster::calico();
    let mut drops = DropSummary::default();
    drops.per_peer.insert("k8s02".into(), PeerDrops::default());
    assert!(c
        .report_with(Some(&c.desired), Some(&drops))
        .findings
        .is_empty());
}

#[test]
fn device_spec_defaults_by_name() {
    assert_eq!(DeviceSpec::for_name("vxlan.calico").vni, Some(4096));
    assert_eq!(DeviceSpec::for_name("flannel.1").port, Some(8472));
    assert_eq!(DeviceSpec::for_name("flannel.1").vni, Some(1));
    assert_eq!(DeviceSpec::for_name("vxlan-v6.calico").family, Family::V6);
    assert_eq!(DeviceSpec::for_name("custom0").vni, None);
}

#[test]
fn routes_to_blocks_of_invalid_entries_are_not_judged() {
    // k8s03's entry failed validation: its routes are neither expected nor stray.
    let mut c = Cluster::calico();
    let k8s03 = c.desired.nodes.remove("k8s03").unwrap();
    c.desired.unverifiable = k8s03.blocks.clone();
    c.desired.problems.push(DatastoreProblem {
        object: "nodes.yaml".into(),
        node: Some("k8s03".into()),
        field: "vtep_ip".into(),
        message: "bad".into(),
    });
    let r = c.report();
    assert_eq!(
        summary(&r),
        vec![(CheckId::DatastoreInvalid, Some("k8s03".into()))],
        "{:#?}",
        r.findings
    );
}

#[test]
fn cross_subnet_peer_routed_via_the_underlay_is_healthy() {
    // Calico CrossSubnet: k8s02 shares our subnet, so its blocks go via its node IP on eth0.
    let mut c = Cluster::calico();
    let k8s02 = c.peer("k8s02");
    c.dev()
        .routes
        .retain(|r| !k8s02.blocks.contains(&r.destination));
    // eth0 (ifindex 2) is on 192.168.77.0/24, as its connected route says.
    c.observed.direct_routes.insert(
        net("192.168.77.0/24"),
        crate::model::DirectRoute {
            ifindex: 2,
            gateway: None,
        },
    );
    for b in &k8s02.blocks {
        c.observed.direct_routes.insert(
            *b,
            crate::model::DirectRoute {
                ifindex: 2,
                gateway: Some(k8s02.node_ip),
            },
        );
    }
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);

    // flannel DirectRouting: no ARP and no FDB for a peer reached directly.
    let vtep = k8s02.vtep_ip;
    c.dev().neighbours.retain(|n| n.ip != vtep);
    c.dev().fdb.retain(|e| e.mac != k8s02.vtep_mac);
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);

    // The same "direct" routes on a device where the node address is not on-link (tunl0
    // left from an IPIP pool): not direct at all.
    for b in &k8s02.blocks {
        c.observed.direct_routes.get_mut(b).unwrap().ifindex = 9;
    }
    let f = only(&c.report(), CheckId::RouteWrongDevice, Some("k8s02"));
    assert_eq!(f.expected_gateway, Some(k8s02.vtep_ip));
    assert_eq!(f.remedies.len(), k8s02.blocks.len());
    for b in &k8s02.blocks {
        c.observed.direct_routes.get_mut(b).unwrap().ifindex = 2;
    }

    // Via the underlay to some other address is not that peer: missing over the overlay (and
    // now its VTEP entries are needed again).
    for r in c
        .observed
        .direct_routes
        .values_mut()
        .filter(|r| r.gateway.is_some())
    {
        r.gateway = Some(ip("192.168.77.99"));
    }
    let r = c.report();
    assert!(
        summary(&r).contains(&(CheckId::RouteMissing, Some("k8s02".into()))),
        "{:#?}",
        r.findings
    );
}

#[test]
fn calico_vtep_host_routes_and_a_borrowed_vtep_are_healthy() {
    // Calico 3.30-3.31: `V dev vxlan.calico scope link` for every remote VTEP, here k8s03's
    // 10.1.235.133 inside its own block; and k8s02's VTEP borrowed from k8s03's block.
    let mut c = Cluster::calico();
    let k3 = c.peer("k8s03");
    c.dev().routes.push(route(&net("10.1.235.133/32"), None));
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);

    let borrowed = ip("10.1.236.70");
    let old = c.peer("k8s02").vtep_ip;
    {
        let k2 = c.desired.nodes.get_mut("k8s02").unwrap();
        k2.vtep_ip = borrowed;
        k2.borrowed.push(IpNet::new(borrowed, 32).unwrap());
    }
    let k2 = c.peer("k8s02");
    for r in &mut c.dev().routes {
        if r.gateway == Some(old) {
            r.gateway = Some(borrowed);
        }
    }
    for n in &mut c.dev().neighbours {
        if n.ip == old {
            n.ip = borrowed;
        }
    }
    c.dev()
        .routes
        .push(route(&IpNet::new(borrowed, 32).unwrap(), None));
    assert!(
        c.report().findings.is_empty(),
        "borrowed VTEP of {} inside {}'s block: {:#?}",
        k2.name,
        k3.name,
        c.report().findings
    );
}

#[test]
fn kernel_routes_are_the_kernels_unless_they_take_a_block() {
    let mut c = Cluster::calico();
    let kernel = |dst: &str| Route {
        protocol: 2,
        ..route(&net(dst), None)
    };
    c.dev().routes.push(kernel("10.1.10.0/32"));
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // An address like 10.1.236.1/27 on the device makes the kernel route part of a peer's
    // block here: that traffic no longer reaches k8s03.
    c.dev().routes.push(kernel("10.1.236.0/27"));
    let r = c.report();
    assert!(
        summary(&r).contains(&(CheckId::RouteStale, Some("k8s03".into()))),
        "{:#?}",
        r.findings
    );
}

#[test]
fn a_blackhole_inside_a_peers_block_is_critical() {
    let mut c = Cluster::calico();
    // The local block's own blackhole is Calico's and healthy.
    c.dev().routes.push(Route {
        kind: RouteKind::Blackhole,
        gateway: None,
        protocol: 80,
        ..route(&net("10.1.10.0/26"), None)
    });
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    c.dev().routes.push(Route {
        kind: RouteKind::Unreachable,
        gateway: None,
        ..route(&net("10.1.236.8/29"), None)
    });
    let f = only(&c.report(), CheckId::RouteStale, Some("k8s03"));
    assert_eq!(f.severity, Severity::Critical);
    assert!(f
        .hint
        .unwrap()
        .starts_with("ip route del unreachable 10.1.236.8/29"));
}

#[test]
fn device_mac_local_and_configured_mtu_are_checked() {
    let mut c = Cluster::calico();
    c.dev().link.mac = Some("66:00:00:00:00:01".parse().unwrap());
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.evidence.details["mac"], "66:00:00:00:00:01");

    let mut c = Cluster::calico();
    c.dev().link.local = Some(ip("192.168.77.200"));
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.evidence.details["expected_local"], "192.168.77.1");

    // The MTU only when the cluster says what it should be.
    let mut c = Cluster::calico();
    c.dev().link.mtu = Some(1400);
    assert!(c.report().findings.is_empty());
    let spec = DeviceSpec::for_name("vxlan.calico").with_overrides(None, None, Some(1450));
    let r = c.report_for(spec, Some(&c.desired), None);
    assert_eq!(summary(&r), vec![(CheckId::DeviceMisconfigured, None)]);
}

#[test]
fn a_flannel_migrated_vni_and_port_are_healthy_once_configured() {
    let mut c = Cluster::calico();
    c.dev().link.vni = Some(1);
    c.dev().link.port = Some(8472);
    only(&c.report(), CheckId::DeviceMisconfigured, None);
    let spec = DeviceSpec::for_name("vxlan.calico").with_overrides(Some(1), Some(8472), None);
    let r = c.report_for(spec, Some(&c.desired), None);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}

/// With the Kubernetes datastore the cluster's FelixConfiguration says what Felix programs;
/// it wins over the config keys (and the profile's defaults) for Calico's devices.
#[test]
fn the_cluster_felix_configuration_sets_the_device_expectations() {
    let mut c = Cluster::calico();
    c.dev().link.vni = Some(1);
    c.dev().link.port = Some(8472);
    c.dev().link.mtu = Some(1400);
    only(&c.report(), CheckId::DeviceMisconfigured, None);
    c.desired.cluster.felix.vxlan_vni = Some(1);
    c.desired.cluster.felix.vxlan_port = Some(8472);
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // A config key that disagrees with the cluster does not win.
    let spec = DeviceSpec::for_name("vxlan.calico").with_overrides(Some(4096), Some(4789), None);
    let r = c.report_for(spec, Some(&c.desired), None);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    // An MTU Felix was told to program, and the device has another.
    c.desired.cluster.felix.vxlan_mtu = Some(1450);
    let f = only(&c.report(), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.evidence.details["expected_mtu"], "1450");
}

/// Blocks of IPIP/no-encap pools and of deleted pools (off the overlay) are neither expected
/// nor stray; the rest of the peer's blocks still are.
#[test]
fn off_overlay_blocks_are_not_judged_on_the_overlay() {
    let mut c = Cluster::calico();
    let ipip = net("10.9.20.0/26");
    let k8s03 = c.peer("k8s03");
    c.dev().routes.push(route(&ipip, Some(k8s03.vtep_ip)));
    only(&c.report(), CheckId::RouteStale, None);
    c.desired.off_overlay.push(ipip);
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // Not a blanket pass: a wrong gateway on a VXLAN block of the same peer is still found.
    c.set_gateway("k8s03", "10.1.235.128");
    assert!(summary(&c.report()).contains(&(CheckId::GatewayWrongVtep, Some("k8s03".into()))));
}

#[test]
fn calico_ebpf_dataplane_device_has_no_vni_and_no_fdb() {
    let mut c = Cluster::calico();
    c.dev().link.external = true;
    c.dev().link.vni = Some(0);
    c.dev().fdb.clear();
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // Its ARP entries still matter.
    let vtep = c.peer("k8s03").vtep_ip;
    c.dev().neighbours.retain(|n| n.ip != vtep);
    only(&c.report(), CheckId::NeighbourUnresolved, Some("k8s03"));
}

#[test]
fn a_host_name_that_is_not_the_node_name_finds_the_node_by_its_address() {
    // Clouds: the host is "ip-192-168-77-1", the node "k8s01". Judged as a peer, k8s01's own
    // blocks and VTEP would be critical findings.
    let mut c = Cluster::calico();
    c.desired.local_node = "ip-192-168-77-1".into();
    assert!(summary(&c.report())
        .iter()
        .any(|(check, _)| *check == CheckId::DatastoreInvalid));
    let local = c.dev().link.local.unwrap();
    assert_eq!(c.desired.adopt_local_by_address(&[local]), Some("k8s01"));
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // A name that is in the datastore is never replaced.
    assert_eq!(
        c.desired.adopt_local_by_address(&[ip("192.168.77.2")]),
        None
    );
}

#[test]
fn a_node_without_a_vtep_has_no_vxlan_expectations_but_its_blocks_stay_off_the_overlay() {
    use crate::model::NonVxlanNode;
    let mut c = Cluster::calico();
    c.desired.non_vxlan.insert(
        "ipip1".into(),
        NonVxlanNode {
            name: "ipip1".into(),
            node_ip: ip("192.168.77.9"),
            blocks: vec![net("10.1.90.0/26")],
            borrowed: vec![],
            node_ipv6: None,
        },
    );
    assert!(c.report().findings.is_empty(), "{:#?}", c.report().findings);
    // Its block routed over vxlan.calico cannot be delivered.
    c.dev()
        .routes
        .push(route(&net("10.1.90.0/26"), Some(ip("10.1.235.133"))));
    let f = only(&c.report(), CheckId::RouteStale, Some("ipip1"));
    assert_eq!(f.severity, Severity::Critical);

    // This node itself without a VTEP: no overlay device is expected.
    let mut c = Cluster::calico();
    let me = c.desired.nodes.remove("k8s01").unwrap();
    c.desired.non_vxlan.insert(
        "k8s01".into(),
        NonVxlanNode {
            name: me.name,
            node_ip: me.node_ip,
            blocks: me.blocks,
            borrowed: vec![],
            node_ipv6: None,
        },
    );
    c.observed.devices.clear();
    let r = c.report();
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
}
