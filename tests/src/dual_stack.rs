//! Dual stack (DESIGN §1b): an IPv6 underlay and Calico's second overlay, `vxlan-v6.calico`,
//! added to a running Calico lab the way Felix programs it. Node `i` gets underlay address
//! `fd00:77::i`, one IPv6 block `fd10:i::/122` with its VTEP at the same offset in it as the
//! IPv4 VTEP has in the node's first IPv4 block (so the network address, as Calico allocates
//! it, except where the lab spec says otherwise: the incident's k8s03), the VTEP MAC Felix
//! derives from `name + "-v6"`, and two pods on `lo`.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use ipnet::Ipv6Net;

use crate::{
    fault::{Fault, Step},
    lab::{ensure_peer, set_sysctls, Lab, UNDERLAY_IF},
    spec::{Mac, Profile},
    sys, traffic,
};

/// Calico's IPv6 overlay device.
pub const DEVICE_V6: &str = "vxlan-v6.calico";
/// IPv6 VXLAN carries 20 more bytes of outer header than IPv4: 1500 − 70.
pub const OVERLAY_MTU_V6: u32 = 1430;

/// A [`Fault`] applied to a node's IPv6 overlay ([`Lab::inject_ipv6`]), and how to undo it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6InjectedFault {
    pub fault: Fault,
    /// One line for humans: what is wrong on which node's `vxlan-v6.calico`.
    pub description: String,
    undo: Vec<Step>,
}

/// One node's IPv6 side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ipv6Node {
    pub node_ip: Ipv6Addr,
    pub vtep_ip: Ipv6Addr,
    pub vtep_mac: Mac,
    pub block: Ipv6Net,
    pub pods: Vec<Ipv6Addr>,
}

