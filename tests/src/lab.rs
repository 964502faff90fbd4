//! Building, inspecting and tearing down a lab: one underlay namespace with a bridge, one
//! namespace per node with a veth into it and an overlay device programmed like Felix/flannel.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;

use crate::{
    fault::InjectedFault,
    spec::{pods_of, vtep_of, LabSpec, Mac, Profile},
    sys,
};

/// Where `ip netns add` puts its namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace the lab creates: `wdl<pid>x<counter>-<node>`.
pub const NETNS_PREFIX: &str = "wdl";
/// MTU of the overlay device (underlay 1500 minus VXLAN's 50 bytes), as Calico and flannel set it.
pub const OVERLAY_MTU: u32 = 1450;
/// Name of each node's underlay interface.
pub const UNDERLAY_IF: &str = "eth0";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One node as built: everything a test or the agent needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// 1-based position in the spec; the underlay address is 192.168.77.<index>.
    pub index: usize,
    /// Network namespace name (`ip netns` name).
    pub netns: String,
    /// Underlay address (the FDB destination other nodes use).
    pub node_ip: Ipv4Addr,
    pub vtep_ip: Ipv4Addr,
    pub vtep_mac: Mac,
    pub blocks: Vec<Ipv4Net>,
    /// Pod addresses (/32 on `lo`) inside this node's own blocks.
    pub pods: Vec<Ipv4Addr>,
    /// Addresses borrowed from other nodes' blocks (also /32 on `lo`).
    pub borrowed: Vec<Ipv4Addr>,
}

impl NodeInfo {
    /// Every workload address this node answers on: its pods, then its borrowed addresses.
    pub fn workload_ips(&self) -> Vec<Ipv4Addr> {
        self.pods.iter().chain(&self.borrowed).copied().collect()
    }

    /// Which of this node's blocks holds `ip`.
    pub fn block_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.blocks.iter().copied().find(|b| b.contains(&ip))
    }
}

/// The overlay-relevant kernel state of one node, as `ip`/`bridge` print it (sorted lines).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeDataplane {
    /// `ip route show table main`
    pub routes: Vec<String>,
    /// `ip neigh show dev <overlay device>`
    pub neighbours: Vec<String>,
    /// `bridge fdb show dev <overlay device>`
    pub fdb: Vec<String>,
}

/// A running lab. Dropping it deletes every namespace it created (and with them every device).
#[derive(Debug)]
pub struct Lab {
    id: String,
    profile: Profile,
    /// VNI and port other than the profile's, if the spec asked for them.
    vxlan: Option<(u32, u16)>,
    underlay: String,
    nodes: Vec<NodeInfo>,
    /// Namespaces to delete on drop, in creation order.
    created: Vec<String>,
    pub(crate) active_faults: Vec<InjectedFault>,
    pub(crate) fault_counter: u32,
    healthy: BTreeMap<String, NodeDataplane>,
    pub(crate) traffic_grace: Duration,
    /// Files written for the agent (datastore, configs), removed on drop.
    temp_files: Vec<PathBuf>,
    /// [`Lab::add_ipv6_overlay`] ran: datastore and configs carry the IPv6 side.
    pub(crate) dual_stack: bool,
}

