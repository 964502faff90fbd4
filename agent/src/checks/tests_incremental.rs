//! The incremental [`Evaluator`] against its oracle, a full evaluation from scratch: after any
//! sequence of kernel events, in batches of any size, both must return the same report.

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;
use proptest::prelude::*;

use super::incremental::Recomputed;
use super::tests::{ip, net};
use super::tests_dual_stack::{dual_stack, V4, V6};
use super::*;
use crate::{
    model::{DirectRoute, FdbEntry, NeighState, Neighbour, Route, RouteKind},
    observe::{Applied, ObservedEvent},
};

const V4_IFINDEX: u32 = 7;
const V6_IFINDEX: u32 = 8;
const ETH0: u32 = 2;

/// Both overlays of the dual-stack cluster, plus an underlay: k8s02 is a CrossSubnet peer
/// (its first block routed via its node address on eth0, whose subnet is connected there).
fn cluster() -> (DesiredState, ObservedState) {
    let mut c = dual_stack();
    c.observed.devices.get_mut(V6).unwrap().link.ifindex = V6_IFINDEX;
    let k8s02 = c.desired.nodes["k8s02"].clone();
    c.observed
        .devices
        .get_mut(V4)
        .unwrap()
        .routes
        .retain(|r| r.destination != k8s02.blocks[0]);
    c.observed.direct_routes.insert(
        k8s02.blocks[0],
        DirectRoute {
            ifindex: ETH0,
            gateway: Some(k8s02.node_ip),
        },
    );
    c.observed.direct_routes.insert(
        net("192.168.77.0/24"),
        DirectRoute {
            ifindex: ETH0,
            gateway: None,
        },
    );
    c.observed.normalize();
    (c.desired, c.observed)
}

/// Destinations that matter: every block (both families), a borrowed-like /32, a route inside
/// a block, the local block, a stray block, the underlay subnet, the default route.
fn destinations(desired: &DesiredState) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = desired
        .nodes
        .values()
        .flat_map(|n| n.blocks.iter().copied())
        .collect();
    out.extend(
        [
            "10.1.235.133/32",
            "10.1.235.128/28",
            "10.9.9.0/26",
            "192.168.77.0/24",
            "192.168.77.3/32",
            "0.0.0.0/0",
            "fd10:1:235::80/128",
            "fd10:9::/122",
        ]
        .iter()
        .map(|s| net(s)),
    );
    out
}

/// Addresses that matter: every VTEP and node address of both families, and nobody's.
fn addresses(desired: &DesiredState) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for n in desired.nodes.values() {
        out.extend([n.vtep_ip, n.node_ip]);
        if let Some(v6) = &n.ipv6 {
            out.extend([v6.vtep_ip, v6.node_ip]);
        }
    }
    out.extend([ip("10.1.235.191"), ip("fd10:1:235::99")]);
    out
}

fn macs(desired: &DesiredState) -> Vec<MacAddr> {
    let mut out: Vec<MacAddr> = desired.nodes.values().map(|n| n.vtep_mac).collect();
    out.extend(
        desired
            .nodes
            .values()
            .filter_map(|n| n.ipv6.as_ref().map(|s| s.vtep_mac)),
    );
    out.push(MacAddr([0x02, 0, 0, 0, 0, 0x99]));
    out
}

/// One kernel event, from small indexes into the pools above.
#[derive(Debug, Clone)]
enum Step {
    Route {
        add: bool,
        replace: bool,
        ifindex: u8,
        dst: usize,
        gateway: Option<usize>,
        kind: u8,
        metric: bool,
        main: bool,
        kernel: bool,
    },
    Neighbour {
        remove: bool,
        ifindex: u8,
        ip: usize,
        mac: Option<usize>,
        state: u8,
    },
    Fdb {
        remove: bool,
        ifindex: u8,
        mac: usize,
        destination: usize,
    },
    /// Something that is not a route, neighbour or FDB entry: everything is checked again.
    Address { ifindex: u8, dst: usize },
    /// The datastore switches to the other version (k8s03 moved its VTEP and lost a block).
    Datastore,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (
            any::<bool>(),
            any::<bool>(),
            // Mostly the IPv4 overlay, where most of the pool's blocks are.
            prop_oneof![4 => Just(0u8), 2 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
            0..64usize,
            proptest::option::of(0..64usize),
            0..4u8,
            any::<bool>(),
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(add, replace, ifindex, dst, gateway, kind, metric, main, kernel)| {
                Step::Route { add, replace, ifindex, dst, gateway, kind, metric, main, kernel }
            }),
        3 => (any::<bool>(), prop_oneof![3 => Just(0u8), 1 => Just(1u8)], 0..64usize, proptest::option::of(0..64usize), 0..3u8)
            .prop_map(|(remove, ifindex, ip, mac, state)| Step::Neighbour {
                remove,
                ifindex,
                ip,
                mac,
                state
            }),
        2 => (any::<bool>(), 0..2u8, 0..64usize, 0..64usize).prop_map(
            |(remove, ifindex, mac, destination)| Step::Fdb {
                remove,
                ifindex,
                mac,
                destination
            }
        ),
        1 => (0..2u8, 0..64usize).prop_map(|(ifindex, dst)| Step::Address { ifindex, dst }),
        1 => Just(Step::Datastore),
    ]
}

