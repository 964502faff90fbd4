//! The guard rails of DESIGN §8, pure: may this remedy of this finding be written now?
//! Every refusal carries its reason, as a sentence for the audit trail.
//!
//! Two halves, like the repair itself: [`Guard::check`] judges the finding against the node's
//! situation (sync, datastore, peer, device, allow-list, age) and never changes state;
//! [`Guard::admit`] takes a write from the per-object and node-wide budgets.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::{RepairConfig, RepairKind},
    model::{CheckId, Finding, ObservedState, Remedy, RouteKind},
};

use super::ObjectKey;

/// The node-wide cap counts writes in this sliding window.
pub const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One object is written at most once per this long, whatever the findings say: a fight with
/// another writer must never become a tight loop.
pub const PER_OBJECT_GAP: Duration = Duration::from_millis(500);

/// What the guard knows about the node when it judges.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// The first full sync is done (kernel dumped, datastore loaded).
    pub in_sync: bool,
    /// No datastore: nothing is known to be right (offline checks only).
    pub offline: bool,
    /// Why the datastore cannot be trusted to be current (`datastore-stale` open), if so.
    pub datastore_stale: Option<&'a str>,
    /// Peers whose datastore entry is invalid, ambiguous or conflicting (`datastore-invalid`).
    pub invalid_peers: &'a BTreeSet<String>,
    /// The configured overlay devices.
    pub devices: &'a [String],
    /// `watchdog scan --repair`: the finding was seen once, so its age means nothing.
    pub ignore_age: bool,
    pub now: SystemTime,
}

impl<'a> Situation<'a> {
    /// Datastore staleness and invalid peers from the open findings themselves.
    pub fn datastore_from(open: &'a [Arc<Finding>]) -> (Option<&'a str>, BTreeSet<String>) {
        let stale = open
            .iter()
            .find(|f| f.check == CheckId::DatastoreStale)
            .map(|f| f.message.as_str());
        let invalid = open
            .iter()
            .filter(|f| f.check == CheckId::DatastoreInvalid)
            .filter_map(|f| f.peer_node.clone())
            .collect();
        (stale, invalid)
    }
}

/// Why a write was refused. `Display` is the sentence recorded; [`Refusal::code`] a stable
/// token for dedup and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotInSync,
    Offline,
    DatastoreStale(String),
    PeerInvalid(String),
    HeuristicOnly(CheckId),
    NotOverlayDevice(String),
    ActionNotAllowed(&'static str),
    DeleteNotAllowed,
    TooYoung {
        age: Duration,
        min: Duration,
    },
    /// The object now in the kernel is not an overlay route (deviceless reject route, another
    /// device, another table): the agent does not touch it.
    NotOverlayObject(String),
    ObjectRateLimited,
    NodeRateLimited(u32),
    Contested {
        backoff_left: Duration,
    },
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotInSync => "not-in-sync",
            Refusal::Offline => "offline",
            Refusal::DatastoreStale(_) => "datastore-stale",
            Refusal::PeerInvalid(_) => "peer-invalid",
            Refusal::HeuristicOnly(_) => "heuristic-only",
            Refusal::NotOverlayDevice(_) => "not-overlay-device",
            Refusal::ActionNotAllowed(_) => "action-not-allowed",
            Refusal::DeleteNotAllowed => "delete-not-allowed",
            Refusal::TooYoung { .. } => "too-young",
            Refusal::NotOverlayObject(_) => "not-overlay-object",
            Refusal::ObjectRateLimited => "object-rate-limited",
            Refusal::NodeRateLimited(_) => "node-rate-limited",
            Refusal::Contested { .. } => "contested",
        }
    }

    /// Refusals that pass by themselves (age, budgets): retried without a new evaluation.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Refusal::TooYoung { .. } | Refusal::ObjectRateLimited | Refusal::NodeRateLimited(_)
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d =
            |d: &Duration| humantime::format_duration(Duration::from_millis(d.as_millis() as u64));
        match self {
            Refusal::NotInSync => write!(f, "the first full sync is not done yet"),
            Refusal::Offline => write!(
                f,
                "no datastore (offline checks only): nothing says what the right object is"
            ),
            Refusal::DatastoreStale(why) => write!(f, "the datastore is stale: {why}"),
            Refusal::PeerInvalid(peer) => write!(
                f,
                "the datastore entry of {peer} is invalid or ambiguous (datastore-invalid)"
            ),
            Refusal::HeuristicOnly(check) => {
                write!(f, "{check} is a heuristic finding, not a verdict")
            }
            Refusal::NotOverlayDevice(dev) => {
                write!(f, "{dev} is not a configured overlay device")
            }
            Refusal::ActionNotAllowed(kind) => {
                write!(f, "{kind} repairs are not in [repair] actions")
            }
            Refusal::DeleteNotAllowed => {
                write!(f, "route-delete needs [repair] delete_stale_routes = true")
            }
            Refusal::TooYoung { age, min } => write!(
                f,
                "the finding is {} old, younger than min_finding_age ({})",
                d(age),
                d(min)
            ),
            Refusal::NotOverlayObject(what) => {
                write!(f, "{what}: not an overlay route, not touched")
            }
            Refusal::ObjectRateLimited => write!(
                f,
                "this object was written less than {} ago",
                d(&PER_OBJECT_GAP)
            ),
            Refusal::NodeRateLimited(cap) => {
                write!(f, "max_repairs_per_minute ({cap}) reached on this node")
            }
            Refusal::Contested { backoff_left } => write!(
                f,
                "contested: something keeps undoing this repair; left alone for another {}",
                d(backoff_left)
            ),
        }
    }
}

