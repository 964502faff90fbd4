//! Typed kernel change events and their incremental application to an [`ObservedState`], so
//! the daemon keeps an exact model between full resyncs.

use std::cmp::Ordering;

use ipnet::IpNet;
use netlink_packet_core::NLM_F_REPLACE;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::debug;

use super::parse::{self, is_deviceless_reject};
use crate::model::{
    FdbEntry, LinkInfo, MacAddr, Neighbour, ObservedDevice, ObservedState, Route, RouteKind,
};

/// One change reported by the kernel. Route, neighbour and FDB events name the device only by
/// ifindex (that is all netlink says); [`ObservedState::apply`] maps it to a watched device.
#[derive(Debug, Clone, PartialEq)]
pub enum ObservedEvent {
    /// A link appeared or changed. `link.addresses` is always empty here.
    LinkChanged {
        link: LinkInfo,
    },
    LinkRemoved {
        ifindex: u32,
        name: String,
    },
    AddressAdded {
        ifindex: u32,
        address: IpNet,
    },
    AddressRemoved {
        ifindex: u32,
        address: IpNet,
    },
    /// `ifindex` is 0 for routes without an output device (blackhole, …). `replace`: the route
    /// replaced whatever had the same table/destination/metric (NLM_F_REPLACE), wherever it
    /// pointed before.
    RouteAdded {
        ifindex: u32,
        route: Route,
        replace: bool,
    },
    RouteRemoved {
        ifindex: u32,
        route: Route,
    },
    NeighbourChanged {
        ifindex: u32,
        neighbour: Neighbour,
    },
    NeighbourRemoved {
        ifindex: u32,
        neighbour: Neighbour,
    },
    FdbChanged {
        ifindex: u32,
        entry: FdbEntry,
    },
    FdbRemoved {
        ifindex: u32,
        entry: FdbEntry,
    },
    /// The kernel dropped notifications (ENOBUFS) or one could not be read: the model is no
    /// longer exact and a full resync is required.
    Overrun,
}

impl ObservedEvent {
    /// The device index the event is about, if any (0 means no device).
    pub fn ifindex(&self) -> Option<u32> {
        match self {
            ObservedEvent::LinkChanged { link } => Some(link.ifindex),
            ObservedEvent::LinkRemoved { ifindex, .. }
            | ObservedEvent::AddressAdded { ifindex, .. }
            | ObservedEvent::AddressRemoved { ifindex, .. }
            | ObservedEvent::RouteAdded { ifindex, .. }
            | ObservedEvent::RouteRemoved { ifindex, .. }
            | ObservedEvent::NeighbourChanged { ifindex, .. }
            | ObservedEvent::NeighbourRemoved { ifindex, .. }
            | ObservedEvent::FdbChanged { ifindex, .. }
            | ObservedEvent::FdbRemoved { ifindex, .. } => Some(*ifindex),
            ObservedEvent::Overrun => None,
        }
    }
}

