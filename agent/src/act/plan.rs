//! The repair plan: which kernel writes would fix the open findings. Pure; the guard rails of
//! repair mode (DESIGN §8) decide later which of them may run.

use std::sync::Arc;

use crate::{
    model::{Finding, Remedy},
    observe::KernelWriter,
};

/// Each finding's remedies in order, a write that two findings share only once.
pub fn repair_plan(open: &[Arc<Finding>]) -> Vec<Remedy> {
    let mut seen = std::collections::HashSet::new();
    open.iter()
        .flat_map(|f| &f.remedies)
        .filter(|r| seen.insert(*r))
        .cloned()
        .collect()
}

/// One write of a plan and how it went.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub remedy: Remedy,
    pub result: Result<(), String>,
}

/// Writes the plan in order; a failed write is recorded and the rest still run (they fix
/// other objects).
pub async fn apply_plan<W: KernelWriter>(writer: &mut W, plan: &[Remedy]) -> Vec<Applied> {
    let mut out = Vec::with_capacity(plan.len());
    for remedy in plan {
        let result = writer.write(remedy).await.map_err(|e| e.to_string());
        out.push(Applied {
            remedy: remedy.clone(),
            result,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        checks::tests::{ip, net, route, Cluster},
        daemon::Engine,
        model::{CheckId, MacAddr},
        observe::RecordingWriter,
    };

    /// Engine → findings → plan → recording writer → engine again: the writes fix exactly what
    /// was found, and nothing is left.
    async fn repaired(c: Cluster) -> (Vec<CheckId>, Vec<Remedy>) {
        let devices = [c.device.to_string()];
        repaired_on(&devices, c).await
    }

    async fn repaired_on(devices: &[String], c: Cluster) -> (Vec<CheckId>, Vec<Remedy>) {
        let mut engine = Engine::new(devices);
        engine.set_desired(Some(c.desired.clone()));
        engine.replace_observed(c.observed.clone());
        let found = engine.evaluate(SystemTime::now()).open.to_vec();
        let plan = repair_plan(&found);
        let mut writer = RecordingWriter::new(c.observed.clone());
        let applied = apply_plan(&mut writer, &plan).await;
        assert!(applied.iter().all(|a| a.result.is_ok()), "{applied:#?}");
        engine.replace_observed(writer.state.clone());
        let left = engine.evaluate(SystemTime::now()).open.to_vec();
        assert!(
            left.is_empty(),
            "left after repair: {left:#?}\nplan: {plan:#?}"
        );
        assert_eq!(writer.written, plan, "the writer saw the plan, in order");
        (found.iter().map(|f| f.check).collect(), plan)
    }

    #[tokio::test]
    async fn the_incident_is_repaired_by_six_route_replaces_keeping_the_protocol() {
        let mut c = Cluster::calico();
        c.set_gateway("k8s03", "10.1.235.128");
        for r in &mut c.dev().routes {
            r.protocol = 80;
        }
        let (found, plan) = repaired(c).await;
        assert_eq!(found, vec![CheckId::GatewayWrongVtep]);
        assert_eq!(plan.len(), 6);
        assert!(plan.iter().all(|r| matches!(
            r,
            Remedy::RouteReplace { gateway, protocol: 80, .. } if *gateway == ip("10.1.235.133")
        )));
    }

    #[tokio::test]
    async fn every_repairable_fault_is_fixed_by_its_plan() {
        type Fault = (&'static str, Box<dyn Fn(&mut Cluster)>);
        let faults: Vec<Fault> = vec![
            (
                "routes removed",
                Box::new(|c| {
                    let blocks = c.peer("k8s03").blocks;
                    c.dev().routes.retain(|r| !blocks.contains(&r.destination));
                }),
            ),
            (
                "neighbour with a wrong MAC",
                Box::new(|c| {
                    let vtep = c.peer("k8s02").vtep_ip;
                    let n = c
                        .dev()
                        .neighbours
                        .iter_mut()
                        .find(|n| n.ip == vtep)
                        .unwrap();
                    n.mac = Some(MacAddr([0x66, 0, 0, 0, 0, 9]));
                }),
            ),
            (
                "neighbour removed",
                Box::new(|c| {
                    let vtep = c.peer("k8s02").vtep_ip;
                    c.dev().neighbours.retain(|n| n.ip != vtep);
                }),
            ),
            (
                "FDB removed",
                Box::new(|c| {
                    let mac = c.peer("k8s03").vtep_mac;
                    c.dev().fdb.retain(|e| e.mac != mac);
                }),
            ),
            (
                "FDB to the wrong node",
                Box::new(|c| {
                    let mac = c.peer("k8s03").vtep_mac;
                    for e in c.dev().fdb.iter_mut().filter(|e| e.mac == mac) {
                        e.destination = Some(ip("192.168.77.99"));
                    }
                }),
            ),
            (
                "neighbour and FDB both on an old MAC",
                Box::new(|c| {
                    // The datastore publishes the MAC (a derived one would be accepted).
                    c.desired.nodes.get_mut("k8s03").unwrap().vtep_mac_derived = false;
                    let p = c.peer("k8s03");
                    let old = MacAddr([0x66, 0, 0, 0, 0, 7]);
                    for n in c.dev().neighbours.iter_mut().filter(|n| n.ip == p.vtep_ip) {
                        n.mac = Some(old);
                    }
                    for e in c.dev().fdb.iter_mut().filter(|e| e.mac == p.vtep_mac) {
                        e.mac = old;
                    }
                }),
            ),
            (
                "a more specific route inside a peer's block",
                Box::new(|c| {
                    let stray = route(&net("10.1.236.8/29"), Some(ip("10.1.20.0")));
                    c.dev().routes.push(stray);
                }),
            ),
            (
                "a route to a block nobody owns",
                Box::new(|c| {
                    let stray = route(&net("10.1.99.0/26"), Some(ip("10.1.99.0")));
                    c.dev().routes.push(stray);
                }),
            ),
        ];
        for (what, break_it) in faults {
            let mut c = Cluster::calico();
            break_it(&mut c);
            let (found, plan) = repaired(c).await;
            assert!(
                !found.is_empty() && !plan.is_empty(),
                "{what}: nothing found"
            );
        }
    }

    #[tokio::test]
    async fn the_incident_on_the_v6_overlay_is_repaired_there_with_v6_routes() {
        use crate::checks::tests_dual_stack::{dual_stack, V4, V6};
        let mut c = dual_stack();
        let k8s03 = c.desired.nodes["k8s03"].ipv6.clone().unwrap();
        let wrong = c.desired.nodes["k8s02"].ipv6.clone().unwrap().vtep_ip;
        let blocks = c.desired.ipv6().nodes["k8s03"].blocks.clone();
        for r in &mut c.observed.devices.get_mut(V6).unwrap().routes {
            if blocks.contains(&r.destination) {
                r.gateway = Some(wrong);
            }
        }
        let (found, plan) = repaired_on(&[V4.to_string(), V6.to_string()], c).await;
        assert_eq!(found, vec![CheckId::GatewayWrongVtep]);
        assert_eq!(plan.len(), blocks.len());
        assert!(
            plan.iter().all(|r| matches!(
                r,
                Remedy::RouteReplace { device, gateway, destination, .. }
                    if device == V6 && *gateway == k8s03.vtep_ip && destination.addr().is_ipv6()
            )),
            "{plan:#?}"
        );
    }

    #[test]
    fn a_write_two_findings_share_is_planned_once() {
        let mut a = Finding::new(
            CheckId::FdbMissing,
            crate::model::Severity::Critical,
            "d",
            String::new(),
        );
        let r = Remedy::FdbReplace {
            device: "d".into(),
            mac: MacAddr([0x66, 1, 2, 3, 4, 5]),
            destination: ip("192.168.77.3"),
        };
        a.set_remedies(vec![r.clone()]);
        let b = a.clone();
        assert_eq!(repair_plan(&[a.into(), b.into()]), vec![r]);
    }
}
