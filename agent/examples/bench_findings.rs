//! Micro-benchmark of finding bookkeeping: open 4 findings for each of 5,000 peers at once
//! (a datastore outage or a mass route corruption), keep them for one evaluation, change one,
//! then clear them all, with [`FindingTracker::update`] and, as the same-run baseline, the pairwise clear
//! it replaced. Unprivileged.
//! `cargo run --release -p dataplane-watchdog --example bench_findings` (`BENCH_PEERS` sets
//! the peer count).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use dataplane_watchdog::{
    daemon::FindingTracker,
    model::{CheckId, Finding, Severity},
};

fn findings(peers: usize) -> Vec<Finding> {
    let checks = [
        CheckId::GatewayWrongVtep,
        CheckId::NeighbourUnresolved,
        CheckId::FdbMissing,
        CheckId::TrafficBlackholed,
    ];
    let mut out = Vec::with_capacity(peers * checks.len());
    for p in 0..peers {
        for check in checks {
            let mut f = Finding::new(check, Severity::Critical, "vxlan.calico", "m".into());
            f.peer_node = Some(format!("node-{p:05}"));
            f.route = Some(format!("10.{}.{}.0/26", p / 256, p % 256));
            f.gateway =
                Some(std::net::Ipv4Addr::new(10, (p / 256) as u8, (p % 256) as u8, 1).into());
            out.push(f);
        }
    }
    out
}

/// The clear step as it was: every cleared finding compared with every one kept so far.
fn pairwise_clear(open: Vec<Finding>, now_open: &[Finding]) -> Vec<Finding> {
    open.into_iter()
        .filter(|f| !now_open.iter().any(|n| n.key() == f.key()))
        .fold(Vec::<Finding>::new(), |mut acc, f| {
            if !acc.iter().any(|o| o.key() == f.key()) {
                acc.push(f);
            }
            acc
        })
}

fn main() {
    let peers: usize = std::env::var("BENCH_PEERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let now = SystemTime::now();
    let mut t = FindingTracker::default();
    // As the evaluator hands them over: stamped, then shared with its kept parts.
    let all: Vec<Arc<Finding>> = findings(peers)
        .into_iter()
        .map(|mut f| {
            f.since = Some(t.first_seen(&f, now));
            Arc::new(f)
        })
        .collect();
    let started = Instant::now();
    let opened = t.update(all.clone(), now).opened.len();
    let open_time = started.elapsed();
    // An evaluation that changes none of them (an unrelated event during the outage).
    let started = Instant::now();
    assert!(t.update(all.clone(), now).is_empty());
    let keep_time = started.elapsed();
    // One finding's content changed (its part computed again): every key is compared.
    let mut one_changed = all.clone();
    Arc::make_mut(&mut one_changed[0])
        .message
        .push_str(" (again)");
    let started = Instant::now();
    assert_eq!(t.update(one_changed, now).changed.len(), 1);
    let changed_time = started.elapsed();
    let started = Instant::now();
    let cleared = t.update(Vec::new(), now).cleared.len();
    let clear_time = started.elapsed();
    assert_eq!((opened, cleared), (all.len(), all.len()));

    // The baseline is quadratic: time a tenth of the peers and say so, rather than wait minutes.
    let base_peers = (peers / 10).max(1);
    let base = findings(base_peers);
    let started = Instant::now();
    let base_cleared = pairwise_clear(base.clone(), &[]).len();
    let base_time = started.elapsed();
    assert_eq!(base_cleared, base.len());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("{} findings ({peers} peers x 4):", all.len());
    println!("  open all    {:>9.2} ms", ms(open_time));
    println!("  keep all    {:>9.2} ms", ms(keep_time));
    println!("  change one  {:>9.2} ms", ms(changed_time));
    println!("  clear all   {:>9.2} ms", ms(clear_time));
    println!(
        "  pairwise clear (before), {} findings: {:>9.2} ms; scaled to {} (x100, quadratic): \
         ~{:.0} ms = {:.0}x the linear clear",
        base.len(),
        ms(base_time),
        all.len(),
        ms(base_time) * 100.0,
        ms(base_time) * 100.0 / ms(clear_time).max(1e-6)
    );
}
