//! `watchdog run` pages through a loopback receiver: the incident in a lab node is spooled
//! while the receiver is down, survives `kill -9`, is delivered exactly once after the restart
//! with the receiver back, and resolves after the restore. The receiver listens on the host's
//! 127.0.0.1 while the daemon watches the lab node through `--netns`: delivery proves the sinks
//! are reached from the agent's own namespace.
//!
//! Needs root (network namespaces); `cargo xtask test` runs it.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use dataplane_watchdog::serve::{client, Status};
use watchdog_lab::{
    receiver::{Received, Receiver},
    Fault, Lab, LabSpec,
};

const BIN: &str = env!("CARGO_BIN_EXE_watchdog");
const NODE: &str = "k8s01";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

struct Agent {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(config: &Path, netns: &Path, socket: &Path, log: &Path) -> Agent {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .arg("--netns")
            .arg(netns)
            .env("WATCHDOG_LOG", "info,netlink_packet_route=error")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start watchdog run");
        let mut agent = Agent {
            child: Some(child),
            socket: socket.to_path_buf(),
            log: log.to_path_buf(),
        };
        agent.wait(Duration::from_secs(10), "in sync", |s| s.in_sync);
        agent
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn status(&self) -> Option<Status> {
        rt().block_on(client::fetch_status(&self.socket, Duration::from_secs(2)))
            .ok()
    }

    fn wait(&mut self, within: Duration, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let started = Instant::now();
        loop {
            if let Some(s) = self.status() {
                if pred(&s) {
                    return s;
                }
            }
            if let Some(Ok(Some(exit))) = self.child.as_mut().map(Child::try_wait) {
                panic!("watchdog run exited ({exit}):\n{}", self.log());
            }
            assert!(
                started.elapsed() < within,
                "{what}: not within {within:?}; status: {:?}\n{}",
                self.status().map(|s| s.alerts),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown step runs.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn wait_received(rx: &Receiver, n: usize, within: Duration, agent: &Agent) -> Vec<Received> {
    let got = rx.wait_for(n, within);
    assert!(
        got.len() >= n,
        "receiver got {} of {n} within {within:?}\n{}",
        got.len(),
        agent.log()
    );
    got
}

#[test]
fn daemon_pages_once_through_kill_9_and_resolves_after_restore() {
    let mut lab = Lab::build(LabSpec::incident())
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let datastore = lab.write_datastore().expect("write datastore");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let socket = dir.path().join("status.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"alert\"\n{}\n[status]\nsocket = \"{}\"\n[metrics]\nlisten = \"off\"\n\
             [ebpf]\nenabled = false\n[alerts]\npending_for = \"1s\"\nspool_dir = \"{}\"\n\
             [[alerts.sinks]]\nname = \"hook\"\nkind = \"webhook\"\n\
             url = \"http://127.0.0.1:{port}/hook/SECRETPATH\"\ntimeout = \"1s\"\n",
            lab.agent_config_toml(NODE, &datastore),
            socket.display(),
            dir.path().join("spool").display(),
        ),
    )
    .expect("write config");
    let netns = lab.netns_path(NODE);
    let log = dir.path().join("agent.log");

    // Receiver down: the page is spooled and retried.
    let mut agent = Agent::start(&config, &netns, &socket, &log);
    let fault = lab.inject(Fault::incident(NODE)).expect("inject incident");
    let st = agent.wait(Duration::from_secs(8), "page spooled and failing", |s| {
        s.alerts.pending >= 1
            && s.alerts
                .sinks
                .first()
                .is_some_and(|k| k.last_error.is_some())
    });
    let sink = &st.alerts.sinks[0];
    assert_eq!(
        (sink.name.as_str(), sink.kind.as_str()),
        ("hook", "webhook")
    );
    let shown = format!("{:?}", st.alerts);
    assert!(!shown.contains("SECRETPATH"), "{shown}");
    agent.kill9();

    // Receiver back, daemon restarted over the same spool: delivered exactly once.
    let rx = Receiver::start_on(port);
    let mut agent = Agent::start(&config, &netns, &socket, &log);
    let got = wait_received(&rx, 1, Duration::from_secs(10), &agent);
    let first = got[0].json();
    assert_eq!(first["status"], "firing");
    assert_eq!(first["node"], NODE);
    assert_eq!(first["finding"]["peer_node"], "k8s03");
    // No second page from the restarted daemon for the still-open finding.
    std::thread::sleep(Duration::from_secs(3));
    let got = rx.received();
    assert_eq!(got.len(), 1, "paged {} times: {got:?}", got.len());

    // Restore: one resolve, same key, within a few seconds.
    let restored = Instant::now();
    lab.restore(&fault).expect("restore");
    let got = wait_received(&rx, 2, Duration::from_secs(8), &agent);
    let resolve = got[1].json();
    assert_eq!(resolve["status"], "resolved");
    assert_eq!(resolve["dedup_key"], first["dedup_key"]);
    assert!(
        got[1].at - restored < Duration::from_secs(5),
        "resolve {:?} after the restore",
        got[1].at - restored
    );
    let st = agent.wait(Duration::from_secs(3), "sent counted", |s| {
        s.alerts.pending == 0 && s.alerts.sinks[0].sent >= 1
    });
    assert!(st.alerts.sinks[0].last_success.is_some());
    assert!(!agent.log().contains("SECRETPATH"), "secret in the log");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rx.received().len(), 2, "{:?}", rx.received());
}

#[test]
fn observe_mode_sends_nothing() {
    let mut lab = Lab::build(LabSpec::incident())
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let datastore = lab.write_datastore().expect("write datastore");
    let rx = Receiver::start();
    let socket = dir.path().join("status.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "mode = \"observe\"\n{}\n[status]\nsocket = \"{}\"\n[metrics]\nlisten = \"off\"\n\
             [ebpf]\nenabled = false\n[alerts]\npending_for = \"0s\"\nspool_dir = \"{}\"\n\
             [[alerts.sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
            lab.agent_config_toml(NODE, &datastore),
            socket.display(),
            dir.path().join("spool").display(),
            rx.url("/hook"),
        ),
    )
    .expect("write config");
    let mut agent = Agent::start(
        &config,
        &lab.netns_path(NODE),
        &socket,
        &dir.path().join("log"),
    );
    let _fault = lab.inject(Fault::incident(NODE)).expect("inject incident");
    agent.wait(Duration::from_secs(5), "finding open", |s| {
        !s.findings.is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        rx.received().is_empty(),
        "observe mode paged: {:?}",
        rx.received()
    );
    assert!(
        !dir.path().join("spool").exists(),
        "observe mode opened a spool"
    );
}
