use super::*;
use crate::{
    model::{v4, CheckId, RepairInfo},
    serve::status::{AlertRecord, DeviceStatus, PeerStatus, RepairRecord, Verdict},
};

fn t(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn healthy() -> Status {
    let mut s = Status::starting("k8s01", "alert", "calico", t(0));
    s.in_sync = true;
    s.generated_at = t(1000);
    s.uptime_seconds = 1000;
    s.datastore.source = "kubernetes".into();
    s.datastore.last_event_age_seconds = Some(3.0);
    s.datastore.nodes = 3;
    s.devices.push(DeviceStatus {
        name: "vxlan.calico".into(),
        family: Some(crate::model::Family::V4),
        present: true,
        ifindex: Some(12),
        up: true,
        vni: Some(4096),
        routes: 3,
        ..Default::default()
    });
    for (name, last) in [("k8s02", 2), ("k8s03", 3)] {
        std::sync::Arc::make_mut(&mut s.peers).push(PeerStatus {
            name: name.into(),
            vtep: v4(10, 1, last, 0),
            node_ip: Some(v4(192, 168, 77, last)),
            blocks: vec![format!("10.1.{last}.0/26").parse().unwrap()],
            verdict: Verdict::Ok,
            findings: 0,
            drops: 0,
        });
    }
    s.ebpf.attached = vec!["kfree_skb".into()];
    s
}

fn incident() -> Status {
    let mut s = healthy();
    let mut f = Finding::new(
        CheckId::GatewayWrongVtep,
        Severity::Critical,
        "vxlan.calico",
        "route to k8s03's block goes via 10.1.3.0, not k8s03's VTEP 10.1.3.5".into(),
    );
    f.peer_node = Some("k8s03".into());
    f.route = Some("10.1.3.0/26".into());
    f.gateway = Some(v4(10, 1, 3, 0));
    f.expected_gateway = Some(v4(10, 1, 3, 5));
    f.since = Some(t(700));
    f.hint = Some("ip route replace 10.1.3.0/26 via 10.1.3.5 dev vxlan.calico onlink".into());
    f.repair = Some(RepairInfo {
        action: "route-replace".into(),
        status: "planned".into(),
        command: None,
        reason: None,
    });
    let mut w = Finding::new(
        CheckId::NeighbourUnresolved,
        Severity::Warning,
        "vxlan.calico",
        "neighbour 10.1.3.0 is incomplete".into(),
    );
    w.peer_node = Some("k8s03".into());
    w.since = Some(t(710));
    s.findings = std::sync::Arc::new(vec![w.into(), f.into()]);
    let k8s03 = std::sync::Arc::make_mut(&mut s.peers)
        .iter_mut()
        .find(|p| p.name == "k8s03")
        .unwrap();
    (k8s03.verdict, k8s03.findings) = (Verdict::Critical, 2);
    s.drops.total = 1234;
    s.drops
        .by_peer
        .entry("k8s03".into())
        .or_default()
        .insert("NEIGH_FAILED".into(), 1234);
    s.repairs.push(RepairRecord {
        at: t(990),
        action: "route-replace".into(),
        result: "applied".into(),
        peer_node: Some("k8s03".into()),
        command: Some("ip route replace 10.1.3.0/26 via 10.1.3.5".into()),
        message: None,
    });
    s.alerts.sent = 1;
    s.alerts.recent.push(AlertRecord {
        at: t(705),
        sink: "webhook".into(),
        result: "sent".into(),
        check: "gateway-wrong-vtep".into(),
        severity: Severity::Critical,
        peer_node: Some("k8s03".into()),
        message: String::new(),
    });
    s
}

#[test]
fn ages_are_compact() {
    let f = |s| format_age(Duration::from_secs(s));
    assert_eq!(f(0), "0s");
    assert_eq!(f(59), "59s");
    assert_eq!(f(300), "5m");
    assert_eq!(f(3600), "1h");
    assert_eq!(f(3600 + 720), "1h12m");
    assert_eq!(f(2 * 86400 + 3 * 3600), "2d3h");
}

#[test]
fn human_view_shows_the_incident() {
    let out = render_status(&incident(), t(1002));
    assert!(out.contains("Node:        k8s01 (profile calico, mode alert)"));
    assert!(out.contains("Verdict:     CRITICAL (1 critical, 1 warning findings)"));
    assert!(out.contains("last event 5s ago"), "{out}");
    // Critical first even though listed second, with age, expected gateway and fix hint.
    let crit = out.find("gateway-wrong-vtep  peer k8s03").expect(&out);
    let warn = out.find("neighbour-unresolved").unwrap();
    assert!(crit < warn);
    assert!(out.contains("10.1.3.0/26 via 10.1.3.0 (expected 10.1.3.5)  open 5m"));
    assert!(out.contains("fix: ip route replace 10.1.3.0/26 via 10.1.3.5 dev vxlan.calico onlink"));
    assert!(out.contains("repair: route-replace planned"));
    let device_row = out
        .lines()
        .find(|l| l.contains("vxlan.calico  "))
        .expect(&out);
    assert!(device_row.contains("ipv4"), "{out}");
    // Peer table: k8s03 is critical with 2 findings.
    let peer_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("k8s03"))
        .unwrap();
    assert!(peer_line.contains("critical"), "{peer_line}");
    assert!(out.contains("k8s03  NEIGH_FAILED  1234"));
    assert!(out.contains("ALERTS (pending 0, sent 1, failed 0, dropped 0)"));
    assert!(out.contains("eBPF:        attached: kfree_skb"));
    assert!(!out.contains("drops not attributed"));
    assert!(!out.contains("WARNING: this status was generated"));
}

