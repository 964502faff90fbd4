//! The Kubernetes datastore against the fake API server: real kube client, real HTTP, real
//! watch streams. No root needed: `cargo test -p watchdog-lab --test kubernetes`.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    desired::kubernetes::{
        stale_findings, EventOutcome, KubeProfile, KubeSnapshot, KubeSource, KubeSourceConfig,
        CONDITION_TYPE,
    },
    model::{CheckId, Finding, MacAddr, Severity},
};
use serde_json::{json, Value};
use tokio::sync::watch;
use watchdog_lab::fake_apiserver::{FakeApiServer, FakeConfig, Res};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn calico_node(name: &str, vtep: &str, addr: &str) -> Value {
    json!({
        "metadata": {"name": name, "annotations": {
            "projectcalico.org/IPv4VXLANTunnelAddr": vtep,
            "projectcalico.org/IPv4Address": addr,
            "node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                   "images": [{"names": ["registry/some-image:1"], "sizeBytes": 1234}]}
    })
}

fn block(name: &str, cidr: &str, host: &str, allocations: Value, attributes: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "cidr": cidr, "affinity": format!("host:{host}"), "deleted": false, "strictAffinity": false,
        "allocations": allocations, "attributes": attributes, "unallocated": []}})
}

fn affinity(node: &str, cidr: &str) -> Value {
    json!({"metadata": {"name": format!("{node}-{}", cidr.replace(['.', '/'], "-"))},
           "spec": {"node": node, "cidr": cidr, "state": "confirmed", "deleted": "false"}})
}

/// Three Calico nodes like the incident's cluster; k8s01 borrowed 10.1.235.130 from k8s03.
fn seed_calico(server: &FakeApiServer) {
    server.put(
        Res::Nodes,
        calico_node("k8s01", "10.1.73.0", "192.168.77.1/24"),
    );
    server.put(
        Res::Nodes,
        calico_node("k8s02", "10.1.45.64", "192.168.77.2/24"),
    );
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.133", "192.168.77.3/24"),
    );
    server.put(
        Res::IpamBlocks,
        block(
            "10-1-73-0-26",
            "10.1.73.0/26",
            "k8s01",
            json!([0]),
            json!([{"handle_id": "vxlan-tunnel-addr-k8s01", "secondary": {"node": "k8s01"}}]),
        ),
    );
    server.put(
        Res::IpamBlocks,
        block(
            "10-1-45-64-26",
            "10.1.45.64/26",
            "k8s02",
            json!([]),
            json!([]),
        ),
    );
    server.put(Res::IpamBlocks, block("10-1-235-128-26", "10.1.235.128/26", "k8s03",
        json!([null, null, 0, null, null, 1]),
        json!([{"handle_id": "k8s-pod-network.abc", "secondary": {"node": "k8s01", "pod": "p1"}},
               {"handle_id": "vxlan-tunnel-addr-k8s03", "secondary": {"node": "k8s03"}}])));
    server.put(
        Res::IpamBlocks,
        block(
            "10-1-235-192-26",
            "10.1.235.192/26",
            "k8s03",
            json!([]),
            json!([]),
        ),
    );
    server.put(Res::BlockAffinities, affinity("k8s03", "10.1.235.128/26"));
}

async fn start(apis: &[&str]) -> (FakeApiServer, KubeSourceConfig) {
    let server = FakeApiServer::start(FakeConfig {
        calico_apis: apis.iter().map(|s| s.to_string()).collect(),
        bookmark_interval: Duration::from_millis(300),
        ..FakeConfig::default()
    })
    .await;
    let cfg = KubeSourceConfig {
        kubeconfig: Some(server.write_kubeconfig()),
        node_name: "k8s01".into(),
        relist_interval: Duration::from_secs(60),
        stale_after: Duration::from_secs(60),
        watch_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(2),
        relist_grace: Duration::from_millis(200),
        retry_max: Duration::from_millis(400),
        debounce: Duration::from_millis(20),
        ..Default::default()
    };
    (server, cfg)
}