impl Lab {
    /// Builds the lab described by `spec`. Needs root. On error, whatever was already created is
    /// torn down again.
    pub fn build(spec: LabSpec) -> Result<Lab> {
        sys::require_root()?;
        spec.validate().context("invalid lab spec")?;
        let id = format!(
            "{NETNS_PREFIX}{}x{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let nodes: Vec<NodeInfo> = spec
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeInfo {
                name: n.name.clone(),
                index: i + 1,
                netns: format!("{id}-{}", n.name),
                node_ip: Ipv4Addr::new(192, 168, 77, (i + 1) as u8),
                vtep_ip: vtep_of(n),
                vtep_mac: n.mac.unwrap_or_else(|| match spec.profile {
                    Profile::Calico => Mac::felix(&n.name),
                    Profile::Flannel => Mac::flannel(&n.name),
                }),
                blocks: n.blocks.clone(),
                pods: pods_of(n),
                borrowed: n.borrowed.clone(),
            })
            .collect();
        let mut lab = Lab {
            underlay: format!("{id}-underlay"),
            id,
            profile: spec.profile,
            vxlan: spec.vxlan,
            nodes,
            created: Vec::new(),
            active_faults: Vec::new(),
            fault_counter: 0,
            healthy: BTreeMap::new(),
            traffic_grace: Duration::from_millis(300),
            temp_files: Vec::new(),
            dual_stack: false,
        };
        // `lab` owns the cleanup from here: an early return drops it.
        lab.build_underlay()?;
        for i in 0..lab.nodes.len() {
            lab.build_node(i)
                .with_context(|| format!("building node {}", lab.nodes[i].name))?;
        }
        for i in 0..lab.nodes.len() {
            let name = lab.nodes[i].name.clone();
            let healthy = lab.healthy_commands(&name);
            sys::ip_batch(&lab.nodes[i].netns, &healthy.ip)
                .with_context(|| format!("programming overlay routes on {name}"))?;
            sys::bridge_batch(&lab.nodes[i].netns, &healthy.bridge)
                .with_context(|| format!("programming FDB on {name}"))?;
        }
        lab.healthy = lab.snapshot()?;
        tracing::info!(lab = %lab.id, nodes = lab.nodes.len(), profile = %lab.profile, "lab built");
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        sys::run("ip", &["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    fn build_underlay(&mut self) -> Result<()> {
        let ul = self.underlay.clone();
        self.add_netns(&ul)?;
        let mut cmds = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge".into(),
            "link set br0 up".into(),
        ];
        for n in &self.nodes {
            // Create each node's namespace first so the veth peer can be placed in it.
            let ns = n.netns.clone();
            sys::run("ip", &["netns", "add", &ns])?;
            self.created.push(ns.clone());
            cmds.push(format!(
                "link add n{i} type veth peer name {UNDERLAY_IF} netns {ns}",
                i = n.index
            ));
            cmds.push(format!("link set n{} master br0", n.index));
            cmds.push(format!("link set n{} up", n.index));
        }
        sys::ip_batch(&ul, &cmds).context("building the underlay bridge")
    }

    fn build_node(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        // Strict reverse-path filtering would turn a one-way fault into a two-way one; IPv6 off
        // so the overlay carries no ND/MLD chatter that would show up as drops. No forwarding:
        // pod addresses are local (on lo), so decapsulated packets are delivered, not routed.
        set_sysctls(
            &self.netns_path(&n.name),
            &[
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
                ("net/ipv6/conf/all/disable_ipv6", "1"),
                ("net/ipv6/conf/default/disable_ipv6", "1"),
            ],
        )?;
        let dev = self.profile.device();
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("link set {UNDERLAY_IF} up"),
            format!("addr add {}/24 dev {UNDERLAY_IF}", n.node_ip),
            format!(
                "link add {dev} type vxlan id {} dstport {} local {} dev {UNDERLAY_IF} nolearning",
                self.vxlan.map_or(self.profile.vni(), |v| v.0),
                self.vxlan.map_or(self.profile.udp_port(), |v| v.1),
                n.node_ip
            ),
            format!("link set {dev} mtu {OVERLAY_MTU} address {}", n.vtep_mac),
            format!("addr add {}/32 dev {dev}", n.vtep_ip),
            format!("link set {dev} up"),
        ];
        for ip in n.workload_ips() {
            cmds.push(format!("addr add {ip}/32 dev lo"));
        }
        sys::ip_batch(&n.netns, &cmds)
    }

