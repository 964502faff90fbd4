use super::*;
use crate::model::{CheckId, Severity};

fn health(contact_ago: Option<u64>, mismatch: Option<&str>) -> ResourceHealth {
    ResourceHealth {
        last_contact: contact_ago.map(|s| SystemTime::now() - Duration::from_secs(s)),
        mismatch: mismatch.map(str::to_string),
        synced: contact_ago.is_some(),
        ..Default::default()
    }
}

fn staleness(
    h: &BTreeMap<String, ResourceHealth>,
    cfg: &KubeSourceConfig,
    started: SystemTime,
    now: SystemTime,
) -> Option<String> {
    join_causes(&stale_causes(h, cfg, started, now))
}

#[test]
fn staleness_rules() {
    let cfg = KubeSourceConfig {
        stale_after: Duration::from_secs(60),
        ..Default::default()
    };
    let now = SystemTime::now();
    let started = now - Duration::from_secs(3600);
    let mut h = BTreeMap::new();
    h.insert("nodes".to_string(), health(Some(5), None));
    assert_eq!(staleness(&h, &cfg, started, now), None);
    h.insert("ipamblocks".to_string(), health(Some(120), None));
    let r = staleness(&h, &cfg, started, now).unwrap();
    assert!(r.contains("ipamblocks: no contact"), "{r}");
    h.insert(
        "ipamblocks".to_string(),
        health(Some(1), Some("1 difference(s): k8s03 changed")),
    );
    let r = staleness(&h, &cfg, started, now).unwrap();
    assert!(r.contains("missed events"), "{r}");
    h.insert("ipamblocks".to_string(), health(None, None));
    assert!(staleness(&h, &cfg, started, now)
        .unwrap()
        .contains("no successful list"));
    assert_eq!(
        staleness(&h, &cfg, now, now),
        None,
        "not stale before stale_after"
    );
}

fn snapshot(causes: Vec<StaleCause>) -> KubeSnapshot {
    let mut desired = DesiredState {
        source: "kubernetes:https://10.0.0.1:16443".into(),
        local_node: "k8s01".into(),
        ..Default::default()
    };
    for n in ["k8s01", "k8s02", "k8s03"] {
        desired.nodes.insert(
            n.into(),
            crate::model::PeerNode {
                name: n.into(),
                node_ip: crate::model::v4(192, 168, 77, 1),
                vtep_ip: crate::model::v4(10, 1, 1, 0),
                vtep_mac: crate::model::MacAddr::default(),
                vtep_mac_derived: true,
                blocks: vec![],
                borrowed: vec![],
                ipv6: None,
            },
        );
    }
    KubeSnapshot {
        desired: Arc::new(desired),
        synced: true,
        stale: !causes.is_empty(),
        stale_reason: join_causes(&causes),
        stale_causes: causes,
        resources: BTreeMap::new(),
        relist_mismatches: 0,
        ipam_api: None,
        ended: None,
    }
}

#[test]
fn status_section_reports_ages_staleness_and_errors() {
    let now = SystemTime::now();
    let mut snap = snapshot(vec![StaleCause::NoContact {
        resource: "nodes".into(),
        silent: Duration::from_secs(700),
        last_event_age: None,
        last_bookmark_age: None,
        last_error: None,
    }]);
    snap.resources.insert(
        "nodes".into(),
        ResourceHealth {
            last_relist: Some(now - Duration::from_secs(700)),
            last_error: Some("listing nodes: API server unreachable".into()),
            ..Default::default()
        },
    );
    let st = snap.datastore_status(now);
    assert_eq!(st.source, "kubernetes:https://10.0.0.1:16443");
    assert!(st.stale);
    assert_eq!(st.nodes, 3);
    assert_eq!(st.last_event_age_seconds, Some(700.0));
    assert_eq!(st.last_relist, Some(now - Duration::from_secs(700)));
    assert_eq!(
        st.error.as_deref(),
        Some("nodes: listing nodes: API server unreachable")
    );
}

#[test]
fn fresh_snapshot_has_no_stale_finding() {
    assert!(stale_findings(&snapshot(vec![]), "vxlan.calico").is_empty());
}

