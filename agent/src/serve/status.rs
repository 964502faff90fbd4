//! The daemon's state as the status API serves it (DESIGN.md §3, `watchdog status --json`).
//!
//! [`Status`] is plain serde data; [`StatusHandle`] is what the daemon holds and updates. The
//! server and clients only read.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::{
    checks::PeerVerdicts,
    model::{DesiredState, Finding, ObservedDevice, ObservedState, PeerNode, Severity},
};

/// Everything `watchdog status` shows. Field names are a contract (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    /// `observe`, `alert` or `repair`.
    pub mode: String,
    /// `calico` or `flannel`.
    #[serde(default)]
    pub profile: String,
    /// Agent version (`CARGO_PKG_VERSION`).
    #[serde(default)]
    pub version: String,
    #[serde(with = "humantime_serde")]
    pub started_at: SystemTime,
    pub uptime_seconds: u64,
    /// When the daemon last refreshed this status; clients judge staleness from it.
    #[serde(with = "humantime_serde")]
    pub generated_at: SystemTime,
    /// True once the first full sync (netlink dump + datastore list) has completed. Before
    /// that the findings say nothing.
    #[serde(default)]
    pub in_sync: bool,
    pub devices: Vec<DeviceStatus>,
    /// Open findings, each with `since`: the evaluation's own list, shared, not copied.
    pub findings: Arc<Vec<Arc<Finding>>>,
    /// Shared too: a reader's snapshot costs a pointer copy (see `GET /status`).
    pub peers: Arc<Vec<PeerStatus>>,
    pub drops: DropsStatus,
    /// Most recent first.
    pub repairs: Vec<RepairRecord>,
    pub alerts: AlertsStatus,
    pub datastore: DatastoreStatus,
    pub ebpf: EbpfSummary,
    pub resync: ResyncStatus,
    #[serde(default)]
    pub checks: ChecksStatus,
}

impl Status {
    /// An empty status for a daemon that has just started and synced nothing yet.
    pub fn starting(node: &str, mode: &str, profile: &str, now: SystemTime) -> Self {
        Status {
            node: node.to_string(),
            mode: mode.to_string(),
            profile: profile.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: now,
            uptime_seconds: 0,
            generated_at: now,
            in_sync: false,
            devices: Vec::new(),
            findings: Arc::default(),
            peers: Arc::default(),
            drops: DropsStatus::default(),
            repairs: Vec::new(),
            alerts: AlertsStatus::default(),
            datastore: DatastoreStatus::default(),
            ebpf: EbpfSummary::default(),
            resync: ResyncStatus::default(),
            checks: ChecksStatus::default(),
        }
    }

    /// Number of open findings of exactly this severity.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// Worst severity among open findings.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// Replace the open findings and the peer verdicts the checks made from them.
    pub fn set_findings(&mut self, findings: Arc<Vec<Arc<Finding>>>, verdicts: &PeerVerdicts) {
        self.findings = findings;
        for peer in Arc::make_mut(&mut self.peers) {
            (peer.verdict, peer.findings) = verdicts.get(&peer.name);
        }
    }

    /// Rebuild `peers` and the datastore counts from the desired state, keeping each known
    /// peer's drop count and verdict until the next evaluation says otherwise.
    pub fn set_desired(&mut self, desired: &DesiredState) {
        let old: BTreeMap<String, (u64, Verdict, usize)> = self
            .peers
            .iter()
            .map(|p| (p.name.clone(), (p.drops, p.verdict, p.findings)))
            .collect();
        self.peers = Arc::new(
            desired
                .peers()
                .map(|p| {
                    let mut ps = PeerStatus::from_peer(p);
                    if let Some((drops, verdict, findings)) = old.get(&p.name) {
                        (ps.drops, ps.verdict, ps.findings) = (*drops, *verdict, *findings);
                    }
                    ps
                })
                .collect(),
        );
        self.datastore.source = desired.source.clone();
        self.datastore.nodes = desired.nodes.len();
        self.datastore.problems = desired.problems.len();
    }

    /// Rebuild `devices` for the watched device names from the observed state.
    pub fn set_observed(&mut self, watched: &[String], observed: &ObservedState) {
        self.devices = watched
            .iter()
            .map(|name| DeviceStatus::from_observed(name, observed.devices.get(name)))
            .collect();
    }
}

/// One watched overlay device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub name: String,
    /// The family the device carries (`ipv4`, `ipv6`), by the same rule the checks use.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub family: Option<crate::model::Family>,
    pub present: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ifindex: Option<u32>,
    pub up: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vni: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mtu: Option<u32>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub addresses: Vec<IpNet>,
    /// Entries currently pointing out of the device.
    #[serde(default)]
    pub routes: usize,
    #[serde(default)]
    pub neighbours: usize,
    #[serde(default)]
    pub fdb: usize,
}

