//! `cargo xtask bench scan`: how much a full `watchdog scan` costs compared with the cheapest
//! thing that could possibly be done — one raw netlink route dump of the same table — measured in
//! the same run, on a lab-sized cluster and on a synthetic large one (5,000 peers × 6 blocks).
//! Needs root (network namespaces). Prints a table; the README quotes it.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use dataplane_watchdog::{
    checks::{self, CheckInput, DeviceSpec},
    desired::file::{self, FileFormat},
    model::MacAddr,
    observe::{KernelObserver, NetlinkObserver},
};
use watchdog_lab::{Lab, LabSpec};

const ROUNDS: usize = 7;
const DEVICE: &str = "vxlan.calico";

/// A network namespace removed on drop.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Netns> {
        run("ip", &["netns", "add", &name], None)?;
        Ok(Netns(name))
    }
    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .spawn()
        .with_context(|| format!("starting {cmd}"))?;
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// A synthetic node with `peers` remote nodes of `blocks` /26 blocks each, programmed exactly as
/// Felix does (route via VTEP onlink, permanent neighbour, FDB), plus the datastore describing it.
fn synthetic(peers: usize, blocks: usize) -> Result<(Netns, String)> {
    let ns = Netns::new(format!("wdbench{}", std::process::id()))?;
    let mut ip = String::new();
    let mut fdb = String::new();
    let mut yaml = String::from("nodes:\n  - name: local\n    node_ip: 172.16.0.1\n    vtep_ip: 10.63.255.192\n    blocks: [10.63.255.192/26]\n");
    writeln!(
        ip,
        "link add {DEVICE} type vxlan id 4096 dstport 4789 nolearning"
    )?;
    writeln!(ip, "addr add 10.63.255.192/32 dev {DEVICE}")?;
    writeln!(ip, "link set {DEVICE} up")?;
    for p in 0..peers {
        let name = format!("node{p}");
        let node_ip = std::net::Ipv4Addr::from(0xac10_0000u32 + 2 + p as u32);
        let mac = MacAddr::derive_like_felix(&name);
        let mut nets = Vec::new();
        for b in 0..blocks {
            let base = 0x0a40_0000u32 + ((p * blocks + b) as u32) * 64;
            nets.push(format!("{}/26", std::net::Ipv4Addr::from(base)));
        }
        let vtep = nets[0].trim_end_matches("/26").to_string();
        for n in &nets {
            writeln!(ip, "route add {n} via {vtep} dev {DEVICE} onlink")?;
        }
        writeln!(
            ip,
            "neigh add {vtep} lladdr {mac} dev {DEVICE} nud permanent"
        )?;
        writeln!(
            fdb,
            "fdb append {mac} dev {DEVICE} dst {node_ip} self permanent"
        )?;
        writeln!(
            yaml,
            "  - name: {name}\n    node_ip: {node_ip}\n    vtep_ip: {vtep}\n    blocks: [{}]",
            nets.join(", ")
        )?;
    }
    run("ip", &["-n", &ns.0, "-batch", "-"], Some(&ip))?;
    run("bridge", &["-n", &ns.0, "-batch", "-"], Some(&fdb))?;
    Ok((ns, yaml))
}

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
    let (ns, yaml) = synthetic(peers, 6)?;
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
