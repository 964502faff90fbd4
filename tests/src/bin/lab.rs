//! `watchdog-lab`: replays incident-k8s03 in network namespaces (run by `cargo xtask lab`).
//!
//! Builds the 3-node incident cluster, shows healthy pod-to-pod traffic, corrupts k8s01's and
//! k8s02's routes to k8s03 the way Felix did (via 10.1.235.128, nobody's VTEP), shows the
//! blackhole, restores and shows traffic back. Needs root.
//!
//! `--datastore kubernetes`: the agent reads the cluster from a fake API server (in this
//! process, on 127.0.0.1) serving the lab as Nodes + Calico IPAMBlocks, and the demo also shows
//! the incident's other half: the API server's watch goes silent while k8s03's VTEP changes —
//! what Felix missed — and a consistent list (the agent's relist) still sees the change.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use watchdog_lab::{
    fake_apiserver::{FakeApiServer, FakeConfig},
    kube_fixture, Fault, Lab, LabSpec,
};

/// Packets per destination address in each traffic check.
const PACKETS: u32 = 5;
/// The incident cluster's nodes.
const NODES: [&str; 3] = ["k8s01", "k8s02", "k8s03"];

/// The point in the story at which the agent is asked for its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy,
    WatchSilent,
    Corrupted,
    Restored,
}

/// Where the agent views read the cluster from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Datastore {
    File,
    Kubernetes,
}

const USAGE: &str = "usage: watchdog-lab [--datastore file|kubernetes]

Replays incident-k8s03 in network namespaces (needs root) and shows `watchdog scan` on every
node at each phase.
  --datastore file         the agent reads a nodes.yaml written from the lab (default)
  --datastore kubernetes   the agent reads Nodes + IPAMBlocks from a fake API server in this
                           process; also replays the silent watch that hid k8s03's VTEP change";