impl DeviceStatus {
    /// `observed` is `None` when the device does not exist.
    pub fn from_observed(name: &str, observed: Option<&ObservedDevice>) -> Self {
        let family = Some(crate::checks::DeviceSpec::for_name(name).family);
        let Some(d) = observed else {
            return DeviceStatus {
                name: name.to_string(),
                family,
                ..Default::default()
            };
        };
        DeviceStatus {
            name: name.to_string(),
            family,
            present: true,
            ifindex: Some(d.link.ifindex),
            up: d.link.up,
            vni: d.link.vni,
            port: d.link.port,
            mtu: d.link.mtu,
            addresses: d.link.addresses.clone(),
            routes: d.routes.len(),
            neighbours: d.neighbours.len(),
            fdb: d.fdb.len(),
        }
    }
}

pub use crate::checks::Verdict;

/// One remote node as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub vtep: IpAddr,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node_ip: Option<IpAddr>,
    pub blocks: Vec<IpNet>,
    pub verdict: Verdict,
    /// Open findings about this peer.
    pub findings: usize,
    /// Packets dropped toward this peer since the daemon started (eBPF; 0 without it).
    #[serde(default)]
    pub drops: u64,
}

impl PeerStatus {
    /// A peer with no findings yet (verdict ok), blocks and borrowed /32s together.
    pub fn from_peer(p: &PeerNode) -> Self {
        PeerStatus {
            name: p.name.clone(),
            vtep: p.vtep_ip,
            node_ip: Some(p.node_ip),
            blocks: p.blocks.iter().chain(&p.borrowed).copied().collect(),
            verdict: Verdict::Ok,
            findings: 0,
            drops: 0,
        }
    }
}

/// Kernel drop counters from eBPF. Empty when eBPF is not attached.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DropsStatus {
    pub total: u64,
    /// Kernel `skb_drop_reason` name → packets.
    pub by_reason: BTreeMap<String, u64>,
    /// Peer node → reason → packets.
    pub by_peer: BTreeMap<String, BTreeMap<String, u64>>,
}

/// One repair attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepairRecord {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    /// `route-replace`, `neigh-replace`, `fdb-replace`, …
    pub action: String,
    /// `planned`, `applied`, `failed`, `refused`, `contested`.
    pub result: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
}

/// Alert delivery summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertsStatus {
    /// Spooled, not yet delivered.
    pub pending: u64,
    pub sent: u64,
    pub failed: u64,
    /// Dropped unsent because the spool was full (oldest, lowest severity first).
    #[serde(default)]
    pub dropped: u64,
    /// Per configured sink (DESIGN.md §7).
    #[serde(default)]
    pub sinks: Vec<AlertSinkStatus>,
    /// Flapping findings held open instead of resolved.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damped: Vec<DampedAlert>,
    /// Most recent first.
    pub recent: Vec<AlertRecord>,
}

/// One sink's delivery figures. Never holds its URL or any secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertSinkStatus {
    pub name: String,
    /// `webhook`, `slack`, `pagerduty`, `alertmanager`.
    pub kind: String,
    pub pending: u64,
    pub sent: u64,
    pub failed: u64,
    /// Last failure (URLs redacted to scheme://host/…), or why the sink is disabled.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    #[serde(
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub last_success: Option<SystemTime>,
}

/// A flapping finding whose resolve is held back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DampedAlert {
    pub dedup_key: String,
    pub check: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_node: Option<String>,
    /// Resolved then unless it reopens.
    #[serde(with = "humantime_serde")]
    pub until: SystemTime,
}

/// One alert delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    #[serde(with = "humantime_serde")]
    pub at: SystemTime,
    pub sink: String,
    /// `sent`, `failed`, `pending`.
    pub result: String,
    pub check: String,
    pub severity: Severity,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_node: Option<String>,
    #[serde(default)]
    pub message: String,
}

/// Freshness of the desired state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatastoreStatus {
    /// `kubernetes`, `file:/etc/…`, `none`.
    pub source: String,
    /// Seconds between the last event/bookmark/successful list and `generated_at`.
    pub last_event_age_seconds: Option<f64>,
    #[serde(with = "humantime_serde", default)]
    pub last_relist: Option<SystemTime>,
    pub stale: bool,
    /// Nodes known, including the local one.
    #[serde(default)]
    pub nodes: usize,
    /// Datastore entries that failed validation.
    #[serde(default)]
    pub problems: usize,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Where the overlay's settings and IP pools were read, or why they could not be and
    /// what is assumed instead (Calico's FelixConfiguration and IPPools).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub notes: Vec<String>,
}