/// The events carried by one rtnetlink notification (`nlmsg_flags` for NLM_F_REPLACE).
pub fn events_from_message(msg: &RouteNetlinkMessage, nlmsg_flags: u16) -> Vec<ObservedEvent> {
    use ObservedEvent as E;
    use RouteNetlinkMessage as M;
    match msg {
        // AF_BRIDGE link messages describe bridge-port state, not the device itself; a
        // DELLINK of that family only means "no longer a bridge port".
        M::NewLink(link) if link.header.interface_family == AddressFamily::Unspec => {
            parse::link_from_message(link)
                .map(|link| E::LinkChanged { link })
                .into_iter()
                .collect()
        }
        M::DelLink(link) if link.header.interface_family == AddressFamily::Unspec => {
            let name = parse::link_from_message(link)
                .map(|l| l.name)
                .unwrap_or_default();
            vec![E::LinkRemoved {
                ifindex: link.header.index,
                name,
            }]
        }
        M::NewAddress(addr) => parse::address_from_message(addr)
            .map(|(ifindex, address)| E::AddressAdded { ifindex, address })
            .into_iter()
            .collect(),
        M::DelAddress(addr) => parse::address_from_message(addr)
            .map(|(ifindex, address)| E::AddressRemoved { ifindex, address })
            .into_iter()
            .collect(),
        M::NewRoute(route) => {
            let replace = nlmsg_flags & NLM_F_REPLACE != 0;
            parse::routes_from_message(route)
                .into_iter()
                .map(|(ifindex, route)| E::RouteAdded {
                    ifindex,
                    route,
                    replace,
                })
                .collect()
        }
        M::DelRoute(route) => parse::routes_from_message(route)
            .into_iter()
            .map(|(ifindex, route)| E::RouteRemoved { ifindex, route })
            .collect(),
        M::NewNeighbour(n) if n.header.family == AddressFamily::Bridge => {
            parse::fdb_from_message(n)
                .map(|(ifindex, entry)| E::FdbChanged { ifindex, entry })
                .into_iter()
                .collect()
        }
        M::DelNeighbour(n) if n.header.family == AddressFamily::Bridge => {
            parse::fdb_from_message(n)
                .map(|(ifindex, entry)| E::FdbRemoved { ifindex, entry })
                .into_iter()
                .collect()
        }
        M::NewNeighbour(n) => parse::neighbour_from_message(n)
            .map(|(ifindex, neighbour)| E::NeighbourChanged { ifindex, neighbour })
            .into_iter()
            .collect(),
        M::DelNeighbour(n) => parse::neighbour_from_message(n)
            .map(|(ifindex, neighbour)| E::NeighbourRemoved { ifindex, neighbour })
            .into_iter()
            .collect(),
        other => {
            debug!(kind = ?std::mem::discriminant(other), "notification of no interest, skipped");
            Vec::new()
        }
    }
}

/// What applying one event did to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Not about a watched device, or already reflected.
    Unchanged,
    Changed,
    /// The kernel may have changed things it does not announce (device down or recreated,
    /// address removed, notifications lost): take a full snapshot.
    ResyncNeeded,
}

fn route_kind_rank(kind: RouteKind) -> u8 {
    match kind {
        RouteKind::Unicast => 0,
        RouteKind::Blackhole => 1,
        RouteKind::Unreachable => 2,
        RouteKind::Prohibit => 3,
        RouteKind::Local => 4,
        RouteKind::Other => 5,
    }
}

fn route_order(a: &Route, b: &Route) -> Ordering {
    (
        a.table,
        a.destination,
        a.metric,
        a.gateway,
        route_kind_rank(a.kind),
    )
        .cmp(&(
            b.table,
            b.destination,
            b.metric,
            b.gateway,
            route_kind_rank(b.kind),
        ))
}

/// The kernel's identity of a route (table, destination, metric): a replace swaps whatever
/// shares it. A prefix of [`route_order`], so one slot is a contiguous run of a sorted list.
fn slot_order(a: &Route, b: &Route) -> Ordering {
    (a.table, a.destination, a.metric).cmp(&(b.table, b.destination, b.metric))
}

/// The run of a sorted list whose elements compare `Equal` (`cmp` orders an element against
/// the probe). O(log n).
fn equal_range<T>(list: &[T], cmp: impl Fn(&T) -> Ordering) -> std::ops::Range<usize> {
    let start = list.partition_point(|x| cmp(x) == Ordering::Less);
    let end = start + list[start..].partition_point(|x| cmp(x) != Ordering::Greater);
    start..end
}

/// Insert into a sorted list after its equals, unless an identical element is already there.
fn insert_sorted<T: PartialEq>(list: &mut Vec<T>, item: T, cmp: impl Fn(&T) -> Ordering) {
    let range = equal_range(list, cmp);
    if !list[range.clone()].contains(&item) {
        list.insert(range.end, item);
    }
}

/// Drop neighbours of `list[i]` that became identical to it (what `dedup` in
/// [`ObservedState::normalize`] would do), keeping the list sorted and duplicate-free.
fn dedup_around<T: PartialEq>(list: &mut Vec<T>, i: usize) {
    while i + 1 < list.len() && list[i + 1] == list[i] {
        list.remove(i + 1);
    }
    let mut i = i;
    while i > 0 && list[i - 1] == list[i] {
        list.remove(i);
        i -= 1;
    }
}

