//! The lab's cluster as Kubernetes objects, served by the fake API server: Nodes with the
//! annotations Calico (or flannel) writes, and for Calico the IPAMBlocks and BlockAffinities
//! that own the lab's blocks and borrowed addresses. With these, `watchdog --datastore
//! kubernetes` sees exactly what the `file` datastore ([`Lab::datastore_yaml`]) says.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};
use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::{
    fake_apiserver::{FakeApiServer, Res},
    lab::{Lab, NodeInfo},
    spec::{Mac, Profile},
};

pub const ANN_CALICO_VTEP: &str = "projectcalico.org/IPv4VXLANTunnelAddr";
pub const ANN_CALICO_ADDRESS: &str = "projectcalico.org/IPv4Address";
pub const ANN_CALICO_MAC: &str = "projectcalico.org/VXLANTunnelMACAddr";
pub const ANN_CALICO_VTEP_V6: &str = "projectcalico.org/IPv6VXLANTunnelAddr";
pub const ANN_CALICO_ADDRESS_V6: &str = "projectcalico.org/IPv6Address";
pub const ANN_FLANNEL_BACKEND: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANN_FLANNEL_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";

/// Object name Calico gives a block: `10-1-235-128-26`.
pub fn block_name(cidr: Ipv4Net) -> String {
    cidr.to_string().replace(['.', '/'], "-")
}

/// The Node object for `node`, as calico-node (or flanneld) annotates it; `vtep` overrides the
/// published VTEP address (Calico only: flannel's VTEP is its subnet's base address).
fn node_object(lab: &Lab, node: &NodeInfo, vtep: Option<Ipv4Addr>) -> Value {
    let profile = lab.profile();
    let mut annotations = serde_json::Map::new();
    let mut spec = json!({});
    match profile {
        Profile::Calico => {
            let vtep = vtep.unwrap_or(node.vtep_ip);
            annotations.insert(ANN_CALICO_VTEP.into(), json!(vtep.to_string()));
            // Calico publishes the node address with the underlay's prefix length.
            annotations.insert(
                ANN_CALICO_ADDRESS.into(),
                json!(format!("{}/24", node.node_ip)),
            );
            // Felix publishes no MAC on Linux (peers derive it); only an explicit one is written.
            if node.vtep_mac != Mac::felix(&node.name) {
                annotations.insert(ANN_CALICO_MAC.into(), json!(node.vtep_mac.to_string()));
            }
            if lab.is_dual_stack() {
                let v6 = lab.ipv6_of(&node.name);
                annotations.insert(ANN_CALICO_VTEP_V6.into(), json!(v6.vtep_ip.to_string()));
                annotations.insert(
                    ANN_CALICO_ADDRESS_V6.into(),
                    json!(format!("{}/64", v6.node_ip)),
                );
            }
        }
        Profile::Flannel => {
            annotations.insert(
                ANN_FLANNEL_BACKEND.into(),
                json!(format!(
                    "{{\"VNI\":{},\"VtepMAC\":\"{}\"}}",
                    profile.vni(),
                    node.vtep_mac
                )),
            );
            annotations.insert(
                "flannel.alpha.coreos.com/backend-type".into(),
                json!("vxlan"),
            );
            annotations.insert(
                ANN_FLANNEL_PUBLIC_IP.into(),
                json!(node.node_ip.to_string()),
            );
            if let Some(cidr) = node.blocks.first() {
                spec = json!({"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]});
            }
        }
    }
    json!({
        "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name},
                     "annotations": annotations},
        "spec": spec,
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                   "addresses": [{"type": "InternalIP", "address": node.node_ip.to_string()}]}
    })
}

/// Calico's IPAMBlock for `cidr` owned by `owner`: the owner's VTEP allocated to itself, and
/// every address another node borrowed from it allocated to that node (`secondary.node`).
fn ipam_block(lab: &Lab, owner: &NodeInfo, cidr: Ipv4Net) -> Value {
    let size = 1usize << (32 - cidr.prefix_len());
    let base = u32::from(cidr.network());
    let mut allocations = vec![Value::Null; size];
    let mut attributes = Vec::new();
    let mut allocate = |ip: Ipv4Addr, node: &str, handle: String| {
        let ordinal = (u32::from(ip) - base) as usize;
        allocations[ordinal] = json!(attributes.len());
        attributes.push(json!({"handle_id": handle, "secondary": {"node": node}}));
    };
    if cidr.contains(&owner.vtep_ip) {
        allocate(
            owner.vtep_ip,
            &owner.name,
            format!("vxlan-tunnel-addr-{}", owner.name),
        );
    }
    for other in lab.nodes() {
        for ip in other.borrowed.iter().filter(|ip| cidr.contains(*ip)) {
            allocate(
                *ip,
                &other.name,
                format!("k8s-pod-network.{}-{ip}", other.name),
            );
        }
    }
    let unallocated: Vec<usize> = allocations
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_null())
        .map(|(i, _)| i)
        .collect();
    json!({
        "metadata": {"name": block_name(cidr)},
        "spec": {"cidr": cidr.to_string(), "affinity": format!("host:{}", owner.name),
                 "deleted": false, "strictAffinity": false, "sequenceNumber": 0,
                 "allocations": allocations, "attributes": attributes,
                 "unallocated": unallocated}
    })
}

