//! Findings about the datastore itself: its objects (`datastore-invalid`) and its freshness
//! (`datastore-stale`). The Kubernetes source reports its health as plain data
//! ([`DatastoreHealth`]); the verdict is made here, once, like every other.

use super::DeviceSpec;
use crate::model::{CheckId, DesiredState, Finding, Severity};

/// How fresh the datastore's view is (the Kubernetes source; files are always fresh).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DatastoreHealth {
    pub source: String,
    /// Nodes in the state the checks run against.
    pub nodes: usize,
    /// Why the cached state cannot be trusted to be current, per resource; empty when fresh.
    pub stale: Vec<StaleNote>,
    /// Relists that found the cache differing from the server, in total.
    pub relist_mismatches: u64,
    /// The list/watch ended and is being re-established, and why: the checks run against the
    /// last good state meanwhile.
    pub watch_ended: Option<String>,
}

/// One resource's reason to distrust the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleNote {
    pub resource: String,
    /// `never-listed`, `no-contact` or `missed-events`.
    pub kind: &'static str,
    /// The human sentence (`nodes: no contact with the API server for 45s (…)`).
    pub text: String,
}

impl StaleNote {
    pub const MISSED_EVENTS: &'static str = "missed-events";
}

/// `datastore-invalid` for the desired state's problems and `datastore-stale` for the
/// source's health, naming the first device.
pub fn findings(
    desired: Option<&DesiredState>,
    health: Option<&DatastoreHealth>,
    devices: &[DeviceSpec],
) -> Vec<Finding> {
    let device = devices.first().map(|d| d.name.as_str()).unwrap_or("");
    let mut out = desired.map(|d| invalid(d, device)).unwrap_or_default();
    out.extend(health.and_then(|h| stale(h, device)));
    out
}

fn invalid(desired: &DesiredState, device: &str) -> Vec<Finding> {
    let mut out: Vec<Finding> = desired
        .problems
        .iter()
        .map(|p| {
            let mut f = Finding::new(
                CheckId::DatastoreInvalid,
                Severity::Warning,
                device,
                format!(
                    "{}: {}: {} (checks that depend on it are skipped)",
                    p.object, p.field, p.message
                ),
            );
            f.peer_node = p.node.clone();
            f.evidence.details.insert("object".into(), p.object.clone());
            f.evidence.details.insert("field".into(), p.field.clone());
            f
        })
        .collect();
    if !desired.local_node.is_empty()
        && !desired.nodes.contains_key(&desired.local_node)
        && !desired.non_vxlan.contains_key(&desired.local_node)
    {
        out.push(Finding::new(
            CheckId::DatastoreInvalid,
            Severity::Warning,
            device,
            format!(
                "local node {:?} is not in the datastore ({}): every node in it is treated as a \
                 peer; set node_name in the config if the host name differs from the node name",
                desired.local_node, desired.source
            ),
        ));
    }
    out
}