#[test]
fn human_view_says_when_drops_cannot_be_attributed_to_peers() {
    let mut s = incident();
    s.ebpf.peer_blocks_error = Some("300000 peer blocks exceed the map capacity 262144".into());
    let out = render_status(&s, t(1000));
    assert!(out.contains("eBPF:        attached: kfree_skb\n             drops not attributed to peers: 300000 peer blocks exceed the map capacity 262144"), "{out}");
}

#[test]
fn human_view_flags_stale_and_unsynced_and_no_ebpf() {
    let mut s = healthy();
    s.in_sync = false;
    s.ebpf.attached.clear();
    s.ebpf.error = Some("missing CAP_BPF".into());
    let out = render_status(&s, t(1100));
    assert!(out.starts_with("WARNING: this status was generated 1m ago"));
    assert!(out.contains("first full sync not complete"));
    assert!(out.contains("eBPF:        not attached: missing CAP_BPF"));
    assert!(out.contains("not counted (eBPF not attached)"));
    assert!(out.contains("Verdict:     OK"));
}

#[test]
fn check_ok() {
    let o = classify(&healthy(), t(1001), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_OK);
    assert!(
        o.line
            .starts_with("WATCHDOG OK - k8s01: 2 peers ok, datastore kubernetes fresh"),
        "{}",
        o.line
    );
    assert!(o.line.contains(
        "| findings_critical=0;;;0 findings_warning=0;;;0 peers=2;;;0 peers_failing=0;;;0 \
             datastore_age=4s;;;0 status_age=1s;;;0"
    ));
    assert_eq!(o.line.matches('|').count(), 1);
    assert!(!o.line.contains('\n'));
}

#[test]
fn check_critical_names_the_finding() {
    let o = classify(&incident(), t(1001), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_CRITICAL);
    assert!(o.line.starts_with(
            "WATCHDOG CRITICAL - k8s01: 1 critical, 1 warning findings: gateway-wrong-vtep peer k8s03 10.1.3.0/26 |"
        ), "{}", o.line);
    assert!(o
        .line
        .contains("findings_critical=1;;;0 findings_warning=1;;;0"));
    assert!(o.line.contains("drops=1234c;;;0"));
}

#[test]
fn check_warning() {
    let mut s = incident();
    std::sync::Arc::make_mut(&mut s.findings).retain(|f| f.severity == Severity::Warning);
    let o = classify(&s, t(1001), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_WARNING);
    assert!(o
            .line
            .starts_with("WATCHDOG WARNING - k8s01: 1 warning findings: neighbour-unresolved peer k8s03 vxlan.calico |"));
}