/// A dual-stack node's IPv6 IPAMBlock, its IPv6 VTEP allocated to itself.
fn ipam_block_v6(lab: &Lab, owner: &str) -> Value {
    let v6 = lab.ipv6_of(owner);
    let size = 1usize << (128 - v6.block.prefix_len());
    let mut allocations = vec![Value::Null; size];
    let ordinal = (u128::from(v6.vtep_ip) - u128::from(v6.block.network())) as usize;
    allocations[ordinal] = json!(0);
    json!({
        "metadata": {"name": v6.block.to_string().replace([':', '/'], "-")},
        "spec": {"cidr": v6.block.to_string(), "affinity": format!("host:{owner}"),
                 "deleted": false, "allocations": allocations,
                 "attributes": [{"handle_id": format!("vxlan-v6-tunnel-addr-{owner}"),
                                 "secondary": {"node": owner, "type": "vxlanV6TunnelAddress"}}]}
    })
}

fn block_affinity(owner: &str, cidr: Ipv4Net) -> Value {
    json!({
        "metadata": {"name": format!("{owner}-{}", block_name(cidr))},
        // `deleted` is a string in crd.projectcalico.org/v1.
        "spec": {"node": owner, "cidr": cidr.to_string(), "state": "confirmed", "deleted": "false"}
    })
}

/// Puts the lab's healthy cluster into `server`: every Node and, for Calico, every IPAMBlock
/// and BlockAffinity, the VXLAN IPPool they come from and the `default` FelixConfiguration
/// with the lab's VNI and port. Safe to call again (objects are replaced).
pub fn populate_fake_apiserver(lab: &Lab, server: &FakeApiServer) {
    for node in lab.nodes() {
        server.put(Res::Nodes, node_object(lab, node, None));
    }
    if lab.profile() == Profile::Calico {
        for node in lab.nodes() {
            for &cidr in &node.blocks {
                server.put(Res::IpamBlocks, ipam_block(lab, node, cidr));
                server.put(Res::BlockAffinities, block_affinity(&node.name, cidr));
            }
        }
        let blocks: Vec<Ipv4Net> = lab.nodes().iter().flat_map(|n| n.blocks.clone()).collect();
        server.put(
            Res::IpPools,
            ip_pool("default-ipv4-ippool", covering(&blocks), "Always", "Never"),
        );
        if lab.is_dual_stack() {
            for node in lab.nodes() {
                server.put(Res::IpamBlocks, ipam_block_v6(lab, &node.name));
                let v6 = lab.ipv6_of(&node.name);
                let name = v6.block.to_string().replace([':', '/'], "-");
                server.put(
                    Res::BlockAffinities,
                    json!({"metadata": {"name": format!("{}-{name}", node.name)},
                           "spec": {"node": node.name, "cidr": v6.block.to_string(),
                                    "state": "confirmed", "deleted": "false"}}),
                );
            }
            server.put(
                Res::IpPools,
                json!({"metadata": {"name": "default-ipv6-ippool"},
                       "spec": {"cidr": "fd10::/16", "vxlanMode": "Always", "ipipMode": "Never",
                                "natOutgoing": false, "blockSize": 122, "nodeSelector": "all()"}}),
            );
        }
        let (vni, port) = lab.vxlan();
        server.put(
            Res::FelixConfigurations,
            json!({"metadata": {"name": "default"},
                   "spec": {"vxlanVNI": vni, "vxlanPort": port, "bpfLogLevel": "",
                            "logSeverityScreen": "Info", "reportingInterval": "0s"}}),
        );
    }
}

/// An IPPool as Calico writes it (`vxlanMode`/`ipipMode`: `Always`, `CrossSubnet`, `Never`).
pub fn ip_pool(name: &str, cidr: Ipv4Net, vxlan_mode: &str, ipip_mode: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"cidr": cidr.to_string(), "vxlanMode": vxlan_mode, "ipipMode": ipip_mode,
                 "natOutgoing": true, "blockSize": 26, "nodeSelector": "all()"}
    })
}