/// Waits until `pred` holds for the current snapshot, or panics after `limit`.
async fn wait_for(
    rx: &mut watch::Receiver<KubeSnapshot>,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&KubeSnapshot) -> bool,
) -> KubeSnapshot {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        {
            let snap = rx.borrow_and_update();
            if pred(&snap) {
                return snap.clone();
            }
        }
        // Ages and staleness also change without an announcement: poll as well.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            rx.changed(),
        )
        .await;
        if tokio::time::Instant::now() >= deadline {
            let snap = rx.borrow().clone();
            panic!(
                "timed out after {limit:?} waiting for {what}; last snapshot: {}\n{:?}",
                serde_json::to_string_pretty(&snap).unwrap(),
                snap.desired
            );
        }
    }
}

fn vtep_of(s: &KubeSnapshot, node: &str) -> Option<IpAddr> {
    s.desired.nodes.get(node).map(|n| n.vtep_ip)
}

#[tokio::test]
async fn initial_list_builds_the_desired_state() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    assert_eq!(src.ipam_api(), Some("crd.projectcalico.org/v1"));
    let d = src.list_once().await.unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    assert_eq!(d.local_node, "k8s01");
    assert_eq!(d.nodes.len(), 3);
    let k3 = &d.nodes["k8s03"];
    assert_eq!(k3.vtep_ip, ip("10.1.235.133"));
    assert_eq!(k3.node_ip, ip("192.168.77.3"));
    assert_eq!(k3.vtep_mac, MacAddr::derive_like_felix("k8s03"));
    assert!(k3.vtep_mac_derived);
    assert_eq!(
        k3.blocks,
        vec![
            "10.1.235.128/26".parse().unwrap(),
            "10.1.235.192/26".parse().unwrap()
        ]
    );
    assert_eq!(
        d.nodes["k8s01"].borrowed,
        vec!["10.1.235.130/32".parse().unwrap()]
    );
    assert!(
        k3.borrowed.is_empty(),
        "the block's own host does not borrow"
    );

    // The background mode converges on the same state.
    let mut rx = src.spawn();
    let snap = wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;
    assert_eq!(*snap.desired, d);
    assert!(!snap.stale, "{:?}", snap.stale_reason);
    // Nodes, IPAMBlocks, BlockAffinities, IPPools, FelixConfigurations.
    assert_eq!(snap.resources.len(), 5, "{:?}", snap.resources.keys());
    assert_eq!(snap.ipam_api.as_deref(), Some("crd.projectcalico.org/v1"));
}

/// IPPools and FelixConfigurations are watched like the rest: a pool that takes a block off
/// VXLAN, and a node-level VNI override, reach the desired state within a second; an install
/// that does not serve them says so and assumes what the config keys say.
#[tokio::test]
async fn pools_and_felix_configuration_are_watched() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    server.put(
        Res::IpPools,
        json!({"metadata": {"name": "default-ipv4-ippool"},
               "spec": {"cidr": "10.1.0.0/16", "vxlanMode": "Always", "ipipMode": "Never"}}),
    );
    server.put(
        Res::FelixConfigurations,
        json!({"metadata": {"name": "default"}, "spec": {"vxlanVNI": 1, "vxlanPort": 8472}}),
    );
    let src = KubeSource::connect(cfg.clone()).await.unwrap();
    let mut rx = src.spawn();
    let snap = wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;
    let c = &snap.desired.cluster;
    assert!(c.pools_known);
    assert_eq!(
        (c.felix.vxlan_vni, c.felix.vxlan_port),
        (Some(1), Some(8472))
    );
    assert_eq!(snap.desired.nodes["k8s03"].blocks.len(), 2);

    let ipip: ipnet::IpNet = "10.1.235.192/26".parse().unwrap();
    server.put(
        Res::IpPools,
        json!({"metadata": {"name": "ipip"},
               "spec": {"cidr": ipip.to_string(), "vxlanMode": "Never", "ipipMode": "Always"}}),
    );
    server.put(
        Res::FelixConfigurations,
        json!({"metadata": {"name": "node.k8s01"}, "spec": {"vxlanVNI": 7}}),
    );
    let snap = wait_for(
        &mut rx,
        Duration::from_secs(1),
        "the pool and the override",
        |s| s.desired.off_overlay == [ipip] && s.desired.cluster.felix.vxlan_vni == Some(7),
    )
    .await;
    assert_eq!(snap.desired.nodes["k8s03"].blocks.len(), 1);
    assert_eq!(snap.desired.cluster.felix.vxlan_port, Some(8472));

    // An install without Calico's configuration CRDs.
    let server = FakeApiServer::start(FakeConfig {
        calico_config: false,
        ..FakeConfig::default()
    })
    .await;
    seed_calico(&server);
    let cfg = KubeSourceConfig {
        kubeconfig: Some(server.write_kubeconfig()),
        ..cfg
    };
    let d = KubeSource::connect(cfg)
        .await
        .unwrap()
        .list_once()
        .await
        .unwrap();
    assert!(!d.cluster.pools_known);
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let notes = d.cluster.notes.join("\n");
    assert!(
        notes.contains("ippools: not served") && notes.contains("every block is taken as VXLAN"),
        "{notes}"
    );
    assert!(notes.contains("felixconfigurations: not served"), "{notes}");
}

