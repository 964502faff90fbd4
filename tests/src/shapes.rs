//! Healthy shapes of real clusters that the basic lab does not have (DESIGN §1b), applied to
//! a running lab the way Felix or flanneld programs them. Every shape keeps traffic flowing;
//! the agent must find nothing wrong with any of them, through either datastore.

use anyhow::Result;

use crate::lab::{Lab, UNDERLAY_IF};

impl Lab {
    /// Calico 3.30–3.31: a gateway-less host route `V/32 dev <overlay> scope link` on every
    /// node to every remote VTEP.
    pub fn add_vtep_host_routes(&self) -> Result<()> {
        let dev = self.device();
        let nodes = self.nodes().to_vec();
        for n in &nodes {
            for p in nodes.iter().filter(|p| p.name != n.name) {
                let vtep = format!("{}/32", p.vtep_ip);
                self.ip(
                    &n.name,
                    &["route", "replace", &vtep, "dev", dev, "scope", "link"],
                )?;
            }
        }
        Ok(())
    }

    /// flannel DirectRouting / Calico CrossSubnet toward a same-subnet peer: `from` routes
    /// `to`'s blocks straight to its node address on the underlay and keeps no ARP, FDB or
    /// host route for `to`'s VTEP.
    pub fn route_directly(&self, from: &str, to: &str) -> Result<()> {
        let dev = self.device();
        let peer = self.node(to).clone();
        let via = peer.node_ip.to_string();
        for b in &peer.blocks {
            let b = b.to_string();
            self.ip(
                from,
                &["route", "replace", &b, "via", &via, "dev", UNDERLAY_IF],
            )?;
        }
        // The host route may not exist (only Calico 3.30+ programs it).
        let _ = self.ip(
            from,
            &["route", "del", &format!("{}/32", peer.vtep_ip), "dev", dev],
        );
        self.ip(
            from,
            &["neigh", "del", &peer.vtep_ip.to_string(), "dev", dev],
        )?;
        self.bridge(
            from,
            &["fdb", "del", &peer.vtep_mac.to_string(), "dev", dev],
        )?;
        Ok(())
    }
}