/// The status API's short view of the eBPF state ([`crate::ebpf::EbpfStatus`]): what is
/// attached, or why nothing is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EbpfSummary {
    /// Attached program names (`kfree_skb`, `neigh_update`, …).
    pub attached: Vec<String>,
    /// Why eBPF is not (fully) attached: disabled by config, missing capability, load error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Why the peers' blocks could not be written to the programs' tries: drops are then
    /// counted per device but attributed to no peer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_blocks_error: Option<String>,
}

impl From<&crate::ebpf::EbpfStatus> for EbpfSummary {
    fn from(s: &crate::ebpf::EbpfStatus) -> Self {
        let attached = s
            .programs
            .iter()
            .filter(|p| p.attached)
            .map(|p| p.name.clone())
            .collect();
        let mut problems: Vec<String> = s.reason.iter().cloned().collect();
        problems.extend(
            s.programs
                .iter()
                .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.name))),
        );
        EbpfSummary {
            attached,
            error: (!problems.is_empty()).then(|| problems.join("; ")),
            peer_blocks_error: None,
        }
    }
}

/// The periodic full resync (netlink dump + datastore relist).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStatus {
    #[serde(with = "humantime_serde", default)]
    pub last_full_resync: Option<SystemTime>,
    pub count: u64,
    /// Netlink multicast buffer overruns (each one forces a resync).
    pub overruns: u64,
}

/// The last check evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChecksStatus {
    pub routes_checked: u64,
    pub last_duration_seconds: Option<f64>,
    #[serde(with = "humantime_serde", default)]
    pub last_run: Option<SystemTime>,
}

/// Shared, cheaply cloneable handle the daemon updates and the servers read.
///
/// `update` mutates under a write lock; `tick` marks the main loop alive (for `/healthz`) and
/// refreshes `generated_at`/`uptime_seconds` so clients can tell a wedged daemon from a quiet one.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    inner: Arc<RwLock<Status>>,
    started: Instant,
    last_tick: Arc<Mutex<Option<Instant>>>,
}

impl StatusHandle {
    pub fn new(initial: Status) -> Self {
        StatusHandle {
            inner: Arc::new(RwLock::new(initial)),
            started: Instant::now(),
            last_tick: Arc::new(Mutex::new(None)),
        }
    }

    /// A clone of the current status.
    pub async fn snapshot(&self) -> Status {
        self.inner.read().await.clone()
    }

    /// `f` on the current status under the read lock: serving a request this way costs one
    /// serialization, where a snapshot first copies (and then frees) every peer and finding.
    pub async fn read<R>(&self, f: impl FnOnce(&Status) -> R) -> R {
        f(&*self.inner.read().await)
    }

    /// Mutate the status; stamps `generated_at` and `uptime_seconds`.
    pub async fn update<R>(&self, f: impl FnOnce(&mut Status) -> R) -> R {
        let mut guard = self.inner.write().await;
        let r = f(&mut guard);
        self.stamp(&mut guard);
        r
    }

    /// The main loop completed an iteration.
    /// Never waits: a reader serialising a large status (5,000 peers take ~5 ms) would
    /// otherwise hold up the loop; the stamp then waits for the next tick.
    pub async fn tick(&self) {
        *self.last_tick.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if let Ok(mut guard) = self.inner.try_write() {
            self.stamp(&mut guard);
        }
    }