#[tokio::test]
async fn vtep_move_is_seen_within_a_second() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    let mut rx = src.spawn();
    wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;
    let t = Instant::now();
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.140", "192.168.77.3/24"),
    );
    wait_for(&mut rx, Duration::from_secs(1), "the new VTEP", |s| {
        vtep_of(s, "k8s03") == Some(ip("10.1.235.140"))
    })
    .await;
    assert!(t.elapsed() < Duration::from_secs(1));
    // A new block arrives the same way.
    server.put(
        Res::IpamBlocks,
        block(
            "10-1-236-0-26",
            "10.1.236.0/26",
            "k8s02",
            json!([]),
            json!([]),
        ),
    );
    wait_for(&mut rx, Duration::from_secs(1), "the new block", |s| {
        s.desired.nodes["k8s02"].blocks.len() == 2
    })
    .await;
    // And a deleted node disappears.
    server.delete(Res::Nodes, "k8s02");
    let snap = wait_for(&mut rx, Duration::from_secs(1), "the deletion", |s| {
        !s.desired.nodes.contains_key("k8s02")
    })
    .await;
    assert_eq!(snap.relist_mismatches, 0);
    assert!(snap.resources["nodes"].last_event.is_some());
}

#[tokio::test]
async fn silent_watch_is_caught_by_the_relist_and_flagged_stale() {
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.relist_interval = Duration::from_millis(1500);
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    let mut rx = src.spawn();
    wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;

    // The incident: the watch stays open, the VTEP moves, no event ever arrives.
    server.set_silent_watch(true);
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.140", "192.168.77.3/24"),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        vtep_of(&rx.borrow(), "k8s03"),
        Some(ip("10.1.235.133")),
        "a silent watch must not deliver the change (else this test proves nothing)"
    );
    let snap = wait_for(
        &mut rx,
        Duration::from_secs(4),
        "the relist to catch the missed event",
        |s| s.relist_mismatches > 0,
    )
    .await;
    assert!(snap.stale, "a missed event must flag the datastore stale");
    let reason = snap.stale_reason.clone().unwrap();
    assert!(
        reason.contains("missed events") && reason.contains("k8s03"),
        "{reason}"
    );
    assert_eq!(
        vtep_of(&snap, "k8s03"),
        Some(ip("10.1.235.140")),
        "cache corrected by the relist"
    );
    assert_eq!(snap.resources["nodes"].relist_mismatches, 1);
    let findings = stale_findings(&snap, "vxlan.calico");
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].check, CheckId::DatastoreStale);
    let m = &findings[0].message;
    assert!(
        m.contains("nodes: the watch missed events (relist found 1 difference(s): k8s03 changed)")
            && m.contains("checks run against the relisted state"),
        "{m}"
    );

    // Once the watch works again, a clean relist clears the flag.
    server.set_silent_watch(false);
    let snap = wait_for(&mut rx, Duration::from_secs(5), "a clean relist", |s| {
        !s.stale
    })
    .await;
    assert!(snap.resources["nodes"].mismatch.is_none());
    assert_eq!(snap.relist_mismatches, 1, "the counter keeps history");
}

