//! Dual stack: `vxlan-v6.calico` judged against the IPv6 side of every node, as thoroughly as
//! `vxlan.calico` against the IPv4 side, and a fault on one family never shows on the other.

use ipnet::IpNet;

use super::tests::{ip, net, only, route, summary, Cluster};
use super::*;
use crate::model::{Ipv6Side, ObservedDevice, PeerNode, Route, RouteKind};

pub(crate) const V6: &str = "vxlan-v6.calico";
pub(crate) const V4: &str = "vxlan.calico";

/// Calico's three nodes, each with an IPv6 side: node address `fd00:77::N`, VTEP the network
/// address of its first IPv6 block (as Calico allocates it), MAC derived from `name + "-v6"`.
/// Both devices programmed as Felix does, the kernel's own routes on the v6 one included.
pub(crate) fn dual_stack() -> Cluster {
    let mut c = Cluster::calico();
    let v6 = [
        ("k8s01", "fd00:77::1", &["fd10:1:10::/122"][..]),
        (
            "k8s02",
            "fd00:77::2",
            &["fd10:1:20::/122", "fd10:1:20::40/122"][..],
        ),
        (
            "k8s03",
            "fd00:77::3",
            &["fd10:1:235::80/122", "fd10:1:236::/122"][..],
        ),
    ];
    for (name, node_ip, blocks) in v6 {
        let n = c.desired.nodes.get_mut(name).unwrap();
        n.blocks.extend(blocks.iter().map(|b| net(b)));
        n.ipv6 = Some(Ipv6Side {
            node_ip: ip(node_ip),
            vtep_ip: net(blocks[0]).network(),
            vtep_mac: MacAddr::derive_like_felix(&format!("{name}-v6")),
            vtep_mac_derived: true,
        });
    }
    let view: Vec<PeerNode> = ["k8s01", "k8s02", "k8s03"]
        .iter()
        .map(|n| c.desired.ipv6().nodes[*n].clone())
        .collect();
    let mut v6dev = Cluster::programmed(V6, 4096, 4789, view);
    let local_vtep = c.desired.ipv6().nodes["k8s01"].vtep_ip;
    let dev = v6dev.dev();
    dev.link.addresses = vec![IpNet::new(local_vtep, 128).unwrap()];
    // What the kernel adds by itself when the device comes up with its /128.
    for dst in ["fe80::/64", &format!("{local_vtep}/128")] {
        dev.routes.push(Route {
            gateway: None,
            onlink: false,
            protocol: 2,
            metric: Some(256),
            ..route(&net(dst), None)
        });
    }
    let dev = v6dev.observed.devices.remove(V6).unwrap();
    c.observed.devices.insert(V6.into(), dev);
    c
}

fn report(c: &Cluster) -> CheckReport {
    report_with_drops(c, None)
}

fn report_with_drops(c: &Cluster, drops: Option<&DropSummary>) -> CheckReport {
    let specs = [DeviceSpec::for_name(V4), DeviceSpec::for_name(V6)];
    evaluate(&CheckInput {
        devices: &specs,
        observed: &c.observed,
        desired: Some(&c.desired),
        drops,
        explained_recently: None,
        datastore: None,
    })
}

/// `packets` dropped toward `peer` on `device` in the window.
fn drops_on(peer: &str, device: &str, packets: u64) -> DropSummary {
    let reasons = std::collections::BTreeMap::from([("NEIGH_FAILED".to_string(), packets)]);
    let mut drops = DropSummary::default();
    drops.per_peer.insert(
        peer.into(),
        PeerDrops {
            device: device.into(),
            devices: [device.to_string()].into(),
            packets,
            unexplained: reasons.clone(),
            reasons,
        },
    );
    drops
}

fn v6_dev(c: &mut Cluster) -> &mut ObservedDevice {
    c.observed.devices.get_mut(V6).unwrap()
}

fn v6_peer(c: &Cluster, name: &str) -> Ipv6Side {
    c.desired.nodes[name].ipv6.clone().unwrap()
}

/// Points every IPv6 route to `peer`'s blocks at `gateway` (the incident, on the v6 overlay).
fn set_v6_gateway(c: &mut Cluster, peer: &str, gateway: IpAddr) {
    let blocks = c.desired.ipv6().nodes[peer].blocks.clone();
    for r in &mut v6_dev(c).routes {
        if blocks.contains(&r.destination) {
            r.gateway = Some(gateway);
        }
    }
}

#[test]
fn healthy_dual_stack_has_no_findings_on_either_overlay() {
    let c = dual_stack();
    let r = report(&c);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    // 8 IPv4 routes, 4 IPv6 peer routes and the kernel's two.
    assert_eq!(r.routes_checked, 8 + 4 + 2);
    assert_eq!(r.peers.len(), 2);
}

