//! `watchdog-lab`: replays incident-k8s03 in network namespaces (run by `cargo xtask lab`).
//!
//! Builds the 3-node incident cluster, shows healthy pod-to-pod traffic, corrupts k8s01's and
//! k8s02's routes to k8s03 the way Felix did (via 10.1.235.128, nobody's VTEP), shows the
//! blackhole, restores and shows traffic back. Needs root.
//!
//! The agent is shown both ways an SRE meets it: `watchdog scan` on every node at each phase,
//! and the daemon (`watchdog run`) on k8s01, whose finding appears — with its detection latency —
//! in `watchdog status` the moment the bad route is written, and clears when it is repaired.
//! Its alerts go to a loopback receiver standing in for Slack and a webhook: the demo prints the
//! page that would have gone out seconds after the corruption, and its resolve after the repair.
//!
//! It ends with the daemon in `mode = "repair"` fixing the incident itself (traffic restored,
//! the audit trail in `watchdog status`), and a "stale Felix" that puts one bad route back after
//! every repair, which the agent recognises as a contested repair and stops.
//!
//! `--datastore kubernetes`: the agent reads the cluster from a fake API server (in this
//! process, on 127.0.0.1) serving the lab as Nodes + Calico IPAMBlocks, and the demo also shows
//! the incident's other half: the API server's watch goes silent while k8s03's VTEP changes —
//! what Felix missed — and a consistent list (the agent's relist) still sees the change; then
//! the kubelet on k8s03 with a dead watch (calico-node Pending, a deleted pod still running),
//! caught by `watchdog scan --kubelet`.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant, SystemTime},
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
/// The node whose daemon the demo follows.
const DAEMON_NODE: &str = "k8s01";
/// How long the demo waits for the daemon to see a change before calling it a failure.
const DAEMON_DEADLINE: Duration = Duration::from_secs(10);

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
node at each phase, and the daemon (`watchdog run`) on k8s01 catching the corruption live:
the time from the bad route to the finding, `watchdog status`, and the finding clearing after
the repair.
  --datastore file         the agent reads a nodes.yaml written from the lab (default)
  --datastore kubernetes   the agent reads Nodes + IPAMBlocks from a fake API server in this
                           process; also replays the silent watch that hid k8s03's VTEP change
                           and the kubelet whose dead watch left calico-node Pending";

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
        stalled_kubelet(&lab, api, &configs)?;
    }

    let base_config = &configs
        .iter()
        .find(|(n, _)| n == DAEMON_NODE)
        .context("no config for the daemon's node")?
        .1;
    section(&format!("The daemon on {DAEMON_NODE}: watchdog run"));
    // Slack and a webhook, as a loopback receiver: the page the incident never got.
    let pager = watchdog_lab::receiver::Receiver::start();
    let alerts = format!(
        "[alerts]\npending_for = \"2s\"\nspool_dir = \"{{dir}}/alerts\"\n\
         [[alerts.sinks]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"{}\"\n\
         [[alerts.sinks]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        pager.url("/services/T0/B0/slack"),
        pager.url("/hook"),
    );
    let mut daemon = Daemon::start(&lab, DAEMON_NODE, base_config, &alerts)?;
    println!(
        "{DAEMON_NODE}$ watchdog run --config {} --netns {}",
        daemon.config.display(),
        lab.netns_path(DAEMON_NODE).display()
    );
    println!(
        "  in sync after {} ms (netlink monitor + first full dump + datastore){}",
        daemon.ready_after.as_millis(),
        match daemon.ebpf_state()? {
            Some(state) => format!("; eBPF {state}"),
            None => String::new(),
        }
    );
    daemon.show_check()?;

    section("Incident: k8s01 and k8s02 route k8s03's blocks via 10.1.235.128");
    let injected_at = SystemTime::now();
    let started = Instant::now();
    let f = lab.inject(Fault::incident(DAEMON_NODE))?;
    let injection_took = started.elapsed();
    println!("{}", f.description);
    let (finding, seen_after) = daemon.wait_for_finding("k8s03")?;
    let detected = finding
        .since
        .and_then(|since| since.duration_since(injected_at).ok());
    println!(
        "  daemon on {DAEMON_NODE}: {} for k8s03 {} (the injection itself took {} ms; visible via the status socket after {} ms)",
        finding.check,
        match detected {
            Some(d) => format!("detected {:.1} ms after the first bad route was written", d.as_secs_f64() * 1e3),
            None => "detected".to_string(),
        },
        injection_took.as_millis(),
        seen_after.as_millis()
    );
    let paged = show_pages(&pager, 0, "firing", started, "corruption")?;
    let f = lab.inject(Fault::incident("k8s02"))?;
    println!("{}", f.description);
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
    if daemon.ebpf_attached()? {
        // The queued packets are freed (and counted) when the gateway's ARP retries run out.
        let started = Instant::now();
        let by_reason = daemon.wait_for_drops("k8s03")?;
        let total: u64 = by_reason.iter().map(|(_, n)| n).sum();
        let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "  eBPF on {DAEMON_NODE}: {total} packets to k8s03 dropped in the kernel ({}), counted {:.1} s after the traffic as the gateway's neighbour entry failed",
            reasons.join(", "),
            started.elapsed().as_secs_f64()
        );
    }
    daemon.show_status()?;
    daemon.show_check()?;

    section("Repair: ip route replace <block> via 10.1.235.133 dev vxlan.calico onlink");
    let started = Instant::now();
    lab.restore_all()?;
    daemon.wait_until_clear()?;
    println!(
        "  daemon on {DAEMON_NODE}: every finding cleared {} ms after the repair started",
        started.elapsed().as_millis()
    );
    show_pages(&pager, paged, "resolved", started, "repair")?;
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
    daemon.show_check()?;
    daemon.stop()?;
    drop(daemon);

    repair_mode(&mut lab, base_config)?;
    Ok(())
}

