//! eBPF accounting against the network-namespace lab with real pod → pod traffic (needs root and
//! an agent built with bpf-linker on PATH; `cargo xtask test` provides both).
//!
//! The loader runs in the test's own namespace and targets a lab node by its netns path, as the
//! daemon does with `--netns`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    desired::{file::parse, FileFormat},
    ebpf::{
        peer_blocks_from_desired, read_link_drop_stats, DropCounterSource, DropSnapshot,
        DropWindow, EbpfDropCounters, EbpfState, NeighTarget, TrafficClass, EBPF_OBJECT,
    },
};
use watchdog_lab::{Fault, Lab, LabSpec, DEVICE_V6};

fn ifindex(lab: &Lab, node: &str) -> u32 {
    ifindex_of(lab, node, lab.device())
}

fn ifindex_of(lab: &Lab, node: &str, device: &str) -> u32 {
    read_link_drop_stats(Some(&lab.netns_path(node)))
        .expect("reading links")
        .into_iter()
        .find(|l| l.name == device)
        .unwrap_or_else(|| panic!("{node} has no {device}"))
        .ifindex
}

/// The programs, loaded for `node`'s namespace, watching its overlay device, with the peer
/// blocks of the lab's datastore as `node` sees it.
fn attach(lab: &Lab, node: &str) -> EbpfDropCounters {
    attach_devices(lab, node, &[ifindex(lab, node)])
}

/// [`attach`], watching the devices `ifindexes`.
fn attach_devices(lab: &Lab, node: &str, ifindexes: &[u32]) -> EbpfDropCounters {
    assert!(
        !EBPF_OBJECT.is_empty(),
        "agent built without bpf-linker: put it on PATH and rebuild"
    );
    let mut counters = EbpfDropCounters::load(Some(&lab.netns_path(node)))
        .unwrap_or_else(|status| panic!("eBPF unavailable: {status:?}"));
    assert_eq!(counters.status().state, EbpfState::Attached);
    assert!(
        counters.kernel_log_attached(),
        "kernel diagnostics (aya-log) not wired"
    );
    counters
        .set_watched_devices(&ifindexes.iter().copied().collect())
        .expect("watch device");
    let desired = parse(
        &lab.datastore_yaml(),
        FileFormat::Yaml,
        Path::new("lab.yaml"),
        node,
    )
    .expect("lab datastore parses");
    counters
        .set_peer_blocks(&peer_blocks_from_desired(&desired))
        .expect("peer blocks");
    counters
}

