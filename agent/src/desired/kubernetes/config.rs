//! Settings of the Kubernetes source, and how they follow from the agent config.

use std::{path::PathBuf, time::Duration};

use super::KubeProfile;

/// Settings of the Kubernetes source. Every field has a default.
#[derive(Debug, Clone)]
pub struct KubeSourceConfig {
    /// Kubeconfig file; `None` infers (KUBECONFIG, ~/.kube/config, in-cluster, MicroK8s).
    pub kubeconfig: Option<PathBuf>,
    /// The local node (its own entry is in the desired state too; checks skip it).
    pub node_name: String,
    pub profile: KubeProfile,
    /// Force the IPAM group/version (`crd.projectcalico.org/v1`) instead of discovering it.
    pub ipam_api: Option<String>,
    /// Full consistent relist compared with the watch cache.
    pub relist_interval: Duration,
    /// No contact with the API server (list, watch start, event or bookmark) for this long
    /// flags the snapshot stale.
    pub stale_after: Duration,
    /// Server-side watch timeout; a stream silent for this long plus 5 s is dropped.
    pub watch_timeout: Duration,
    /// Bound on one list/discovery/patch call. kube silently retries 503s with backoff, so
    /// without this an unavailable server looks like a slow call, not an error.
    pub request_timeout: Duration,
    /// After a relist that differs, how long the watch may still deliver the difference
    /// before it counts as missed (events in flight during the list are not a fault).
    pub relist_grace: Duration,
    /// Upper bound of the retry backoff after errors.
    pub retry_max: Duration,
    /// Page size of lists: bounds memory at 5,000 nodes.
    pub page_size: u32,
    /// Coalesce bursts of events into one rebuild of the desired state.
    pub debounce: Duration,
    /// Patch the `VXLANDataplaneHealthy` condition on the local Node.
    pub publish_condition: bool,
    /// Re-patch an unchanged condition this often (refreshes lastHeartbeatTime).
    pub condition_refresh: Duration,
    /// Create Events on the local Node for new critical findings.
    pub publish_events: bool,
    /// Namespace for Node events (kubelet uses `default`).
    pub event_namespace: String,
    /// Repeats of one finding within this window update the same Event (count + 1).
    pub event_aggregation_window: Duration,
    /// An aggregated Event is re-patched at most this often.
    pub event_update_interval: Duration,
    /// At most this many new Events per minute; the rest are counted, not sent.
    pub events_per_minute: u32,
}

impl Default for KubeSourceConfig {
    fn default() -> Self {
        KubeSourceConfig {
            kubeconfig: None,
            node_name: String::new(),
            profile: KubeProfile::Calico,
            ipam_api: None,
            relist_interval: Duration::from_secs(300),
            stale_after: Duration::from_secs(600),
            watch_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(30),
            relist_grace: Duration::from_secs(2),
            // Recovery within a few seconds of the API server answering again; with jitter,
            // 5,000 agents retry at ~1,000/s at worst, spread, not in bursts.
            retry_max: Duration::from_secs(5),
            page_size: 500,
            debounce: Duration::from_millis(100),
            publish_condition: false,
            condition_refresh: Duration::from_secs(300),
            publish_events: false,
            event_namespace: "default".to_string(),
            event_aggregation_window: Duration::from_secs(600),
            event_update_interval: Duration::from_secs(60),
            events_per_minute: 10,
        }
    }
}

impl KubeSourceConfig {
    /// The source's settings from the agent config: `[datastore]` keys plus `node_name` and
    /// `profile`; everything else keeps its default.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let ds = &config.datastore;
        KubeSourceConfig {
            kubeconfig: ds.kubeconfig.clone(),
            node_name: config.node_name.clone(),
            profile: match config.profile {
                crate::config::Profile::Calico => KubeProfile::Calico,
                crate::config::Profile::Flannel => KubeProfile::Flannel,
            },
            ipam_api: ds.ipam_api.clone(),
            relist_interval: ds.relist_interval,
            stale_after: ds.stale_after,
            publish_condition: ds.publish_node_condition,
            publish_events: ds.publish_events,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::kubernetes::MICROK8S_KUBECONFIG;

    #[test]
    fn config_maps_every_datastore_key() {
        let text = r#"
node_name = "k8s02"
profile = "flannel"
[datastore]
source = "kubernetes"
kubeconfig = "/var/snap/microk8s/current/credentials/client.config"
relist_interval = "2m"
stale_after = "7m"
publish_node_condition = true
publish_events = true
ipam_api = "projectcalico.org/v3"
"#;
        let config =
            crate::config::Config::from_toml(text, std::path::Path::new("/etc/x.toml")).unwrap();
        let k = KubeSourceConfig::from_config(&config);
        assert_eq!(
            k.kubeconfig.as_deref(),
            Some(std::path::Path::new(MICROK8S_KUBECONFIG))
        );
        assert_eq!(k.node_name, "k8s02");
        assert_eq!(k.profile, KubeProfile::Flannel);
        assert_eq!(k.relist_interval, Duration::from_secs(120));
        assert_eq!(k.stale_after, Duration::from_secs(420));
        assert!(k.publish_condition && k.publish_events);
        assert_eq!(k.ipam_api.as_deref(), Some("projectcalico.org/v3"));
        let d = KubeSourceConfig::from_config(&crate::config::Config::with_node_name("n"));
        assert_eq!(d.kubeconfig, None);
        assert_eq!(d.profile, KubeProfile::Calico);
        assert!(!d.publish_condition && !d.publish_events);
        assert_eq!(d.relist_interval, Duration::from_secs(300));
    }
}
