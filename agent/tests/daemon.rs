//! `watchdog run` against a real lab node: faults appear in the status API within milliseconds
//! and clear after restore, a netlink overrun leaves the state exact, a re-created device is
//! picked up, and `status`, `check` and `/metrics` answer for real.
//!
//! Needs root (network namespaces); `cargo xtask test` runs it. Each test builds its own lab and
//! runs the daemon as a child process that is killed when the test ends, even on panic.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    model::{Family, Finding},
    serve::{client, Status},
};
use watchdog_lab::{Fault, Lab, LabSpec, OVERLAY_MTU, UNDERLAY_IF};

const BIN: &str = env!("CARGO_BIN_EXE_watchdog");
const NODE: &str = "k8s01";
/// A fault must be visible through the API within this long (the daemon is event-driven; a
/// periodic resync would take a minute).
const DEADLINE: Duration = Duration::from_secs(5);

fn build_lab() -> Lab {
    Lab::build(LabSpec::incident())
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"))
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A `watchdog run` child process with its own config, socket and metrics port.
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    config: PathBuf,
    socket: PathBuf,
    metrics: SocketAddr,
    netns: PathBuf,
}

impl Agent {
    /// Start the daemon as `node` of `lab`. `top` goes at the top of the config (top-level
    /// keys), `tail` at the end (extra sections).
    fn start(lab: &mut Lab, node: &str, top: &str, tail: &str) -> Agent {
        Self::start_with(lab, node, top, &format!("[ebpf]\nenabled = false\n{tail}"))
    }

    /// As deployed: eBPF accounting on (the default).
    fn start_with_ebpf(lab: &mut Lab, node: &str) -> Agent {
        Self::start_with(lab, node, "", "")
    }