    /// The `ip` and `bridge` batch lines that make `node` healthy towards every peer.
    pub(crate) fn healthy_commands(&self, node: &str) -> Commands {
        let me = self.node(node);
        let mut out = Commands::default();
        if self.profile == Profile::Calico {
            for b in &me.blocks {
                out.ip.push(format!("route replace blackhole {b} proto 80"));
            }
        }
        for peer in self.nodes.iter().filter(|p| p.name != me.name) {
            let c = self.peer_commands(peer);
            out.ip.extend(c.ip);
            out.bridge.extend(c.bridge);
        }
        out
    }

    /// Healthy route, neighbour and FDB lines towards one peer.
    pub(crate) fn peer_commands(&self, peer: &NodeInfo) -> Commands {
        let dev = self.profile.device();
        let mut out = Commands::default();
        for b in &peer.blocks {
            out.ip.push(self.route_line(*b, peer.vtep_ip));
        }
        for ip in &peer.borrowed {
            out.ip
                .push(self.route_line(Ipv4Net::from(*ip), peer.vtep_ip));
        }
        out.ip.push(format!(
            "neigh replace {} lladdr {} dev {dev} nud permanent",
            peer.vtep_ip, peer.vtep_mac
        ));
        out.bridge.push(format!(
            "fdb append {} dev {dev} dst {} self permanent",
            peer.vtep_mac, peer.node_ip
        ));
        out
    }

    pub(crate) fn route_line(&self, dst: Ipv4Net, via: Ipv4Addr) -> String {
        format!(
            "route replace {dst} via {via} dev {} onlink",
            self.profile.device()
        )
    }

    /// Takes the current dataplane as the healthy one (after a shape was added on purpose).
    pub(crate) fn rebaseline(&mut self) -> Result<()> {
        self.healthy = self.snapshot()?;
        Ok(())
    }

    /// Unique id of this lab (`wdl<pid>x<n>`), the prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The VNI and UDP port the overlay devices run.
    pub fn vxlan(&self) -> (u32, u16) {
        self.vxlan
            .unwrap_or((self.profile.vni(), self.profile.udp_port()))
    }

