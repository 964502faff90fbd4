//! Alert delivery against real receivers on loopback (webhook, Slack, PagerDuty stand-ins
//! that record requests) and the real Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`, installed by `cargo xtask test` or by the test itself when run as
//! root). No network namespaces: sinks are reached from the agent's own namespace.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use dataplane_watchdog::{
    act::alerts::{webhook, Alerter, ReqwestTransport},
    config::{AlertsConfig, Config},
    model::{v4, CheckId, Finding, Severity},
};
use watchdog_lab::receiver::{Receiver, Reply};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn incident() -> Finding {
    let mut f = Finding::new(
        CheckId::GatewayWrongVtep,
        Severity::Critical,
        "vxlan.calico",
        "route 10.1.235.128/26 via 10.1.235.128 is not k8s03's VTEP 10.1.235.133".into(),
    );
    f.route = Some("10.1.235.128/26".into());
    f.gateway = Some(v4(10, 1, 235, 128));
    f.expected_gateway = Some(v4(10, 1, 235, 133));
    f.peer_node = Some("k8s03".into());
    f.since = Some(SystemTime::now());
    f.hint =
        Some("ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink".into());
    f.evidence.routes = vec!["10.1.235.128/26".into()];
    f.evidence.drops = Some(1234);
    f
}

/// `[alerts]` from TOML (the sinks' part), with the spool in `dir`.
fn alerts_config(dir: &Path, pending_for: &str, sinks: &str) -> AlertsConfig {
    let text = format!(
        "[alerts]\npending_for = \"{pending_for}\"\nspool_dir = \"{}\"\n{sinks}",
        dir.display()
    );
    Config::from_toml(&text, Path::new("/test/config.toml"))
        .unwrap_or_else(|e| panic!("test config rejected: {e}"))
        .alerts
}

fn sink(name: &str, kind: &str, url: &str, extra: &str) -> String {
    format!("[[alerts.sinks]]\nname = \"{name}\"\nkind = \"{kind}\"\nurl = \"{url}\"\ntimeout = \"2s\"\n{extra}\n")
}

struct Driver {
    rt: tokio::runtime::Runtime,
    alerter: Alerter<ReqwestTransport>,
}

impl Driver {
    fn open(cfg: &AlertsConfig) -> Self {
        let transport = ReqwestTransport::new(Duration::from_secs(2)).unwrap();
        let alerter = Alerter::open(cfg, "k8s01", transport, None).expect("opening the alerter");
        Driver {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            alerter,
        }
    }

    fn observe(&mut self, open: &[Finding]) {
        let open: Vec<std::sync::Arc<Finding>> =
            open.iter().cloned().map(std::sync::Arc::new).collect();
        self.alerter.observe(&open, true, SystemTime::now());
        self.rt.block_on(self.alerter.step(SystemTime::now()));
    }

    /// Steps every 50 ms (the daemon steps every 250 ms) for `d`, or until `done`.
    fn run_until(&mut self, d: Duration, mut done: impl FnMut(&Alerter<ReqwestTransport>) -> bool) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            self.rt.block_on(self.alerter.step(SystemTime::now()));
            if done(&self.alerter) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }
}

#[test]
fn webhook_retries_a_500_with_the_same_id_and_a_valid_signature() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.push(Reply::status(500).body("busy"));
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let cfg = alerts_config(
        &dir.path().join("spool"),
        "0s",
        &sink(
            "hook",
            "webhook",
            &rx.url("/hook"),
            &format!("secret_file = \"{}\"", secret.display()),
        ),
    );
    let mut d = Driver::open(&cfg);
    d.observe(&[incident()]);
    let got = {
        d.run_until(Duration::from_secs(5), |a| a.pending() == 0);
        rx.received()
    };
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].answered, got[1].answered), (500, 200));
    let id = got[0].header("webhook-id").unwrap();
    assert!(id.starts_with("msg_"));
    assert_eq!(
        got[1].header("webhook-id"),
        Some(id),
        "a retry must keep the webhook-id"
    );
    let key = webhook::decode_secret(SECRET).unwrap();
    for r in &got {
        let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(ts) < 30, "timestamp {ts} is not now");
        assert_eq!(
            r.header("webhook-signature").unwrap(),
            webhook::sign(&key, id, ts, &r.body),
            "signature does not verify"
        );
    }
    let body = got[1].json();
    assert_eq!(body["version"], 1);
    assert_eq!(body["status"], "firing");
    assert_eq!(body["node"], "k8s01");
    assert_eq!(body["test"], false);
    assert!(body["resolved_at"].is_null());
    assert_eq!(body["finding"]["check"], "gateway-wrong-vtep");
    assert_eq!(body["finding"]["peer_node"], "k8s03");
    d.run_for(Duration::from_millis(1500));
    assert_eq!(rx.received().len(), 2, "delivered again after a 2xx");
    let st = d.alerter.status(SystemTime::now());
    assert_eq!((st.sent, st.failed, st.pending), (1, 0, 0));
}

