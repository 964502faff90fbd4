//! Privileged tests of the lab itself: the dataplane it builds is the one Felix/flannel build,
//! real packets flow, each fault breaks exactly the flows it should, restore heals, drop cleans.
//! Run as root (CI does): `cargo test -p watchdog-lab`.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    sync::{Arc, Mutex},
};

use watchdog_lab::{Fault, InjectedFault, Lab, LabSpec, Mac, Profile, TrafficReport};

const PACKETS: u32 = 3;

fn build(spec: LabSpec) -> Lab {
    Lab::build(spec).unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"))
}

/// Borrowed address used by the Calico specs: node2 uses 10.1.1.10 from node1's block.
fn borrowed() -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 1, 10)
}

fn calico3() -> LabSpec {
    LabSpec::calico(3).with_borrowed("node2", borrowed())
}

/// Every flow in `reports` is fully delivered, except those in `lost`, which deliver nothing.
fn assert_flows(reports: &[TrafficReport], lost: &[(String, Ipv4Addr)], context: &str) {
    let lost: BTreeSet<(&str, Ipv4Addr)> = lost.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    let mut seen_lost = BTreeSet::new();
    for r in reports {
        for d in &r.per_destination {
            assert!(
                d.sent > 0,
                "{context}: nothing sent {} -> {}",
                r.from,
                d.dst
            );
            if lost.contains(&(r.from.as_str(), d.dst)) {
                seen_lost.insert((r.from.as_str(), d.dst));
                assert_eq!(
                    d.received, 0,
                    "{context}: {} ({}) -> {} should be blackholed, {} of {} arrived",
                    r.from, d.src, d.dst, d.received, d.sent
                );
            } else {
                assert_eq!(
                    d.received, d.sent,
                    "{context}: {} ({}) -> {} ({}) should be delivered: {} of {} arrived",
                    r.from, d.src, r.to, d.dst, d.received, d.sent
                );
            }
        }
    }
    assert_eq!(
        seen_lost, lost,
        "{context}: not every expected blackholed flow was measured"
    );
}

fn assert_healthy(lab: &Lab, context: &str) {
    let diff = lab.diff_from_healthy().expect("snapshot");
    assert!(
        diff.is_empty(),
        "{context}: dataplane differs from healthy:\n{}",
        diff.join("\n")
    );
    let reports = lab.traffic_matrix(PACKETS).expect("traffic");
    assert_flows(&reports, &[], context);
}

fn lines(s: &str) -> Vec<String> {
    s.lines().map(|l| l.trim().to_string()).collect()
}