    /// Time since the last [`tick`](Self::tick), `None` before the first.
    pub fn since_last_tick(&self) -> Option<Duration> {
        self.last_tick
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed())
    }

    fn stamp(&self, status: &mut Status) {
        status.generated_at = SystemTime::now();
        status.uptime_seconds = self.started.elapsed().as_secs();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CheckId;

    fn verdicts(node: &str, verdict: Verdict, findings: usize) -> PeerVerdicts {
        PeerVerdicts {
            peers: 2,
            with_findings: [(node.to_string(), (verdict, findings))].into(),
        }
    }

    #[test]
    fn peer_verdicts_are_the_checks_verdicts() {
        let mut s = Status::starting("k8s01", "alert", "calico", SystemTime::UNIX_EPOCH);
        for name in ["k8s02", "k8s03"] {
            Arc::make_mut(&mut s.peers).push(PeerStatus {
                name: name.into(),
                vtep: crate::model::v4(10, 1, 0, 1),
                node_ip: None,
                blocks: vec![],
                verdict: Verdict::Critical,
                findings: 9,
                drops: 0,
            });
        }
        let mut f = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Critical,
            "vxlan.calico",
            "x".into(),
        );
        f.peer_node = Some("k8s03".into());
        let mut w = f.clone();
        w.severity = Severity::Warning;
        // Only k8s03 has a verdict: k8s02's stale "critical" goes back to ok.
        s.set_findings(
            Arc::new(vec![f.into(), w.into()]),
            &verdicts("k8s03", Verdict::Critical, 2),
        );
        assert_eq!((s.peers[0].verdict, s.peers[0].findings), (Verdict::Ok, 0));
        assert_eq!(
            (s.peers[1].verdict, s.peers[1].findings),
            (Verdict::Critical, 2)
        );
    }

    #[test]
    fn desired_and_observed_fill_peers_and_devices() {
        use crate::model::{LinkInfo, MacAddr};
        let mut d = DesiredState {
            source: "file:/x".into(),
            local_node: "k8s01".into(),
            ..Default::default()
        };
        for (name, last) in [("k8s01", 1), ("k8s03", 3)] {
            d.nodes.insert(
                name.into(),
                PeerNode {
                    name: name.into(),
                    node_ip: crate::model::v4(192, 168, 77, last),
                    vtep_ip: crate::model::v4(10, 1, last, 5),
                    vtep_mac: MacAddr::derive_like_felix(name),
                    vtep_mac_derived: true,
                    blocks: vec![format!("10.1.{last}.0/26").parse().unwrap()],
                    borrowed: vec!["10.1.9.7/32".parse().unwrap()],
                    ipv6: None,
                },
            );
        }
        let mut s = Status::starting("k8s01", "alert", "calico", SystemTime::UNIX_EPOCH);
        Arc::make_mut(&mut s.peers).push(PeerStatus {
            drops: 77,
            ..PeerStatus::from_peer(&d.nodes["k8s03"])
        });
        s.set_desired(&d);
        assert_eq!(s.peers.len(), 1, "local node is not a peer");
        assert_eq!(s.peers[0].name, "k8s03");
        assert_eq!(s.peers[0].drops, 77, "drop count survives a relist");
        assert_eq!(s.peers[0].blocks.len(), 2);
        assert_eq!(
            (s.datastore.nodes, s.datastore.source.as_str()),
            (2, "file:/x")
        );

        let mut f = Finding::new(
            crate::model::CheckId::FdbMissing,
            Severity::Warning,
            "vxlan.calico",
            "x".into(),
        );
        f.peer_node = Some("k8s03".into());
        s.set_findings(
            Arc::new(vec![f.into()]),
            &verdicts("k8s03", Verdict::Warning, 1),
        );
        assert_eq!(s.peers[0].verdict, Verdict::Warning);
        // A relist keeps the verdict until the next evaluation.
        s.set_desired(&d);
        assert_eq!(s.peers[0].verdict, Verdict::Warning);

        let mut obs = ObservedState::default();
        obs.devices.insert(
            "vxlan.calico".into(),
            ObservedDevice {
                link: LinkInfo {
                    name: "vxlan.calico".into(),
                    ifindex: 12,
                    vni: Some(4096),
                    up: true,
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        s.set_observed(&["vxlan.calico".into(), "vxlan-v6.calico".into()], &obs);
        assert_eq!(s.devices[0].ifindex, Some(12));
        assert!(s.devices[0].present && s.devices[0].up);
        assert!(!s.devices[1].present);
    }

    #[tokio::test]
    async fn handle_stamps_and_ticks() {
        let h = StatusHandle::new(Status::starting(
            "n",
            "observe",
            "calico",
            SystemTime::UNIX_EPOCH,
        ));
        assert!(h.since_last_tick().is_none());
        h.update(|s| s.mode = "repair".into()).await;
        let s = h.snapshot().await;
        assert_eq!(s.mode, "repair");
        assert!(s.generated_at > SystemTime::UNIX_EPOCH);
        h.tick().await;
        assert!(h.since_last_tick().unwrap() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn tick_does_not_wait_for_a_reader() {
        let h = StatusHandle::new(Status::starting(
            "n",
            "observe",
            "calico",
            SystemTime::UNIX_EPOCH,
        ));
        let reading = h.inner.read().await;
        tokio::time::timeout(Duration::from_secs(2), h.tick())
            .await
            .expect("tick returns while a reader holds the status");
        assert!(h.since_last_tick().is_some(), "liveness is recorded");
        drop(reading);
        h.tick().await;
        assert!(h.snapshot().await.generated_at > SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn json_round_trips_with_contract_names() {
        let s = Status::starting("k8s01", "alert", "calico", SystemTime::UNIX_EPOCH);
        let j = serde_json::to_value(&s).unwrap();
        for key in [
            "node",
            "mode",
            "uptime_seconds",
            "devices",
            "findings",
            "peers",
            "drops",
            "repairs",
            "alerts",
            "datastore",
            "ebpf",
            "resync",
            "generated_at",
        ] {
            assert!(j.get(key).is_some(), "missing {key}");
        }
        assert_eq!(j["generated_at"], "1970-01-01T00:00:00Z");
        let back: Status = serde_json::from_value(j).unwrap();
        assert_eq!(back, s);
    }
}