/// FDB identity: the MAC, except for the all-zeros default entry which may list several
/// remotes (`bridge fdb append`).
fn same_fdb(a: &FdbEntry, b: &FdbEntry) -> bool {
    a.mac == b.mac && (a.mac != MacAddr::default() || a.destination == b.destination)
}

fn set_changed(changed: &mut bool, applied: bool) {
    *changed |= applied;
}

impl ObservedState {
    /// Sort every list so that two states with the same content compare equal.
    pub fn normalize(&mut self) {
        for dev in self.devices.values_mut() {
            dev.link.addresses.sort();
            dev.link.addresses.dedup();
            dev.routes.sort_by(route_order);
            dev.routes.dedup();
            dev.neighbours.sort_by_key(|n| n.ip);
            dev.neighbours.dedup();
            dev.fdb.sort_by_key(|f| (f.mac, f.destination));
            dev.fdb.dedup();
        }
    }

    /// Every list is as [`Self::normalize`] leaves it (sorted, no duplicates): what the
    /// checks' binary-search lookups need. O(n), no allocation.
    pub fn is_normalized(&self) -> bool {
        fn sorted<T: PartialEq>(list: &[T], cmp: impl Fn(&T, &T) -> Ordering) -> bool {
            list.windows(2)
                .all(|w| cmp(&w[0], &w[1]) != Ordering::Greater && w[0] != w[1])
        }
        self.devices.values().all(|dev| {
            sorted(&dev.link.addresses, |a, b| a.cmp(b))
                && sorted(&dev.routes, route_order)
                && sorted(&dev.neighbours, |a, b| a.ip.cmp(&b.ip))
                && sorted(&dev.fdb, |a, b| {
                    (a.mac, a.destination).cmp(&(b.mac, b.destination))
                })
        })
    }

    fn device_by_ifindex(&mut self, ifindex: u32) -> Option<&mut ObservedDevice> {
        self.devices
            .values_mut()
            .find(|d| d.link.ifindex == ifindex)
    }

