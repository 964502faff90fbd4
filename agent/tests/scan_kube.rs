//! `watchdog scan --datastore kubernetes` end to end: the lab's real dataplanes (netns, needs
//! root) checked against the fake API server serving the lab's cluster as Nodes, IPAMBlocks
//! and BlockAffinities, through the real kube client.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, process::Command, sync::Arc};

use serde_json::Value;
use watchdog_lab::{
    fake_apiserver::{FakeApiServer, FakeConfig, Res},
    kube_fixture, Fault, Lab, LabSpec,
};

const WATCHDOG: &str = env!("CARGO_BIN_EXE_watchdog");

struct Scan {
    code: i32,
    json: Value,
    stderr: String,
}

impl Scan {
    fn findings(&self) -> Vec<Value> {
        self.json["findings"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

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
}

fn run(args: &[&str], config: &Path, netns: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(WATCHDOG);
    cmd.args(["scan", "--json", "--config"]).arg(config);
    if let Some(n) = netns {
        cmd.arg("--netns").arg(n);
    }
    let out = cmd.args(args).output().expect("running watchdog scan");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `watchdog scan --json --datastore kubernetes --kubeconfig K --netns <node>` with a config
/// whose datastore is the file source, so the flags alone select Kubernetes.
fn scan(lab: &mut Lab, node: &str, kubeconfig: &Path) -> Scan {
    let config = lab.write_agent_config(node).expect("writing agent config");
    let kc = kubeconfig.to_str().unwrap();
    let (code, stdout, stderr) = run(
        &["--datastore", "kubernetes", "--kubeconfig", kc],
        &config,
        Some(&lab.netns_path(node)),
    );
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("scan printed no JSON ({e}), exit {code}\nstdout: {stdout}\nstderr: {stderr}")
    });
    Scan { code, json, stderr }
}

async fn serve(lab: &Lab) -> (FakeApiServer, std::path::PathBuf) {
    let server = FakeApiServer::start(FakeConfig::default()).await;
    kube_fixture::populate_fake_apiserver(lab, &server);
    let kubeconfig = server.write_kubeconfig();
    (server, kubeconfig)
}

fn assert_all_healthy(lab: &mut Lab, kubeconfig: &Path, context: &str) {
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    for node in names {
        let s = scan(lab, &node, kubeconfig);
        assert!(
            s.findings().is_empty() && s.code == 0,
            "{context}: {node} must be healthy, got exit {} and {:#?}\nstderr: {}",
            s.code,
            s.findings(),
            s.stderr
        );
        assert!(s.json["routes_checked"].as_u64().unwrap() > 0);
        let source = s.json["datastore"]["source"].as_str().unwrap();
        assert!(
            source.starts_with("kubernetes:http://127.0.0.1:"),
            "{source}"
        );
        assert_eq!(
            s.json["datastore"]["nodes"].as_u64(),
            Some(lab.nodes().len() as u64)
        );
    }
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, Option<String>)> {
    items
        .iter()
        .map(|(c, p)| (c.to_string(), Some(p.to_string())))
        .collect()
}

// The fake server runs on the runtime's other worker while the test blocks on the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_healthy_then_a_vtep_move_in_the_api_is_seen() {
    // node2 borrowed 10.1.1.10 from node1's block: the /32 must come from the IPAMBlock.
    let mut lab =
        Lab::build(LabSpec::calico(3).with_borrowed("node2", Ipv4Addr::new(10, 1, 1, 10)))
            .expect("building lab (needs root)");
    let (server, kubeconfig) = serve(&lab).await;
    assert_all_healthy(&mut lab, &kubeconfig, "healthy");

    // calico-node on node3 re-registers with a new VTEP; node1's kernel still has the old one.
    let new_vtep = Ipv4Addr::new(10, 1, 3, 5);
    kube_fixture::move_vtep(&lab, &server, "node3", new_vtep).unwrap();
    let s = scan(&mut lab, "node1", &kubeconfig);
    assert_eq!(
        s.checks(),
        set(&[
            ("gateway-wrong-vtep", "node3"),
            ("neighbour-unresolved", "node3")
        ]),
        "{:#?}",
        s.findings()
    );
    assert_eq!(s.code, 2);
    let wrong = s
        .findings()
        .into_iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .unwrap();
    assert_eq!(wrong["gateway"], "10.1.3.0");
    assert_eq!(wrong["expected_gateway"], new_vtep.to_string());

