//! Repair passes end to end without root: Engine → findings → [`Repairer`] → the recording
//! kernel model → Engine again.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use super::*;
use crate::{
    checks::{tests::Cluster, DeviceSpec},
    config::RepairConfig,
    daemon::Engine,
    model::{Finding, MacAddr, ObservedState},
    observe::{self, RecordingWriter},
};

fn config() -> RepairConfig {
    RepairConfig {
        min_finding_age: Duration::ZERO,
        max_repairs_per_minute: 1000,
        ..RepairConfig::default()
    }
}

fn repairer(c: &Cluster, config: RepairConfig) -> Repairer {
    Repairer::new(config, vec![DeviceSpec::for_name(c.device)])
}

fn findings(c: &Cluster, observed: &ObservedState) -> Vec<Arc<Finding>> {
    let mut engine = Engine::new(&[c.device.to_string()]);
    engine.set_desired(Some(c.desired.clone()));
    engine.replace_observed(observed.clone());
    engine.evaluate(SystemTime::now()).open.to_vec()
}

fn pass<'a>(open: &'a [Arc<Finding>], c: &'a Cluster, clock: Instant) -> Pass<'a> {
    Pass {
        open,
        desired: Some(&c.desired),
        in_sync: true,
        ignore_age: false,
        dry_run: false,
        now: SystemTime::now(),
        clock,
        ledger: None,
        datastore_down: None,
    }
}

fn results(r: &PassReport) -> Vec<(&'static str, RepairResult)> {
    r.outcomes
        .iter()
        .map(|o| (o.remedy.action(), o.result))
        .collect()
}

fn incident() -> Cluster {
    let mut c = Cluster::calico();
    c.set_gateway("k8s03", "10.1.235.128");
    for r in &mut c.dev().routes {
        r.protocol = 80;
    }
    c
}

#[tokio::test]
async fn the_incident_is_applied_and_read_back_keeping_the_protocol() {
    let c = incident();
    let open = findings(&c, &c.observed);
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert_eq!(
        results(&report),
        vec![("route-replace", RepairResult::Applied); 6]
    );
    assert_eq!(report.writes, 6);
    assert!(kernel
        .written
        .iter()
        .all(|w| matches!(w, Remedy::RouteReplace { protocol: 80, .. })));
    assert!(
        findings(&c, &kernel.state).is_empty(),
        "repaired state still has findings"
    );
    // Nothing left: a second pass writes nothing.
    let again = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert!(
        again.outcomes.is_empty() && again.writes == 0,
        "{:?}",
        again.outcomes
    );
}

#[tokio::test]
async fn a_dry_run_plans_and_writes_nothing() {
    let c = incident();
    let open = findings(&c, &c.observed);
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(&c, config());
    let report = r
        .run(
            &mut kernel,
            Pass {
                dry_run: true,
                ..pass(&open, &c, Instant::now())
            },
        )
        .await;
    assert_eq!(
        results(&report),
        vec![("route-replace", RepairResult::Planned); 6]
    );
    assert!(kernel.written.is_empty());
    assert_eq!(
        report.outcomes[0].remedy.to_string(),
        "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink proto 80"
    );
}

#[tokio::test]
async fn a_finding_the_kernel_no_longer_shows_is_not_written() {
    let c = incident();
    let open = findings(&c, &c.observed);
    // Someone (Felix) fixed it between the evaluation and the repair.
    let mut kernel = RecordingWriter::new(Cluster::calico().observed);
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert!(kernel.written.is_empty(), "{:?}", kernel.written);
    assert!(report.outcomes.is_empty());
}