#[test]
fn a_400_is_permanent_and_a_429_retry_after_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    rx.push(Reply::status(400).body("no such channel"));
    let cfg = alerts_config(
        dir.path(),
        "0s",
        &sink("hook", "webhook", &rx.url("/hook"), ""),
    );
    let mut d = Driver::open(&cfg);
    d.observe(&[incident()]);
    d.run_for(Duration::from_millis(2500));
    assert_eq!(rx.received().len(), 1, "a 400 was retried");
    let st = d.alerter.status(SystemTime::now());
    assert_eq!((st.sent, st.failed, st.pending), (0, 1, 0));
    assert_eq!(
        st.sinks[0].last_error.as_deref(),
        Some("HTTP 400: no such channel")
    );

    // The resolve meets a 429 with Retry-After: 2.
    rx.push(Reply::status(429).header("retry-after", "2"));
    d.observe(&[]);
    d.run_until(Duration::from_secs(6), |a| a.pending() == 0);
    let got = rx.received();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[1].answered, 429);
    let waited = got[2].at - got[1].at;
    assert!(
        waited >= Duration::from_millis(1950) && waited < Duration::from_secs(4),
        "retried after {waited:?}, Retry-After said 2s"
    );
    assert_eq!(got[2].json()["status"], "resolved");
}

#[test]
fn incident_fires_once_per_sink_within_pending_for_and_resolves_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let key_file = dir.path().join("pd-key");
    std::fs::write(&key_file, "R0UT1NGKEY0123456789").unwrap();
    let sinks = [
        sink("hook", "webhook", &rx.url("/hook"), ""),
        sink("chat", "slack", &rx.url("/services/T0/B0/XXXXSECRET"), ""),
        sink(
            "oncall",
            "pagerduty",
            &rx.url("/v2/enqueue"),
            &format!("routing_key_file = \"{}\"", key_file.display()),
        ),
    ]
    .concat();
    let cfg = alerts_config(&dir.path().join("spool"), "2s", &sinks);
    let mut d = Driver::open(&cfg);
    let opened = Instant::now();
    d.observe(&[incident()]);
    d.run_until(Duration::from_secs(5), |_| rx.received().len() >= 3);
    let fired = rx.received();
    assert_eq!(fired.len(), 3, "{fired:?}");
    for r in &fired {
        let after = r.at - opened;
        assert!(
            after >= Duration::from_secs(2) && after <= Duration::from_secs(3),
            "{} received {after:?} after the finding opened (pending_for 2s + 1s)",
            r.path
        );
    }
    let by = |p: &str, all: &[watchdog_lab::receiver::Received]| {
        all.iter()
            .filter(|r| r.path.starts_with(p))
            .map(|r| r.json())
            .collect::<Vec<_>>()
    };
    let pd = by("/v2/enqueue", &fired);
    assert_eq!(pd.len(), 1);
    let t = &pd[0];
    assert_eq!(t["event_action"], "trigger");
    assert_eq!(t["routing_key"], "R0UT1NGKEY0123456789");
    assert_eq!(t["payload"]["source"], "k8s01");
    assert_eq!(t["payload"]["severity"], "critical");
    assert_eq!(t["payload"]["component"], "vxlan.calico");
    assert_eq!(t["payload"]["group"], "k8s03");
    assert_eq!(t["payload"]["class"], "gateway-wrong-vtep");
    assert_eq!(
        t["payload"]["custom_details"]["expected_gateway"],
        "10.1.235.133"
    );
    let slack = by("/services/", &fired);
    assert!(slack[0]["text"]
        .as_str()
        .unwrap()
        .starts_with("critical gateway-wrong-vtep on k8s01"));
    assert_eq!(slack[0]["blocks"][0]["type"], "header");

    d.run_for(Duration::from_secs(1));
    assert_eq!(rx.received().len(), 3, "paged twice");
    let cleared = Instant::now();
    d.observe(&[]);
    d.run_until(Duration::from_secs(4), |_| rx.received().len() >= 6);
    let all = rx.received();
    assert_eq!(all.len(), 6, "{all:?}");
    for r in &all[3..] {
        assert!(
            r.at - cleared < Duration::from_secs(3),
            "resolve took {:?}",
            r.at - cleared
        );
    }
    let pd = by("/v2/enqueue", &all);
    assert_eq!(pd[1]["event_action"], "resolve");
    assert_eq!(pd[1]["dedup_key"], pd[0]["dedup_key"]);
    let hooks = by("/hook", &all);
    assert_eq!(hooks[1]["status"], "resolved");
    assert_eq!(hooks[1]["dedup_key"], hooks[0]["dedup_key"]);
    assert!(!hooks[1]["resolved_at"].is_null());
    assert!(by("/services/", &all)[1]["text"]
        .as_str()
        .unwrap()
        .starts_with("RESOLVED"));
}

