//! Netlink dump requests → [`ObservedState`].

use std::collections::BTreeMap;

use futures::StreamExt;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::AddressMessage,
    link::{LinkAttribute, LinkMessage},
    neighbour::NeighbourMessage,
    route::RouteMessage,
    AddressFamily, RouteNetlinkMessage,
};
use tracing::{debug, warn};

use super::{
    netns::NetlinkConn,
    parse::{self, is_deviceless_reject},
    Error, Result,
};
use crate::model::{DirectRoute, ObservedDevice, ObservedState, RouteKind};

/// The main routing table.
const MAIN_TABLE: u32 = 254;

/// A dump whose result the kernel marked inconsistent (NLM_F_DUMP_INTR) is retried this often.
const DUMP_ATTEMPTS: usize = 3;

/// Linux IFNAMSIZ - 1: longer names cannot exist, and the kernel rejects them with EINVAL.
const MAX_IFNAME: usize = 15;

/// Send one request and collect every inner message of the reply. `Ok(None)` when the kernel
/// answered with `absent_errno` (e.g. ENODEV for a get by name).
async fn request(
    conn: &NetlinkConn,
    what: &'static str,
    msg: RouteNetlinkMessage,
    flags: u16,
    absent_errno: Option<i32>,
) -> Result<Option<Vec<RouteNetlinkMessage>>> {
    for attempt in 1..=DUMP_ATTEMPTS {
        let mut nl = NetlinkMessage::from(msg.clone());
        nl.header.flags = NLM_F_REQUEST | flags;
        nl.finalize();
        let mut replies = conn.handle().request(nl).map_err(|e| Error::Request {
            netns: conn.netns().to_string(),
            what,
            message: e.to_string(),
        })?;
        let mut out = Vec::new();
        let mut interrupted = false;
        while let Some(reply) = replies.next().await {
            interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
            match reply.payload {
                NetlinkPayload::InnerMessage(inner) => out.push(inner),
                NetlinkPayload::Error(err) => {
                    if let Some(code) = err.code {
                        let errno = -code.get();
                        if Some(errno) == absent_errno {
                            return Ok(None);
                        }
                        return Err(Error::Kernel {
                            netns: conn.netns().to_string(),
                            what,
                            source: std::io::Error::from_raw_os_error(errno),
                        });
                    }
                }
                NetlinkPayload::Done(_) => break,
                other => debug!(what, ?other, "unexpected netlink payload, skipped"),
            }
        }
        if !interrupted {
            return Ok(Some(out));
        }
        debug!(
            what,
            attempt,
            netns = conn.netns(),
            "dump interrupted by a change, retrying"
        );
    }
    warn!(
        what,
        netns = conn.netns(),
        "dump still inconsistent after {DUMP_ATTEMPTS} attempts"
    );
    Err(Error::Inconsistent {
        netns: conn.netns().to_string(),
        what,
    })
}

fn family_of(msg: &RouteNetlinkMessage) -> Option<AddressFamily> {
    match msg {
        RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::GetRoute(m) => {
            Some(m.header.address_family)
        }
        RouteNetlinkMessage::NewNeighbour(m) | RouteNetlinkMessage::GetNeighbour(m) => {
            Some(m.header.family)
        }
        RouteNetlinkMessage::NewAddress(m) | RouteNetlinkMessage::GetAddress(m) => {
            Some(m.header.family)
        }
        _ => None,
    }
}

/// Dump, keeping only replies of the requested family: a kernel without a handler for it
/// (IPv6 disabled at boot) answers with a dump of every family instead.
async fn dump(
    conn: &NetlinkConn,
    what: &'static str,
    msg: RouteNetlinkMessage,
) -> Result<Vec<RouteNetlinkMessage>> {
    let family = family_of(&msg).filter(|f| *f != AddressFamily::Unspec);
    let mut replies = request(conn, what, msg, NLM_F_DUMP, None)
        .await?
        .unwrap_or_default();
    if let Some(family) = family {
        replies.retain(|m| family_of(m) == Some(family));
    }
    Ok(replies)
}

fn route_dump_request(family: AddressFamily) -> RouteNetlinkMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family;
    // rtm_table 0 (unspec) without strict checking: the kernel dumps every table.
    RouteNetlinkMessage::GetRoute(msg)
}

fn neighbour_dump_request(family: AddressFamily) -> RouteNetlinkMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family;
    RouteNetlinkMessage::GetNeighbour(msg)
}

async fn dump_routes(conn: &NetlinkConn) -> Result<Vec<RouteNetlinkMessage>> {
    let mut all = dump(conn, "ipv4 route", route_dump_request(AddressFamily::Inet)).await?;
    all.extend(dump(conn, "ipv6 route", route_dump_request(AddressFamily::Inet6)).await?);
    Ok(all)
}

