//! Prometheus metrics (DESIGN.md §3, prefix `dataplane_watchdog_`) and the `/metrics` server.
//!
//! Label values that come from outside the program (peer names, drop reasons, sink names,
//! repair actions) are capped per label so a large cluster or a misbehaving input cannot blow
//! up the series count: past the cap they are reported as `other`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{atomic::AtomicU64, Arc, Mutex},
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn, Request, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    encoding::{text, EncodeLabelSet, LabelSetEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::{Registry, Unit},
};
use tokio::net::TcpListener;

mod process;
use process::ProcessCollector;

use super::{http, ServeError};
use crate::{
    checks::{PeerVerdicts, Verdict},
    model::Finding,
};

/// Default `[metrics] listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Distinct peer names exported as labels; the rest are `other`.
pub const MAX_PEER_LABELS: usize = 64;
/// Distinct values for other externally-derived labels (reasons, sinks, actions, devices).
pub const MAX_LABEL_VALUES: usize = 128;
/// Resync reasons exported at 0 from startup (`inc_resync` accepts others too).
pub const RESYNC_REASONS: [&str; 4] = ["startup", "periodic", "overrun", "kernel"];
/// The label value that absorbs everything past a cap.
pub const OTHER_LABEL: &str = "other";

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct FindingLabels {
    check: String,
    severity: String,
    /// `ipv4`/`ipv6` for findings about an overlay device; no label for the others (the
    /// datastore, the kubelet), rather than an empty one.
    family: Option<&'static str>,
}

