//! Micro-benchmark of the daemon's per-event model update: apply 30,000 `RouteAdded` events
//! (then as many `RouteRemoved`) to an [`ObservedState`] holding one overlay device and print
//! events/s. Unprivileged. `cargo run --release -p dataplane-watchdog --example bench_apply`
//! (`BENCH_ROUTES` sets the count; `BENCH_RENORMALIZE=1` emulates the old re-sort per change).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use dataplane_watchdog::{
    model::{LinkInfo, ObservedDevice, ObservedState, Route, RouteKind},
    observe::{Applied, ObservedEvent},
};
use ipnet::{IpNet, Ipv4Net};

const DEVICE: &str = "vxlan.calico";
const IFINDEX: u32 = 7;

fn route(i: u32) -> Route {
    // One /26 block per peer, as Calico programs them.
    let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i * 64;
    Route {
        destination: IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 26).expect("prefix")),
        gateway: Some(Ipv4Addr::from(base).into()),
        onlink: true,
        protocol: 3,
        table: 254,
        kind: RouteKind::Unicast,
        metric: None,
    }
}

/// A deterministic permutation of `0..n` (kernel notifications arrive in no particular order).
fn shuffled(n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn run(label: &str, events: &[ObservedEvent], state: &mut ObservedState, watched: &[String]) {
    // BENCH_RENORMALIZE=1 re-sorts every list after each change, as `apply` used to.
    let renormalize = std::env::var_os("BENCH_RENORMALIZE").is_some();
    let start = Instant::now();
    let mut changed = 0usize;
    for e in events {
        if state.apply(e, watched) == Applied::Changed {
            changed += 1;
            if renormalize {
                state.normalize();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label:<34} {:>7} events in {:>8.3} s = {:>12.0} events/s ({changed} changed)",
        events.len(),
        secs,
        events.len() as f64 / secs
    );
}

fn main() {
    let n: u32 = std::env::var("BENCH_ROUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30_000);
    let watched = vec![DEVICE.to_string()];
    let mut devices = BTreeMap::new();
    devices.insert(
        DEVICE.to_string(),
        ObservedDevice {
            link: LinkInfo {
                name: DEVICE.into(),
                ifindex: IFINDEX,
                up: true,
                ..LinkInfo::default()
            },
            ..ObservedDevice::default()
        },
    );
    let mut state = ObservedState {
        devices,
        ..Default::default()
    };
    let add = |i: u32, replace: bool| ObservedEvent::RouteAdded {
        ifindex: IFINDEX,
        route: route(i),
        replace,
    };
    let order = shuffled(n);

    let adds: Vec<_> = order.iter().map(|&i| add(i, false)).collect();
    run("RouteAdded, random order", &adds, &mut state, &watched);
    let replaces: Vec<_> = order.iter().map(|&i| add(i, true)).collect();
    run(
        "RouteAdded replace, already there",
        &replaces,
        &mut state,
        &watched,
    );
    let removes: Vec<_> = order
        .iter()
        .map(|&i| ObservedEvent::RouteRemoved {
            ifindex: IFINDEX,
            route: route(i),
        })
        .collect();
    run("RouteRemoved, random order", &removes, &mut state, &watched);
    let ascending: Vec<_> = (0..n).map(|i| add(i, true)).collect();
    run(
        "RouteAdded replace, ascending",
        &ascending,
        &mut state,
        &watched,
    );
    assert_eq!(state.devices[DEVICE].routes.len(), n as usize);
}