fn wait_for(
    counters: &EbpfDropCounters,
    timeout: Duration,
    done: impl Fn(&DropSnapshot) -> bool,
) -> DropSnapshot {
    let start = Instant::now();
    loop {
        let snap = counters.snapshot().expect("snapshot");
        if done(&snap) || start.elapsed() > timeout {
            return snap;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn data_drops(snap: &DropSnapshot) -> u64 {
    snap.drops
        .iter()
        .filter(|d| d.class.is_data())
        .map(|d| d.packets)
        .sum()
}

#[test]
fn incident_drops_are_attributed_to_k8s03_with_neighbour_failures_on_k8s01() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.inject(Fault::incident("k8s01")).expect("inject");
    let dev = ifindex(&lab, "k8s01");
    let counters = attach(&lab, "k8s01");
    let mut window = DropWindow::starting_at(counters.snapshot().unwrap(), Instant::now());

    let blackholed = lab.traffic("k8s01", "k8s03", 20).expect("traffic");
    assert!(blackholed.none_delivered(), "{blackholed}");
    let healthy = lab.traffic("k8s01", "k8s02", 20).expect("traffic");
    assert!(healthy.all_delivered(), "{healthy}");

    let gateway = IpAddr::from([10, 1, 235, 128]);
    let sent = u64::from(blackholed.sent);
    let send_errors: u64 = blackholed
        .per_destination
        .iter()
        .map(|d| u64::from(d.send_errors))
        .sum();
    let snap = wait_for(&counters, Duration::from_secs(10), |s| {
        s.neighbour_gateway(dev, gateway, NeighTarget::Failed) > 0
            && s.data_drops_to_peer("k8s03").values().sum::<u64>() >= sent - send_errors
    });
    eprintln!("{snap:#?}");

    let k3 = snap.data_drops_to_peer("k8s03");
    assert!(
        !k3.is_empty(),
        "no data drops attributed to k8s03: {snap:#?}"
    );
    assert!(
        // QUEUE_PURGE: packets still queued on the unresolved neighbour when the kernel
        // purges its queue (seen when the entry is destroyed or replaced under load).
        k3.keys()
            .all(|r| r.starts_with("NEIGH_") || r == "QUEUE_PURGE"),
        "data drops toward k8s03 are neighbour-resolution drops: {k3:?}"
    );
    // Every datagram that left the socket was lost on the device, each counted once (a send
    // refused by the kernel may or may not have reached the device).
    let lost = k3.values().sum::<u64>();
    assert!(
        (sent - send_errors..=sent).contains(&lost),
        "{k3:?} vs {blackholed} ({send_errors} send errors)"
    );
    assert!(
        snap.data_drops_to_peer("k8s02").is_empty(),
        "misattributed to k8s02: {snap:#?}"
    );
    assert!(snap.drops.iter().all(|d| d.ifindex == dev));
    assert!(
        snap.neighbour_gateway(dev, gateway, NeighTarget::Incomplete) >= 1,
        "{snap:#?}"
    );
    assert!(
        snap.neighbour_gateway(dev, gateway, NeighTarget::Failed) >= 1,
        "{snap:#?}"
    );
    assert!(snap.neighbour_total(dev, NeighTarget::Failed) >= 1);
    // k8s02's VTEP is permanent: no transition for it.
    let k8s02_vtep = lab.node("k8s02").vtep_ip;
    assert_eq!(
        snap.neighbour_gateway(dev, k8s02_vtep.into(), NeighTarget::Incomplete),
        0
    );

    // The daemon's view of the same window: k8s03 only, on vxlan.calico.
    let names = BTreeMap::from([(dev, lab.device().to_string())]);
    let (summary, rates) = window.observe(&snap, Instant::now(), &names);
    assert_eq!(
        summary.per_peer.keys().collect::<Vec<_>>(),
        vec!["k8s03"],
        "{summary:?}"
    );
    assert_eq!(summary.per_peer["k8s03"].device, "vxlan.calico");
    assert_eq!(summary.per_peer["k8s03"].packets, lost);
    assert!(rates.devices["vxlan.calico"].neighbour_failed >= 1);
}

/// The incident on the IPv6 overlay of a dual-stack node: k8s03's IPv6 block routed via the
/// block's network address, which no VTEP answers (NDP, IPv6's ARP, fails).
fn inject_v6_incident(lab: &Lab) -> (String, IpAddr) {
    let k8s03 = lab.ipv6_of("k8s03");
    let gateway = k8s03.block.network();
    lab.ip(
        "k8s01",
        &[
            "route",
            "replace",
            &k8s03.block.to_string(),
            "via",
            &gateway.to_string(),
            "dev",
            DEVICE_V6,
            "onlink",
        ],
    )
    .expect("inject the IPv6 incident");
    (k8s03.block.to_string(), gateway.into())
}

#[test]
fn ipv6_incident_drops_are_attributed_to_k8s03_on_the_v6_overlay_only() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let (_, gateway) = inject_v6_incident(&lab);
    let (v4, v6) = (ifindex(&lab, "k8s01"), ifindex_of(&lab, "k8s01", DEVICE_V6));
    let counters = attach_devices(&lab, "k8s01", &[v4, v6]);
    let mut window = DropWindow::starting_at(counters.snapshot().unwrap(), Instant::now());

    let (sent, got) = lab.traffic_v6("k8s01", "k8s03", 20).expect("traffic");
    assert_eq!(got, 0, "the IPv6 incident blackholes k8s03");
    let (sent2, got2) = lab.traffic_v6("k8s01", "k8s02", 20).expect("traffic");
    assert_eq!(got2, sent2, "IPv6 to k8s02 is healthy");
    for peer in ["k8s02", "k8s03"] {
        let v4_report = lab.traffic("k8s01", peer, 10).expect("traffic");
        assert!(v4_report.all_delivered(), "IPv4 is healthy: {v4_report}");
    }

    let sent = u64::from(sent);
    let snap = wait_for(&counters, Duration::from_secs(10), |s| {
        s.neighbour_gateway(v6, gateway, NeighTarget::Failed) > 0
            && s.data_drops_to_peer("k8s03").values().sum::<u64>() >= sent
    });
    eprintln!("{snap:#?}");
    let k3 = snap.data_drops_to_peer("k8s03");
    assert!(
        // NOT_SPECIFIED: IPv6 frees the packets queued on a FAILED neighbour with a plain
        // kfree_skb (ndisc_error_report), where IPv4 says NEIGH_FAILED (arp_error_report).
        k3.keys()
            .all(|r| r.starts_with("NEIGH_") || r == "QUEUE_PURGE" || r == "NOT_SPECIFIED"),
        "IPv6 data drops toward k8s03 are neighbour-resolution drops: {k3:?}"
    );
    assert_eq!(
        k3.values().sum::<u64>(),
        sent,
        "each datagram lost once: {k3:?}"
    );
    let data: Vec<_> = snap.drops.iter().filter(|d| d.class.is_data()).collect();
    assert!(
        data.iter().all(|d| d.ifindex == v6
            && d.class == TrafficClass::Ipv6
            && d.peer.as_deref() == Some("k8s03")),
        "data lost only on {DEVICE_V6}, as IPv6, toward k8s03: {data:#?}"
    );
    assert!(snap.data_drops_to_peer("k8s02").is_empty(), "{snap:#?}");
    // Solicitations for the unresolvable gateway and listener reports are control traffic.
    assert!(
        snap.drops
            .iter()
            .filter(|d| d.class == TrafficClass::Ipv6Multicast)
            .all(|d| d.peer.is_none()),
        "{snap:#?}"
    );
    assert!(snap.neighbour_gateway(v6, gateway, NeighTarget::Incomplete) >= 1);
    assert_eq!(
        snap.neighbour_total(v4, NeighTarget::Failed),
        0,
        "{snap:#?}"
    );
    // k8s02's IPv6 VTEP is permanent: no transition for it.
    let k8s02_vtep = IpAddr::V6(lab.ipv6_of("k8s02").vtep_ip);
    assert_eq!(
        snap.neighbour_gateway(v6, k8s02_vtep, NeighTarget::Incomplete),
        0
    );

    let names = BTreeMap::from([(v4, lab.device().to_string()), (v6, DEVICE_V6.to_string())]);
    let (summary, rates) = window.observe(&snap, Instant::now(), &names);
    assert_eq!(
        summary.per_peer.keys().collect::<Vec<_>>(),
        vec!["k8s03"],
        "{summary:?}"
    );
    assert_eq!(summary.per_peer["k8s03"].device, DEVICE_V6);
    assert_eq!(summary.per_peer["k8s03"].packets, sent);
    assert_eq!(rates.devices[DEVICE_V6].failed_gateways[&gateway], 1);
    assert!(
        rates
            .devices
            .get(lab.device())
            .is_none_or(|d| d.data.packets == 0),
        "{rates:#?}"
    );
}

#[test]
fn missing_fdb_entry_drops_data_as_no_tx_target() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    lab.inject(Fault::fdb_removed("node1", "node2"))
        .expect("inject");
    let counters = attach(&lab, "node1");
    let report = lab.traffic("node1", "node2", 10).expect("traffic");
    assert!(report.none_delivered(), "{report}");
    let snap = wait_for(&counters, Duration::from_secs(5), |s| {
        s.data_drops_to_peer("node2").values().sum::<u64>() >= u64::from(report.sent)
    });
    let to_node2 = snap.data_drops_to_peer("node2");
    assert_eq!(
        to_node2,
        BTreeMap::from([("NO_TX_TARGET".to_string(), u64::from(report.sent))]),
        "{snap:#?}"
    );
    assert!(snap.data_drops_to_peer("node3").is_empty());
    // The neighbour is permanent: VXLAN, not ARP, drops the packets.
    assert!(snap.neighbour_transitions.is_empty(), "{snap:#?}");
}