    /// Overlay device name (`vxlan.calico` or `flannel.1`).
    pub fn device(&self) -> &'static str {
        self.profile.device()
    }

    /// All nodes in spec order.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Node by name. Panics on an unknown name (a test bug, not a runtime condition).
    pub fn node(&self, name: &str) -> &NodeInfo {
        self.try_node(name)
            .unwrap_or_else(|| panic!("lab {} has no node {name:?}", self.id))
    }

    pub fn try_node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The node owning `ip` (as pod, borrowed address or VTEP).
    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<&NodeInfo> {
        self.nodes
            .iter()
            .find(|n| n.vtep_ip == ip || n.workload_ips().contains(&ip))
    }

    /// `/run/netns/<netns>`: what `watchdog --netns` takes.
    pub fn netns_path(&self, node: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.node(node).netns)
    }

    /// Namespace holding the underlay bridge.
    pub fn underlay_netns(&self) -> &str {
        &self.underlay
    }

    /// Runs `argv` inside `node`'s namespace via `ip netns exec` (short commands only).
    pub fn exec(&self, node: &str, argv: &[&str]) -> Result<Output> {
        let ns = &self.node(node).netns;
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .output()
            .with_context(|| format!("ip netns exec {ns} {}", argv.join(" ")))
    }

    /// `ip -n <netns> <args>` in `node`; returns stdout, fails with stderr.
    pub fn ip(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.node(node).netns.as_str()];
        full.extend_from_slice(args);
        sys::run("ip", &full)
    }

    /// `bridge -n <netns> <args>` in `node`.
    pub fn bridge(&self, node: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.node(node).netns.as_str()];
        full.extend_from_slice(args);
        sys::run("bridge", &full)
    }

    /// Current routes / overlay neighbours / overlay FDB of one node.
    pub fn dataplane(&self, node: &str) -> Result<NodeDataplane> {
        let dev = self.device();
        let lines = |s: String| {
            let mut v: Vec<String> = s
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect();
            v.sort();
            v
        };
        Ok(NodeDataplane {
            routes: lines(self.ip(node, &["route", "show", "table", "main"])?),
            neighbours: lines(self.ip(node, &["neigh", "show", "dev", dev])?),
            fdb: lines(self.bridge(node, &["fdb", "show", "dev", dev])?),
        })
    }

    /// [`Lab::dataplane`] of every node.
    pub fn snapshot(&self) -> Result<BTreeMap<String, NodeDataplane>> {
        self.nodes
            .iter()
            .map(|n| Ok((n.name.clone(), self.dataplane(&n.name)?)))
            .collect()
    }

    /// The state captured right after the build.
    pub fn healthy_snapshot(&self) -> &BTreeMap<String, NodeDataplane> {
        &self.healthy
    }

    /// Differences between now and the healthy state, one line each (`k8s01 route +…`);
    /// empty when the dataplane is exactly healthy.
    pub fn diff_from_healthy(&self) -> Result<Vec<String>> {
        let now = self.snapshot()?;
        let mut out = Vec::new();
        for (node, healthy) in &self.healthy {
            let cur = &now[node];
            for (kind, h, c) in [
                ("route", &healthy.routes, &cur.routes),
                ("neigh", &healthy.neighbours, &cur.neighbours),
                ("fdb", &healthy.fdb, &cur.fdb),
            ] {
                out.extend(
                    h.iter()
                        .filter(|l| !c.contains(l))
                        .map(|l| format!("{node} {kind} -{l}")),
                );
                out.extend(
                    c.iter()
                        .filter(|l| !h.contains(l))
                        .map(|l| format!("{node} {kind} +{l}")),
                );
            }
        }
        Ok(out)
    }

    /// The healthy cluster in the agent's `file` datastore format (DESIGN.md §6). `vtep_mac` is
    /// written only where it is not what the agent would derive (flannel, or an explicit MAC).
    pub fn datastore_yaml(&self) -> String {
        let mut y = String::from("nodes:\n");
        for n in &self.nodes {
            let _ = writeln!(y, "  - name: {}", n.name);
            let _ = writeln!(y, "    node_ip: {}", n.node_ip);
            let _ = writeln!(y, "    vtep_ip: {}", n.vtep_ip);
            if self.profile == Profile::Flannel || n.vtep_mac != Mac::felix(&n.name) {
                let _ = writeln!(y, "    vtep_mac: \"{}\"", n.vtep_mac);
            }
            let mut blocks = join(&n.blocks);
            if self.dual_stack {
                let _ = write!(blocks, ", \"{}\"", self.ipv6_of(&n.name).block);
            }
            let _ = writeln!(y, "    blocks: [{blocks}]");
            if !n.borrowed.is_empty() {
                let b: Vec<Ipv4Net> = n.borrowed.iter().map(|ip| Ipv4Net::from(*ip)).collect();
                let _ = writeln!(y, "    borrowed: [{}]", join(&b));
            }
            if self.dual_stack {
                let v6 = self.ipv6_of(&n.name);
                let _ = writeln!(y, "    node_ipv6: \"{}\"", v6.node_ip);
                let _ = writeln!(y, "    vtep_ipv6: \"{}\"", v6.vtep_ip);
            }
        }
        y
    }

    /// Writes [`Lab::datastore_yaml`] to `<tmp>/<lab id>-nodes.yaml` (removed when the lab is
    /// dropped) and returns its path.
    pub fn write_datastore(&mut self) -> Result<PathBuf> {
        let path = std::env::temp_dir().join(format!("{}-nodes.yaml", self.id));
        self.write_temp(&path, &self.datastore_yaml())?;
        Ok(path)
    }

    /// Writes the datastore and an agent config for `node` (`<tmp>/<lab id>-<node>.toml`,
    /// removed on drop); returns the config path. Then:
    /// `watchdog scan --config <it> --netns <Lab::netns_path(node)>`.
    pub fn write_agent_config(&mut self, node: &str) -> Result<PathBuf> {
        let datastore = self.write_datastore()?;
        let path = std::env::temp_dir().join(format!("{}-{node}.toml", self.id));
        self.write_temp(&path, &self.agent_config_toml(node, &datastore))?;
        Ok(path)
    }

    pub(crate) fn write_temp(&mut self, path: &Path, contents: &str) -> Result<()> {
        fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
        if !self.temp_files.iter().any(|p| p == path) {
            self.temp_files.push(path.to_path_buf());
        }
        Ok(())
    }

    /// An agent config (DESIGN.md §3) for running `watchdog` as `node` against `datastore`.
    pub fn agent_config_toml(&self, node: &str, datastore: &Path) -> String {
        let vxlan = self
            .vxlan
            .map(|(vni, port)| format!("vxlan_vni = {vni}\nvxlan_port = {port}\n"))
            .unwrap_or_default();
        let mut devices = format!("\"{}\"", self.device());
        if self.dual_stack {
            let _ = write!(devices, ", \"{}\"", crate::dual_stack::DEVICE_V6);
        }
        format!(
            "node_name = \"{}\"\nprofile = \"{}\"\ndevices = [{devices}]\n{vxlan}\n[datastore]\nsource = \"file\"\npath = \"{}\"\n",
            self.node(node).name,
            self.profile,
            datastore.display()
        )
    }

    /// How long traffic measurements wait for stragglers after the last packet was sent.
    pub fn set_traffic_grace(&mut self, grace: Duration) {
        self.traffic_grace = grace;
    }

    /// Deletes namespaces left by lab processes that no longer exist (e.g. killed with SIGKILL).
    /// Returns the names deleted.
    pub fn cleanup_stale() -> Result<Vec<String>> {
        sys::require_root()?;
        let mut deleted = Vec::new();
        let Ok(dir) = fs::read_dir(NETNS_DIR) else {
            return Ok(deleted);
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|r| r.split_once('x'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                sys::run("ip", &["netns", "del", &name])?;
                deleted.push(name);
            }
        }
        Ok(deleted)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            if let Err(e) = sys::run("ip", &["netns", "del", ns]) {
                tracing::warn!(netns = %ns, error = %e, "lab teardown: cannot delete namespace");
            }
        }
        for f in &self.temp_files {
            let _ = fs::remove_file(f);
        }
    }
}

