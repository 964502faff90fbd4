//! `cargo xtask bench scan`: how much a full `watchdog scan` costs compared with the cheapest
//! thing that could possibly be done — one raw netlink route dump of the same table — measured in
//! the same run, on a lab-sized cluster and on a synthetic large one (5,000 peers × 6 blocks).
//! Needs root (network namespaces). Prints a table; the README quotes it.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_watchdog::{
    checks::{self, CheckInput, DeviceSpec},
    desired::file::{self, FileFormat},
    observe::{KernelObserver, NetlinkObserver},
};
use watchdog_lab::{Lab, LabSpec};

#[path = "common/mod.rs"]
mod common;
use common::{Netns, SyntheticNode, DEVICE};

const ROUNDS: usize = 7;

struct Timing {
    raw_dump: Duration,
    snapshot: Duration,
    datastore: Duration,
    checks: Duration,
    scan: Duration,
    routes: usize,
    findings: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn measure(netns: &Path, yaml: &str, local: &str) -> Result<Timing> {
    let observer = NetlinkObserver::new(Some(netns))?;
    let devices = vec![DEVICE.to_string()];
    let specs = [DeviceSpec::for_name(DEVICE)];
    let (mut raw, mut snap, mut ds, mut chk, mut total) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut routes, mut findings) = (0, 0);
    // Alternate baseline and subject every round so drift on a busy machine hits both.
    for _ in 0..ROUNDS {
        let t = Instant::now();
        routes = observer.dump_route_count().await?;
        raw.push(t.elapsed());

        let t0 = Instant::now();
        let observed = observer.snapshot(&devices).await?;
        let t1 = Instant::now();
        let desired = file::parse(yaml, FileFormat::Yaml, Path::new("bench.yaml"), local)?;
        let t2 = Instant::now();
        let report = checks::evaluate(&CheckInput {
            devices: &specs,
            observed: &observed,
            desired: Some(&desired),
            drops: None,
            explained_recently: None,
            datastore: None,
        });
        let t3 = Instant::now();
        findings = report.findings.len();
        snap.push(t1 - t0);
        ds.push(t2 - t1);
        chk.push(t3 - t2);
        total.push(t3 - t0);
    }
    Ok(Timing {
        raw_dump: median(raw),
        snapshot: median(snap),
        datastore: median(ds),
        checks: median(chk),
        scan: median(total),
        routes,
        findings,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn ratio(a: Duration, b: Duration) -> String {
    format!("{:.2}x", a.as_secs_f64() / b.as_secs_f64().max(1e-9))
}

fn print(name: &str, t: &Timing) {
    println!(
        "| {name} | {} | {} | {} ({}) | {} | {} ({}) | {} (**{}**) | {} |",
        t.routes,
        ms(t.raw_dump),
        ms(t.snapshot),
        ratio(t.snapshot, t.raw_dump),
        ms(t.datastore),
        ms(t.checks),
        ratio(t.checks, t.raw_dump),
        ms(t.scan),
        ratio(t.scan, t.raw_dump),
        t.findings
    );
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let peers: usize = std::env::var("BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);

    println!("scan benchmark: median of {ROUNDS} rounds; ratios against a raw netlink route dump of the same namespace in the same round");
    println!();
    println!("| dataplane | routes dumped | raw route dump | full snapshot (ratio) | datastore parse | checks (ratio) | whole scan (ratio) | findings |");
    println!("|---|---|---|---|---|---|---|---|");

    let mut lab = Lab::build(LabSpec::incident()).context("building the incident lab")?;
    let yaml = lab.datastore_yaml();
    let path = lab.netns_path("k8s01");
    let t = rt.block_on(measure(&path, &yaml, "k8s01"))?;
    print("lab: 3 nodes, 8 blocks", &t);
    drop(lab.restore_all());

    let started = Instant::now();
    let node = SyntheticNode::new(peers, 6)?;
    let ns = Netns::new(format!("wdbench{}", std::process::id()))?;
    node.program(&ns, true)?;
    let yaml = node.yaml;
    eprintln!(
        "(programmed {} peers × 6 blocks in {:.1}s)",
        peers,
        started.elapsed().as_secs_f64()
    );
    let t = rt.block_on(measure(&ns.path(), &yaml, "local"))?;
    print(&format!("synthetic: {peers} peers × 6 blocks"), &t);
    if t.findings != 0 {
        bail!(
            "the synthetic healthy cluster produced {} findings",
            t.findings
        );
    }
    Ok(())
}