/// The block a "stale Felix" keeps routing via 10.1.235.128 in the contested variant.
const FOUGHT: &str = "10.1.235.128/26";

/// The same incident with the daemon in `mode = "repair"`: it fixes the routes itself, with the
/// audit trail; then a stale Felix re-writes one bad route after every repair, and the agent
/// recognises the fight, stops, and says what to do.
fn repair_mode(lab: &mut Lab, base_config: &Path) -> Result<()> {
    section(&format!(
        "Repair mode: the daemon on {DAEMON_NODE} repairs the incident itself"
    ));
    let base = fs::read_to_string(base_config)?;
    let config = std::env::temp_dir().join(format!("{}-repair.toml", lab.id()));
    fs::write(
        &config,
        format!(
            "mode = \"repair\"\n{base}\n[repair]\n# the defaults but a short contest, for the demo\n\
             min_finding_age = \"1s\"\ncontested_after = 3\ncontested_window = \"1m\"\n\
             contested_backoff = \"2m\"\nmax_repairs_per_minute = 30\n"
        ),
    )?;
    let mut daemon = Daemon::start(lab, DAEMON_NODE, &config, "")?;
    println!("  mode = \"repair\", min_finding_age = 1s (a finding must persist 1 s before it is repaired)");
    let injected = Instant::now();
    let f = lab.inject(Fault::incident(DAEMON_NODE))?;
    println!("{}", f.description);
    let repaired = loop {
        let routes = lab.ip(DAEMON_NODE, &["route", "show", "dev", lab.device()])?;
        if !routes.contains("via 10.1.235.128 ") {
            break injected.elapsed();
        }
        if injected.elapsed() > DAEMON_DEADLINE {
            bail!(
                "not repaired within {DAEMON_DEADLINE:?}:\n{}",
                daemon.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    println!(
        "  daemon on {DAEMON_NODE}: routes repaired {} ms after the bad routes were written (min_finding_age 1 s + the writes, read back)",
        repaired.as_millis()
    );
    daemon.wait_until_clear()?;
    show_routes(lab, DAEMON_NODE)?;
    show_traffic(lab)?;
    daemon.show_status()?;
    daemon.show_check()?;

    section("Stale Felix: one route is put back after every repair");
    let netns = lab
        .netns_path(DAEMON_NODE)
        .file_name()
        .context("netns name")?
        .to_string_lossy()
        .into_owned();
    let dev = lab.device().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let fighter = std::thread::spawn(move || {
        let mut writes = 0u32;
        while !stopped.load(std::sync::atomic::Ordering::SeqCst) {
            let now = Command::new("ip")
                .args(["-n", &netns, "route", "show", "exact", FOUGHT])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if !now.contains("via 10.1.235.128 ") {
                let _ = Command::new("ip")
                    .args([
                        "-n",
                        &netns,
                        "route",
                        "replace",
                        FOUGHT,
                        "via",
                        "10.1.235.128",
                        "dev",
                        &dev,
                        "onlink",
                    ])
                    .output();
                writes += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        writes
    });
    let started = Instant::now();
    let contested = daemon.wait("a repair-contested finding", |s| {
        s["findings"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["check"] == "repair-contested"))
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = fighter.join().unwrap_or(0);
    contested?;
    println!(
        "  the agent gave up on {FOUGHT} after {:.1} s; the fighter wrote {writes} times",
        started.elapsed().as_secs_f64()
    );
    let status = daemon.status_json()?;
    if let Some(f) = status["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["check"] == "repair-contested"))
    {
        println!(
            "  CRITICAL repair-contested: {}",
            f["message"].as_str().unwrap_or("")
        );
        println!("    fix: {}", f["hint"].as_str().unwrap_or(""));
    }
    daemon.show_status()?;
    daemon.show_check()?;
    daemon.stop()?;
    lab.restore_all()?;
    let _ = fs::remove_file(&config);
    Ok(())
}

/// `firing` or `resolved`, for either sink's body.
fn page_status(r: &watchdog_lab::receiver::Received) -> String {
    let body = r.json();
    if r.path.starts_with("/services/") {
        let text = body["text"].as_str().unwrap_or("");
        if text.starts_with("RESOLVED") {
            "resolved"
        } else {
            "firing"
        }
        .to_string()
    } else {
        body["status"].as_str().unwrap_or("").to_string()
    }
}

/// Waits until both sinks got a `status` page after the first `skip` requests, prints the
/// Slack message and the webhook body, and returns how many requests have arrived.
fn show_pages(
    pager: &watchdog_lab::receiver::Receiver,
    skip: usize,
    status: &str,
    since: Instant,
    what: &str,
) -> Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (slack, hook, total) = loop {
        let got = pager.received();
        let new = &got[skip.min(got.len())..];
        let find = |slack: bool| {
            new.iter()
                .find(|r| r.path.starts_with("/services/") == slack && page_status(r) == status)
                .cloned()
        };
        if let (Some(s), Some(h)) = (find(true), find(false)) {
            break (s, h, got.len());
        }
        if Instant::now() > deadline {
            bail!("no {status} page from both sinks within 10 s of the {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let body = slack.json();
    println!(
        "  Slack (loopback receiver), {} ms after the {what}:",
        (slack.at - since).as_millis()
    );
    println!("    {}", body["text"].as_str().unwrap_or(""));
    for b in body["blocks"].as_array().into_iter().flatten() {
        for f in b["fields"].as_array().into_iter().flatten() {
            println!(
                "      {}",
                f["text"].as_str().unwrap_or("").replace('\n', ": ")
            );
        }
        if let Some(t) = b["text"]["text"]
            .as_str()
            .filter(|t| t.starts_with("*Fix*"))
        {
            println!("      {}", t.replace('\n', " "));
        }
    }
    let body = hook.json();
    println!(
        "  webhook (loopback receiver), {} ms after the {what}: {} \"{}\" dedup_key {} webhook-id {}",
        (hook.at - since).as_millis(),
        body["status"].as_str().unwrap_or(""),
        body["summary"].as_str().unwrap_or(""),
        body["dedup_key"].as_str().unwrap_or(""),
        hook.header("webhook-id").unwrap_or("-"),
    );
    Ok(total)
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

/// The incident's chain 1: the kubelet on k8s03 keeps a dead watch. calico-node-sqfcs, bound
/// 35 minutes ago, never reaches it; a pod deleted 44 minutes ago still runs there; k8s03 is
/// Ready throughout. `watchdog scan --kubelet` compares the API's pods with the kubelet's.
fn stalled_kubelet(lab: &Lab, api: &Api, configs: &[(String, PathBuf)]) -> Result<()> {
    use watchdog_lab::fake_apiserver::Res;
    const NODE: &str = "k8s03";
    section("The kubelet on k8s03 watches a dead stream (incident chain 1)");
    let server = &api.server;
    server.put(
        Res::Pods,
        kube_fixture::pod("kube-system", "coredns-7d8f", NODE, 7200),
    );
    let redis = kube_fixture::pod("argocd", "argocd-redis-ha-server-2", NODE, 7200);
    server.put(Res::Pods, redis.clone());
    server.set_kubelet_stalled(NODE, true);
    server.put(
        Res::Pods,
        kube_fixture::pod("kube-system", "calico-node-sqfcs", NODE, 2100),
    );
    server.put(Res::Pods, kube_fixture::deleted(redis, 2640));
    println!("scheduler bound kube-system/calico-node-sqfcs to {NODE} 35 min ago; argocd/argocd-redis-ha-server-2 deleted 44 min ago");
    let kubelet_scan = |when: &str| -> Result<()> {
        let config = &configs
            .iter()
            .find(|(n, _)| n == NODE)
            .context("no config for k8s03")?
            .1;
        let out = Command::new(watchdog_bin())
            .args([
                "scan",
                "--json",
                "--kubelet",
                "--datastore",
                "kubernetes",
                "--config",
            ])
            .arg(config)
            .arg("--netns")
            .arg(lab.netns_path(NODE))
            .output()?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "watchdog scan --kubelet: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let kubelet: Vec<&serde_json::Value> = json["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["device"] == "kubelet")
            .collect();
        println!(
            "[{when}] {NODE}$ watchdog scan --kubelet  ->  exit {}",
            out.status.code().unwrap_or(-1)
        );
        if kubelet.is_empty() {
            println!("  kubelet knows every pod bound to {NODE}");
        }
        for f in kubelet {
            println!(
                "  {} {}: {}",
                f["severity"].as_str().unwrap_or("").to_uppercase(),
                f["check"].as_str().unwrap_or(""),
                f["message"].as_str().unwrap_or("")
            );
            if let Some(h) = f["hint"].as_str() {
                println!("    fix: {h}");
            }
        }
        Ok(())
    };
    kubelet_scan("dead watch")?;
    server.set_kubelet_stalled(NODE, false);
    server.delete(Res::Pods, "argocd/argocd-redis-ha-server-2");
    println!(
        "k8s-dqlite restarted, then kubelite: the kubelet lists again and finishes the deleted pod"
    );
    kubelet_scan("restarted")?;
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

/// A finding as the status API serves it (the fields the demo prints).
#[derive(Debug)]
struct SeenFinding {
    check: String,
    since: Option<SystemTime>,
}

/// `watchdog run` for one lab node with its own status socket and no metrics listener;
/// stopped (SIGTERM, then SIGKILL) when dropped, so an error anywhere in the demo leaves no
/// daemon behind.
struct Daemon {
    child: Option<Child>,
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    ready_after: Duration,
}

impl Daemon {
    /// `alerts` is appended to the config, `{dir}` replaced by the daemon's directory.
    fn start(lab: &Lab, node: &str, base_config: &Path, alerts: &str) -> Result<Daemon> {
        let dir = std::env::temp_dir().join(format!("{}-daemon-{node}", lab.id()));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("config.toml");
        let base = fs::read_to_string(base_config)
            .with_context(|| format!("reading {}", base_config.display()))?;
        fs::write(
            &config,
            format!(
                "{base}\n[status]\nsocket = \"{}\"\n\n[metrics]\nlisten = \"off\"\n\n{}",
                dir.join("status.sock").display(),
                alerts.replace("{dir}", &dir.display().to_string()),
            ),
        )
        .with_context(|| format!("writing {}", config.display()))?;
        let log = dir.join("watchdog.log");
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new(watchdog_bin())
            .args(["run", "--config"])
            .arg(&config)
            .arg("--netns")
            .arg(lab.netns_path(node))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting watchdog run")?;
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            config,
            log,
            ready_after: Duration::ZERO,
        };
        daemon.wait("the first full sync", |status| {
            status["in_sync"].as_bool() == Some(true)
        })?;
        daemon.ready_after = started.elapsed();
        Ok(daemon)
    }

    /// `watchdog status --json`, as any client gets it.
    fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.cli(&["status", "--json"])?;
        if !out.status.success() {
            bail!(
                "watchdog status: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("watchdog status --json is not JSON")
    }

    fn cli(&self, args: &[&str]) -> Result<std::process::Output> {
        Command::new(watchdog_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .context("running watchdog")
    }

    /// Polls the daemon until `pred` holds for its status; how long that took.
    fn wait(&mut self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> Result<Duration> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(exit) = child.try_wait()? {
                    bail!(
                        "watchdog run exited ({exit}) before {what}:\n{}",
                        self.log_tail()
                    );
                }
            }
            if let Ok(status) = self.status_json() {
                if pred(&status) {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > DAEMON_DEADLINE {
                bail!(
                    "the daemon did not reach {what} within {DAEMON_DEADLINE:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for an open finding about `peer`; the finding and how long the wait took.
    fn wait_for_finding(&mut self, peer: &str) -> Result<(SeenFinding, Duration)> {
        let has = |s: &serde_json::Value| {
            s["findings"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f["peer_node"] == peer))
        };
        let took = self.wait(&format!("a finding about {peer}"), has)?;
        let status = self.status_json()?;
        let finding = status["findings"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["peer_node"] == peer))
            .context("the finding vanished")?;
        Ok((
            SeenFinding {
                check: finding["check"].as_str().unwrap_or("?").to_string(),
                since: finding["since"]
                    .as_str()
                    .and_then(|s| humantime::parse_rfc3339(s).ok()),
            },
            took,
        ))
    }

    fn wait_until_clear(&mut self) -> Result<Duration> {
        self.wait("zero findings", |s| {
            s["findings"].as_array().is_some_and(Vec::is_empty)
        })
    }

    fn ebpf_attached(&self) -> Result<bool> {
        let status = self.status_json()?;
        Ok(status["ebpf"]["attached"]
            .as_array()
            .is_some_and(|a| !a.is_empty()))
    }

    /// Waits until the kernel drop counters attribute drops to `peer`; (reason, packets).
    fn wait_for_drops(&mut self, peer: &str) -> Result<Vec<(String, u64)>> {
        self.wait(&format!("drops counted toward {peer}"), |s| {
            s["drops"]["by_peer"][peer]
                .as_object()
                .is_some_and(|r| r.values().any(|n| n.as_u64() > Some(0)))
        })?;
        let status = self.status_json()?;
        Ok(status["drops"]["by_peer"][peer]
            .as_object()
            .map(|r| {
                r.iter()
                    .map(|(reason, n)| (reason.clone(), n.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The eBPF line of the status: attached programs, or why there are none.
    fn ebpf_state(&self) -> Result<Option<String>> {
        let status = self.status_json()?;
        let ebpf = &status["ebpf"];
        if let Some(error) = ebpf["error"].as_str() {
            return Ok(Some(format!("off: {error}")));
        }
        let attached: Vec<&str> = ebpf["attached"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        Ok((!attached.is_empty()).then(|| format!("attached: {}", attached.join(", "))))
    }

    /// The human `watchdog status` view, as the SRE on the node would see it.
    fn show_status(&self) -> Result<()> {
        let out = self.cli(&["status"])?;
        println!("{DAEMON_NODE}$ watchdog status");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("  {line}");
        }
        Ok(())
    }

    /// The Nagios line, as monitoring would poll it.
    fn show_check(&self) -> Result<()> {
        let out = self.cli(&["check"])?;
        println!(
            "{DAEMON_NODE}$ watchdog check   (exit {})\n  {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (the socket removed), SIGKILL after 5 s.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Some(exit) = child.try_wait()? {
                if !exit.success() {
                    bail!(
                        "watchdog run exited {exit} on SIGTERM:\n{}",
                        self.log_tail()
                    );
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("watchdog run ignored SIGTERM for 5 s (killed)")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::env::var_os("WATCHDOG_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
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