#[test]
fn check_unknown_when_stale_unsynced_or_datastore_stale() {
    let o = classify(&incident(), t(1061), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_UNKNOWN);
    assert!(o.line.contains("is stale: generated 1m ago"), "{}", o.line);

    let mut s = healthy();
    s.in_sync = false;
    assert_eq!(
        classify(&s, t(1000), Duration::from_secs(60)).code,
        NAGIOS_UNKNOWN
    );

    let mut s = healthy();
    s.datastore.stale = true;
    s.datastore.last_event_age_seconds = None;
    let o = classify(&s, t(1000), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_UNKNOWN);
    assert!(o.line.contains("datastore kubernetes is stale"));
    assert!(o.line.contains("datastore_age=U;;;0"));

    // Kernel-side critical evidence still pages with a stale datastore.
    let mut s = incident();
    s.datastore.stale = true;
    let o = classify(&s, t(1000), Duration::from_secs(60));
    assert_eq!(o.code, NAGIOS_CRITICAL);
    assert!(o.line.contains("(datastore kubernetes is stale)"));
}

#[test]
fn unreachable_is_unknown_without_perfdata() {
    let o = unreachable_outcome(
        Path::new("/run/x.sock"),
        &"No such file or directory (is dataplane-watchdog running?)",
    );
    assert_eq!(o.code, NAGIOS_UNKNOWN);
    assert_eq!(
            o.line,
            "WATCHDOG UNKNOWN - cannot reach daemon at /run/x.sock: No such file or directory (is dataplane-watchdog running?)"
        );
}

#[test]
fn pipe_in_summary_cannot_break_perfdata() {
    let mut s = incident();
    s.node = "a|b".into();
    let o = classify(&s, t(1001), Duration::from_secs(60));
    assert_eq!(o.line.matches('|').count(), 1);
}

#[test]
fn recent_repairs_show_why_one_was_not_applied() {
    let mut s = incident();
    s.repairs.insert(
        0,
        RepairRecord {
            at: t(1000),
            action: "neigh-replace".into(),
            result: "refused".into(),
            peer_node: Some("k8s02".into()),
            command: Some(
                "ip neigh replace 10.1.2.0 lladdr 66:00:00:00:00:02 dev vxlan.calico nud permanent"
                    .into(),
            ),
            message: Some("the datastore is stale: no contact for 11m".into()),
        },
    );
    let out = render_status(&s, t(1002));
    assert!(out.contains("RECENT REPAIRS (2)"), "{out}");
    let refused = out.lines().find(|l| l.contains("refused")).expect(&out);
    assert!(refused.contains("k8s02"), "{refused}");
    assert!(
        refused.ends_with("nud permanent (the datastore is stale: no contact for 11m)"),
        "{refused}"
    );
    let applied = out.lines().find(|l| l.contains("applied")).unwrap();
    assert!(
        applied.ends_with("ip route replace 10.1.3.0/26 via 10.1.3.5"),
        "{applied}"
    );
}

#[test]
fn human_view_shows_alert_sinks_and_damped_findings() {
    use crate::serve::status::{AlertSinkStatus, DampedAlert};
    let mut s = incident();
    s.alerts.pending = 2;
    s.alerts.dropped = 3;
    s.alerts.sinks.push(AlertSinkStatus {
        name: "oncall".into(),
        kind: "pagerduty".into(),
        pending: 2,
        sent: 5,
        failed: 1,
        last_error: Some("HTTP 400: invalid routing key".into()),
        last_success: Some(t(940)),
    });
    s.alerts.damped.push(DampedAlert {
        dedup_key: "dpw-x".into(),
        check: "fdb-missing".into(),
        peer_node: Some("k8s04".into()),
        until: t(1062),
    });
    let out = render_status(&s, t(1002));
    assert!(
        out.contains("ALERTS (pending 2, sent 1, failed 0, dropped 3)"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.trim_start().starts_with("oncall"))
        .unwrap_or_else(|| panic!("no sink row in {out}"));
    for cell in [
        "pagerduty",
        "2",
        "5",
        "1",
        "1m",
        "HTTP 400: invalid routing key",
    ] {
        assert!(row.contains(cell), "{cell:?} missing from {row:?}");
    }
    assert!(
        out.contains("flapping, held open: fdb-missing k8s04 (resolve in 1m"),
        "{out}"
    );
}
