//! Routes on an overlay device that no peer's block accounts for: stale ones, ones that
//! shadow a peer's block or take a local one, blocks of nodes the overlay cannot reach, and
//! blackholes inside a peer's block.

use std::net::IpAddr;

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;

use super::{
    lookup::best_of,
    peers::{route_replace, LazyPeers, PeerIndex},
    DeviceSpec, Family,
};
use crate::model::{CheckId, DesiredState, Finding, Remedy, Route, RouteKind, Severity};

/// `V/32` (or `/128`) with no gateway to a peer's own VTEP: Calico 3.30+ programs these
/// ("they are the VTEP"), for VTEPs inside blocks and for borrowed tunnel addresses.
pub(super) fn is_vtep_host_route(route: &Route, vtep_owner: &HashMap<IpAddr, String>) -> bool {
    route.gateway.is_none()
        && route.destination.prefix_len() == route.destination.max_prefix_len()
        && vtep_owner.contains_key(&route.destination.addr())
}

/// Every finding about the main table's routes to one destination (`routes`, all to it) that
/// are not a peer's block route: a stray unicast route, and blackholes inside a peer's block.
pub(super) fn route_findings(
    spec: &DeviceSpec,
    desired: &DesiredState,
    routes: &[Route],
    peers: &mut LazyPeers<'_>,
    index: &PeerIndex,
) -> Vec<Finding> {
    let mut out = Vec::new();
    if routes
        .first()
        .is_none_or(|r| Family::of(&r.destination.addr()) != spec.family)
    {
        return out;
    }
    if let Some(route) = best_of(routes, spec.family) {
        out.extend(stray_route(spec, desired, route, peers, index));
    }
    for r in routes {
        out.extend(blackhole_in_peer_block(spec, r, peers));
    }
    out
}

/// A blackhole, unreachable or prohibit route inside a peer's block wins by longest prefix
/// and drops that traffic, whatever the block route says.
fn blackhole_in_peer_block(
    spec: &DeviceSpec,
    r: &Route,
    peers: &mut LazyPeers<'_>,
) -> Option<Finding> {
    let device = spec.name.as_str();
    if !matches!(
        r.kind,
        RouteKind::Blackhole | RouteKind::Unreachable | RouteKind::Prohibit
    ) {
        return None;
    }
    let (peer, block) = peers.get().iter().find_map(|p| {
        p.blocks
            .iter()
            .chain(&p.borrowed)
            .find(|b| b.contains(&r.destination))
            .map(|b| (*p, *b))
    })?;
    let mut f = Finding::new(
        CheckId::RouteStale,
        Severity::Critical,
        device,
        format!(
            "route {} lies inside {}'s block {block} and drops that traffic (it wins by \
             longest prefix)",
            r.display(device),
            peer.name
        ),
    );
    f.route = Some(r.destination.to_string());
    f.peer_node = Some(peer.name.clone());
    f.expected_gateway = Some(peer.vtep_ip);
    f.evidence.routes = vec![r.display(device)];
    let kind = match r.kind {
        RouteKind::Unreachable => "unreachable ",
        RouteKind::Prohibit => "prohibit ",
        _ => "blackhole ",
    };
    f.hint = Some(format!("ip route del {kind}{}", r.destination));
    Some(f)
}

/// The kernel's route to a destination that no peer's block or borrowed address accounts
/// for, if it is a problem.
fn stray_route(
    spec: &DeviceSpec,
    desired: &DesiredState,
    route: &Route,
    peers: &mut LazyPeers<'_>,
    index: &PeerIndex,
) -> Option<Finding> {
    let device = spec.name.as_str();
    let local = desired.nodes.get(&desired.local_node);
    let dst = &route.destination;
    {
        if index.is_expected(dst)
            || desired.unverifiable.iter().any(|u| overlaps(u, dst))
            // Blocks of IPIP/no-encap pools (or of a deleted pool): Felix does not route them
            // over VXLAN; a route to one here is not a peer's to judge.
            || desired.off_overlay.iter().any(|u| overlaps(u, dst))
            || is_vtep_host_route(route, &index.vtep_owner)
        {
            return None;
        }
        let peers = peers.get();
        let overlaps_a_block = || {
            local
                .into_iter()
                .chain(peers.iter().copied())
                .any(|n| n.blocks.iter().chain(&n.borrowed).any(|b| overlaps(b, dst)))
        };
        // Connected routes of the device's own addresses and IPv6 link-local are the
        // kernel's; only one that takes over a node's block is a problem.
        if route.protocol == PROTO_KERNEL && !overlaps_a_block() {
            return None;
        }
        let local_overlap = local.and_then(|l| {
            l.blocks
                .iter()
                .chain(&l.borrowed)
                .find(|b| overlaps(b, dst))
        });
        // A more specific route inside a peer's block wins over the block route (LPM).
        let shadowed = peers.iter().find_map(|p| {
            p.blocks
                .iter()
                .find(|b| b.contains(dst) && b != &dst)
                .map(|b| (*p, *b))
        });
        let non_vxlan = desired.non_vxlan.values().find_map(|n| {
            n.blocks
                .iter()
                .chain(&n.borrowed)
                .find(|b| overlaps(b, dst))
                .map(|b| (n, *b))
        });
        let (severity, why, expected_gateway, peer_node) = if let Some((node, block)) = non_vxlan {
            (
                Severity::Critical,
                format!(
                    "overlaps {}'s block {block}, but {} has no VTEP (an IPIP or no-encap \
                     pool): that traffic cannot be delivered over the overlay",
                    node.name, node.name
                ),
                None,
                Some(node.name.clone()),
            )
        } else if let Some(block) = local_overlap {
            (
                Severity::Critical,
                format!(
                    "overlaps this node's own block {block}: traffic for local pods is sent out \
                     the overlay"
                ),
                None,
                None,
            )
        } else if let Some((peer, block)) = shadowed {
            if route.gateway == Some(peer.vtep_ip) {
                // Points at the block owner anyway (e.g. a borrowed IP the datastore file
                // does not list): traffic is delivered, nothing to report.
                return None;
            }
            (
                Severity::Critical,
                format!(
                    "is more specific than {}'s block {block} and sends that traffic elsewhere",
                    peer.name
                ),
                Some(peer.vtep_ip),
                Some(peer.name.clone()),
            )
        } else {
            (
                Severity::Warning,
                "matches no block or borrowed address of any node in the datastore (released \
                 block, or a node that left)"
                    .to_string(),
                None,
                None,
            )
        };
        let mut f = Finding::new(
            CheckId::RouteStale,
            severity,
            device,
            format!("route {} {why}", route.display(device)),
        );
        f.route = Some(dst.to_string());
        f.gateway = route.gateway;
        f.expected_gateway = expected_gateway;
        f.peer_node = peer_node;
        f.evidence.routes = vec![route.display(device)];
        f.set_remedies(vec![match expected_gateway {
            Some(gw) => route_replace(device, route, gw),
            None => Remedy::RouteDelete {
                device: device.to_string(),
                destination: *dst,
                gateway: route.gateway,
                protocol: route.protocol,
                metric: route.metric,
            },
        }]);
        Some(f)
    }
}

/// `rtm_protocol` of routes the kernel makes itself (connected, link-local).
const PROTO_KERNEL: u8 = 2;

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}
