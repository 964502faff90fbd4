//! `watchdog scan`: one snapshot of kernel + datastore, every check, a report for a human or a
//! machine. The incident's manual correlation of `ip route`, `ip neigh` and `kubectl get node`,
//! as one command.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    checks::{self, CheckInput, CheckReport, DeviceSpec, DropSummary, PeerVerdict, SkippedCheck},
    config::{Config, DatastoreSource},
    desired::{AnyDatastore, Datastore, DatastoreError, FileDatastore},
    ebpf::{self, DropRates, DropWindow, EbpfError, EbpfStatus},
    model::{DesiredState, Finding, ObservedState, Severity},
    observe::{self, KernelObserver, NetlinkObserver},
};

mod repair;
pub use repair::{render_repair, scan_and_repair, ScanRepair};

/// Why a scan could not produce a verdict at all (exit 3: UNKNOWN).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("kernel: {0}")]
    Kernel(#[from] observe::Error),
    #[error("{0}")]
    Datastore(#[from] DatastoreError),
    #[error("drop counters: {0}")]
    Drops(#[from] EbpfError),
    #[error("repair: {0}")]
    Repair(#[from] crate::act::repair::RepairError),
}

/// Where desired state comes from for this scan (`--datastore` overrides the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreChoice {
    File(PathBuf),
    Kubernetes,
    None,
}

impl DatastoreChoice {
    pub fn from_config(config: &Config) -> Self {
        match config.datastore.source {
            DatastoreSource::File => DatastoreChoice::File(config.datastore.path.clone()),
            DatastoreSource::Kubernetes => DatastoreChoice::Kubernetes,
            DatastoreSource::None => DatastoreChoice::None,
        }
    }

    /// `none`, `kubernetes`, `file:PATH` or a bare `PATH`.
    pub fn parse(s: &str) -> Self {
        match s {
            "none" => DatastoreChoice::None,
            "kubernetes" | "k8s" => DatastoreChoice::Kubernetes,
            other => {
                DatastoreChoice::File(PathBuf::from(other.strip_prefix("file:").unwrap_or(other)))
            }
        }
    }
}

/// Everything `scan --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ScanOutput {
    pub node: String,
    pub netns: Option<String>,
    pub devices: Vec<String>,
    pub datastore: DatastoreInfo,
    pub routes_checked: usize,
    pub findings: Vec<Arc<Finding>>,
    pub peers: Vec<PeerVerdict>,
    pub skipped: Vec<SkippedCheck>,
    pub summary: Summary,
    pub duration_ms: f64,
    /// Kernel drops counted while the scan watched (`--drops DURATION`); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<ScanDrops>,
    /// What `--repair` did or `--dry-run` would do; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<ScanRepair>,
}

/// What `scan --drops` counted: data drops per peer (these fed `traffic-blackholed` /
/// `drops-unexplained`), per device and reason, and whether eBPF was attached at all.
#[derive(Debug, Clone, Serialize)]
pub struct ScanDrops {
    /// eBPF state; when not attached, `reason` says why and only device counters are shown.
    pub ebpf: EbpfStatus,
    #[serde(flatten)]
    pub rates: DropRates,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatastoreInfo {
    pub source: String,
    pub nodes: usize,
    pub problems: usize,
    /// Where the overlay's settings and pools were read, or what is assumed without them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub critical: usize,
    pub warning: usize,
    pub info: usize,
    /// 0 healthy, 1 warnings, 2 critical.
    pub exit_code: i32,
}

impl Summary {
    pub fn of(findings: &[Arc<Finding>]) -> Summary {
        let count = |s| findings.iter().filter(|f| f.severity == s).count();
        let (critical, warning, info) = (
            count(Severity::Critical),
            count(Severity::Warning),
            count(Severity::Info),
        );
        let exit_code = if critical > 0 {
            2
        } else if warning > 0 {
            1
        } else {
            0
        };
        Summary {
            critical,
            warning,
            info,
            exit_code,
        }
    }
}

/// Load the desired state for a scan. Kubernetes settings (kubeconfig, profile, IPAM API)
/// come from `config.datastore`; the read is one consistent list, never a watch.
pub async fn load_desired(
    choice: &DatastoreChoice,
    config: &Config,
) -> Result<Option<DesiredState>, ScanError> {
    match choice {
        DatastoreChoice::None => Ok(None),
        DatastoreChoice::File(path) => {
            let mut ds = FileDatastore::new(path.clone(), config.node_name.as_str());
            Ok(Some(ds.load().await?))
        }
        DatastoreChoice::Kubernetes => {
            let mut config = config.clone();
            config.datastore.source = DatastoreSource::Kubernetes;
            let mut ds = AnyDatastore::from_config(&config).await?;
            Ok(Some(ds.load().await?))
        }
    }
}

/// `scan --kubelet`: the kubelet watch-stall check once (DESIGN §9) against the API server,
/// its findings added to `out` (the Kubernetes datastore only).
pub async fn add_kubelet_check(out: &mut ScanOutput, config: &Config) -> Result<(), ScanError> {
    let mut config = config.clone();
    config.datastore.source = DatastoreSource::Kubernetes;
    let src = crate::desired::kubernetes::KubeSource::connect(
        crate::desired::KubeSourceConfig::from_config(&config),
    )
    .await
    .map_err(|e| DatastoreError::Backend {
        source: "kubernetes".into(),
        error: Box::new(e),
    })?;
    // The node the scan judged from (found by address when the host name is no node's).
    src.adopt_local_node(&out.node);
    out.findings.extend(
        src.kubelet_check(config.kubelet.threshold)
            .await
            .into_iter()
            .map(Arc::new),
    );
    out.summary = Summary::of(&out.findings);
    Ok(())
}

/// Snapshot the kernel of `netns` and run every check.
pub async fn scan(
    config: &Config,
    netns: Option<&std::path::Path>,
    datastore: &DatastoreChoice,
) -> Result<ScanOutput, ScanError> {
    scan_with_drops(config, netns, datastore, None).await
}

/// [`scan`], and with `drops: Some(window)` also attach the drop counters to the overlay
/// devices of `netns`, let traffic flow for `window`, and judge the data drops toward each peer
/// together with the dataplane (`traffic-blackholed`, `drops-unexplained`). When eBPF cannot
/// be attached the scan still runs; `drops.ebpf` says why and device counters stand in.
pub async fn scan_with_drops(
    config: &Config,
    netns: Option<&std::path::Path>,
    datastore: &DatastoreChoice,
    drops: Option<Duration>,
) -> Result<ScanOutput, ScanError> {
    Ok(scan_inner(config, netns, datastore, drops).await?.0)
}

/// [`scan_with_drops`], also returning the desired state the checks ran against.
async fn scan_inner(
    config: &Config,
    netns: Option<&std::path::Path>,
    datastore: &DatastoreChoice,
    drops: Option<Duration>,
) -> Result<(ScanOutput, Option<DesiredState>), ScanError> {
    let started = Instant::now();
    let observer = NetlinkObserver::new(netns)?;
    let mut desired = load_desired(datastore, config).await?;
    let mut observed = observer.snapshot(&config.devices).await?;
    if let Some(d) = desired.as_mut().filter(|_| !config.node_name_configured) {
        let local: Vec<std::net::IpAddr> = observed
            .devices
            .values()
            .filter_map(|d| d.link.local)
            .collect();
        d.adopt_local_by_address(&local);
    }
    let counted = match drops {
        Some(window) => {
            let counted = count_drops(netns, &observed, desired.as_ref(), window).await?;
            // Judge the dataplane as it is at the end of the window the drops come from.
            observed = observer.snapshot(&config.devices).await?;
            Some(counted)
        }
        None => None,
    };
    let specs: Vec<DeviceSpec> = config.device_specs();
    let report = checks::evaluate(&CheckInput {
        devices: &specs,
        observed: &observed,
        desired: desired.as_ref(),
        drops: counted.as_ref().map(|(summary, _)| summary),
        explained_recently: None,
        datastore: None,
    });
    let mut out = output(
        config,
        netns.map(|p| p.display().to_string()),
        desired.as_ref(),
        report,
        started.elapsed().as_secs_f64() * 1e3,
    );
    out.drops = counted.map(|(_, drops)| drops);
    Ok((out, desired))
}

async fn count_drops(
    netns: Option<&std::path::Path>,
    observed: &ObservedState,
    desired: Option<&DesiredState>,
    window: Duration,
) -> Result<(DropSummary, ScanDrops), ScanError> {
    let names = ebpf::device_names(observed);
    let mut source = ebpf::open(netns);
    source.set_watched_devices(&names.keys().copied().collect::<BTreeSet<u32>>())?;
    if let Some(desired) = desired {
        source.set_peer_blocks(&ebpf::peer_blocks_from_desired(desired))?;
    }
    let mut drop_window = DropWindow::starting_at(source.snapshot()?, Instant::now());
    tokio::time::sleep(window).await;
    let (summary, rates) = drop_window.observe(&source.snapshot()?, Instant::now(), &names);
    Ok((
        summary,
        ScanDrops {
            ebpf: source.status(),
            rates,
        },
    ))
}

fn output(
    config: &Config,
    netns: Option<String>,
    desired: Option<&DesiredState>,
    report: CheckReport,
    duration_ms: f64,
) -> ScanOutput {
    ScanOutput {
        // The node judged from: found by address when the host name is no node's.
        node: desired
            .map(|d| d.local_node.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| config.node_name.clone()),
        netns,
        devices: config.devices.clone(),
        datastore: DatastoreInfo {
            source: desired
                .map(|d| d.source.clone())
                .unwrap_or_else(|| "none (offline checks only)".into()),
            nodes: desired.map(|d| d.nodes.len()).unwrap_or(0),
            problems: desired.map(|d| d.problems.len()).unwrap_or(0),
            notes: desired.map(|d| d.cluster.notes.clone()).unwrap_or_default(),
        },
        routes_checked: report.routes_checked,
        summary: Summary::of(&report.findings),
        findings: report.findings,
        peers: report.peers,
        skipped: report.skipped,
        duration_ms,
        drops: None,
        repair: None,
    }
}

/// The human view: header, peer table, findings with evidence and the fix.
pub fn render_text(out: &ScanOutput) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "node {}{}: {} route{} on {} checked against datastore {} ({} nodes)",
        out.node,
        out.netns
            .as_deref()
            .map(|n| format!(" (netns {n})"))
            .unwrap_or_default(),
        out.routes_checked,
        if out.routes_checked == 1 { "" } else { "s" },
        out.devices.join(", "),
        out.datastore.source,
        out.datastore.nodes,
    );
    for note in &out.datastore.notes {
        let _ = writeln!(s, "  {note}");
    }
    if !out.peers.is_empty() {
        let _ = writeln!(s);
        let rows: Vec<[String; 5]> = out
            .peers
            .iter()
            .map(|p| {
                [
                    p.node.clone(),
                    p.vtep.to_string(),
                    p.node_ip.to_string(),
                    p.blocks.len().to_string(),
                    p.verdict.as_str().to_uppercase(),
                ]
            })
            .collect();
        table(
            &mut s,
            ["PEER", "VTEP", "NODE IP", "BLOCKS", "VERDICT"],
            &rows,
        );
    }
    if !out.findings.is_empty() {
        let _ = writeln!(s);
        let rows: Vec<[String; 6]> = out
            .findings
            .iter()
            .map(|f| {
                [
                    f.severity.to_string().to_uppercase(),
                    f.check.to_string(),
                    f.peer_node.clone().unwrap_or_else(|| "-".into()),
                    f.route.clone().unwrap_or_else(|| "-".into()),
                    f.gateway
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "-".into()),
                    f.expected_gateway
                        .map(|g| g.to_string())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            &mut s,
            ["SEVERITY", "CHECK", "PEER", "ROUTE", "GATEWAY", "EXPECTED"],
            &rows,
        );
        for f in &out.findings {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "{} {}: {}",
                f.severity.to_string().to_uppercase(),
                f.check,
                f.message
            );
            for r in &f.evidence.routes {
                let _ = writeln!(s, "    route  {r}");
            }
            if let Some(state) = &f.evidence.neighbour_state {
                let _ = writeln!(
                    s,
                    "    neigh  {} {state}",
                    f.gateway.map(|g| g.to_string()).unwrap_or_default()
                );
            }
            if let Some(d) = f.evidence.drops {
                let _ = writeln!(s, "    drops  {d}");
            }
            if let Some(h) = &f.hint {
                let _ = writeln!(s, "    fix    {h}");
            }
        }
    }
    if let Some(drops) = &out.drops {
        render_drops(&mut s, drops);
    }
    if !out.skipped.is_empty() {
        let _ = writeln!(s);
        let names: Vec<&str> = out.skipped.iter().map(|k| k.check.as_str()).collect();
        let _ = writeln!(
            s,
            "not checked: {} ({})",
            names.join(", "),
            out.skipped[0].reason
        );
    }
    let _ = writeln!(s);
    let verdict = match out.summary.exit_code {
        0 => "HEALTHY",
        1 => "WARNING",
        _ => "CRITICAL",
    };
    let _ = writeln!(
        s,
        "{verdict}: {} critical, {} warning{} ({:.1} ms)",
        out.summary.critical,
        out.summary.warning,
        if out.summary.warning == 1 { "" } else { "s" },
        out.duration_ms
    );
    s
}

