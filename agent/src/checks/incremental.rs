//! Evaluation that re-checks only what a change can affect.
//!
//! The findings of a device split into parts that each depend on a few keys of the model: one
//! part per peer (its block routes, its VTEP's neighbour and FDB entries) and one per route
//! destination (a stray route, a blackhole inside a block). [`Evaluator`] keeps every part from
//! the last evaluation; the kernel changes noted since then ([`Evaluator::note`]) name the parts
//! to compute again, and the rest is reused. A change of anything else (the datastore, a link,
//! an address, a resync) rebuilds every part. Both paths assemble the parts in the same order,
//! so an incremental evaluation returns exactly what a full one would (a property test holds it
//! to that, `tests_incremental.rs`).

use std::{borrow::Cow, collections::BTreeMap, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use rustc_hash::FxHashSet as HashSet;

use super::{
    lookup::{main_groups, main_routes_to, BestRoutes},
    peers::{family_peers, peer_findings, LazyPeers, PeerIndex},
    stray::route_findings,
    CheckReport, DeviceSpec, Family, SkippedCheck,
};
use crate::{
    model::{
        CheckId, DesiredState, Finding, MacAddr, ObservedDevice, ObservedState, PeerNode, RouteKind,
    },
    observe::ObservedEvent,
};

/// Kernel changes since the last evaluation, by the key they change.
#[derive(Debug, Default)]
struct Changes {
    /// Anything may have changed: rebuild every part.
    all: bool,
    /// The datastore changed: rebuild the peer indexes too.
    desired: bool,
    /// Route destinations (on an overlay device or not) whose routes changed.
    routes: HashSet<IpNet>,
    neighbours: HashSet<IpAddr>,
    fdb: HashSet<MacAddr>,
}

/// The parts of one device's findings, as of the last evaluation. Each finding is shared
/// with the reports that include it (and, in the daemon, the open list): one copy of each.
#[derive(Debug)]
struct DeviceParts {
    /// Per peer (its index in [`family_peers`] order); only peers with findings.
    peers: BTreeMap<usize, Vec<Arc<Finding>>>,
    /// Per route destination; only destinations with findings.
    routes: BTreeMap<IpNet, Vec<Arc<Finding>>>,
}

/// Called on each finding of a part as it is computed, before it is shared: the daemon
/// stamps when it was first seen there, so that the tracker finds nothing to change (a
/// change would copy a finding the parts share).
pub type Stamp<'a> = &'a dyn Fn(&mut Finding);

/// How much the last evaluation computed again.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recomputed {
    /// Every part was built from scratch.
    pub rebuilt: bool,
    /// Otherwise: peer parts and route parts computed again (over all devices).
    pub peers: usize,
    pub routes: usize,
}

/// Checks with memory: see the module documentation.
#[derive(Debug)]
pub struct Evaluator {
    /// Per device spec, the parts of the last evaluation (`None`: the device is missing, or
    /// the checks ran offline).
    parts: Vec<Option<DeviceParts>>,
    /// Per device spec, who owns which block, VTEP and MAC: kept until the datastore changes.
    indexes: Vec<Option<PeerIndex>>,
    /// The specs the parts were computed for.
    specs: Vec<DeviceSpec>,
    changes: Changes,
    /// Fill [`CheckReport::peers`] (one entry per peer: for `scan`, not for every evaluation
    /// of the daemon, whose consumers take [`super::PeerVerdicts`]).
    peer_list: bool,
    pub(crate) last: Recomputed,
}

impl Default for Evaluator {
    fn default() -> Self {
        Evaluator {
            parts: Vec::new(),
            indexes: Vec::new(),
            specs: Vec::new(),
            last: Recomputed::default(),
            peer_list: true,
            changes: Changes {
                all: true,
                desired: true,
                ..Changes::default()
            },
        }
    }
}

/// Above this share of the peers or routes, one pass over everything is cheaper than looking
/// up what each change concerns.
const REBUILD_FRACTION: usize = 4;

/// Keys noted between two evaluations beyond which they are forgotten for a rebuild.
const MAX_NOTED: usize = 1 << 16;

