//! Checks that need no datastore: every gateway of an overlay route must resolve (neighbour) to
//! a MAC that has a VXLAN destination (FDB). A gateway that is its block's network address is
//! only a suspicion — healthy Calico and flannel both use such gateways — and becomes a finding
//! only when the neighbour or FDB entry corroborates it.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;

use super::{
    lookup::{fdb_destinations, neighbour},
    DeviceSpec, Family, MAIN_TABLE,
};
use crate::model::{CheckId, Finding, ObservedDevice, RouteKind, Severity};

pub(super) fn check(spec: &DeviceSpec, dev: &ObservedDevice) -> Vec<Finding> {
    let device = spec.name.as_str();
    // Group routes by gateway: one broken gateway is one problem, however many routes use it.
    let mut by_gateway: BTreeMap<IpAddr, Vec<IpNet>> = BTreeMap::new();
    for r in &dev.routes {
        if r.table != MAIN_TABLE || r.kind != RouteKind::Unicast {
            continue;
        }
        if let Some(gw) = r.gateway {
            if Family::of(&gw) == spec.family {
                by_gateway.entry(gw).or_default().push(r.destination);
            }
        }
    }
    let mut out = Vec::new();
    for (gw, dsts) in by_gateway {
        let network_address = dsts.iter().any(|d| d.network() == gw);
        let routes: Vec<String> = dev
            .routes
            .iter()
            .filter(|r| r.gateway == Some(gw) && r.table == MAIN_TABLE)
            .map(|r| r.display(device))
            .collect();
        let neigh = neighbour(dev, &gw);
        let problem = match neigh {
            Some(n) if n.state.is_resolved() => match n.mac {
                Some(mac) if fdb_destinations(dev, &mac).is_empty() => Some((
                    CheckId::FdbMissing,
                    format!(
                        "gateway {gw} resolves to {mac} but no FDB entry sends that MAC anywhere: \
                         traffic via it is dropped"
                    ),
                )),
                _ => None,
            },
            other => {
                let state = other
                    .map(|n| n.state.name())
                    .unwrap_or_else(|| "missing".into());
                let check = if network_address {
                    CheckId::GatewayIsNetworkAddress
                } else {
                    CheckId::NeighbourUnresolved
                };
                let what = if network_address {
                    "is the network address of the block it routes and its neighbour entry is"
                } else {
                    "has neighbour entry"
                };
                Some((
                    check,
                    format!(
                        "gateway {gw} {what} {state}: {} via it {} blackholed",
                        if dsts.len() == 1 {
                            "the route".to_string()
                        } else {
                            format!("all {} routes", dsts.len())
                        },
                        if dsts.len() == 1 { "is" } else { "are" }
                    ),
                ))
            }
        };
        if let Some((check, message)) = problem {
            let mut f = Finding::new(check, Severity::Critical, device, message);
            f.route = Some(dsts[0].to_string());
            f.gateway = Some(gw);
            f.evidence.neighbour_state = Some(
                neigh
                    .map(|n| n.state.name())
                    .unwrap_or_else(|| "missing".into()),
            );
            f.evidence.neighbour_mac = neigh.and_then(|n| n.mac);
            f.evidence.routes = routes;
            if network_address {
                f.evidence
                    .details
                    .insert("gateway_is_network_address".into(), "true".into());
            }
            out.push(f);
        }
    }
    out
}
