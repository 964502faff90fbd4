use super::*;
use crate::model::{CheckId, Severity};

fn finding(check: CheckId, sev: Severity) -> Finding {
    Finding::new(check, sev, "vxlan.calico", String::new())
}

#[test]
fn exposition_has_contract_names_and_types() {
    let m = Metrics::new();
    m.set_findings(&crate::model::shared(&[finding(
        CheckId::GatewayWrongVtep,
        Severity::Critical,
    )]));
    m.observe_vxlan_drops_total("vxlan.calico", "NEIGH_FAILED", 10);
    m.inc_repair("route-replace", "applied");
    m.inc_alert("webhook", "sent");
    m.add_neighbour_unresolved("vxlan.calico", 1);
    m.observe_check_duration(Duration::from_micros(300));
    let out = m.encode();
    for (name, ty) in [
        ("dataplane_watchdog_findings", "gauge"),
        ("dataplane_watchdog_vxlan_drops", "counter"),
        ("dataplane_watchdog_neighbour_unresolved", "counter"),
        ("dataplane_watchdog_repairs", "counter"),
        ("dataplane_watchdog_alerts", "counter"),
        (
            "dataplane_watchdog_datastore_last_event_age_seconds",
            "gauge",
        ),
        ("dataplane_watchdog_check_duration_seconds", "histogram"),
        ("dataplane_watchdog_routes_checked", "gauge"),
        ("dataplane_watchdog_resyncs", "counter"),
        ("dataplane_watchdog_netlink_overruns", "counter"),
        ("dataplane_watchdog_peers", "gauge"),
        ("dataplane_watchdog_datastore_relist_mismatch", "counter"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(
            out.contains(&format!("# TYPE {name} {ty}\n")),
            "{name} {ty}:\n{out}"
        );
    }
    assert!(out.contains(
        "dataplane_watchdog_findings{check=\"gateway-wrong-vtep\",severity=\"critical\"} 1\n"
    ));
    assert!(out.contains(
            "dataplane_watchdog_vxlan_drops_total{device=\"vxlan.calico\",reason=\"NEIGH_FAILED\"} 10\n"
        ));
    assert!(out.contains(
        "dataplane_watchdog_repairs_total{action=\"route-replace\",result=\"applied\"} 1\n"
    ));
    assert!(out.contains("dataplane_watchdog_check_duration_seconds_count 1\n"));
    assert!(out.ends_with("# EOF\n"));
}

#[test]
fn gauges_follow_the_evaluation() {
    let m = Metrics::new();
    let mut f = finding(CheckId::RouteMissing, Severity::Critical);
    f.peer_node = Some("k8s03".into());
    m.set_findings(&crate::model::shared(&[f]));
    m.set_peer_verdicts(&crate::checks::PeerVerdicts {
        peers: 3,
        with_findings: [("k8s03".to_string(), (crate::checks::Verdict::Critical, 1))].into(),
    });
    m.set_routes_checked(12);
    m.set_datastore_last_event_age(std::time::Duration::from_millis(4500));
    let out = m.encode();
    assert!(out.contains("dataplane_watchdog_peers{verdict=\"critical\"} 1\n"));
    assert!(out.contains("dataplane_watchdog_peers{verdict=\"ok\"} 2\n"));
    assert!(out.contains("dataplane_watchdog_routes_checked 12\n"));
    assert!(out.contains("dataplane_watchdog_datastore_last_event_age_seconds 4.5\n"));
    assert!(out.contains("findings{check=\"route-missing\",severity=\"critical\"} 1\n"));
}

#[test]
fn cleared_findings_drop_to_zero() {
    let m = Metrics::new();
    m.set_findings(&crate::model::shared(&[
        finding(CheckId::FdbMissing, Severity::Warning),
        finding(CheckId::FdbMissing, Severity::Warning),
    ]));
    assert!(m
        .encode()
        .contains("findings{check=\"fdb-missing\",severity=\"warning\"} 2\n"));
    m.set_findings(&crate::model::shared(&[]));
    assert!(m
        .encode()
        .contains("findings{check=\"fdb-missing\",severity=\"warning\"} 0\n"));
}

#[test]
fn findings_about_an_overlay_carry_its_family_others_no_family_label() {
    let m = Metrics::new();
    let mut v6 = finding(CheckId::GatewayWrongVtep, Severity::Critical);
    v6.device = "vxlan-v6.calico".into();
    v6.family = Some(crate::model::Family::V6);
    let mut v4 = finding(CheckId::GatewayWrongVtep, Severity::Critical);
    v4.family = Some(crate::model::Family::V4);
    let stale = finding(CheckId::DatastoreStale, Severity::Warning);
    m.set_findings(&crate::model::shared(&[v6, v4, stale]));
    let out = m.encode();
    for line in [
        "findings{check=\"gateway-wrong-vtep\",severity=\"critical\",family=\"ipv6\"} 1\n",
        "findings{check=\"gateway-wrong-vtep\",severity=\"critical\",family=\"ipv4\"} 1\n",
        "findings{check=\"datastore-stale\",severity=\"warning\"} 1\n",
    ] {
        assert!(out.contains(line), "{line}{out}");
    }
}

#[test]
fn absolute_readings_become_monotonic_increments() {
    let m = Metrics::new();
    let line = |n: u64| format!("vxlan_drops_total{{device=\"d\",reason=\"r\"}} {n}\n");
    m.observe_vxlan_drops_total("d", "r", 5);
    m.observe_vxlan_drops_total("d", "r", 8);
    assert!(m.encode().contains(&line(8)));
    // Source restarted at 2: the counter keeps rising.
    m.observe_vxlan_drops_total("d", "r", 2);
    assert!(m.encode().contains(&line(10)));
}

#[test]
fn reasons_past_the_cap_stay_exact_and_monotonic() {
    let m = Metrics::new();
    let reasons = MAX_LABEL_VALUES + 3;
    let other = |m: &Metrics| -> u64 {
        m.encode()
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "dataplane_watchdog_vxlan_drops_total{device=\"vxlan.calico\",reason=\"other\"} ",
                    )
                })
                .map(|v| v.parse().unwrap())
                .unwrap_or(0)
    };
    // Every second the daemon re-reads the same absolute totals: nothing new happened.
    for _ in 0..3 {
        for i in 0..reasons {
            m.observe_vxlan_drops_total("vxlan.calico", &format!("R{i}"), 10 + i as u64);
        }
    }
    let expected: u64 = (MAX_LABEL_VALUES..reasons).map(|i| 10 + i as u64).sum();
    assert_eq!(other(&m), expected, "folded reasons counted once each");
    // One folded reason rises by 5: `other` rises by exactly 5.
    m.observe_vxlan_drops_total(
        "vxlan.calico",
        &format!("R{}", reasons - 1),
        15 + reasons as u64 - 1,
    );
    assert_eq!(other(&m), expected + 5);
    // Many reasons do not push a device into `other` (per-kind caps).
    m.add_neighbour_unresolved("vxlan.calico", 1);
    assert!(m
        .encode()
        .contains("neighbour_unresolved_total{device=\"vxlan.calico\"} 1\n"));
}