/// One `datastore-stale` warning naming every stale resource and why, and saying what the
/// checks run against now; none when the datastore is fresh.
fn stale(h: &DatastoreHealth, device: &str) -> Option<Finding> {
    let source = &h.source;
    let nodes = h.nodes;
    if let Some(why) = &h.watch_ended {
        let mut f = Finding::new(
            CheckId::DatastoreStale,
            Severity::Warning,
            device,
            format!(
                "datastore {source} is stale: {why}; checks run against the last good state \
                 ({nodes} nodes) until the list/watch is re-established"
            ),
        );
        f.evidence.details.insert("source".into(), source.clone());
        f.evidence
            .details
            .insert("watch-ended".into(), why.to_string());
        f.hint = Some(
            "the agent reconnects by itself; if this persists, see the agent's log for why the \
             watch ended and check the API server (`kubectl get nodes` with the agent's \
             kubeconfig)"
                .to_string(),
        );
        return Some(f);
    }
    if h.stale.is_empty() {
        return None;
    }
    let missed = h.stale.iter().any(|c| c.kind == StaleNote::MISSED_EVENTS);
    let unreachable = h.stale.iter().any(|c| c.kind != StaleNote::MISSED_EVENTS);
    let basis = if unreachable {
        format!(
            "checks run against the last good state ({nodes} nodes) until the API server \
             answers again"
        )
    } else {
        format!(
            "checks run against the relisted state ({nodes} nodes); the watch is being \
             re-established"
        )
    };
    let causes: Vec<&str> = h.stale.iter().map(|c| c.text.as_str()).collect();
    let mut f = Finding::new(
        CheckId::DatastoreStale,
        Severity::Warning,
        device,
        format!(
            "datastore {source} is stale: {}; {basis}",
            causes.join("; ")
        ),
    );
    f.evidence.details.insert("source".into(), source.clone());
    for c in &h.stale {
        f.evidence
            .details
            .insert(format!("{}.{}", c.resource, c.kind), c.text.clone());
    }
    if h.relist_mismatches > 0 {
        f.evidence
            .details
            .insert("relist_mismatches".into(), h.relist_mismatches.to_string());
    }
    f.hint = Some(if missed {
        "the API server's watch stopped delivering changes while lists see them (the k8s03 \
         incident's cause): compare `kubectl get nodes -o yaml` with `kubectl get nodes --watch`, \
         and if watches stay silent restart the datastore first, then the API server (MicroK8s: \
         snap.microk8s.daemon-k8s-dqlite, then snap.microk8s.daemon-kubelite)"
            .to_string()
    } else {
        "check the API server and this node's credentials (`kubectl get nodes` with the agent's \
         kubeconfig); the agent reconnects by itself"
            .to_string()
    });
    Some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(stale: &[(&str, &'static str)]) -> DatastoreHealth {
        DatastoreHealth {
            source: "kubernetes:https://10.0.0.1:6443".into(),
            nodes: 3,
            stale: stale
                .iter()
                .map(|(resource, kind)| StaleNote {
                    resource: resource.to_string(),
                    kind,
                    text: format!("{resource}: {kind}"),
                })
                .collect(),
            relist_mismatches: 0,
            watch_ended: None,
        }
    }

    #[test]
    fn fresh_is_silent_and_stale_is_one_warning_naming_every_cause() {
        let spec = [DeviceSpec::for_name("vxlan.calico")];
        assert!(findings(None, Some(&health(&[])), &spec).is_empty());
        let f = findings(
            None,
            Some(&health(&[
                ("nodes", "no-contact"),
                ("ipamblocks", StaleNote::MISSED_EVENTS),
            ])),
            &spec,
        );
        assert_eq!(f.len(), 1);
        let f = &f[0];
        assert_eq!(
            (f.check, f.severity),
            (CheckId::DatastoreStale, Severity::Warning)
        );
        assert!(
            f.message
                .contains("nodes: no-contact; ipamblocks: missed-events"),
            "{}",
            f.message
        );
        assert!(
            f.message.contains("last good state (3 nodes)"),
            "{}",
            f.message
        );
        assert_eq!(
            f.evidence.details["ipamblocks.missed-events"],
            "ipamblocks: missed-events"
        );
    }

    #[test]
    fn missed_events_alone_say_the_relisted_state_is_used() {
        let spec = [DeviceSpec::for_name("vxlan.calico")];
        let f = findings(
            None,
            Some(&health(&[("nodes", StaleNote::MISSED_EVENTS)])),
            &spec,
        );
        assert!(f[0].message.contains("relisted state"), "{}", f[0].message);
        assert!(f[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("watch stopped delivering"));
    }

    #[test]
    fn an_ended_watch_says_why_and_what_the_checks_use() {
        let spec = [DeviceSpec::for_name("vxlan.calico")];
        let mut h = health(&[("nodes", "no-contact")]);
        h.watch_ended = Some("credentials rejected".into());
        let f = findings(None, Some(&h), &spec);
        assert_eq!(
            f.len(),
            1,
            "the ended watch supersedes the per-resource causes"
        );
        assert!(
            f[0].message.contains("credentials rejected"),
            "{}",
            f[0].message
        );
        assert_eq!(f[0].evidence.details["watch-ended"], "credentials rejected");
    }
}
