//! The incident's other silent failure: a kubelet whose watch is dead. The pods the API server
//! has bound to this node are compared with the pods the kubelet itself lists (through the
//! API server's node proxy). Pure: the lists come in, findings go out.
//!
//! - `kubelet-watch-stalled` (critical): pods bound for longer than `threshold` that the
//!   kubelet does not know (in the incident, calico-node sat Pending for 35 minutes).
//! - `pod-stuck-terminating` (warning): pods whose deletionTimestamp (it already includes the
//!   grace period) is older than `threshold` and that the kubelet still lists (44 minutes).
//! - `kubelet-unverifiable` (warning): the lists could not be read; never a guess.
//!
//! Mirror (static) pods, pods the kubelet rejected (phase `Failed` with a reason) and finished
//! pods do not count.

use std::time::{Duration, SystemTime};

use crate::model::{CheckId, Finding, Severity};

/// `device` of kubelet findings: they are about the node, not an overlay device.
pub const KUBELET_DEVICE: &str = "kubelet";

/// A pod as the API server has it (bound to this node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// When it was bound (the `PodScheduled` condition), else created.
    pub bound_at: Option<SystemTime>,
    pub deletion: Option<SystemTime>,
    pub phase: Option<String>,
    pub reason: Option<String>,
    /// `kubernetes.io/config.mirror`: the API's copy of a static pod.
    pub mirror: bool,
}

/// A pod as the kubelet lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

fn age(now: SystemTime, at: Option<SystemTime>) -> Option<Duration> {
    at.map(|t| now.duration_since(t).unwrap_or_default())
}

fn list(pods: &[(&ApiPod, Duration)]) -> String {
    let mut shown: Vec<String> = pods
        .iter()
        .take(10)
        .map(|(p, age)| format!("{}/{} ({}s)", p.namespace, p.name, age.as_secs()))
        .collect();
    if pods.len() > 10 {
        shown.push(format!("and {} more", pods.len() - 10));
    }
    shown.join(", ")
}

/// The recovery the incident needed, said generically.
pub fn recovery_hint(node: &str) -> String {
    format!(
        "kubectl cordon {node}; if the API server's watch cache is implicated (other watchers \
         stalled too), restart the datastore/kine service first (MicroK8s: systemctl restart \
         snap.microk8s.daemon-k8s-dqlite); restart the kubelet (MicroK8s: systemctl restart \
         snap.microk8s.daemon-kubelite); verify with kubectl get --raw \
         /api/v1/nodes/{node}/proxy/pods; kubectl uncordon {node}"
    )
}

/// Compares the two lists at `now`.
pub fn findings(
    node: &str,
    api: &[ApiPod],
    kubelet: &[KubeletPod],
    threshold: Duration,
    now: SystemTime,
) -> Vec<Finding> {
    let known = |p: &ApiPod| {
        kubelet.iter().any(|k| {
            (!k.uid.is_empty() && k.uid == p.uid)
                || (k.uid.is_empty() && k.namespace == p.namespace && k.name == p.name)
        })
    };
    // Pods the kubelet rejected (admission: OutOfcpu, NodeAffinity, …) are `Failed` with a
    // reason, and finished pods are `Succeeded`/`Failed`: the kubelet knew them to end them,
    // and may have forgotten them since. Neither is a sign of a dead watch.
    let counts =
        |p: &ApiPod| !p.mirror && !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed"));
    let mut out = Vec::new();

    let mut stalled: Vec<(&ApiPod, Duration)> = api
        .iter()
        .filter(|p| counts(p) && p.deletion.is_none())
        .filter_map(|p| Some((p, age(now, p.bound_at)?)))
        .filter(|(p, age)| *age > threshold && !known(p))
        .collect();
    stalled.sort_by_key(|p| std::cmp::Reverse(p.1));
    if !stalled.is_empty() {
        let mut f = Finding::new(
            CheckId::KubeletWatchStalled,
            Severity::Critical,
            KUBELET_DEVICE,
            format!(
                "the kubelet on {node} does not know {} pod(s) bound to it for longer than {}s: \
                 {} — its watch of the API server is probably dead (the node still looks Ready)",
                stalled.len(),
                threshold.as_secs(),
                list(&stalled)
            ),
        );
        f.evidence.details.insert("pods".into(), list(&stalled));
        f.evidence
            .details
            .insert("oldest_seconds".into(), stalled[0].1.as_secs().to_string());
        f.hint = Some(recovery_hint(node));
        out.push(f);
    }

    let mut stuck: Vec<(&ApiPod, Duration)> = api
        .iter()
        .filter(|p| !p.mirror)
        .filter_map(|p| Some((p, age(now, p.deletion)?)))
        .filter(|(p, age)| *age > threshold && known(p))
        .collect();
    stuck.sort_by_key(|p| std::cmp::Reverse(p.1));
    if !stuck.is_empty() {
        let mut f = Finding::new(
            CheckId::PodStuckTerminating,
            Severity::Warning,
            KUBELET_DEVICE,
            format!(
                "{} pod(s) on {node} were deleted more than {}s ago (grace period included) and \
                 the kubelet still runs them: {} — it did not receive the deletion",
                stuck.len(),
                threshold.as_secs(),
                list(&stuck)
            ),
        );
        f.evidence.details.insert("pods".into(), list(&stuck));
        f.hint = Some(recovery_hint(node));
        out.push(f);
    }
    out
}