fn render_drops(s: &mut String, drops: &ScanDrops) {
    let _ = writeln!(s);
    let secs = drops.rates.window_seconds;
    if !drops.ebpf.counting_drops() {
        let _ = writeln!(
            s,
            "drops: eBPF not counting ({}); device counters only",
            drops.ebpf.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    if drops.rates.peers.is_empty() {
        let _ = writeln!(s, "no data packets to any peer dropped in {secs:.1} s");
    } else {
        let rows: Vec<[String; 5]> = drops
            .rates
            .peers
            .iter()
            .map(|(peer, p)| {
                [
                    peer.clone(),
                    p.device.clone(),
                    p.total.packets.to_string(),
                    format!("{:.1}/s", p.total.per_second),
                    p.reasons
                        .iter()
                        .map(|(r, n)| format!("{r}={}", n.packets))
                        .collect::<Vec<_>>()
                        .join(", "),
                ]
            })
            .collect();
        let _ = writeln!(s, "data packets dropped in {secs:.1} s:");
        table(s, ["PEER", "DEVICE", "DROPPED", "RATE", "REASONS"], &rows);
    }
    for (device, d) in &drops.rates.devices {
        let mut parts = vec![
            format!("{} data", d.data.packets),
            format!("{} control", d.control.packets),
        ];
        if d.neighbour_failed > 0 || d.neighbour_incomplete > 0 {
            parts.push(format!(
                "neighbour INCOMPLETE x{}, FAILED x{}",
                d.neighbour_incomplete, d.neighbour_failed
            ));
        }
        if let Some(tx) = d.tx_dropped {
            parts.push(format!("tx_dropped {}", tx.packets));
        }
        let _ = writeln!(s, "  {device}: {}", parts.join(", "));
    }
}

fn table<const N: usize>(s: &mut String, header: [&str; N], rows: &[[String; N]]) {
    let mut widths: [usize; N] = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |s: &mut String, cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(s, "{}", parts.join("  ").trim_end());
    };
    line(s, header.to_vec());
    for row in rows {
        line(s, row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{shared, CheckId, Finding};

    fn config() -> Config {
        Config::with_node_name("k8s01")
    }

    #[test]
    fn exit_codes_follow_the_worst_severity() {
        let warn = Finding::new(CheckId::RouteStale, Severity::Warning, "d", "w".into());
        let crit = Finding::new(CheckId::RouteMissing, Severity::Critical, "d", "c".into());
        assert_eq!(Summary::of(&[]).exit_code, 0);
        assert_eq!(
            Summary::of(&shared(std::slice::from_ref(&warn))).exit_code,
            1
        );
        assert_eq!(Summary::of(&shared(&[warn, crit])).exit_code, 2);
    }

    #[test]
    fn datastore_choice_parses_forms() {
        assert_eq!(DatastoreChoice::parse("none"), DatastoreChoice::None);
        assert_eq!(
            DatastoreChoice::parse("file:/x.yaml"),
            DatastoreChoice::File("/x.yaml".into())
        );
        assert_eq!(
            DatastoreChoice::parse("/x.yaml"),
            DatastoreChoice::File("/x.yaml".into())
        );
        assert_eq!(
            DatastoreChoice::parse("kubernetes"),
            DatastoreChoice::Kubernetes
        );
    }

    #[test]
    fn text_and_json_show_drops_per_peer_and_device() {
        use crate::ebpf::{DeviceRates, EbpfState, PeerRates, Rate};
        use std::collections::BTreeMap;
        let rate = |packets, per_second| Rate {
            packets,
            per_second,
        };
        let mut out = output(&config(), None, None, CheckReport::default(), 1.0);
        out.drops = Some(ScanDrops {
            ebpf: EbpfStatus {
                state: EbpfState::Attached,
                missing: None,
                reason: None,
                programs: Vec::new(),
            },
            rates: DropRates {
                window_seconds: 2.0,
                peers: BTreeMap::from([(
                    "k8s03".to_string(),
                    PeerRates {
                        device: "vxlan.calico".into(),
                        total: rate(1913, 956.5),
                        reasons: BTreeMap::from([("NEIGH_QUEUEFULL".into(), rate(1913, 956.5))]),
                    },
                )]),
                devices: BTreeMap::from([(
                    "vxlan.calico".to_string(),
                    DeviceRates {
                        data: rate(1913, 956.5),
                        control: rate(4, 2.0),
                        neighbour_incomplete: 1,
                        neighbour_failed: 1,
                        ..Default::default()
                    },
                )]),
                imprecise: 0,
            },
        });
        let text = render_text(&out);
        assert!(text.contains("data packets dropped in 2.0 s"), "{text}");
        assert!(text.contains("NEIGH_QUEUEFULL=1913"), "{text}");
        assert!(text.contains("956.5/s"), "{text}");
        assert!(
            text.contains("vxlan.calico: 1913 data, 4 control, neighbour INCOMPLETE x1, FAILED x1"),
            "{text}"
        );
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["drops"]["peers"]["k8s03"]["total"]["packets"], 1913);
        assert_eq!(json["drops"]["ebpf"]["state"], "attached");
        assert_eq!(json["drops"]["window_seconds"], 2.0);
        // Without --drops there is no `drops` key at all.
        let plain = output(&config(), None, None, CheckReport::default(), 1.0);
        assert!(serde_json::to_value(&plain).unwrap().get("drops").is_none());
    }

    #[test]
    fn text_shows_finding_route_and_fix() {
        let mut f = Finding::new(
            CheckId::GatewayWrongVtep,
            Severity::Critical,
            "vxlan.calico",
            "6 routes to k8s03's blocks go via 10.1.235.128".into(),
        );
        f.route = Some("10.1.235.128/26".into());
        f.peer_node = Some("k8s03".into());
        f.evidence.routes = vec!["10.1.235.128/26 via 10.1.235.128 dev vxlan.calico onlink".into()];
        f.hint = Some(
            "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink".into(),
        );
        let report = CheckReport {
            findings: vec![f.into()],
            ..Default::default()
        };
        let out = output(&config(), None, None, report, 1.0);
        let text = render_text(&out);
        assert!(text.contains("gateway-wrong-vtep"), "{text}");
        assert!(
            text.contains("fix    ip route replace 10.1.235.128/26 via 10.1.235.133"),
            "{text}"
        );
        assert!(text.contains("CRITICAL: 1 critical, 0 warnings"), "{text}");
        assert_eq!(out.summary.exit_code, 2);
    }
}
