//! The ways Felix (or a hand) leaves a node's overlay wrong, each applied on one node for one
//! peer, each undoable exactly.

use std::net::Ipv4Addr;

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;

use crate::{
    lab::{ensure_peer, Lab, NodeInfo},
    spec::Mac,
};

/// A corruption to inject. `None` fields are chosen by the lab (see each variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The incident: on `on`, every block route of `peer` goes via `gateway`, an address that
    /// is nobody's VTEP, with no neighbour or FDB entry for it. Traffic `on → peer` is
    /// blackholed (neighbour INCOMPLETE → FAILED). Default gateway: the base address of one of
    /// `peer`'s blocks that is not a VTEP, else the last host of its first block.
    GatewayNotAVtep {
        on: String,
        peer: String,
        gateway: Option<Ipv4Addr>,
    },
    /// The VTEP moved and `on` missed it: routes to `peer` go via `old_vtep`, with a
    /// self-consistent permanent neighbour `old_vtep → peer's MAC` (the FDB still points at the
    /// peer) and no neighbour for the current VTEP. Traffic still flows: only the datastore
    /// check can see it. Default old VTEP: the last free host of the peer's first block.
    StaleVtep {
        on: String,
        peer: String,
        old_vtep: Option<Ipv4Addr>,
    },
    /// `on` lost its permanent neighbour entry for `peer`'s VTEP.
    NeighbourRemoved { on: String, peer: String },
    /// `on`'s neighbour entry for `peer`'s VTEP has the wrong MAC (default 66:de:ad:be:ef:<i>),
    /// which has no FDB entry.
    NeighbourWrongMac {
        on: String,
        peer: String,
        mac: Option<Mac>,
    },
    /// `on` lost the FDB entry for `peer`'s VTEP MAC.
    FdbRemoved { on: String, peer: String },
    /// `on`'s FDB entry for `peer`'s VTEP MAC points at the wrong underlay address (default
    /// 192.168.77.250, which nobody has).
    FdbWrongDestination {
        on: String,
        peer: String,
        dst: Option<Ipv4Addr>,
    },
    /// `on` lost the route to one of `peer`'s blocks (default: the first).
    RouteRemoved {
        on: String,
        peer: String,
        block: Option<Ipv4Net>,
    },
    /// `on` has a route for `block`, which nobody owns, via `via` (default: the VTEP of the
    /// first other node). Harmless to traffic; stale state the agent should report.
    StrayRoute {
        on: String,
        block: Ipv4Net,
        via: Option<Ipv4Addr>,
    },
}

impl Fault {
    /// The incident's corruption on one node: k8s03's blocks via 10.1.235.128 (nobody's VTEP;
    /// k8s03's VTEP is 10.1.235.133). For [`crate::LabSpec::incident`].
    pub fn incident(on: &str) -> Fault {
        Fault::GatewayNotAVtep {
            on: on.to_string(),
            peer: "k8s03".to_string(),
            gateway: Some(Ipv4Addr::new(10, 1, 235, 128)),
        }
    }

    pub fn gateway_not_a_vtep(on: &str, peer: &str) -> Fault {
        Fault::GatewayNotAVtep {
            on: on.into(),
            peer: peer.into(),
            gateway: None,
        }
    }

    pub fn stale_vtep(on: &str, peer: &str) -> Fault {
        Fault::StaleVtep {
            on: on.into(),
            peer: peer.into(),
            old_vtep: None,
        }
    }

    pub fn neighbour_removed(on: &str, peer: &str) -> Fault {
        Fault::NeighbourRemoved {
            on: on.into(),
            peer: peer.into(),
        }
    }

    pub fn neighbour_wrong_mac(on: &str, peer: &str) -> Fault {
        Fault::NeighbourWrongMac {
            on: on.into(),
            peer: peer.into(),
            mac: None,
        }
    }