#[test]
fn incident_on_the_v6_overlay_is_one_finding_there_and_nothing_on_v4() {
    let mut c = dual_stack();
    let wrong = v6_peer(&c, "k8s02").vtep_ip;
    set_v6_gateway(&mut c, "k8s03", wrong);
    let f = only(&report(&c), CheckId::GatewayWrongVtep, Some("k8s03"));
    assert_eq!(f.device, V6);
    assert_eq!(f.family, Some(Family::V6));
    assert_eq!(f.severity, Severity::Critical);
    assert_eq!(f.gateway, Some(wrong));
    assert_eq!(f.expected_gateway, Some(v6_peer(&c, "k8s03").vtep_ip));
    assert_eq!(f.evidence.routes.len(), 2, "{:?}", f.evidence.routes);
}

#[test]
fn v6_drops_are_explained_by_the_v6_finding_and_carried_as_its_evidence() {
    let mut c = dual_stack();
    let wrong = v6_peer(&c, "k8s02").vtep_ip;
    set_v6_gateway(&mut c, "k8s03", wrong);
    let r = report_with_drops(&c, Some(&drops_on("k8s03", V6, 40)));
    assert_eq!(
        summary(&r),
        vec![
            (CheckId::GatewayWrongVtep, Some("k8s03".into())),
            (CheckId::TrafficBlackholed, Some("k8s03".into()))
        ],
        "{:#?}",
        r.findings
    );
    assert!(r.findings.iter().all(|f| f.device == V6));
    assert!(r.findings.iter().all(|f| f.evidence.drops == Some(40)));
}

#[test]
fn an_ipv4_finding_does_not_explain_drops_on_the_v6_overlay() {
    // A fault on the IPv4 side of k8s03 while its IPv6 packets are lost for a reason no check
    // sees: the IPv6 loss stays unexplained, and the IPv4 finding carries no IPv6 packets.
    let mut c = dual_stack();
    c.set_gateway("k8s03", "10.1.20.0");
    let r = report_with_drops(&c, Some(&drops_on("k8s03", V6, 25)));
    assert_eq!(
        summary(&r),
        vec![
            (CheckId::GatewayWrongVtep, Some("k8s03".into())),
            (CheckId::DropsUnexplained, Some("k8s03".into()))
        ],
        "{:#?}",
        r.findings
    );
    assert_eq!(r.findings[0].device, V4);
    assert_eq!(r.findings[0].evidence.drops, None, "{:#?}", r.findings[0]);
    assert_eq!(r.findings[1].device, V6);
    assert_eq!(r.findings[1].evidence.drops, Some(25));
}

#[test]
fn incident_on_the_v4_overlay_is_one_finding_there_and_nothing_on_v6() {
    let mut c = dual_stack();
    c.set_gateway("k8s03", "10.1.20.0");
    let f = only(&report(&c), CheckId::GatewayWrongVtep, Some("k8s03"));
    assert_eq!(f.device, V4);
    assert_eq!(f.family, Some(Family::V4));
}

#[test]
fn each_v6_neighbour_and_fdb_fault_names_the_peer_on_the_v6_device() {
    type Fault = fn(&mut Cluster);
    let faults: [(&str, Fault, CheckId); 5] = [
        (
            "neighbour removed",
            |c| {
                let vtep = v6_peer(c, "k8s02").vtep_ip;
                v6_dev(c).neighbours.retain(|n| n.ip != vtep);
            },
            CheckId::NeighbourUnresolved,
        ),
        (
            "neighbour with the IPv4 VTEP's MAC",
            |c| {
                let (vtep, v4mac) = (v6_peer(c, "k8s02").vtep_ip, c.peer("k8s02").vtep_mac);
                for n in &mut v6_dev(c).neighbours {
                    if n.ip == vtep {
                        n.mac = Some(v4mac);
                    }
                }
            },
            CheckId::NeighbourMacMismatch,
        ),
        (
            "FDB removed",
            |c| {
                let mac = v6_peer(c, "k8s03").vtep_mac;
                v6_dev(c).fdb.retain(|e| e.mac != mac);
            },
            CheckId::FdbMissing,
        ),
        (
            "FDB toward the IPv4 node address",
            |c| {
                let (mac, v4) = (v6_peer(c, "k8s03").vtep_mac, c.peer("k8s03").node_ip);
                for e in &mut v6_dev(c).fdb {
                    if e.mac == mac {
                        e.destination = Some(v4);
                    }
                }
            },
            CheckId::FdbWrongDestination,
        ),
        (
            "routes removed",
            |c| {
                let blocks = c.desired.ipv6().nodes["k8s03"].blocks.clone();
                v6_dev(c)
                    .routes
                    .retain(|r| !blocks.contains(&r.destination));
            },
            CheckId::RouteMissing,
        ),
    ];
    for (what, fault, check) in faults {
        let mut c = dual_stack();
        fault(&mut c);
        let r = report(&c);
        assert_eq!(r.findings.len(), 1, "{what}: {:#?}", r.findings);
        let f = &r.findings[0];
        assert_eq!((f.check, f.device.as_str()), (check, V6), "{what}: {f:#?}");
        assert!(f.peer_node.is_some(), "{what}: no peer named");
    }
}