/// The check could not run: a clear warning, never a `kubelet-*` verdict.
pub fn unverifiable(node: &str, why: &str) -> Finding {
    let mut f = Finding::new(
        CheckId::KubeletUnverifiable,
        Severity::Warning,
        KUBELET_DEVICE,
        format!("cannot check the kubelet on {node}: {why}"),
    );
    f.evidence.details.insert("error".into(), why.to_string());
    f.hint = Some(format!(
        "check the agent's RBAC (pods list, nodes/proxy get: systemd/rbac.yaml) and that the \
         API server can reach the kubelet: kubectl get --raw /api/v1/nodes/{node}/proxy/pods"
    ));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(120);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn pod(name: &str, bound: u64) -> ApiPod {
        ApiPod {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            bound_at: Some(at(bound)),
            deletion: None,
            phase: Some("Pending".into()),
            reason: None,
            mirror: false,
        }
    }

    fn seen(p: &ApiPod) -> KubeletPod {
        KubeletPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            uid: p.uid.clone(),
        }
    }

    const NOW: u64 = 10_000;

    #[test]
    fn a_healthy_kubelet_knows_every_bound_pod() {
        let api = vec![pod("a", 100), pod("b", 200)];
        let kubelet: Vec<_> = api.iter().map(seen).collect();
        assert!(findings("k8s03", &api, &kubelet, T, at(NOW)).is_empty());
    }

    #[test]
    fn a_pod_the_kubelet_never_saw_past_the_threshold_is_a_stalled_watch() {
        let api = vec![
            pod("calico-node-sqfcs", NOW - 2100),
            pod("young", NOW - 30),
            pod("known", 100),
        ];
        let kubelet = vec![seen(&api[2])];
        let f = findings("k8s03", &api, &kubelet, T, at(NOW));
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].check, CheckId::KubeletWatchStalled);
        assert_eq!(f[0].severity, Severity::Critical);
        assert!(
            f[0].message.contains("default/calico-node-sqfcs (2100s)"),
            "{}",
            f[0].message
        );
        assert!(!f[0].message.contains("young"), "{}", f[0].message);
        assert!(f[0]
            .hint
            .as_deref()
            .unwrap()
            .contains("kubectl cordon k8s03"));
        // It appears on the kubelet: cleared.
        let kubelet: Vec<_> = api.iter().map(seen).collect();
        assert!(findings("k8s03", &api, &kubelet, T, at(NOW)).is_empty());
    }

    #[test]
    fn mirror_rejected_and_finished_pods_do_not_count() {
        let mut mirror = pod("kube-apiserver-k8s03", 100);
        mirror.mirror = true;
        let mut rejected = pod("too-big", 100);
        rejected.phase = Some("Failed".into());
        rejected.reason = Some("OutOfcpu".into());
        let mut done = pod("job-1", 100);
        done.phase = Some("Succeeded".into());
        assert!(findings("n", &[mirror, rejected, done], &[], T, at(NOW)).is_empty());
    }

    #[test]
    fn a_deleted_pod_the_kubelet_still_runs_is_stuck_terminating() {
        let mut stuck = pod("argocd-redis-ha-server-2", 100);
        stuck.deletion = Some(at(NOW - 2640));
        let mut fresh = pod("going", 100);
        fresh.deletion = Some(at(NOW - 10));
        let mut gone = pod("gone", 100);
        gone.deletion = Some(at(NOW - 2640));
        let kubelet = vec![seen(&stuck), seen(&fresh)];
        let f = findings("k8s03", &[stuck, fresh, gone], &kubelet, T, at(NOW));
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].check, CheckId::PodStuckTerminating);
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(f[0].message.contains("argocd-redis-ha-server-2 (2640s)"));
        assert!(!f[0].message.contains("going"));
    }

    #[test]
    fn a_pod_recreated_under_its_old_name_is_matched_by_uid() {
        // A StatefulSet pod deleted and recreated: same name, new uid; the kubelet only
        // knows the old one.
        let new = pod("web-0", 100);
        let mut old = seen(&new);
        old.uid = "uid-old".into();
        let f = findings("n", &[new], &[old], T, at(NOW));
        assert_eq!(f[0].check, CheckId::KubeletWatchStalled);
    }
}
