//! What would fix a finding, as the exact kernel objects to write ([`Remedy`]). The checks emit
//! them; the human `hint` is rendered from them ([`hint`]), and a repairer hands them to a
//! `KernelWriter` unchanged — the hint a human reads is the write the agent would make.

use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::MacAddr;

/// `rtm_protocol` of a route the agent creates: `boot`, what `ip route add` uses and Calico's
/// default.
pub const PROTO_BOOT: u8 = 3;

/// One kernel write (DESIGN §8's actions), complete enough to apply without looking anything up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Remedy {
    /// `ip route replace <destination> via <gateway> dev <device> onlink`, keeping the
    /// protocol and metric of the route it replaces (so it replaces it, and Felix still owns it).
    RouteReplace {
        device: String,
        destination: IpNet,
        gateway: IpAddr,
        protocol: u8,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        metric: Option<u32>,
    },
    /// A missing block route: `ip route add <destination> via <gateway> dev <device> onlink`
    /// (protocol `boot`).
    RouteAdd {
        device: String,
        destination: IpNet,
        gateway: IpAddr,
    },
    /// A route nothing in the datastore accounts for (only with `delete_stale_routes`).
    RouteDelete {
        device: String,
        destination: IpNet,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        gateway: Option<IpAddr>,
        protocol: u8,
        #[serde(skip_serializing_if = "Option::is_none", default)]
        metric: Option<u32>,
    },
    /// `ip neigh replace <ip> lladdr <mac> dev <device> nud permanent`.
    NeighReplace {
        device: String,
        ip: IpAddr,
        mac: MacAddr,
    },
    /// `bridge fdb replace <mac> dev <device> dst <destination> self permanent`.
    FdbReplace {
        device: String,
        mac: MacAddr,
        destination: IpAddr,
    },
}

impl Remedy {
    /// The action name of DESIGN §8 (`route-replace`, …): repair metrics and status use it.
    pub fn action(&self) -> &'static str {
        match self {
            Remedy::RouteReplace { .. } => "route-replace",
            Remedy::RouteAdd { .. } => "route-add",
            Remedy::RouteDelete { .. } => "route-delete",
            Remedy::NeighReplace { .. } => "neigh-replace",
            Remedy::FdbReplace { .. } => "fdb-replace",
        }
    }

    pub fn device(&self) -> &str {
        match self {
            Remedy::RouteReplace { device, .. }
            | Remedy::RouteAdd { device, .. }
            | Remedy::RouteDelete { device, .. }
            | Remedy::NeighReplace { device, .. }
            | Remedy::FdbReplace { device, .. } => device,
        }
    }
}

/// The equivalent `ip`/`bridge` command, for a human to run or audit.
impl fmt::Display for Remedy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extras = |protocol: u8, metric: &Option<u32>| {
            let mut s = String::new();
            if protocol != PROTO_BOOT {
                s.push_str(&format!(" proto {protocol}"));
            }
            if let Some(m) = metric {
                s.push_str(&format!(" metric {m}"));
            }
            s
        };
        match self {
            Remedy::RouteReplace {
                device,
                destination,
                gateway,
                protocol,
                metric,
            } => write!(
                f,
                "ip route replace {destination} via {gateway} dev {device} onlink{}",
                extras(*protocol, metric)
            ),
            Remedy::RouteAdd {
                device,
                destination,
                gateway,
            } => write!(
                f,
                "ip route add {destination} via {gateway} dev {device} onlink"
            ),
            Remedy::RouteDelete {
                device,
                destination,
                gateway,
                protocol,
                metric,
            } => {
                write!(f, "ip route del {destination}")?;
                if let Some(gw) = gateway {
                    write!(f, " via {gw}")?;
                }
                write!(f, " dev {device}{}", extras(*protocol, metric))
            }
            Remedy::NeighReplace { device, ip, mac } => write!(
                f,
                "ip neigh replace {ip} lladdr {mac} dev {device} nud permanent"
            ),
            Remedy::FdbReplace {
                device,
                mac,
                destination,
            } => write!(
                f,
                "bridge fdb replace {mac} dev {device} dst {destination} self permanent"
            ),
        }
    }
}