#[test]
fn no_contact_finding_names_resource_ages_and_last_good_state() {
    let snap = snapshot(vec![StaleCause::NoContact {
        resource: "nodes".into(),
        silent: Duration::from_secs(663),
        last_event_age: Some(Duration::from_millis(725_400)),
        last_bookmark_age: None,
        last_error: Some("listing nodes: API server unreachable: connection refused".into()),
    }]);
    let f = stale_findings(&snap, "vxlan.calico");
    assert_eq!(f.len(), 1);
    let f = &f[0];
    assert_eq!(f.check, CheckId::DatastoreStale);
    assert_eq!(f.severity, Severity::Warning);
    assert_eq!(f.device, "vxlan.calico");
    assert_eq!(f.peer_node, None);
    assert_eq!(
        f.message,
        "datastore kubernetes:https://10.0.0.1:16443 is stale: nodes: no contact with the API \
         server for 11m 3s (last event 12m 5s ago, no last bookmark yet; last error: listing \
         nodes: API server unreachable: connection refused); checks run against the last good \
         state (3 nodes) until the API server answers again"
    );
    assert!(f.evidence.details.contains_key("nodes.no-contact"));
    assert!(f.hint.as_deref().unwrap().contains("credentials"));
}

#[test]
fn missed_events_finding_says_the_relist_found_differences() {
    let mut snap = snapshot(vec![StaleCause::MissedEvents {
        resource: "nodes".into(),
        differences: "1 difference(s): k8s03 changed".into(),
    }]);
    snap.relist_mismatches = 2;
    let f = &stale_findings(&snap, "flannel.1")[0];
    assert!(
        f.message.contains(
            "nodes: the watch missed events (relist found 1 difference(s): k8s03 changed); \
             cache replaced by the relist"
        ),
        "{}",
        f.message
    );
    assert!(
        f.message.ends_with(
            "checks run against the relisted state (3 nodes); the watch is being re-established"
        ),
        "{}",
        f.message
    );
    assert_eq!(f.evidence.details["relist_mismatches"], "2");
    assert!(f.hint.as_deref().unwrap().contains("k8s-dqlite"));
}

#[test]
fn several_causes_make_one_finding() {
    // One finding per source: the finding key (check, device, peer, route) is shared.
    let snap = snapshot(vec![
        StaleCause::NeverListed {
            resource: "ipamblocks".into(),
            waited: Duration::from_secs(600),
            last_error: None,
        },
        StaleCause::MissedEvents {
            resource: "nodes".into(),
            differences: "2 difference(s): a added, b deleted".into(),
        },
    ]);
    let f = stale_findings(&snap, "vxlan.calico");
    assert_eq!(f.len(), 1);
    assert!(
        f[0].message
            .contains("ipamblocks: no successful list in 10m"),
        "{}",
        f[0].message
    );
    assert!(f[0].message.contains("a added, b deleted"));
    assert!(
        f[0].message.contains("last good state"),
        "an unreachable resource means the data is old"
    );
    assert_eq!(
        f[0].evidence.details.len(),
        3,
        "{:?}",
        f[0].evidence.details
    );
}

#[test]
fn last_event_age_is_the_worst_resource() {
    let now = SystemTime::now();
    let mut snap = KubeSnapshot {
        desired: Arc::default(),
        synced: true,
        stale: false,
        stale_reason: None,
        stale_causes: vec![],
        resources: BTreeMap::new(),
        relist_mismatches: 0,
        ipam_api: None,
        ended: None,
    };
    snap.resources.insert(
        "a".into(),
        ResourceHealth {
            last_bookmark: Some(now - Duration::from_secs(3)),
            ..Default::default()
        },
    );
    snap.resources.insert(
        "b".into(),
        ResourceHealth {
            last_event: Some(now - Duration::from_secs(9)),
            ..Default::default()
        },
    );
    assert_eq!(snap.last_event_age(now), Some(Duration::from_secs(9)));
    snap.resources.insert("c".into(), ResourceHealth::default());
    assert_eq!(snap.last_event_age(now), None);
}