    /// Apply one event. `watched` are the device names being observed (a watched device that
    /// appears is added). The state must be normalized (snapshots are; see [`Self::normalize`]):
    /// lists are kept sorted by binary-search insertion instead of re-sorting, so one event costs
    /// O(log n) comparisons plus one `Vec` shift, not a sort of every list. Idempotent: replaying events already reflected in a snapshot taken
    /// after they happened converges to the same state.
    pub fn apply(&mut self, event: &ObservedEvent, watched: &[String]) -> Applied {
        use ObservedEvent as E;
        let outcome = match event {
            E::Overrun => return Applied::ResyncNeeded,
            E::LinkChanged { link } => self.apply_link(link, watched),
            E::LinkRemoved { ifindex, .. } => {
                let before = self.devices.len();
                self.devices.retain(|_, d| d.link.ifindex != *ifindex);
                if self.devices.len() == before {
                    Applied::Unchanged
                } else {
                    Applied::Changed
                }
            }
            E::AddressAdded { ifindex, address } => match self.device_by_ifindex(*ifindex) {
                Some(dev) => match dev.link.addresses.binary_search(address) {
                    Ok(_) => Applied::Unchanged,
                    Err(at) => {
                        dev.link.addresses.insert(at, *address);
                        Applied::Changed
                    }
                },
                _ => Applied::Unchanged,
            },
            E::AddressRemoved { ifindex, address } => match self.device_by_ifindex(*ifindex) {
                Some(dev) if dev.link.addresses.contains(address) => {
                    dev.link.addresses.retain(|a| a != address);
                    // The kernel silently flushes routes that used the address as source.
                    Applied::ResyncNeeded
                }
                _ => Applied::Unchanged,
            },
            E::RouteAdded {
                ifindex,
                route,
                replace,
            } => {
                let direct = self.apply_direct_route(*ifindex, route, true, *replace);
                let on_device = self.apply_route_added(*ifindex, route, *replace);
                if direct {
                    on_device.max_with(Applied::Changed)
                } else {
                    on_device
                }
            }
            E::RouteRemoved { ifindex, route } => {
                let mut changed = self.apply_direct_route(*ifindex, route, false, false);
                let deviceless = is_deviceless_reject(*ifindex, route);
                for dev in self.devices.values_mut() {
                    if deviceless || dev.link.ifindex == *ifindex {
                        let range = equal_range(&dev.routes, |r| route_order(r, route));
                        set_changed(&mut changed, !range.is_empty());
                        dev.routes.drain(range);
                    }
                }
                if changed {
                    Applied::Changed
                } else {
                    Applied::Unchanged
                }
            }
            E::NeighbourChanged { ifindex, neighbour } => match self.device_by_ifindex(*ifindex) {
                Some(dev) => {
                    let range = equal_range(&dev.neighbours, |n| n.ip.cmp(&neighbour.ip));
                    match dev
                        .neighbours
                        .get_mut(range.clone())
                        .and_then(|s| s.first_mut())
                    {
                        Some(existing) if existing == neighbour => Applied::Unchanged,
                        Some(existing) => {
                            *existing = neighbour.clone();
                            dedup_around(&mut dev.neighbours, range.start);
                            Applied::Changed
                        }
                        None => {
                            dev.neighbours.insert(range.start, neighbour.clone());
                            Applied::Changed
                        }
                    }
                }
                None => Applied::Unchanged,
            },
            E::NeighbourRemoved { ifindex, neighbour } => remove_range(
                self.device_by_ifindex(*ifindex),
                |d| &mut d.neighbours,
                |n: &Neighbour| n.ip.cmp(&neighbour.ip),
            ),
            E::FdbChanged { ifindex, entry } => match self.device_by_ifindex(*ifindex) {
                Some(dev) => {
                    // Entries of one MAC are contiguous (sorted by MAC, then destination).
                    let macs = equal_range(&dev.fdb, |f| f.mac.cmp(&entry.mac));
                    let found = dev.fdb[macs.clone()]
                        .iter()
                        .position(|f| same_fdb(f, entry))
                        .map(|i| macs.start + i);
                    match found {
                        Some(i) if dev.fdb[i] == *entry => Applied::Unchanged,
                        found => {
                            // The destination may change, which moves the entry.
                            if let Some(i) = found {
                                dev.fdb.remove(i);
                            }
                            insert_sorted(&mut dev.fdb, entry.clone(), |f| {
                                (f.mac, f.destination).cmp(&(entry.mac, entry.destination))
                            });
                            Applied::Changed
                        }
                    }
                }
                None => Applied::Unchanged,
            },
            E::FdbRemoved { ifindex, entry } => {
                // A delete names the remote it removed (one message per remote).
                remove_range(
                    self.device_by_ifindex(*ifindex),
                    |d| &mut d.fdb,
                    |f: &FdbEntry| (f.mac, f.destination).cmp(&(entry.mac, entry.destination)),
                )
            }
        };
        outcome
    }

    fn apply_link(&mut self, link: &LinkInfo, watched: &[String]) -> Applied {
        let is_watched = watched.contains(&link.name);
        // A watched device renamed away: it is no longer the device we were told to watch.
        let renamed: Vec<String> = self
            .devices
            .iter()
            .filter(|(name, d)| d.link.ifindex == link.ifindex && **name != link.name)
            .map(|(name, _)| name.clone())
            .collect();
        let mut outcome = Applied::Unchanged;
        for name in renamed {
            self.devices.remove(&name);
            outcome = Applied::ResyncNeeded;
        }
        if !is_watched {
            return outcome;
        }
        match self.devices.get_mut(&link.name) {
            Some(dev) if dev.link.ifindex == link.ifindex => {
                let went_down = dev.link.up && !link.up;
                let updated = LinkInfo {
                    addresses: std::mem::take(&mut dev.link.addresses),
                    ..link.clone()
                };
                let changed = updated != dev.link;
                dev.link = updated;
                if went_down {
                    // IPv4 routes through a device that goes down are flushed without any
                    // RTM_DELROUTE.
                    Applied::ResyncNeeded
                } else if changed {
                    Applied::Changed.max_with(outcome)
                } else {
                    outcome
                }
            }
            _ => {
                // New or recreated device: what it already carries is unknown.
                self.devices.insert(
                    link.name.clone(),
                    ObservedDevice {
                        link: link.clone(),
                        ..ObservedDevice::default()
                    },
                );
                Applied::ResyncNeeded
            }
        }
    }

