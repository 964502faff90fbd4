//! The status API over a real Unix socket and /metrics over real TCP (loopback), with a
//! fabricated status. No root needed.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use dataplane_watchdog::{
    model::{v4, CheckId, Finding, Severity},
    serve::{
        client::{self, ClientError},
        status::{PeerStatus, Verdict},
        CheckArgs, Metrics, MetricsServer, ServeError, Status, StatusArgs, StatusHandle,
        StatusServer, StatusServerOptions,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::oneshot,
};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let p = std::env::temp_dir().join(format!(
            "wd-serve-it-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        TempDir(p)
    }
    /// Socket inside a sub-directory that does not exist yet: the server must create it.
    fn socket(&self) -> PathBuf {
        self.0.join("run").join("status.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn incident_status() -> Status {
    let mut s = Status::starting("k8s01", "alert", "calico", SystemTime::now());
    s.in_sync = true;
    s.datastore.source = "kubernetes".into();
    s.datastore.last_event_age_seconds = Some(2.0);
    for (name, last) in [("k8s02", 2), ("k8s03", 3)] {
        std::sync::Arc::make_mut(&mut s.peers).push(PeerStatus {
            name: name.into(),
            vtep: v4(10, 1, last, 0),
            node_ip: None,
            blocks: vec![format!("10.1.{last}.0/26").parse().unwrap()],
            verdict: Verdict::Ok,
            findings: 0,
            drops: 0,
        });
    }
    let mut f = Finding::new(
        CheckId::GatewayWrongVtep,
        Severity::Critical,
        "vxlan.calico",
        "route to k8s03 goes via a gateway that is not its VTEP".into(),
    );
    f.peer_node = Some("k8s03".into());
    f.route = Some("10.1.3.0/26".into());
    f.since = Some(SystemTime::now() - Duration::from_secs(300));
    f.hint = Some("ip route replace 10.1.3.0/26 via 10.1.3.5 dev vxlan.calico onlink".into());
    std::sync::Arc::make_mut(&mut s.findings).push(f.into());
    // As the checks would judge it.
    std::sync::Arc::make_mut(&mut s.peers)[1].verdict = Verdict::Critical;
    std::sync::Arc::make_mut(&mut s.peers)[1].findings = 1;
    s
}

struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    path: PathBuf,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn start(opts: &StatusServerOptions, handle: StatusHandle) -> Running {
    let server = StatusServer::bind(opts).expect("bind status socket");
    let path = server.path().to_path_buf();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(server.run(handle, async {
        let _ = rx.await;
    }));
    Running {
        stop: Some(tx),
        task,
        path,
    }
}

async fn raw_unix(path: &Path, request: &str) -> String {
    let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn status_api_serves_reads_and_refuses_writes() {
    let dir = TempDir::new();
    let opts = StatusServerOptions {
        socket: dir.socket(),
        ..Default::default()
    };
    let handle = StatusHandle::new(incident_status());
    let srv = start(&opts, handle.clone());

    let mode = std::fs::metadata(&srv.path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket must be owner-only by default");

    // /healthz before any tick: 503.
    match client::fetch(&srv.path, "/healthz", Duration::from_secs(5)).await {
        Err(ClientError::Status { status, body, .. }) => {
            assert_eq!(status.as_u16(), 503);
            assert!(body.contains("\"stale\""), "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    handle.tick().await;
    let body = client::fetch(&srv.path, "/healthz", Duration::from_secs(5))
        .await
        .unwrap();
    let health: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(health["status"], "ok");

    // /status is the whole model and round-trips.
    let got = client::fetch_status(&srv.path, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got, handle.snapshot().await);
    assert_eq!(got.peers[1].verdict, Verdict::Critical);

    // /findings is just the list.
    let body = client::fetch(&srv.path, "/findings", Duration::from_secs(5))
        .await
        .unwrap();
    let findings: Vec<Finding> = serde_json::from_slice(&body).unwrap();
    assert_eq!(findings.len(), 1);
    assert_eq!(findings[0].check, CheckId::GatewayWrongVtep);

    // Read-only: POST/DELETE are 405 with Allow, unknown paths 404.
    for method in ["POST", "PUT", "DELETE"] {
        let resp = raw_unix(
            &srv.path,
            &format!("{method} /status HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert!(resp.starts_with("HTTP/1.1 405"), "{method}: {resp}");
        assert!(resp.to_ascii_lowercase().contains("allow: get, head"));
    }
    let resp = raw_unix(
        &srv.path,
        "HEAD /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.ends_with("\r\n\r\n"),
        "HEAD must not send a body: {resp}"
    );
    let resp = raw_unix(
        &srv.path,
        "GET /repair HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    // The CLI entry points against the live daemon.
    let check = CheckArgs {
        socket: Some(srv.path.clone()),
        ..Default::default()
    };
    assert_eq!(
        client::run_check(check.clone()).await,
        2,
        "incident is CRITICAL"
    );
    handle
        .update(|s| {
            s.set_findings(Default::default(), &Default::default());
        })
        .await;
    assert_eq!(client::run_check(check.clone()).await, 0);
    handle.update(|s| s.datastore.stale = true).await;
    assert_eq!(client::run_check(check).await, 3);
    let status = StatusArgs {
        socket: Some(srv.path.clone()),
        ..Default::default()
    };
    assert_eq!(client::run_status(status.clone()).await, 0);
    assert_eq!(
        client::run_status(StatusArgs {
            json: true,
            ..status
        })
        .await,
        0
    );

    // A second daemon must not steal a live socket.
    match StatusServer::bind(&opts) {
        Err(ServeError::InUse { .. }) => {}
        other => panic!("expected InUse, got {other:?}"),
    }

    let path = srv.path.clone();
    srv.stop().await;
    assert!(!path.exists(), "socket removed on shutdown");
}

#[tokio::test]
async fn unreachable_daemon_exits_3() {
    let dir = TempDir::new();
    let missing = dir.socket();
    let check = CheckArgs {
        socket: Some(missing.clone()),
        ..Default::default()
    };
    assert_eq!(client::run_check(check).await, 3);
    let status = StatusArgs {
        socket: Some(missing.clone()),
        ..Default::default()
    };
    assert_eq!(client::run_status(status).await, 3);
    let err = client::fetch_status(&missing, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot reach daemon at {}: No such file or directory (is dataplane-watchdog running?)",
            missing.display()
        )
    );
}

#[tokio::test]
async fn stale_socket_is_replaced_and_group_mode_applies() {
    let dir = TempDir::new();
    let path = dir.socket();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket file left behind by a crashed daemon: nothing listens on it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());

    let opts = StatusServerOptions {
        socket: path.clone(),
        group: Some("0".into()),
        ..Default::default()
    };
    let srv = start(&opts, StatusHandle::new(incident_status()));
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);
    client::fetch_status(&path, Duration::from_secs(5))
        .await
        .unwrap();
    srv.stop().await;
}

async fn raw_tcp(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_exposes_contract_names() {
    let metrics = Arc::new(Metrics::new());
    metrics.set_findings(&incident_status().findings);
    metrics.observe_vxlan_drops_total("vxlan.calico", "NEIGH_FAILED", 42);
    metrics.set_datastore_last_event_age(Duration::from_secs(3));
    metrics.set_routes_checked(7);
    metrics.inc_resync("periodic");
    let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(metrics.clone(), async {
        let _ = rx.await;
    }));

    let resp = raw_tcp(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp
        .to_ascii_lowercase()
        .contains("content-type: application/openmetrics-text; version=1.0.0"));
    for (name, ty) in [
        ("dataplane_watchdog_findings", "gauge"),
        ("dataplane_watchdog_vxlan_drops", "counter"),
        (
            "dataplane_watchdog_datastore_last_event_age_seconds",
            "gauge",
        ),
        ("dataplane_watchdog_check_duration_seconds", "histogram"),
        ("dataplane_watchdog_routes_checked", "gauge"),
        ("dataplane_watchdog_resyncs", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_cpu_seconds", "counter"),
    ] {
        assert!(resp.contains(&format!("# TYPE {name} {ty}\n")), "{name}");
    }
    assert!(resp.contains(
        "dataplane_watchdog_findings{check=\"gateway-wrong-vtep\",severity=\"critical\"} 1\n"
    ));
    assert!(resp.contains(
        "dataplane_watchdog_vxlan_drops_total{device=\"vxlan.calico\",reason=\"NEIGH_FAILED\"} 42\n"
    ));
    assert!(resp.contains("dataplane_watchdog_routes_checked 7\n"));
    assert!(resp.contains("dataplane_watchdog_resyncs_total{reason=\"periodic\"} 1\n"));
    let rss_line = resp
        .lines()
        .find(|l| l.starts_with("process_resident_memory_bytes "))
        .unwrap();
    let rss: f64 = rss_line.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(rss > 1_000_000.0, "{rss_line}");

    let resp = raw_tcp(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    let resp = raw_tcp(
        addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}