/// A node outside the lab's kernels: a Node object and the IPAMBlocks it owns, as Calico
/// writes them for a node of an IPIP or no-encap pool (an address, no VTEP).
pub fn put_node_without_vtep(
    server: &FakeApiServer,
    name: &str,
    node_ip: Ipv4Addr,
    blocks: &[Ipv4Net],
) {
    server.put(
        Res::Nodes,
        json!({"metadata": {"name": name, "annotations": {
            ANN_CALICO_ADDRESS: format!("{node_ip}/24")}}}),
    );
    for &cidr in blocks {
        put_block(server, name, cidr);
    }
}

/// An IPAMBlock (and its confirmed affinity) owned by `owner`, with nothing allocated.
pub fn put_block(server: &FakeApiServer, owner: &str, cidr: Ipv4Net) {
    server.put(
        Res::IpamBlocks,
        json!({"metadata": {"name": block_name(cidr)},
               "spec": {"cidr": cidr.to_string(), "affinity": format!("host:{owner}"),
                        "deleted": false, "allocations": [], "attributes": []}}),
    );
    server.put(Res::BlockAffinities, block_affinity(owner, cidr));
}

/// The smallest network containing every one of `nets`.
fn covering(nets: &[Ipv4Net]) -> Ipv4Net {
    let mut net = nets.first().copied().unwrap_or_default();
    while !nets.iter().all(|n| net.contains(n)) && net.prefix_len() > 0 {
        net = Ipv4Net::new(net.network(), net.prefix_len() - 1)
            .unwrap()
            .trunc();
    }
    net
}

/// What calico-node does when `node` re-registers with a new VTEP address: its Node's
/// `IPv4VXLANTunnelAddr` annotation changes (a MODIFIED event — unless the watch is silent).
/// The lab's kernels are not touched. Returns the new resourceVersion.
pub fn move_vtep(lab: &Lab, server: &FakeApiServer, node: &str, vtep: Ipv4Addr) -> Result<u64> {
    if lab.profile() != Profile::Calico {
        bail!("move_vtep: flannel's VTEP is its subnet's base address, not an annotation");
    }
    Ok(server.put(Res::Nodes, node_object(lab, lab.node(node), Some(vtep))))
}

/// Puts `node`'s Node object back as the lab built it.
pub fn restore_node(lab: &Lab, server: &FakeApiServer, node: &str) -> u64 {
    server.put(Res::Nodes, node_object(lab, lab.node(node), None))
}

/// An agent config for running `watchdog` as `node` against the API server in `kubeconfig`.
pub fn agent_config_toml_kubernetes(lab: &Lab, node: &str, kubeconfig: &Path) -> String {
    let (vni, port) = lab.vxlan();
    let profile = lab.profile();
    let vxlan = if (vni, port) == (profile.vni(), profile.udp_port()) {
        String::new()
    } else {
        format!("vxlan_vni = {vni}\nvxlan_port = {port}\n")
    };
    let mut devices = format!("\"{}\"", lab.device());
    if lab.is_dual_stack() {
        devices.push_str(&format!(", \"{}\"", crate::DEVICE_V6));
    }
    format!(
        "node_name = \"{}\"\nprofile = \"{}\"\ndevices = [{devices}]\n{vxlan}\n[datastore]\nsource = \"kubernetes\"\nkubeconfig = \"{}\"\n",
        lab.node(node).name,
        profile,
        kubeconfig.display()
    )
}

impl Lab {
    /// Writes [`agent_config_toml_kubernetes`] to `<tmp>/<lab id>-<node>-kube.toml` (removed
    /// when the lab is dropped) and returns its path.
    pub fn write_agent_config_kubernetes(
        &mut self,
        node: &str,
        kubeconfig: &Path,
    ) -> Result<PathBuf> {
        let path = std::env::temp_dir().join(format!("{}-{node}-kube.toml", self.id()));
        let text = agent_config_toml_kubernetes(self, node, kubeconfig);
        self.write_temp(&path, &text)?;
        Ok(path)
    }
}

/// A running pod bound to `node` `bound_secs_ago` seconds ago, as the API server has it.
pub fn pod(namespace: &str, name: &str, node: &str, bound_secs_ago: u64) -> Value {
    let at = |ago: u64| {
        humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - std::time::Duration::from_secs(ago),
        )
        .to_string()
    };
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"),
                     "creationTimestamp": at(bound_secs_ago + 1)},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running",
                   "conditions": [{"type": "PodScheduled", "status": "True",
                                   "lastTransitionTime": at(bound_secs_ago)}]}
    })
}

/// `pod` after a graceful delete whose grace period ended `secs_ago` seconds ago.
pub fn deleted(mut pod: Value, secs_ago: u64) -> Value {
    pod["metadata"]["deletionTimestamp"] = json!(humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - std::time::Duration::from_secs(secs_ago)
    )
    .to_string());
    pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    pod
}