    /// Keeps `direct_routes` (main-table unicast routes via unwatched devices, with or without
    /// a gateway) in step.
    fn apply_direct_route(
        &mut self,
        ifindex: u32,
        route: &Route,
        added: bool,
        replace: bool,
    ) -> bool {
        let watched = self.devices.values().any(|d| d.link.ifindex == ifindex);
        let eligible = !watched
            && !is_deviceless_reject(ifindex, route)
            && route.table == crate::checks::MAIN_TABLE
            && route.kind == crate::model::RouteKind::Unicast;
        let entry = crate::model::DirectRoute {
            ifindex,
            gateway: route.gateway,
        };
        if added && eligible {
            self.direct_routes.insert(route.destination, entry) != Some(entry)
        } else if added && replace && route.table == crate::checks::MAIN_TABLE {
            // The destination moved to a watched device (or lost its gateway).
            self.direct_routes.remove(&route.destination).is_some()
        } else if !added && self.direct_routes.get(&route.destination) == Some(&entry) {
            self.direct_routes.remove(&route.destination);
            true
        } else {
            false
        }
    }

    fn apply_route_added(&mut self, ifindex: u32, route: &Route, replace: bool) -> Applied {
        let mut changed = false;
        let deviceless = is_deviceless_reject(ifindex, route);
        if replace {
            // Everything else in the slot is gone, wherever it pointed.
            for dev in self.devices.values_mut() {
                let target = deviceless || dev.link.ifindex == ifindex;
                // A slot (table, destination, metric) is a prefix of the sort order.
                let slot = equal_range(&dev.routes, |r| slot_order(r, route));
                if slot.is_empty() {
                    continue;
                }
                let before = dev.routes.len();
                let mut i = slot.start;
                let mut end = slot.end;
                while i < end {
                    if target && dev.routes[i] == *route {
                        i += 1;
                    } else {
                        dev.routes.remove(i);
                        end -= 1;
                    }
                }
                set_changed(&mut changed, dev.routes.len() != before);
            }
        }
        for dev in self.devices.values_mut() {
            if !(deviceless || dev.link.ifindex == ifindex) {
                continue;
            }
            let range = equal_range(&dev.routes, |r| route_order(r, route));
            match dev
                .routes
                .get_mut(range.clone())
                .and_then(|s| s.first_mut())
            {
                Some(existing) if existing == route => {}
                Some(existing) => {
                    // Same next hop, other attributes (protocol, onlink): the sort key holds.
                    *existing = route.clone();
                    dedup_around(&mut dev.routes, range.start);
                    changed = true;
                }
                None => {
                    dev.routes.insert(range.start, route.clone());
                    changed = true;
                }
            }
        }
        if changed {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }
}

impl Applied {
    /// The stronger of two outcomes.
    fn max_with(self, other: Applied) -> Applied {
        let rank = |a: Applied| match a {
            Applied::Unchanged => 0,
            Applied::Changed => 1,
            Applied::ResyncNeeded => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// Remove the run of a sorted list that compares `Equal`.
fn remove_range<T>(
    dev: Option<&mut ObservedDevice>,
    list: impl FnOnce(&mut ObservedDevice) -> &mut Vec<T>,
    cmp: impl Fn(&T) -> Ordering,
) -> Applied {
    let Some(dev) = dev else {
        return Applied::Unchanged;
    };
    let list = list(dev);
    let range = equal_range(list, cmp);
    if range.is_empty() {
        return Applied::Unchanged;
    }
    list.drain(range);
    Applied::Changed
}