#[tokio::test]
async fn dead_watch_stream_is_dropped_and_reestablished() {
    // A stream that neither closes at its timeout nor delivers anything (not even bookmarks)
    // is dropped by the client after watch_timeout + 5 s, without waiting for a relist.
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.watch_timeout = Duration::from_secs(1);
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    server.set_silent_watch(true);
    server.set_ignore_watch_timeout(true);
    let mut rx = src.spawn();
    wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;
    let started = server.watches_started();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        server.watches_started(),
        started,
        "no reconnect before the idle limit"
    );
    let snap = wait_for(
        &mut rx,
        Duration::from_secs(4),
        "the idle stream to be dropped",
        |s| s.resources["nodes"].watch_restarts >= 1,
    )
    .await;
    assert!(server.watches_started() > started);
    assert!(!snap.stale, "a quiet but reachable server is not stale");
}

#[tokio::test]
async fn gone_410_relists_and_recovers() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    let mut rx = src.spawn();
    wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;
    let lists_before = server.lists_served();
    server.expire_history();
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.150", "192.168.77.3/24"),
    );
    let snap = wait_for(&mut rx, Duration::from_secs(3), "recovery after 410", |s| {
        vtep_of(s, "k8s03") == Some(ip("10.1.235.150"))
    })
    .await;
    assert!(
        snap.resources["nodes"].gone >= 1,
        "{:?}",
        snap.resources["nodes"]
    );
    assert!(
        server.lists_served() > lists_before,
        "410 must trigger a relist"
    );
    assert!(!snap.stale);
    // And the new watch works: a later change arrives by event.
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.151", "192.168.77.3/24"),
    );
    wait_for(
        &mut rx,
        Duration::from_secs(1),
        "event after recovery",
        |s| vtep_of(s, "k8s03") == Some(ip("10.1.235.151")),
    )
    .await;
}

#[tokio::test]
async fn server_down_keeps_last_state_goes_stale_and_recovers() {
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.stale_after = Duration::from_secs(2);
    cfg.request_timeout = Duration::from_secs(1);
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    let mut rx = src.spawn();
    let good = wait_for(&mut rx, Duration::from_secs(5), "initial sync", |s| {
        s.synced
    })
    .await;

    server.set_down(true);
    tokio::time::sleep(Duration::from_millis(800)).await;
    {
        let snap = rx.borrow();
        assert_eq!(
            snap.desired, good.desired,
            "last good state kept while the API is down"
        );
        assert!(!snap.stale, "not stale before stale_after");
    }
    let snap = wait_for(
        &mut rx,
        Duration::from_secs(4),
        "stale after stale_after",
        |s| s.stale,
    )
    .await;
    assert!(
        snap.stale_reason.as_deref().unwrap().contains("no contact"),
        "{:?}",
        snap.stale_reason
    );
    assert_eq!(snap.desired, good.desired);
    assert!(snap.last_event_age(std::time::SystemTime::now()).unwrap() >= Duration::from_secs(2));
    let f = stale_findings(&snap, "vxlan.calico");
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].severity, Severity::Warning);
    let m = &f[0].message;
    assert!(
        m.starts_with("datastore kubernetes:http://127.0.0.1:")
            && m.contains("no contact with the API server for")
            && m.contains("API server unreachable")
            && m.contains("checks run against the last good state (3 nodes)"),
        "{m}"
    );

    server.set_down(false);
    server.put(
        Res::Nodes,
        calico_node("k8s03", "10.1.235.160", "192.168.77.3/24"),
    );
    let snap = wait_for(&mut rx, Duration::from_secs(5), "recovery", |s| {
        !s.stale && vtep_of(s, "k8s03") == Some(ip("10.1.235.160"))
    })
    .await;
    assert!(stale_findings(&snap, "vxlan.calico").is_empty());
    assert!(
        snap.resources.values().all(|h| h.last_error.is_none()),
        "{:?}",
        snap.resources
    );
}