/// Only the raw IPv4 + IPv6 route dump of every table, counted: the baseline the benchmark
/// compares the checks against.
pub async fn dump_route_count(conn: &NetlinkConn) -> Result<usize> {
    Ok(dump_routes(conn).await?.len())
}

/// Every dump a snapshot makes (addresses, IPv4 + IPv6 routes of every table, IPv4 + IPv6
/// neighbours, FDB), parsed into netlink messages and counted, with nothing built from them:
/// the kernel-and-parse cost a resync cannot avoid (benchmark baseline).
pub async fn dump_all_count(conn: &NetlinkConn) -> Result<usize> {
    let mut addr_req = AddressMessage::default();
    addr_req.header.family = AddressFamily::Unspec;
    let mut n = dump(conn, "address", RouteNetlinkMessage::GetAddress(addr_req))
        .await?
        .len();
    n += dump_routes(conn).await?.len();
    for (family, what) in [
        (AddressFamily::Inet, "ipv4 neighbour"),
        (AddressFamily::Inet6, "ipv6 neighbour"),
        (AddressFamily::Bridge, "fdb"),
    ] {
        n += dump(conn, what, neighbour_dump_request(family))
            .await?
            .len();
    }
    Ok(n)
}

/// One link by name; `None` when it does not exist.
async fn get_link(conn: &NetlinkConn, name: &str) -> Result<Option<crate::model::LinkInfo>> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        warn!(
            device = name,
            "not a valid interface name, treated as absent"
        );
        return Ok(None);
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let replies = request(
        conn,
        "link",
        RouteNetlinkMessage::GetLink(msg),
        0,
        Some(libc::ENODEV),
    )
    .await?;
    Ok(replies.into_iter().flatten().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(link) => parse::link_from_message(&link),
        _ => None,
    }))
}

/// Snapshot of the watched `devices` in the connection's namespace. Devices that do not exist
/// are absent from the result.
pub async fn snapshot(conn: &NetlinkConn, devices: &[String]) -> Result<ObservedState> {
    let mut state = ObservedState::default();
    let mut names: BTreeMap<u32, String> = BTreeMap::new();
    for name in devices {
        if let Some(link) = get_link(conn, name).await? {
            names.insert(link.ifindex, link.name.clone());
            state.devices.insert(
                link.name.clone(),
                ObservedDevice {
                    link,
                    ..ObservedDevice::default()
                },
            );
        }
    }
    let mut addr_req = AddressMessage::default();
    addr_req.header.family = AddressFamily::Unspec;
    for msg in dump(conn, "address", RouteNetlinkMessage::GetAddress(addr_req)).await? {
        if let RouteNetlinkMessage::NewAddress(addr) = msg {
            if let Some((ifindex, net)) = parse::address_from_message(&addr) {
                if let Some(dev) = lookup(&mut state, &names, ifindex) {
                    dev.link.addresses.push(net);
                }
            }
        }
    }

    for msg in dump_routes(conn).await? {
        if let RouteNetlinkMessage::NewRoute(route) = msg {
            for (ifindex, route) in parse::routes_from_message(&route) {
                if is_deviceless_reject(ifindex, &route) {
                    for dev in state.devices.values_mut() {
                        dev.routes.push(route.clone());
                    }
                } else if let Some(dev) = lookup(&mut state, &names, ifindex) {
                    dev.routes.push(route);
                } else if route.table == MAIN_TABLE
                    && route.kind == RouteKind::Unicast
                    && route.gateway.is_some()
                {
                    state.direct_routes.insert(
                        route.destination,
                        DirectRoute {
                            ifindex,
                            gateway: route.gateway,
                        },
                    );
                }
            }
        }
    }

    for (family, what) in [
        (AddressFamily::Inet, "ipv4 neighbour"),
        (AddressFamily::Inet6, "ipv6 neighbour"),
    ] {
        for msg in dump(conn, what, neighbour_dump_request(family)).await? {
            if let RouteNetlinkMessage::NewNeighbour(neigh) = msg {
                if let Some((ifindex, n)) = parse::neighbour_from_message(&neigh) {
                    if let Some(dev) = lookup(&mut state, &names, ifindex) {
                        dev.neighbours.push(n);
                    }
                }
            }
        }
    }

    for msg in dump(conn, "fdb", neighbour_dump_request(AddressFamily::Bridge)).await? {
        if let RouteNetlinkMessage::NewNeighbour(neigh) = msg {
            if let Some((ifindex, entry)) = parse::fdb_from_message(&neigh) {
                if let Some(dev) = lookup(&mut state, &names, ifindex) {
                    dev.fdb.push(entry);
                }
            }
        }
    }

    state.normalize();
    Ok(state)
}

fn lookup<'a>(
    state: &'a mut ObservedState,
    names: &BTreeMap<u32, String>,
    ifindex: u32,
) -> Option<&'a mut ObservedDevice> {
    state.devices.get_mut(names.get(&ifindex)?)
}