impl EncodeLabelSet for FindingLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let mut labels = vec![
            ("check", self.check.as_str()),
            ("severity", self.severity.as_str()),
        ];
        if let Some(family) = self.family {
            labels.push(("family", family));
        }
        EncodeLabelSet::encode(&labels.as_slice(), encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    device: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerDropLabels {
    device: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RepairLabels {
    action: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabels {
    sink: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

fn delivery_histogram() -> Histogram {
    // 10 ms … ~44 min: a first-try delivery up to a long outage's retries.
    Histogram::new(exponential_buckets(0.01, 4.0, 10))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// Admits up to `max` distinct values, then maps new ones to [`OTHER_LABEL`].
#[derive(Debug)]
struct LabelCap {
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl LabelCap {
    fn new(max: usize) -> Self {
        LabelCap {
            max,
            seen: Mutex::new(HashSet::new()),
        }
    }

    fn admit(&self, value: &str) -> String {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value.to_string();
        }
        OTHER_LABEL.to_string()
    }
}

/// Turns absolute counter readings (eBPF per-CPU map sums) into counter increments. A reading
/// lower than the last one means the source restarted (program reloaded): it counts in full.
#[derive(Debug)]
struct DeltaTracker<K> {
    last: Mutex<HashMap<K, u64>>,
}

impl<K: std::hash::Hash + Eq> DeltaTracker<K> {
    fn new() -> Self {
        DeltaTracker {
            last: Mutex::new(HashMap::new()),
        }
    }

    fn retain(&self, keep: impl Fn(&K) -> bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.retain(|k, _| keep(k));
    }

    fn len(&self) -> usize {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn delta(&self, key: K, total: u64) -> u64 {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let prev = last.insert(key, total).unwrap_or(0);
        if total >= prev {
            total - prev
        } else {
            total
        }
    }
}

/// All metrics the daemon exports. Share as `Arc<Metrics>`; every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    findings: Family<FindingLabels, Gauge>,
    findings_seen: Mutex<HashSet<FindingLabels>>,
    vxlan_drops: Family<DropLabels, Counter>,
    /// Keyed by the real (uncapped) device and reason: two reasons folded into `other` must
    /// not overwrite each other's last reading.
    vxlan_drops_last: DeltaTracker<(String, String)>,
    peer_drops: Family<PeerDropLabels, Counter>,
    peer_drops_last: DeltaTracker<(String, String)>,
    neighbour_unresolved: Family<DeviceLabels, Counter>,
    repairs: Family<RepairLabels, Counter>,
    alerts: Family<AlertLabels, Counter>,
    alerts_pending: Family<SinkLabels, Gauge>,
    alert_delivery: Family<SinkLabels, Histogram, fn() -> Histogram>,
    alerts_dropped: Counter,
    datastore_last_event_age: Gauge<f64, AtomicU64>,
    check_duration: Histogram,
    routes_checked: Gauge,
    resyncs: Family<ReasonLabels, Counter>,
    netlink_overruns: Counter,
    relist_mismatch: Counter,
    peers: Family<VerdictLabels, Gauge>,
    ebpf_programs: Gauge,
    /// One cap per label kind, so many values of one kind never push another into `other`.
    peer_cap: LabelCap,
    device_cap: LabelCap,
    reason_cap: LabelCap,
    sink_cap: LabelCap,
    action_cap: LabelCap,
    result_cap: LabelCap,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // Standard, unprefixed process_* metrics so stock dashboards work.
        registry.register_collector(Box::new(ProcessCollector));

        let m = Metrics {
            registry: Registry::default(),
            findings: Family::default(),
            findings_seen: Mutex::new(HashSet::new()),
            vxlan_drops: Family::default(),
            vxlan_drops_last: DeltaTracker::new(),
            peer_drops: Family::default(),
            peer_drops_last: DeltaTracker::new(),
            neighbour_unresolved: Family::default(),
            repairs: Family::default(),
            alerts: Family::default(),
            alerts_pending: Family::default(),
            alert_delivery: Family::new_with_constructor(delivery_histogram),
            alerts_dropped: Counter::default(),
            datastore_last_event_age: Gauge::default(),
            check_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            routes_checked: Gauge::default(),
            resyncs: Family::default(),
            netlink_overruns: Counter::default(),
            relist_mismatch: Counter::default(),
            peers: Family::default(),
            ebpf_programs: Gauge::default(),
            peer_cap: LabelCap::new(MAX_PEER_LABELS),
            device_cap: LabelCap::new(MAX_LABEL_VALUES),
            reason_cap: LabelCap::new(MAX_LABEL_VALUES),
            sink_cap: LabelCap::new(MAX_LABEL_VALUES),
            action_cap: LabelCap::new(MAX_LABEL_VALUES),
            result_cap: LabelCap::new(MAX_LABEL_VALUES),
        };

        let r = registry.sub_registry_with_prefix("dataplane_watchdog");
        r.register(
            "findings",
            "Open findings by check id and severity",
            m.findings.clone(),
        );
        r.register(
            "vxlan_drops",
            "Packets the kernel dropped on a watched overlay device, by kfree_skb drop reason",
            m.vxlan_drops.clone(),
        );
        r.register(
            "peer_drops",
            "Packets dropped on a watched overlay device toward a peer node (first 64 peers named, the rest 'other')",
            m.peer_drops.clone(),
        );
        r.register(
            "neighbour_unresolved",
            "Neighbour entries on a watched overlay device that went INCOMPLETE or FAILED",
            m.neighbour_unresolved.clone(),
        );
        r.register(
            "repairs",
            "Repair attempts by action and result (applied, failed, refused, contested, planned)",
            m.repairs.clone(),
        );
        r.register(
            "alerts",
            "Alert delivery attempts by sink and result (sent, failed, retried)",
            m.alerts.clone(),
        );
        r.register(
            "alerts_pending",
            "Alert notifications spooled and not yet delivered, by sink",
            m.alerts_pending.clone(),
        );
        r.register_with_unit(
            "alert_delivery",
            "Time from spooling a notification to the sink's 2xx, retries included",
            Unit::Seconds,
            m.alert_delivery.clone(),
        );
        r.register(
            "alerts_dropped",
            "Alert notifications dropped unsent because the spool was full",
            m.alerts_dropped.clone(),
        );
        r.register_with_unit(
            "datastore_last_event_age",
            "Time since the datastore last delivered an event, bookmark or successful list",
            Unit::Seconds,
            m.datastore_last_event_age.clone(),
        );
        r.register_with_unit(
            "check_duration",
            "Time to evaluate all checks once",
            Unit::Seconds,
            m.check_duration.clone(),
        );
        r.register(
            "routes_checked",
            "Routes on watched devices evaluated in the last check run",
            m.routes_checked.clone(),
        );
        r.register(
            "resyncs",
            "Full resyncs (netlink dump + datastore relist) by reason",
            m.resyncs.clone(),
        );
        r.register(
            "netlink_overruns",
            "Netlink multicast socket overruns (events lost; each forces a resync)",
            m.netlink_overruns.clone(),
        );
        r.register(
            "datastore_relist_mismatch",
            "Periodic datastore relists that disagreed with the watch cache",
            m.relist_mismatch.clone(),
        );
        r.register(
            "peers",
            "Known peer nodes by verdict (ok, warning, critical)",
            m.peers.clone(),
        );
        r.register(
            "ebpf_programs_attached",
            "eBPF programs currently attached",
            m.ebpf_programs.clone(),
        );
        let info: Family<VersionLabels, Gauge> = Family::default();
        info.get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
        r.register("build_info", "Agent version; always 1", info);
        // Export the well-known series at 0 from the start, so rate() and absent() behave.
        for reason in RESYNC_REASONS {
            let _ = m.resyncs.get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            });
        }
        m.set_peer_verdicts(&PeerVerdicts::default());
        Metrics { registry, ..m }
    }

    /// Replace the open-findings gauges. Series seen before and now absent are set to 0
    /// rather than removed, so alert rules see the drop to zero.
    pub fn set_findings(&self, findings: &[Arc<Finding>]) {
        let mut counts: HashMap<FindingLabels, i64> = HashMap::new();
        for f in findings {
            *counts
                .entry(FindingLabels {
                    check: f.check.to_string(),
                    severity: f.severity.to_string(),
                    family: f.family.map(|family| family.as_str()),
                })
                .or_default() += 1;
        }
        let mut seen = self.findings_seen.lock().unwrap_or_else(|e| e.into_inner());
        for labels in seen.iter() {
            if !counts.contains_key(labels) {
                self.findings.get_or_create(labels).set(0);
            }
        }
        for (labels, n) in counts {
            self.findings.get_or_create(&labels).set(n);
            seen.insert(labels);
        }
    }

    /// Absolute drop count for (device, reason) as read from the eBPF map.
    pub fn observe_vxlan_drops_total(&self, device: &str, reason: &str, total: u64) {
        let d = self
            .vxlan_drops_last
            .delta((device.to_string(), reason.to_string()), total);
        if d > 0 {
            let labels = DropLabels {
                device: self.device_cap.admit(device),
                reason: self.reason_cap.admit(reason),
            };
            self.vxlan_drops.get_or_create(&labels).inc_by(d);
        }
    }

    /// Absolute drop counts toward every peer that has counters, as read from the eBPF maps
    /// (`totals`: peer → total). A peer absent from `totals` has no counters any more (it left
    /// and was harvested); it is forgotten, so node churn cannot grow this tracker, and a
    /// later node of that name counts from its new kernel counters.
    pub fn observe_peer_drops_totals(&self, device: &str, totals: &BTreeMap<String, u64>) {
        for (peer, total) in totals {
            self.observe_peer_drops_total(device, peer, *total);
        }
        self.peer_drops_last
            .retain(|(d, peer)| d != device || totals.contains_key(peer));
    }

    /// Peers whose last total is remembered (bounded by the peers with counters).
    pub fn peer_drops_tracked(&self) -> usize {
        self.peer_drops_last.len()
    }

    /// Absolute drop count toward one peer as read from the eBPF map.
    fn observe_peer_drops_total(&self, device: &str, peer: &str, total: u64) {
        // Track the delta per real peer name, so peers folded into `other` still add up.
        let d = self
            .peer_drops_last
            .delta((device.to_string(), peer.to_string()), total);
        if d > 0 {
            let labels = PeerDropLabels {
                device: self.device_cap.admit(device),
                peer: self.peer_cap.admit(peer),
            };
            self.peer_drops.get_or_create(&labels).inc_by(d);
        }
    }

    /// `n` more neighbour entries on `device` went unresolved.
    pub fn add_neighbour_unresolved(&self, device: &str, n: u64) {
        self.neighbour_unresolved
            .get_or_create(&DeviceLabels {
                device: self.device_cap.admit(device),
            })
            .inc_by(n);
    }

    pub fn inc_repair(&self, action: &str, result: &str) {
        self.repairs
            .get_or_create(&RepairLabels {
                action: self.action_cap.admit(action),
                result: self.result_cap.admit(result),
            })
            .inc();
    }

    pub fn inc_alert(&self, sink: &str, result: &str) {
        self.alerts
            .get_or_create(&AlertLabels {
                sink: self.sink_cap.admit(sink),
                result: self.result_cap.admit(result),
            })
            .inc();
    }

    pub fn set_alerts_pending(&self, sink: &str, pending: u64) {
        self.alerts_pending
            .get_or_create(&SinkLabels {
                sink: self.sink_cap.admit(sink),
            })
            .set(pending as i64);
    }

    pub fn observe_alert_delivery(&self, sink: &str, seconds: f64) {
        self.alert_delivery
            .get_or_create(&SinkLabels {
                sink: self.sink_cap.admit(sink),
            })
            .observe(seconds);
    }

    pub fn inc_alerts_dropped(&self, n: u64) {
        self.alerts_dropped.inc_by(n);
    }

    pub fn set_datastore_last_event_age(&self, age: Duration) {
        self.datastore_last_event_age.set(age.as_secs_f64());
    }

    pub fn observe_check_duration(&self, d: Duration) {
        self.check_duration.observe(d.as_secs_f64());
    }

    pub fn set_routes_checked(&self, n: u64) {
        self.routes_checked
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `reason`: one of [`RESYNC_REASONS`] (`ResyncReason::as_str`).
    pub fn inc_resync(&self, reason: &str) {
        self.resyncs
            .get_or_create(&ReasonLabels {
                reason: self.reason_cap.admit(reason),
            })
            .inc();
    }

    pub fn inc_netlink_overrun(&self) {
        self.netlink_overruns.inc();
    }

    pub fn inc_datastore_relist_mismatch(&self) {
        self.relist_mismatch.inc();
    }

    /// Peer counts by verdict; every verdict is always exported (0 when none).
    /// `peers{verdict}` from the checks' verdicts.
    pub fn set_peer_verdicts(&self, peers: &PeerVerdicts) {
        for v in [Verdict::Ok, Verdict::Warning, Verdict::Critical] {
            self.peers
                .get_or_create(&VerdictLabels {
                    verdict: v.as_str().to_string(),
                })
                .set(peers.count(v) as i64);
        }
    }

    pub fn set_ebpf_programs_attached(&self, n: usize) {
        self.ebpf_programs.set(n as i64);
    }

    /// Set every gauge that mirrors the status (findings, peers, routes checked, eBPF
    /// programs, datastore age). Counters are event-driven and not touched.
    /// The OpenMetrics text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = text::encode(&mut out, &self.registry);
        out
    }
}

/// The `/metrics` HTTP server.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::MetricsBind { addr, source })?;
        tracing::info!(%addr, "metrics listening");
        Ok(MetricsServer { listener })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve `GET /metrics` until `shutdown` completes.
    pub async fn run(
        self,
        metrics: Arc<Metrics>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Accept errors on TCP are per-connection or resource exhaustion:
                        // back off and keep serving.
                        tracing::warn!(error = %e, "metrics accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        if let Some(r) = http::method_not_allowed(req.method()) {
                            return Ok::<_, Infallible>(r);
                        }
                        Ok(match req.uri().path() {
                            "/metrics" => http::respond(
                                StatusCode::OK,
                                OPENMETRICS_CONTENT_TYPE,
                                metrics.encode(),
                            ),
                            other => http::error(
                                StatusCode::NOT_FOUND,
                                &format!("no route {other}: try /metrics"),
                            ),
                        })
                    }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(http::HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests;
