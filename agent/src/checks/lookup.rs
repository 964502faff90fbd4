//! Lookups on a normalized device ([`ObservedState::normalize`]'s order: routes by table,
//! destination, metric; neighbours by address; FDB entries by MAC): binary searches on the
//! model itself, so a check of one peer or one route costs O(log n) and needs no index built
//! per evaluation.
//!
//! [`ObservedState::normalize`]: crate::model::ObservedState::normalize

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use rustc_hash::FxHashMap as HashMap;

use super::{Family, MAIN_TABLE};
use crate::model::{DirectRoute, MacAddr, Neighbour, ObservedDevice, Route, RouteKind};

/// Every route of the main table to exactly `dst`.
pub(super) fn main_routes_to<'a>(dev: &'a ObservedDevice, dst: &IpNet) -> &'a [Route] {
    let start = dev.routes.partition_point(|r| {
        r.table < MAIN_TABLE || (r.table == MAIN_TABLE && r.destination < *dst)
    });
    let len = dev.routes[start..]
        .iter()
        .take_while(|r| r.table == MAIN_TABLE && r.destination == *dst)
        .count();
    &dev.routes[start..start + len]
}

/// The main table's routes on `dev`, one slice per destination, in order: one pass.
pub(super) fn main_groups(dev: &ObservedDevice) -> impl Iterator<Item = &[Route]> + '_ {
    let start = dev.routes.partition_point(|r| r.table < MAIN_TABLE);
    let end = dev.routes.partition_point(|r| r.table <= MAIN_TABLE);
    dev.routes[start..end].chunk_by(|a, b| a.destination == b.destination)
}

/// The route the kernel uses among the routes to one destination: the unicast one with the
/// lowest metric (they are sorted by metric, no metric first).
pub(super) fn best_of(routes: &[Route], family: Family) -> Option<&Route> {
    routes
        .iter()
        .find(|r| r.kind == RouteKind::Unicast && Family::of(&r.destination.addr()) == family)
}

/// The kernel's route per destination in the main table, for the checks of a device's peers:
/// a binary search for a few peers, a map built in one pass when every peer is checked.
pub(super) enum BestRoutes<'a> {
    Search(&'a ObservedDevice, Family),
    Map(HashMap<IpNet, &'a Route>),
}

impl<'a> BestRoutes<'a> {
    pub(super) fn map(dev: &'a ObservedDevice, family: Family) -> Self {
        let mut map = HashMap::with_capacity_and_hasher(dev.routes.len(), Default::default());
        for group in main_groups(dev) {
            if let Some(r) = best_of(group, family) {
                map.insert(r.destination, r);
            }
        }
        BestRoutes::Map(map)
    }

    pub(super) fn get(&self, dst: &IpNet) -> Option<&'a Route> {
        match self {
            BestRoutes::Search(dev, family) => best_of(main_routes_to(dev, dst), *family),
            BestRoutes::Map(map) => map.get(dst).copied(),
        }
    }
}

/// The neighbour entry for `ip`, if any.
pub(super) fn neighbour<'a>(dev: &'a ObservedDevice, ip: &IpAddr) -> Option<&'a Neighbour> {
    let at = dev.neighbours.partition_point(|n| n.ip < *ip);
    dev.neighbours.get(at).filter(|n| n.ip == *ip)
}

/// FDB destinations for `mac`.
pub(super) fn fdb_destinations(dev: &ObservedDevice, mac: &MacAddr) -> Vec<Option<IpAddr>> {
    let start = dev.fdb.partition_point(|f| f.mac < *mac);
    dev.fdb[start..]
        .iter()
        .take_while(|f| f.mac == *mac)
        .map(|f| f.destination)
        .collect()
}

/// `ip` is directly reachable on device `ifindex`: a connected route (no gateway) of that
/// device contains it, so a route via it there is a real direct route, not a tunnel (`tunl0`)
/// or an off-subnet next hop. One lookup per prefix length.
pub(super) fn on_link(direct: &BTreeMap<IpNet, DirectRoute>, ifindex: u32, ip: &IpAddr) -> bool {
    let max = match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    (0..=max).any(|len| {
        IpNet::new(*ip, len)
            .map(|n| n.trunc())
            .ok()
            .and_then(|n| direct.get(&n))
            .is_some_and(|r| r.gateway.is_none() && r.ifindex == ifindex)
    })
}