/// The `[repair] actions` kind of a remedy.
pub fn kind_of(remedy: &Remedy) -> RepairKind {
    match remedy {
        Remedy::RouteReplace { .. } | Remedy::RouteAdd { .. } | Remedy::RouteDelete { .. } => {
            RepairKind::Route
        }
        Remedy::NeighReplace { .. } => RepairKind::Neighbour,
        Remedy::FdbReplace { .. } => RepairKind::Fdb,
    }
}

/// Checks whose findings are suspicions, never repaired.
fn heuristic_only(check: CheckId) -> bool {
    matches!(
        check,
        CheckId::GatewayIsNetworkAddress | CheckId::DropsUnexplained | CheckId::TrafficBlackholed
    )
}

/// The guard rails and the budgets they keep.
#[derive(Debug)]
pub struct Guard {
    config: RepairConfig,
    /// Writes in the last [`RATE_WINDOW`], oldest first.
    /// Repairs in the last minute: when, and of which finding (a finding whose remedy takes
    /// several writes, six block routes of one peer, is one repair).
    recent: VecDeque<(Instant, String)>,
    /// Last write per object.
    last_write: BTreeMap<ObjectKey, Instant>,
}

impl Guard {
    pub fn new(config: RepairConfig) -> Self {
        Guard {
            config,
            recent: VecDeque::new(),
            last_write: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &RepairConfig {
        &self.config
    }

    /// The finding-level rails, in the order of DESIGN §8. Changes nothing.
    pub fn check(
        &self,
        s: &Situation<'_>,
        finding: &Finding,
        remedy: &Remedy,
    ) -> Result<(), Refusal> {
        if !s.in_sync {
            return Err(Refusal::NotInSync);
        }
        if s.offline {
            return Err(Refusal::Offline);
        }
        if let Some(why) = s.datastore_stale {
            return Err(Refusal::DatastoreStale(why.to_string()));
        }
        if let Some(peer) = finding
            .peer_node
            .as_ref()
            .filter(|p| s.invalid_peers.contains(*p))
        {
            return Err(Refusal::PeerInvalid(peer.clone()));
        }
        if heuristic_only(finding.check) {
            return Err(Refusal::HeuristicOnly(finding.check));
        }
        if !s.devices.iter().any(|d| d == remedy.device()) || finding.device != remedy.device() {
            return Err(Refusal::NotOverlayDevice(remedy.device().to_string()));
        }
        if finding.check == CheckId::RouteWrongDevice {
            // The route to replace is on another device (tunl0, the underlay).
            return Err(Refusal::NotOverlayObject(format!(
                "{} is routed via another device",
                finding.route.as_deref().unwrap_or("the route")
            )));
        }
        let kind = kind_of(remedy);
        if !self.config.actions.contains(&kind) {
            return Err(Refusal::ActionNotAllowed(kind.as_str()));
        }
        if matches!(remedy, Remedy::RouteDelete { .. }) && !self.config.delete_stale_routes {
            return Err(Refusal::DeleteNotAllowed);
        }
        if !s.ignore_age {
            let age = finding
                .since
                .and_then(|since| s.now.duration_since(since).ok())
                .unwrap_or_default();
            if age < self.config.min_finding_age {
                return Err(Refusal::TooYoung {
                    age,
                    min: self.config.min_finding_age,
                });
            }
        }
        Ok(())
    }

    /// Takes one write of `object`, for `finding`, from the budgets, or says which one is
    /// exhausted. The node-wide budget counts repairs (findings), not writes: fixing the
    /// incident's six routes to one peer is one repair.
    pub fn admit(
        &mut self,
        object: &ObjectKey,
        finding: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= RATE_WINDOW)
        {
            self.recent.pop_front();
        }
        if let Some(last) = self.last_write.get(object) {
            if now.saturating_duration_since(*last) < PER_OBJECT_GAP {
                return Err(Refusal::ObjectRateLimited);
            }
        }
        if !self.recent.iter().any(|(_, f)| f == finding) {
            let cap = self.config.max_repairs_per_minute;
            if self.recent.len() >= cap as usize {
                return Err(Refusal::NodeRateLimited(cap));
            }
            self.recent.push_back((now, finding.to_string()));
        }
        self.last_write.insert(object.clone(), now);
        self.last_write
            .retain(|_, t| now.saturating_duration_since(*t) < RATE_WINDOW);
        Ok(())
    }
}

/// The kernel object a route remedy would replace must be an overlay route: a unicast route
/// on the overlay device in the main table, or none at all. A deviceless reject route, a
/// route via another device or in another table with that destination is left alone.
pub fn touches_only_overlay(observed: &ObservedState, remedy: &Remedy) -> Result<(), Refusal> {
    let destination = match remedy {
        Remedy::RouteReplace { destination, .. }
        | Remedy::RouteAdd { destination, .. }
        | Remedy::RouteDelete { destination, .. } => destination,
        Remedy::NeighReplace { .. } | Remedy::FdbReplace { .. } => return Ok(()),
    };
    if observed.direct_routes.contains_key(destination) {
        return Err(Refusal::NotOverlayObject(format!(
            "{destination} is routed via a non-overlay device"
        )));
    }
    let Some(dev) = observed.devices.get(remedy.device()) else {
        return Ok(()); // The write fails with "no such device", recorded as failed.
    };
    for r in dev.routes.iter().filter(|r| r.destination == *destination) {
        if r.kind != RouteKind::Unicast {
            return Err(Refusal::NotOverlayObject(format!(
                "{destination} is a {:?} route",
                r.kind
            )));
        }
        if r.table != crate::checks::MAIN_TABLE {
            return Err(Refusal::NotOverlayObject(format!(
                "{destination} is in table {} (the agent writes only the main table)",
                r.table
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ObservedDevice, Route, Severity};

    const DEV: &str = "vxlan.calico";

    fn finding(check: CheckId) -> Finding {
        let mut f = Finding::new(check, Severity::Critical, DEV, "m".into());
        f.peer_node = Some("k8s03".into());
        f.since = Some(t0());
        f
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn replace() -> Remedy {
        Remedy::RouteReplace {
            device: DEV.into(),
            destination: "10.1.235.128/26".parse().unwrap(),
            gateway: "10.1.235.133".parse().unwrap(),
            protocol: 3,
            metric: None,
        }
    }

    fn healthy<'a>(devices: &'a [String], invalid: &'a BTreeSet<String>) -> Situation<'a> {
        Situation {
            in_sync: true,
            offline: false,
            datastore_stale: None,
            invalid_peers: invalid,
            devices,
            ignore_age: false,
            now: t0() + Duration::from_secs(5),
        }
    }

    #[test]
    fn each_rail_refuses_with_its_reason() {
        let devices = vec![DEV.to_string()];
        let none = BTreeSet::new();
        let k8s03 = BTreeSet::from(["k8s03".to_string()]);
        let g = Guard::new(RepairConfig::default());
        let f = finding(CheckId::GatewayWrongVtep);
        assert_eq!(g.check(&healthy(&devices, &none), &f, &replace()), Ok(()));

        type Case<'a> = (&'static str, Situation<'a>, Finding, Remedy);
        let base = healthy(&devices, &none);
        let other_dev = vec!["flannel.1".to_string()];
        let cases: Vec<Case> = vec![
            (
                "not-in-sync",
                Situation {
                    in_sync: false,
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "offline",
                Situation {
                    offline: true,
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "datastore-stale",
                Situation {
                    datastore_stale: Some("no contact for 45s"),
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "peer-invalid",
                Situation {
                    invalid_peers: &k8s03,
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "heuristic-only",
                base,
                finding(CheckId::GatewayIsNetworkAddress),
                replace(),
            ),
            (
                "not-overlay-device",
                Situation {
                    devices: &other_dev,
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "not-overlay-object",
                base,
                finding(CheckId::RouteWrongDevice),
                replace(),
            ),
            (
                "too-young",
                Situation {
                    now: t0() + Duration::from_millis(300),
                    ..base
                },
                f.clone(),
                replace(),
            ),
            (
                "delete-not-allowed",
                base,
                finding(CheckId::RouteStale),
                Remedy::RouteDelete {
                    device: DEV.into(),
                    destination: "10.1.99.0/26".parse().unwrap(),
                    gateway: None,
                    protocol: 3,
                    metric: None,
                },
            ),
        ];
        for (code, s, f, r) in cases {
            let refused = g.check(&s, &f, &r).expect_err(code);
            assert_eq!(refused.code(), code, "{refused}");
            assert!(!refused.to_string().is_empty());
        }
        let stale = g
            .check(
                &Situation {
                    datastore_stale: Some("no contact for 45s"),
                    ..base
                },
                &f,
                &replace(),
            )
            .unwrap_err();
        assert_eq!(
            stale.to_string(),
            "the datastore is stale: no contact for 45s"
        );

        // The allow-list.
        let routes_only = Guard::new(RepairConfig {
            actions: vec![RepairKind::Route],
            ..RepairConfig::default()
        });
        let neigh = Remedy::NeighReplace {
            device: DEV.into(),
            ip: "10.1.235.133".parse().unwrap(),
            mac: crate::model::MacAddr([0x66, 1, 2, 3, 4, 5]),
        };
        let r = routes_only
            .check(&base, &finding(CheckId::NeighbourMacMismatch), &neigh)
            .unwrap_err();
        assert_eq!(r, Refusal::ActionNotAllowed("neighbour"));
        // A young finding is fine for a one-shot scan, and with min_finding_age = 0.
        let young = Situation { now: t0(), ..base };
        assert!(g.check(&young, &f, &replace()).is_err());
        assert!(g
            .check(
                &Situation {
                    ignore_age: true,
                    ..young
                },
                &f,
                &replace()
            )
            .is_ok());
        let eager = Guard::new(RepairConfig {
            min_finding_age: Duration::ZERO,
            ..RepairConfig::default()
        });
        assert!(eager.check(&young, &f, &replace()).is_ok());
    }

    #[test]
    fn budgets_per_object_and_per_node_with_a_fake_clock() {
        let mut g = Guard::new(RepairConfig {
            max_repairs_per_minute: 3,
            ..RepairConfig::default()
        });
        let t = Instant::now();
        let obj = |n: u8| ObjectKey(format!("route 10.1.{n}.0/26 dev {DEV}"));
        assert_eq!(g.admit(&obj(1), "f1", t), Ok(()));
        // The same object again at once: per-object gap.
        assert_eq!(
            g.admit(&obj(1), "f1", t + Duration::from_millis(100)),
            Err(Refusal::ObjectRateLimited)
        );
        assert_eq!(g.admit(&obj(1), "f1", t + PER_OBJECT_GAP), Ok(()));
        // Another route of the same finding (the incident's six blocks of one peer) is the
        // same repair: no new unit of the node-wide budget.
        assert_eq!(g.admit(&obj(2), "f1", t + Duration::from_secs(1)), Ok(()));
        assert_eq!(g.admit(&obj(3), "f2", t + Duration::from_secs(1)), Ok(()));
        assert_eq!(g.admit(&obj(4), "f3", t + Duration::from_secs(2)), Ok(()));
        // The node-wide cap: three repairs in the minute.
        assert_eq!(
            g.admit(&obj(5), "f4", t + Duration::from_secs(3)),
            Err(Refusal::NodeRateLimited(3))
        );
        // The first repair leaves the window a minute after it was made.
        assert_eq!(g.admit(&obj(5), "f4", t + Duration::from_secs(60)), Ok(()));
        assert_eq!(
            g.admit(&obj(6), "f5", t + Duration::from_secs(60)),
            Err(Refusal::NodeRateLimited(3))
        );
        assert!(Refusal::NodeRateLimited(3).is_transient());
        assert!(!Refusal::Offline.is_transient());
    }

    #[test]
    fn only_overlay_routes_in_the_main_table_are_touched() {
        let mut o = ObservedState::default();
        let mut dev = ObservedDevice::default();
        let route = |kind, table| Route {
            destination: "10.1.235.128/26".parse().unwrap(),
            gateway: None,
            onlink: false,
            protocol: 3,
            table,
            kind,
            metric: None,
        };
        o.devices.insert(DEV.into(), dev.clone());
        assert_eq!(touches_only_overlay(&o, &replace()), Ok(()));
        dev.routes = vec![route(RouteKind::Unicast, 254)];
        o.devices.insert(DEV.into(), dev.clone());
        assert_eq!(touches_only_overlay(&o, &replace()), Ok(()));
        for (kind, table) in [(RouteKind::Blackhole, 254), (RouteKind::Unicast, 100)] {
            dev.routes = vec![route(kind, table)];
            o.devices.insert(DEV.into(), dev.clone());
            let r = touches_only_overlay(&o, &replace()).unwrap_err();
            assert_eq!(r.code(), "not-overlay-object", "{r}");
        }
        dev.routes.clear();
        o.devices.insert(DEV.into(), dev);
        o.direct_routes.insert(
            "10.1.235.128/26".parse().unwrap(),
            crate::model::DirectRoute {
                ifindex: 2,
                gateway: Some("192.168.77.3".parse().unwrap()),
            },
        );
        assert!(touches_only_overlay(&o, &replace()).is_err());
    }
}