fn parse_args() -> Result<Datastore, String> {
    let mut args = std::env::args().skip(1);
    let mut ds = Datastore::File;
    while let Some(a) = args.next() {
        let value = match a.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--datastore" => args.next().ok_or("--datastore needs a value")?,
            other => match other.strip_prefix("--datastore=") {
                Some(v) => v.to_string(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        };
        ds = match value.as_str() {
            "file" => Datastore::File,
            "kubernetes" | "k8s" => Datastore::Kubernetes,
            v => {
                return Err(format!(
                    "--datastore: unknown source {v:?} (file or kubernetes)"
                ))
            }
        };
    }
    Ok(ds)
}

fn main() -> ExitCode {
    let datastore = match parse_args() {
        Ok(d) => d,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("watchdog-lab: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(datastore) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watchdog-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The fake API server and the runtime its connections are served on.
struct Api {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    rt: tokio::runtime::Runtime,
}

fn start_api(lab: &Lab) -> Result<Api> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let server = rt.block_on(FakeApiServer::start(FakeConfig::default()));
    kube_fixture::populate_fake_apiserver(lab, &server);
    let kubeconfig = server.write_kubeconfig();
    Ok(Api {
        server,
        kubeconfig,
        rt,
    })
}

fn run(mode: Datastore) -> Result<()> {
    let stale = Lab::cleanup_stale()?;
    if !stale.is_empty() {
        println!("removed {} namespace(s) left by dead labs", stale.len());
    }
    let mut lab = Lab::build(LabSpec::incident()).context("building the incident lab")?;
    let datastore = lab.write_datastore()?;
    let api = match mode {
        Datastore::File => None,
        Datastore::Kubernetes => Some(start_api(&lab)?),
    };
    let configs = NODES
        .iter()
        .map(|n| {
            let path = match &api {
                None => lab.write_agent_config(n)?,
                Some(api) => lab.write_agent_config_kubernetes(n, &api.kubeconfig)?,
            };
            Ok((n.to_string(), path))
        })
        .collect::<Result<Vec<_>>>()?;

    section("Lab");
    println!(
        "{} nodes, profile {}, device {}, underlay netns {}",
        lab.nodes().len(),
        lab.profile(),
        lab.device(),
        lab.underlay_netns()
    );
    for n in lab.nodes() {
        println!(
            "  {:<6} node {:<13} VTEP {:<13} {}  netns {}",
            n.name,
            n.node_ip,
            n.vtep_ip,
            n.vtep_mac,
            lab.netns_path(&n.name).display()
        );
        let blocks: Vec<String> = n.blocks.iter().map(|b| b.to_string()).collect();
        println!("         blocks {}", blocks.join(" "));
    }
    match &api {
        None => println!("datastore (file source): {}", datastore.display()),
        Some(api) => println!(
            "datastore (kubernetes source): fake API server {} serving {} Nodes, {} IPAMBlocks; kubeconfig {}",
            api.server.url(),
            api.server.list(watchdog_lab::fake_apiserver::Res::Nodes).len(),
            api.server.list(watchdog_lab::fake_apiserver::Res::IpamBlocks).len(),
            api.kubeconfig.display()
        ),
    }

    section("Healthy");
    show_routes(&lab, "k8s01")?;
    show_traffic(&lab)?;
    agent_view(&lab, &configs, Phase::Healthy)?;

    if let Some(api) = &api {
        silent_watch(&lab, api, &configs)?;
    }

    section("Incident: k8s01 and k8s02 route k8s03's blocks via 10.1.235.128");
    for on in ["k8s01", "k8s02"] {
        let f = lab.inject(Fault::incident(on))?;
        println!("{}", f.description);
    }
    show_routes(&lab, "k8s01")?;
    let traffic = show_traffic(&lab)?;
    // The kernel marks the gateway FAILED only after its ARP retries run out.
    for on in ["k8s01", "k8s02"] {
        let neigh = lab.neighbour(on, "10.1.235.128".parse()?)?;
        println!(
            "{on}$ ip neigh show 10.1.235.128 dev {}\n  {}",
            lab.device(),
            neigh.as_deref().unwrap_or("(no entry)")
        );
    }
    println!(
        "datastore: k8s03 vtep_ip {} (10.1.235.128 is nobody's VTEP)",
        lab.node("k8s03").vtep_ip
    );
    let lost: u32 = traffic.iter().map(|t| t.lost()).sum();
    println!("{lost} packets blackholed, every node still looks Ready");
    agent_view(&lab, &configs, Phase::Corrupted)?;

    section("Repair: ip route replace <block> via 10.1.235.133 dev vxlan.calico onlink");
    lab.restore_all()?;
    show_routes(&lab, "k8s01")?;
    show_traffic(&lab)?;
    let diff = lab.diff_from_healthy()?;
    if diff.is_empty() {
        println!("dataplane identical to the healthy build");
    } else {
        println!(
            "dataplane still differs from healthy:\n  {}",
            diff.join("\n  ")
        );
    }
    agent_view(&lab, &configs, Phase::Restored)?;
    Ok(())
}

fn section(title: &str) {
    println!("\n== {title}");
}

/// k8s03's block routes on `node`, as `ip route` prints them.
fn show_routes(lab: &Lab, node: &str) -> Result<()> {
    let k8s03 = lab.node("k8s03");
    println!("{node}$ ip route show exact <block>   # for each of k8s03's blocks");
    for b in &k8s03.blocks {
        let out = lab.ip(node, &["route", "show", "exact", &b.to_string()])?;
        for line in out.lines() {
            println!("  {}", line.trim());
        }
    }
    Ok(())
}

/// The incident's API half: the API server's watch stays open and silent (kine stopped feeding
/// its watch cache) while k8s03 re-registers with a new VTEP. A watch-driven consumer — Felix on
/// k8s01 and k8s02 — never hears of it; a consistent list does, and so does the agent.
fn silent_watch(lab: &Lab, api: &Api, configs: &[(String, PathBuf)]) -> Result<()> {
    let moved = Ipv4Addr::new(10, 1, 235, 140);
    let old = lab.node("k8s03").vtep_ip;
    section(&format!(
        "What Felix missed: the API server's watch goes silent, then k8s03's VTEP moves {old} -> {moved}"
    ));
    api.server.set_silent_watch(true);
    let from = api.server.resource_version();
    // Watch the way Felix does, from the current position, while the change happens.
    let watch = api.rt.spawn(raw_watch(
        api.server.addr(),
        format!("/api/v1/nodes?watch=1&resourceVersion={from}&allowWatchBookmarks=true"),
        Duration::from_secs(2),
    ));
    std::thread::sleep(Duration::from_millis(200));
    kube_fixture::move_vtep(lab, &api.server, "k8s03", moved)?;
    println!(
        "calico-node on k8s03 patched Node/k8s03: projectcalico.org/IPv4VXLANTunnelAddr={moved}"
    );
    let (status, events) = api.rt.block_on(watch)??;
    println!(
        "watch  GET /api/v1/nodes?watch=1&resourceVersion={from}  -> {status}, {events} event(s) in 2s   \
         (stream open, nothing delivered: Felix keeps routing k8s03's blocks via {old})"
    );
    let listed = api
        .server
        .get(watchdog_lab::fake_apiserver::Res::Nodes, "k8s03")
        .and_then(|n| {
            n["metadata"]["annotations"][kube_fixture::ANN_CALICO_VTEP]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_default();
    println!(
        "list   GET /api/v1/nodes   -> Node/k8s03 IPv4VXLANTunnelAddr={listed}   \
         (a consistent read sees it: what the agent's periodic relist compares with its watch cache)"
    );
    println!("the agent's one-shot scan lists, so it sees the kernels disagree with the API:");
    agent_view(lab, configs, Phase::WatchSilent)?;

    kube_fixture::restore_node(lab, &api.server, "k8s03");
    api.server.set_silent_watch(false);
    println!("k8s03's registration put back to {old}; watch delivering again");
    Ok(())
}

/// A bare HTTP/1.1 watch request: the status line and how many watch events arrived within
/// `limit`. Bare on purpose: the demo shows what any watch client gets, not what kube does.
async fn raw_watch(
    addr: std::net::SocketAddr,
    path: String,
    limit: Duration,
) -> Result<(String, usize)> {
    let mut sock = TcpStream::connect(addr).await?;
    sock.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .lines()
        .next()
        .unwrap_or("no response")
        .trim()
        .to_string();
    // One JSON object per line; bookmarks prove liveness, not change.
    let events = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("{\"type\":") && !l.starts_with("{\"type\":\"BOOKMARK\""))
        .count();
    Ok((status, events))
}

/// Pod-to-pod traffic between every pair of nodes, one line per pair.
fn show_traffic(lab: &Lab) -> Result<Vec<watchdog_lab::TrafficReport>> {
    let reports = lab.traffic_matrix(PACKETS)?;
    for r in &reports {
        let mark = if r.all_delivered() {
            "ok"
        } else if r.none_delivered() {
            "BLACKHOLED"
        } else {
            "LOSS"
        };
        println!("  {r}  {mark}");
    }
    Ok(reports)
}

/// What the agent says at each phase: `watchdog scan` against every node's namespace, exactly as
/// an SRE would run it on the node. The full report for the first node whose verdict is not
/// healthy, one summary line for the others.
fn agent_view(lab: &Lab, configs: &[(String, PathBuf)], phase: Phase) -> Result<()> {
    let bin = watchdog_bin();
    let mut shown_full = false;
    for (node, config) in configs {
        let netns = lab.netns_path(node);
        let out = Command::new(&bin)
            .args(["scan", "--config"])
            .arg(config)
            .arg("--netns")
            .arg(&netns)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let code = out.status.code().unwrap_or(-1);
        if code == 3 || text.is_empty() {
            bail!(
                "watchdog scan on {node} could not check (exit {code}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if code != 0 && !shown_full {
            shown_full = true;
            println!(
                "{node}$ watchdog scan --netns {}   (exit {code})",
                netns.display()
            );
            for line in text.lines() {
                println!("  {line}");
            }
        } else {
            let verdict = text.lines().last().unwrap_or("");
            println!("  [{phase:?}] {node}$ watchdog scan  ->  exit {code}  {verdict}");
        }
    }
    Ok(())
}

/// The agent binary: `$WATCHDOG_BIN` (set by `cargo xtask lab`), else next to this binary.
fn watchdog_bin() -> PathBuf {
    std::env::var_os("WATCHDOG_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(|d| d.join("watchdog")))
        })
        .unwrap_or_else(|| PathBuf::from("watchdog"))
}