#[test]
fn the_v6_expectations_come_from_the_v6_side_only() {
    let c = dual_stack();
    let fdb = &c.observed.devices[V6].fdb;
    let k8s03 = v6_peer(&c, "k8s03");
    assert!(fdb
        .iter()
        .any(|e| e.mac == k8s03.vtep_mac && e.destination == Some(k8s03.node_ip)));
    assert_ne!(
        k8s03.vtep_mac,
        c.peer("k8s03").vtep_mac,
        "v6 MAC derives from name-v6"
    );
    // The IPv4 blocks are not expected on the v6 device, nor the v6 ones on the v4 device.
    assert!(c.desired.ipv6().nodes["k8s03"]
        .blocks
        .iter()
        .all(|b| b.addr().is_ipv6()));
}

#[test]
fn a_v6_device_with_the_v4_mac_or_address_is_misconfigured() {
    let mut c = dual_stack();
    let v4mac = c.peer("k8s01").vtep_mac;
    v6_dev(&mut c).link.mac = Some(v4mac);
    let f = only(&report(&c), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.device, V6);
    assert_eq!(f.evidence.details["mac"], v4mac.to_string());

    let mut c = dual_stack();
    v6_dev(&mut c).link.addresses = vec![net("10.1.10.0/32")];
    let f = only(&report(&c), CheckId::DeviceMisconfigured, None);
    assert_eq!(f.device, V6);
    assert!(f.evidence.details.contains_key("address"));
}

#[test]
fn a_single_stack_peer_in_a_dual_stack_cluster_has_no_v6_expectations() {
    let mut c = dual_stack();
    let k8s02 = c.desired.nodes.get_mut("k8s02").unwrap();
    k8s02.ipv6 = None;
    k8s02.blocks.retain(|b| b.addr().is_ipv4());
    c.desired.ipv6_view = Default::default();
    // Felix removes what it programmed for the node's IPv6 side.
    let gone = v6_peer(&dual_stack(), "k8s02");
    let dev = v6_dev(&mut c);
    dev.routes.retain(|r| r.gateway != Some(gone.vtep_ip));
    dev.neighbours.retain(|n| n.ip != gone.vtep_ip);
    dev.fdb.retain(|e| e.mac != gone.vtep_mac);
    let r = report(&c);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);

    // A route to an IPv6 block of a node with no IPv6 VTEP over the v6 overlay is wrong.
    let mut c2 = c;
    c2.desired
        .nodes
        .get_mut("k8s02")
        .unwrap()
        .blocks
        .push(net("fd10:1:20::/122"));
    c2.desired.ipv6_view = Default::default();
    let stray = Route {
        kind: RouteKind::Unicast,
        ..route(&net("fd10:1:20::/122"), Some(gone.vtep_ip))
    };
    v6_dev(&mut c2).routes.push(stray);
    let r = report(&c2);
    assert!(
        summary(&r)
            .iter()
            .all(|(_, p)| p.as_deref() == Some("k8s02"))
            && !r.findings.is_empty(),
        "{:#?}",
        r.findings
    );
    assert!(r.findings.iter().all(|f| f.device == V6));
}

#[test]
fn flannel_v6_device_is_judged_against_the_ipv6_side() {
    let mut c = Cluster::flannel();
    for (name, i) in [("n1", 1u16), ("n2", 2), ("n3", 3)] {
        let n = c.desired.nodes.get_mut(name).unwrap();
        let subnet = IpNet::new(
            IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x244, i, 0, 0, 0, 0, 0)),
            64,
        )
        .unwrap();
        n.blocks.push(subnet);
        n.ipv6 = Some(Ipv6Side {
            node_ip: IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x16, 0, 0, 0, 0, 0, i)),
            vtep_ip: subnet.network(),
            vtep_mac: format!("a2:00:00:00:06:0{i}").parse().unwrap(),
            vtep_mac_derived: false,
        });
    }
    let view: Vec<PeerNode> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| c.desired.ipv6().nodes[*n].clone())
        .collect();
    let mut v6 = Cluster::programmed("flannel-v6.1", 1, 8472, view);
    let dev = v6.observed.devices.remove("flannel-v6.1").unwrap();
    c.observed.devices.insert("flannel-v6.1".into(), dev);
    let specs = [
        DeviceSpec::for_name("flannel.1"),
        DeviceSpec::for_name("flannel-v6.1"),
    ];
    let run = |c: &Cluster| {
        evaluate(&CheckInput {
            devices: &specs,
            observed: &c.observed,
            desired: Some(&c.desired),
            drops: None,
            explained_recently: None,
            datastore: None,
        })
    };
    let r = run(&c);
    assert!(r.findings.is_empty(), "{:#?}", r.findings);
    let n3 = c.desired.nodes["n3"].ipv6.clone().unwrap();
    let dev = c.observed.devices.get_mut("flannel-v6.1").unwrap();
    dev.fdb.retain(|e| e.mac != n3.vtep_mac);
    let f = only(&run(&c), CheckId::FdbMissing, Some("n3"));
    assert_eq!(f.device, "flannel-v6.1");
    assert_eq!(f.evidence.expected_fdb_destination, Some(n3.node_ip));
}
