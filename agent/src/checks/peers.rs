//! Checks against the datastore, peer by peer: routes to each remote node's blocks, its VTEP's
//! neighbour and FDB entries, and routes that no node accounts for.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;

use super::{
    lookup::{fdb_destinations, neighbour, on_link, BestRoutes},
    DeviceSpec, Family,
};
use crate::model::{
    CheckId, DesiredState, DirectRoute, Finding, MacAddr, ObservedDevice, PeerNode, Remedy, Route,
    Severity,
};

/// What the checks of one device derive from the desired state alone, built once per
/// datastore change: who owns each VTEP, block and MAC, so that a kernel change is mapped to
/// the peers it concerns without looking at the others.
#[derive(Debug)]
pub(super) struct PeerIndex {
    /// Every node's VTEP (the local node's too) → its name.
    pub(super) vtep_owner: HashMap<IpAddr, String>,
    /// Block or borrowed address → the peer (index in [`family_peers`]) it is routed to.
    expected: Owners<IpNet>,
    by_vtep: Owners<IpAddr>,
    by_mac: Owners<MacAddr>,
    /// Sorted: the peers whose node address a (connected) route covers are a range.
    by_node_ip: Vec<(IpAddr, usize)>,
    /// Each peer's name, by index.
    names: Vec<String>,
}

/// The peers the device of `family` carries traffic to, in a stable order.
pub(super) fn family_peers(desired: &DesiredState, family: Family) -> Vec<&PeerNode> {
    desired
        .peers()
        .filter(|p| Family::of(&p.vtep_ip) == family)
        .collect()
}

/// [`family_peers`], listed only when a check needs every peer (a route no block explains).
pub(super) struct LazyPeers<'a> {
    desired: &'a DesiredState,
    family: Family,
    peers: Option<Vec<&'a PeerNode>>,
}

impl<'a> LazyPeers<'a> {
    pub(super) fn new(desired: &'a DesiredState, family: Family) -> Self {
        LazyPeers {
            desired,
            family,
            peers: None,
        }
    }

    pub(super) fn listed(
        peers: Vec<&'a PeerNode>,
        desired: &'a DesiredState,
        family: Family,
    ) -> Self {
        LazyPeers {
            desired,
            family,
            peers: Some(peers),
        }
    }

    pub(super) fn get(&mut self) -> &[&'a PeerNode] {
        let (desired, family) = (self.desired, self.family);
        self.peers
            .get_or_insert_with(|| family_peers(desired, family))
    }
}

impl PeerIndex {
    pub(super) fn new(desired: &DesiredState, peers: &[&PeerNode], family: Family) -> Self {
        let mut vtep_owner: HashMap<IpAddr, String> =
            HashMap::with_capacity_and_hasher(desired.nodes.len(), Default::default());
        for n in desired.nodes.values() {
            vtep_owner.insert(n.vtep_ip, n.name.clone());
        }
        let blocks = peers
            .iter()
            .map(|p| p.blocks.len() + p.borrowed.len())
            .sum();
        let mut index = PeerIndex {
            vtep_owner,
            expected: Owners::with_capacity(blocks),
            by_vtep: Owners::with_capacity(peers.len()),
            by_mac: Owners::with_capacity(peers.len()),
            by_node_ip: Vec::with_capacity(peers.len()),
            names: peers.iter().map(|p| p.name.clone()).collect(),
        };
        for (i, peer) in peers.iter().enumerate() {
            for dst in peer.blocks.iter().chain(&peer.borrowed) {
                if Family::of(&dst.addr()) != family {
                    continue;
                }
                index.expected.add(*dst, i);
            }
            index.by_vtep.add(peer.vtep_ip, i);
            index.by_mac.add(peer.vtep_mac, i);
            index.by_node_ip.push((peer.node_ip, i));
        }
        index.by_node_ip.sort_unstable();
        index
    }

    /// How many peers.
    pub(super) fn len(&self) -> usize {
        self.names.len()
    }

