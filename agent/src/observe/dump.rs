//! Netlink dump requests → [`ObservedState`].

use std::collections::BTreeMap;

use futures::StreamExt;
use ipnet::IpNet;
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
use crate::model::{
    DirectRoute, FdbEntry, Neighbour, ObservedDevice, ObservedState, Route, RouteKind,
};

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
    request_fold(conn, what, msg, flags, absent_errno, Vec::new, Vec::push).await
}

/// Send one request and fold every inner message of the reply into a `T` as it arrives, so a
/// dump of 30,000 routes never holds 30,000 parsed messages at once (that peak is what
/// fragments the heap). Each attempt starts from `init()`: a dump the kernel marks
/// inconsistent (NLM_F_DUMP_INTR) is redone from scratch. `Ok(None)` when the kernel answered
/// with `absent_errno`.
async fn request_fold<T>(
    conn: &NetlinkConn,
    what: &'static str,
    msg: RouteNetlinkMessage,
    flags: u16,
    absent_errno: Option<i32>,
    init: impl Fn() -> T,
    mut fold: impl FnMut(&mut T, RouteNetlinkMessage),
) -> Result<Option<T>> {
    for attempt in 1..=DUMP_ATTEMPTS {
        let mut nl = NetlinkMessage::from(msg.clone());
        nl.header.flags = NLM_F_REQUEST | flags;
        nl.finalize();
        let mut replies = conn.handle().request(nl).map_err(|e| Error::Request {
            netns: conn.netns().to_string(),
            what,
            message: e.to_string(),
        })?;
        let mut acc = init();
        let mut interrupted = false;
        while let Some(reply) = replies.next().await {
            interrupted |= reply.header.flags & NLM_F_DUMP_INTR != 0;
            match reply.payload {
                NetlinkPayload::InnerMessage(inner) => fold(&mut acc, inner),
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
            return Ok(Some(acc));
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
    dump_fold(conn, what, msg, Vec::new, Vec::push).await
}

/// [`dump`], folding each reply of the requested family into a `T` as it arrives.
async fn dump_fold<T>(
    conn: &NetlinkConn,
    what: &'static str,
    msg: RouteNetlinkMessage,
    init: impl Fn() -> T,
    mut fold: impl FnMut(&mut T, RouteNetlinkMessage),
) -> Result<T> {
    let family = family_of(&msg).filter(|f| *f != AddressFamily::Unspec);
    let folded = request_fold(conn, what, msg, NLM_F_DUMP, None, &init, |acc, m| {
        if family.is_none() || family_of(&m) == family {
            fold(acc, m);
        }
    })
    .await?;
    // Only a request with an `absent_errno` can come back absent.
    Ok(folded.unwrap_or_else(init))
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

    // Each reply is parsed into the model's small types as it arrives and dropped at once,
    // straight into the list it belongs to. Main-table unicast routes of other devices: direct
    // routes to peers, and the connected subnets that say whether such a next hop is really
    // on-link there.
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let what = if family == AddressFamily::Inet {
            "ipv4 route"
        } else {
            "ipv6 route"
        };
        let dumped = dump_fold(
            conn,
            what,
            route_dump_request(family),
            DumpedRoutes::default,
            |acc: &mut DumpedRoutes, msg| {
                if let RouteNetlinkMessage::NewRoute(m) = msg {
                    parse::for_each_route(&m, |ifindex, route| acc.keep(&names, ifindex, route));
                }
            },
        )
        .await?;
        dumped.into_state(&mut state, &names);
    }

    for (family, what) in [
        (AddressFamily::Inet, "ipv4 neighbour"),
        (AddressFamily::Inet6, "ipv6 neighbour"),
    ] {
        let neighbours = dump_fold(
            conn,
            what,
            neighbour_dump_request(family),
            Vec::new,
            |acc: &mut Vec<(u32, Neighbour)>, msg| {
                if let RouteNetlinkMessage::NewNeighbour(m) = msg {
                    acc.extend(
                        parse::neighbour_from_message(&m).filter(|(i, _)| names.contains_key(i)),
                    );
                }
            },
        )
        .await?;
        for (ifindex, n) in neighbours {
            if let Some(dev) = lookup(&mut state, &names, ifindex) {
                dev.neighbours.push(n);
            }
        }
    }

    let fdb = dump_fold(
        conn,
        "fdb",
        neighbour_dump_request(AddressFamily::Bridge),
        Vec::new,
        |acc: &mut Vec<(u32, FdbEntry)>, msg| {
            if let RouteNetlinkMessage::NewNeighbour(m) = msg {
                acc.extend(parse::fdb_from_message(&m).filter(|(i, _)| names.contains_key(i)));
            }
        },
    )
    .await?;
    for (ifindex, entry) in fdb {
        if let Some(dev) = lookup(&mut state, &names, ifindex) {
            dev.fdb.push(entry);
        }
    }

    state.normalize();
    Ok(state)
}

/// One route dump's routes, sorted into the lists the snapshot keeps (per attempt: an
/// interrupted dump is read again from scratch).
#[derive(Default)]
struct DumpedRoutes {
    /// Per watched ifindex.
    device: BTreeMap<u32, Vec<Route>>,
    /// Reject routes without a device: every watched device is given them.
    deviceless: Vec<Route>,
    /// Main-table unicast routes of other devices.
    direct: Vec<(IpNet, DirectRoute)>,
}

impl DumpedRoutes {
    fn keep(&mut self, names: &BTreeMap<u32, String>, ifindex: u32, route: Route) {
        if names.contains_key(&ifindex) {
            self.device.entry(ifindex).or_default().push(route);
        } else if is_deviceless_reject(ifindex, &route) {
            self.deviceless.push(route);
        } else if route.table == MAIN_TABLE && route.kind == RouteKind::Unicast {
            self.direct.push((
                route.destination,
                DirectRoute {
                    ifindex,
                    gateway: route.gateway,
                },
            ));
        }
    }

    fn into_state(self, state: &mut ObservedState, names: &BTreeMap<u32, String>) {
        for (ifindex, mut routes) in self.device {
            if let Some(dev) = lookup(state, names, ifindex) {
                if dev.routes.is_empty() {
                    dev.routes = routes;
                } else {
                    dev.routes.append(&mut routes);
                }
            }
        }
        for dev in state.devices.values_mut() {
            dev.routes.extend_from_slice(&self.deviceless);
        }
        state.direct_routes.extend(self.direct);
    }
}

fn lookup<'a>(
    state: &'a mut ObservedState,
    names: &BTreeMap<u32, String>,
    ifindex: u32,
) -> Option<&'a mut ObservedDevice> {
    state.devices.get_mut(names.get(&ifindex)?)
}
