//! Pure renderings of a [`Status`]: the human `watchdog status` view and the Nagios
//! `watchdog check` verdict. No I/O; `now` is a parameter so tests pin time.

use std::{
    fmt::{Display, Write},
    path::Path,
    time::{Duration, SystemTime},
};

use super::status::Status;
use crate::model::{Finding, Severity};

/// Past this age a status is flagged as possibly wedged in the human view.
const VIEW_STALE_AFTER: Duration = Duration::from_secs(30);
/// Findings detailed in the human view before "… and N more".
const VIEW_MAX_FINDINGS: usize = 20;
/// Rows of recent repairs/alerts shown.
const VIEW_MAX_RECENT: usize = 5;

/// Nagios plugin exit codes (Nagios plugin guidelines).
pub const NAGIOS_OK: i32 = 0;
pub const NAGIOS_WARNING: i32 = 1;
pub const NAGIOS_CRITICAL: i32 = 2;
pub const NAGIOS_UNKNOWN: i32 = 3;

/// A compact age like `kubectl get` prints: `45s`, `5m`, `3h12m`, `2d3h`.
pub fn format_age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => {
            let (h, m) = (s / 3600, (s % 3600) / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        _ => {
            let (d, h) = (s / 86400, (s % 86400) / 3600);
            if h == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{h}h")
            }
        }
    }
}

/// Age of `t` at `now`; a timestamp in the future (clock skew) counts as zero.
fn age(now: SystemTime, t: SystemTime) -> Duration {
    now.duration_since(t).unwrap_or_default()
}

fn age_of(now: SystemTime, t: Option<SystemTime>) -> String {
    t.map(|t| format!("{} ago", format_age(age(now, t))))
        .unwrap_or_else(|| "never".to_string())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn opt<T: Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".to_string())
}

/// Left-aligned columns, two spaces apart, indented by two, like `kubectl get`.
fn table(out: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::from("  ");
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(out, &mut headers.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

/// Where a finding points: the route and gateway, else the device.
fn finding_target(f: &Finding) -> String {
    let mut s = match (&f.route, f.gateway) {
        (Some(r), Some(gw)) => format!("{r} via {gw}"),
        (Some(r), None) => r.clone(),
        (None, Some(gw)) => format!("gateway {gw}"),
        (None, None) => f.device.clone(),
    };
    if let Some(exp) = f.expected_gateway {
        let _ = write!(s, " (expected {exp})");
    }
    s
}

/// Findings, worst first, then oldest first.
fn sorted_findings(status: &Status) -> Vec<&Finding> {
    let mut v: Vec<&Finding> = status.findings.iter().collect();
    v.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(a.since.cmp(&b.since))
            .then(a.check.cmp(&b.check))
    });
    v
}