    kube_fixture::restore_node(&lab, &server, "node3");
    let s = scan(&mut lab, "node1", &kubeconfig);
    assert!(s.findings().is_empty(), "{:#?}", s.findings());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_expected_gateway_comes_from_the_annotation() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab (needs root)");
    let (_server, kubeconfig) = serve(&lab).await;
    assert_all_healthy(&mut lab, &kubeconfig, "incident cluster before the fault");

    lab.inject(Fault::incident("k8s01")).unwrap();
    let s = scan(&mut lab, "k8s01", &kubeconfig);
    assert_eq!(
        s.checks(),
        set(&[("gateway-wrong-vtep", "k8s03")]),
        "{:#?}",
        s.findings()
    );
    let f = &s.findings()[0];
    assert_eq!(f["gateway"], "10.1.235.128");
    assert_eq!(f["expected_gateway"], "10.1.235.133");
    assert_eq!(f["severity"], "critical");
    assert_eq!(s.code, 2);
    // k8s02 was not touched.
    let s = scan(&mut lab, "k8s02", &kubeconfig);
    assert!(s.findings().is_empty(), "{:#?}", s.findings());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flannel_profile_from_flannel_annotations() {
    let mut lab = Lab::build(LabSpec::flannel(3)).expect("building lab (needs root)");
    // flannel watches no IPAM objects: a server without Calico APIs must do.
    let server = FakeApiServer::start(FakeConfig {
        calico_apis: vec![],
        ..FakeConfig::default()
    })
    .await;
    kube_fixture::populate_fake_apiserver(&lab, &server);
    let kubeconfig = server.write_kubeconfig();
    assert_all_healthy(&mut lab, &kubeconfig, "flannel healthy");

    // The expected MAC comes from backend-data's VtepMAC: a wrong one in the kernel is caught.
    for fault in [
        Fault::neighbour_wrong_mac("node1", "node2"),
        Fault::fdb_removed("node1", "node2"),
    ] {
        let want = match &fault {
            Fault::NeighbourWrongMac { .. } => "neighbour-mac-mismatch",
            _ => "fdb-missing",
        };
        let injected = lab.inject(fault).unwrap();
        let s = scan(&mut lab, "node1", &kubeconfig);
        assert_eq!(s.checks(), set(&[(want, "node2")]), "{:#?}", s.findings());
        lab.restore(&injected).unwrap();
    }
}

/// A config for scans that fail before looking at the kernel.
fn offline_config(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "node_name = \"node1\"\n").unwrap();
    path
}