/// The hint for a finding's remedies: one command, commands joined by `&&` in order, and a
/// shell loop for several routes to one gateway (as the incident's responders typed it).
pub fn hint(remedies: &[Remedy]) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < remedies.len() {
        // A run of plain route writes of one kind to one gateway on one device.
        let run = remedies[i..]
            .iter()
            .take_while(|r| same_route_batch(&remedies[i], r))
            .count();
        if run > 1 {
            let dsts: Vec<String> = remedies[i..i + run]
                .iter()
                .filter_map(route_destination)
                .map(|d| d.to_string())
                .collect();
            let template = remedies[i].to_string();
            let first = dsts[0].clone();
            parts.push(format!(
                "for r in {}; do {}; done",
                dsts.join(" "),
                template.replacen(&first, "$r", 1)
            ));
            i += run;
        } else {
            parts.push(remedies[i].to_string());
            i += 1;
        }
    }
    (!parts.is_empty()).then(|| parts.join(" && "))
}

fn route_destination(r: &Remedy) -> Option<IpNet> {
    match r {
        Remedy::RouteReplace { destination, .. }
        | Remedy::RouteAdd { destination, .. }
        | Remedy::RouteDelete { destination, .. } => Some(*destination),
        _ => None,
    }
}

/// Two route remedies that differ only in their destination.
fn same_route_batch(a: &Remedy, b: &Remedy) -> bool {
    let strip = |r: &Remedy| -> Option<Remedy> {
        let mut r = r.clone();
        match &mut r {
            Remedy::RouteReplace { destination, .. }
            | Remedy::RouteAdd { destination, .. }
            | Remedy::RouteDelete { destination, .. } => {
                *destination = IpNet::default();
                Some(r)
            }
            _ => None,
        }
    };
    matches!((strip(a), strip(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn replace(dst: &str, protocol: u8) -> Remedy {
        Remedy::RouteReplace {
            device: "vxlan.calico".into(),
            destination: net(dst),
            gateway: "10.1.235.133".parse().unwrap(),
            protocol,
            metric: None,
        }
    }

    #[test]
    fn commands_are_what_a_human_would_type() {
        assert_eq!(
            replace("10.1.235.128/26", PROTO_BOOT).to_string(),
            "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink"
        );
        // Calico's own protocol is kept, so the route stays Felix's.
        assert_eq!(
            replace("10.1.235.128/26", 80).to_string(),
            "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink proto 80"
        );
        let fdb = Remedy::FdbReplace {
            device: "vxlan.calico".into(),
            mac: "66:aa:bb:cc:dd:ee".parse().unwrap(),
            destination: "10.0.0.3".parse().unwrap(),
        };
        assert_eq!(
            fdb.to_string(),
            "bridge fdb replace 66:aa:bb:cc:dd:ee dev vxlan.calico dst 10.0.0.3 self permanent"
        );
        assert_eq!(fdb.action(), "fdb-replace");
        let del = Remedy::RouteDelete {
            device: "vxlan.calico".into(),
            destination: net("10.1.9.0/26"),
            gateway: Some("10.1.9.1".parse().unwrap()),
            protocol: PROTO_BOOT,
            metric: Some(100),
        };
        assert_eq!(
            del.to_string(),
            "ip route del 10.1.9.0/26 via 10.1.9.1 dev vxlan.calico metric 100"
        );
    }

    #[test]
    fn hints_batch_routes_to_one_gateway_and_chain_the_rest() {
        let many = [
            replace("10.1.235.128/26", PROTO_BOOT),
            replace("10.1.236.0/26", PROTO_BOOT),
        ];
        assert_eq!(
            hint(&many).unwrap(),
            "for r in 10.1.235.128/26 10.1.236.0/26; do ip route replace $r via 10.1.235.133 \
             dev vxlan.calico onlink; done"
        );
        // Different protocols are different commands.
        let mixed = [
            replace("10.1.235.128/26", PROTO_BOOT),
            replace("10.1.236.0/26", 80),
        ];
        assert_eq!(hint(&mixed).unwrap().matches(" && ").count(), 1);
        assert_eq!(hint(&[]), None);
    }

    #[test]
    fn remedies_serialize_with_their_action_name() {
        let r = replace("10.1.235.128/26", PROTO_BOOT);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["action"], "route-replace");
        assert_eq!(json["destination"], "10.1.235.128/26");
        let back: Remedy = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }
}
