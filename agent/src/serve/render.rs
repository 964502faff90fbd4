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
    let mut v: Vec<&Finding> = status.findings.iter().map(|f| &**f).collect();
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
    for note in &ds.notes {
        let _ = writeln!(out, "             {note}");
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
    if let Some(e) = &ebpf.peer_blocks_error {
        let _ = writeln!(out, "             drops not attributed to peers: {e}");
    }

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
                    d.family.map_or("-", |f| f.as_str()).into(),
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
                "NAME", "FAMILY", "PRESENT", "UP", "IFINDEX", "VNI", "ROUTES", "NEIGH", "FDB",
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
                    match (&r.command, &r.message) {
                        // Why it was not applied matters as much as what it was.
                        (Some(c), Some(m)) if r.result != "applied" => format!("{c} ({m})"),
                        (c, m) => c.clone().or_else(|| m.clone()).unwrap_or_default(),
                    },
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
        "\nALERTS (pending {}, sent {}, failed {}, dropped {})",
        a.pending, a.sent, a.failed, a.dropped
    );
    if !a.sinks.is_empty() {
        let rows: Vec<Vec<String>> = a
            .sinks
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.kind.clone(),
                    s.pending.to_string(),
                    s.sent.to_string(),
                    s.failed.to_string(),
                    s.last_success
                        .map(|t| format_age(age(now, t)))
                        .unwrap_or_else(|| "-".into()),
                    s.last_error.clone().unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "SINK",
                "KIND",
                "PENDING",
                "SENT",
                "FAILED",
                "LAST OK",
                "LAST ERROR",
            ],
            &rows,
        );
    }
    for d in &a.damped {
        let _ = writeln!(
            out,
            "  flapping, held open: {} {} (resolve in {} unless it reopens)",
            d.check,
            d.peer_node.as_deref().unwrap_or("-"),
            format_age(d.until.duration_since(now).unwrap_or_default()),
        );
    }
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
mod tests;
