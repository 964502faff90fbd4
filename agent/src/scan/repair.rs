//! `watchdog scan --dry-run` and `--repair`: the plan of the findings just found, through the
//! same guard rails as the daemon (except the finding's age: a one-shot scan sees it once),
//! printed as the equivalent `ip`/`bridge` commands, or applied once and re-scanned.

use std::{
    fmt::Write as _,
    time::{Instant, SystemTime},
};

use serde::Serialize;

use super::{scan_inner, DatastoreChoice, ScanError, ScanOutput, Summary};
use crate::{
    act::repair::{report, NetlinkKernel, Pass, RepairLink, RepairResult, Repairer},
    config::Config,
    serve::status::RepairRecord,
};

/// What `--repair` did, or `--dry-run` would do.
#[derive(Debug, Clone, Serialize)]
pub struct ScanRepair {
    /// Nothing was written.
    pub dry_run: bool,
    /// One record per action (`planned` in a dry run; `applied`, `failed`, `refused` or
    /// `contested` otherwise), in the order they were decided.
    pub actions: Vec<RepairRecord>,
    /// Kernel writes sent.
    pub writes: usize,
    /// The verdict before the repair; the report's own `summary` is the one after it.
    pub before: Summary,
}

/// Scan, plan the repair, and (unless `dry_run`) apply it and scan again. The report returned
/// is the one after the repair, so its exit code is the post-repair verdict.
pub async fn scan_and_repair(
    config: &Config,
    netns: Option<&std::path::Path>,
    datastore: &DatastoreChoice,
    dry_run: bool,
) -> Result<ScanOutput, ScanError> {
    let (before, desired) = scan_inner(config, netns, datastore, None).await?;
    let mut kernel = NetlinkKernel::new(netns)?;
    let mut repairer = Repairer::new(config.repair.clone(), config.device_specs());
    let pass = repairer
        .run(
            &mut kernel,
            Pass {
                open: &before.findings,
                desired: desired.as_ref(),
                in_sync: true,
                ignore_age: true,
                dry_run,
                now: SystemTime::now(),
                clock: Instant::now(),
                ledger: None,
                datastore_down: None,
            },
        )
        .await;
    let link = RepairLink::default();
    for o in &pass.outcomes {
        link.record(o);
    }
    let repair = ScanRepair {
        dry_run,
        actions: pass.outcomes.iter().map(report::record).collect(),
        writes: pass.writes,
        before: before.summary,
    };
    let mut out = if pass.writes > 0 {
        // The verdict that counts is the kernel's after the writes.
        scan_inner(config, netns, datastore, None).await?.0
    } else {
        before
    };
    // Findings still open (and, in a dry run, all of them) say what repair did about them.
    link.annotate(out.findings.iter_mut());
    out.repair = Some(repair);
    Ok(out)
}

/// The repair section of the text report: in a dry run the plan as commands to paste (refused
/// ones commented out with the reason); otherwise what happened to each.
pub fn render_repair(r: &ScanRepair) -> String {
    let mut s = String::new();
    if r.dry_run {
        let planned = r.actions.iter().filter(|a| a.result == "planned").count();
        let _ = writeln!(
            s,
            "\nREPAIR PLAN (dry run, nothing written): {planned} write{}",
            if planned == 1 { "" } else { "s" }
        );
        for a in &r.actions {
            let command = a.command.as_deref().unwrap_or("");
            if a.result == RepairResult::Planned.as_str() {
                let _ = writeln!(s, "{command}");
            } else {
                let _ = writeln!(
                    s,
                    "# {} ({}): {command}",
                    a.result,
                    a.message.as_deref().unwrap_or("")
                );
            }
        }
        return s;
    }
    let _ = writeln!(
        s,
        "\nREPAIRS: {} write{} (before: {} critical, {} warning)",
        r.writes,
        if r.writes == 1 { "" } else { "s" },
        r.before.critical,
        r.before.warning
    );
    for a in &r.actions {
        let _ = writeln!(
            s,
            "  {:<9} {}  ({})",
            a.result,
            a.command.as_deref().unwrap_or(""),
            a.message.as_deref().unwrap_or("")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(result: &str, command: &str, message: &str) -> RepairRecord {
        RepairRecord {
            at: SystemTime::UNIX_EPOCH,
            action: "route-replace".into(),
            result: result.into(),
            peer_node: Some("k8s03".into()),
            command: Some(command.into()),
            message: Some(message.into()),
        }
    }

    #[test]
    fn a_dry_run_prints_commands_to_paste_and_comments_out_the_refused() {
        let cmd = "ip route replace 10.1.235.128/26 via 10.1.235.133 dev vxlan.calico onlink";
        let r = ScanRepair {
            dry_run: true,
            actions: vec![
                record("planned", cmd, "would write"),
                record(
                    "refused",
                    "ip route del 10.1.99.0/26 dev vxlan.calico",
                    "route-delete needs [repair] delete_stale_routes = true",
                ),
            ],
            writes: 0,
            before: Summary::default(),
        };
        let text = render_repair(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "REPAIR PLAN (dry run, nothing written): 1 write");
        assert_eq!(lines[2], cmd);
        assert_eq!(
            lines[3],
            "# refused (route-delete needs [repair] delete_stale_routes = true): ip route del \
             10.1.99.0/26 dev vxlan.calico"
        );
        let applied = ScanRepair {
            dry_run: false,
            actions: vec![record("applied", cmd, "written and read back")],
            writes: 1,
            before: Summary {
                critical: 1,
                ..Summary::default()
            },
        };
        assert!(render_repair(&applied)
            .contains(&format!("  applied   {cmd}  (written and read back)")));
    }
}