fn pick<T: Copy>(pool: &[T], i: usize) -> T {
    pool[i % pool.len()]
}

fn overlay(i: u8) -> u32 {
    if i.is_multiple_of(2) {
        V4_IFINDEX
    } else {
        V6_IFINDEX
    }
}

fn event(s: &Step, desired: &DesiredState) -> ObservedEvent {
    let (dsts, addrs, macs) = (destinations(desired), addresses(desired), macs(desired));
    match *s {
        Step::Route {
            add,
            replace,
            ifindex,
            dst,
            gateway,
            kind,
            metric,
            main,
            kernel,
        } => {
            let destination = pick(&dsts, dst);
            let route = Route {
                destination,
                // A gateway of the other family is what the kernel never has.
                gateway: gateway
                    .map(|g| pick(&addrs, g))
                    .filter(|g| g.is_ipv4() == destination.addr().is_ipv4()),
                onlink: true,
                protocol: if kernel { 2 } else { 3 },
                table: if main { MAIN_TABLE } else { 100 },
                kind: [
                    RouteKind::Unicast,
                    RouteKind::Unicast,
                    RouteKind::Blackhole,
                    RouteKind::Unreachable,
                ][kind as usize % 4],
                metric: metric.then_some(100),
            };
            let ifindex = match ifindex {
                0 | 1 => overlay(ifindex),
                2 => ETH0,
                // Deviceless blackholes carry no output interface.
                _ => 0,
            };
            if add {
                ObservedEvent::RouteAdded {
                    ifindex,
                    route,
                    replace,
                }
            } else {
                ObservedEvent::RouteRemoved { ifindex, route }
            }
        }
        Step::Neighbour {
            remove,
            ifindex,
            ip,
            mac,
            state,
        } => {
            let neighbour = Neighbour {
                ip: pick(&addrs, ip),
                mac: mac.map(|m| pick(&macs, m)),
                state: NeighState(
                    [
                        NeighState::PERMANENT,
                        NeighState::FAILED,
                        NeighState::INCOMPLETE,
                    ][state as usize % 3],
                ),
            };
            let ifindex = overlay(ifindex);
            if remove {
                ObservedEvent::NeighbourRemoved { ifindex, neighbour }
            } else {
                ObservedEvent::NeighbourChanged { ifindex, neighbour }
            }
        }
        Step::Fdb {
            remove,
            ifindex,
            mac,
            destination,
        } => {
            let entry = FdbEntry {
                mac: pick(&macs, mac),
                destination: Some(pick(&addrs, destination)),
                permanent: true,
            };
            let ifindex = overlay(ifindex);
            if remove {
                ObservedEvent::FdbRemoved { ifindex, entry }
            } else {
                ObservedEvent::FdbChanged { ifindex, entry }
            }
        }
        Step::Datastore => unreachable!("not a kernel event"),
        Step::Address { ifindex, dst } => ObservedEvent::AddressAdded {
            ifindex: overlay(ifindex),
            address: pick(&dsts, dst),
        },
    }
}