    pub fn fdb_removed(on: &str, peer: &str) -> Fault {
        Fault::FdbRemoved {
            on: on.into(),
            peer: peer.into(),
        }
    }

    pub fn fdb_wrong_destination(on: &str, peer: &str) -> Fault {
        Fault::FdbWrongDestination {
            on: on.into(),
            peer: peer.into(),
            dst: None,
        }
    }

    pub fn route_removed(on: &str, peer: &str) -> Fault {
        Fault::RouteRemoved {
            on: on.into(),
            peer: peer.into(),
            block: None,
        }
    }

    pub fn stray_route(on: &str, block: Ipv4Net) -> Fault {
        Fault::StrayRoute {
            on: on.into(),
            block,
            via: None,
        }
    }

    /// Every kind of fault between `on` and `peer` (stray route to 10.99.0.0/26), with defaults.
    pub fn all_kinds(on: &str, peer: &str) -> Vec<Fault> {
        vec![
            Fault::gateway_not_a_vtep(on, peer),
            Fault::stale_vtep(on, peer),
            Fault::neighbour_removed(on, peer),
            Fault::neighbour_wrong_mac(on, peer),
            Fault::fdb_removed(on, peer),
            Fault::fdb_wrong_destination(on, peer),
            Fault::route_removed(on, peer),
            Fault::stray_route(on, "10.99.0.0/26".parse().expect("literal")),
        ]
    }

    /// Short kebab-case name of the kind (`gateway-not-a-vtep`).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::GatewayNotAVtep { .. } => "gateway-not-a-vtep",
            Fault::StaleVtep { .. } => "stale-vtep",
            Fault::NeighbourRemoved { .. } => "neighbour-removed",
            Fault::NeighbourWrongMac { .. } => "neighbour-wrong-mac",
            Fault::FdbRemoved { .. } => "fdb-removed",
            Fault::FdbWrongDestination { .. } => "fdb-wrong-destination",
            Fault::RouteRemoved { .. } => "route-removed",
            Fault::StrayRoute { .. } => "stray-route",
        }
    }

    /// Node the fault is applied on.
    pub fn node(&self) -> &str {
        match self {
            Fault::GatewayNotAVtep { on, .. }
            | Fault::StaleVtep { on, .. }
            | Fault::NeighbourRemoved { on, .. }
            | Fault::NeighbourWrongMac { on, .. }
            | Fault::FdbRemoved { on, .. }
            | Fault::FdbWrongDestination { on, .. }
            | Fault::RouteRemoved { on, .. }
            | Fault::StrayRoute { on, .. } => on,
        }
    }

    /// Peer whose entries are corrupted (none for a stray route).
    pub fn peer(&self) -> Option<&str> {
        match self {
            Fault::GatewayNotAVtep { peer, .. }
            | Fault::StaleVtep { peer, .. }
            | Fault::NeighbourRemoved { peer, .. }
            | Fault::NeighbourWrongMac { peer, .. }
            | Fault::FdbRemoved { peer, .. }
            | Fault::FdbWrongDestination { peer, .. }
            | Fault::RouteRemoved { peer, .. } => Some(peer),
            Fault::StrayRoute { .. } => None,
        }
    }

    /// DESIGN.md §3 check ids an agent may reasonably report for this fault (any of them).
    pub fn expected_checks(&self) -> &'static [&'static str] {
        match self {
            Fault::GatewayNotAVtep { .. } => &[
                "gateway-not-a-vtep",
                "gateway-wrong-vtep",
                "gateway-is-network-address",
            ],
            // The node missed the move: no neighbour for the current VTEP either.
            Fault::StaleVtep { .. } => &[
                "gateway-wrong-vtep",
                "gateway-not-a-vtep",
                "route-stale",
                "neighbour-unresolved",
            ],
            Fault::NeighbourRemoved { .. } => &["neighbour-unresolved"],
            Fault::NeighbourWrongMac { .. } => &["neighbour-mac-mismatch"],
            Fault::FdbRemoved { .. } => &["fdb-missing"],
            Fault::FdbWrongDestination { .. } => &["fdb-wrong-destination"],
            Fault::RouteRemoved { .. } => &["route-missing"],
            Fault::StrayRoute { .. } => &["route-stale"],
        }
    }
}