#[test]
fn healthy_lab_under_traffic_shows_no_data_loss() {
    let lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let counters: Vec<(String, u32, EbpfDropCounters)> = ["node1", "node2", "node3"]
        .iter()
        .map(|n| (n.to_string(), ifindex(&lab, n), attach(&lab, n)))
        .collect();
    for report in lab.traffic_matrix(30).expect("traffic") {
        assert!(report.all_delivered(), "{report}");
    }
    std::thread::sleep(Duration::from_millis(300));
    for (node, dev, c) in &counters {
        let snap = c.snapshot().unwrap();
        assert_eq!(data_drops(&snap), 0, "{node}: {snap:#?}");
        assert!(
            snap.neighbour_transitions
                .iter()
                .all(|n| n.ifindex != *dev || n.state != NeighTarget::Failed),
            "{node}: {snap:#?}"
        );
        assert!(snap
            .drops
            .iter()
            .all(|d| d.class != TrafficClass::Ipv4 || d.packets == 0));
    }
}

/// Runs `watchdog scan --json --drops <window>` as `node` while `traffic` runs in a loop on
/// another thread until the scan ends; returns (exit code, JSON).
fn scan_with_drops_under_traffic(
    lab: &mut Lab,
    node: &str,
    window: &str,
    traffic: impl Fn(&Lab) + Sync,
) -> (i32, serde_json::Value) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let config = lab.write_agent_config(node).expect("agent config");
    let netns = lab.netns_path(node);
    let lab = &*lab;
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                traffic(lab);
            }
        });
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_watchdog"))
            .args(["scan", "--json", "--drops", window, "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(&netns)
            .output()
            .expect("running watchdog scan");
        done.store(true, Ordering::Relaxed);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON ({e}): {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().expect("exit code"), json)
    })
}

