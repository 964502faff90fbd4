//! The two pod lists the kubelet check compares: what the API server has bound to a node
//! (`GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`), and what the kubelet itself knows
//! (`GET /api/v1/nodes/<node>/proxy/pods`, through the API server). I/O only; the verdict is
//! [`crate::checks::kubelet`]'s.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::{error::bounded, KubeError, KubeSource, Result};
use crate::checks::kubelet::{ApiPod, KubeletPod};

/// Pods per list page: a node runs at most a few hundred.
const PAGE: u32 = 500;

fn time(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.0.as_second().max(0) as u64)
}

fn api_pod(p: &Pod) -> ApiPod {
    let meta = &p.metadata;
    let status = p.status.as_ref();
    let bound_at = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "True")
        })
        .and_then(|c| c.last_transition_time.as_ref())
        .or(meta.creation_timestamp.as_ref())
        .map(time);
    ApiPod {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        bound_at,
        deletion: meta.deletion_timestamp.as_ref().map(time),
        phase: status.and_then(|s| s.phase.clone()),
        reason: status.and_then(|s| s.reason.clone()),
        mirror: meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")),
    }
}

impl KubeSource {
    /// The pods the API server has bound to `node`, every page.
    pub async fn node_pods(&self, node: &str) -> Result<Vec<ApiPod>> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let mut params = ListParams::default()
            .fields(&format!("spec.nodeName={node}"))
            .limit(PAGE);
        let mut out = Vec::new();
        loop {
            let page = bounded(
                || format!("listing the pods bound to {node}"),
                self.cfg.request_timeout,
                api.list(&params),
            )
            .await?;
            out.extend(page.items.iter().map(api_pod));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => return Ok(out),
            }
        }
    }

    /// The pods the kubelet on `node` knows, through the API server's node proxy.
    pub async fn kubelet_pods(&self, node: &str) -> Result<Vec<KubeletPod>> {
        let what = || format!("asking the kubelet on {node} for its pods (nodes/proxy)");
        let req = hyper::Request::get(format!("/api/v1/nodes/{node}/proxy/pods"))
            .body(Vec::new())
            .map_err(|e| KubeError::Request {
                what: what(),
                message: e.to_string(),
            })?;
        let list: k8s_openapi::List<Pod> =
            bounded(what, self.cfg.request_timeout, self.client.request(req)).await?;
        Ok(list
            .items
            .iter()
            .map(|p| KubeletPod {
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                uid: p.metadata.uid.clone().unwrap_or_default(),
            })
            .collect())
    }
}

impl KubeSource {
    /// One run of the kubelet check for this agent's node: both lists, compared at `now`; a
    /// list that cannot be read gives `kubelet-unverifiable`, never a `kubelet-*` verdict.
    pub async fn kubelet_check(&self, threshold: Duration) -> Vec<crate::model::Finding> {
        use crate::checks::kubelet;
        let node = self.local_node();
        let (api, seen) = tokio::join!(self.node_pods(&node), self.kubelet_pods(&node));
        match (api, seen) {
            (Ok(api), Ok(seen)) => {
                kubelet::findings(&node, &api, &seen, threshold, SystemTime::now())
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(node = %node, error = %e, "kubelet check could not run");
                vec![kubelet::unverifiable(&node, &e.to_string())]
            }
        }
    }
}