fn report(ev: &mut Evaluator, observed: &ObservedState, desired: &DesiredState) -> CheckReport {
    let specs = [DeviceSpec::for_name(V4), DeviceSpec::for_name(V6)];
    ev.evaluate(&CheckInput {
        devices: &specs,
        observed,
        desired: Some(desired),
        drops: None,
        explained_recently: None,
        datastore: None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn incremental_evaluation_matches_a_full_one(
        batches in prop::collection::vec(prop::collection::vec(step(), 1..6), 1..24)
    ) {
        let (original, mut observed) = cluster();
        let mut moved = original.clone();
        let k8s03 = moved.nodes.get_mut("k8s03").unwrap();
        k8s03.vtep_ip = ip("10.1.236.1");
        k8s03.blocks.retain(|b| *b != net("10.1.235.128/26"));
        let watched = [V4.to_string(), V6.to_string()];
        let mut ev = Evaluator::default();
        let mut desired = &original;
        prop_assert!(report(&mut ev, &observed, desired).findings.is_empty());
        for batch in &batches {
            for s in batch {
                if let Step::Datastore = s {
                    desired = if std::ptr::eq(desired, &original) { &moved } else { &original };
                    ev.desired_changed();
                    continue;
                }
                let e = event(s, desired);
                match observed.apply(&e, &watched) {
                    Applied::Changed => ev.note(&e),
                    Applied::ResyncNeeded => ev.invalidate(),
                    Applied::Unchanged => {}
                }
            }
            let incremental = report(&mut ev, &observed, desired);
            let full = evaluate(&CheckInput {
                devices: &[DeviceSpec::for_name(V4), DeviceSpec::for_name(V6)],
                observed: &observed,
                desired: Some(desired),
                drops: None,
                explained_recently: None,
                datastore: None,
            });
            prop_assert_eq!(incremental, full, "after {:?}", batch);
        }
    }
}

/// The healthy cluster of the property test is healthy, and a single change is re-checked
/// without the rest: the evaluator keeps the other peers' parts as they were.
#[test]
fn one_wrong_gateway_is_found_and_cleared_incrementally() {
    let (desired, mut observed) = cluster();
    let watched = [V4.to_string(), V6.to_string()];
    let mut ev = Evaluator::default();
    assert!(report(&mut ev, &observed, &desired).findings.is_empty());
    assert!(ev.last.rebuilt);
    let block = desired.nodes["k8s03"].blocks[0];
    let wrong = Route {
        gateway: Some(ip("10.1.235.191")),
        ..super::tests::route(&block, None)
    };
    let e = ObservedEvent::RouteAdded {
        ifindex: V4_IFINDEX,
        route: wrong,
        replace: true,
    };
    assert_eq!(observed.apply(&e, &watched), Applied::Changed);
    ev.note(&e);
    let r = report(&mut ev, &observed, &desired);
    assert_eq!(
        super::tests::summary(&r),
        vec![(CheckId::GatewayWrongVtep, Some("k8s03".to_string()))]
    );
    // The block's owner and the destination, on each of the two devices.
    assert_eq!(
        ev.last,
        Recomputed {
            rebuilt: false,
            peers: 1,
            routes: 2
        }
    );
    let e = ObservedEvent::RouteAdded {
        ifindex: V4_IFINDEX,
        route: super::tests::route(&block, Some(desired.nodes["k8s03"].vtep_ip)),
        replace: true,
    };
    assert_eq!(observed.apply(&e, &watched), Applied::Changed);
    ev.note(&e);
    assert!(report(&mut ev, &observed, &desired).findings.is_empty());
    assert!(!ev.last.rebuilt);
}

/// Every peer failing (a node booting before its routes are programmed) puts a finding per
/// peer in the evaluator's cache, which lives until the next evaluation: only the room they
/// need, full or incremental.
#[test]
fn kept_parts_hold_no_spare_room() {
    let (desired, mut observed) = cluster();
    let watched = [V4.to_string(), V6.to_string()];
    let mut ev = Evaluator::default();
    for dev in observed.devices.values_mut() {
        dev.routes.clear();
    }
    let r = report(&mut ev, &observed, &desired);
    assert!(r.findings.len() >= 4, "{:?}", super::tests::summary(&r));
    assert_eq!(ev.spare_room(), 0);
    let block = desired.nodes["k8s03"].blocks[0];
    let e = ObservedEvent::RouteAdded {
        ifindex: V4_IFINDEX,
        route: Route {
            gateway: Some(ip("10.1.235.191")),
            ..super::tests::route(&block, None)
        },
        replace: true,
    };
    assert_eq!(observed.apply(&e, &watched), Applied::Changed);
    ev.note(&e);
    report(&mut ev, &observed, &desired);
    assert!(!ev.last.rebuilt);
    assert_eq!(ev.spare_room(), 0);
}

#[test]
fn findings_computed_again_the_same_are_the_ones_already_shared() {
    let (desired, mut observed) = cluster();
    let watched = [V4.to_string(), V6.to_string()];
    for dev in observed.devices.values_mut() {
        dev.routes.clear();
    }
    let mut ev = Evaluator::default();
    let first = report(&mut ev, &observed, &desired);
    assert!(
        first.findings.len() >= 4,
        "{:?}",
        super::tests::summary(&first)
    );
    let same = |a: &CheckReport, b: &CheckReport| {
        a.findings.len() == b.findings.len()
            && a.findings
                .iter()
                .zip(&b.findings)
                .all(|(x, y)| Arc::ptr_eq(x, y))
    };

    // A full rebuild (a resync, a link event) that finds the same: no second copy while the
    // open list still holds the first.
    ev.invalidate();
    let rebuilt = report(&mut ev, &observed, &desired);
    assert!(ev.last.rebuilt);
    assert!(same(&first, &rebuilt));

    // A peer's part computed again by an event that changes nothing it finds (its block
    // routed in another table): what it finds is what it found before.
    let block = desired.nodes["k8s03"].blocks[0];
    let e = ObservedEvent::RouteAdded {
        ifindex: V4_IFINDEX,
        route: Route {
            table: 100,
            ..super::tests::route(&block, Some(ip("10.1.235.128")))
        },
        replace: false,
    };
    assert_eq!(observed.apply(&e, &watched), Applied::Changed);
    ev.note(&e);
    let after = report(&mut ev, &observed, &desired);
    assert!(!ev.last.rebuilt && ev.last.peers > 0, "{:?}", ev.last);
    let unchanged: Vec<_> = after
        .findings
        .iter()
        .filter_map(|f| first.findings.iter().find(|o| o == &f).map(|o| (o, f)))
        .collect();
    assert!(!unchanged.is_empty());
    assert!(unchanged.iter().all(|(o, f)| Arc::ptr_eq(o, f)));
}
