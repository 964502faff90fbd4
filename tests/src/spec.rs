//! What a lab should look like: the overlay profile and, per node, its blocks, VTEP and MAC.
//! Pure data plus validation; nothing here touches the kernel.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, str::FromStr};

use anyhow::{bail, ensure, Context, Result};
use ipnet::Ipv4Net;

/// Which overlay the lab imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// Calico VXLAN as Felix programs it: `vxlan.calico`, VNI 4096, UDP 4789, /26 blocks.
    #[default]
    Calico,
    /// flannel's VXLAN backend: `flannel.1`, VNI 1, UDP 8472, one /24 per node.
    Flannel,
}

impl Profile {
    /// Overlay device name inside every node.
    pub fn device(self) -> &'static str {
        match self {
            Profile::Calico => "vxlan.calico",
            Profile::Flannel => "flannel.1",
        }
    }

    pub fn vni(self) -> u32 {
        match self {
            Profile::Calico => 4096,
            Profile::Flannel => 1,
        }
    }

    pub fn udp_port(self) -> u16 {
        match self {
            Profile::Calico => 4789,
            Profile::Flannel => 8472,
        }
    }

    /// Name used in the agent's config (`profile = "calico"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Calico => "calico",
            Profile::Flannel => "flannel",
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An Ethernet address (the lab's own type: the lab does not depend on the agent).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// Felix's VTEP MAC for a node that publishes none: 0x66 then sha1(node name)[0..5].
    pub fn felix(node_name: &str) -> Self {
        Self::prefixed(0x66, node_name.as_bytes())
    }

    /// A stable stand-in for flannel's random VtepMAC (locally administered, unicast).
    pub fn flannel(node_name: &str) -> Self {
        Self::prefixed(0xa2, format!("flannel:{node_name}").as_bytes())
    }

    fn prefixed(first: u8, seed: &[u8]) -> Self {
        use sha1::{Digest, Sha1};
        let digest = Sha1::digest(seed);
        let mut mac = [first, 0, 0, 0, 0, 0];
        mac[1..].copy_from_slice(&digest[..5]);
        Mac(mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts
                .next()
                .with_context(|| format!("MAC {s:?}: too short"))?;
            *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {s:?}"))?;
        }
        ensure!(parts.next().is_none(), "MAC {s:?}: too long");
        Ok(Mac(mac))
    }
}

/// One node of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Kubernetes node name (`k8s03`): lowercase letters, digits, `-`, at most 20 characters.
    pub name: String,
    /// Pod blocks affine to this node (Calico /26 blocks, or flannel's one /24 subnet).
    pub blocks: Vec<Ipv4Net>,
    /// VTEP address; `None` = network base address of the first block (what Calico and flannel
    /// normally pick).
    pub vtep: Option<Ipv4Addr>,
    /// VTEP MAC; `None` = derived like Felix (Calico) or a stable stand-in (flannel).
    pub mac: Option<Mac>,
    /// Addresses this node uses from OTHER nodes' blocks (routed cluster-wide as /32).
    pub borrowed: Vec<Ipv4Addr>,
    /// How many pod addresses to put on `lo` per block (ordinals 1.., skipping the VTEP).
    pub pods_per_block: usize,
}

impl NodeSpec {
    pub fn new(name: &str, blocks: &[&str]) -> Self {
        NodeSpec {
            name: name.to_string(),
            blocks: blocks
                .iter()
                .map(|b| b.parse().expect("block literal"))
                .collect(),
            vtep: None,
            mac: None,
            borrowed: Vec::new(),
            pods_per_block: 3,
        }
    }

    pub fn with_vtep(mut self, vtep: Ipv4Addr) -> Self {
        self.vtep = Some(vtep);
        self
    }
}

/// The whole lab: profile plus nodes (node `i`, 1-based, gets underlay address 192.168.77.i).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    pub profile: Profile,
    pub nodes: Vec<NodeSpec>,
    /// VNI and UDP port other than the profile's (a Calico cluster migrated from flannel keeps
    /// VNI 1 / port 8472); the agent is then configured with `vxlan_vni`/`vxlan_port`.
    pub vxlan: Option<(u32, u16)>,
}

impl LabSpec {
    /// `n` Calico nodes `node1..noden`; node i owns 10.1.i.0/26 (VTEP 10.1.i.0) and 10.1.i.64/26.
    pub fn calico(n: usize) -> Self {
        let nodes = (1..=n)
            .map(|i| {
                NodeSpec::new(
                    &format!("node{i}"),
                    &[&format!("10.1.{i}.0/26"), &format!("10.1.{i}.64/26")],
                )
            })
            .collect();
        LabSpec {
            profile: Profile::Calico,
            nodes,
            vxlan: None,
        }
    }

    /// `n` flannel nodes `node1..noden`; node i owns 10.244.(i-1).0/24, VTEP 10.244.(i-1).0.
    pub fn flannel(n: usize) -> Self {
        let nodes = (1..=n)
            .map(|i| NodeSpec::new(&format!("node{i}"), &[&format!("10.244.{}.0/24", i - 1)]))
            .collect();
        LabSpec {
            profile: Profile::Flannel,
            nodes,
            vxlan: None,
        }
    }

    /// The cluster of incident-k8s03.md: k8s01 and k8s02 with a block each (VTEP = block base),
    /// k8s03 with the incident's six blocks and VTEP 10.1.235.133 — so 10.1.235.128, the base of
    /// its first block, is nobody's VTEP.
    pub fn incident() -> Self {
        let k8s03 = NodeSpec::new(
            "k8s03",
            &[
                "10.1.235.128/26",
                "10.1.235.192/26",
                "10.1.236.0/26",
                "10.1.236.64/26",
                "10.1.237.128/26",
                "10.1.238.0/26",
            ],
        )
        .with_vtep(Ipv4Addr::new(10, 1, 235, 133));
        LabSpec {
            profile: Profile::Calico,
            nodes: vec![
                NodeSpec::new("k8s01", &["10.1.73.0/26"]),
                NodeSpec::new("k8s02", &["10.1.140.64/26"]),
                k8s03,
            ],
            vxlan: None,
        }
    }

