//! `watchdog-lab`: replays incident-k8s03 in network namespaces (run by `cargo xtask lab`).
//!
//! Builds the 3-node incident cluster, shows healthy pod-to-pod traffic, corrupts k8s01's and
//! k8s02's routes to k8s03 the way Felix did (via 10.1.235.128, nobody's VTEP), shows the
//! blackhole, restores and shows traffic back. Needs root.

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use watchdog_lab::{Fault, Lab, LabSpec};

/// Packets per destination address in each traffic check.
const PACKETS: u32 = 5;
/// The incident cluster's nodes.
const NODES: [&str; 3] = ["k8s01", "k8s02", "k8s03"];

/// The point in the story at which the agent is asked for its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy,
    Corrupted,
    Restored,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("watchdog-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let stale = Lab::cleanup_stale()?;
    if !stale.is_empty() {
        println!("removed {} namespace(s) left by dead labs", stale.len());
    }
    let mut lab = Lab::build(LabSpec::incident()).context("building the incident lab")?;
    let datastore = lab.write_datastore()?;
    let configs = NODES
        .iter()
        .map(|n| Ok((n.to_string(), lab.write_agent_config(n)?)))
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
    println!("datastore (file source): {}", datastore.display());

    section("Healthy");
    show_routes(&lab, "k8s01")?;
    show_traffic(&lab)?;
    agent_view(&lab, &configs, Phase::Healthy)?;

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