impl Evaluator {
    /// An evaluator whose reports leave [`CheckReport::peers`] empty.
    pub fn without_peer_list() -> Self {
        Evaluator {
            peer_list: false,
            ..Evaluator::default()
        }
    }

    /// Room the kept parts hold beyond their findings (none, see [`PartInputs::kept`]).
    #[cfg(test)]
    pub(crate) fn spare_room(&self) -> usize {
        self.parts
            .iter()
            .flatten()
            .flat_map(|p| p.peers.values().chain(p.routes.values()))
            .map(|found| found.capacity() - found.len())
            .sum()
    }

    /// Anything in the kernel may have changed (a resync, a link): the next evaluation checks
    /// everything.
    pub fn invalidate(&mut self) {
        self.changes = Changes {
            all: true,
            desired: self.changes.desired,
            ..Changes::default()
        };
    }

    /// The desired state changed: the next evaluation checks everything against it.
    pub fn desired_changed(&mut self) {
        self.invalidate();
        self.changes.desired = true;
    }

    /// `event` changed the model (its `apply` said so).
    pub fn note(&mut self, event: &ObservedEvent) {
        use ObservedEvent as E;
        let changes = &mut self.changes;
        if changes.all {
            return;
        }
        if changes.routes.len() + changes.neighbours.len() + changes.fdb.len() >= MAX_NOTED {
            // Events without evaluations (before the first sync): a rebuild is due anyway.
            return self.invalidate();
        }
        match event {
            E::RouteAdded { route, .. } | E::RouteRemoved { route, .. } => {
                changes.routes.insert(route.destination);
            }
            E::NeighbourChanged { neighbour, .. } | E::NeighbourRemoved { neighbour, .. } => {
                changes.neighbours.insert(neighbour.ip);
            }
            E::FdbChanged { entry, .. } | E::FdbRemoved { entry, .. } => {
                changes.fdb.insert(entry.mac);
            }
            E::LinkChanged { .. }
            | E::LinkRemoved { .. }
            | E::AddressAdded { .. }
            | E::AddressRemoved { .. }
            | E::Overrun => self.invalidate(),
        }
    }

    /// Every check the inputs allow, reusing what the changes since the last call cannot have
    /// changed. The drops, the datastore's health and the device checks are judged afresh.
    pub fn evaluate(&mut self, input: &super::CheckInput<'_>) -> CheckReport {
        self.evaluate_stamped(input, &|_| {})
    }