#[test]
fn calico_lab_is_programmed_like_felix_and_delivers_everywhere() {
    let lab = build(calico3());
    let dev = lab.device();
    assert_eq!(dev, "vxlan.calico");
    let n1 = lab.node("node1");
    let n2 = lab.node("node2");

    // Device as Felix makes it.
    let link = lab.ip("node1", &["-d", "link", "show", dev]).unwrap();
    for want in [
        "vxlan id 4096",
        "local 192.168.77.1",
        "dev eth0",
        "dstport 4789",
        "nolearning",
        "mtu 1450",
        "state UNKNOWN",
        &n1.vtep_mac.to_string(),
    ] {
        assert!(link.contains(want), "missing {want:?} in:\n{link}");
    }
    assert_eq!(n1.vtep_mac, Mac::felix("node1"));
    let addrs = lab.ip("node1", &["-4", "-o", "addr", "show", dev]).unwrap();
    assert!(addrs.contains("inet 10.1.1.0/32"), "{addrs}");
    assert_eq!(
        n1.vtep_ip,
        Ipv4Addr::new(10, 1, 1, 0),
        "VTEP = base of first block"
    );

    // Routes: remote blocks via the VTEP (block base, which is healthy), local blackholes,
    // the borrowed /32 everywhere except on the borrower.
    let routes = lines(&lab.ip("node1", &["route", "show"]).unwrap());
    for want in [
        "10.1.2.0/26 via 10.1.2.0 dev vxlan.calico onlink",
        "10.1.2.64/26 via 10.1.2.0 dev vxlan.calico onlink",
        "10.1.3.0/26 via 10.1.3.0 dev vxlan.calico onlink",
        "10.1.1.10 via 10.1.2.0 dev vxlan.calico onlink",
        "blackhole 10.1.1.0/26 proto 80",
        "blackhole 10.1.1.64/26 proto 80",
    ] {
        assert!(
            routes.iter().any(|l| l == want),
            "missing route {want:?} in {routes:#?}"
        );
    }
    let routes3 = lab
        .ip("node3", &["route", "show", "exact", "10.1.1.10"])
        .unwrap();
    assert_eq!(
        routes3.trim(),
        "10.1.1.10 via 10.1.2.0 dev vxlan.calico onlink"
    );
    let routes2 = lab
        .ip("node2", &["route", "show", "exact", "10.1.1.10"])
        .unwrap();
    assert!(
        routes2.trim().is_empty(),
        "borrower must not route its own /32: {routes2}"
    );

    // Neighbour and FDB per peer.
    let neigh = lines(&lab.ip("node1", &["neigh", "show", "dev", dev]).unwrap());
    assert!(
        neigh.contains(&format!("10.1.2.0 lladdr {} PERMANENT", n2.vtep_mac)),
        "{neigh:#?}"
    );
    let fdb = lines(&lab.bridge("node1", &["fdb", "show", "dev", dev]).unwrap());
    assert!(
        fdb.contains(&format!("{} dst 192.168.77.2 self permanent", n2.vtep_mac)),
        "{fdb:#?}"
    );
    assert_eq!(neigh.len(), 2, "one neighbour per peer: {neigh:#?}");

    // Pods on lo, 3 per block; the borrower also answers on the borrowed address.
    assert_eq!(n1.pods.len(), 6);
    assert_eq!(n2.workload_ips().last(), Some(&borrowed()));
    let lo = lab
        .ip("node2", &["-4", "-o", "addr", "show", "dev", "lo"])
        .unwrap();
    assert!(
        lo.contains("10.1.1.10/32") && lo.contains("10.1.2.1/32"),
        "{lo}"
    );

    // rp_filter is off inside the namespace (and the setting did not leak to the host).
    let out = lab
        .exec("node1", &["cat", "/proc/sys/net/ipv4/conf/all/rp_filter"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");

    let reports = lab.traffic_matrix(PACKETS).unwrap();
    assert_eq!(reports.len(), 6);
    assert_flows(&reports, &[], "healthy calico");
    let to2 = reports
        .iter()
        .find(|r| r.from == "node1" && r.to == "node2")
        .unwrap();
    assert_eq!(to2.per_destination.len(), 7, "6 pods + 1 borrowed");
    assert!(to2.all_delivered());
}

#[test]
fn flannel_lab_is_programmed_like_flanneld_and_delivers_everywhere() {
    let lab = build(LabSpec::flannel(3));
    assert_eq!(lab.profile(), Profile::Flannel);
    let link = lab
        .ip("node2", &["-d", "link", "show", "flannel.1"])
        .unwrap();
    for want in [
        "vxlan id 1 ",
        "dstport 8472",
        "nolearning",
        "mtu 1450",
        "local 192.168.77.2",
    ] {
        assert!(link.contains(want), "missing {want:?} in:\n{link}");
    }
    let n1 = lab.node("node1");
    let routes = lines(&lab.ip("node2", &["route", "show"]).unwrap());
    assert!(
        routes.contains(&"10.244.0.0/24 via 10.244.0.0 dev flannel.1 onlink".to_string()),
        "{routes:#?}"
    );
    assert!(
        !routes.iter().any(|l| l.starts_with("blackhole")),
        "flannel has no blackholes: {routes:#?}"
    );
    let neigh = lab.neighbour("node2", n1.vtep_ip).unwrap().unwrap();
    assert_eq!(
        neigh,
        format!("10.244.0.0 lladdr {} PERMANENT", n1.vtep_mac)
    );
    let addrs = lab
        .ip("node1", &["-4", "-o", "addr", "show", "flannel.1"])
        .unwrap();
    assert!(addrs.contains("inet 10.244.0.0/32"), "{addrs}");

    assert_flows(
        &lab.traffic_matrix(PACKETS).unwrap(),
        &[],
        "healthy flannel",
    );
}

/// Injects each fault in turn: exactly the expected flows die, restore brings back the exact
/// healthy dataplane and full delivery.
fn exercise_faults(lab: &mut Lab, faults: Vec<Fault>) {
    for fault in faults {
        let kind = fault.kind();
        let injected: InjectedFault = lab.inject(fault).expect("inject");
        let context = format!("[{} {kind}] {}", lab.profile(), injected.description);
        let reports = lab.traffic_matrix(PACKETS).expect("traffic");
        assert_flows(&reports, &injected.blackholed, &context);
        match &injected.fault {
            Fault::StaleVtep { .. } | Fault::StrayRoute { .. } => {
                assert!(injected.blackholed.is_empty(), "{context}")
            }
            _ => assert!(!injected.blackholed.is_empty(), "{context}"),
        }
        if let Fault::GatewayNotAVtep { on, .. } = &injected.fault {
            let gw = injected.gateway.unwrap();
            assert!(
                injected
                    .route_lines
                    .iter()
                    .all(|l| l.contains(&format!(" via {gw} dev {} onlink", lab.device()))),
                "{context}: {:#?}",
                injected.route_lines
            );
            let neigh = lab.neighbour(on, gw).unwrap().unwrap_or_default();
            assert!(
                neigh.ends_with("INCOMPLETE") || neigh.ends_with("FAILED"),
                "{context}: gateway neighbour should be unresolved, got {neigh:?}"
            );
        }
        if let Fault::RouteRemoved { .. } = &injected.fault {
            assert!(injected.route_lines.is_empty(), "{context}");
        }
        assert_ne!(
            lab.diff_from_healthy().unwrap(),
            Vec::<String>::new(),
            "{context}"
        );
        lab.restore(&injected).expect("restore");
        assert_healthy(lab, &format!("after restoring {context}"));
    }
    assert!(lab.active_faults().is_empty());
}

#[test]
fn calico_faults_blackhole_exactly_their_flows_and_restore_heals() {
    let mut lab = build(calico3());
    let mut faults = Fault::all_kinds("node1", "node2");
    // node1's block holds node2's borrowed address: breaking node3's routes to node1's blocks
    // must not touch the /32 that goes to node2.
    faults.push(Fault::gateway_not_a_vtep("node3", "node1"));
    faults.push(Fault::RouteRemoved {
        on: "node3".into(),
        peer: "node2".into(),
        block: Some("10.1.2.64/26".parse().unwrap()),
    });
    exercise_faults(&mut lab, faults);
}

#[test]
fn flannel_faults_blackhole_exactly_their_flows_and_restore_heals() {
    let mut lab = build(LabSpec::flannel(3));
    exercise_faults(&mut lab, Fault::all_kinds("node3", "node1"));
}

#[test]
fn incident_lab_replays_k8s03() {
    let mut lab = build(LabSpec::incident());
    let k8s03 = lab.node("k8s03").clone();
    assert_eq!(k8s03.vtep_ip, Ipv4Addr::new(10, 1, 235, 133));
    assert_eq!(k8s03.blocks.len(), 6);
    assert_eq!(
        lab.ip("k8s01", &["route", "show", "exact", "10.1.235.128/26"])
            .unwrap()
            .trim(),
        "10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink"
    );
    // k8s01's own VTEP is its block base, as Calico normally assigns.
    let k8s01 = lab.node("k8s01");
    assert_eq!(k8s01.vtep_ip, k8s01.blocks[0].network());

    let f1 = lab.inject(Fault::incident("k8s01")).unwrap();
    let f2 = lab.inject(Fault::incident("k8s02")).unwrap();
    assert_eq!(f1.route_lines.len(), 6);
    assert_eq!(
        f1.route_lines[0],
        "10.1.235.128/26 via 10.1.235.128 dev vxlan.calico onlink"
    );
    let mut lost = f1.blackholed.clone();
    lost.extend(f2.blackholed.clone());
    assert_eq!(lost.len(), 2 * 18);
    assert_flows(&lab.traffic_matrix(PACKETS).unwrap(), &lost, "incident");
    let neigh = lab
        .neighbour("k8s01", "10.1.235.128".parse().unwrap())
        .unwrap();
    assert!(
        matches!(
            neigh.as_deref(),
            Some("10.1.235.128 INCOMPLETE" | "10.1.235.128 FAILED")
        ),
        "{neigh:?}"
    );

    lab.restore_all().unwrap();
    assert_healthy(&lab, "incident repaired");
}

#[test]
fn datastore_yaml_describes_the_healthy_cluster() {
    let lab = build(calico3());
    let doc: serde_json::Value = serde_saphyr::from_str(&lab.datastore_yaml()).unwrap();
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for (y, n) in nodes.iter().zip(lab.nodes()) {
        assert_eq!(y["name"].as_str(), Some(n.name.as_str()));
        assert_eq!(y["node_ip"].as_str(), Some(n.node_ip.to_string().as_str()));
        assert_eq!(y["vtep_ip"].as_str(), Some(n.vtep_ip.to_string().as_str()));
        // Calico nodes publish no MAC: the agent derives it like Felix, so must the lab.
        assert!(y.get("vtep_mac").is_none());
        let derived = dataplane_watchdog::model::MacAddr::derive_like_felix(&n.name);
        assert_eq!(
            derived.0, n.vtep_mac.0,
            "lab and agent derive different MACs"
        );
        let blocks: Vec<String> = y["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = n.blocks.iter().map(|b| b.to_string()).collect();
        assert_eq!(blocks, want);
    }
    assert_eq!(nodes[1]["borrowed"][0].as_str(), Some("10.1.1.10/32"));

    let flannel = build(LabSpec::flannel(2));
    let doc: serde_json::Value = serde_saphyr::from_str(&flannel.datastore_yaml()).unwrap();
    let first = &doc["nodes"][0];
    assert_eq!(
        first["vtep_mac"].as_str(),
        Some(flannel.node("node1").vtep_mac.to_string().as_str())
    );
    assert_eq!(first["blocks"][0].as_str(), Some("10.244.0.0/24"));
}

fn namespaces(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = lab.nodes().iter().map(|n| n.netns.clone()).collect();
    v.push(lab.underlay_netns().to_string());
    v
}

fn assert_gone(names: &[String]) {
    for ns in names {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} survived the lab"
        );
    }
}

#[test]
fn drop_removes_every_namespace_even_on_panic() {
    let mut lab = build(LabSpec::calico(2));
    let names = namespaces(&lab);
    for ns in &names {
        assert!(Path::new("/run/netns").join(ns).exists(), "{ns} missing");
    }
    let config = lab.write_agent_config("node1").unwrap();
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(toml.contains("node_name = \"node1\"") && toml.contains("source = \"file\""));
    drop(lab);
    assert_gone(&names);
    assert!(!config.exists(), "agent config survived the lab");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let result = std::panic::catch_unwind(move || {
        let mut lab = build(LabSpec::calico(2));
        *seen2.lock().unwrap() = namespaces(&lab);
        lab.inject(Fault::fdb_removed("node1", "node2")).unwrap();
        panic!("test body fails while the lab is up");
    });
    assert!(result.is_err());
    let names = seen.lock().unwrap().clone();
    assert_eq!(names.len(), 3);
    assert_gone(&names);
}

#[test]
fn two_labs_run_side_by_side() {
    let a = build(LabSpec::calico(2));
    let b = build(LabSpec::calico(2));
    assert_ne!(a.id(), b.id());
    // Same addresses in both, but separate underlays: each delivers, neither sees the other.
    assert!(a
        .traffic("node1", "node2", PACKETS)
        .unwrap()
        .all_delivered());
    assert!(b
        .traffic("node2", "node1", PACKETS)
        .unwrap()
        .all_delivered());
}

#[test]
fn bad_faults_are_refused_with_a_reason() {
    let mut lab = build(LabSpec::calico(2));
    let vtep = lab.node("node2").vtep_ip;
    let err = lab
        .inject(Fault::GatewayNotAVtep {
            on: "node1".into(),
            peer: "node2".into(),
            gateway: Some(vtep),
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("is a VTEP"), "{err:#}");
    let err = lab
        .inject(Fault::fdb_removed("node1", "node1"))
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("two different nodes"),
        "{err:#}"
    );
    let err = lab.inject(Fault::fdb_removed("node1", "nope")).unwrap_err();
    assert!(format!("{err:#}").contains("nope"), "{err:#}");
    assert!(lab.active_faults().is_empty());
    assert_healthy(&lab, "after refused faults");
}

#[test]
fn stale_namespaces_of_dead_labs_are_cleaned() {
    // pid above the kernel's maximum (2^22): certainly not a live process.
    let name = "wdl4999999x0-node1";
    std::process::Command::new("ip")
        .args(["netns", "add", name])
        .status()
        .unwrap();
    let deleted = Lab::cleanup_stale().unwrap();
    assert!(deleted.contains(&name.to_string()), "{deleted:?}");
    assert!(!Path::new("/run/netns").join(name).exists());
}
