//! Pure conversions from netlink-packet-route messages to the model types. No I/O, never panics:
//! anything unexpected is skipped with a debug log.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
    route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteNextHopFlags, RouteType,
        RouteVia,
    },
    AddressFamily,
};
use tracing::debug;

use crate::model::{FdbEntry, LinkInfo, MacAddr, NeighState, Neighbour, Route, RouteKind};

/// `ifindex` used for routes without an output device (blackhole, unreachable, prohibit).
pub const NO_DEVICE: u32 = 0;

/// A reject route has no output device but still decides the fate of traffic that would
/// otherwise leave through an overlay device, so it is reported on every watched device.
pub fn is_deviceless_reject(ifindex: u32, route: &Route) -> bool {
    ifindex == NO_DEVICE
        && matches!(
            route.kind,
            RouteKind::Blackhole | RouteKind::Unreachable | RouteKind::Prohibit
        )
}

pub(crate) fn mac_from_bytes(bytes: &[u8]) -> Option<MacAddr> {
    <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(b) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    } else if let Ok(b) = <[u8; 16]>::try_from(bytes) {
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    } else {
        None
    }
}

/// Link attributes of a `RTM_NEWLINK` message. `addresses` stays empty: they come from
/// address messages. `None` when the message has no name (nothing to key it by).
pub fn link_from_message(msg: &LinkMessage) -> Option<LinkInfo> {
    let mut link = LinkInfo {
        ifindex: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..LinkInfo::default()
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(bytes) => link.mac = mac_from_bytes(bytes),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        NlLinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        NlLinkInfo::Data(InfoData::Vxlan(vxlan)) => apply_vxlan(&mut link, vxlan),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if link.name.is_empty() {
        debug!(
            ifindex = link.ifindex,
            "link message without IFLA_IFNAME, skipped"
        );
        return None;
    }
    Some(link)
}

fn apply_vxlan(link: &mut LinkInfo, attrs: &[InfoVxlan]) {
    for attr in attrs {
        match attr {
            InfoVxlan::Id(vni) => link.vni = Some(*vni),
            InfoVxlan::Port(port) => link.port = Some(*port),
            InfoVxlan::Learning(on) => link.learning = Some(*on),
            InfoVxlan::Local(ip) => link.local = Some(IpAddr::V4(*ip)),
            InfoVxlan::Local6(ip) => link.local = Some(IpAddr::V6(*ip)),
            InfoVxlan::CollectMetadata(on) => link.external = *on,
            _ => {}
        }
    }
}

/// The device index and the address of an `RTM_NEWADDR`/`RTM_DELADDR` message.
pub fn address_from_message(msg: &AddressMessage) -> Option<(u32, IpNet)> {
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on point-to-point
    // links and the only one IPv6 sends.
    let ip = local.or(address)?;
    match IpNet::new(ip, msg.header.prefix_len) {
        Ok(net) => Some((msg.header.index, net)),
        Err(_) => {
            debug!(%ip, prefix = msg.header.prefix_len, "address with invalid prefix, skipped");
            None
        }
    }
}

fn route_kind(kind: RouteType) -> RouteKind {
    match kind {
        RouteType::Unicast => RouteKind::Unicast,
        RouteType::BlackHole => RouteKind::Blackhole,
        RouteType::Unreachable => RouteKind::Unreachable,
        RouteType::Prohibit => RouteKind::Prohibit,
        RouteType::Local => RouteKind::Local,
        _ => RouteKind::Other,
    }
}

fn route_address(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn route_via(via: &RouteVia) -> Option<IpAddr> {
    match via {
        RouteVia::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteVia::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}

fn gateway_of(attrs: &[RouteAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|attr| match attr {
        RouteAttribute::Gateway(gw) => route_address(gw),
        RouteAttribute::Via(via) => route_via(via),
        _ => None,
    })
}

/// Every (output ifindex, route) of a route message: one pair for a plain route, one per next
/// hop for a multipath route, ifindex [`NO_DEVICE`] for routes without an output device.
/// Cached/cloned routes and non-IP families yield nothing.
pub fn routes_from_message(msg: &RouteMessage) -> Vec<(u32, Route)> {
    let mut routes = Vec::new();
    for_each_route(msg, |ifindex, route| routes.push((ifindex, route)));
    routes
}

/// [`routes_from_message`] without the `Vec`: a dump of 100,000 routes would otherwise
/// allocate and free one per message.
pub fn for_each_route(msg: &RouteMessage, mut each: impl FnMut(u32, Route)) {
    let header = &msg.header;
    let unspecified = match header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return,
    };
    if header.flags.contains(RouteFlags::Cloned) {
        return;
    }
    let mut dst = None;
    let mut oif = None;
    let mut table = None;
    let mut metric = None;
    let mut multipath = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(addr) => dst = route_address(addr),
            RouteAttribute::Oif(idx) => oif = Some(*idx),
            RouteAttribute::Table(t) => table = Some(*t),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    let ip = dst.unwrap_or(unspecified);
    let destination = match IpNet::new(ip, header.destination_prefix_length) {
        Ok(net) => net,
        Err(_) => {
            debug!(%ip, prefix = header.destination_prefix_length, "route with invalid prefix, skipped");
            return;
        }
    };
    let base = Route {
        destination,
        gateway: None,
        onlink: header.flags.contains(RouteFlags::Onlink),
        protocol: u8::from(header.protocol),
        // RTA_TABLE carries tables above 255; rtm_table then says 252 (RT_TABLE_COMPAT).
        table: table.unwrap_or(u32::from(header.table)),
        kind: route_kind(header.kind),
        metric,
    };
    match multipath {
        Some(hops) if !hops.is_empty() => {
            for hop in hops {
                let route = Route {
                    gateway: gateway_of(&hop.attributes),
                    onlink: hop.flags.contains(RouteNextHopFlags::Onlink),
                    ..base.clone()
                };
                each(hop.interface_index, route);
            }
        }
        _ => {
            let route = Route {
                gateway: gateway_of(&msg.attributes),
                ..base
            };
            // Reject routes carry no real device (IPv6 ones name `lo` as a placeholder).
            let ifindex = if matches!(
                route.kind,
                RouteKind::Blackhole | RouteKind::Unreachable | RouteKind::Prohibit
            ) {
                NO_DEVICE
            } else {
                oif.unwrap_or(NO_DEVICE)
            };
            each(ifindex, route);
        }
    }
}

/// An ARP/NDP entry: (ifindex, neighbour). `None` for other families and proxy entries.
pub fn neighbour_from_message(msg: &NeighbourMessage) -> Option<(u32, Neighbour)> {
    let header = &msg.header;
    if !matches!(header.family, AddressFamily::Inet | AddressFamily::Inet6) {
        return None;
    }
    if header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLocalAddress(bytes) => mac = mac_from_bytes(bytes),
            _ => {}
        }
    }
    let Some(ip) = ip else {
        debug!(
            ifindex = header.ifindex,
            "neighbour without NDA_DST, skipped"
        );
        return None;
    };
    let state = NeighState(u16::from(header.state));
    Some((header.ifindex, Neighbour { ip, mac, state }))
}

