//! `watchdog run` with `[datastore] source = "kubernetes"` against the fake API server and a
//! real lab node: annotation changes reach /findings through the watch within 2 s, a silent
//! watch (the incident's own failure) is caught by the relist and raises `datastore-stale`,
//! the Node condition is patched and a Warning Event is created for a critical finding.
//!
//! Needs root (network namespaces); the daemon runs as a child process killed on drop.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    model::Finding,
    serve::{client, Status},
};
use watchdog_lab::{
    fake_apiserver::{FakeApiServer, FakeConfig},
    kube_fixture, Lab, LabSpec,
};

const BIN: &str = env!("CARGO_BIN_EXE_watchdog");
const NODE: &str = "k8s01";
const PEER: &str = "k8s02";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

impl Agent {
    fn start(lab: &mut Lab, kubeconfig: &std::path::Path, datastore_extra: &str) -> Agent {
        let base = kube_fixture::agent_config_toml_kubernetes(lab, NODE, kubeconfig);
        Agent::start_with(lab, &format!("{base}{datastore_extra}"))
    }

    /// `config` is the agent's config up to and including its `[datastore]` table.
    fn start_with(lab: &mut Lab, config: &str) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/status.sock");
        let metrics: SocketAddr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap();
        let text = format!(
            "{config}\n[status]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"{metrics}\"\n\n[ebpf]\nenabled = false\n",
            socket.display(),
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(lab.netns_path(NODE))
            .env("WATCHDOG_LOG", "info,dataplane_watchdog=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start watchdog run");
        Agent {
            child: Some(child),
            dir,
            socket,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn status(&self) -> Option<Status> {
        rt().block_on(client::fetch_status(&self.socket, Duration::from_secs(2)))
            .ok()
    }

    fn findings(&self) -> Option<Vec<Finding>> {
        let body = rt()
            .block_on(client::fetch(
                &self.socket,
                "/findings",
                Duration::from_secs(2),
            ))
            .ok()?;
        Some(serde_json::from_slice(&body).expect("/findings is a finding list"))
    }

    /// Poll until `pred` holds on the status and findings; panics with the log after `within`.
    fn wait(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Status, &[Finding]) -> bool,
    ) -> (Vec<Finding>, Duration) {
        let started = Instant::now();
        let mut last = Vec::new();
        loop {
            if let (Some(s), Some(f)) = (self.status(), self.findings()) {
                if pred(&s, &f) {
                    return (f, started.elapsed());
                }
                last = f;
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("watchdog run exited ({exit}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < within,
                "{what}: not within {within:?}; findings: {:?}\nlog:\n{}",
                names(&last),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn names<F: std::borrow::Borrow<Finding>>(findings: &[F]) -> Vec<String> {
    findings
        .iter()
        .map(|f| f.borrow())
        .map(|f| format!("{}/{}", f.check, f.peer_node.as_deref().unwrap_or("-")))
        .collect()
}

fn has(findings: &[Finding], check: &str, peer: Option<&str>) -> bool {
    findings
        .iter()
        .any(|f| f.check.as_str() == check && (peer.is_none() || f.peer_node.as_deref() == peer))
}

/// Node condition patches the fake server received, as (status, reason).
fn condition_patches(server: &FakeApiServer) -> Vec<(String, String)> {
    server
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.contains(&format!("/nodes/{NODE}/status")))
        .flat_map(|r| {
            r.body["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|c| c["type"] == "VXLANDataplaneHealthy")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Waits (5 s at most) until the fake server received a `VXLANDataplaneHealthy` patch on
/// NODE with this status.
fn wait_for_condition(server: &FakeApiServer, status: &str) {
    let started = Instant::now();
    while !condition_patches(server).iter().any(|(s, _)| s == status) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no {status} condition patch on {NODE}: {:?}\nrequests: {:?}",
            condition_patches(server),
            server
                .requests()
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The incident lab and a fake API server serving it.
struct Cluster {
    /// The fake server runs on this runtime's worker while the test blocks.
    _server_rt: tokio::runtime::Runtime,
    lab: Lab,
    server: FakeApiServer,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn start() -> Cluster {
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let lab = Lab::build(LabSpec::incident())
            .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"));
        let server = server_rt.block_on(FakeApiServer::start(FakeConfig::default()));
        kube_fixture::populate_fake_apiserver(&lab, &server);
        let kubeconfig = server.write_kubeconfig();
        Cluster {
            _server_rt: server_rt,
            lab,
            server,
            kubeconfig,
        }
    }
}

#[test]
fn watch_relist_stale_and_node_condition() {
    let Cluster {
        _server_rt,
        mut lab,
        server,
        kubeconfig,
    } = Cluster::start();
    let mut agent = Agent::start(
        &mut lab,
        &kubeconfig,
        "relist_interval = \"2s\"\nstale_after = \"4s\"\npublish_node_condition = true\npublish_events = true\n",
    );

    // Healthy once the watch has synced: zero findings, the Node says so.
    let nodes = lab.nodes().len();
    agent.wait(
        "in sync with the cluster",
        Duration::from_secs(10),
        |s, f| s.in_sync && s.datastore.nodes == nodes && f.is_empty(),
    );
    let status = agent.status().unwrap();
    assert!(
        status
            .datastore
            .source
            .starts_with("kubernetes:http://127.0.0.1:"),
        "{:?}",
        status.datastore
    );
    assert!(!status.datastore.stale, "{:?}", status.datastore);
    wait_for_condition(&server, "True");

    // calico-node on the peer re-registers with a new VTEP: the watch delivers it.
    kube_fixture::move_vtep(&lab, &server, PEER, Ipv4Addr::new(10, 1, 99, 5)).unwrap();
    let (_, took) = agent.wait(
        "gateway-wrong-vtep via watch",
        Duration::from_secs(2),
        |_, f| has(f, "gateway-wrong-vtep", Some(PEER)),
    );
    eprintln!("watch: VTEP move seen after {took:?}");
    wait_for_condition(&server, "False");
    // …and a Warning Event on the Node, as `kubectl describe node` shows it.
    let started = Instant::now();
    let event = loop {
        let created = server.requests().into_iter().find(|r| {
            r.method == "POST"
                && r.path.ends_with("/events")
                && r.body["involvedObject"]["name"] == NODE
                && r.body["reason"] == "GatewayWrongVtep"
        });
        if let Some(e) = created {
            break e;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no Event created for the critical finding: {:?}\n{}",
            server
                .requests()
                .iter()
                .map(|r| format!("{} {}", r.method, r.path))
                .collect::<Vec<_>>(),
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(event.body["type"], "Warning", "{}", event.body);
    assert_eq!(
        event.body["involvedObject"]["kind"], "Node",
        "{}",
        event.body
    );
    assert!(
        event.body["message"]
            .as_str()
            .is_some_and(|m| m.contains(PEER)),
        "{}",
        event.body
    );
    kube_fixture::restore_node(&lab, &server, PEER);
    agent.wait("restored", Duration::from_secs(2), |_, f| f.is_empty());

    // The incident's own failure: the watch stays open and silent while the VTEP moves. The
    // relist (every 2 s) must catch it and say the datastore was stale.
    server.set_silent_watch(true);
    kube_fixture::move_vtep(&lab, &server, PEER, Ipv4Addr::new(10, 1, 99, 6)).unwrap();
    let (found, took) = agent.wait(
        "silent watch caught by relist",
        Duration::from_secs(12),
        |_, f| has(f, "gateway-wrong-vtep", Some(PEER)) && has(f, "datastore-stale", None),
    );
    eprintln!("silent watch: caught after {took:?}: {:?}", names(&found));
    let stale = found
        .iter()
        .find(|f| f.check.as_str() == "datastore-stale")
        .unwrap();
    assert_eq!(stale.severity.to_string(), "warning");
    assert!(stale.message.contains("stale"), "{}", stale.message);
}

/// The API server is down when the agent starts (a node rebooting during a control-plane
/// outage): the agent does not claim to be in sync until it gave the datastore its chance,
/// then checks the kernel on its own, and catches up with the precise findings once the API
/// server answers.
#[test]
fn api_down_at_boot_checks_the_kernel_then_catches_up() {
    let Cluster {
        _server_rt,
        mut lab,
        server,
        kubeconfig,
    } = Cluster::start();
    server.set_down(true);
    lab.inject(watchdog_lab::Fault::incident(NODE)).unwrap();
    let mut agent = Agent::start(&mut lab, &kubeconfig, "");

    // Up and answering, but not in sync: no findings are claimed yet.
    agent.wait("status API up", Duration::from_secs(5), |s, _| {
        s.datastore.error.is_some()
    });
    let status = agent.status().unwrap();
    assert!(!status.in_sync, "in sync without a datastore: {status:?}");
    assert!(status.findings.is_empty(), "{:?}", names(&status.findings));

    // After the wait, the kernel-only checks run and already see the blackhole.
    let (found, took) = agent.wait(
        "kernel-only checks after the datastore wait",
        Duration::from_secs(20),
        |s, f| s.in_sync && has(f, "gateway-is-network-address", None),
    );
    eprintln!(
        "datastore down: in sync after {took:?}: {:?}",
        names(&found)
    );
    assert!(agent.status().unwrap().datastore.error.is_some());

    // The API server comes back: the precise finding, naming k8s03 and its real VTEP.
    server.set_down(false);
    let (found, took) = agent.wait(
        "datastore loaded after the API server came back",
        Duration::from_secs(20),
        |_, f| {
            has(f, "gateway-wrong-vtep", Some("k8s03"))
                && !has(f, "gateway-is-network-address", None)
        },
    );
    eprintln!(
        "API back: precise findings after {took:?}: {:?}",
        names(&found)
    );
    let wrong = found
        .iter()
        .find(|f| f.check.as_str() == "gateway-wrong-vtep")
        .unwrap();
    assert_eq!(
        wrong.expected_gateway,
        Some(lab.node("k8s03").vtep_ip.into())
    );
    assert_eq!(agent.status().unwrap().datastore.nodes, lab.nodes().len());
}

/// The agent's credentials are revoked mid-run (an expired token, a rotated client
/// certificate): the list/watch ends. The agent must keep checking against the last good
/// desired state — never "no nodes", so never a `route-stale` for a healthy route — say the
/// datastore is stale, and recover on its own once the credentials work again.
#[test]
fn a_watch_that_ends_keeps_the_last_state_and_recovers() {
    let Cluster {
        _server_rt,
        mut lab,
        server,
        kubeconfig,
    } = Cluster::start();
    let mut agent = Agent::start(&mut lab, &kubeconfig, "");
    let nodes = lab.nodes().len();
    agent.wait("in sync", Duration::from_secs(10), |s, f| {
        s.in_sync && s.datastore.nodes == nodes && f.is_empty()
    });

    server.set_unauthorized(true);
    let saw_stale_route = std::cell::Cell::new(false);
    let ended = |f: &[Finding]| {
        f.iter().any(|f| {
            f.check.as_str() == "datastore-stale" && f.evidence.details.contains_key("watch-ended")
        })
    };
    let (found, took) = agent.wait("the watch ended", Duration::from_secs(20), |_, f| {
        saw_stale_route.set(saw_stale_route.get() || has(f, "route-stale", None));
        ended(f)
    });
    eprintln!(
        "credentials revoked: watch ended after {took:?}: {:?}",
        names(&found)
    );
    let stale = found
        .iter()
        .find(|f| f.check.as_str() == "datastore-stale")
        .unwrap();
    assert!(stale.message.contains("401"), "{}", stale.message);
    assert!(
        stale.message.contains(&format!("{nodes} nodes")),
        "{}",
        stale.message
    );
    assert!(agent.status().unwrap().datastore.stale);

    // The checks still run, against the last good state: the incident is caught precisely.
    lab.inject(watchdog_lab::Fault::incident(NODE)).unwrap();
    let (found, _) = agent.wait(
        "the incident caught against the last good state",
        Duration::from_secs(5),
        |_, f| {
            saw_stale_route.set(saw_stale_route.get() || has(f, "route-stale", None));
            has(f, "gateway-wrong-vtep", Some("k8s03")) && ended(f)
        },
    );
    let wrong = found
        .iter()
        .find(|f| f.check.as_str() == "gateway-wrong-vtep")
        .unwrap();
    assert_eq!(
        wrong.expected_gateway,
        Some(lab.node("k8s03").vtep_ip.into())
    );

    // Credentials work again: the agent reconnects by itself, the stale warning clears and
    // the real finding stays.
    server.set_unauthorized(false);
    let (found, took) = agent.wait("recovered", Duration::from_secs(20), |s, f| {
        saw_stale_route.set(saw_stale_route.get() || has(f, "route-stale", None));
        !s.datastore.stale
            && !has(f, "datastore-stale", None)
            && has(f, "gateway-wrong-vtep", Some("k8s03"))
    });
    eprintln!(
        "credentials back: recovered after {took:?}: {:?}",
        names(&found)
    );
    assert!(
        !saw_stale_route.get(),
        "a route-stale appeared while the watch was gone:\n{}",
        agent.log()
    );
}

/// What the cluster's own configuration says reaches the daemon through the watch: a
/// FelixConfiguration for this node changes the VNI the device must have; an IPIP pool takes
/// a peer's blocks off the overlay, so a route to them that Felix no longer programs is not
/// `route-missing`. The agent runs without `node_name`, as on a cloud whose host names are not
/// the node names: it finds its node by address.
#[test]
fn cluster_configuration_changes_reach_the_daemon() {
    use watchdog_lab::fake_apiserver::Res;
    let Cluster {
        _server_rt,
        mut lab,
        server,
        kubeconfig,
    } = Cluster::start();
    let config: String = kube_fixture::agent_config_toml_kubernetes(&lab, NODE, &kubeconfig)
        .lines()
        .filter(|l| !l.starts_with("node_name"))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut agent = Agent::start_with(
        &mut lab,
        &format!("{config}publish_node_condition = true\n"),
    );
    let nodes = lab.nodes().len();
    agent.wait(
        "in sync, found by address",
        Duration::from_secs(10),
        |s, f| s.in_sync && s.datastore.nodes == nodes && s.node == NODE && f.is_empty(),
    );
    // The condition goes to the node it found, not to the host name.
    wait_for_condition(&server, "True");

    server.put(
        Res::FelixConfigurations,
        serde_json::json!({"metadata": {"name": format!("node.{NODE}")}, "spec": {"vxlanVNI": 7}}),
    );
    let (found, _) = agent.wait(
        "the node's VNI from Felix",
        Duration::from_secs(3),
        |_, f| has(f, "device-misconfigured", None),
    );
    let f = found
        .iter()
        .find(|f| f.check.as_str() == "device-misconfigured")
        .unwrap();
    assert_eq!(f.evidence.details["expected_vni"], "7", "{f:?}");
    server.delete(Res::FelixConfigurations, &format!("node.{NODE}"));
    agent.wait("back to the default VNI", Duration::from_secs(3), |_, f| {
        f.is_empty()
    });

    // k8s03's 10.1.236.0/24 blocks move to an IPIP pool; Felix would drop their VXLAN routes.
    server.put(
        Res::IpPools,
        kube_fixture::ip_pool("ipip", "10.1.236.0/24".parse().unwrap(), "Never", "Always"),
    );
    std::thread::sleep(Duration::from_millis(500));
    lab.ip(NODE, &["route", "del", "10.1.236.0/26"]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let f = agent.findings().unwrap();
    assert!(
        f.is_empty(),
        "an IPIP block is not route-missing: {:?}",
        names(&f)
    );
    // Without that pool it is a VXLAN block again, and its missing route is found.
    server.delete(Res::IpPools, "ipip");
    agent.wait(
        "route-missing once VXLAN again",
        Duration::from_secs(3),
        |_, f| has(f, "route-missing", Some("k8s03")),
    );
}

/// The daemon with `[kubelet] enabled`: the incident's dead kubelet watch (a pod bound after
/// the watch died never reaches the kubelet) becomes a critical `kubelet-watch-stalled` in
/// /findings and on the Node condition, clears when the kubelet lists the pod again, and a
/// node proxy that answers 403 is `kubelet-unverifiable` only.
#[test]
fn kubelet_watch_stall_flows_like_every_finding() {
    use watchdog_lab::fake_apiserver::Res;
    let Cluster {
        _server_rt,
        mut lab,
        server,
        kubeconfig,
    } = Cluster::start();
    server.put(
        Res::Pods,
        kube_fixture::pod("kube-system", "calico-node-abcde", NODE, 600),
    );
    let base = kube_fixture::agent_config_toml_kubernetes(&lab, NODE, &kubeconfig);
    let mut agent = Agent::start_with(
        &mut lab,
        &format!(
            "{base}publish_node_condition = true\n\n[kubelet]\nenabled = true\ninterval = \"1s\"\nthreshold = \"2s\"\n"
        ),
    );
    agent.wait(
        "healthy with the kubelet check on",
        Duration::from_secs(10),
        |s, f| s.in_sync && f.is_empty(),
    );

    server.set_kubelet_stalled(NODE, true);
    server.put(
        Res::Pods,
        kube_fixture::pod("kube-system", "calico-node-sqfcs", NODE, 0),
    );
    let (found, took) = agent.wait("kubelet-watch-stalled", Duration::from_secs(6), |_, f| {
        has(f, "kubelet-watch-stalled", None)
    });
    eprintln!("stalled kubelet found {took:?} after the pod was bound (threshold 2s)");
    let f = found
        .iter()
        .find(|f| f.check.as_str() == "kubelet-watch-stalled")
        .unwrap();
    assert!(
        f.message.contains("kube-system/calico-node-sqfcs"),
        "{}",
        f.message
    );
    wait_for_condition(&server, "False");

    server.set_kubelet_stalled(NODE, false);
    agent.wait(
        "cleared once the kubelet knows it",
        Duration::from_secs(3),
        |_, f| f.is_empty(),
    );

    server.set_kubelet_proxy_error(NODE, Some(403));
    server.set_kubelet_stalled(NODE, true);
    server.put(Res::Pods, kube_fixture::pod("default", "unseen", NODE, 60));
    let (found, _) = agent.wait("kubelet-unverifiable", Duration::from_secs(3), |_, f| {
        has(f, "kubelet-unverifiable", None)
    });
    assert_eq!(names(&found), ["kubelet-unverifiable/-"], "{found:#?}");
}