#[tokio::test]
async fn an_invalid_peer_or_a_stale_datastore_is_refused_with_the_reason_and_nothing_written() {
    let c = incident();
    let mut open = findings(&c, &c.observed);
    let mut invalid = Finding::new(
        crate::model::CheckId::DatastoreInvalid,
        crate::model::Severity::Warning,
        c.device,
        "Node/k8s03: blocks[1]: conflicts".into(),
    );
    invalid.peer_node = Some("k8s03".into());
    open.push(invalid.into());
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert!(kernel.written.is_empty());
    assert_eq!(
        results(&report),
        vec![("route-replace", RepairResult::Refused); 6]
    );
    assert!(
        report.outcomes[0].message.contains("k8s03"),
        "{}",
        report.outcomes[0].message
    );
    // Reported once: the same refusal on the next pass is not repeated.
    let again = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert!(again.outcomes.is_empty());

    let mut stale = findings(&c, &c.observed);
    stale.push(Arc::new(Finding::new(
        crate::model::CheckId::DatastoreStale,
        crate::model::Severity::Warning,
        c.device,
        "no contact with the API server for 11m".into(),
    )));
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&stale, &c, Instant::now())).await;
    assert!(kernel.written.is_empty());
    assert!(report
        .outcomes
        .iter()
        .all(|o| o.result == RepairResult::Refused
            && o.message == "the datastore is stale: no contact with the API server for 11m"));
    // A file source that keeps failing to load: the loop says so.
    let mut r = repairer(&c, config());
    let down = r
        .run(
            &mut kernel,
            Pass {
                datastore_down: Some("its last successful load was 11m ago (stale_after 10m)"),
                ..pass(&open[..1], &c, Instant::now())
            },
        )
        .await;
    assert!(!down.outcomes.is_empty());
    assert!(down.outcomes.iter().all(|o| o.result == RepairResult::Refused
        && o.message == "the datastore is stale: its last successful load was 11m ago (stale_after 10m)"));
    // Offline and before the first sync: nothing either.
    let mut r = repairer(&c, config());
    let offline = r
        .run(
            &mut kernel,
            Pass {
                desired: None,
                ..pass(&open[..1], &c, Instant::now())
            },
        )
        .await;
    assert!(offline
        .outcomes
        .iter()
        .all(|o| o.result == RepairResult::Refused));
    let unsynced = r
        .run(
            &mut kernel,
            Pass {
                in_sync: false,
                ..pass(&open[..1], &c, Instant::now())
            },
        )
        .await;
    assert!(unsynced
        .outcomes
        .iter()
        .all(|o| o.message.contains("first full sync")));
    assert!(kernel.written.is_empty());
}

#[tokio::test]
async fn a_young_finding_waits_and_is_retried() {
    let c = incident();
    let open = findings(&c, &c.observed);
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(
        &c,
        RepairConfig {
            min_finding_age: Duration::from_secs(1),
            ..config()
        },
    );
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    assert!(report.retry);
    assert!(kernel.written.is_empty());
    assert!(report
        .outcomes
        .iter()
        .all(|o| o.result == RepairResult::Planned && o.message.starts_with("waiting")));
    let later = Pass {
        now: SystemTime::now() + Duration::from_secs(2),
        ..pass(&open, &c, Instant::now())
    };
    let report = r.run(&mut kernel, later).await;
    assert_eq!(report.writes, 6);
}