#[test]
fn a_50ms_transient_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let cfg = alerts_config(
        dir.path(),
        "2s",
        &sink("hook", "webhook", &rx.url("/hook"), ""),
    );
    let mut d = Driver::open(&cfg);
    d.observe(&[incident()]);
    std::thread::sleep(Duration::from_millis(50));
    d.observe(&[]);
    d.run_for(Duration::from_secs(3));
    assert!(
        rx.received().is_empty(),
        "a transient paged: {:?}",
        rx.received()
    );
    assert_eq!(d.alerter.pending(), 0);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn receiver_down_then_restart_then_receiver_back_delivers_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let cfg = alerts_config(dir.path(), "0s", &sink("hook", "webhook", &url, ""));
    {
        let mut d = Driver::open(&cfg);
        d.observe(&[incident()]);
        d.run_for(Duration::from_millis(1500));
        assert_eq!(d.alerter.pending(), 1);
        let st = d.alerter.status(SystemTime::now());
        let err = st.sinks[0].last_error.clone().unwrap_or_default();
        assert!(err.contains("connect"), "{err}");
        // Dropped with no shutdown step: all the next run has is the spool directory.
    }
    let rx = Receiver::start_on(port);
    let mut d = Driver::open(&cfg);
    assert_eq!(
        d.alerter.pending(),
        1,
        "the pending notification did not survive"
    );
    // The restarted daemon's first evaluation still has the finding open.
    d.observe(&[incident()]);
    d.run_until(Duration::from_secs(5), |a| a.pending() == 0);
    d.run_for(Duration::from_secs(1));
    let got = rx.received();
    assert_eq!(got.len(), 1, "delivered {} times", got.len());
    assert_eq!(got[0].json()["status"], "firing");
}

#[test]
fn restart_with_open_findings_does_not_page_again_and_resolves_what_cleared_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    let cfg = alerts_config(
        dir.path(),
        "0s",
        &sink("hook", "webhook", &rx.url("/hook"), ""),
    );
    let a = incident();
    let mut b = incident();
    b.peer_node = Some("k8s04".into());
    {
        let mut d = Driver::open(&cfg);
        d.observe(&[a.clone(), b.clone()]);
        d.run_until(Duration::from_secs(3), |al| al.pending() == 0);
        assert_eq!(rx.received().len(), 2);
    }
    let mut d = Driver::open(&cfg);
    // Before the first in-sync evaluation nothing is decided.
    d.alerter
        .observe(&[std::sync::Arc::new(a.clone())], false, SystemTime::now());
    d.run_for(Duration::from_millis(500));
    assert_eq!(rx.received().len(), 2);
    d.observe(std::slice::from_ref(&a));
    d.run_for(Duration::from_secs(2));
    let got = rx.received();
    assert_eq!(got.len(), 3, "{got:?}");
    let last = got[2].json();
    assert_eq!(last["status"], "resolved");
    assert_eq!(last["finding"]["peer_node"], "k8s04");
}