/// The `watchdog status` human view.
pub fn render_status(status: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let gen_age = age(now, status.generated_at);
    if gen_age > VIEW_STALE_AFTER {
        let _ = writeln!(
            out,
            "WARNING: this status was generated {} ago: the daemon's main loop may be stuck",
            format_age(gen_age)
        );
    }
    if !status.in_sync {
        out.push_str("NOTE: first full sync not complete yet: findings are not meaningful\n");
    }

    let _ = writeln!(
        out,
        "Node:        {} (profile {}, mode {})",
        status.node,
        if status.profile.is_empty() {
            "-"
        } else {
            &status.profile
        },
        status.mode
    );
    let _ = writeln!(
        out,
        "Agent:       {} up {}",
        if status.version.is_empty() {
            "watchdog".to_string()
        } else {
            format!("watchdog {}", status.version)
        },
        format_age(Duration::from_secs(status.uptime_seconds))
    );
    let verdict = match status.worst() {
        Some(Severity::Critical) => "CRITICAL",
        Some(Severity::Warning) => "WARNING",
        _ if status.datastore.stale => "UNKNOWN (datastore stale)",
        _ => "OK",
    };
    let _ = writeln!(
        out,
        "Verdict:     {verdict} ({} critical, {} warning findings)",
        status.count(Severity::Critical),
        status.count(Severity::Warning)
    );

    let ds = &status.datastore;
    let freshness = if ds.stale { "STALE" } else { "fresh" };
    let _ = writeln!(
        out,
        "Datastore:   {} {freshness}: last event {}, last relist {}, {} nodes{}",
        if ds.source.is_empty() {
            "-"
        } else {
            &ds.source
        },
        ds.last_event_age_seconds
            .map(|s| format!(
                "{} ago",
                format_age(Duration::from_secs_f64(s.max(0.0)) + gen_age)
            ))
            .unwrap_or_else(|| "never".to_string()),
        age_of(now, ds.last_relist),
        ds.nodes,
        if ds.problems > 0 {
            format!(", {} invalid entries", ds.problems)
        } else {
            String::new()
        }
    );
    if let Some(e) = &ds.error {
        let _ = writeln!(out, "             last error: {e}");
    }
    let _ = writeln!(
        out,
        "Resync:      last full resync {} ({} total), netlink overruns {}",
        age_of(now, status.resync.last_full_resync),
        status.resync.count,
        status.resync.overruns
    );
    let c = &status.checks;
    let _ = writeln!(
        out,
        "Checks:      {} routes checked, last run {}{}",
        c.routes_checked,
        age_of(now, c.last_run),
        c.last_duration_seconds
            .map(|d| format!(" in {:.1}ms", d * 1000.0))
            .unwrap_or_default()
    );
    let ebpf = &status.ebpf;
    let ebpf_line = match (ebpf.attached.is_empty(), &ebpf.error) {
        (false, None) => format!("attached: {}", ebpf.attached.join(", ")),
        (false, Some(e)) => format!("partly attached: {} ({e})", ebpf.attached.join(", ")),
        (true, Some(e)) => format!("not attached: {e}"),
        (true, None) => "not attached".to_string(),
    };
    let _ = writeln!(out, "eBPF:        {ebpf_line}");

    out.push_str("\nDEVICES\n");
    if status.devices.is_empty() {
        out.push_str("  (none watched)\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .devices
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    yes_no(d.present).into(),
                    yes_no(d.up).into(),
                    opt(d.ifindex),
                    opt(d.vni),
                    d.routes.to_string(),
                    d.neighbours.to_string(),
                    d.fdb.to_string(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "NAME", "PRESENT", "UP", "IFINDEX", "VNI", "ROUTES", "NEIGH", "FDB",
            ],
            &rows,
        );
    }

    let _ = writeln!(out, "\nPEERS ({})", status.peers.len());
    if status.peers.is_empty() {
        out.push_str("  (none known)\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .peers
            .iter()
            .map(|p| {
                let blocks: Vec<String> = p.blocks.iter().map(|b| b.to_string()).collect();
                vec![
                    p.name.clone(),
                    p.vtep.to_string(),
                    opt(p.node_ip),
                    p.verdict.as_str().to_string(),
                    p.findings.to_string(),
                    p.drops.to_string(),
                    if blocks.is_empty() {
                        "-".into()
                    } else {
                        blocks.join(",")
                    },
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "NODE", "VTEP", "NODE-IP", "VERDICT", "FINDINGS", "DROPS", "BLOCKS",
            ],
            &rows,
        );
    }

    let _ = writeln!(
        out,
        "\nFINDINGS ({}: {} critical, {} warning)",
        status.findings.len(),
        status.count(Severity::Critical),
        status.count(Severity::Warning)
    );
    if status.findings.is_empty() {
        out.push_str("  none\n");
    } else {
        let sorted = sorted_findings(status);
        for f in sorted.iter().take(VIEW_MAX_FINDINGS) {
            let _ = writeln!(
                out,
                "  {:<8}  {}  peer {}  {}  open {}",
                f.severity.to_string(),
                f.check,
                f.peer_node.as_deref().unwrap_or("-"),
                finding_target(f),
                f.since
                    .map(|s| format_age(age(now, s)))
                    .unwrap_or_else(|| "?".into())
            );
            let _ = writeln!(out, "            {}", f.message);
            if let Some(r) = &f.repair {
                let _ = writeln!(out, "            repair: {} {}", r.action, r.status);
            }
            if let Some(h) = &f.hint {
                let _ = writeln!(out, "            fix: {h}");
            }
        }
        if sorted.len() > VIEW_MAX_FINDINGS {
            let _ = writeln!(
                out,
                "  … and {} more (watchdog status --json)",
                sorted.len() - VIEW_MAX_FINDINGS
            );
        }
    }

    let _ = writeln!(out, "\nDROPS (total {})", status.drops.total);
    if status.drops.by_reason.is_empty() && status.drops.by_peer.is_empty() {
        out.push_str(if status.ebpf.attached.is_empty() {
            "  not counted (eBPF not attached)\n"
        } else {
            "  none\n"
        });
    } else {
        let mut rows: Vec<Vec<String>> = Vec::new();
        for (peer, reasons) in &status.drops.by_peer {
            for (reason, n) in reasons {
                rows.push(vec![peer.clone(), reason.clone(), n.to_string()]);
            }
        }
        if rows.is_empty() {
            for (reason, n) in &status.drops.by_reason {
                rows.push(vec!["-".into(), reason.clone(), n.to_string()]);
            }
        }
        table(&mut out, &["PEER", "REASON", "PACKETS"], &rows);
    }

    let _ = writeln!(out, "\nRECENT REPAIRS ({})", status.repairs.len());
    if status.repairs.is_empty() {
        out.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = status
            .repairs
            .iter()
            .take(VIEW_MAX_RECENT)
            .map(|r| {
                vec![
                    format_age(age(now, r.at)),
                    r.action.clone(),
                    r.result.clone(),
                    r.peer_node.clone().unwrap_or_else(|| "-".into()),
                    r.command
                        .clone()
                        .or_else(|| r.message.clone())
                        .unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["AGE", "ACTION", "RESULT", "PEER", "DETAIL"],
            &rows,
        );
    }

    let a = &status.alerts;
    let _ = writeln!(
        out,
        "\nALERTS (pending {}, sent {}, failed {})",
        a.pending, a.sent, a.failed
    );
    if a.recent.is_empty() {
        out.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = a
            .recent
            .iter()
            .take(VIEW_MAX_RECENT)
            .map(|r| {
                vec![
                    format_age(age(now, r.at)),
                    r.sink.clone(),
                    r.result.clone(),
                    r.severity.to_string(),
                    r.check.clone(),
                    r.peer_node.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            &mut out,
            &["AGE", "SINK", "RESULT", "SEVERITY", "CHECK", "PEER"],
            &rows,
        );
    }
    out
}

/// A Nagios plugin result: exit code and the single output line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    pub code: i32,
    pub line: String,
}

fn state_name(code: i32) -> &'static str {
    match code {
        NAGIOS_OK => "OK",
        NAGIOS_WARNING => "WARNING",
        NAGIOS_CRITICAL => "CRITICAL",
        _ => "UNKNOWN",
    }
}

fn outcome(code: i32, summary: &str, perfdata: &str) -> CheckOutcome {
    // `|` separates perfdata in plugin output; keep it out of the human part.
    let summary = summary.replace('|', "/");
    let line = if perfdata.is_empty() {
        format!("WATCHDOG {} - {summary}", state_name(code))
    } else {
        format!("WATCHDOG {} - {summary} | {perfdata}", state_name(code))
    };
    CheckOutcome { code, line }
}

fn perfdata(status: &Status, now: SystemTime) -> String {
    let gen_age = age(now, status.generated_at).as_secs();
    let ds_age = status
        .datastore
        .last_event_age_seconds
        .map(|a| format!("{}s", (a.max(0.0) as u64) + gen_age))
        .unwrap_or_else(|| "U".into());
    let failing = status
        .peers
        .iter()
        .filter(|p| p.verdict != super::status::Verdict::Ok)
        .count();
    format!(
        "findings_critical={};;;0 findings_warning={};;;0 peers={};;;0 peers_failing={failing};;;0 \
         datastore_age={ds_age};;;0 status_age={gen_age}s;;;0 drops={}c;;;0 repairs={}c;;;0 \
         alerts_pending={};;;0",
        status.count(Severity::Critical),
        status.count(Severity::Warning),
        status.peers.len(),
        status.drops.total,
        status.repairs.len(),
        status.alerts.pending,
    )
}

/// `check route peer` for the first few findings, worst first.
fn findings_summary(status: &Status, min: Severity) -> String {
    const SHOWN: usize = 2;
    let relevant: Vec<&Finding> = sorted_findings(status)
        .into_iter()
        .filter(|f| f.severity >= min)
        .collect();
    let mut parts: Vec<String> = relevant
        .iter()
        .take(SHOWN)
        .map(|f| {
            let mut s = f.check.to_string();
            if let Some(p) = &f.peer_node {
                let _ = write!(s, " peer {p}");
            }
            if let Some(r) = &f.route {
                let _ = write!(s, " {r}");
            } else {
                let _ = write!(s, " {}", f.device);
            }
            s
        })
        .collect();
    if relevant.len() > SHOWN {
        parts.push(format!("+{} more", relevant.len() - SHOWN));
    }
    parts.join("; ")
}

/// Classify a status for `watchdog check`.
///
/// UNKNOWN when the status itself cannot be trusted: generated more than `stale_after` ago
/// (wedged daemon), first sync not complete, or datastore stale — except that critical
/// findings still report CRITICAL with a stale datastore, since kernel-side evidence (an
/// unresolved gateway, drops) does not depend on the datastore and paging beats "unknown".
pub fn classify(status: &Status, now: SystemTime, stale_after: Duration) -> CheckOutcome {
    let perf = perfdata(status, now);
    let gen_age = age(now, status.generated_at);
    if gen_age > stale_after {
        return outcome(
            NAGIOS_UNKNOWN,
            &format!(
                "status on {} is stale: generated {} ago (limit {}); daemon main loop stuck?",
                status.node,
                format_age(gen_age),
                format_age(stale_after)
            ),
            &perf,
        );
    }
    if !status.in_sync {
        return outcome(
            NAGIOS_UNKNOWN,
            &format!(
                "{}: daemon started {} ago and has not completed its first full sync",
                status.node,
                format_age(Duration::from_secs(status.uptime_seconds))
            ),
            &perf,
        );
    }
    let crit = status.count(Severity::Critical);
    let warn = status.count(Severity::Warning);
    let stale_note = if status.datastore.stale {
        format!(" (datastore {} is stale)", status.datastore.source)
    } else {
        String::new()
    };
    if crit > 0 {
        return outcome(
            NAGIOS_CRITICAL,
            &format!(
                "{}: {crit} critical, {warn} warning findings: {}{stale_note}",
                status.node,
                findings_summary(status, Severity::Critical)
            ),
            &perf,
        );
    }
    if status.datastore.stale {
        return outcome(
            NAGIOS_UNKNOWN,
            &format!(
                "{}: datastore {} is stale, cannot verify routes ({warn} warning findings)",
                status.node, status.datastore.source
            ),
            &perf,
        );
    }
    if warn > 0 {
        return outcome(
            NAGIOS_WARNING,
            &format!(
                "{}: {warn} warning findings: {}",
                status.node,
                findings_summary(status, Severity::Warning)
            ),
            &perf,
        );
    }
    outcome(
        NAGIOS_OK,
        &format!(
            "{}: {} peers ok, datastore {} fresh, mode {}",
            status.node,
            status.peers.len(),
            status.datastore.source,
            status.mode
        ),
        &perf,
    )
}

/// The plugin line when the daemon cannot be asked at all; `error` should say what to do.
pub fn unreachable_outcome(socket: &Path, error: &dyn Display) -> CheckOutcome {
    outcome(
        NAGIOS_UNKNOWN,
        &format!("cannot reach daemon at {}: {error}", socket.display()),
        "",
    )
}

#[cfg(test)]
mod tests {
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
            present: true,
            ifindex: Some(12),
            up: true,
            vni: Some(4096),
            routes: 3,
            ..Default::default()
        });
        for (name, last) in [("k8s02", 2), ("k8s03", 3)] {
            s.peers.push(PeerStatus {
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
        s.findings = vec![w, f];
        let k8s03 = s.peers.iter_mut().find(|p| p.name == "k8s03").unwrap();
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
        assert!(
            out.contains("fix: ip route replace 10.1.3.0/26 via 10.1.3.5 dev vxlan.calico onlink")
        );
        assert!(out.contains("repair: route-replace planned"));
        // Peer table: k8s03 is critical with 2 findings.
        let peer_line = out
            .lines()
            .find(|l| l.trim_start().starts_with("k8s03"))
            .unwrap();
        assert!(peer_line.contains("critical"), "{peer_line}");
        assert!(out.contains("k8s03  NEIGH_FAILED  1234"));
        assert!(out.contains("ALERTS (pending 0, sent 1, failed 0)"));
        assert!(out.contains("eBPF:        attached: kfree_skb"));
        assert!(!out.contains("WARNING: this status was generated"));
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
        s.findings.retain(|f| f.severity == Severity::Warning);
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
}