#[tokio::test]
async fn the_node_cap_stops_a_burst_and_says_so() {
    // The incident (six writes for k8s03) and a second broken peer, k8s02, with a cap of one
    // repair a minute: the incident is one repair and is fixed whole; k8s02 waits.
    let mut c = incident();
    let k8s03 = c.peer("k8s03");
    c.set_gateway("k8s02", &k8s03.vtep_ip.to_string());
    let open = findings(&c, &c.observed);
    assert_eq!(
        open.iter().filter(|f| f.peer_node.is_some()).count(),
        2,
        "{open:#?}"
    );
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(
        &c,
        RepairConfig {
            max_repairs_per_minute: 1,
            ..config()
        },
    );
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    let refused: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.result == RepairResult::Refused)
        .collect();
    assert!(!refused.is_empty(), "{:#?}", report.outcomes);
    assert!(refused
        .iter()
        .all(|o| o.message.contains("max_repairs_per_minute (1)")));
    let applied: Vec<_> = report
        .outcomes
        .iter()
        .filter(|o| o.result == RepairResult::Applied)
        .collect();
    let peers: std::collections::BTreeSet<_> =
        applied.iter().map(|o| o.peer_node.clone()).collect();
    assert_eq!(
        peers.len(),
        1,
        "one finding's writes, all of them: {applied:#?}"
    );
    let fixed = open
        .iter()
        .find(|f| Some(&f.peer_node) == peers.iter().next())
        .unwrap();
    assert!(fixed.remedies.len() > 1, "{fixed:#?}");
    assert_eq!(applied.len(), fixed.remedies.len(), "{applied:#?}");
    assert_eq!(report.writes, fixed.remedies.len());
    assert!(report.retry);
}

/// Acknowledges every write and changes nothing.
struct Deaf(ObservedState);

