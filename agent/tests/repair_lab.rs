//! Repair against real dataplanes in the network-namespace lab (needs root): `watchdog scan
//! --dry-run` / `--repair` on the incident, the guard rails on a real kernel, and the daemon
//! in `mode = "repair"` fixing faults, refusing, and giving up on a contested route.
//!
//! Every check reads the kernel back with `ip` and sends real packets across the overlay.

use std::{path::Path, process::Command};

use serde_json::Value;
use watchdog_lab::{Fault, Lab, LabSpec};

const WATCHDOG: &str = env!("CARGO_BIN_EXE_watchdog");
const NODE: &str = "k8s01";
const DEV: &str = "vxlan.calico";
const K8S03_VTEP: &str = "10.1.235.133";

fn build_lab() -> Lab {
    Lab::build(LabSpec::incident())
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON ({e}), exit {}\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

fn scan(config: &Path, netns: &Path, extra: &[&str]) -> Run {
    let out = Command::new(WATCHDOG)
        .args(["scan", "--config"])
        .arg(config)
        .arg("--netns")
        .arg(netns)
        .args(extra)
        .output()
        .expect("running watchdog scan");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ip route show dev vxlan.calico` on `node`, sorted.
fn routes(lab: &Lab, node: &str) -> Vec<String> {
    let mut r: Vec<String> = lab
        .ip(node, &["route", "show", "dev", DEV])
        .expect("ip route")
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    r.sort();
    r
}

/// The incident on k8s01, one of k8s03's blocks with Calico's own protocol (80), so the
/// repair must keep it.
fn incident_with_proto_80(lab: &mut Lab) {
    lab.inject(Fault::incident(NODE))
        .expect("inject the incident");
    lab.ip(
        NODE,
        &[
            "route",
            "replace",
            "10.1.236.0/26",
            "via",
            "10.1.235.128",
            "dev",
            DEV,
            "onlink",
            "proto",
            "80",
        ],
    )
    .expect("proto 80 route");
    let t = lab.traffic(NODE, "k8s03", 3).unwrap();
    assert!(
        t.none_delivered(),
        "the incident must blackhole k8s01→k8s03: {t}"
    );
}

#[test]
fn scan_dry_run_prints_the_incident_fix_then_repair_applies_it_and_traffic_flows() {
    let mut lab = build_lab();
    incident_with_proto_80(&mut lab);
    let config = lab.write_agent_config(NODE).unwrap();
    let netns = lab.netns_path(NODE);
    let before = routes(&lab, NODE);

    let dry = scan(&config, &netns, &["--dry-run"]);
    assert_eq!(dry.code, 2, "{}{}", dry.stdout, dry.stderr);
    let lines: Vec<&str> = dry.stdout.lines().collect();
    for want in [
        format!("ip route replace 10.1.235.128/26 via {K8S03_VTEP} dev {DEV} onlink"),
        format!("ip route replace 10.1.238.0/26 via {K8S03_VTEP} dev {DEV} onlink"),
        format!("ip route replace 10.1.236.0/26 via {K8S03_VTEP} dev {DEV} onlink proto 80"),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "{want:?} not in:\n{}",
            dry.stdout
        );
    }
    assert!(dry
        .stdout
        .contains("REPAIR PLAN (dry run, nothing written): 6 writes"));
    assert_eq!(routes(&lab, NODE), before, "--dry-run changed the kernel");

    let fixed = scan(&config, &netns, &["--repair", "--json"]);
    let json = fixed.json();
    assert_eq!(fixed.code, 0, "post-repair verdict: {json:#}");
    let actions = json["repair"]["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 6, "{json:#}");
    assert!(actions
        .iter()
        .all(|a| a["result"] == "applied" && a["action"] == "route-replace"));
    assert_eq!(json["repair"]["writes"], 6);
    assert_eq!(json["repair"]["before"]["critical"], 1);
    assert!(json["findings"].as_array().unwrap().is_empty(), "{json:#}");

    // The kernel: every k8s03 block via its VTEP, onlink, the proto 80 one still proto 80.
    let after = routes(&lab, NODE);
    for block in ["10.1.235.128/26", "10.1.236.0/26", "10.1.238.0/26"] {
        let line = after
            .iter()
            .find(|l| l.starts_with(&format!("{block} ")))
            .unwrap_or_else(|| panic!("{block} gone: {after:#?}"));
        assert!(
            line.contains(&format!("via {K8S03_VTEP} ")) && line.contains("onlink"),
            "{line}"
        );
        assert_eq!(
            line.contains("proto 80"),
            block == "10.1.236.0/26",
            "{line}"
        );
    }
    let t = lab.traffic(NODE, "k8s03", 5).unwrap();
    assert!(t.all_delivered(), "after the repair: {t}");
}

#[test]
fn scan_repair_refuses_a_peer_with_an_invalid_datastore_entry_and_writes_nothing() {
    let mut lab = build_lab();
    lab.inject(Fault::incident(NODE)).expect("inject");
    // k8s02 also claims one of k8s03's blocks: both entries are ambiguous for that block.
    let yaml = lab.datastore_yaml().replace(
        "blocks: [10.1.140.64/26]",
        "blocks: [10.1.140.64/26, 10.1.238.0/26]",
    );
    assert!(yaml.contains("10.1.238.0/26]"), "{yaml}");
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.yaml");
    std::fs::write(&nodes, yaml).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, lab.agent_config_toml(NODE, &nodes)).unwrap();
    let before = routes(&lab, NODE);

    let run = scan(&config, &lab.netns_path(NODE), &["--repair", "--json"]);
    let json = run.json();
    assert_eq!(run.code, 2, "{json:#}");
    assert_eq!(json["repair"]["writes"], 0);
    let actions = json["repair"]["actions"].as_array().unwrap();
    assert!(!actions.is_empty());
    for a in actions {
        assert_eq!(a["result"], "refused", "{a:#}");
        assert!(
            a["message"]
                .as_str()
                .unwrap()
                .contains("datastore entry of k8s03"),
            "{a:#}"
        );
    }
    let f = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .expect("the incident is still reported");
    assert_eq!(f["repair"]["status"], "refused");
    assert_eq!(
        routes(&lab, NODE),
        before,
        "a refused repair changed the kernel"
    );

    // Offline: nothing is known to be right, nothing is written.
    let offline = scan(
        &lab.write_agent_config(NODE).unwrap(),
        &lab.netns_path(NODE),
        &["--repair", "--json", "--datastore", "none"],
    );
    assert_eq!(offline.json()["repair"]["writes"], 0);
    assert_eq!(routes(&lab, NODE), before);
}

// ---------------------------------------------------------------------------------------------
// The daemon in repair mode
// ---------------------------------------------------------------------------------------------

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use dataplane_watchdog::serve::{client, Status};

/// A `watchdog run` child process, killed when dropped (even on panic).
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
}

/// Short windows so a contest plays out in seconds.
const REPAIR: &str = "[repair]\nmin_finding_age = \"0s\"\nmax_repairs_per_minute = 1000\n\
                      contested_after = 3\ncontested_window = \"1m\"\ncontested_backoff = \"1m\"\n";

impl Agent {
    fn start(lab: &mut Lab, mode: &str, datastore: Option<&Path>) -> Agent {
        let datastore = match datastore {
            Some(p) => p.to_path_buf(),
            None => lab.write_datastore().expect("write datastore"),
        };
        let agent = Self::spawn(
            lab,
            &format!(
                "mode = \"{mode}\"\n{}",
                lab.agent_config_toml(NODE, &datastore)
            ),
        );
        agent.wait("in sync", Duration::from_secs(15), |s| s.in_sync);
        agent
    }

    /// `body`: the top-level keys and `[datastore]`; status, metrics, eBPF and repair added.
    fn spawn(lab: &Lab, body: &str) -> Agent {
        Self::spawn_with(lab, body, "")
    }

    /// [`Agent::spawn`] with more `[repair]` keys.
    fn spawn_with(lab: &Lab, body: &str, repair_extra: &str) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("status.sock");
        let config = dir.path().join("config.toml");
        let text = format!(
            "{body}\n[status]\nsocket = \"{}\"\n[metrics]\nlisten = \"off\"\n\
             [ebpf]\nenabled = false\n{REPAIR}{repair_extra}",
            socket.display(),
        );
        std::fs::write(&config, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let child = Command::new(WATCHDOG)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(lab.netns_path(NODE))
            .env(
                "WATCHDOG_LOG",
                "info,dataplane_watchdog=debug,netlink_packet_route=error",
            )
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

    fn try_status(&self) -> Option<Status> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(client::fetch_status(&self.socket, Duration::from_secs(2)))
            .ok()
    }

    fn wait(&self, what: &str, deadline: Duration, cond: impl Fn(&Status) -> bool) -> Status {
        let started = Instant::now();
        loop {
            if let Some(s) = self.try_status().filter(|s| cond(s)) {
                return s;
            }
            assert!(
                started.elapsed() < deadline,
                "{what}: not within {deadline:?}\nstatus: {:#?}\nlog:\n{}",
                self.try_status().map(|s| (s.findings, s.repairs)),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check(&self) -> (i32, String) {
        let out = Command::new(WATCHDOG)
            .args(["check", "--socket"])
            .arg(&self.socket)
            .output()
            .expect("watchdog check");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
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

/// Polls the kernel until `cond` holds; returns how long it took.
fn until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < deadline,
            "{what}: not within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

fn healthy(lab: &Lab) -> bool {
    lab.diff_from_healthy().expect("snapshot").is_empty()
}

#[test]
fn the_daemon_repairs_the_incident_a_wrong_neighbour_and_a_missing_fdb_entry_within_a_second() {
    let mut lab = build_lab();
    let agent = Agent::start(&mut lab, "repair", None);
    for (fault, action) in [
        (Fault::incident(NODE), "route-replace"),
        (Fault::neighbour_wrong_mac(NODE, "k8s03"), "neigh-replace"),
        (Fault::fdb_removed(NODE, "k8s02"), "fdb-replace"),
    ] {
        let kind = fault.kind();
        let injected = lab.inject(fault).expect("inject");
        // (The agent may be done before a first look: the status records below prove it wrote.)
        let took = until(&format!("{kind} repaired"), Duration::from_secs(5), || {
            healthy(&lab)
        });
        assert!(
            took < Duration::from_secs(1),
            "{kind}: repaired only after {took:?}"
        );
        eprintln!("{kind}: kernel healthy again {took:?} after the injection");
        let t = lab.traffic(NODE, "k8s03", 3).unwrap();
        assert!(t.all_delivered(), "{kind}: after the repair: {t}");
        let t = lab.traffic(NODE, "k8s02", 3).unwrap();
        assert!(t.all_delivered(), "{kind}: after the repair: {t}");
        let s = agent.wait(
            &format!("{kind}: applied in status"),
            Duration::from_secs(5),
            |s| {
                s.findings.is_empty()
                    && s.repairs
                        .iter()
                        .any(|r| r.action == action && r.result == "applied")
            },
        );
        let r = s.repairs.iter().find(|r| r.action == action).unwrap();
        assert!(r.command.as_deref().unwrap().contains(DEV), "{r:?}");
        assert!(r.peer_node.is_some(), "{r:?}");
        // Already healthy: the undo rewrites the same objects (bookkeeping only).
        lab.restore(&injected).expect("restore");
        assert!(healthy(&lab));
    }
    let s = agent.try_status().unwrap();
    assert!(
        s.repairs.iter().all(|r| r.result == "applied"),
        "only applied: {:#?}",
        s.repairs
    );
    // Six route writes for the incident, one neighbour, one FDB entry: nothing else.
    assert_eq!(s.repairs.len(), 8, "{:#?}", s.repairs);
    assert!(agent.log().contains("repair applied"), "{}", agent.log());
}

/// A stale Felix: every time k8s03's first block is routed right, puts the bad route back
/// (polling, as fast as Felix's own event handling). Counts its writes.
struct Fighter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

const FOUGHT: &str = "10.1.235.128/26";
/// The route a stale Felix puts back: the incident's block via its network address.
const STALE_FELIX_ROUTE: [&str; 8] = [
    "route",
    "replace",
    FOUGHT,
    "via",
    "10.1.235.128",
    "dev",
    DEV,
    "onlink",
];

impl Fighter {
    fn start(lab: &Lab) -> Fighter {
        let netns = lab
            .netns_path(NODE)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let ip = |args: &[&str]| {
                let out = Command::new("ip")
                    .arg("-n")
                    .arg(&netns)
                    .args(args)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let mut writes = 0;
            while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
                if ip(&["route", "show", "exact", FOUGHT]).contains(K8S03_VTEP) {
                    ip(&STALE_FELIX_ROUTE);
                    writes += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            writes
        });
        Fighter {
            stop,
            thread: Some(thread),
        }
    }

    fn stop(&mut self) -> u32 {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Fighter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_stale_felix_rewriting_the_route_makes_it_contested_and_the_agent_stops() {
    let mut lab = build_lab();
    let agent = Agent::start(&mut lab, "repair", None);
    let mut fighter = Fighter::start(&lab);
    lab.ip(NODE, &STALE_FELIX_ROUTE).unwrap();
    let s = agent.wait("repair-contested", Duration::from_secs(15), |s| {
        s.findings
            .iter()
            .any(|f| f.check.as_str() == "repair-contested")
    });
    let contested = s
        .findings
        .iter()
        .find(|f| f.check.as_str() == "repair-contested")
        .unwrap();
    assert_eq!(contested.severity.to_string(), "critical");
    assert_eq!(contested.peer_node.as_deref(), Some("k8s03"));
    assert!(contested.message.contains(FOUGHT), "{}", contested.message);
    assert!(contested.message.contains("Felix"), "{}", contested.message);
    assert!(
        contested.hint.as_deref().unwrap().contains("calico-node"),
        "{contested:?}"
    );
    // The fought finding itself says contested.
    let s = agent.wait(
        "gateway-wrong-vtep contested",
        Duration::from_secs(5),
        |s| {
            s.findings.iter().any(|f| {
                f.check.as_str() == "gateway-wrong-vtep"
                    && f.repair.as_ref().is_some_and(|r| r.status == "contested")
            })
        },
    );
    let (code, line) = agent.check();
    assert_eq!(code, 2, "{line}");
    assert!(line.starts_with("WATCHDOG CRITICAL"), "{line}");

    // The agent has given up: the fighter keeps the route, and the agent writes no more.
    let applied = |s: &Status| {
        s.repairs
            .iter()
            .filter(|r| {
                r.result == "applied" && r.command.as_deref().unwrap_or("").contains(FOUGHT)
            })
            .count()
    };
    let writes = applied(&s);
    std::thread::sleep(Duration::from_secs(2));
    let later = agent.try_status().unwrap();
    assert_eq!(applied(&later), writes, "the agent wrote after the contest");
    let fights = fighter.stop();
    assert!(
        writes <= 3 + 1,
        "agent writes: {writes} (contested_after + 1 at most)"
    );
    assert!(fights >= 3, "the fighter wrote {fights} times");
    assert!(lab
        .ip(NODE, &["route", "show", "exact", FOUGHT])
        .unwrap()
        .contains("via 10.1.235.128 "));
    assert!(
        later.repairs.iter().any(|r| r.result == "contested"),
        "{:#?}",
        later.repairs
    );
}

#[test]
fn observe_and_alert_modes_never_write_and_repair_mode_refuses_an_invalid_peer() {
    let mut lab = build_lab();
    lab.inject(Fault::incident(NODE)).expect("inject");
    let before = lab.snapshot().unwrap();
    // A datastore where k8s02 also claims one of k8s03's blocks.
    let yaml = lab.datastore_yaml().replace(
        "blocks: [10.1.140.64/26]",
        "blocks: [10.1.140.64/26, 10.1.238.0/26]",
    );
    let dir = tempfile::tempdir().unwrap();
    let invalid = dir.path().join("nodes.yaml");
    std::fs::write(&invalid, yaml).unwrap();

    // `ip monitor` sees every write to routes, neighbours and the FDB in the namespace.
    let netns = lab.netns_path(NODE);
    let mut monitor = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["ip", "monitor", "route", "neigh"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip monitor");
    std::thread::sleep(Duration::from_millis(200));
    for (mode, datastore) in [
        ("observe", None),
        ("alert", None),
        ("repair", Some(invalid.as_path())),
    ] {
        let agent = Agent::start(&mut lab, mode, datastore);
        let s = agent.wait(
            &format!("{mode}: the incident"),
            Duration::from_secs(5),
            |s| {
                s.findings
                    .iter()
                    .any(|f| f.check.as_str() == "gateway-wrong-vtep")
            },
        );
        if mode == "repair" {
            let s = agent.wait("refused", Duration::from_secs(5), |s| {
                s.findings.iter().any(|f| {
                    f.check.as_str() == "gateway-wrong-vtep"
                        && f.repair.as_ref().is_some_and(|r| r.status == "refused")
                })
            });
            assert!(
                s.repairs.iter().all(|r| r.result == "refused"),
                "{:#?}",
                s.repairs
            );
            assert!(s.repairs[0]
                .message
                .as_deref()
                .unwrap()
                .contains("datastore entry of k8s03"));
        } else {
            std::thread::sleep(Duration::from_millis(500));
            assert!(s.repairs.is_empty(), "{mode}: {:#?}", s.repairs);
        }
        drop(agent);
    }
    let _ = monitor.kill();
    let out = monitor.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        seen.trim().is_empty(),
        "the agent wrote to the kernel:\n{seen}"
    );
    assert_eq!(lab.snapshot().unwrap(), before);
}

#[test]
fn nothing_is_repaired_while_the_datastore_is_stale_and_it_is_once_fresh_again() {
    use watchdog_lab::{
        fake_apiserver::{FakeApiServer, FakeConfig},
        kube_fixture,
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut lab = build_lab();
    let server = server_rt.block_on(FakeApiServer::start(FakeConfig::default()));
    kube_fixture::populate_fake_apiserver(&lab, &server);
    let kubeconfig = server.write_kubeconfig();
    let body = format!(
        "mode = \"repair\"\n{}relist_interval = \"1s\"\nstale_after = \"2s\"\n",
        kube_fixture::agent_config_toml_kubernetes(&lab, NODE, &kubeconfig)
    );
    let agent = Agent::spawn(&lab, &body);
    let nodes = lab.nodes().len();
    agent.wait("in sync with the cluster", Duration::from_secs(15), |s| {
        s.in_sync && s.datastore.nodes == nodes && s.findings.is_empty()
    });

    // The API server goes away: after stale_after the datastore is stale.
    server.set_down(true);
    agent.wait("datastore-stale", Duration::from_secs(10), |s| {
        s.findings
            .iter()
            .any(|f| f.check.as_str() == "datastore-stale")
    });
    lab.inject(Fault::incident(NODE)).expect("inject");
    let s = agent.wait("refused: stale", Duration::from_secs(5), |s| {
        s.findings.iter().any(|f| {
            f.check.as_str() == "gateway-wrong-vtep"
                && f.repair.as_ref().is_some_and(|r| {
                    r.status == "refused"
                        && r.reason
                            .as_deref()
                            .unwrap_or("")
                            .starts_with("the datastore is stale")
                })
        })
    });
    assert!(
        s.repairs.iter().all(|r| r.result == "refused"),
        "{:#?}",
        s.repairs
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        routes(&lab, NODE)
            .iter()
            .any(|l| l.starts_with("10.1.235.128/26 via 10.1.235.128 ")),
        "repaired while the datastore was stale: {:?}",
        routes(&lab, NODE)
    );

    // Back: the relist succeeds, the datastore is fresh, the incident is repaired.
    server.set_down(false);
    let took = until("repaired once fresh", Duration::from_secs(15), || {
        healthy(&lab)
    });
    eprintln!("repaired {took:?} after the API server came back");
    let t = lab.traffic(NODE, "k8s03", 3).unwrap();
    assert!(t.all_delivered(), "{t}");
    drop(agent);
    drop(server_rt);
}

#[test]
fn escalation_deletes_this_nodes_calico_node_pod_once_with_events() {
    use watchdog_lab::{
        fake_apiserver::{FakeApiServer, FakeConfig, Res},
        kube_fixture,
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let lab = build_lab();
    let server = server_rt.block_on(FakeApiServer::start(FakeConfig::default()));
    kube_fixture::populate_fake_apiserver(&lab, &server);
    for node in ["k8s01", "k8s02"] {
        server.put(
            Res::Pods,
            serde_json::json!({
                "metadata": {"name": format!("calico-node-{node}"), "namespace": "calico-system",
                             "labels": {"k8s-app": "calico-node"}},
                "spec": {"nodeName": node, "containers": []},
            }),
        );
    }
    let kubeconfig = server.write_kubeconfig();
    let body = format!(
        "mode = \"repair\"\n{}publish_events = true\n",
        kube_fixture::agent_config_toml_kubernetes(&lab, NODE, &kubeconfig)
    );
    let agent = Agent::spawn_with(&lab, &body, "escalate = \"restart-calico-node\"\n");
    let nodes = lab.nodes().len();
    agent.wait("in sync with the cluster", Duration::from_secs(15), |s| {
        s.in_sync && s.datastore.nodes == nodes && s.findings.is_empty()
    });
    let mut fighter = Fighter::start(&lab);
    lab.ip(NODE, &STALE_FELIX_ROUTE).unwrap();
    agent.wait("repair-contested", Duration::from_secs(15), |s| {
        s.findings
            .iter()
            .any(|f| f.check.as_str() == "repair-contested")
    });
    let deleted = || {
        server
            .requests()
            .into_iter()
            .filter(|r| r.method == "DELETE")
            .map(|r| r.path)
            .collect::<Vec<_>>()
    };
    until("calico-node deleted", Duration::from_secs(5), || {
        !deleted().is_empty()
    });
    std::thread::sleep(Duration::from_millis(500));
    fighter.stop();
    assert_eq!(
        deleted(),
        vec!["/api/v1/namespaces/calico-system/pods/calico-node-k8s01".to_string()],
        "only this node's calico-node pod, once"
    );
    assert!(server
        .get(Res::Pods, "calico-system/calico-node-k8s02")
        .is_some());
    let reasons: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
        .filter_map(|r| r.body["reason"].as_str().map(String::from))
        .collect();
    for want in ["RepairApplied", "RepairContested", "CalicoNodeRestarted"] {
        assert!(
            reasons.iter().any(|r| r == want),
            "no {want} Event: {reasons:?}"
        );
    }
    drop(agent);
    drop(server_rt);
}