#[tokio::test]
async fn connect_retrying_waits_for_the_api_server() {
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.retry_max = Duration::from_millis(200);
    seed_calico(&server);
    server.set_down(true);
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = errors.clone();
    let task = tokio::spawn(KubeSource::connect_retrying(cfg, move |e| {
        seen.lock().unwrap().push(e.to_string())
    }));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !task.is_finished(),
        "must not give up while the server is down"
    );
    server.set_down(false);
    let src = tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("connected once the server is back")
        .unwrap();
    assert_eq!(src.ipam_api(), Some("crd.projectcalico.org/v1"));
    let errors = errors.lock().unwrap();
    assert!(errors.len() >= 2, "{errors:?}");
    assert!(errors[0].contains("API server unreachable"), "{errors:?}");
}

#[tokio::test]
async fn unavailable_server_is_an_error_not_a_hang() {
    // kube retries 503 silently; the source bounds every call by request_timeout.
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.request_timeout = Duration::from_secs(1);
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    server.set_unavailable(true);
    let t = Instant::now();
    let err = src.list_once().await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.to_string().contains("listing nodes"), "{err}");
}

#[tokio::test]
async fn v3_and_v1_discovery_both_work() {
    for (apis, expect) in [
        (&["projectcalico.org/v3"][..], "projectcalico.org/v3"),
        (
            &["crd.projectcalico.org/v1"][..],
            "crd.projectcalico.org/v1",
        ),
        (
            &["crd.projectcalico.org/v1", "projectcalico.org/v3"][..],
            "projectcalico.org/v3",
        ),
    ] {
        let (server, cfg) = start(apis).await;
        seed_calico(&server);
        let src = KubeSource::connect(cfg).await.unwrap();
        assert_eq!(src.ipam_api(), Some(expect), "serving {apis:?}");
        let d = src.list_once().await.unwrap();
        assert_eq!(d.nodes["k8s03"].blocks.len(), 2, "serving {apis:?}");
        assert!(d.problems.is_empty());
    }
    // Neither served: a clear error, not an empty cluster.
    let (_server, cfg) = start(&[]).await;
    let err = KubeSource::connect(cfg).await.unwrap_err();
    assert!(err.to_string().contains("no Calico IPAM API"), "{err}");
}

#[tokio::test]
async fn flannel_profile_reads_flannel_annotations() {
    let (server, mut cfg) = start(&[]).await;
    cfg.profile = KubeProfile::Flannel;
    for (i, mac) in [(1, "aa:bb:cc:dd:ee:01"), (2, "aa:bb:cc:dd:ee:02")] {
        server.put(
            Res::Nodes,
            json!({"metadata": {"name": format!("f{i}"), "annotations": {
            "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/public-ip": format!("192.168.88.{i}")}},
            "spec": {"podCIDR": format!("10.244.{i}.0/24")}}),
        );
    }
    cfg.node_name = "f1".into();
    let src = KubeSource::connect(cfg).await.unwrap();
    assert_eq!(src.ipam_api(), None);
    let d = src.list_once().await.unwrap();
    assert!(d.problems.is_empty(), "{:?}", d.problems);
    let f2 = &d.nodes["f2"];
    assert_eq!(f2.vtep_ip, ip("10.244.2.0"));
    assert_eq!(f2.node_ip, ip("192.168.88.2"));
    assert_eq!(f2.vtep_mac.to_string(), "aa:bb:cc:dd:ee:02");
    assert_eq!(f2.blocks, vec!["10.244.2.0/24".parse().unwrap()]);
    let mut rx = src.spawn();
    let snap = wait_for(&mut rx, Duration::from_secs(5), "flannel sync", |s| {
        s.synced
    })
    .await;
    assert_eq!(*snap.desired, d);
    assert_eq!(snap.resources.len(), 1, "flannel watches nodes only");
}

