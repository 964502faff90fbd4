//! Does the kernel hold what a remedy writes? Pure, on a fresh [`ObservedState`]: the read
//! back after a write says `applied` only when it does.

use crate::{
    checks::MAIN_TABLE,
    model::{ObservedState, Remedy, RouteKind},
};

/// True when `observed` has exactly the object `remedy` writes (for a delete: no longer has
/// the route).
pub fn holds(observed: &ObservedState, remedy: &Remedy) -> bool {
    let Some(dev) = observed.devices.get(remedy.device()) else {
        return false;
    };
    let route_is = |destination: &ipnet::IpNet,
                    gateway: &std::net::IpAddr,
                    protocol: u8,
                    metric: &Option<u32>| {
        dev.routes.iter().any(|r| {
            r.destination == *destination
                && r.table == MAIN_TABLE
                && r.kind == RouteKind::Unicast
                && r.gateway == Some(*gateway)
                && r.onlink
                && r.protocol == protocol
                && r.metric == *metric
        })
    };
    match remedy {
        Remedy::RouteReplace {
            destination,
            gateway,
            protocol,
            metric,
            ..
        } => route_is(destination, gateway, *protocol, metric),
        Remedy::RouteAdd {
            destination,
            gateway,
            ..
        } => route_is(destination, gateway, crate::model::PROTO_BOOT, &None),
        Remedy::RouteDelete {
            destination,
            metric,
            ..
        } => !dev.routes.iter().any(|r| {
            r.destination == *destination
                && r.table == MAIN_TABLE
                && r.kind == RouteKind::Unicast
                && r.metric == *metric
        }),
        Remedy::NeighReplace { ip, mac, .. } => dev
            .neighbours
            .iter()
            .any(|n| n.ip == *ip && n.mac == Some(*mac) && n.state.is_permanent()),
        Remedy::FdbReplace {
            mac, destination, ..
        } => dev
            .fdb
            .iter()
            .any(|e| e.mac == *mac && e.destination == Some(*destination) && e.permanent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        checks::tests::Cluster,
        model::{MacAddr, Remedy},
        observe::apply_to_model,
    };

    #[test]
    fn a_remedy_holds_after_the_model_applied_it_and_not_before() {
        let c = Cluster::calico();
        let p = c.peer("k8s03");
        let dev = c.device.to_string();
        let remedies = [
            Remedy::RouteReplace {
                device: dev.clone(),
                destination: p.blocks[0],
                gateway: "10.1.235.1".parse().unwrap(),
                protocol: 80,
                metric: None,
            },
            Remedy::NeighReplace {
                device: dev.clone(),
                ip: p.vtep_ip,
                mac: MacAddr([0x66, 0, 0, 0, 0, 1]),
            },
            Remedy::FdbReplace {
                device: dev.clone(),
                mac: p.vtep_mac,
                destination: "192.168.77.99".parse().unwrap(),
            },
        ];
        for r in remedies {
            let mut o = c.observed.clone();
            assert!(!holds(&o, &r), "{r} held before");
            apply_to_model(&mut o, &r).unwrap();
            assert!(holds(&o, &r), "{r} not held after");
        }
        // Every healthy object of the fixture holds as its own remedy would write it.
        let healthy = Remedy::NeighReplace {
            device: dev.clone(),
            ip: p.vtep_ip,
            mac: p.vtep_mac,
        };
        assert!(holds(&c.observed, &healthy));
        let other_device = Remedy::NeighReplace {
            device: "flannel.1".into(),
            ip: p.vtep_ip,
            mac: p.vtep_mac,
        };
        assert!(!holds(&c.observed, &other_device));
    }
}