#[test]
fn scan_with_drops_reports_the_incident_as_traffic_blackholed() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.inject(Fault::incident("k8s01")).expect("inject");
    let (code, json) = scan_with_drops_under_traffic(&mut lab, "k8s01", "4s", |lab| {
        let _ = lab.traffic("k8s01", "k8s03", 5);
        let _ = lab.traffic("k8s01", "k8s02", 5);
    });
    assert_eq!(code, 2, "{json:#}");
    let drops = &json["drops"];
    assert_eq!(drops["ebpf"]["state"], "attached", "{drops:#}");
    let k3 = &drops["peers"]["k8s03"];
    assert!(k3["total"]["packets"].as_u64().unwrap() > 0, "{drops:#}");
    assert_eq!(k3["device"], "vxlan.calico");
    assert!(
        k3["reasons"]
            .as_object()
            .unwrap()
            .keys()
            .all(|r| r.starts_with("NEIGH_") || r == "QUEUE_PURGE"),
        "{drops:#}"
    );
    assert!(drops["peers"].get("k8s02").is_none(), "{drops:#}");
    assert!(
        drops["devices"]["vxlan.calico"]["neighbour_failed"]
            .as_u64()
            .unwrap()
            >= 1,
        "{drops:#}"
    );
    let findings = json["findings"].as_array().unwrap();
    let blackholed: Vec<_> = findings
        .iter()
        .filter(|f| f["check"] == "traffic-blackholed")
        .collect();
    assert_eq!(blackholed.len(), 1, "{findings:#?}");
    assert_eq!(blackholed[0]["peer_node"], "k8s03");
    assert_eq!(blackholed[0]["severity"], "critical");
    assert!(blackholed[0]["evidence"]["drops"].as_u64().unwrap() > 0);
    // The route finding carries the packets lost as evidence too.
    let wrong = findings
        .iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .expect("gateway-wrong-vtep");
    assert!(
        wrong["evidence"]["drops"].as_u64().unwrap() > 0,
        "{wrong:#}"
    );
    assert!(findings.iter().all(|f| f["check"] != "drops-unexplained"));
}

