//! Repair against real dataplanes in the network-namespace lab (needs root): `watchdog scan
//! --dry-run` / `--repair` on the incident, the guard rails on a real kernel, and the daemon
//! in `mode = "repair"` fixing faults, refusing, and giving up on a contested route.
//!
//! Every check reads the kernel back with `ip` and sends real packets across the overlay.

use std::{path::Path, process::Command};

use serde_json::Value;
use watchdog_lab::{Fault, Lab, LabSpec};

const WATCHDOG: &str = env!("CARGO_BIN_EXE_watchdog");
const NODE: &str = "k8s01";
const DEV: &str = "vxlan.calico";
const K8S03_VTEP: &str = "10.1.235.133";

fn build_lab() -> Lab {
    Lab::build(LabSpec::incident())
        .unwrap_or_else(|e| panic!("cannot build lab (these tests need root): {e:#}"))
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON ({e}), exit {}\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }
}

fn scan(config: &Path, netns: &Path, extra: &[&str]) -> Run {
    let out = Command::new(WATCHDOG)
        .args(["scan", "--config"])
        .arg(config)
        .arg("--netns")
        .arg(netns)
        .args(extra)
        .output()
        .expect("running watchdog scan");
    Run {
        code: out.status.code().expect("exit code"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ip route show dev vxlan.calico` on `node`, sorted.
fn routes(lab: &Lab, node: &str) -> Vec<String> {
    let mut r: Vec<String> = lab
        .ip(node, &["route", "show", "dev", DEV])
        .expect("ip route")
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    r.sort();
    r
}

/// The incident on k8s01, one of k8s03's blocks with Calico's own protocol (80), so the
/// repair must keep it.
fn incident_with_proto_80(lab: &mut Lab) {
    lab.inject(Fault::incident(NODE))
        .expect("inject the incident");
    lab.ip(
        NODE,
        &[
            "route",
            "replace",
            "10.1.236.0/26",
            "via",
            "10.1.235.128",
            "dev",
            DEV,
            "onlink",
            "proto",
            "80",
        ],
    )
    .expect("proto 80 route");
    let t = lab.traffic(NODE, "k8s03", 3).unwrap();
    assert!(
        t.none_delivered(),
        "the incident must blackhole k8s01→k8s03: {t}"
    );
}

#[test]
fn scan_dry_run_prints_the_incident_fix_then_repair_applies_it_and_traffic_flows() {
    let mut lab = build_lab();
    incident_with_proto_80(&mut lab);
    let config = lab.write_agent_config(NODE).unwrap();
    let netns = lab.netns_path(NODE);
    let before = routes(&lab, NODE);

    let dry = scan(&config, &netns, &["--dry-run"]);
    assert_eq!(dry.code, 2, "{}{}", dry.stdout, dry.stderr);
    let lines: Vec<&str> = dry.stdout.lines().collect();
    for want in [
        format!("ip route replace 10.1.235.128/26 via {K8S03_VTEP} dev {DEV} onlink"),
        format!("ip route replace 10.1.238.0/26 via {K8S03_VTEP} dev {DEV} onlink"),
        format!("ip route replace 10.1.236.0/26 via {K8S03_VTEP} dev {DEV} onlink proto 80"),
    ] {
        assert!(
            lines.contains(&want.as_str()),
            "{want:?} not in:\n{}",
            dry.stdout
        );
    }
    assert!(dry
        .stdout
        .contains("REPAIR PLAN (dry run, nothing written): 6 writes"));
    assert_eq!(routes(&lab, NODE), before, "--dry-run changed the kernel");

    let fixed = scan(&config, &netns, &["--repair", "--json"]);
    let json = fixed.json();
    assert_eq!(fixed.code, 0, "post-repair verdict: {json:#}");
    let actions = json["repair"]["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 6, "{json:#}");
    assert!(actions
        .iter()
        .all(|a| a["result"] == "applied" && a["action"] == "route-replace"));
    assert_eq!(json["repair"]["writes"], 6);
    assert_eq!(json["repair"]["before"]["critical"], 1);
    assert!(json["findings"].as_array().unwrap().is_empty(), "{json:#}");

    // The kernel: every k8s03 block via its VTEP, onlink, the proto 80 one still proto 80.
    let after = routes(&lab, NODE);
    for block in ["10.1.235.128/26", "10.1.236.0/26", "10.1.238.0/26"] {
        let line = after
            .iter()
            .find(|l| l.starts_with(&format!("{block} ")))
            .unwrap_or_else(|| panic!("{block} gone: {after:#?}"));
        assert!(
            line.contains(&format!("via {K8S03_VTEP} ")) && line.contains("onlink"),
            "{line}"
        );
        assert_eq!(
            line.contains("proto 80"),
            block == "10.1.236.0/26",
            "{line}"
        );
    }
    let t = lab.traffic(NODE, "k8s03", 5).unwrap();
    assert!(t.all_delivered(), "after the repair: {t}");
}

#[test]
fn scan_repair_refuses_a_peer_with_an_invalid_datastore_entry_and_writes_nothing() {
    let mut lab = build_lab();
    lab.inject(Fault::incident(NODE)).expect("inject");
    // k8s02 also claims one of k8s03's blocks: both entries are ambiguous for that block.
    let yaml = lab.datastore_yaml().replace(
        "blocks: [10.1.140.64/26]",
        "blocks: [10.1.140.64/26, 10.1.238.0/26]",
    );
    assert!(yaml.contains("10.1.238.0/26]"), "{yaml}");
    let dir = tempfile::tempdir().unwrap();
    let nodes = dir.path().join("nodes.yaml");
    std::fs::write(&nodes, yaml).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, lab.agent_config_toml(NODE, &nodes)).unwrap();
    let before = routes(&lab, NODE);

    let run = scan(&config, &lab.netns_path(NODE), &["--repair", "--json"]);
    let json = run.json();
    assert_eq!(run.code, 2, "{json:#}");
    assert_eq!(json["repair"]["writes"], 0);
    let actions = json["repair"]["actions"].as_array().unwrap();
    assert!(!actions.is_empty());
    for a in actions {
        assert_eq!(a["result"], "refused", "{a:#}");
        assert!(
            a["message"]
                .as_str()
                .unwrap()
                .contains("datastore entry of k8s03"),
            "{a:#}"
        );
    }
    let f = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "gateway-wrong-vtep")
        .expect("the incident is still reported");
    assert_eq!(f["repair"]["status"], "refused");
    assert_eq!(
        routes(&lab, NODE),
        before,
        "a refused repair changed the kernel"
    );

    // Offline: nothing is known to be right, nothing is written.
    let offline = scan(
        &lab.write_agent_config(NODE).unwrap(),
        &lab.netns_path(NODE),
        &["--repair", "--json", "--datastore", "none"],
    );
    assert_eq!(offline.json()["repair"]["writes"], 0);
    assert_eq!(routes(&lab, NODE), before);
}