    /// Peer `i` of the desired state the index was built from.
    pub(super) fn peer<'a>(&self, desired: &'a DesiredState, i: usize) -> Option<&'a PeerNode> {
        self.names.get(i).and_then(|name| desired.nodes.get(name))
    }

    /// A route to `dst` is one of the datastore's blocks or borrowed addresses.
    pub(super) fn is_expected(&self, dst: &IpNet) -> bool {
        self.expected.first.contains_key(dst)
    }

    /// The peers whose findings a change of the routes to `dst` (overlay or direct) can
    /// change: the owner of that block, and the peers whose node address it covers (a
    /// connected route decides whether a direct route to them is on-link).
    pub(super) fn peers_for_route(&self, dst: &IpNet, out: &mut impl Extend<usize>) {
        out.extend(self.expected.of(dst));
        let start = self
            .by_node_ip
            .partition_point(|(ip, _)| *ip < dst.network());
        out.extend(
            self.by_node_ip[start..]
                .iter()
                .take_while(|(ip, _)| dst.contains(ip))
                .map(|(_, i)| *i),
        );
    }

    /// The peers whose VTEP is `ip`.
    pub(super) fn peers_with_vtep(&self, ip: &IpAddr) -> impl Iterator<Item = usize> + '_ {
        self.by_vtep.of(ip)
    }

    /// The peers whose VTEP MAC is `mac`.
    pub(super) fn peers_with_mac(&self, mac: &MacAddr) -> impl Iterator<Item = usize> + '_ {
        self.by_mac.of(mac)
    }
}

/// Which peers own a key (a block, a VTEP, a MAC): one each, but a broken datastore can give
/// two peers the same one. No allocation per key for the usual single owner.
#[derive(Debug)]
struct Owners<K> {
    first: HashMap<K, usize>,
    /// Keys with more than one owner: all of them.
    more: HashMap<K, Vec<usize>>,
}

impl<K: std::hash::Hash + Eq + Copy> Owners<K> {
    fn with_capacity(n: usize) -> Self {
        Owners {
            first: HashMap::with_capacity_and_hasher(n, Default::default()),
            more: HashMap::default(),
        }
    }

    fn add(&mut self, key: K, owner: usize) {
        if let Some(first) = self.first.insert(key, owner) {
            self.first.insert(key, first);
            self.more
                .entry(key)
                .or_insert_with(|| vec![first])
                .push(owner);
        }
    }

    fn of(&self, key: &K) -> impl Iterator<Item = usize> + '_ {
        let more = self.more.get(key);
        let first = self.first.get(key).copied().filter(|_| more.is_none());
        first.into_iter().chain(more.into_iter().flatten().copied())
    }
}

/// Every finding about one peer on one device: its block routes and, when anything to it goes
/// over the overlay, its VTEP's neighbour and FDB entries.
pub(super) fn peer_findings(
    spec: &DeviceSpec,
    dev: &ObservedDevice,
    peer: &PeerNode,
    index: &PeerIndex,
    direct: &BTreeMap<IpNet, DirectRoute>,
    routes: &BestRoutes<'_>,
) -> Vec<Finding> {
    let (mut findings, over_overlay) =
        peer_routes(spec, dev, peer, &index.vtep_owner, direct, routes);
    // A peer reached only directly (flannel DirectRouting, Calico CrossSubnet) needs no
    // VTEP neighbour or FDB entry: no frame to it is encapsulated.
    if over_overlay {
        findings.extend(peer_vtep(spec, dev, peer));
    }
    findings
}