fn assert_one_line_exit_3(code: i32, stdout: &str, stderr: &str, want: &[&str]) {
    assert_eq!(code, 3, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line, got: {stderr}");
    for w in want {
        assert!(lines[0].contains(w), "missing {w:?} in: {}", lines[0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_problems_are_one_line_and_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let config = offline_config(&dir);

    // API server down.
    let server = FakeApiServer::start(FakeConfig::default()).await;
    let kubeconfig = server.write_kubeconfig();
    let kc = kubeconfig.to_str().unwrap().to_string();
    let args = ["--datastore", "kubernetes", "--kubeconfig", kc.as_str()];
    server.set_down(true);
    let (code, out, err) = run(&args, &config, None);
    assert_one_line_exit_3(
        code,
        &out,
        &err,
        &[
            "watchdog scan: datastore kubernetes",
            "API server unreachable",
        ],
    );

    // RBAC without `list nodes`.
    server.set_down(false);
    server.set_forbidden(Res::Nodes, true);
    let (code, out, err) = run(&args, &config, None);
    assert_one_line_exit_3(
        code,
        &out,
        &err,
        &[
            "listing nodes: forbidden by RBAC",
            "cannot list resource \"nodes\"",
            "systemd/rbac.yaml",
        ],
    );
    server.set_forbidden(Res::Nodes, false);
    server.set_forbidden(Res::IpamBlocks, true);
    let (code, out, err) = run(&args, &config, None);
    assert_one_line_exit_3(
        code,
        &out,
        &err,
        &[
            "listing ipamblocks: forbidden by RBAC",
            "crd.projectcalico.org",
        ],
    );

    // Calico profile, but the cluster serves no Calico IPAM API.
    let bare = FakeApiServer::start(FakeConfig {
        calico_apis: vec![],
        ..FakeConfig::default()
    })
    .await;
    let kc = bare.write_kubeconfig();
    let (code, out, err) = run(
        &[
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            kc.to_str().unwrap(),
        ],
        &config,
        None,
    );
    assert_one_line_exit_3(code, &out, &err, &["no Calico IPAM API found"]);

    // A kubeconfig that does not exist.
    let (code, out, err) = run(
        &[
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
        ],
        &config,
        None,
    );
    assert_one_line_exit_3(code, &out, &err, &["/nonexistent/kubeconfig"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_alone_selects_kubernetes() {
    let mut lab = Lab::build(LabSpec::calico(2)).expect("building lab (needs root)");
    let (_server, kubeconfig) = serve(&lab).await;
    let config = lab
        .write_agent_config_kubernetes("node1", &kubeconfig)
        .unwrap();
    let (code, stdout, stderr) = run(&[], &config, Some(&lab.netns_path("node1")));
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let json: Value = serde_json::from_str(&stdout).unwrap();
    assert!(json["datastore"]["source"]
        .as_str()
        .unwrap()
        .starts_with("kubernetes:"));
    assert_eq!(json["datastore"]["nodes"], 2);
}

/// The daemon's path without the daemon: list+watch in the background, the incident's silent
/// watch while k8s03's VTEP moves, the relist catching it, and the checks run on the corrected
/// desired state against node1's real kernel — plus the `datastore-stale` warning saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_watch_caught_by_relist_flips_the_checks() {
    use std::time::Duration;

    use dataplane_watchdog::{
        checks::{self, CheckInput, DeviceSpec},
        config::Config,
        desired::kubernetes::{stale_findings, KubeSource, KubeSourceConfig},
        model::CheckId,
        observe::{KernelObserver, NetlinkObserver},
    };

    let lab = Lab::build(LabSpec::calico(3)).expect("building lab (needs root)");
    let (server, kubeconfig) = serve(&lab).await;
    let mut config = Config::with_node_name("node1");
    config.datastore.kubeconfig = Some(kubeconfig);
    config.datastore.relist_interval = Duration::from_millis(1500);
    let cfg = KubeSourceConfig {
        relist_grace: Duration::from_millis(200),
        debounce: Duration::from_millis(20),
        ..KubeSourceConfig::from_config(&config)
    };
    let src = KubeSource::connect(cfg).await.unwrap();
    let mut rx = src.spawn();

    let observer = NetlinkObserver::new(Some(&lab.netns_path("node1"))).unwrap();
    let devices = vec![lab.device().to_string()];
    let specs: Vec<DeviceSpec> = devices.iter().map(|d| DeviceSpec::for_name(d)).collect();
    let evaluate = |snap: &dataplane_watchdog::desired::kubernetes::KubeSnapshot,
                    observed: &dataplane_watchdog::model::ObservedState| {
        let mut report = checks::evaluate(&CheckInput {
            devices: &specs,
            observed,
            desired: Some(&snap.desired),
            drops: None,
            explained_recently: None,
            datastore: None,
        });
        report
            .findings
            .extend(stale_findings(snap, lab.device()).into_iter().map(Arc::new));
        report
            .findings
            .iter()
            .map(|f| (f.check, f.peer_node.clone()))
            .collect::<BTreeSet<_>>()
    };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !rx.borrow().synced {
        assert!(tokio::time::Instant::now() < deadline, "no initial sync");
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    let observed = observer.snapshot(&devices).await.unwrap();
    assert!(
        evaluate(&rx.borrow(), &observed).is_empty(),
        "healthy cluster"
    );

    server.set_silent_watch(true);
    kube_fixture::move_vtep(&lab, &server, "node3", Ipv4Addr::new(10, 1, 3, 5)).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        evaluate(&rx.borrow(), &observed).is_empty(),
        "the silent watch hides the move (else this test proves nothing)"
    );

    // Within two relist periods the relist finds the difference.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while rx.borrow().relist_mismatches == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relist did not catch the silent watch"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
    }
    let snap = rx.borrow().clone();
    let found = evaluate(&snap, &observed);
    let node3 = Some("node3".to_string());
    assert_eq!(
        found,
        BTreeSet::from([
            (CheckId::GatewayWrongVtep, node3.clone()),
            (CheckId::NeighbourUnresolved, node3),
            (CheckId::DatastoreStale, None),
        ]),
    );
    let stale = stale_findings(&snap, lab.device());
    assert!(
        stale[0]
            .message
            .contains("relist found 1 difference(s): node3 changed"),
        "{}",
        stale[0].message
    );
}

/// `watchdog scan --json` with `config` (a file written here) against `kubeconfig`.
fn scan_config(lab: &mut Lab, node: &str, kubeconfig: &Path, strip: &[&str]) -> Scan {
    let mut text = kube_fixture::agent_config_toml_kubernetes(lab, node, kubeconfig);
    for s in strip {
        text = text.replace(s, "");
    }
    let path = std::env::temp_dir().join(format!("{}-{node}-shape.toml", lab.id()));
    std::fs::write(&path, text).unwrap();
    let (code, stdout, stderr) = run(&[], &path, Some(&lab.netns_path(node)));
    let _ = std::fs::remove_file(&path);
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("scan printed no JSON ({e}), exit {code}\nstdout: {stdout}\nstderr: {stderr}")
    });
    Scan { code, json, stderr }
}

fn notes(s: &Scan) -> String {
    s.json["datastore"]["notes"].to_string()
}

/// What the cluster itself says, read through both Calico API groups: a cluster migrated from
/// flannel (VNI 1, port 8472 in FelixConfiguration, none in the agent's config) with a VXLAN
/// pool, a no-encap pool and an IPIP pool, and a node without a VTEP that owns only IPIP
/// blocks. Healthy on every node with real traffic over VXLAN and natively; a block of a
/// deleted pool is not `route-missing`; RBAC that forbids the configuration degrades to the
/// config keys and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_pools_and_felix_configuration_are_read_from_the_api() {
    use ipnet::Ipv4Net;
    use watchdog_lab::UNDERLAY_IF;

    // Migrated from flannel: VNI 1, port 8472, and flannel's VTEP MACs kept as annotations.
    let mut spec = LabSpec::calico(3).with_vxlan(1, 8472);
    for n in &mut spec.nodes {
        n.mac = Some(watchdog_lab::Mac::flannel(&n.name));
    }
    let mut lab = Lab::build(spec).expect("building lab");
    let server = FakeApiServer::start(FakeConfig {
        calico_apis: vec![
            "projectcalico.org/v3".to_string(),
            "crd.projectcalico.org/v1".to_string(),
        ],
        ..FakeConfig::default()
    })
    .await;
    kube_fixture::populate_fake_apiserver(&lab, &server);
    let kubeconfig = server.write_kubeconfig();
    let nodes = lab.nodes().to_vec();
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);

    // node2 also owns a block of a no-encap pool: routed natively to its node IP.
    let plain: Ipv4Net = "10.200.2.0/26".parse().unwrap();
    let plain_pod = Ipv4Addr::new(10, 200, 2, 1);
    server.put(
        Res::IpPools,
        kube_fixture::ip_pool(
            "no-encap",
            "10.200.0.0/16".parse().unwrap(),
            "Never",
            "Never",
        ),
    );
    kube_fixture::put_block(&server, &n2.name, plain);
    lab.ip(
        &n2.name,
        &["addr", "add", &format!("{plain_pod}/32"), "dev", "lo"],
    )
    .unwrap();
    // node3 owns a block of an IPIP pool; "ipip-only" is a node of that pool without a VTEP.
    // This kernel has no IPIP, so a veth named like Felix's device carries the route.
    let ipip: Ipv4Net = "10.201.3.0/26".parse().unwrap();
    server.put(
        Res::IpPools,
        kube_fixture::ip_pool("ipip", "10.201.0.0/16".parse().unwrap(), "Never", "Always"),
    );
    kube_fixture::put_block(&server, &n3.name, ipip);
    kube_fixture::put_node_without_vtep(
        &server,
        "ipip-only",
        Ipv4Addr::new(192, 168, 99, 4),
        &["10.201.9.0/26".parse().unwrap()],
    );
    for n in [n1, n3] {
        lab.ip(
            &n.name,
            &[
                "link", "add", "tunl0", "type", "veth", "peer", "name", "tunl0p",
            ],
        )
        .unwrap();
        lab.ip(&n.name, &["link", "set", "tunl0", "up"]).unwrap();
    }
    for (n, peer) in [(n1, n2), (n3, n2)] {
        let via = peer.node_ip.to_string();
        lab.ip(
            &n.name,
            &[
                "route",
                "add",
                &plain.to_string(),
                "via",
                &via,
                "dev",
                UNDERLAY_IF,
                "proto",
                "80",
            ],
        )
        .unwrap();
    }
    let via3 = n3.node_ip.to_string();
    lab.ip(
        &n1.name,
        &[
            "route",
            "add",
            &ipip.to_string(),
            "via",
            &via3,
            "dev",
            "tunl0",
            "onlink",
            "proto",
            "80",
        ],
    )
    .unwrap();

    // The agent's config says nothing about VNI and port: FelixConfiguration does.
    let strip = ["vxlan_vni = 1\n", "vxlan_port = 8472\n"];
    for n in &nodes {
        let s = scan_config(&mut lab, &n.name, &kubeconfig, &strip);
        assert!(
            s.findings().is_empty() && s.code == 0,
            "{}: {:#?}\nnotes: {}\nstderr: {}",
            n.name,
            s.findings(),
            notes(&s),
            s.stderr
        );
        assert!(
            notes(&s).contains("FelixConfiguration/default"),
            "{}",
            notes(&s)
        );
    }
    for r in lab.traffic_matrix(3).unwrap() {
        assert!(r.all_delivered(), "over VXLAN: {r}");
    }
    // A neighbour entry with another MAC than the annotated one is found, on that node only.
    let injected = lab
        .inject(Fault::neighbour_wrong_mac(&n1.name, &n2.name))
        .unwrap();
    let s = scan_config(&mut lab, &n1.name, &kubeconfig, &strip);
    assert_eq!(
        s.checks(),
        set(&[("neighbour-mac-mismatch", &n2.name)]),
        "{:#?}",
        s.findings()
    );
    assert!(scan_config(&mut lab, &n3.name, &kubeconfig, &strip)
        .findings()
        .is_empty());
    lab.restore(&injected).unwrap();
    let src = n1.pods[0];
    let t = lab
        .traffic_flows(&n1.name, src, &n2.name, &[plain_pod], 3)
        .unwrap();
    assert!(t.all_delivered(), "no-encap pool, natively: {t}");

    // The IPIP pool is deleted while its blocks remain: Felix no longer routes them, and
    // neither the leftover route nor the missing VXLAN route is the agent's to judge.
    server.delete(Res::IpPools, "ipip");
    let s = scan_config(&mut lab, &n1.name, &kubeconfig, &strip);
    assert!(s.findings().is_empty(), "deleted pool: {:#?}", s.findings());

    // A VXLAN block left on tunl0 (an IPIP→VXLAN migration gone wrong) is still found.
    let first = n2.blocks[0].to_string();
    let via2 = n2.node_ip.to_string();
    lab.ip(
        &n1.name,
        &[
            "route", "replace", &first, "via", &via2, "dev", "tunl0", "onlink", "proto", "80",
        ],
    )
    .unwrap();
    let s = scan_config(&mut lab, &n1.name, &kubeconfig, &strip);
    assert_eq!(
        s.checks(),
        set(&[("route-wrong-device", &n2.name)]),
        "{:#?}",
        s.findings()
    );
    lab.ip(
        &n1.name,
        &[
            "route",
            "replace",
            &first,
            "via",
            &n2.vtep_ip.to_string(),
            "dev",
            lab.device(),
            "onlink",
        ],
    )
    .unwrap();

    // RBAC without felixconfigurations: the config keys apply, and the output says why.
    server.set_forbidden(Res::FelixConfigurations, true);
    let s = scan_config(&mut lab, &n1.name, &kubeconfig, &strip);
    assert!(notes(&s).contains("forbidden by RBAC"), "{}", notes(&s));
    assert_eq!(
        s.checks(),
        BTreeSet::from([("device-misconfigured".to_string(), None)]),
        "{:#?}",
        s.findings()
    );
    let s = scan_config(&mut lab, &n1.name, &kubeconfig, &[]);
    assert!(s.findings().is_empty(), "config keys: {:#?}", s.findings());
}

/// The real-cluster shapes of `scan_lab`, through the Kubernetes datastore: Calico 3.30's
/// VTEP host routes on every node, DirectRouting/CrossSubnet toward a same-subnet peer, and a
/// host name that is no node's (the node found by address). Zero findings, traffic flowing;
/// and the direct route moved off-link is still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_shapes_are_healthy_through_the_api_too() {
    let mut lab = Lab::build(LabSpec::calico(3)).expect("building lab");
    let (_server, kubeconfig) = serve(&lab).await;
    lab.add_vtep_host_routes().unwrap();
    lab.route_directly("node1", "node2").unwrap();
    assert_all_healthy(&mut lab, &kubeconfig, "VTEP host routes + DirectRouting");
    for r in lab.traffic_matrix(3).unwrap() {
        assert!(r.all_delivered(), "{r}");
    }
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    for node in &names {
        let s = scan_config(
            &mut lab,
            node,
            &kubeconfig,
            &[&format!("node_name = \"{node}\"\n")],
        );
        assert!(
            s.findings().is_empty() && s.json["node"] == node.as_str(),
            "{node} found by address: node {} {:#?}",
            s.json["node"],
            s.findings()
        );
    }
    // The direct route now points at an address that is not on the underlay's subnet.
    let block = lab.node("node2").blocks[0].to_string();
    lab.ip(
        "node1",
        &[
            "route",
            "replace",
            &block,
            "via",
            "10.99.0.2",
            "dev",
            "eth0",
            "onlink",
        ],
    )
    .unwrap();
    let s = scan(&mut lab, "node1", &kubeconfig);
    assert!(
        s.checks()
            .iter()
            .any(|(_, p)| p.as_deref() == Some("node2")),
        "{:#?}",
        s.findings()
    );
}