/// Batched command lines for one namespace.
#[derive(Debug, Default, Clone)]
pub(crate) struct Commands {
    pub ip: Vec<String>,
    pub bridge: Vec<String>,
}

fn join(nets: &[Ipv4Net]) -> String {
    nets.iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes sysctls inside a namespace from a short-lived thread (`/proc/sys/net` follows the
/// writing thread's namespace), avoiding `ip netns exec`'s remounts.
pub(crate) fn set_sysctls(netns: &Path, values: &[(&str, &str)]) -> Result<()> {
    let netns = netns.to_path_buf();
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    std::thread::spawn(move || -> Result<()> {
        sys::enter_netns(&netns)?;
        for (key, value) in values {
            let path = Path::new("/proc/sys").join(&key);
            if key.starts_with("net/ipv6") && !path.exists() {
                continue; // kernel without IPv6: nothing to silence
            }
            fs::write(&path, &value).with_context(|| format!("sysctl {key}={value}"))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
}

/// Fails unless `cond`; used by fault code for spec-level mistakes.
pub(crate) fn ensure_peer(lab: &Lab, on: &str, peer: &str) -> Result<()> {
    if lab.try_node(on).is_none() {
        bail!("no node {on:?} in lab {}", lab.id);
    }
    if lab.try_node(peer).is_none() {
        bail!("no node {peer:?} in lab {}", lab.id);
    }
    if on == peer {
        bail!("a fault needs two different nodes, got {on} twice");
    }
    Ok(())
}