    /// [`Evaluator::evaluate`], with `stamp` applied to each finding of a part computed again.
    pub fn evaluate_stamped(
        &mut self,
        input: &super::CheckInput<'_>,
        stamp: Stamp<'_>,
    ) -> CheckReport {
        let changes = std::mem::take(&mut self.changes);
        // The lookups binary-search the model, which must be normalized (the daemon's always
        // is: snapshots are normalized, events keep it so).
        debug_assert!(input.observed.is_normalized());
        let observed = input.observed;
        let specs: Cow<[DeviceSpec]> = match input.desired {
            Some(d) if d.cluster.felix != Default::default() => input
                .devices
                .iter()
                .map(|s| s.with_cluster(&d.cluster))
                .collect(),
            _ => Cow::Borrowed(input.devices),
        };
        let rebuild = changes.all || *specs != *self.specs || self.parts.len() != specs.len();
        self.last = Recomputed {
            rebuilt: rebuild,
            ..Recomputed::default()
        };
        if changes.desired || *specs != *self.specs || self.indexes.len() != specs.len() {
            self.indexes = (0..specs.len()).map(|_| None).collect();
        }
        // Kept through a rebuild: a finding computed again the same is the one already
        // shared (with the open list), not a second copy of it.
        let mut previous: Vec<Option<DeviceParts>> = Vec::new();
        if rebuild {
            if *specs == *self.specs {
                previous = std::mem::take(&mut self.parts);
            }
            self.specs = specs.to_vec();
            self.parts = (0..specs.len()).map(|_| None).collect();
        }

        let mut report = CheckReport::default();
        report.findings.extend(
            super::datastore::findings(input.desired, input.datastore, &specs)
                .into_iter()
                .map(Arc::new),
        );
        for (i, ((spec, slot), index)) in specs
            .iter()
            .zip(self.parts.iter_mut())
            .zip(self.indexes.iter_mut())
            .enumerate()
        {
            let previous = previous.get_mut(i).and_then(Option::take);
            // The IPv6 overlay is judged against the IPv6 side of every node.
            let desired = input.desired.map(|d| match spec.family {
                Family::V4 => d,
                Family::V6 => d.ipv6(),
            });
            // A node of an IPIP or no-encap pool has no VXLAN device to miss.
            let local_without_vtep =
                desired.is_some_and(|d| d.non_vxlan.contains_key(&d.local_node));
            let Some(dev) = observed.devices.get(&spec.name) else {
                *slot = None;
                if local_without_vtep {
                    report.skipped.push(SkippedCheck {
                        check: CheckId::DeviceMissing,
                        reason: format!(
                            "this node has no VTEP in the datastore: {} is not expected",
                            spec.name
                        ),
                    });
                    continue;
                }
                report
                    .findings
                    .push(Arc::new(super::device::missing(spec, desired)));
                report.skipped.push(SkippedCheck {
                    check: CheckId::RouteMissing,
                    reason: format!("device {} does not exist", spec.name),
                });
                continue;
            };
            report.routes_checked += dev
                .routes
                .iter()
                .filter(|r| r.table == super::MAIN_TABLE && r.kind == RouteKind::Unicast)
                .count();
            report.findings.extend(
                super::device::misconfigured(spec, dev, desired)
                    .into_iter()
                    .map(Arc::new),
            );
            let Some(desired) = desired else {
                (*slot, *index) = (None, None);
                report
                    .findings
                    .extend(super::offline::check(spec, dev).into_iter().map(Arc::new));
                continue;
            };
            // Listed once when the index is built; `build` reuses the list.
            let peers = index.is_none().then(|| family_peers(desired, spec.family));
            let index = &*index.get_or_insert_with(|| {
                PeerIndex::new(desired, peers.as_deref().unwrap_or_default(), spec.family)
            });
            let inputs = PartInputs {
                spec,
                index,
                dev,
                desired,
                observed,
                stamp,
            };
            let mut kept = slot.take();
            let updated = kept
                .as_mut()
                .and_then(|parts| update(parts, &changes, &inputs));
            let parts = match (updated, kept) {
                (Some((p, r)), Some(parts)) => {
                    self.last.peers += p;
                    self.last.routes += r;
                    parts
                }
                (_, kept) => {
                    self.last.rebuilt = true;
                    build(&inputs, peers, kept.as_ref().or(previous.as_ref()))
                }
            };
            // Sized once: the report becomes the open list, which would otherwise keep up to
            // half its capacity unused for as long as the findings stay open.
            let count = parts
                .peers
                .values()
                .chain(parts.routes.values())
                .map(Vec::len)
                .sum();
            report.findings.reserve_exact(count);
            report
                .findings
                .extend(parts.peers.values().flatten().cloned());
            report
                .findings
                .extend(parts.routes.values().flatten().cloned());
            *slot = Some(parts);
        }
        super::finish(input, &specs, self.peer_list, report)
    }
}

/// What the parts of one device are computed from.
struct PartInputs<'a> {
    spec: &'a DeviceSpec,
    index: &'a PeerIndex,
    dev: &'a ObservedDevice,
    desired: &'a DesiredState,
    observed: &'a ObservedState,
    stamp: Stamp<'a>,
}

impl PartInputs<'_> {
    /// A part as kept until the next evaluation, complete before it is shared (family,
    /// stamp). A finding equal to the one in the same place of the part it replaces is that
    /// one. Most parts hold one finding, and a list grown to room for four would leave most
    /// of it unused.
    fn kept(&self, found: Vec<Finding>, before: Option<&Vec<Arc<Finding>>>) -> Vec<Arc<Finding>> {
        let mut kept: Vec<Arc<Finding>> = found
            .into_iter()
            .enumerate()
            .map(|(i, mut f)| {
                if f.device == self.spec.name {
                    f.family = Some(self.spec.family);
                }
                (self.stamp)(&mut f);
                match before.and_then(|b| b.get(i)) {
                    Some(old) if **old == f => Arc::clone(old),
                    _ => Arc::new(f),
                }
            })
            .collect();
        kept.shrink_to_fit();
        kept
    }
}

