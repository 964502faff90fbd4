//! `cargo xtask bench ebpf` (run as root, release build): what the kernel programs cost.
//!
//! 1. Per-event cost from the kernel's own run-time stats (`BPF_ENABLE_STATS`: run_time_ns /
//!    run_cnt per program), in three situations on the incident lab. The stats cost something
//!    themselves (two clock reads per run), so an empty program is attached to `kfree_skb` at
//!    the same time: each program's net cost is its mean minus the empty one's, same run:
//!    - drop storm on the watched node (k8s01 → k8s03 blackholed): every kfree_skb is counted,
//!    - the same storm with another node watched: every kfree_skb is filtered out by netns,
//!    - neighbour hooks while the gateway is unresolved.
//! 2. Throughput of a pod → pod UDP flood through a healthy 2-node lab, with and without the
//!    programs attached (watching the receiving node, so its socket-buffer drops are counted),
//!    in alternating rounds of the same run; the result is a ratio.
//!
//! Output: a short table on stdout; `--json` adds one JSON line at the end, `--quick` shortens
//! every phase, `--storm-only` skips the flood.

use std::{
    collections::BTreeSet,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use agent_ebpf::programs;
use anyhow::{anyhow, bail, Context, Result};
use dataplane_watchdog::{
    desired::{file::parse, FileFormat},
    ebpf::{
        bench::{enable_stats, ProgramRunStats},
        peer_blocks_from_desired, read_link_drop_stats, DropCounterSource, EbpfDropCounters,
        EBPF_OBJECT,
    },
};
use serde::Serialize;
use watchdog_lab::{Fault, Lab, LabSpec};

const FLOOD_PORT: u16 = 9700;
const PAYLOAD: usize = 64;

#[derive(Debug, Serialize)]
struct CostRow {
    scenario: &'static str,
    program: String,
    runs: u64,
    run_time_ns: u64,
    /// run_time_ns / runs: what the kernel's stats say, measuring overhead included.
    mean_ns: f64,
    /// Mean of the empty baseline program in the same scenario (the measuring overhead).
    empty_ns: Option<f64>,
    /// mean_ns - empty_ns: what the program itself costs.
    net_ns: Option<f64>,
}

#[derive(Debug, Serialize)]
struct FloodRound {
    attached: bool,
    sent_pps: f64,
    received_pps: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    costs: Vec<CostRow>,
    rounds: Vec<FloodRound>,
    /// received pps with programs / without (mean over rounds).
    throughput_ratio: f64,
    sent_ratio: f64,
    /// Same, from the median round of each setting (less sensitive to one disturbed round).
    median_ratio: f64,
    /// Time the kernel spent in the programs during the attached flood rounds, as a share of
    /// their wall time (of one CPU): the overhead the ratio tries to see through the noise.
    program_cpu_share: f64,
}

fn main() -> Result<()> {
    let json = std::env::args().any(|a| a == "--json");
    let quick = std::env::args().any(|a| a == "--quick");
    if EBPF_OBJECT.is_empty() {
        bail!("built without bpf-linker: the eBPF programs are not compiled in");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (network namespaces, eBPF)");
    }
    let _stats = enable_stats().context("enabling BPF run-time stats")?;
    let storm = if quick {
        Duration::from_millis(700)
    } else {
        Duration::from_secs(2)
    };
    let mut costs = drop_storm_costs(storm, if quick { 1 } else { 3 })?;
    subtract_baseline(&mut costs);
    if std::env::args().any(|a| a == "--storm-only") {
        print_table(&Report {
            costs,
            rounds: Vec::new(),
            throughput_ratio: f64::NAN,
            sent_ratio: f64::NAN,
            median_ratio: f64::NAN,
            program_cpu_share: f64::NAN,
        });
        return Ok(());
    }
    let flood = flood_throughput(if quick { 2 } else { 6 }, storm)?;
    costs.extend(flood.costs);
    subtract_baseline(&mut costs);
    let report = Report {
        costs,
        rounds: flood.rounds,
        throughput_ratio: flood.ratio,
        sent_ratio: flood.sent_ratio,
        median_ratio: flood.median_ratio,
        program_cpu_share: flood.program_cpu_share,
    };
    print_table(&report);
    if json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn vxlan_ifindex(netns: &Path, device: &str) -> Result<u32> {
    read_link_drop_stats(Some(netns))?
        .into_iter()
        .find(|l| l.name == device)
        .map(|l| l.ifindex)
        .ok_or_else(|| anyhow!("no {device} in {}", netns.display()))
}

/// Loads the programs for `node`'s namespace, watching its overlay device, with the lab's
/// peer blocks. `probe_read`: force the kfree_skb header read of kernels without
/// `bpf_rdonly_cast`.
fn attach(lab: &Lab, node: &str, probe_read: bool) -> Result<EbpfDropCounters> {
    let netns = lab.netns_path(node);
    let loaded = if probe_read {
        EbpfDropCounters::load_with_probe_read(Some(&netns))
    } else {
        EbpfDropCounters::load(Some(&netns))
    };
    let mut counters =
        loaded.map_err(|s| anyhow!("eBPF unavailable: {:?}: {:?}", s.missing, s.reason))?;
    counters.attach_bench_baseline()?;
    let ifindex = vxlan_ifindex(&netns, lab.device())?;
    counters.set_watched_devices(&BTreeSet::from([ifindex]))?;
    let desired = parse(
        &lab.datastore_yaml(),
        FileFormat::Yaml,
        Path::new("lab.yaml"),
        node,
    )?;
    counters.set_peer_blocks(&peer_blocks_from_desired(&desired))?;
    Ok(counters)
}

fn stats_delta(
    before: &[ProgramRunStats],
    after: &[ProgramRunStats],
) -> Vec<(String, ProgramRunStats)> {
    after
        .iter()
        .map(|a| {
            let d = before
                .iter()
                .find(|b| b.name == a.name)
                .map(|b| a.since(b))
                .unwrap_or_else(|| a.clone());
            (a.name.clone(), d)
        })
        .collect()
}

fn rows(scenario: &'static str, deltas: Vec<(String, ProgramRunStats)>) -> Vec<CostRow> {
    deltas
        .into_iter()
        .filter(|(_, d)| d.run_count > 0)
        .map(|(program, d)| {
            let run_time_ns = d.run_time.as_nanos() as u64;
            CostRow {
                scenario,
                program,
                runs: d.run_count,
                run_time_ns,
                mean_ns: run_time_ns as f64 / d.run_count as f64,
                empty_ns: None,
                net_ns: None,
            }
        })
        .collect()
}

/// Fills each row's baseline and net cost from the empty program's row of the same scenario.
fn subtract_baseline(rows: &mut [CostRow]) {
    let (baseline_name, _) = programs::KFREE_SKB_BASELINE;
    let baselines: Vec<(&'static str, f64)> = rows
        .iter()
        .filter(|r| r.program == baseline_name)
        .map(|r| (r.scenario, r.mean_ns))
        .collect();
    for row in rows.iter_mut().filter(|r| r.program != baseline_name) {
        row.empty_ns = baselines
            .iter()
            .find(|(s, _)| *s == row.scenario)
            .map(|(_, ns)| *ns);
        row.net_ns = row.empty_ns.map(|empty| row.mean_ns - empty);
    }
}

/// Per-event costs in the incident lab: k8s01 floods k8s03, whose routes point at a gateway
/// that never resolves, so every packet is dropped on k8s01's vxlan.calico. The two scenarios
/// alternate `repeats` times (the machine is shared); their runs are summed.
fn drop_storm_costs(duration: Duration, repeats: usize) -> Result<Vec<CostRow>> {
    let mut lab = Lab::build(LabSpec::incident()).context("building the incident lab")?;
    lab.inject(Fault::incident("k8s01"))?;
    let src = lab.node("k8s01").pods[0];
    let dst = lab.node("k8s03").pods[0];
    let from = lab.netns_path("k8s01");
    let mut out = Vec::new();
    // The probe_read row is the same program as on kernels without bpf_rdonly_cast: what the
    // direct header load saves, measured in the same run.
    let scenarios = [
        ("drop storm, counted", "k8s01", false),
        ("drop storm, counted, probe_read path", "k8s01", true),
        ("drop storm, other netns (filtered)", "k8s02", false),
    ];
    for (scenario, watched, probe_read) in (0..repeats).flat_map(|_| scenarios) {
        let counters = attach(&lab, watched, probe_read)?;
        eprintln!(
            "{scenario}: inner header read: {:?}",
            counters.header_read()
        );
        let before = counters.program_stats()?;
        let sent = flood_send_only(&from, src, dst, duration)?;
        eprintln!("{scenario}: {sent} datagrams accepted by sendto");
        let after = counters.program_stats()?;
        if watched == "k8s01" {
            let snap = counters.snapshot()?;
            let k3: u64 = snap.data_drops_to_peer("k8s03").values().sum();
            if k3 == 0 {
                bail!("the drop storm was not attributed to k8s03: {snap:?}");
            }
        }
        out.extend(rows(scenario, stats_delta(&before, &after)));
    }
    Ok(merge_costs(out))
}

struct Flood {
    rounds: Vec<FloodRound>,
    ratio: f64,
    sent_ratio: f64,
    median_ratio: f64,
    program_cpu_share: f64,
    costs: Vec<CostRow>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Healthy 2-node lab, node1 → node2 flood; alternating rounds with and without programs
/// (watching node2, the receiver, so its socket-buffer drops run the counted path).
fn flood_throughput(rounds: usize, duration: Duration) -> Result<Flood> {
    let lab = Lab::build(LabSpec::calico(2)).context("building the flood lab")?;
    let src = lab.node("node1").pods[0];
    let dst = lab.node("node2").pods[0];
    let (from, to) = (lab.netns_path("node1"), lab.netns_path("node2"));
    // Warm-up (neighbour/route caches, CPU frequency).
    flood(&from, src, &to, dst, Duration::from_millis(300))?;
    let mut out = Vec::new();
    let mut costs = Vec::new();
    let (mut program_time, mut attached_time) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        // ABBA order cancels drift within each pair of rounds.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for attached in order {
            let counters = if attached {
                Some(attach(&lab, "node2", false)?)
            } else {
                None
            };
            let before = match &counters {
                Some(c) => c.program_stats()?,
                None => Vec::new(),
            };
            let (sent, received) = flood(&from, src, &to, dst, duration)?;
            if let Some(c) = &counters {
                let after = c.program_stats()?;
                program_time += stats_delta(&before, &after)
                    .iter()
                    .map(|(_, d)| d.run_time)
                    .sum::<Duration>();
                attached_time += duration;
                costs.extend(rows(
                    "flood, receiver watched",
                    stats_delta(&before, &after),
                ));
            }
            drop(counters);
            let secs = duration.as_secs_f64();
            out.push(FloodRound {
                attached,
                sent_pps: sent as f64 / secs,
                received_pps: received as f64 / secs,
            });
        }
    }
    let mean = |attached: bool, f: fn(&FloodRound) -> f64| {
        let v: Vec<f64> = out
            .iter()
            .filter(|r| r.attached == attached)
            .map(f)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let ratio = mean(true, |r| r.received_pps) / mean(false, |r| r.received_pps);
    let sent_ratio = mean(true, |r| r.sent_pps) / mean(false, |r| r.sent_pps);
    let med = |attached: bool| {
        median(
            out.iter()
                .filter(|r| r.attached == attached)
                .map(|r| r.received_pps)
                .collect(),
        )
    };
    let median_ratio = med(true) / med(false);
    Ok(Flood {
        median_ratio,
        program_cpu_share: program_time.as_secs_f64() / attached_time.as_secs_f64().max(1e-9),
        rounds: out,
        ratio,
        sent_ratio,
        costs: merge_costs(costs),
    })
}

/// Sums per-round cost rows of the same (scenario, program).
fn merge_costs(rows: Vec<CostRow>) -> Vec<CostRow> {
    let mut out: Vec<CostRow> = Vec::new();
    for r in rows {
        match out
            .iter_mut()
            .find(|o| o.scenario == r.scenario && o.program == r.program)
        {
            Some(o) => {
                o.runs += r.runs;
                o.run_time_ns += r.run_time_ns;
                o.mean_ns = o.run_time_ns as f64 / o.runs.max(1) as f64;
            }
            None => out.push(r),
        }
    }
    out
}

fn enter(netns: &Path) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: plain syscall on a valid fd; only the calling thread changes namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "setns {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sends as fast as one thread can for `duration`; returns datagrams sent.
fn sender(from: PathBuf, src: Ipv4Addr, dst: Ipv4Addr, duration: Duration) -> Result<u64> {
    enter(&from)?;
    let sock = UdpSocket::bind(SocketAddrV4::new(src, 0))?;
    // Packets waiting for an unresolved neighbour hold send-buffer memory until dropped; a
    // large buffer keeps the sender from blocking, so the queue overflows (NEIGH_QUEUEFULL) at
    // line rate as in a real blackhole under load.
    let size: libc::c_int = 64 << 20;
    // SAFETY: setsockopt on a valid socket with a correctly sized int option.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    // Unconnected: a connected socket would turn the blackhole's ICMP errors into failed
    // sends that never reach the device.
    let to = SocketAddrV4::new(dst, FLOOD_PORT);
    let buf = [0x5au8; PAYLOAD];
    let start = Instant::now();
    let mut sent = 0u64;
    let mut errors = std::collections::BTreeMap::new();
    while start.elapsed() < duration {
        for _ in 0..64 {
            match sock.send_to(&buf, to) {
                Ok(_) => sent += 1,
                Err(e) => *errors.entry(e.to_string()).or_insert(0u64) += 1,
            }
        }
    }
    if !errors.is_empty() {
        eprintln!("send errors: {errors:?}");
    }
    Ok(sent)
}

fn flood_send_only(from: &Path, src: Ipv4Addr, dst: Ipv4Addr, duration: Duration) -> Result<u64> {
    let from = from.to_path_buf();
    thread::spawn(move || sender(from, src, dst, duration))
        .join()
        .map_err(|_| anyhow!("sender panicked"))?
}

/// (sent, received) of a flood `src` → `dst:FLOOD_PORT` lasting `duration`.
fn flood(
    from: &Path,
    src: Ipv4Addr,
    to: &Path,
    dst: Ipv4Addr,
    duration: Duration,
) -> Result<(u64, u64)> {
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = {
        let (to, received, stop) = (to.to_path_buf(), received.clone(), stop.clone());
        thread::spawn(move || -> Result<()> {
            enter(&to)?;
            let sock = UdpSocket::bind(SocketAddrV4::new(dst, FLOOD_PORT))?;
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let _ = ready_tx.send(());
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
    };
    ready_rx
        .recv()
        .map_err(|_| anyhow!("receiver failed to start"))?;
    let counted_from = received.load(Ordering::Relaxed);
    let sent = flood_send_only(from, src, dst, duration)?;
    let got = received.load(Ordering::Relaxed) - counted_from;
    stop.store(true, Ordering::Relaxed);
    receiver
        .join()
        .map_err(|_| anyhow!("receiver panicked"))??;
    Ok((sent, got))
}

fn print_table(r: &Report) {
    println!("eBPF per-event cost (kernel run-time stats, run_time_ns / run_cnt)");
    println!(
        "  RAW: the stats' mean; EMPTY: an empty kfree_skb program's mean in the same scenario \
         (the measuring overhead); NET = RAW - EMPTY"
    );
    println!(
        "  {:<40} {:<24} {:>10} {:>8} {:>8} {:>8}",
        "SCENARIO", "PROGRAM", "RUNS", "RAW NS", "EMPTY NS", "NET NS"
    );
    let ns = |v: Option<f64>| v.map(|n| format!("{n:.1}")).unwrap_or("-".into());
    for c in &r.costs {
        println!(
            "  {:<40} {:<24} {:>10} {:>8.1} {:>8} {:>8}",
            c.scenario,
            c.program,
            c.runs,
            c.mean_ns,
            ns(c.empty_ns),
            ns(c.net_ns)
        );
    }
    if r.rounds.is_empty() {
        return;
    }
    println!();
    println!("UDP flood node1 -> node2 ({PAYLOAD} B payload), alternating rounds");
    println!(
        "  {:<6} {:<9} {:>12} {:>12}",
        "ROUND", "PROGRAMS", "SENT PPS", "RECV PPS"
    );
    for (i, f) in r.rounds.iter().enumerate() {
        println!(
            "  {:<6} {:<9} {:>12.0} {:>12.0}",
            i / 2 + 1,
            if f.attached { "attached" } else { "none" },
            f.sent_pps,
            f.received_pps
        );
    }
    println!(
        "  throughput with/without programs: received {:.3} ({:+.1}%; median rounds {:.3}), sent {:.3}",
        r.throughput_ratio,
        (r.throughput_ratio - 1.0) * 100.0,
        r.median_ratio,
        r.sent_ratio
    );
    println!(
        "  time in eBPF programs during attached rounds: {:.3}% of one CPU",
        r.program_cpu_share * 100.0
    );
}