/// The routes to one peer's blocks, and whether any of them goes over the overlay.
fn peer_routes(
    spec: &DeviceSpec,
    dev: &ObservedDevice,
    peer: &PeerNode,
    vtep_owner: &HashMap<IpAddr, String>,
    direct: &BTreeMap<IpNet, DirectRoute>,
    routes: &BestRoutes<'_>,
) -> (Vec<Finding>, bool) {
    let device = spec.name.as_str();
    let mut missing: Vec<IpNet> = Vec::new();
    let mut wrong: BTreeMap<Option<IpAddr>, Vec<&Route>> = BTreeMap::new();
    let mut not_direct: Vec<(IpNet, DirectRoute)> = Vec::new();
    let mut over_overlay = false;
    for dst in peer
        .blocks
        .iter()
        .chain(&peer.borrowed)
        .filter(|d| Family::of(&d.addr()) == spec.family)
    {
        match routes.get(dst) {
            // CrossSubnet / DirectRouting: a same-subnet peer's block goes straight to its
            // node IP on the device that subnet is on, not over the overlay.
            None => match direct.get(dst) {
                Some(d) if d.gateway == Some(peer.node_ip) => {
                    if !on_link(direct, d.ifindex, &peer.node_ip) {
                        not_direct.push((*dst, *d));
                    }
                }
                _ => {
                    over_overlay = true;
                    missing.push(*dst);
                }
            },
            Some(r) => {
                over_overlay = true;
                let vtep_host = r.gateway.is_none()
                    && dst.addr() == peer.vtep_ip
                    && dst.prefix_len() == dst.max_prefix_len();
                if r.gateway != Some(peer.vtep_ip) && !vtep_host {
                    wrong.entry(r.gateway).or_default().push(r);
                }
            }
        }
    }

    let mut out = Vec::new();
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|d| d.to_string()).collect();
        let mut f = Finding::new(
            CheckId::RouteMissing,
            Severity::Critical,
            device,
            format!(
                "{} to {}'s block{} {} missing: pods there are unreachable over the overlay",
                plural(missing.len(), "route", "routes"),
                peer.name,
                if missing.len() == 1 { "" } else { "s" },
                if missing.len() == 1 { "is" } else { "are" },
            ),
        );
        f.route = Some(list[0].clone());
        f.expected_gateway = Some(peer.vtep_ip);
        f.peer_node = Some(peer.name.clone());
        f.evidence.routes = list;
        f.set_remedies(
            missing
                .iter()
                .map(|dst| Remedy::RouteAdd {
                    device: device.to_string(),
                    destination: *dst,
                    gateway: peer.vtep_ip,
                })
                .collect(),
        );
        out.push(f);
    }

    for (gateway, bad) in wrong {
        let dsts: Vec<IpNet> = bad.iter().map(|r| r.destination).collect();
        let mut f = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Critical,
            device,
            String::new(),
        );
        let what = match gateway {
            None => "no gateway (the kernel would ARP for every pod address)".to_string(),
            Some(gw) => {
                let mut facts = Vec::new();
                match vtep_owner.get(&gw) {
                    Some(owner) => facts.push(format!("{owner}'s VTEP")),
                    None => facts.push("nobody's VTEP".to_string()),
                }
                if dsts.iter().any(|d| d.network() == gw) {
                    facts.push("the block's network address".to_string());
                    f.evidence
                        .details
                        .insert("gateway_is_network_address".into(), "true".into());
                }
                match neighbour(dev, &gw) {
                    None => facts.push("no neighbour entry".to_string()),
                    Some(n) => {
                        facts.push(format!("neighbour {}", n.state.name()));
                        f.evidence.neighbour_mac = n.mac;
                    }
                }
                f.evidence.neighbour_state = Some(
                    neighbour(dev, &gw)
                        .map(|n| n.state.name())
                        .unwrap_or_else(|| "missing".to_string()),
                );
                if let Some(owner) = vtep_owner.get(&gw) {
                    f.evidence
                        .details
                        .insert("gateway_is_vtep_of".into(), owner.to_string());
                }
                format!("{gw}, which is {}", facts.join(", "))
            }
        };
        f.message = format!(
            "{} to {}'s blocks {} via {what}; {}'s VTEP is {}",
            plural(dsts.len(), "route", "routes"),
            peer.name,
            if dsts.len() == 1 { "goes" } else { "go" },
            peer.name,
            peer.vtep_ip
        );
        f.route = Some(dsts[0].to_string());
        f.gateway = gateway;
        f.expected_gateway = Some(peer.vtep_ip);
        f.peer_node = Some(peer.name.clone());
        f.evidence.routes = bad.iter().map(|r| r.display(device)).collect();
        f.set_remedies(
            bad.iter()
                .map(|r| route_replace(device, r, peer.vtep_ip))
                .collect(),
        );
        out.push(f);
    }

    if !not_direct.is_empty() {
        let dsts: Vec<String> = not_direct.iter().map(|(d, _)| d.to_string()).collect();
        let mut f = Finding::new(
            CheckId::RouteWrongDevice,
            Severity::Critical,
            device,
            format!(
                "{} to {}'s blocks {} via its node address {} on ifindex {}, where {} is not on \
                 a connected subnet (a tunnel such as tunl0 left from an IPIP pool, or an \
                 off-subnet next hop): expected via its VTEP {} on {device}",
                plural(dsts.len(), "route", "routes"),
                peer.name,
                if dsts.len() == 1 { "goes" } else { "go" },
                peer.node_ip,
                not_direct[0].1.ifindex,
                peer.node_ip,
                peer.vtep_ip,
            ),
        );
        f.route = Some(dsts[0].clone());
        f.gateway = Some(peer.node_ip);
        f.expected_gateway = Some(peer.vtep_ip);
        f.peer_node = Some(peer.name.clone());
        f.evidence.routes = dsts;
        f.evidence
            .details
            .insert("ifindex".into(), not_direct[0].1.ifindex.to_string());
        f.set_remedies(
            not_direct
                .iter()
                .map(|(dst, _)| Remedy::RouteReplace {
                    device: device.to_string(),
                    destination: *dst,
                    gateway: peer.vtep_ip,
                    protocol: crate::model::PROTO_BOOT,
                    metric: None,
                })
                .collect(),
        );
        out.push(f);
    }
    (out, over_overlay)
}

