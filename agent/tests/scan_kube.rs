//! `watchdog scan --datastore kubernetes` end to end: the lab's real dataplanes (netns, needs
//! root) checked against the fake API server serving the lab's cluster as Nodes, IPAMBlocks
//! and BlockAffinities, through the real kube client.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, process::Command};

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
        report.findings.extend(stale_findings(snap, lab.device()));
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
