//! Unit tests of parsing and incremental application (no privileges needed). Netlink messages
//! are built byte by byte, as the kernel sends them.

use std::collections::BTreeMap;

use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};

use super::{parse, parse_datagram, Applied, KernelObserver, ObservedEvent};
use crate::model::{
    v4, FdbEntry, LinkInfo, MacAddr, NeighState, Neighbour, ObservedDevice, ObservedState, Route,
    RouteKind,
};

// ---- raw message builders -------------------------------------------------------------------

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const NLM_F_REPLACE: u16 = 0x100;
const AF_INET: u8 = 2;
const AF_BRIDGE: u8 = 7;

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut out = Vec::new();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize((len + 3) & !3, 0);
    out
}

fn nlmsg(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = 16 + body.len();
    let mut out = Vec::new();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // seq
    out.extend_from_slice(&0u32.to_ne_bytes()); // pid
    out.extend_from_slice(body);
    out.resize((len + 3) & !3, 0);
    out
}

struct RtMsg {
    dst_len: u8,
    table: u8,
    protocol: u8,
    kind: u8,
    flags: u32,
}

fn rtmsg(h: RtMsg, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![AF_INET, h.dst_len, 0, 0, h.table, h.protocol, 0, h.kind];
    body.extend_from_slice(&h.flags.to_ne_bytes());
    for a in attrs {
        body.extend_from_slice(a);
    }
    body
}

fn ndmsg(family: u8, ifindex: i32, state: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![family, 0, 0, 0];
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&state.to_ne_bytes());
    body.push(0x02); // NTF_SELF
    body.push(0);
    for a in attrs {
        body.extend_from_slice(a);
    }
    body
}