#[test]
fn secrets_are_absent_from_logs_and_status() {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Buf::default();
    let w = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start();
    // A receiver that echoes the secret back in its errors.
    rx.push(Reply::status(500).body("bad token XXXXSECRET"));
    rx.push(Reply::status(404).body("no_service for /services/T0/B0/XXXXSECRET"));
    let url_file = dir.path().join("slack-url");
    std::fs::write(&url_file, rx.url("/services/T0/B0/XXXXSECRET")).unwrap();
    let down = format!("http://127.0.0.1:{}/services/T1/B1/YYYYSECRET", free_port());
    let sinks = format!(
        "[[alerts.sinks]]\nname = \"chat\"\nkind = \"slack\"\nurl_file = \"{}\"\n{}",
        url_file.display(),
        sink("down", "slack", &down, "")
    );
    let cfg = alerts_config(&dir.path().join("spool"), "0s", &sinks);
    let status = tracing::subscriber::with_default(subscriber, || {
        let mut d = Driver::open(&cfg);
        d.observe(&[incident()]);
        d.run_for(Duration::from_secs(2));
        d.alerter.status(SystemTime::now())
    });
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let status = serde_json::to_string(&status).unwrap();
    assert!(logs.contains("alert delivery failed"), "{logs}");
    assert!(status.contains("HTTP 404"), "{status}");
    for secret in ["XXXXSECRET", "YYYYSECRET", "/services/T"] {
        assert!(!logs.contains(secret), "{secret} in the logs:\n{logs}");
        assert!(
            !status.contains(secret),
            "{secret} in the status:\n{status}"
        );
    }
    assert!(
        logs.contains(&format!("http://127.0.0.1:{}/…", rx.port())),
        "{logs}"
    );
}

// ------------------------------------------------------------------------------------------
// The real Prometheus Alertmanager
// ------------------------------------------------------------------------------------------

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// Installs Debian's package when missing (as root); fails loudly when it cannot.
fn ensure_alertmanager() {
    if Path::new(ALERTMANAGER).exists() {
        return;
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        for args in [
            &["update", "-qq"][..],
            &["install", "-y", "-qq", "prometheus-alertmanager"][..],
        ] {
            let _ = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    }
    assert!(
        Path::new(ALERTMANAGER).exists(),
        "{ALERTMANAGER} is missing and could not be installed: run `apt-get install \
         prometheus-alertmanager` (cargo xtask test does it as root)"
    );
}

struct Alertmanager {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    fn start() -> Self {
        ensure_alertmanager();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: blackhole\n  group_wait: 1s\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting prometheus-alertmanager");
        let am = Alertmanager {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if am.get("/-/ready").is_some_and(|(code, _)| code == 200) {
                return am;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("alertmanager did not become ready on port {port}");
    }

    /// (status code, body) of a GET, `None` if it cannot connect.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    }

    fn alerts(&self) -> Vec<serde_json::Value> {
        let (code, body) = self.get("/api/v2/alerts").expect("GET /api/v2/alerts");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Vec<serde_json::Value>>(&body)
            .unwrap()
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == "DataplaneWatchdog")
            .collect()
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn real_alertmanager_shows_the_alert_firing_then_resolved() {
    let am = Alertmanager::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = alerts_config(
        dir.path(),
        "0s",
        &sink(
            "am",
            "alertmanager",
            &format!("http://127.0.0.1:{}", am.port),
            "",
        ),
    );
    let mut d = Driver::open(&cfg);
    d.observe(&[incident()]);
    d.run_until(Duration::from_secs(5), |a| a.pending() == 0);
    assert_eq!(d.alerter.status(SystemTime::now()).sinks[0].sent, 1);
    let alerts = am.alerts();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a["status"]["state"], "active");
    for (k, v) in [
        ("check", "gateway-wrong-vtep"),
        ("severity", "critical"),
        ("node", "k8s01"),
        ("peer_node", "k8s03"),
        ("device", "vxlan.calico"),
    ] {
        assert_eq!(a["labels"][k], v, "label {k}: {a}");
    }
    assert!(a["labels"].get("test").is_none());
    assert!(a["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains("gateway-wrong-vtep on k8s01"));
    assert!(a["annotations"]["fix"]
        .as_str()
        .unwrap()
        .starts_with("ip route replace"));
    assert!(a["annotations"]["description"]
        .as_str()
        .unwrap()
        .contains("10.1.235.128/26"));
    // Firing: Alertmanager holds it for the 4 minutes it was told.
    let ends = humantime::parse_rfc3339_weak(a["endsAt"].as_str().unwrap()).unwrap();
    let ahead = ends.duration_since(SystemTime::now()).unwrap_or_default();
    assert!(
        ahead > Duration::from_secs(200),
        "endsAt only {ahead:?} ahead"
    );

    d.observe(&[]);
    d.run_until(Duration::from_secs(5), |a| a.pending() == 0);
    assert_eq!(d.alerter.status(SystemTime::now()).sinks[0].sent, 2);
    // Resolved: ended at the clear, so no longer among the active alerts.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alerts = am.alerts();
        if alerts.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still listed after the resolve: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