#[tokio::test]
async fn malformed_annotation_is_a_problem_not_a_crash() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    server.put(
        Res::Nodes,
        calico_node("k8s02", "10.1.45.999", "192.168.77.2/24"),
    );
    let src = KubeSource::connect(cfg).await.unwrap();
    let d = src.list_once().await.unwrap();
    assert!(
        !d.nodes.contains_key("k8s02"),
        "a node with a bad VTEP is skipped"
    );
    assert!(d.nodes.contains_key("k8s03"));
    assert_eq!(d.problems.len(), 1, "{:?}", d.problems);
    let p = &d.problems[0];
    assert_eq!(p.object, "Node/k8s02");
    assert_eq!(p.node.as_deref(), Some("k8s02"));
    assert_eq!(
        p.field,
        "metadata.annotations[projectcalico.org/IPv4VXLANTunnelAddr]"
    );
    assert!(p.message.contains("10.1.45.999"), "{}", p.message);

    // In watch mode a fix clears the problem.
    let mut rx = src.spawn();
    wait_for(&mut rx, Duration::from_secs(5), "sync", |s| {
        s.synced && s.desired.problems.len() == 1
    })
    .await;
    server.put(
        Res::Nodes,
        calico_node("k8s02", "10.1.45.64", "192.168.77.2/24"),
    );
    wait_for(&mut rx, Duration::from_secs(1), "the fix", |s| {
        s.desired.problems.is_empty() && s.desired.nodes.contains_key("k8s02")
    })
    .await;
}

#[tokio::test]
async fn condition_patch_and_event_post_reach_the_server() {
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.publish_condition = true;
    cfg.publish_events = true;
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();

    assert!(src
        .publish_condition(false, "GatewayWrongVtep", "k8s03 routed via 10.1.235.128")
        .await
        .unwrap());
    let reqs = server.requests();
    let patch = reqs.iter().find(|r| r.method == "PATCH").expect("a PATCH");
    assert_eq!(patch.path, "/api/v1/nodes/k8s01/status");
    assert!(patch
        .content_type
        .as_deref()
        .unwrap()
        .contains("strategic-merge-patch"));
    let c = &patch.body["status"]["conditions"][0];
    assert_eq!(c["type"], CONDITION_TYPE);
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "GatewayWrongVtep");
    assert_eq!(c["message"], "k8s03 routed via 10.1.235.128");
    assert!(c["lastTransitionTime"].is_string() && c["lastHeartbeatTime"].is_string());
    // The kubelet's Ready condition survives (merge by type).
    let node = server.get(Res::Nodes, "k8s01").unwrap();
    let types: Vec<&str> = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, vec!["Ready", CONDITION_TYPE]);
    // Unchanged: not re-sent.
    assert!(!src
        .publish_condition(false, "GatewayWrongVtep", "k8s03 routed via 10.1.235.128")
        .await
        .unwrap());
    // Changed: sent.
    assert!(src
        .publish_condition(true, "Healthy", "all peers verified")
        .await
        .unwrap());
    let node = server.get(Res::Nodes, "k8s01").unwrap();
    assert_eq!(node["status"]["conditions"][1]["status"], "True");

    let mut f = Finding::new(
        CheckId::GatewayWrongVtep,
        Severity::Critical,
        "vxlan.calico",
        "route to k8s03's block 10.1.235.128/26 goes via 10.1.235.128, not its VTEP 10.1.235.133"
            .into(),
    );
    f.peer_node = Some("k8s03".into());
    f.route = Some("10.1.235.128/26".into());
    let EventOutcome::Created(name) = src.publish_event(&f).await.unwrap() else {
        panic!("expected a created event");
    };
    let reqs = server.requests();
    let post = reqs.iter().find(|r| r.method == "POST").expect("a POST");
    assert_eq!(post.path, "/api/v1/namespaces/default/events");
    let b = &post.body;
    assert_eq!(b["metadata"]["name"], name.as_str());
    assert_eq!(b["involvedObject"]["kind"], "Node");
    assert_eq!(b["involvedObject"]["name"], "k8s01");
    assert_eq!(b["reason"], "GatewayWrongVtep");
    assert_eq!(b["type"], "Warning");
    assert_eq!(b["count"], 1);
    assert_eq!(b["source"]["component"], "dataplane-watchdog");
    assert!(b["message"].as_str().unwrap().contains("10.1.235.133"));
    // A repeat is aggregated, not a new Event; a warning is not published at all.
    assert!(matches!(
        src.publish_event(&f).await.unwrap(),
        EventOutcome::Aggregated { count: 2, .. }
    ));
    let warn = Finding::new(
        CheckId::RouteMissing,
        Severity::Warning,
        "vxlan.calico",
        "x".into(),
    );
    assert_eq!(
        src.publish_event(&warn).await.unwrap(),
        EventOutcome::NotCritical
    );
    assert_eq!(
        server
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count(),
        1
    );

    // With no update interval a repeat patches the Event's count; the per-minute budget
    // stops a flood of distinct findings.
    let (server, mut cfg) = start(&["crd.projectcalico.org/v1"]).await;
    cfg.publish_events = true;
    cfg.event_update_interval = Duration::ZERO;
    cfg.events_per_minute = 1;
    seed_calico(&server);
    let src = KubeSource::connect(cfg).await.unwrap();
    let EventOutcome::Created(name) = src.publish_event(&f).await.unwrap() else {
        panic!("expected a created event");
    };
    assert_eq!(
        src.publish_event(&f).await.unwrap(),
        EventOutcome::Updated {
            name: name.clone(),
            count: 2
        }
    );
    let reqs = server.requests();
    let patch = reqs
        .iter()
        .find(|r| r.method == "PATCH")
        .expect("an Event PATCH");
    assert_eq!(
        patch.path,
        format!("/api/v1/namespaces/default/events/{name}")
    );
    assert_eq!(patch.body["count"], 2);
    assert_eq!(
        server.get(Res::Events, &format!("default/{name}")).unwrap()["count"],
        2
    );
    let mut other = f.clone();
    other.peer_node = Some("k8s02".into());
    assert_eq!(
        src.publish_event(&other).await.unwrap(),
        EventOutcome::RateLimited
    );
}

