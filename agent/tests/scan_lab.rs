//! `watchdog scan` against real dataplanes in the network-namespace lab (needs root).
//!
//! Every healthy variant must give zero findings on every node; every fault must give exactly
//! the expected findings, for exactly the affected peer, on exactly the faulted node.

use std::{collections::BTreeSet, path::Path, process::Command};

use serde_json::Value;
use watchdog_lab::{Fault, Lab, LabSpec};

const WATCHDOG: &str = env!("CARGO_BIN_EXE_watchdog");

struct Scan {
    code: i32,
    json: Value,
}

impl Scan {
    /// (check, peer) of every finding.
    fn checks(&self) -> BTreeSet<(String, Option<String>)> {
        self.findings()
            .iter()
            .map(|f| {
                (
                    f["check"].as_str().unwrap().to_string(),
                    f["peer_node"].as_str().map(String::from),
                )
            })
            .collect()
    }

    fn findings(&self) -> Vec<Value> {
        self.json["findings"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn scan(lab: &mut Lab, node: &str, extra: &[&str]) -> Scan {
    let config = lab.write_agent_config(node).expect("writing agent config");
    scan_with(&config, &lab.netns_path(node), extra)
}

fn scan_with(config: &Path, netns: &Path, extra: &[&str]) -> Scan {
    let out = Command::new(WATCHDOG)
        .args(["scan", "--json", "--config"])
        .arg(config)
        .arg("--netns")
        .arg(netns)
        .args(extra)
        .output()
        .expect("running watchdog scan");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().expect("exit code");
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "scan printed no JSON ({e}), exit {code}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Scan { code, json }
}

fn assert_all_healthy(lab: &mut Lab, context: &str) {
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    for node in names {
        let s = scan(lab, &node, &[]);
        assert!(
            s.findings().is_empty() && s.code == 0,
            "{context}: {node} must be healthy, got exit {} and {:#?}",
            s.code,
            s.findings()
        );
        assert!(s.json["routes_checked"].as_u64().unwrap() > 0);
    }
}

fn expected(fault: &Fault) -> BTreeSet<(String, Option<String>)> {
    let peer = fault.peer().map(String::from);
    let ids: &[&str] = match fault {
        Fault::GatewayNotAVtep { .. } => &["gateway-wrong-vtep"],
        // Routes still point at the old VTEP, and the new VTEP has no neighbour entry.
        Fault::StaleVtep { .. } => &["gateway-wrong-vtep", "neighbour-unresolved"],
        Fault::NeighbourRemoved { .. } => &["neighbour-unresolved"],
        Fault::NeighbourWrongMac { .. } => &["neighbour-mac-mismatch"],
        Fault::FdbRemoved { .. } => &["fdb-missing"],
        Fault::FdbWrongDestination { .. } => &["fdb-wrong-destination"],
        Fault::RouteRemoved { .. } => &["route-missing"],
        Fault::StrayRoute { .. } => return [("route-stale".to_string(), None)].into(),
    };
    ids.iter()
        .map(|id| (id.to_string(), peer.clone()))
        .collect()
}

fn every_fault_is_reported_exactly(spec: LabSpec) {
    let mut lab = Lab::build(spec).expect("building lab");
    assert_all_healthy(&mut lab, "before any fault");
    for fault in Fault::all_kinds("node1", "node2") {
        let want = expected(&fault);
        let kind = fault.kind();
        let injected = lab.inject(fault).expect("injecting fault");
        let s = scan(&mut lab, "node1", &[]);
        assert_eq!(
            s.checks(),
            want,
            "{kind}: {}\nfindings: {:#?}",
            injected.description,
            s.findings()
        );
        let stray = kind == "stray-route";
        assert_eq!(s.code, if stray { 1 } else { 2 }, "{kind}: exit code");
        // Nobody else is affected.
        for other in ["node2", "node3"] {
            let o = scan(&mut lab, other, &[]);
            assert!(
                o.findings().is_empty(),
                "{kind}: {other} {:#?}",
                o.findings()
            );
        }
        lab.restore(&injected).expect("restoring");
        let after = scan(&mut lab, "node1", &[]);
        assert!(
            after.findings().is_empty(),
            "{kind}: after restore {:#?}",
            after.findings()
        );
    }
}

#[test]
fn calico_every_fault_is_reported_exactly() {
    every_fault_is_reported_exactly(LabSpec::calico(3));
}

#[test]
fn flannel_every_fault_is_reported_exactly() {
    every_fault_is_reported_exactly(LabSpec::flannel(3));
}

#[test]
fn healthy_variants_have_zero_findings() {
    for (name, spec) in [
        ("incident cluster", LabSpec::incident()),
        (
            "calico with a borrowed address",
            LabSpec::calico(3).with_borrowed("node2", "10.1.1.9".parse().unwrap()),
        ),
        ("flannel", LabSpec::flannel(3)),
    ] {
        let mut lab = Lab::build(spec).expect("building lab");
        assert_all_healthy(&mut lab, name);
    }
}

#[test]
fn incident_replay_is_critical_with_the_right_expected_gateway() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.inject(Fault::incident("k8s01")).unwrap();
    // Real traffic makes the kernel try (and fail) to resolve the bogus gateway.
    let t = lab.traffic("k8s01", "k8s03", 3).unwrap();
    assert!(t.none_delivered(), "{t}");

    let s = scan(&mut lab, "k8s01", &[]);
    assert_eq!(s.code, 2);
    let findings = s.findings();
    assert_eq!(findings.len(), 1, "{findings:#?}");
    let f = &findings[0];
    assert_eq!(f["check"], "gateway-wrong-vtep");
    assert_eq!(f["severity"], "critical");
    assert_eq!(f["device"], "vxlan.calico");
    assert_eq!(f["peer_node"], "k8s03");
    assert_eq!(f["route"], "10.1.235.128/26");
    assert_eq!(f["gateway"], "10.1.235.128");
    assert_eq!(f["expected_gateway"], "10.1.235.133");
    assert_eq!(f["evidence"]["routes"].as_array().unwrap().len(), 6);
    let state = f["evidence"]["neighbour_state"].as_str().unwrap();
    assert!(
        state == "incomplete" || state == "failed",
        "neighbour state {state}"
    );
    assert!(f["hint"]
        .as_str()
        .unwrap()
        .contains("ip route replace $r via 10.1.235.133 dev vxlan.calico onlink"));
    let peers = s.json["peers"].as_array().unwrap();
    let k8s03 = peers.iter().find(|p| p["node"] == "k8s03").unwrap();
    assert_eq!(k8s03["verdict"], "critical");

    // Without a datastore the base-address gateway is still caught, because the unresolved
    // neighbour corroborates it.
    let offline = scan(&mut lab, "k8s01", &["--datastore", "none"]);
    assert_eq!(offline.code, 2);
    assert_eq!(
        offline.checks(),
        [("gateway-is-network-address".to_string(), None)].into()
    );
    assert!(!offline.json["skipped"].as_array().unwrap().is_empty());
}

#[test]
fn offline_scan_of_a_healthy_calico_node_is_clean() {
    // Calico's VTEPs ARE block base addresses: the heuristic alone must not fire.
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let s = scan(&mut lab, "node1", &["--datastore", "none"]);
    assert_eq!(s.code, 0, "{:#?}", s.findings());
}

#[test]
fn bad_datastore_input_is_a_finding_or_a_clear_error_never_a_panic() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let dir = tempfile::tempdir().unwrap();
    let config = lab.write_agent_config("node1").unwrap();

    // One node with a broken VTEP: reported, the rest still checked.
    let broken = lab
        .datastore_yaml()
        .replacen("vtep_ip: 10.1.3.0", "vtep_ip: 10.1.3.x", 1);
    assert_ne!(broken, lab.datastore_yaml(), "fixture must change");
    let path = dir.path().join("nodes.yaml");
    std::fs::write(&path, broken).unwrap();
    let s = scan_with(
        &config,
        &lab.netns_path("node1"),
        &["--datastore", path.to_str().unwrap()],
    );
    assert_eq!(
        s.checks(),
        [("datastore-invalid".to_string(), Some("node3".to_string()))].into()
    );
    assert_eq!(s.code, 1);

    // Not YAML at all: exit 3 (could not check) with a message naming the file.
    std::fs::write(&path, "nodes: [ {").unwrap();
    let out = Command::new(WATCHDOG)
        .args(["scan", "--config"])
        .arg(&config)
        .arg("--netns")
        .arg(lab.netns_path("node1"))
        .args(["--datastore", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nodes.yaml"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
}

#[test]
fn bad_config_is_one_line_naming_the_key_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "resync_interval = \"fast\"\n").unwrap();
    let out = Command::new(WATCHDOG)
        .args(["scan", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resync_interval"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn calico_cross_subnet_routes_via_the_underlay_are_healthy() {
    // vxlanMode CrossSubnet: Felix routes a same-subnet peer's blocks straight to its node IP
    // on the underlay device instead of over vxlan.calico. Healthy; must not be route-missing.
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let node2 = lab.node("node2").clone();
    for block in &node2.blocks {
        lab.ip(
            "node1",
            &[
                "route",
                "replace",
                &block.to_string(),
                "via",
                &node2.node_ip.to_string(),
                "dev",
                "eth0",
                "proto",
                "80",
            ],
        )
        .expect("cross-subnet route");
    }
    let t = lab.traffic("node1", "node2", 3).unwrap();
    assert!(t.all_delivered(), "cross-subnet traffic must flow: {t}");
    let s = scan(&mut lab, "node1", &[]);
    assert!(s.findings().is_empty(), "{:#?}", s.findings());
    assert_eq!(s.code, 0);
}

/// Shapes real clusters have that the basic lab does not: each is healthy (zero findings on
/// every node, every flow delivered), and the field's ways of breaking them are found.
#[test]
fn real_cluster_shapes_are_healthy_and_their_faults_are_found() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let nodes = lab.nodes().to_vec();
    let assert_delivered = |lab: &Lab, context: &str| {
        for r in lab.traffic_matrix(3).expect("traffic") {
            for d in &r.per_destination {
                assert_eq!(
                    d.received, d.sent,
                    "{context}: {} -> {} lost packets",
                    r.from, d.dst
                );
            }
        }
    };

    // Calico 3.30-3.31: a gateway-less host route to every remote VTEP.
    lab.add_vtep_host_routes().unwrap();
    assert_all_healthy(&mut lab, "Calico 3.30 VTEP host routes");
    assert_delivered(&lab, "Calico 3.30 VTEP host routes");

    // flannel DirectRouting / Calico CrossSubnet: node1 reaches node2 over the shared
    // underlay subnet, with no ARP or FDB entry for node2's VTEP.
    let (n1, n2) = (&nodes[0], &nodes[1]);
    let via = n2.node_ip.to_string();
    lab.route_directly(&n1.name, &n2.name).unwrap();
    let s = scan(&mut lab, &n1.name, &[]);
    assert!(
        s.findings().is_empty(),
        "DirectRouting: {:#?}",
        s.findings()
    );
    assert_delivered(&lab, "DirectRouting");

    // Left on a tunnel device where node2's address is not on-link (an IPIP leftover).
    lab.ip(
        &n1.name,
        &[
            "link", "add", "tunl9", "type", "veth", "peer", "name", "tunl9p",
        ],
    )
    .unwrap();
    lab.ip(&n1.name, &["link", "set", "tunl9", "up"]).unwrap();
    let first = n2.blocks[0].to_string();
    lab.ip(
        &n1.name,
        &[
            "route", "replace", &first, "via", &via, "dev", "tunl9", "onlink",
        ],
    )
    .unwrap();
    let s = scan(&mut lab, &n1.name, &[]);
    assert_eq!(
        s.checks(),
        BTreeSet::from([("route-wrong-device".to_string(), Some(n2.name.clone()))]),
        "{:#?}",
        s.findings()
    );

    // A blackhole inside node3's block on node1 drops that part of node3's traffic.
    let n3 = &nodes[2];
    let inner = ipnet::Ipv4Net::new(n3.blocks[0].network(), 29)
        .unwrap()
        .to_string();
    lab.ip(&n1.name, &["route", "add", "blackhole", &inner])
        .unwrap();
    let s = scan(&mut lab, &n1.name, &[]);
    assert!(
        s.checks()
            .contains(&("route-stale".to_string(), Some(n3.name.clone()))),
        "{:#?}",
        s.findings()
    );
}

/// A Calico cluster migrated from flannel keeps VNI 1 and port 8472: healthy once the agent is
/// told (`vxlan_vni`, `vxlan_port`), traffic flowing; without it, every node says what differs.
#[test]
fn a_flannel_migrated_vni_and_port_are_healthy_when_configured() {
    let mut lab = Lab::build(LabSpec::calico(3).with_vxlan(1, 8472)).expect("building lab");
    assert_all_healthy(&mut lab, "VNI 1 / port 8472, configured");
    for r in lab.traffic_matrix(3).expect("traffic") {
        for d in &r.per_destination {
            assert_eq!(d.received, d.sent, "{} -> {} lost packets", r.from, d.dst);
        }
    }
    // The same node judged with the profile's defaults.
    let datastore = lab.write_datastore().unwrap();
    let text = lab
        .agent_config_toml("node1", &datastore)
        .replace("vxlan_vni = 1\n", "")
        .replace("vxlan_port = 8472\n", "");
    let config = datastore.with_file_name("defaults.toml");
    std::fs::write(&config, text).unwrap();
    let s = scan_with(&config, &lab.netns_path("node1"), &[]);
    let _ = std::fs::remove_file(&config);
    assert_eq!(
        s.checks(),
        BTreeSet::from([("device-misconfigured".to_string(), None)]),
        "{:#?}",
        s.findings()
    );
    let f = &s.findings()[0];
    assert_eq!(f["evidence"]["details"]["vni"], "1");
    assert_eq!(f["evidence"]["details"]["expected_port"], "4789");
}

/// Calico's eBPF dataplane: a flow-based (`external`) `vxlan.calico` with no VNI, ARP entries
/// and routes as usual, and no FDB at all. Healthy; its ARP entries still matter. (No traffic
/// here: without Calico's programs nothing sets the tunnel metadata.)
#[test]
fn the_ebpf_dataplane_device_is_healthy_without_vni_or_fdb() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let dev = lab.device();
    let nodes = lab.nodes().to_vec();
    let me = &nodes[0];
    lab.ip(&me.name, &["link", "del", dev]).unwrap();
    let (mac, local) = (me.vtep_mac.to_string(), me.node_ip.to_string());
    lab.ip(
        &me.name,
        &[
            "link",
            "add",
            dev,
            "address",
            &mac,
            "type",
            "vxlan",
            "external",
            "dstport",
            "4789",
            "local",
            &local,
            "nolearning",
        ],
    )
    .unwrap();
    let vtep = format!("{}/32", me.vtep_ip);
    lab.ip(&me.name, &["addr", "add", &vtep, "dev", dev])
        .unwrap();
    lab.ip(&me.name, &["link", "set", dev, "mtu", "1450", "up"])
        .unwrap();
    for p in nodes.iter().filter(|p| p.name != me.name) {
        let via = p.vtep_ip.to_string();
        for b in &p.blocks {
            let b = b.to_string();
            lab.ip(
                &me.name,
                &["route", "add", &b, "via", &via, "dev", dev, "onlink"],
            )
            .unwrap();
        }
        let mac = p.vtep_mac.to_string();
        lab.ip(
            &me.name,
            &[
                "neigh",
                "add",
                &via,
                "lladdr",
                &mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ],
        )
        .unwrap();
    }
    let s = scan(&mut lab, &me.name, &[]);
    assert!(s.findings().is_empty(), "{:#?}", s.findings());

    let peer = &nodes[1];
    lab.ip(
        &me.name,
        &["neigh", "del", &peer.vtep_ip.to_string(), "dev", dev],
    )
    .unwrap();
    let s = scan(&mut lab, &me.name, &[]);
    assert_eq!(
        s.checks(),
        BTreeSet::from([("neighbour-unresolved".to_string(), Some(peer.name.clone()))]),
        "{:#?}",
        s.findings()
    );
}

/// Node name ≠ host name (clouds name nodes `ip-10-0-1-5…` or by instance id): with no
/// `node_name` configured, and a host name that is no node's, the agent finds its node by
/// the overlay device's local address. It never judges its own blocks as a peer's: every node
/// is healthy, and a fault is found on the faulted node only, naming the right peer.
#[test]
fn a_node_name_other_than_the_host_name_is_found_by_address() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let datastore = lab.write_datastore().unwrap();
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    let scan_unnamed = |lab: &Lab, node: &str| {
        let text = lab.agent_config_toml(node, &datastore);
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("node_name"))
            .map(|l| format!("{l}\n"))
            .collect();
        let config = datastore.with_file_name(format!("{node}-unnamed.toml"));
        std::fs::write(&config, text).unwrap();
        let s = scan_with(&config, &lab.netns_path(node), &[]);
        let _ = std::fs::remove_file(&config);
        s
    };
    for node in &names {
        let s = scan_unnamed(&lab, node);
        assert!(
            s.findings().is_empty() && s.code == 0,
            "{node} (found by address) must be healthy: {:#?}",
            s.findings()
        );
        assert_eq!(s.json["peers"].as_array().unwrap().len(), names.len() - 1);
        assert!(s.json["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["node"] != node.as_str()));
    }
    let fault = Fault::route_removed("node1", "node2");
    let want = expected(&fault);
    lab.inject(fault).unwrap();
    assert_eq!(scan_unnamed(&lab, "node1").checks(), want);
    for other in ["node2", "node3"] {
        let s = scan_unnamed(&lab, other);
        assert!(s.findings().is_empty(), "{other}: {:#?}", s.findings());
    }
}

#[test]
fn dual_stack_is_healthy_and_each_fault_stays_on_its_family() {
    use watchdog_lab::DEVICE_V6;
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let flows = [("k8s01", "k8s03"), ("k8s02", "k8s01"), ("k8s01", "k8s02")];
    for (a, b) in flows {
        let t = lab.traffic(a, b, 3).unwrap();
        assert!(t.all_delivered(), "IPv4 {t}");
        let (sent, got) = lab.traffic_v6(a, b, 3).unwrap();
        assert_eq!(got, sent, "IPv6 {a} -> {b}: {got}/{sent} delivered");
    }
    assert_all_healthy(&mut lab, "dual stack");
    let healthy = scan(&mut lab, "k8s01", &[]);
    let k8s03 = lab.ipv6_of("k8s03");
    assert_ne!(
        k8s03.vtep_ip,
        k8s03.block.network(),
        "the incident needs a non-base VTEP"
    );

    // The incident on k8s01's IPv6 overlay only: blackholes IPv6 to k8s03, not IPv4.
    let incident = format!(
        "route replace {} via {} dev {DEVICE_V6} onlink",
        k8s03.block,
        k8s03.block.network()
    );
    lab.ip("k8s01", &incident.split(' ').collect::<Vec<_>>())
        .unwrap();
    let s = scan(&mut lab, "k8s01", &[]);
    assert_eq!(
        s.checks(),
        [("gateway-wrong-vtep".to_string(), Some("k8s03".to_string()))].into(),
        "{:#?}",
        s.findings()
    );
    assert_eq!(
        s.findings()[0]["expected_gateway"],
        k8s03.vtep_ip.to_string()
    );
    assert_eq!(s.findings()[0]["family"], "ipv6");
    let (sent, got) = lab.traffic_v6("k8s01", "k8s03", 3).unwrap();
    assert_eq!(got, 0, "IPv6 incident: {got}/{sent} delivered");
    assert!(lab.traffic("k8s01", "k8s03", 3).unwrap().all_delivered());
    lab.heal_ipv6("k8s01").unwrap();

    // Every fault kind on one family only: its findings, on that family's device and naming
    // the peer, nothing on the other family, which still carries traffic.
    for fault in Fault::all_kinds("k8s01", "k8s02") {
        let expected = fault.expected_checks();
        let peer = fault.peer().map(str::to_string);
        let judge = |s: &Scan, device: &str, family: &str, what: &str| {
            let findings = s.findings();
            assert!(!findings.is_empty(), "{what}: nothing found");
            for f in &findings {
                assert!(
                    expected.contains(&f["check"].as_str().unwrap())
                        && f["device"] == device
                        && f["family"] == family
                        && f["peer_node"].as_str().map(str::to_string) == peer,
                    "{what}: {findings:#?}"
                );
            }
        };

        let injected = lab.inject_ipv6(&fault).expect("inject on IPv6");
        let s = scan(&mut lab, "k8s01", &[]);
        judge(&s, DEVICE_V6, "ipv6", &injected.description);
        assert!(
            lab.traffic("k8s01", "k8s02", 3).unwrap().all_delivered(),
            "IPv4 during {}",
            injected.description
        );
        lab.restore_ipv6(&injected).unwrap();
        let s = scan(&mut lab, "k8s01", &[]);
        assert!(
            s.findings().is_empty(),
            "after {}: {:#?}",
            injected.description,
            s.findings()
        );

        let injected = lab.inject(fault).expect("inject on IPv4");
        let s = scan(&mut lab, "k8s01", &[]);
        judge(&s, "vxlan.calico", "ipv4", &injected.description);
        let (sent, got) = lab.traffic_v6("k8s01", "k8s02", 3).unwrap();
        assert_eq!(got, sent, "IPv6 during {}", injected.description);
        lab.restore(&injected).unwrap();
        let s = scan(&mut lab, "k8s01", &[]);
        assert!(
            s.findings().is_empty(),
            "after {}: {:#?}",
            injected.description,
            s.findings()
        );
    }
    assert!(healthy.json["routes_checked"].as_u64().unwrap() > 8);
}