/// Every part of one device, from scratch; `before`: the parts it replaces.
fn build<'a>(
    inputs: &PartInputs<'a>,
    peers: Option<Vec<&'a PeerNode>>,
    before: Option<&DeviceParts>,
) -> DeviceParts {
    let PartInputs {
        spec,
        index,
        dev,
        desired,
        observed,
        ..
    } = *inputs;
    let peers = peers.unwrap_or_else(|| family_peers(desired, spec.family));
    let best = BestRoutes::map(dev, spec.family);
    let mut peer_parts = BTreeMap::new();
    for (i, p) in peers.iter().enumerate() {
        let found = peer_findings(spec, dev, p, index, &observed.direct_routes, &best);
        if !found.is_empty() {
            let before = before.and_then(|b| b.peers.get(&i));
            peer_parts.insert(i, inputs.kept(found, before));
        }
    }
    let mut routes = BTreeMap::new();
    let mut peers = LazyPeers::listed(peers, desired, spec.family);
    for group in main_groups(dev) {
        let found = route_findings(spec, desired, group, &mut peers, index);
        if !found.is_empty() {
            let dst = group[0].destination;
            routes.insert(
                dst,
                inputs.kept(found, before.and_then(|b| b.routes.get(&dst))),
            );
        }
    }
    DeviceParts {
        peers: peer_parts,
        routes,
    }
}

/// Recomputes the parts `changes` concern and says how many (peers, routes); `None` when so
/// much changed that [`build`] is the cheaper way.
fn update(
    parts: &mut DeviceParts,
    changes: &Changes,
    inputs: &PartInputs<'_>,
) -> Option<(usize, usize)> {
    let PartInputs {
        spec,
        index,
        dev,
        desired,
        observed,
        ..
    } = *inputs;
    let limit = (index.len() + dev.routes.len()) / REBUILD_FRACTION + 16;
    if changes.routes.len() + changes.neighbours.len() + changes.fdb.len() > limit {
        return None;
    }
    let mut dirty: HashSet<usize> = HashSet::default();
    for dst in &changes.routes {
        index.peers_for_route(dst, &mut dirty);
    }
    for ip in &changes.neighbours {
        dirty.extend(index.peers_with_vtep(ip));
    }
    if !changes.neighbours.is_empty() {
        // A wrong gateway's finding describes that gateway's neighbour entry.
        for (i, found) in &parts.peers {
            if found.iter().any(|f| {
                f.check == CheckId::GatewayWrongVtep
                    && f.gateway.is_some_and(|g| changes.neighbours.contains(&g))
            }) {
                dirty.insert(*i);
            }
        }
    }
    for mac in &changes.fdb {
        dirty.extend(index.peers_with_mac(mac));
    }
    if dirty.len() > limit {
        return None;
    }
    let recomputed = (dirty.len(), changes.routes.len());
    let best = BestRoutes::Search(dev, spec.family);
    for i in dirty {
        let found = index
            .peer(desired, i)
            .map(|peer| peer_findings(spec, dev, peer, index, &observed.direct_routes, &best))
            .unwrap_or_default();
        if found.is_empty() {
            parts.peers.remove(&i);
        } else {
            let found = inputs.kept(found, parts.peers.get(&i));
            parts.peers.insert(i, found);
        }
    }
    let mut peers = LazyPeers::new(desired, spec.family);
    for dst in &changes.routes {
        let found = route_findings(spec, desired, main_routes_to(dev, dst), &mut peers, index);
        if found.is_empty() {
            parts.routes.remove(dst);
        } else {
            let found = inputs.kept(found, parts.routes.get(dst));
            parts.routes.insert(*dst, found);
        }
    }
    Some(recomputed)
}