/// 5,000 nodes with a block each: the initial sync and the rebuild after one change stay
/// quick. Ignored by default (seconds in debug builds); run with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn five_thousand_nodes() {
    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    for i in 0..5000u32 {
        let (a, b) = (i / 250, (i % 250) + 1);
        let name = format!("n{i:04}");
        server.put(
            Res::Nodes,
            calico_node(
                &name,
                &format!("10.{}.{}.0", 100 + a, b),
                &format!("192.168.{a}.{b}/16"),
            ),
        );
        server.put(
            Res::IpamBlocks,
            block(&format!("b{i}"), &format!("10.{}.{}.0/26", 100 + a, b), &name, json!([0]),
                json!([{"handle_id": format!("vxlan-tunnel-addr-{name}"), "secondary": {"node": name}}])),
        );
    }
    let src = KubeSource::connect(cfg).await.unwrap();
    let t = Instant::now();
    let mut rx = src.spawn();
    let snap = wait_for(
        &mut rx,
        Duration::from_secs(60),
        "sync of 5000 nodes",
        |s| s.synced,
    )
    .await;
    eprintln!(
        "initial sync of 5000 nodes + 5000 blocks: {:?}",
        t.elapsed()
    );
    assert_eq!(snap.desired.nodes.len(), 5000);
    let t = Instant::now();
    server.put(
        Res::Nodes,
        calico_node("n4999", "10.250.0.1", "192.168.19.250/16"),
    );
    wait_for(
        &mut rx,
        Duration::from_secs(3),
        "one change among 5000",
        |s| vtep_of(s, "n4999") == Some(ip("10.250.0.1")),
    )
    .await;
    eprintln!("one change visible after {:?}", t.elapsed());
}