/// A fault as applied, with everything chosen resolved, and how to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectedFault {
    /// Unique within the lab; pass the fault to [`Lab::restore`].
    pub id: u32,
    pub fault: Fault,
    /// One line for humans: what is wrong, where, and what it does to traffic.
    pub description: String,
    /// The affected routes as `ip route show` prints them on the faulty node right after the
    /// injection (empty when the fault removed them).
    pub route_lines: Vec<String>,
    /// Gateway whose neighbour entry tells the story (`ip neigh show <it> dev <device>`).
    pub gateway: Option<Ipv4Addr>,
    /// `(from node, destination address)` flows that must be lost while the fault is active;
    /// every other flow must still be delivered.
    pub blackholed: Vec<(String, Ipv4Addr)>,
    undo: Vec<Step>,
}

/// One `ip`/`bridge` command line in a node's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    bridge: bool,
    line: String,
    /// For deletions of entries that may legitimately be absent.
    may_fail: bool,
}

impl Step {
    pub(crate) fn ip(line: String) -> Step {
        Step {
            bridge: false,
            line,
            may_fail: false,
        }
    }
    pub(crate) fn ip_opt(line: String) -> Step {
        Step {
            bridge: false,
            line,
            may_fail: true,
        }
    }
    pub(crate) fn br(line: String) -> Step {
        Step {
            bridge: true,
            line,
            may_fail: false,
        }
    }
    fn br_opt(line: String) -> Step {
        Step {
            bridge: true,
            line,
            may_fail: true,
        }
    }
}

impl Lab {
    /// Applies `fault`; it stays active until [`Lab::restore`] / [`Lab::restore_all`] (or drop).
    pub fn inject(&mut self, fault: Fault) -> Result<InjectedFault> {
        let on = fault.node().to_string();
        let plan = self
            .plan(&fault)
            .with_context(|| format!("planning fault {fault:?}"))?;
        self.run_steps(&on, &plan.apply)
            .with_context(|| format!("injecting {} on {on}", fault.kind()))?;
        let mut route_lines = Vec::new();
        for dst in &plan.show_routes {
            let out = self.ip(&on, &["route", "show", "exact", &dst.to_string()])?;
            route_lines.extend(out.lines().map(|l| l.trim().to_string()));
        }
        self.fault_counter += 1;
        let injected = InjectedFault {
            id: self.fault_counter,
            fault,
            description: plan.description,
            route_lines,
            gateway: plan.gateway,
            blackholed: plan.blackholed,
            undo: plan.undo,
        };
        tracing::info!(fault = %injected.description, "fault injected");
        self.active_faults.push(injected.clone());
        Ok(injected)
    }

    /// Undoes one injected fault.
    pub fn restore(&mut self, fault: &InjectedFault) -> Result<()> {
        let pos = self
            .active_faults
            .iter()
            .position(|f| f.id == fault.id)
            .with_context(|| format!("fault #{} is not active", fault.id))?;
        let f = self.active_faults.remove(pos);
        self.run_steps(f.fault.node(), &f.undo)
            .with_context(|| format!("restoring {}", f.description))
    }

    /// Undoes every active fault, newest first, leaving the dataplane exactly healthy.
    pub fn restore_all(&mut self) -> Result<()> {
        while let Some(f) = self.active_faults.pop() {
            self.run_steps(f.fault.node(), &f.undo)
                .with_context(|| format!("restoring {}", f.description))?;
        }
        Ok(())
    }

    /// Faults injected and not yet restored.
    pub fn active_faults(&self) -> &[InjectedFault] {
        &self.active_faults
    }

