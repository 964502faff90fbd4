//! Micro-benchmark of one evaluation after one kernel change, at 5,000 peers × 6 blocks: the
//! checks from scratch (`checks::evaluate`, what every evaluation did before) against the
//! incremental [`Evaluator`] the daemon keeps, on the same states in the same run. Each round
//! replaces one peer's block route with one via a non-VTEP (one finding), then restores it
//! (none). Unprivileged.
//! `cargo run --release -p dataplane-watchdog --example bench_evaluate` (`BENCH_PEERS` sets the
//! peer count, `BENCH_ROUNDS` the rounds, `BENCH_INCREMENTAL_ONLY` leaves the baseline out, for
//! profiling).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use dataplane_watchdog::{
    checks::{self, CheckInput, CheckReport, DeviceSpec, Evaluator, PeerVerdicts, Verdict},
    model::{
        DesiredState, FdbEntry, LinkInfo, MacAddr, NeighState, Neighbour, ObservedDevice,
        ObservedState, PeerNode, Route, RouteKind,
    },
    observe::{Applied, ObservedEvent},
};
use ipnet::{IpNet, Ipv4Net};

const DEVICE: &str = "vxlan.calico";
const IFINDEX: u32 = 7;
const BLOCKS: usize = 6;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn block(p: usize, b: usize) -> IpNet {
    let base = 0x0a40_0000u32 + ((p * BLOCKS + b) as u32) * 64;
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 26).expect("prefix"))
}

fn route(dst: IpNet, gateway: IpAddr) -> Route {
    Route {
        destination: dst,
        gateway: Some(gateway),
        onlink: true,
        protocol: 3,
        table: 254,
        kind: RouteKind::Unicast,
        metric: None,
    }
}

/// A local node and `peers` peers, and the kernel exactly as Felix programs it.
fn node(peers: usize) -> (DesiredState, ObservedState) {
    let mut desired = DesiredState {
        source: "bench".into(),
        local_node: "local".into(),
        ..Default::default()
    };
    let local = PeerNode {
        name: "local".into(),
        node_ip: Ipv4Addr::new(172, 16, 0, 1).into(),
        vtep_ip: Ipv4Addr::new(10, 63, 255, 192).into(),
        vtep_mac: MacAddr::derive_like_felix("local"),
        vtep_mac_derived: true,
        blocks: vec!["10.63.255.192/26".parse().expect("net")],
        borrowed: vec![],
        ipv6: None,
    };
    let mut dev = ObservedDevice {
        link: LinkInfo {
            name: DEVICE.into(),
            ifindex: IFINDEX,
            kind: Some("vxlan".into()),
            vni: Some(4096),
            port: Some(4789),
            learning: Some(false),
            local: Some(local.node_ip),
            up: true,
            mac: Some(local.vtep_mac),
            mtu: Some(1450),
            addresses: vec![IpNet::new(local.vtep_ip, 32).expect("net")],
            external: false,
        },
        ..Default::default()
    };
    desired.nodes.insert(local.name.clone(), local);
    for p in 0..peers {
        let name = format!("node{p}");
        let blocks: Vec<IpNet> = (0..BLOCKS).map(|b| block(p, b)).collect();
        let peer = PeerNode {
            node_ip: Ipv4Addr::from(0xac10_0000u32 + 2 + p as u32).into(),
            vtep_ip: blocks[0].network(),
            vtep_mac: MacAddr::derive_like_felix(&name),
            vtep_mac_derived: true,
            name: name.clone(),
            blocks,
            borrowed: vec![],
            ipv6: None,
        };
        for dst in &peer.blocks {
            dev.routes.push(route(*dst, peer.vtep_ip));
        }
        dev.neighbours.push(Neighbour {
            ip: peer.vtep_ip,
            mac: Some(peer.vtep_mac),
            state: NeighState(NeighState::PERMANENT),
        });
        dev.fdb.push(FdbEntry {
            mac: peer.vtep_mac,
            destination: Some(peer.node_ip),
            permanent: true,
        });
        desired.nodes.insert(name, peer);
    }
    let mut observed = ObservedState::default();
    observed.devices.insert(DEVICE.into(), dev);
    observed.normalize();
    (desired, observed)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn input<'a>(
    specs: &'a [DeviceSpec],
    observed: &'a ObservedState,
    desired: &'a DesiredState,
) -> CheckInput<'a> {
    CheckInput {
        devices: specs,
        observed,
        desired: Some(desired),
        drops: None,
        explained_recently: None,
        datastore: None,
    }
}

fn main() {
    let peers = env_usize("BENCH_PEERS", 5000);
    let rounds = env_usize("BENCH_ROUNDS", 200);
    let (desired, mut observed) = node(peers);
    let specs = [DeviceSpec::for_name(DEVICE)];
    let watched = [DEVICE.to_string()];
    // As the daemon keeps it: verdicts are taken from the findings (`PeerVerdicts`), not
    // listed per peer.
    let mut evaluator = Evaluator::without_peer_list();
    let first = evaluator.evaluate(&input(&specs, &observed, &desired));
    assert!(first.findings.is_empty(), "the synthetic node is healthy");

    let (mut full, mut incremental) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let p = (i * 7919) % peers;
        let dst = block(p, i % BLOCKS);
        let vtep = block(p, 0).network();
        // The block's last address: nobody's VTEP.
        let wrong = dst.broadcast();
        for (gateway, findings) in [(wrong, 1), (vtep, 0)] {
            let e = ObservedEvent::RouteAdded {
                ifindex: IFINDEX,
                route: route(dst, gateway),
                replace: true,
            };
            assert_eq!(observed.apply(&e, &watched), Applied::Changed);
            evaluator.note(&e);
            let t = Instant::now();
            let a: CheckReport = evaluator.evaluate(&input(&specs, &observed, &desired));
            let verdicts = PeerVerdicts::of(&desired, &a.findings);
            incremental.push(t.elapsed());
            assert_eq!(verdicts.count(Verdict::Critical), findings);
            if std::env::var_os("BENCH_INCREMENTAL_ONLY").is_none() {
                let t = Instant::now();
                let b = checks::evaluate(&input(&specs, &observed, &desired));
                full.push(t.elapsed());
                assert_eq!(a.findings, b.findings, "incremental and full agree");
            }
            assert_eq!(a.findings.len(), findings);
        }
    }
    incremental.sort();
    if full.is_empty() {
        println!("incremental p50 {}", ms(percentile(&incremental, 0.5)));
        return;
    }
    full.sort();
    println!(
        "one evaluation after one route change, {peers} peers × {BLOCKS} blocks, {} evaluations each:\n  \
         full (every check from scratch): p50 {}  p99 {}\n  \
         incremental (the changed peer and route): p50 {}  p99 {}\n  \
         → p50 {:.3}× full",
        full.len(),
        ms(percentile(&full, 0.5)),
        ms(percentile(&full, 0.99)),
        ms(percentile(&incremental, 0.5)),
        ms(percentile(&incremental, 0.99)),
        percentile(&incremental, 0.5).as_secs_f64() / percentile(&full, 0.5).as_secs_f64(),
    );
}