#[test]
fn scan_with_drops_on_a_healthy_lab_under_traffic_is_healthy() {
    let mut lab = Lab::build(LabSpec::calico(2)).expect("building lab");
    let (code, json) = scan_with_drops_under_traffic(&mut lab, "node1", "2s", |lab| {
        let _ = lab.traffic_matrix(10);
    });
    assert_eq!(code, 0, "{json:#}");
    assert!(json["findings"].as_array().unwrap().is_empty(), "{json:#}");
    let drops = &json["drops"];
    assert_eq!(drops["ebpf"]["state"], "attached", "{drops:#}");
    assert!(drops["peers"].as_object().unwrap().is_empty(), "{drops:#}");
}

#[test]
fn scan_with_drops_reports_the_ipv6_incident_as_traffic_blackholed_on_v6() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab");
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let (block, _) = inject_v6_incident(&lab);
    let (code, json) = scan_with_drops_under_traffic(&mut lab, "k8s01", "4s", |lab| {
        let _ = lab.traffic_v6("k8s01", "k8s03", 5);
        let _ = lab.traffic_v6("k8s01", "k8s02", 5);
        let _ = lab.traffic("k8s01", "k8s03", 5);
    });
    assert_eq!(code, 2, "{json:#}");
    let drops = &json["drops"];
    let k3 = &drops["peers"]["k8s03"];
    assert!(k3["total"]["packets"].as_u64().unwrap() > 0, "{drops:#}");
    assert_eq!(k3["device"], DEVICE_V6, "{drops:#}");
    assert!(drops["peers"].get("k8s02").is_none(), "{drops:#}");
    assert!(
        drops["devices"]
            .get("vxlan.calico")
            .is_none_or(|d| d["data"]["packets"] == 0),
        "no IPv4 data lost: {drops:#}"
    );
    let findings = json["findings"].as_array().unwrap();
    assert!(
        findings
            .iter()
            .all(|f| f["device"] == DEVICE_V6 && f["peer_node"] == "k8s03"),
        "every finding is k8s03's, on the IPv6 overlay: {findings:#?}"
    );
    let blackholed: Vec<_> = findings
        .iter()
        .filter(|f| f["check"] == "traffic-blackholed")
        .collect();
    assert_eq!(blackholed.len(), 1, "{findings:#?}");
    assert!(blackholed[0]["evidence"]["drops"].as_u64().unwrap() > 0);
    let wrong = findings
        .iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .expect("gateway-wrong-vtep");
    assert_eq!(wrong["route"], block);
    assert!(
        wrong["evidence"]["drops"].as_u64().unwrap() > 0,
        "{wrong:#}"
    );
    assert!(findings.iter().all(|f| f["check"] != "drops-unexplained"));
}

#[test]
fn scan_with_drops_on_a_healthy_dual_stack_lab_under_traffic_is_healthy() {
    let mut lab = Lab::build(LabSpec::calico(2)).expect("building lab");
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let (code, json) = scan_with_drops_under_traffic(&mut lab, "node1", "2s", |lab| {
        let _ = lab.traffic_matrix(5);
        let _ = lab.traffic_v6("node1", "node2", 5);
        let _ = lab.traffic_v6("node2", "node1", 5);
    });
    assert_eq!(code, 0, "{json:#}");
    assert!(json["findings"].as_array().unwrap().is_empty(), "{json:#}");
    let drops = &json["drops"];
    assert!(drops["peers"].as_object().unwrap().is_empty(), "{drops:#}");
    // Multicast the devices have no FDB entry for (listener reports) is control, not loss.
    for (device, d) in drops["devices"].as_object().unwrap() {
        assert_eq!(d["data"]["packets"], 0, "{device}: {drops:#}");
    }
}