    fn start_with(lab: &mut Lab, node: &str, top: &str, tail: &str) -> Agent {
        let datastore = lab.write_datastore().expect("write datastore");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("run/status.sock");
        let metrics = free_port();
        let config = dir.path().join("config.toml");
        let text = format!(
            "{top}\n{}\n[status]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"{metrics}\"\n\n{tail}\n",
            lab.agent_config_toml(node, &datastore),
            socket.display(),
        );
        std::fs::write(&config, text).expect("write config");
        let netns = lab.netns_path(node);
        let log = std::fs::File::create(dir.path().join("agent.log")).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(&netns)
            .env(
                "WATCHDOG_LOG",
                "info,dataplane_watchdog=debug,netlink_packet_route=error",
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start watchdog run");
        let mut agent = Agent {
            child: Some(child),
            dir,
            config,
            socket,
            metrics,
            netns,
        };
        agent.wait_in_sync();
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn wait_in_sync(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                if status.in_sync {
                    return;
                }
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("watchdog run exited ({exit}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "daemon not in sync after 10 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_status(&self) -> Option<Status> {
        rt().block_on(client::fetch_status(&self.socket, Duration::from_secs(2)))
            .ok()
    }

    fn status(&self) -> Status {
        rt().block_on(client::fetch_status(&self.socket, Duration::from_secs(2)))
            .unwrap_or_else(|e| panic!("GET /status: {e}\n{}", self.log()))
    }

    /// `GET /findings`.
    fn findings(&self) -> Vec<Finding> {
        let body = rt()
            .block_on(client::fetch(
                &self.socket,
                "/findings",
                Duration::from_secs(2),
            ))
            .unwrap_or_else(|e| panic!("GET /findings: {e}\n{}", self.log()));
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "/findings is not a finding list: {e}: {}",
                String::from_utf8_lossy(&body)
            )
        })
    }

    /// Poll `/findings` until `pred` holds; returns them and how long it took.
    fn wait_findings(
        &self,
        what: &str,
        pred: impl Fn(&[Finding]) -> bool,
    ) -> (Vec<Finding>, Duration) {
        let started = Instant::now();
        loop {
            let f = self.findings();
            if pred(&f) {
                return (f, started.elapsed());
            }
            if started.elapsed() > DEADLINE {
                panic!(
                    "{what}: not seen within {DEADLINE:?}; findings now: {}\nlog:\n{}",
                    checks(&f).into_iter().collect::<Vec<_>>().join(", "),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Fails on any finding during `span` (a false alarm).
    fn quiet_for(&self, what: &str, span: Duration) {
        let started = Instant::now();
        while started.elapsed() < span {
            let f = self.findings();
            assert!(
                f.is_empty(),
                "{what}: false alarm {:?}\n{}",
                checks(&f),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run watchdog")
    }

    fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).expect("connect to metrics");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read metrics");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    /// SIGTERM and wait; returns the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                panic!("daemon ignored SIGTERM for 5 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `watchdog scan --json` of the same node with the same config.
    fn scan(&self) -> Vec<Finding> {
        let out = Command::new(BIN)
            .args(["scan", "--json", "--config"])
            .arg(&self.config)
            .arg("--netns")
            .arg(&self.netns)
            .output()
            .expect("run watchdog scan");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "scan --json: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        serde_json::from_value(v["findings"].clone()).expect("scan findings")
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

fn checks(findings: &[Finding]) -> BTreeSet<String> {
    findings
        .iter()
        .map(|f| {
            format!(
                "{}/{}/{}",
                f.check,
                f.peer_node.as_deref().unwrap_or("-"),
                f.route.as_deref().unwrap_or("-")
            )
        })
        .collect()
}

/// What must agree between the daemon and a fresh scan.
fn identity(findings: &[Finding]) -> BTreeSet<String> {
    findings
        .iter()
        .map(|f| {
            format!(
                "{} {} {} {:?} {:?} {:?} {:?}",
                f.check, f.severity, f.device, f.peer_node, f.route, f.gateway, f.expected_gateway
            )
        })
        .collect()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn faults_show_up_and_clear_status_check_metrics() {
    let mut lab = build_lab();
    let mut agent = Agent::start(&mut lab, NODE, "", "");

    // Healthy: zero findings, check OK.
    assert!(
        agent.findings().is_empty(),
        "healthy lab: {:?}",
        checks(&agent.findings())
    );
    let ok = agent.cli(&["check"]);
    assert_eq!(code(&ok), 0, "{}", stdout(&ok));
    assert!(stdout(&ok).starts_with("WATCHDOG OK - "), "{}", stdout(&ok));

    // A stray route: WARNING.
    let stray = lab
        .inject(Fault::stray_route(NODE, "10.99.0.0/26".parse().unwrap()))
        .expect("inject stray route");
    let (found, _) = agent.wait_findings("route-stale", |f| {
        f.iter().any(|f| f.check.as_str() == "route-stale")
    });
    assert!(
        found.iter().all(|f| f.severity.to_string() == "warning"),
        "{:?}",
        checks(&found)
    );
    let warn = agent.cli(&["check"]);
    assert_eq!(code(&warn), 1, "{}", stdout(&warn));
    assert!(
        stdout(&warn).starts_with("WATCHDOG WARNING - "),
        "{}",
        stdout(&warn)
    );
    lab.restore(&stray).expect("restore stray");
    agent.wait_findings("stray route cleared", |f| f.is_empty());

    // The incident: CRITICAL within milliseconds, `since` kept while it lasts.
    let injected_at = std::time::SystemTime::now();
    let fault = Fault::incident(NODE);
    let expected = fault.expected_checks();
    let injected = lab.inject(fault).expect("inject incident");
    let (found, latency) = agent.wait_findings("incident finding", |f| {
        f.iter().any(|f| {
            expected.contains(&f.check.as_str()) && f.peer_node.as_deref() == Some("k8s03")
        })
    });
    assert!(
        latency < Duration::from_secs(1),
        "detection took {latency:?}: not event-driven"
    );
    let first = found
        .iter()
        .find(|f| expected.contains(&f.check.as_str()))
        .unwrap()
        .clone();
    assert_eq!(first.severity.to_string(), "critical");
    let since = first.since.expect("since is set");
    assert!(
        since >= injected_at - Duration::from_secs(1),
        "since {since:?} predates the fault"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let again = agent.findings();
    let same = again
        .iter()
        .find(|f| f.key() == first.key())
        .expect("still open");
    assert_eq!(same.since, Some(since), "since must survive re-evaluations");

    let crit = agent.cli(&["check"]);
    assert_eq!(code(&crit), 2, "{}", stdout(&crit));
    assert!(
        stdout(&crit).starts_with("WATCHDOG CRITICAL - "),
        "{}",
        stdout(&crit)
    );
    assert!(stdout(&crit).contains(" | "), "perfdata: {}", stdout(&crit));

    let human = agent.cli(&["status"]);
    assert_eq!(
        code(&human),
        0,
        "{}",
        String::from_utf8_lossy(&human.stderr)
    );
    assert!(stdout(&human).contains("k8s03"), "{}", stdout(&human));
    assert!(
        stdout(&human).contains(first.check.as_str()),
        "{}",
        stdout(&human)
    );
    let json = agent.cli(&["status", "--json"]);
    let status: Status = serde_json::from_slice(&json.stdout).expect("status --json decodes");
    assert_eq!(status.node, NODE);
    assert_eq!(status.mode, "alert");
    assert!(status.in_sync);
    assert_eq!(status.devices.len(), 1);
    assert!(status.devices[0].present);
    let k8s03 = status.peers.iter().find(|p| p.name == "k8s03").unwrap();
    assert_eq!(k8s03.verdict.as_str(), "critical");
    assert_eq!(status.resync.count, 1, "only the startup resync so far");

    let metrics = agent.metrics_text();
    let line = format!(
        "dataplane_watchdog_findings{{check=\"{}\",severity=\"critical\",family=\"ipv4\"}} 1",
        first.check
    );
    assert!(metrics.contains(&line), "no `{line}` in\n{metrics}");
    assert!(
        metrics.contains("dataplane_watchdog_resyncs_total{reason=\"startup\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dataplane_watchdog_routes_checked "),
        "{metrics}"
    );
    assert!(
        metrics.contains("process_resident_memory_bytes"),
        "{metrics}"
    );

    // Restored: cleared, also in the metrics.
    lab.restore(&injected).expect("restore incident");
    agent.wait_findings("incident cleared", |f| f.is_empty());
    let ok = agent.cli(&["check"]);
    assert_eq!(code(&ok), 0, "{}", stdout(&ok));
    let metrics = agent.metrics_text();
    assert!(
        metrics.contains(&line.replace("} 1", "} 0")),
        "cleared finding still counted:\n{metrics}"
    );
    let log = agent.log();
    assert!(log.contains("finding opened"), "{log}");
    assert!(log.contains("finding cleared"), "{log}");

    // SIGTERM: clean exit, socket removed, and then the plugin says UNKNOWN.
    let exit = agent.stop();
    assert!(exit.success(), "exit {exit}:\n{}", agent.log());
    assert!(!agent.socket.exists(), "socket left behind");
    let unknown = agent.cli(&["check"]);
    assert_eq!(code(&unknown), 3, "{}", stdout(&unknown));
    assert!(
        stdout(&unknown).starts_with("WATCHDOG UNKNOWN - "),
        "{}",
        stdout(&unknown)
    );
    let unreachable = agent.cli(&["status"]);
    assert_eq!(code(&unreachable), 3);
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach daemon"));
}

#[test]
fn overrun_leaves_state_exact() {
    let mut lab = build_lab();
    // A tiny receive buffer: a burst of route changes overflows it (ENOBUFS).
    let agent = Agent::start(&mut lab, NODE, "", "\n[netlink]\nreceive_buffer = 2048\n");
    let netns = lab.node(NODE).netns.clone();
    let batch = |name: &str, lines: &[String]| {
        let path = agent.dir.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let out = Command::new("ip")
            .args(["-n", &netns, "-batch"])
            .arg(&path)
            .output()
            .expect("ip -batch");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // 3000 secondary addresses on lo: deleting the primary removes them all inside one
    // syscall, thousands of notifications (addresses and their local routes) at once.
    let out = lab
        .exec(
            NODE,
            &["sysctl", "-qw", "net.ipv4.conf.lo.promote_secondaries=0"],
        )
        .expect("sysctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut addrs = vec!["addr add 10.201.0.1/16 dev lo".to_string()];
    let mut routes = Vec::new();
    for i in 0..3000u32 {
        let (a, b) = (i / 250 + 1, i % 250 + 1);
        addrs.push(format!("addr add 10.201.{a}.{b}/16 dev lo"));
        routes.push(format!("route add 10.200.{a}.{b}/32 dev lo"));
    }
    batch("addrs.batch", &addrs);
    batch("routes.batch", &routes);
    // Break the overlay right behind the burst, so the one change that matters arrives while
    // the socket is overflowing.
    batch(
        "burst.batch",
        &["addr del 10.201.0.1/16 dev lo".to_string()],
    );
    let injected = lab.inject(Fault::incident(NODE)).expect("inject");
    let deletes: Vec<String> = routes
        .iter()
        .map(|r| r.replace("route add", "route del"))
        .collect();
    batch("routes-del.batch", &deletes);
    let incident = Fault::incident(NODE);
    let expected = incident.expected_checks();
    agent.wait_findings("incident after overrun", |f| {
        f.iter().any(|f| expected.contains(&f.check.as_str()))
    });
    let status = agent.status();
    assert!(
        status.resync.overruns > 0,
        "no overrun was provoked; the test proves nothing:\n{}",
        agent.log()
    );
    assert!(status.resync.count >= 2, "overrun must trigger a resync");
    let metrics = agent.metrics_text();
    assert!(
        !metrics.contains("dataplane_watchdog_netlink_overruns_total 0\n"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("dataplane_watchdog_resyncs_total{reason=\"overrun\"} 0\n"),
        "{metrics}"
    );
    // Exact: the daemon agrees with a fresh scan, well before any periodic resync.
    let started = Instant::now();
    loop {
        let (daemon, scan) = (identity(&agent.findings()), identity(&agent.scan()));
        if daemon == scan {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "daemon and scan disagree after the overrun:\ndaemon: {daemon:#?}\nscan: {scan:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    lab.restore(&injected).expect("restore");
    agent.wait_findings("cleared after overrun", |f| f.is_empty());
}

#[test]
fn device_delete_and_recreate_is_picked_up() {
    let mut lab = build_lab();
    let agent = Agent::start(&mut lab, NODE, "", "");
    let before = agent.status().devices[0].ifindex.expect("device present");
    let dev = lab.device();

    lab.ip(NODE, &["link", "del", dev]).expect("delete device");
    agent.wait_findings("device-missing", |f| {
        f.iter().any(|f| f.check.as_str() == "device-missing")
    });
    assert!(!agent.status().devices[0].present);

    // Re-create it the way the lab (and Felix) does, with everything on it.
    let me = lab.node(NODE).clone();
    let mut ip_cmds = vec![
        format!(
            "link add {dev} type vxlan id 4096 dstport 4789 local {} dev {UNDERLAY_IF} nolearning",
            me.node_ip
        ),
        format!("link set {dev} mtu {OVERLAY_MTU} address {}", me.vtep_mac),
        format!("addr add {}/32 dev {dev}", me.vtep_ip),
        format!("link set {dev} up"),
    ];
    let mut bridge_cmds = Vec::new();
    for peer in lab.nodes().iter().filter(|p| p.name != NODE) {
        for b in &peer.blocks {
            ip_cmds.push(format!(
                "route replace {b} via {} dev {dev} onlink",
                peer.vtep_ip
            ));
        }
        ip_cmds.push(format!(
            "neigh replace {} lladdr {} dev {dev} nud permanent",
            peer.vtep_ip, peer.vtep_mac
        ));
        bridge_cmds.push(format!(
            "fdb append {} dev {dev} dst {} self permanent",
            peer.vtep_mac, peer.node_ip
        ));
    }
    let netns = me.netns.clone();
    for (tool, cmds) in [("ip", ip_cmds), ("bridge", bridge_cmds)] {
        let path = agent.dir.path().join(format!("recreate.{tool}"));
        std::fs::write(&path, cmds.join("\n") + "\n").unwrap();
        let out = Command::new(tool)
            .args(["-n", &netns, "-batch"])
            .arg(&path)
            .output()
            .expect("batch");
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    agent.wait_findings("healthy again after re-create", |f| f.is_empty());
    let status = agent.status();
    let after = status.devices[0].ifindex.expect("device back");
    assert_ne!(before, after, "a re-created device has a new ifindex");
    assert!(status.devices[0].routes >= 7, "{:?}", status.devices[0]);

    // Still watching the new device: a fault on it is seen.
    let fault = Fault::incident(NODE);
    let expected = fault.expected_checks();
    lab.inject(fault).expect("inject");
    agent.wait_findings("incident on the re-created device", |f| {
        f.iter().any(|f| expected.contains(&f.check.as_str()))
    });
}

#[test]
fn unknown_when_no_daemon_and_bad_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let out = Command::new(BIN)
        .args(["check", "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(code(&out), 3, "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("WATCHDOG UNKNOWN - "),
        "{}",
        stdout(&out)
    );

    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "resync_interval = \"fast\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("resync_interval"), "{err}");
    // `status`/`check` take the socket from the config.
    let config = dir.path().join("ok.toml");
    std::fs::write(
        &config,
        format!("[status]\nsocket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(code(&out), 3);
    assert!(
        stdout(&out).contains(socket.to_str().unwrap()),
        "{}",
        stdout(&out)
    );
}

/// Every fault kind, with real traffic and eBPF accounting on, on Calico and on flannel: each
/// fault's finding appears, the repair clears everything — including drops of packets that were
/// queued behind the fault and freed after it — and the healthy node then stays silent past
/// the drop window. A false alarm anywhere in that sequence fails the test.
fn every_fault_under_traffic_then_silence(spec: LabSpec, node: &str, peer: &str) {
    let mut lab = Lab::build(spec)
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"));
    lab.set_traffic_grace(Duration::from_millis(300));
    let agent = Agent::start_with_ebpf(&mut lab, node);
    let ebpf = agent.status().ebpf;
    assert!(
        !ebpf.attached.is_empty(),
        "eBPF not attached: {:?}",
        ebpf.error
    );
    for r in lab.traffic_matrix(3).expect("healthy traffic") {
        assert!(r.all_delivered(), "healthy lab lost packets: {r}");
    }
    // Drop counters are polled once a second: give them two polls.
    agent.quiet_for("healthy under traffic", Duration::from_secs(2));

    let faults = [
        Fault::gateway_not_a_vtep(node, peer),
        Fault::stale_vtep(node, peer),
        Fault::neighbour_removed(node, peer),
        Fault::neighbour_wrong_mac(node, peer),
        Fault::fdb_removed(node, peer),
        Fault::fdb_wrong_destination(node, peer),
        Fault::route_removed(node, peer),
    ];
    for fault in faults {
        let expected = fault.expected_checks();
        let injected = lab.inject(fault).expect("inject");
        lab.traffic(node, peer, 3).expect("traffic into the fault");
        agent.wait_findings(&injected.description, |f| {
            f.iter().any(|f| {
                expected.contains(&f.check.as_str()) && f.peer_node.as_deref() == Some(peer)
            })
        });
        lab.restore(&injected).expect("restore");
        agent.wait_findings(&format!("cleared: {}", injected.description), |f| {
            f.is_empty()
        });
    }
    for r in lab.traffic_matrix(3).expect("traffic after the repairs") {
        assert!(r.all_delivered(), "repaired lab lost packets: {r}");
    }
    // Past the drop window (10 s) and the grace after the last explained drop (10 s).
    agent.quiet_for("after the repairs", Duration::from_secs(12));
    let drops = agent.status().drops;
    assert!(
        drops
            .by_peer
            .get(peer)
            .is_some_and(|r| r.values().sum::<u64>() > 0),
        "the faults blackholed traffic to {peer}, yet no drop was attributed to it: {drops:?}"
    );
    // The peer table says the same (written only when a total changes).
    let status = agent.status();
    let row = status
        .peers
        .iter()
        .find(|p| p.name == peer)
        .expect("peer row");
    assert_eq!(
        row.drops,
        status.drops.by_peer[peer].values().sum::<u64>(),
        "{row:?}"
    );
}

#[test]
fn calico_every_fault_under_traffic_then_silence() {
    every_fault_under_traffic_then_silence(LabSpec::calico(3), "node1", "node2");
}

#[test]
fn flannel_every_fault_under_traffic_then_silence() {
    every_fault_under_traffic_then_silence(LabSpec::flannel(3), "node1", "node2");
}

/// The daemon on a dual-stack node: silent while both overlays carry traffic, the incident on
/// the IPv6 overlay alone is found there and clears when Felix's route is back.
#[test]
fn dual_stack_daemon_is_silent_then_finds_the_v6_incident_on_v6() {
    let mut lab = build_lab();
    lab.add_ipv6_overlay().expect("adding the IPv6 overlay");
    let agent = Agent::start_with_ebpf(&mut lab, "k8s01");
    for peer in ["k8s02", "k8s03"] {
        assert!(lab.traffic("k8s01", peer, 3).unwrap().all_delivered());
        let (sent, got) = lab.traffic_v6("k8s01", peer, 3).unwrap();
        assert_eq!(got, sent, "IPv6 k8s01 -> {peer}");
    }
    agent.quiet_for("healthy dual stack", Duration::from_secs(2));

    let k8s03 = lab.ipv6_of("k8s03");
    let (block, base) = (k8s03.block.to_string(), k8s03.block.network().to_string());
    lab.ip(
        "k8s01",
        &[
            "route",
            "replace",
            &block,
            "via",
            &base,
            "dev",
            watchdog_lab::DEVICE_V6,
            "onlink",
        ],
    )
    .unwrap();
    // Traffic into the fault until the kernel's drops are attributed to k8s03 and explained.
    let blackholed_on_v6 = |f: &[Finding]| {
        f.iter().any(|f| {
            f.check.as_str() == "traffic-blackholed" && f.evidence.drops.is_some_and(|n| n > 0)
        }) && f.iter().any(|f| f.check.as_str() == "gateway-wrong-vtep")
    };
    let started = Instant::now();
    while !blackholed_on_v6(&agent.findings()) && started.elapsed() < DEADLINE {
        let _ = lab.traffic_v6("k8s01", "k8s03", 3);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (found, _) = agent.wait_findings("IPv6 incident with its drops", blackholed_on_v6);
    assert!(
        found.iter().all(|f| f.device == watchdog_lab::DEVICE_V6
            && f.family == Some(Family::V6)
            && f.peer_node.as_deref() == Some("k8s03")),
        "{found:#?}"
    );
    let wrong = found
        .iter()
        .find(|f| f.check.as_str() == "gateway-wrong-vtep")
        .unwrap();
    assert!(wrong.evidence.drops.is_some_and(|n| n > 0), "{wrong:#?}");
    let drops = agent.status().drops;
    assert!(
        drops
            .by_peer
            .get("k8s03")
            .is_some_and(|r| r.values().sum::<u64>() > 0),
        "{drops:?}"
    );
    let metrics = agent.metrics_text();
    let line = "dataplane_watchdog_findings{check=\"gateway-wrong-vtep\",severity=\"critical\",family=\"ipv6\"} 1";
    assert!(metrics.contains(line), "no `{line}` in\n{metrics}");
    lab.heal_ipv6("k8s01").unwrap();
    agent.wait_findings("IPv6 incident cleared", |f| f.is_empty());
    let (sent, got) = lab.traffic_v6("k8s01", "k8s03", 3).unwrap();
    assert_eq!(got, sent, "IPv6 after healing");
}