impl Lab {
    /// The IPv6 side of `node` (whether or not [`Lab::add_ipv6_overlay`] ran).
    pub fn ipv6_of(&self, node: &str) -> Ipv6Node {
        let n = self.node(node);
        let i = n.index as u16;
        let block = Ipv6Net::new(Ipv6Addr::new(0xfd10, i, 0, 0, 0, 0, 0, 0), 122).expect("/122");
        let offset = n
            .blocks
            .first()
            .filter(|b| b.contains(&n.vtep_ip))
            .map_or(0, |b| u32::from(n.vtep_ip) - u32::from(b.network()));
        Ipv6Node {
            node_ip: Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, i),
            vtep_ip: Ipv6Addr::from(u128::from(block.network()) + u128::from(offset)),
            vtep_mac: Mac::felix(&format!("{}-v6", n.name)),
            block,
            pods: vec![
                Ipv6Addr::new(0xfd10, i, 0, 0, 0, 0, 0, 0x10),
                Ipv6Addr::new(0xfd10, i, 0, 0, 0, 0, 0, 0x11),
            ],
        }
    }

    /// Makes every node dual stack: IPv6 on the underlay, `vxlan-v6.calico` up with its /128
    /// VTEP, and toward every peer the route, permanent neighbour and FDB entry Felix programs.
    /// The datastore and agent configs then carry the IPv6 side and both devices.
    pub fn add_ipv6_overlay(&mut self) -> Result<()> {
        if self.profile() != Profile::Calico {
            bail!("the dual-stack lab is Calico's (vxlan-v6.calico)");
        }
        let (vni, port) = self.vxlan();
        let names: Vec<String> = self.nodes().iter().map(|n| n.name.clone()).collect();
        for name in &names {
            let me = self.ipv6_of(name);
            let v4dev = self.device();
            // The lab turns IPv6 off; on here, except on the IPv4 overlay (no ND chatter there).
            set_sysctls(
                &self.netns_path(name),
                &[
                    ("net/ipv6/conf/all/disable_ipv6", "0"),
                    ("net/ipv6/conf/default/disable_ipv6", "0"),
                    (&format!("net/ipv6/conf/{v4dev}/disable_ipv6"), "1"),
                ],
            )?;
            let mut cmds = vec![
                format!("addr add {}/64 dev {UNDERLAY_IF} nodad", me.node_ip),
                format!(
                    "link add {DEVICE_V6} type vxlan id {vni} dstport {port} local {} dev {UNDERLAY_IF} nolearning",
                    me.node_ip
                ),
                format!(
                    "link set {DEVICE_V6} mtu {OVERLAY_MTU_V6} address {}",
                    me.vtep_mac
                ),
                format!("addr add {}/128 dev {DEVICE_V6} nodad", me.vtep_ip),
                format!("link set {DEVICE_V6} up"),
                format!("route replace blackhole {} proto 80", me.block),
            ];
            for pod in &me.pods {
                cmds.push(format!("addr add {pod}/128 dev lo nodad"));
            }
            let mut bridge = Vec::new();
            for peer in names.iter().filter(|p| *p != name) {
                let c = self.ipv6_peer_commands(peer);
                cmds.extend(c.0);
                bridge.extend(c.1);
            }
            let netns = &self.node(name).netns;
            sys::ip_batch(netns, &cmds).with_context(|| format!("IPv6 overlay on {name}"))?;
            sys::bridge_batch(netns, &bridge).with_context(|| format!("IPv6 FDB on {name}"))?;
        }
        self.dual_stack = true;
        self.rebaseline()
    }

    /// The `ip` and `bridge` lines Felix programs toward `peer`'s IPv6 side (all idempotent:
    /// also what puts a faulted node back).
    pub fn ipv6_peer_commands(&self, peer: &str) -> (Vec<String>, Vec<String>) {
        let p = self.ipv6_of(peer);
        (
            vec![
                format!(
                    "route replace {} via {} dev {DEVICE_V6} onlink",
                    p.block, p.vtep_ip
                ),
                format!(
                    "neigh replace {} lladdr {} dev {DEVICE_V6} nud permanent",
                    p.vtep_ip, p.vtep_mac
                ),
            ],
            vec![format!(
                "fdb replace {} dev {DEVICE_V6} dst {} self permanent",
                p.vtep_mac, p.node_ip
            )],
        )
    }

    /// Puts `node`'s IPv6 overlay back to what Felix programs.
    pub fn heal_ipv6(&self, node: &str) -> Result<()> {
        let mut ip = Vec::new();
        let mut bridge = Vec::new();
        for peer in self.nodes().iter().filter(|p| p.name != node) {
            let c = self.ipv6_peer_commands(&peer.name);
            ip.extend(c.0);
            bridge.extend(c.1);
        }
        let netns = &self.node(node).netns;
        sys::ip_batch(netns, &ip)?;
        sys::bridge_batch(netns, &bridge)
    }

    /// `count` UDP packets from `from`'s first IPv6 pod to each IPv6 pod of `to`, over
    /// `vxlan-v6.calico`: `(sent, received)`.
    pub fn traffic_v6(&self, from: &str, to: &str, count: u32) -> Result<(u32, u32)> {
        let src = IpAddr::V6(self.ipv6_of(from).pods[0]);
        let dsts: Vec<IpAddr> = self.ipv6_of(to).pods.into_iter().map(IpAddr::V6).collect();
        let counts = traffic::measure(
            self.netns_path(from),
            src,
            self.netns_path(to),
            dsts,
            count,
            self.traffic_grace,
        )
        .with_context(|| format!("IPv6 traffic {from} -> {to}"))?;
        Ok((
            counts.iter().map(|c| c.sent).sum(),
            counts.iter().map(|c| c.received).sum(),
        ))
    }

    /// Applies `fault`'s kind to `vxlan-v6.calico` instead of the IPv4 overlay: the same
    /// corruption of the same node toward the same peer, made of the peer's IPv6 VTEP, MAC,
    /// block and underlay address (gateway: the block's network address unless that is the
    /// VTEP, else its last address; stale VTEP: the block's last free address; wrong MAC
    /// 66:de:ad:be:ef:<i>; wrong FDB destination `fd00:77::fa`; a stray IPv4 block `a.b.c.d/26`
    /// becomes `fd99::a.b.c.d/122`). The addresses are the lab's: a fault that names its own
    /// (an IPv4 gateway, MAC or destination) is refused.
    pub fn inject_ipv6(&self, fault: &Fault) -> Result<Ipv6InjectedFault> {
        if !self.dual_stack {
            bail!("no IPv6 overlay: call add_ipv6_overlay first");
        }
        let on = fault.node();
        let dev = DEVICE_V6;
        let peer = match fault.peer() {
            Some(peer) => {
                ensure_peer(self, on, peer)?;
                Some(self.ipv6_of(peer))
            }
            None => None,
        };
        let heal_peer = |apply: Vec<Step>| {
            let name = fault.peer().expect("a fault with a peer");
            let (ip, bridge) = self.ipv6_peer_commands(name);
            let undo = ip
                .into_iter()
                .map(Step::ip)
                .chain(bridge.into_iter().map(Step::br))
                .collect::<Vec<_>>();
            (apply, undo)
        };
        let last = |net: Ipv6Net, back: u128| Ipv6Addr::from(u128::from(net.broadcast()) - back);
        let (apply, undo, what) = match (fault, &peer) {
            (Fault::GatewayNotAVtep { gateway: None, .. }, Some(p)) => {
                let gw = if p.block.network() != p.vtep_ip {
                    p.block.network()
                } else {
                    last(p.block, 0)
                };
                let (apply, mut undo) = heal_peer(vec![Step::ip(format!(
                    "route replace {} via {gw} dev {dev} onlink",
                    p.block
                ))]);
                undo.push(Step::ip_opt(format!("neigh del {gw} dev {dev}")));
                (apply, undo, format!("routes via {gw}, nobody's VTEP"))
            }
            (Fault::StaleVtep { old_vtep: None, .. }, Some(p)) => {
                let old = last(p.block, 1);
                let (apply, mut undo) = heal_peer(vec![
                    Step::ip(format!(
                        "neigh replace {old} lladdr {} dev {dev} nud permanent",
                        p.vtep_mac
                    )),
                    Step::ip(format!("neigh del {} dev {dev}", p.vtep_ip)),
                    Step::ip(format!(
                        "route replace {} via {old} dev {dev} onlink",
                        p.block
                    )),
                ]);
                undo.push(Step::ip_opt(format!("neigh del {old} dev {dev}")));
                (apply, undo, format!("routes via the old VTEP {old}"))
            }
            (Fault::NeighbourRemoved { .. }, Some(p)) => {
                let (apply, undo) =
                    heal_peer(vec![Step::ip(format!("neigh del {} dev {dev}", p.vtep_ip))]);
                (apply, undo, format!("no neighbour for {}", p.vtep_ip))
            }
            (Fault::NeighbourWrongMac { mac: None, .. }, Some(p)) => {
                let i = self.node(fault.peer().expect("peer")).index as u8;
                let wrong = Mac([0x66, 0xde, 0xad, 0xbe, 0xef, i]);
                let (apply, undo) = heal_peer(vec![Step::ip(format!(
                    "neigh replace {} lladdr {wrong} dev {dev} nud permanent",
                    p.vtep_ip
                ))]);
                (apply, undo, format!("neighbour {} → {wrong}", p.vtep_ip))
            }
            (Fault::FdbRemoved { .. }, Some(p)) => {
                let (apply, undo) =
                    heal_peer(vec![Step::br(format!("fdb del {} dev {dev}", p.vtep_mac))]);
                (apply, undo, format!("no FDB entry for {}", p.vtep_mac))
            }
            (Fault::FdbWrongDestination { dst: None, .. }, Some(p)) => {
                let (apply, undo) = heal_peer(vec![Step::br(format!(
                    "fdb replace {} dev {dev} dst fd00:77::fa self permanent",
                    p.vtep_mac
                ))]);
                (apply, undo, format!("FDB {} → fd00:77::fa", p.vtep_mac))
            }
            (Fault::RouteRemoved { block: None, .. }, Some(p)) => {
                let (apply, undo) =
                    heal_peer(vec![Step::ip(format!("route del {} dev {dev}", p.block))]);
                (apply, undo, format!("no route to {}", p.block))
            }
            (
                Fault::StrayRoute {
                    block, via: None, ..
                },
                None,
            ) => {
                let stray = Ipv6Net::new(
                    Ipv6Addr::from((0xfd99u128 << 112) | u128::from(u32::from(block.network()))),
                    96 + block.prefix_len(),
                )
                .context("stray IPv6 block")?;
                let other = self
                    .nodes()
                    .iter()
                    .find(|n| n.name != on)
                    .context("no other node")?
                    .name
                    .clone();
                let via = self.ipv6_of(&other).vtep_ip;
                (
                    vec![Step::ip(format!(
                        "route replace {stray} via {via} dev {dev} onlink"
                    ))],
                    vec![Step::ip_opt(format!("route del {stray} dev {dev}"))],
                    format!("stray route {stray} via {via}"),
                )
            }
            _ => bail!(
                "{} on IPv6: leave the addresses to the lab ({fault:?})",
                fault.kind()
            ),
        };
        self.run_steps(on, &apply)
            .with_context(|| format!("injecting {} on {on}'s {dev}", fault.kind()))?;
        let description = format!(
            "{} on {on}'s {dev}{}: {what}",
            fault.kind(),
            fault
                .peer()
                .map(|p| format!(" toward {p}"))
                .unwrap_or_default()
        );
        tracing::info!(fault = %description, "IPv6 fault injected");
        Ok(Ipv6InjectedFault {
            fault: fault.clone(),
            description,
            undo,
        })
    }

    /// Undoes an [`Lab::inject_ipv6`] fault exactly.
    pub fn restore_ipv6(&self, injected: &Ipv6InjectedFault) -> Result<()> {
        self.run_steps(injected.fault.node(), &injected.undo)
            .with_context(|| format!("restoring {}", injected.description))
    }

    /// Whether [`Lab::add_ipv6_overlay`] ran.
    pub fn is_dual_stack(&self) -> bool {
        self.dual_stack
    }
}