/// A bridge forwarding entry (`AF_BRIDGE` neighbour): (ifindex, entry). `None` for other
/// families and entries without a MAC.
pub fn fdb_from_message(msg: &NeighbourMessage) -> Option<(u32, FdbEntry)> {
    let header = &msg.header;
    if header.family != AddressFamily::Bridge {
        return None;
    }
    let mut mac = None;
    let mut destination = None;
    for attr in &msg.attributes {
        match attr {
            NeighbourAttribute::LinkLocalAddress(bytes) => mac = mac_from_bytes(bytes),
            NeighbourAttribute::Destination(addr) => {
                destination = match addr {
                    NeighbourAddress::Inet(a) => Some(IpAddr::V4(*a)),
                    NeighbourAddress::Inet6(a) => Some(IpAddr::V6(*a)),
                    // AF_BRIDGE messages carry the remote as raw bytes (4 or 16).
                    NeighbourAddress::Other(bytes) => ip_from_bytes(bytes),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    let Some(mac) = mac else {
        debug!(
            ifindex = header.ifindex,
            "fdb entry without NDA_LLADDR, skipped"
        );
        return None;
    };
    let permanent = u16::from(header.state) & NeighState::PERMANENT != 0;
    Some((
        header.ifindex,
        FdbEntry {
            mac,
            destination,
            permanent,
        },
    ))
}