/// The peer's VTEP must resolve to its MAC (neighbour) and the MAC to its node IP (FDB).
fn peer_vtep(spec: &DeviceSpec, dev: &ObservedDevice, peer: &PeerNode) -> Vec<Finding> {
    let device = spec.name.as_str();
    let mut out = Vec::new();
    let base = |check, message: String| {
        let mut f = Finding::new(check, Severity::Critical, device, message);
        f.peer_node = Some(peer.name.clone());
        f.gateway = Some(peer.vtep_ip);
        f
    };
    let neigh = neighbour(dev, &peer.vtep_ip);
    // Frames to this peer are sent to its expected MAC once the neighbour is right.
    let effective_mac = peer.vtep_mac;
    match neigh {
        Some(n) if n.state.is_resolved() => {
            // A derived MAC is Felix's own rule, so a different one is as wrong as a
            // different annotated one, even when the FDB agrees with it (both stale).
            if let Some(mac) = n.mac.filter(|m| *m != peer.vtep_mac) {
                let mut f = base(
                    CheckId::NeighbourMacMismatch,
                    format!(
                        "neighbour {} (VTEP of {}) resolves to {mac}, expected {}",
                        peer.vtep_ip, peer.name, peer.vtep_mac
                    ),
                );
                f.evidence.neighbour_state = Some(n.state.name());
                f.evidence.neighbour_mac = Some(mac);
                f.evidence.expected_mac = Some(peer.vtep_mac);
                f.set_remedies(vec![neigh_replace(device, peer)]);
                out.push(f);
            }
        }
        other => {
            let state = other
                .map(|n| n.state.name())
                .unwrap_or_else(|| "missing".to_string());
            let mut f = base(
                CheckId::NeighbourUnresolved,
                format!(
                    "no usable neighbour entry for {} (VTEP of {}): state {state}; with \
                     learning off nothing will resolve it, traffic to {} is dropped",
                    peer.vtep_ip, peer.name, peer.name
                ),
            );
            f.evidence.neighbour_state = Some(state);
            f.evidence.expected_mac = Some(peer.vtep_mac);
            f.set_remedies(vec![neigh_replace(device, peer)]);
            out.push(f);
        }
    }

    if dev.link.external {
        // Flow-based device (Calico eBPF): the remote comes from the program, no FDB is used.
        return out;
    }
    let dests = fdb_destinations(dev, &effective_mac);
    let mac_mismatch = out
        .iter_mut()
        .find(|f| f.check == CheckId::NeighbourMacMismatch);
    if let (true, Some(f)) = (dests.is_empty(), mac_mismatch) {
        // Neighbour and FDB both still describe an old MAC: one stale-MAC problem, whose fix
        // needs both entries.
        f.evidence
            .details
            .insert("fdb_for_expected_mac".into(), "missing".into());
        f.evidence.expected_fdb_destination = Some(peer.node_ip);
        f.set_remedies(vec![
            fdb_replace(device, effective_mac, peer),
            neigh_replace(device, peer),
        ]);
    } else if dests.is_empty() {
        let mut f = base(
            CheckId::FdbMissing,
            format!(
                "no FDB entry for {effective_mac} (VTEP MAC of {}): encapsulated frames have \
                 no destination and are dropped",
                peer.name
            ),
        );
        f.evidence.expected_mac = Some(effective_mac);
        f.evidence.expected_fdb_destination = Some(peer.node_ip);
        f.set_remedies(vec![fdb_replace(device, effective_mac, peer)]);
        out.push(f);
    } else if !dests.contains(&Some(peer.node_ip)) {
        let have = dests.iter().flatten().next().copied();
        let mut f = base(
            CheckId::FdbWrongDestination,
            format!(
                "FDB sends {effective_mac} (VTEP MAC of {}) to {}, but {} is at {}",
                peer.name,
                have.map(|h| h.to_string())
                    .unwrap_or_else(|| "no address".into()),
                peer.name,
                peer.node_ip
            ),
        );
        f.evidence.fdb_destination = have;
        f.evidence.expected_fdb_destination = Some(peer.node_ip);
        f.evidence.expected_mac = Some(effective_mac);
        f.set_remedies(vec![fdb_replace(device, effective_mac, peer)]);
        out.push(f);
    }
    out
}

