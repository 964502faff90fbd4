//! `device-missing` and `device-misconfigured`.

use super::{DeviceSpec, Family};
use crate::model::{CheckId, DesiredState, Finding, ObservedDevice, Severity};

pub(super) fn missing(spec: &DeviceSpec, desired: Option<&DesiredState>) -> Finding {
    let peers = desired.map(|d| d.peers().count()).unwrap_or(0);
    // Without peers an absent overlay carries no traffic yet: worth a warning, not a page.
    let severity = if desired.is_some() && peers == 0 {
        Severity::Warning
    } else {
        Severity::Critical
    };
    let mut f = Finding::new(
        CheckId::DeviceMissing,
        severity,
        &spec.name,
        format!(
            "overlay device {} does not exist: no pod traffic can leave this node over the \
             overlay (is the CNI agent running? is `devices` in the config right?)",
            spec.name
        ),
    );
    if peers > 0 {
        f.evidence
            .details
            .insert("peers_affected".into(), peers.to_string());
    }
    f
}

pub(super) fn misconfigured(
    spec: &DeviceSpec,
    dev: &ObservedDevice,
    desired: Option<&DesiredState>,
) -> Option<Finding> {
    let link = &dev.link;
    let mut problems: Vec<(Severity, String, String, String)> = Vec::new();
    let mut push = |sev, what: &str, have: String, want: String| {
        problems.push((sev, what.to_string(), have, want));
    };
    if let Some(kind) = &link.kind {
        if kind != "vxlan" {
            push(Severity::Critical, "kind", kind.clone(), "vxlan".into());
        }
    }
    if !link.up {
        push(Severity::Critical, "state", "down".into(), "up".into());
    }
    // A flow-based device takes its VNI from the program that sends through it.
    if let (Some(want), Some(have), false) = (spec.vni, link.vni, link.external) {
        if want != have {
            push(
                Severity::Critical,
                "vni",
                have.to_string(),
                want.to_string(),
            );
        }
    }
    if let (Some(want), Some(have)) = (spec.port, link.port) {
        if want != have {
            push(
                Severity::Critical,
                "port",
                have.to_string(),
                want.to_string(),
            );
        }
    }
    if let (Some(want), Some(have)) = (spec.mtu, link.mtu) {
        if want != have {
            push(Severity::Warning, "mtu", have.to_string(), want.to_string());
        }
    }
    if link.learning == Some(true) {
        // Both Calico and flannel program every FDB entry and turn learning off.
        push(Severity::Warning, "learning", "on".into(), "off".into());
    }
    if let Some(local) = desired.and_then(|d| d.nodes.get(&d.local_node)) {
        // Peers send to the MAC they were given for us: the device must have it, or it drops
        // every frame addressed to it.
        if let Some(have) = link.mac.filter(|m| *m != local.vtep_mac) {
            push(
                Severity::Critical,
                "mac",
                have.to_string(),
                local.vtep_mac.to_string(),
            );
        }
        // The outer source address peers expect (their FDB points at it).
        if let Some(have) = link
            .local
            .filter(|l| *l != local.node_ip && Family::of(l) == Family::of(&local.node_ip))
        {
            push(
                Severity::Warning,
                "local",
                have.to_string(),
                local.node_ip.to_string(),
            );
        }
        let has_vtep = link.addresses.iter().any(|a| a.addr() == local.vtep_ip);
        if !has_vtep {
            let have = if link.addresses.is_empty() {
                "none".to_string()
            } else {
                link.addresses
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            push(
                Severity::Warning,
                "address",
                have,
                local.vtep_ip.to_string(),
            );
        }
    }
    if problems.is_empty() {
        return None;
    }
    let severity = problems
        .iter()
        .map(|p| p.0)
        .max()
        .unwrap_or(Severity::Warning);
    let summary: Vec<String> = problems
        .iter()
        .map(|(_, what, have, want)| format!("{what} is {have}, expected {want}"))
        .collect();
    let mut f = Finding::new(
        CheckId::DeviceMisconfigured,
        severity,
        &spec.name,
        format!("{} is misconfigured: {}", spec.name, summary.join("; ")),
    );
    for (_, what, have, want) in problems {
        f.evidence.details.insert(what.clone(), have);
        f.evidence.details.insert(format!("expected_{what}"), want);
    }
    if !link.up {
        f.hint = Some(format!("ip link set {} up", spec.name));
    }
    Some(f)
}