    /// The overlay runs this VNI and UDP port instead of the profile's.
    pub fn with_vxlan(mut self, vni: u32, port: u16) -> Self {
        self.vxlan = Some((vni, port));
        self
    }

    /// Let `node` use `ip` from another node's block (a Calico borrowed address).
    pub fn with_borrowed(mut self, node: &str, ip: Ipv4Addr) -> Self {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("with_borrowed: no node {node}"));
        n.borrowed.push(ip);
        self
    }

    /// Checks everything `Lab::build` relies on, with a message naming the culprit.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.nodes.is_empty() && self.nodes.len() <= 200,
            "a lab needs 1..=200 nodes, got {}",
            self.nodes.len()
        );
        let mut names = BTreeSet::new();
        let mut vteps = BTreeSet::new();
        let mut all_blocks: Vec<(Ipv4Net, &str)> = Vec::new();
        for n in &self.nodes {
            ensure!(
                !n.name.is_empty()
                    && n.name.len() <= 20
                    && n.name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "node name {:?}: use 1-20 characters of [a-z0-9-]",
                n.name
            );
            ensure!(names.insert(&n.name), "node {} appears twice", n.name);
            ensure!(!n.blocks.is_empty(), "node {} has no block", n.name);
            for b in &n.blocks {
                ensure!(
                    b.network() == b.addr(),
                    "node {}: block {b} is not a network address",
                    n.name
                );
                ensure!(b.prefix_len() <= 30, "node {}: block {b} too small", n.name);
                if let Some((other, owner)) = all_blocks
                    .iter()
                    .find(|(o, _)| o.contains(&b.network()) || b.contains(&o.network()))
                {
                    bail!("node {}: block {b} overlaps {other} of {owner}", n.name);
                }
                all_blocks.push((*b, &n.name));
            }
            let vtep = vtep_of(n);
            ensure!(
                n.blocks.iter().any(|b| b.contains(&vtep)),
                "node {}: VTEP {vtep} is in none of its blocks",
                n.name
            );
            ensure!(vteps.insert(vtep), "VTEP {vtep} used twice");
        }
        for n in &self.nodes {
            for ip in &n.borrowed {
                let Some((_, owner)) = all_blocks.iter().find(|(b, _)| b.contains(ip)) else {
                    bail!("node {}: borrowed {ip} is in nobody's block", n.name);
                };
                ensure!(
                    *owner != n.name,
                    "node {}: borrowed {ip} is in its own block",
                    n.name
                );
                let owner_spec = self.nodes.iter().find(|o| o.name == *owner).expect("owner");
                ensure!(
                    !pods_of(owner_spec).contains(ip) && vtep_of(owner_spec) != *ip,
                    "node {}: borrowed {ip} collides with a pod or VTEP of {owner}",
                    n.name
                );
            }
        }
        Ok(())
    }
}

/// The VTEP a node spec resolves to.
pub(crate) fn vtep_of(n: &NodeSpec) -> Ipv4Addr {
    n.vtep.unwrap_or_else(|| n.blocks[0].network())
}

/// Pod addresses of a node spec: ordinals 1.. of each block, skipping the VTEP.
pub(crate) fn pods_of(n: &NodeSpec) -> Vec<Ipv4Addr> {
    let vtep = vtep_of(n);
    n.blocks
        .iter()
        .flat_map(|b| {
            b.hosts()
                .filter(|ip| *ip != b.network() && *ip != vtep)
                .take(n.pods_per_block)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_validate() {
        LabSpec::calico(3).validate().unwrap();
        LabSpec::flannel(4).validate().unwrap();
        LabSpec::incident().validate().unwrap();
        LabSpec::calico(3)
            .with_borrowed("node2", Ipv4Addr::new(10, 1, 1, 10))
            .validate()
            .unwrap();
    }

    #[test]
    fn invalid_specs_are_named() {
        let err = LabSpec::calico(2)
            .with_borrowed("node2", Ipv4Addr::new(10, 1, 2, 9))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("its own block"), "{err}");
        let mut s = LabSpec::calico(2);
        s.nodes[1].blocks[0] = "10.1.1.0/26".parse().unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    #[test]
    fn incident_vtep_is_not_block_base() {
        let s = LabSpec::incident();
        let k8s03 = &s.nodes[2];
        assert_eq!(vtep_of(k8s03), Ipv4Addr::new(10, 1, 235, 133));
        assert_eq!(k8s03.blocks.len(), 6);
        assert_eq!(vtep_of(&s.nodes[0]), s.nodes[0].blocks[0].network());
        let pods = pods_of(k8s03);
        assert_eq!(pods.len(), 18);
        assert_eq!(pods[0], Ipv4Addr::new(10, 1, 235, 129));
    }

    #[test]
    fn felix_mac_matches_known_value() {
        // `echo -n k8s03 | sha1sum` = ad2c38a522…; Felix prefixes 0x66 to the first five bytes.
        let mac = Mac::felix("k8s03");
        assert_eq!(mac.to_string(), "66:ad:2c:38:a5:22");
        assert_eq!(mac.to_string().parse::<Mac>().unwrap(), mac);
        assert_ne!(Mac::felix("k8s01"), Mac::felix("k8s02"));
    }
}