    /// `ip neigh show <ip> dev <device>` on `node`: `None` when there is no entry.
    pub fn neighbour(&self, node: &str, ip: Ipv4Addr) -> Result<Option<String>> {
        let out = self.ip(
            node,
            &["neigh", "show", &ip.to_string(), "dev", self.device()],
        )?;
        Ok(out.lines().next().map(|l| l.trim().to_string()))
    }

    pub(crate) fn run_steps(&self, node: &str, steps: &[Step]) -> Result<()> {
        for s in steps {
            let args: Vec<&str> = s.line.split_whitespace().collect();
            let r = if s.bridge {
                self.bridge(node, &args)
            } else {
                self.ip(node, &args)
            };
            match r {
                Ok(_) => {}
                Err(e) if s.may_fail => tracing::debug!(error = %e, "optional step failed"),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn plan(&self, fault: &Fault) -> Result<Plan> {
        let dev = self.device();
        let on = fault.node();
        if let Some(peer) = fault.peer() {
            ensure_peer(self, on, peer)?;
        } else if self.try_node(on).is_none() {
            bail!("no node {on:?}");
        }
        let p = fault.peer().map(|p| self.node(p).clone());
        let peer = || p.as_ref().expect("fault with a peer");
        let all_dsts = |peer: &NodeInfo| -> Vec<(String, Ipv4Addr)> {
            peer.workload_ips()
                .into_iter()
                .map(|ip| (on.to_string(), ip))
                .collect()
        };
        let neigh = |ip: Ipv4Addr, mac: Mac| {
            format!("neigh replace {ip} lladdr {mac} dev {dev} nud permanent")
        };
        let fdb_fix = |peer: &NodeInfo| {
            vec![
                Step::br_opt(format!("fdb del {} dev {dev} self", peer.vtep_mac)),
                Step::br(format!(
                    "fdb append {} dev {dev} dst {} self permanent",
                    peer.vtep_mac, peer.node_ip
                )),
            ]
        };
        let healthy_routes = |peer: &NodeInfo| -> Vec<Step> {
            peer.blocks
                .iter()
                .copied()
                .chain(peer.borrowed.iter().map(|ip| Ipv4Net::from(*ip)))
                .map(|d| Step::ip(self.route_line(d, peer.vtep_ip)))
                .collect()
        };

        let plan = match fault {
            Fault::GatewayNotAVtep { gateway, .. } => {
                let peer = peer();
                let gw = match gateway {
                    Some(g) => *g,
                    None => self.unused_address(peer, true)?,
                };
                ensure!(
                    self.nodes().iter().all(|n| n.vtep_ip != gw),
                    "{gw} is a VTEP: use stale_vtep for a route via another VTEP"
                );
                let mut undo: Vec<Step> = peer
                    .blocks
                    .iter()
                    .map(|b| Step::ip(self.route_line(*b, peer.vtep_ip)))
                    .collect();
                // The failed resolution leaves an INCOMPLETE/FAILED entry: healthy has none.
                undo.push(Step::ip_opt(format!("neigh del {gw} dev {dev}")));
                Plan {
                    description: format!(
                        "{on}: routes to {}'s {} block(s) via {gw}, which is nobody's VTEP ({}'s VTEP is {}); no neighbour/FDB for it, so {on} -> {} is blackholed",
                        peer.name,
                        peer.blocks.len(),
                        peer.name,
                        peer.vtep_ip,
                        peer.name
                    ),
                    apply: peer
                        .blocks
                        .iter()
                        .map(|b| Step::ip(self.route_line(*b, gw)))
                        .collect(),
                    undo,
                    show_routes: peer.blocks.clone(),
                    gateway: Some(gw),
                    blackholed: peer
                        .pods
                        .iter()
                        .map(|ip| (on.to_string(), *ip))
                        .collect(),
                }
            }
            Fault::StaleVtep { old_vtep, .. } => {
                let peer = peer();
                let old = match old_vtep {
                    Some(g) => *g,
                    None => self.unused_address(peer, false)?,
                };
                ensure!(old != peer.vtep_ip, "old VTEP {old} is the current VTEP");
                let dsts: Vec<Ipv4Net> = peer
                    .blocks
                    .iter()
                    .copied()
                    .chain(peer.borrowed.iter().map(|ip| Ipv4Net::from(*ip)))
                    .collect();
                let mut apply: Vec<Step> = dsts
                    .iter()
                    .map(|d| Step::ip(self.route_line(*d, old)))
                    .collect();
                apply.push(Step::ip(format!("neigh del {} dev {dev}", peer.vtep_ip)));
                apply.push(Step::ip(neigh(old, peer.vtep_mac)));
                let mut undo = healthy_routes(peer);
                undo.push(Step::ip_opt(format!("neigh del {old} dev {dev}")));
                undo.push(Step::ip(neigh(peer.vtep_ip, peer.vtep_mac)));
                Plan {
                    description: format!(
                        "{on}: routes to {} via its previous VTEP {old} (neighbour {old} -> {} permanent, FDB unchanged); the datastore says {}. Traffic still flows",
                        peer.name, peer.vtep_mac, peer.vtep_ip
                    ),
                    apply,
                    undo,
                    show_routes: dsts,
                    gateway: Some(old),
                    blackholed: Vec::new(),
                }
            }
            Fault::NeighbourRemoved { .. } => {
                let peer = peer();
                Plan {
                    description: format!(
                        "{on}: permanent neighbour for {}'s VTEP {} removed; ARP on {dev} cannot resolve it, so {on} -> {} is blackholed",
                        peer.name, peer.vtep_ip, peer.name
                    ),
                    apply: vec![Step::ip(format!("neigh del {} dev {dev}", peer.vtep_ip))],
                    undo: vec![Step::ip(neigh(peer.vtep_ip, peer.vtep_mac))],
                    show_routes: peer.blocks.clone(),
                    gateway: Some(peer.vtep_ip),
                    blackholed: all_dsts(peer),
                }
            }
            Fault::NeighbourWrongMac { mac, .. } => {
                let peer = peer();
                let wrong = mac.unwrap_or(Mac([0x66, 0xde, 0xad, 0xbe, 0xef, peer.index as u8]));
                ensure!(wrong != peer.vtep_mac, "wrong MAC {wrong} is the right one");
                Plan {
                    description: format!(
                        "{on}: neighbour {} (VTEP of {}) has MAC {wrong} instead of {}; no FDB entry for it, so {on} -> {} is blackholed",
                        peer.vtep_ip, peer.name, peer.vtep_mac, peer.name
                    ),
                    apply: vec![Step::ip(neigh(peer.vtep_ip, wrong))],
                    undo: vec![Step::ip(neigh(peer.vtep_ip, peer.vtep_mac))],
                    show_routes: peer.blocks.clone(),
                    gateway: Some(peer.vtep_ip),
                    blackholed: all_dsts(peer),
                }
            }
            Fault::FdbRemoved { .. } => {
                let peer = peer();
                Plan {
                    description: format!(
                        "{on}: FDB entry {} -> {} ({}) removed; {dev} has no destination for it, so {on} -> {} is blackholed",
                        peer.vtep_mac, peer.node_ip, peer.name, peer.name
                    ),
                    apply: vec![Step::br(format!("fdb del {} dev {dev} self", peer.vtep_mac))],
                    undo: fdb_fix(peer),
                    show_routes: peer.blocks.clone(),
                    gateway: Some(peer.vtep_ip),
                    blackholed: all_dsts(peer),
                }
            }
            Fault::FdbWrongDestination { dst, .. } => {
                let peer = peer();
                let wrong = dst.unwrap_or(Ipv4Addr::new(192, 168, 77, 250));
                ensure!(
                    wrong != peer.node_ip,
                    "wrong destination {wrong} is the right one"
                );
                Plan {
                    description: format!(
                        "{on}: FDB entry for {}'s VTEP MAC {} points at {wrong} instead of {}, so {on} -> {} is blackholed",
                        peer.name, peer.vtep_mac, peer.node_ip, peer.name
                    ),
                    apply: vec![
                        Step::br_opt(format!("fdb del {} dev {dev} self", peer.vtep_mac)),
                        Step::br(format!(
                            "fdb append {} dev {dev} dst {wrong} self permanent",
                            peer.vtep_mac
                        )),
                    ],
                    undo: fdb_fix(peer),
                    show_routes: peer.blocks.clone(),
                    gateway: Some(peer.vtep_ip),
                    blackholed: all_dsts(peer),
                }
            }
            Fault::RouteRemoved { block, .. } => {
                let peer = peer();
                let b = block.unwrap_or(peer.blocks[0]);
                ensure!(
                    peer.blocks.contains(&b),
                    "{b} is not one of {}'s blocks",
                    peer.name
                );
                Plan {
                    description: format!(
                        "{on}: route to {}'s block {b} removed, so {on} -> pods in {b} is unreachable",
                        peer.name
                    ),
                    apply: vec![Step::ip(format!("route del {b} dev {dev}"))],
                    undo: vec![Step::ip(self.route_line(b, peer.vtep_ip))],
                    show_routes: vec![b],
                    gateway: None,
                    blackholed: peer
                        .pods
                        .iter()
                        .filter(|ip| b.contains(*ip))
                        .map(|ip| (on.to_string(), *ip))
                        .collect(),
                }
            }
            Fault::StrayRoute { block, via, .. } => {
                ensure!(
                    self.nodes()
                        .iter()
                        .all(|n| n.blocks.iter().all(
                            |b| !b.contains(&block.network()) && !block.contains(&b.network())
                        )),
                    "stray route {block} overlaps a real block"
                );
                let via = match via {
                    Some(v) => *v,
                    None => {
                        self.nodes()
                            .iter()
                            .find(|n| n.name != on)
                            .context("a stray route needs a second node")?
                            .vtep_ip
                    }
                };
                Plan {
                    description: format!(
                        "{on}: stray route {block} via {via}: no node owns {block} (stale state, harmless to traffic)"
                    ),
                    apply: vec![Step::ip(format!(
                        "route add {block} via {via} dev {dev} onlink"
                    ))],
                    undo: vec![Step::ip_opt(format!("route del {block} dev {dev}"))],
                    show_routes: vec![*block],
                    gateway: Some(via),
                    blackholed: Vec::new(),
                }
            }
        };
        Ok(plan)
    }

    /// An address in `peer`'s blocks that is no VTEP, pod or borrowed address. With
    /// `prefer_base`, block network addresses come first (the incident's shape).
    fn unused_address(&self, peer: &NodeInfo, prefer_base: bool) -> Result<Ipv4Addr> {
        let used = |ip: &Ipv4Addr| self.owner_of(*ip).is_some();
        let bases = peer.blocks.iter().map(|b| b.network());
        let tails = peer.blocks.iter().flat_map(|b| b.hosts().rev().take(4));
        let mut candidates: Box<dyn Iterator<Item = Ipv4Addr>> = if prefer_base {
            Box::new(bases.chain(tails))
        } else {
            Box::new(tails)
        };
        candidates
            .find(|ip| !used(ip))
            .with_context(|| format!("no unused address in {}'s blocks", peer.name))
    }
}

struct Plan {
    description: String,
    apply: Vec<Step>,
    undo: Vec<Step>,
    show_routes: Vec<Ipv4Net>,
    gateway: Option<Ipv4Addr>,
    blackholed: Vec<(String, Ipv4Addr)>,
}