#[test]
fn resync_reasons_are_the_ones_emitted() {
    let names: Vec<&str> = [
        crate::daemon::ResyncReason::Startup,
        crate::daemon::ResyncReason::Periodic,
        crate::daemon::ResyncReason::Overrun,
        crate::daemon::ResyncReason::Kernel,
    ]
    .iter()
    .map(|r| r.as_str())
    .collect();
    assert_eq!(names, RESYNC_REASONS);
}

#[test]
fn peer_labels_are_capped() {
    let m = Metrics::new();
    for i in 0..(MAX_PEER_LABELS + 10) {
        m.observe_peer_drops_total("vxlan.calico", &format!("node{i}"), 1);
    }
    let out = m.encode();
    let series = out
        .lines()
        .filter(|l| l.starts_with("dataplane_watchdog_peer_drops_total{"))
        .count();
    assert_eq!(series, MAX_PEER_LABELS + 1);
    assert!(out.contains("peer=\"other\"} 10\n"), "{out}");
}

#[test]
fn peer_churn_keeps_the_tracker_flat_and_the_counters_exact() {
    let m = Metrics::new();
    let total = |m: &Metrics, peer: &str| -> u64 {
        let out = m.encode();
        let prefix = format!(
            "dataplane_watchdog_peer_drops_total{{device=\"vxlan.calico\",peer=\"{peer}\"}} "
        );
        out.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map_or(0, |v| v.parse().unwrap())
    };
    // k8s03 keeps dropping while thousands of other nodes come and go, each with drops.
    for round in 0..5000u64 {
        let totals = BTreeMap::from([
            ("k8s03".to_string(), round + 1),
            (format!("node-{round}"), 3),
        ]);
        m.observe_peer_drops_totals("vxlan.calico", &totals);
    }
    assert!(m.peer_drops_tracked() <= 2, "{}", m.peer_drops_tracked());
    assert_eq!(total(&m, "k8s03"), 5000, "exact across churn");
    // A node leaves (harvested) and a node of the same name joins with fresh counters.
    m.observe_peer_drops_totals("vxlan.calico", &BTreeMap::new());
    m.observe_peer_drops_totals("vxlan.calico", &BTreeMap::from([("k8s03".into(), 2)]));
    assert_eq!(
        total(&m, "k8s03"),
        5002,
        "a re-joined node adds its new counts"
    );
}

#[test]
fn alert_metrics_have_the_contract_names() {
    let m = Metrics::new();
    m.inc_alert("oncall", "sent");
    m.inc_alert("oncall", "failed");
    m.set_alerts_pending("oncall", 3);
    m.observe_alert_delivery("oncall", 0.25);
    m.inc_alerts_dropped(2);
    let out = m.encode();
    for line in [
        "# TYPE dataplane_watchdog_alert_delivery_seconds histogram\n",
        "# TYPE dataplane_watchdog_alerts_pending gauge\n",
        "# TYPE dataplane_watchdog_alerts_dropped counter\n",
        "dataplane_watchdog_alerts_total{sink=\"oncall\",result=\"sent\"} 1\n",
        "dataplane_watchdog_alerts_total{sink=\"oncall\",result=\"failed\"} 1\n",
        "dataplane_watchdog_alerts_pending{sink=\"oncall\"} 3\n",
        "dataplane_watchdog_alert_delivery_seconds_count{sink=\"oncall\"} 1\n",
        "dataplane_watchdog_alerts_dropped_total 2\n",
    ] {
        assert!(out.contains(line), "{line:?} missing:\n{out}");
    }
}