fn ifinfomsg(family: u8, ifindex: i32, flags: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![family, 0];
    body.extend_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
    body.extend_from_slice(&ifindex.to_ne_bytes());
    body.extend_from_slice(&flags.to_ne_bytes());
    body.extend_from_slice(&0u32.to_ne_bytes());
    for a in attrs {
        body.extend_from_slice(a);
    }
    body
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn mac(s: &str) -> MacAddr {
    s.parse().unwrap()
}

fn calico_route(dst: &str, gw: [u8; 4]) -> Route {
    Route {
        destination: net(dst),
        gateway: Some(v4(gw[0], gw[1], gw[2], gw[3])),
        onlink: true,
        protocol: 3,
        table: 254,
        kind: RouteKind::Unicast,
        metric: None,
    }
}

// ---- parsing ----------------------------------------------------------------------------------

#[test]
fn onlink_route_in_a_high_table_with_an_unknown_attribute() {
    let body = rtmsg(
        RtMsg {
            dst_len: 26,
            table: 252, // RT_TABLE_COMPAT: the real id is in RTA_TABLE
            protocol: 80,
            kind: 1,     // RTN_UNICAST
            flags: 0x04, // RTNH_F_ONLINK
        },
        &[
            attr(15, &1000u32.to_ne_bytes()), // RTA_TABLE
            attr(1, &[10, 1, 235, 128]),      // RTA_DST
            attr(5, &[10, 1, 235, 133]),      // RTA_GATEWAY
            attr(4, &7u32.to_ne_bytes()),     // RTA_OIF
            attr(6, &20u32.to_ne_bytes()),    // RTA_PRIORITY
            attr(999, &[1, 2, 3]),            // unknown to everyone
        ],
    );
    let events = parse_datagram(&nlmsg(RTM_NEWROUTE, NLM_F_REPLACE, &body));
    assert_eq!(
        events,
        vec![ObservedEvent::RouteAdded {
            ifindex: 7,
            route: Route {
                destination: net("10.1.235.128/26"),
                gateway: Some(v4(10, 1, 235, 133)),
                onlink: true,
                protocol: 80,
                table: 1000,
                kind: RouteKind::Unicast,
                metric: Some(20),
            },
            replace: true,
        }]
    );
}

#[test]
fn blackhole_route_has_no_device_and_is_a_deviceless_reject() {
    let body = rtmsg(
        RtMsg {
            dst_len: 26,
            table: 254,
            protocol: 80,
            kind: 6, // RTN_BLACKHOLE
            flags: 0,
        },
        &[attr(15, &254u32.to_ne_bytes()), attr(1, &[10, 1, 7, 0])],
    );
    let events = parse_datagram(&nlmsg(RTM_DELROUTE, 0, &body));
    let [ObservedEvent::RouteRemoved { ifindex, route }] = events.as_slice() else {
        panic!("expected one RouteRemoved, got {events:?}");
    };
    assert_eq!(*ifindex, parse::NO_DEVICE);
    assert_eq!(route.kind, RouteKind::Blackhole);
    assert_eq!(route.gateway, None);
    assert!(!route.onlink);
    assert!(parse::is_deviceless_reject(*ifindex, route));
    assert!(!parse::is_deviceless_reject(3, route));
}

#[test]
fn default_route_without_rta_dst_is_zero_slash_zero() {
    let body = rtmsg(
        RtMsg {
            dst_len: 0,
            table: 254,
            protocol: 3,
            kind: 1,
            flags: 0,
        },
        &[attr(4, &2u32.to_ne_bytes()), attr(5, &[192, 168, 77, 1])],
    );
    let events = parse_datagram(&nlmsg(RTM_NEWROUTE, 0, &body));
    let [ObservedEvent::RouteAdded { route, replace, .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(route.destination, net("0.0.0.0/0"));
    assert_eq!(
        route.table, 254,
        "falls back to rtm_table without RTA_TABLE"
    );
    assert!(!replace);
}

#[test]
fn permanent_neighbour_and_fdb_entry() {
    let datagram = [
        nlmsg(
            RTM_NEWNEIGH,
            0,
            &ndmsg(
                AF_INET,
                7,
                NeighState::PERMANENT,
                &[
                    attr(1, &[10, 1, 235, 133]),
                    attr(2, &[0x66, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
                ],
            ),
        ),
        nlmsg(
            RTM_NEWNEIGH,
            0,
            &ndmsg(
                AF_BRIDGE,
                7,
                NeighState::PERMANENT | NeighState::NOARP,
                &[
                    attr(2, &[0x66, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
                    attr(1, &[192, 168, 77, 3]),
                    attr(7, &[0x12, 0xb5, 0, 0]), // NDA_VNI-ish payload: ignored
                ],
            ),
        ),
    ]
    .concat();
    let events = parse_datagram(&datagram);
    assert_eq!(
        events,
        vec![
            ObservedEvent::NeighbourChanged {
                ifindex: 7,
                neighbour: Neighbour {
                    ip: v4(10, 1, 235, 133),
                    mac: Some(mac("66:aa:bb:cc:dd:ee")),
                    state: NeighState(NeighState::PERMANENT),
                },
            },
            ObservedEvent::FdbChanged {
                ifindex: 7,
                entry: FdbEntry {
                    mac: mac("66:aa:bb:cc:dd:ee"),
                    destination: Some(v4(192, 168, 77, 3)),
                    permanent: true,
                },
            },
        ]
    );
}

#[test]
fn incomplete_neighbour_has_no_mac() {
    let body = ndmsg(
        AF_INET,
        7,
        NeighState::INCOMPLETE,
        &[attr(1, &[10, 1, 235, 128])],
    );
    let events = parse_datagram(&nlmsg(RTM_NEWNEIGH, 0, &body));
    let [ObservedEvent::NeighbourChanged { neighbour, .. }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(neighbour.mac, None);
    assert!(!neighbour.state.is_resolved());
}

#[test]
fn bridge_port_dellink_is_not_a_device_removal() {
    let name = attr(3, b"vxlan.calico\0");
    let port = parse_datagram(&nlmsg(
        RTM_DELLINK,
        0,
        &ifinfomsg(AF_BRIDGE, 7, 0, std::slice::from_ref(&name)),
    ));
    assert_eq!(port, vec![]);
    let gone = parse_datagram(&nlmsg(RTM_DELLINK, 0, &ifinfomsg(0, 7, 0, &[name])));
    assert_eq!(
        gone,
        vec![ObservedEvent::LinkRemoved {
            ifindex: 7,
            name: "vxlan.calico".into()
        }]
    );
}

#[test]
fn link_without_name_is_skipped_and_up_flag_is_read() {
    assert_eq!(
        parse_datagram(&nlmsg(RTM_NEWLINK, 0, &ifinfomsg(0, 9, 1, &[]))),
        vec![]
    );
    let events = parse_datagram(&nlmsg(
        RTM_NEWLINK,
        0,
        &ifinfomsg(
            0,
            9,
            1,
            &[attr(3, b"flannel.1\0"), attr(4, &1450u32.to_ne_bytes())],
        ),
    ));
    let [ObservedEvent::LinkChanged { link }] = events.as_slice() else {
        panic!("{events:?}");
    };
    assert_eq!(
        (link.name.as_str(), link.ifindex, link.up),
        ("flannel.1", 9, true)
    );
    assert_eq!(link.mtu, Some(1450));
}

#[test]
fn garbage_never_panics() {
    let good = nlmsg(
        RTM_NEWNEIGH,
        0,
        &ndmsg(AF_INET, 7, NeighState::STALE, &[attr(1, &[10, 0, 0, 1])]),
    );
    let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![0; 3], vec![0xff; 64]];
    // Every truncation of a valid message, and a valid message with a lying length.
    for cut in 0..good.len() {
        inputs.push(good[..cut].to_vec());
    }
    let mut lying = good.clone();
    lying[0] = 200;
    inputs.push(lying);
    // An attribute whose length runs past the message.
    let mut bad_attr = good.clone();
    bad_attr[16 + 12] = 0xf0;
    inputs.push(bad_attr);
    for input in inputs {
        let _ = parse_datagram(&input);
    }
    assert_eq!(parse_datagram(&good).len(), 1);
}

#[test]
fn vxlan_link_message_becomes_link_info() {
    let mut msg = LinkMessage::default();
    msg.header.index = 7;
    msg.header.flags = LinkFlags::Up | LinkFlags::Running;
    msg.attributes = vec![
        LinkAttribute::IfName("vxlan.calico".into()),
        LinkAttribute::Address(vec![0x66, 1, 2, 3, 4, 5]),
        LinkAttribute::Mtu(1450),
        LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Vxlan),
            NlLinkInfo::Data(InfoData::Vxlan(vec![
                InfoVxlan::Id(4096),
                InfoVxlan::Port(4789),
                InfoVxlan::Learning(false),
                InfoVxlan::Local("192.168.77.1".parse().unwrap()),
            ])),
        ]),
    ];
    assert_eq!(
        parse::link_from_message(&msg),
        Some(LinkInfo {
            name: "vxlan.calico".into(),
            ifindex: 7,
            kind: Some("vxlan".into()),
            vni: Some(4096),
            port: Some(4789),
            learning: Some(false),
            local: Some(v4(192, 168, 77, 1)),
            up: true,
            mac: Some(mac("66:01:02:03:04:05")),
            mtu: Some(1450),
            addresses: vec![],
            external: false,
        })
    );
}

// ---- incremental application ------------------------------------------------------------------

fn watched() -> Vec<String> {
    vec!["vxlan.calico".to_string(), "vxlan-v6.calico".to_string()]
}

fn state_with_device(ifindex: u32) -> ObservedState {
    let mut devices = BTreeMap::new();
    devices.insert(
        "vxlan.calico".to_string(),
        ObservedDevice {
            link: LinkInfo {
                name: "vxlan.calico".into(),
                ifindex,
                kind: Some("vxlan".into()),
                vni: Some(4096),
                up: true,
                addresses: vec![net("10.1.1.0/32")],
                ..LinkInfo::default()
            },
            routes: vec![calico_route("10.1.235.128/26", [10, 1, 235, 133])],
            neighbours: vec![],
            fdb: vec![],
        },
    );
    ObservedState {
        devices,
        ..Default::default()
    }
}

#[test]
fn route_replace_moves_the_gateway_and_replay_is_idempotent() {
    let mut state = state_with_device(7);
    let wrong = calico_route("10.1.235.128/26", [10, 1, 235, 128]);
    let event = ObservedEvent::RouteAdded {
        ifindex: 7,
        route: wrong.clone(),
        replace: true,
    };
    assert_eq!(state.apply(&event, &watched()), Applied::Changed);
    assert_eq!(state.devices["vxlan.calico"].routes, vec![wrong]);
    assert_eq!(state.apply(&event, &watched()), Applied::Unchanged);
}

#[test]
fn route_replaced_onto_another_device_leaves_ours() {
    let mut state = state_with_device(7);
    let event = ObservedEvent::RouteAdded {
        ifindex: 2,
        route: calico_route("10.1.235.128/26", [192, 168, 77, 3]),
        replace: true,
    };
    assert_eq!(state.apply(&event, &watched()), Applied::Changed);
    assert!(state.devices["vxlan.calico"].routes.is_empty());
}

#[test]
fn append_keeps_both_next_hops_and_delete_removes_one() {
    let mut state = state_with_device(7);
    let second = calico_route("10.1.235.128/26", [10, 1, 235, 134]);
    let add = ObservedEvent::RouteAdded {
        ifindex: 7,
        route: second.clone(),
        replace: false,
    };
    assert_eq!(state.apply(&add, &watched()), Applied::Changed);
    assert_eq!(state.devices["vxlan.calico"].routes.len(), 2);
    let del = ObservedEvent::RouteRemoved {
        ifindex: 7,
        route: calico_route("10.1.235.128/26", [10, 1, 235, 133]),
    };
    assert_eq!(state.apply(&del, &watched()), Applied::Changed);
    assert_eq!(state.devices["vxlan.calico"].routes, vec![second]);
    assert_eq!(state.apply(&del, &watched()), Applied::Unchanged);
}

#[test]
fn blackhole_lands_on_every_watched_device_and_routes_elsewhere_do_not() {
    let mut state = state_with_device(7);
    let mut v6 = state.devices["vxlan.calico"].clone();
    v6.link.name = "vxlan-v6.calico".into();
    v6.link.ifindex = 8;
    v6.routes.clear();
    state.devices.insert("vxlan-v6.calico".into(), v6);
    let blackhole = Route {
        destination: net("10.1.7.0/26"),
        gateway: None,
        onlink: false,
        protocol: 80,
        table: 254,
        kind: RouteKind::Blackhole,
        metric: None,
    };
    let add = ObservedEvent::RouteAdded {
        ifindex: 0,
        route: blackhole.clone(),
        replace: false,
    };
    assert_eq!(state.apply(&add, &watched()), Applied::Changed);
    assert!(state
        .devices
        .values()
        .all(|d| d.routes.contains(&blackhole)));
    let eth0 = ObservedEvent::RouteAdded {
        ifindex: 2,
        route: calico_route("192.168.0.0/16", [192, 168, 77, 1]),
        replace: false,
    };
    // Not on a watched device, but a gatewayed main-table route: a possible CrossSubnet route.
    let devices_before = state.devices.clone();
    assert_eq!(state.apply(&eth0, &watched()), Applied::Changed);
    assert_eq!(state.devices, devices_before);
    assert_eq!(state.direct_routes.len(), 1);
    assert_eq!(state.apply(&eth0, &watched()), Applied::Unchanged);
    let del = ObservedEvent::RouteRemoved {
        ifindex: 0,
        route: blackhole.clone(),
    };
    assert_eq!(state.apply(&del, &watched()), Applied::Changed);
    assert!(state
        .devices
        .values()
        .all(|d| !d.routes.contains(&blackhole)));
}

#[test]
fn neighbour_and_fdb_upsert_by_key() {
    let mut state = state_with_device(7);
    let failed = Neighbour {
        ip: v4(10, 1, 235, 128),
        mac: None,
        state: NeighState(NeighState::FAILED),
    };
    let fixed = Neighbour {
        mac: Some(mac("66:aa:bb:cc:dd:ee")),
        state: NeighState(NeighState::PERMANENT),
        ..failed.clone()
    };
    for n in [&failed, &fixed] {
        let e = ObservedEvent::NeighbourChanged {
            ifindex: 7,
            neighbour: n.clone(),
        };
        assert_eq!(state.apply(&e, &watched()), Applied::Changed);
    }
    assert_eq!(
        state.devices["vxlan.calico"].neighbours,
        vec![fixed.clone()]
    );

    let entry = |dst: [u8; 4]| FdbEntry {
        mac: mac("66:aa:bb:cc:dd:ee"),
        destination: Some(v4(dst[0], dst[1], dst[2], dst[3])),
        permanent: true,
    };
    for dst in [[192, 168, 77, 9], [192, 168, 77, 3]] {
        let e = ObservedEvent::FdbChanged {
            ifindex: 7,
            entry: entry(dst),
        };
        assert_eq!(state.apply(&e, &watched()), Applied::Changed);
    }
    assert_eq!(
        state.devices["vxlan.calico"].fdb,
        vec![entry([192, 168, 77, 3])]
    );
    // Events for other devices are ignored.
    let other = ObservedEvent::NeighbourRemoved {
        ifindex: 99,
        neighbour: fixed.clone(),
    };
    assert_eq!(state.apply(&other, &watched()), Applied::Unchanged);
    let rm = ObservedEvent::NeighbourRemoved {
        ifindex: 7,
        neighbour: fixed,
    };
    assert_eq!(state.apply(&rm, &watched()), Applied::Changed);
    assert!(state.devices["vxlan.calico"].neighbours.is_empty());
}

#[test]
fn all_zero_fdb_entries_are_keyed_by_destination() {
    let mut state = state_with_device(7);
    for last in [3u8, 4] {
        let e = ObservedEvent::FdbChanged {
            ifindex: 7,
            entry: FdbEntry {
                mac: MacAddr::default(),
                destination: Some(v4(192, 168, 77, last)),
                permanent: true,
            },
        };
        state.apply(&e, &watched());
    }
    assert_eq!(state.devices["vxlan.calico"].fdb.len(), 2);
}

#[test]
fn link_events_that_hide_kernel_flushes_ask_for_resync() {
    let mut state = state_with_device(7);
    let mut link = state.devices["vxlan.calico"].link.clone();
    link.addresses.clear();
    link.mtu = Some(1400);
    assert_eq!(
        state.apply(
            &ObservedEvent::LinkChanged { link: link.clone() },
            &watched()
        ),
        Applied::Changed
    );
    let dev = &state.devices["vxlan.calico"];
    assert_eq!(dev.link.mtu, Some(1400));
    assert_eq!(
        dev.link.addresses,
        vec![net("10.1.1.0/32")],
        "kept across link events"
    );
    assert_eq!(dev.routes.len(), 1);

    link.up = false;
    assert_eq!(
        state.apply(
            &ObservedEvent::LinkChanged { link: link.clone() },
            &watched()
        ),
        Applied::ResyncNeeded
    );
    // Recreated with a new ifindex: starts empty and needs a snapshot.
    link.ifindex = 12;
    assert_eq!(
        state.apply(
            &ObservedEvent::LinkChanged { link: link.clone() },
            &watched()
        ),
        Applied::ResyncNeeded
    );
    assert!(state.devices["vxlan.calico"].routes.is_empty());
    // Unwatched devices never enter the model.
    link.name = "eth0".into();
    link.ifindex = 2;
    assert_eq!(
        state.apply(&ObservedEvent::LinkChanged { link }, &watched()),
        Applied::Unchanged
    );
    assert!(!state.devices.contains_key("eth0"));
    assert_eq!(
        state.apply(
            &ObservedEvent::LinkRemoved {
                ifindex: 12,
                name: "vxlan.calico".into()
            },
            &watched()
        ),
        Applied::Changed
    );
    assert!(state.devices.is_empty());
    assert_eq!(
        state.apply(&ObservedEvent::Overrun, &watched()),
        Applied::ResyncNeeded
    );
}

#[test]
fn renamed_device_leaves_the_model() {
    let mut state = state_with_device(7);
    let mut link = state.devices["vxlan.calico"].link.clone();
    link.name = "old.vxlan".into();
    assert_eq!(
        state.apply(&ObservedEvent::LinkChanged { link }, &watched()),
        Applied::ResyncNeeded
    );
    assert!(state.devices.is_empty());
}

#[test]
fn address_events() {
    let mut state = state_with_device(7);
    let add = ObservedEvent::AddressAdded {
        ifindex: 7,
        address: net("fd00::1/128"),
    };
    assert_eq!(state.apply(&add, &watched()), Applied::Changed);
    assert_eq!(state.apply(&add, &watched()), Applied::Unchanged);
    let rm = ObservedEvent::AddressRemoved {
        ifindex: 7,
        address: net("10.1.1.0/32"),
    };
    assert_eq!(state.apply(&rm, &watched()), Applied::ResyncNeeded);
    assert_eq!(
        state.devices["vxlan.calico"].link.addresses,
        vec![net("fd00::1/128")]
    );
}

#[tokio::test]
async fn fixed_state_observes_only_requested_devices() {
    let state = state_with_device(7);
    let got = state.snapshot(&["flannel.1".to_string()]).await.unwrap();
    assert!(got.devices.is_empty());
    let got = state.snapshot(&watched()).await.unwrap();
    assert_eq!(got, state);
}

#[test]
fn apply_keeps_every_list_normalized_without_resorting() {
    // Pseudo-random adds, replaces, appends and removals: after each one the state must equal
    // its own normalized copy (sorted, no duplicates), which is what a fresh snapshot yields.
    let mut state = state_with_device(7);
    let mut x: u32 = 12345;
    let mut next = |m: u32| {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (x >> 16) % m
    };
    for _ in 0..2000 {
        let dst = format!("10.1.{}.0/26", next(16));
        let gw = [10, 1, 0, next(3) as u8];
        let route = Route {
            metric: if next(4) == 0 { Some(100) } else { None },
            protocol: if next(2) == 0 { 3 } else { 80 },
            ..calico_route(&dst, gw)
        };
        let ip = v4(10, 1, 0, next(16) as u8);
        let fdb = FdbEntry {
            mac: if next(3) == 0 {
                MacAddr::default()
            } else {
                mac(&format!("66:aa:bb:cc:dd:{:02x}", next(8)))
            },
            destination: Some(v4(192, 168, 77, next(4) as u8)),
            permanent: next(2) == 0,
        };
        let event = match next(7) {
            0 | 1 => ObservedEvent::RouteAdded {
                ifindex: 7,
                route,
                replace: next(2) == 0,
            },
            2 => ObservedEvent::RouteRemoved { ifindex: 7, route },
            3 => ObservedEvent::NeighbourChanged {
                ifindex: 7,
                neighbour: Neighbour {
                    ip,
                    mac: None,
                    state: NeighState(if next(2) == 0 {
                        NeighState::FAILED
                    } else {
                        NeighState::PERMANENT
                    }),
                },
            },
            4 => ObservedEvent::NeighbourRemoved {
                ifindex: 7,
                neighbour: Neighbour {
                    ip,
                    mac: None,
                    state: NeighState(NeighState::FAILED),
                },
            },
            5 => ObservedEvent::FdbChanged {
                ifindex: 7,
                entry: fdb,
            },
            _ => ObservedEvent::FdbRemoved {
                ifindex: 7,
                entry: fdb,
            },
        };
        state.apply(&event, &watched());
        let mut normalized = state.clone();
        normalized.normalize();
        assert_eq!(state, normalized, "after {event:?}");
    }
    assert!(!state.devices["vxlan.calico"].routes.is_empty());
}