/// The kubelet watch-stall check against the fake API server's pods list (field selector)
/// and node proxy: healthy → nothing; the incident's dead kubelet watch → the new pod is
/// `kubelet-watch-stalled` past the threshold and the deleted one `pod-stuck-terminating`,
/// both cleared when the kubelet catches up; a proxy that answers 403, 503 or not at all →
/// `kubelet-unverifiable` and never a `kubelet-*` verdict; hundreds of pods are fine.
#[tokio::test]
async fn kubelet_watch_stall_is_caught_and_proxy_errors_are_not_verdicts() {
    use dataplane_watchdog::model::CheckId;
    use watchdog_lab::kube_fixture::{deleted, pod};

    let (server, cfg) = start(&["crd.projectcalico.org/v1"]).await;
    seed_calico(&server);
    let node = "k8s03";
    let threshold = Duration::from_secs(120);
    server.put(Res::Pods, pod("kube-system", "calico-node-old", node, 3600));
    server.put(
        Res::Pods,
        pod("argocd", "argocd-redis-ha-server-2", node, 3600),
    );
    server.put(Res::Pods, pod("default", "elsewhere", "k8s02", 3600));
    let src = KubeSource::connect(KubeSourceConfig {
        node_name: node.into(),
        ..cfg.clone()
    })
    .await
    .unwrap();
    let checks = |f: &[Finding]| f.iter().map(|f| f.check).collect::<Vec<_>>();
    assert!(src.kubelet_check(threshold).await.is_empty());
    // Only this node's pods were asked for.
    assert_eq!(src.node_pods(node).await.unwrap().len(), 2);

    // The kubelet's watch dies; the scheduler binds a new pod and a pod is deleted.
    server.set_kubelet_stalled(node, true);
    server.put(
        Res::Pods,
        pod("kube-system", "calico-node-sqfcs", node, 2100),
    );
    server.put(Res::Pods, pod("kube-system", "just-bound", node, 5));
    server.put(
        Res::Pods,
        deleted(pod("argocd", "argocd-redis-ha-server-2", node, 3600), 2640),
    );
    let found = src.kubelet_check(threshold).await;
    assert_eq!(
        checks(&found),
        [CheckId::KubeletWatchStalled, CheckId::PodStuckTerminating],
        "{found:#?}"
    );
    assert!(
        found[0].message.contains("kube-system/calico-node-sqfcs"),
        "{}",
        found[0].message
    );
    assert!(
        !found[0].message.contains("just-bound"),
        "{}",
        found[0].message
    );
    assert!(found[1].message.contains("argocd/argocd-redis-ha-server-2"));
    // Restarting the kubelet (after the datastore): it knows everything again. The deleted
    // pod is then finished by the kubelet and gone from the API.
    server.set_kubelet_stalled(node, false);
    server.delete(Res::Pods, "argocd/argocd-redis-ha-server-2");
    assert!(src.kubelet_check(threshold).await.is_empty());

    for code in [403, 503] {
        server.set_kubelet_stalled(node, true);
        server.put(Res::Pods, pod("default", "new", node, 600));
        server.set_kubelet_proxy_error(node, Some(code));
        let found = src.kubelet_check(threshold).await;
        assert_eq!(
            checks(&found),
            [CheckId::KubeletUnverifiable],
            "{code}: {found:#?}"
        );
        assert!(
            found[0].message.contains("nodes/proxy"),
            "{}",
            found[0].message
        );
        server.set_kubelet_proxy_error(node, None);
        server.set_kubelet_stalled(node, false);
    }
    // An API server that does not answer in time.
    server.set_delay(cfg.request_timeout + Duration::from_millis(500));
    let found = src.kubelet_check(threshold).await;
    assert_eq!(checks(&found), [CheckId::KubeletUnverifiable], "{found:#?}");
    assert!(
        found[0].message.contains("timed out"),
        "{}",
        found[0].message
    );
    server.set_delay(Duration::ZERO);

    // A busy node: 400 pods, every one known.
    for i in 0..400 {
        server.put(Res::Pods, pod("load", &format!("p{i}"), node, 900));
    }
    let started = Instant::now();
    assert!(src.kubelet_check(threshold).await.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "400 pods took {:?}, past the default interval",
        started.elapsed()
    );
}