pub(super) fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Points `route` at `gateway`, keeping its protocol and metric so the write replaces it.
pub(super) fn route_replace(device: &str, route: &Route, gateway: IpAddr) -> Remedy {
    Remedy::RouteReplace {
        device: device.to_string(),
        destination: route.destination,
        gateway,
        protocol: route.protocol,
        metric: route.metric,
    }
}

fn neigh_replace(device: &str, peer: &PeerNode) -> Remedy {
    Remedy::NeighReplace {
        device: device.to_string(),
        ip: peer.vtep_ip,
        mac: peer.vtep_mac,
    }
}

fn fdb_replace(device: &str, mac: MacAddr, peer: &PeerNode) -> Remedy {
    Remedy::FdbReplace {
        device: device.to_string(),
        mac,
        destination: peer.node_ip,
    }
}

#[cfg(test)]
mod tests {
    use super::Owners;

    #[test]
    fn a_key_two_peers_claim_names_both_and_a_single_owner_allocates_nothing() {
        let mut o: Owners<u32> = Owners::with_capacity(4);
        o.add(1, 10);
        o.add(2, 20);
        o.add(2, 21);
        o.add(2, 22);
        assert_eq!(o.of(&1).collect::<Vec<_>>(), [10]);
        assert_eq!(o.of(&2).collect::<Vec<_>>(), [20, 21, 22]);
        assert_eq!(o.of(&3).count(), 0);
        assert_eq!(o.more.len(), 1, "only the shared key has a list");
    }
}