impl Kernel for Deaf {
    async fn read(&mut self, _: &[String]) -> observe::Result<ObservedState> {
        Ok(self.0.clone())
    }
    async fn write(&mut self, _: &Remedy) -> observe::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn applied_only_when_the_kernel_reads_back_the_object() {
    let c = incident();
    let open = findings(&c, &c.observed);
    let mut r = repairer(&c, config());
    let report = r
        .run(
            &mut Deaf(c.observed.clone()),
            pass(&open, &c, Instant::now()),
        )
        .await;
    assert_eq!(
        results(&report),
        vec![("route-replace", RepairResult::Failed); 6]
    );
    assert!(report.outcomes[0].message.contains("read back"));
}

#[tokio::test]
async fn a_fighter_makes_the_route_contested_after_three_reverts_and_three_writes() {
    let mut c = Cluster::calico();
    let block = c.peer("k8s03").blocks[0];
    for r in c.dev().routes.iter_mut().filter(|r| r.destination == block) {
        r.gateway = Some("10.1.235.128".parse().unwrap());
    }
    let broken = c.observed.clone();
    let mut kernel = RecordingWriter::new(broken.clone());
    let mut r = repairer(&c, config());
    let t = Instant::now();
    let mut contested = None;
    let mut contested_records = 0;
    for round in 0..6u64 {
        // The fighter puts its state back; the agent sees the finding again.
        kernel.state = broken.clone();
        let open = findings(&c, &kernel.state);
        let report = r
            .run(&mut kernel, pass(&open, &c, t + Duration::from_secs(round)))
            .await;
        contested_records += report
            .outcomes
            .iter()
            .filter(|o| o.result == RepairResult::Contested)
            .count();
        if let Some(ct) = report.contested.first() {
            contested.get_or_insert((round, ct.clone()));
        }
    }
    let (round, ct) = contested.expect("never contested");
    // The contest is one record, not one per pass of the backoff.
    assert_eq!(contested_records, 1);
    let open = findings(&c, &kernel.state);
    let quiet = r
        .run(&mut kernel, pass(&open, &c, t + Duration::from_secs(7)))
        .await;
    assert!(quiet.outcomes.is_empty(), "{:?}", quiet.outcomes);
    assert_eq!(round, 3, "the third revert contests it");
    assert_eq!(
        kernel.written.len(),
        3,
        "contested_after writes, no more: {:?}",
        kernel.written
    );
    assert_eq!(ct.peer_node.as_deref(), Some("k8s03"));
    assert_eq!(r.active_contests(t + Duration::from_secs(6)).len(), 1);
    let f = report::contested_finding(&ct, crate::config::Profile::Calico, "k8s01");
    assert_eq!(f.check, crate::model::CheckId::RepairContested);
    assert_eq!(f.severity, crate::model::Severity::Critical);
    assert!(f.message.contains("Felix"), "{}", f.message);
    assert!(f.hint.as_deref().unwrap().contains("spec.nodeName=k8s01"));

    // After the backoff the object is repaired again.
    let after = t + Duration::from_secs(6) + RepairConfig::default().contested_backoff;
    let open = findings(&c, &kernel.state);
    let report = r.run(&mut kernel, pass(&open, &c, after)).await;
    assert_eq!(
        results(&report),
        vec![("route-replace", RepairResult::Applied)]
    );
    assert!(r.active_contests(after).is_empty());
}

#[tokio::test]
async fn the_ledger_annotates_open_and_cleared_findings_with_the_worst_result() {
    let c = incident();
    let mut open = findings(&c, &c.observed);
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    let link = RepairLink::default();
    // One of the six writes refused (say, the per-object gap).
    let refused = Outcome {
        result: RepairResult::Refused,
        ..report.outcomes[5].clone()
    };
    for o in report.outcomes[..5].iter().chain([&refused]) {
        link.record(o);
    }
    assert!(link.take_changed());
    assert!(!link.take_changed());
    link.annotate(open.iter_mut());
    let info = open[0].repair.clone().expect("annotated");
    // Five applied, one refused by the cap: the finding's repair is refused.
    assert_eq!(info.status, "refused");
    assert_eq!(info.action, "route-replace");

    let link = RepairLink::default();
    for o in report
        .outcomes
        .iter()
        .filter(|o| o.result == RepairResult::Applied)
    {
        link.record(o);
    }
    let mut cleared = open.clone();
    Arc::make_mut(&mut cleared[0]).repair = None;
    let released = link.settle_cleared(cleared.clone(), &[]);
    assert_eq!(released[0].repair.as_ref().unwrap().status, "applied");
    // Forgotten once released.
    let mut fresh = cleared.clone();
    link.annotate(fresh.iter_mut());
    assert_eq!(fresh[0].repair, None);

    // A write in flight holds the cleared finding back until its result is recorded.
    let link = RepairLink::default();
    let o = report
        .outcomes
        .iter()
        .find(|o| o.result == RepairResult::Applied)
        .unwrap();
    let planned = Outcome {
        result: RepairResult::Planned,
        ..o.clone()
    };
    link.begin(&planned);
    assert!(link.settle_cleared(cleared.clone(), &[]).is_empty());
    assert!(link.holding());
    link.record(o);
    let released = link.settle_cleared(vec![], &[]);
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].repair.as_ref().unwrap().status, "applied");
    assert!(!link.holding());
    // Held, then open again: never published as cleared.
    link.begin(&planned);
    assert!(link.settle_cleared(cleared.clone(), &[]).is_empty());
    assert!(link.settle_cleared(vec![], &cleared).is_empty());
    assert!(!link.holding());

    // The desired state is kept once per change.
    link.offer_desired(Some(&c.desired));
    let d1 = link.desired().unwrap();
    link.offer_desired(Some(&c.desired));
    assert!(Arc::ptr_eq(&d1, &link.desired().unwrap()));
}

#[tokio::test]
async fn neighbour_and_fdb_faults_are_repaired() {
    let mut c = Cluster::calico();
    let p = c.peer("k8s02");
    for n in c.dev().neighbours.iter_mut().filter(|n| n.ip == p.vtep_ip) {
        n.mac = Some(MacAddr([0x66, 0, 0, 0, 0, 9]));
    }
    let mac3 = c.peer("k8s03").vtep_mac;
    c.dev().fdb.retain(|e| e.mac != mac3);
    let open = findings(&c, &c.observed);
    let mut kernel = RecordingWriter::new(c.observed.clone());
    let mut r = repairer(&c, config());
    let report = r.run(&mut kernel, pass(&open, &c, Instant::now())).await;
    let mut got = results(&report);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("fdb-replace", RepairResult::Applied),
            ("neigh-replace", RepairResult::Applied)
        ]
    );
    assert!(findings(&c, &kernel.state).is_empty());
}