/// Dual stack through the API: the IPv6 annotations, an IPv6 pool and IPv6 IPAMBlocks give the
/// IPv6 overlay's expectations; a VTEP moved in the IPv6 annotation only is an IPv6 finding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calico_dual_stack_from_the_api_is_healthy_and_a_v6_vtep_move_is_seen_on_v6() {
    let mut lab = Lab::build(LabSpec::incident()).expect("building lab (needs root)");
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let (server, kubeconfig) = serve(&lab).await;
    assert_all_healthy(&mut lab, &kubeconfig, "dual stack");

    // calico-node on k8s03 re-registers its IPv6 VTEP elsewhere in its block.
    let mut node = server.get(Res::Nodes, "k8s03").expect("k8s03 in the API");
    let moved = "fd10:3::9";
    node["metadata"]["annotations"][kube_fixture::ANN_CALICO_VTEP_V6] = moved.into();
    server.put(Res::Nodes, node);
    let s = scan(&mut lab, "k8s01", &kubeconfig);
    assert_eq!(
        s.checks(),
        set(&[
            ("gateway-wrong-vtep", "k8s03"),
            ("neighbour-unresolved", "k8s03")
        ]),
        "{:#?}",
        s.findings()
    );
    assert!(s
        .findings()
        .iter()
        .all(|f| f["device"] == "vxlan-v6.calico"));
    let wrong = s
        .findings()
        .into_iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .unwrap();
    assert_eq!(wrong["expected_gateway"], moved);
}
