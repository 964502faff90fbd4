//! Connecting: where the credentials come from and which APIs serve the resources we read.

use std::{borrow::Cow, path::PathBuf};

use kube::{
    api::{ApiResource, ObjectMeta},
    core::GroupVersion,
    discovery::{self, verbs},
    Client, Config, Resource,
};

use super::{error::bounded, KubeError, KubeSourceConfig, LiteObject, Result};

/// Where MicroK8s keeps a kubeconfig for its own cluster.
pub const MICROK8S_KUBECONFIG: &str = "/var/snap/microk8s/current/credentials/client.config";

/// Calico IPAM group/versions, in order of preference: Calico ≥ 3.32 may serve IPAM natively as
/// `projectcalico.org/v3`; older releases keep it in the `crd.projectcalico.org/v1` CRDs.
pub const IPAM_APIS: [&str; 2] = ["projectcalico.org/v3", "crd.projectcalico.org/v1"];

// `LiteObject` is served by every resource we read; its type information is the discovered
// `ApiResource`, exactly like kube's `DynamicObject`.
impl Resource for LiteObject {
    type DynamicType = ApiResource;
    type Scope = kube::core::DynamicResourceScope;

    fn group(dt: &ApiResource) -> Cow<'_, str> {
        dt.group.as_str().into()
    }
    fn version(dt: &ApiResource) -> Cow<'_, str> {
        dt.version.as_str().into()
    }
    fn kind(dt: &ApiResource) -> Cow<'_, str> {
        dt.kind.as_str().into()
    }
    fn api_version(dt: &ApiResource) -> Cow<'_, str> {
        dt.api_version.as_str().into()
    }
    fn plural(dt: &ApiResource) -> Cow<'_, str> {
        dt.plural.as_str().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The resources read, as discovered.
#[derive(Debug, Clone)]
pub(super) struct Apis {
    pub(super) nodes: ApiResource,
    pub(super) blocks: Option<ApiResource>,
    pub(super) affinities: Option<ApiResource>,
    /// Calico's configuration, read where served and allowed (see `notes` otherwise).
    pub(super) pools: Option<ApiResource>,
    pub(super) felix: Option<ApiResource>,
    /// Why a resource is not read: it degrades to the config keys, never to a false finding.
    pub(super) notes: Vec<String>,
}

/// What discovery found for Calico.
#[derive(Debug, Clone)]
pub(super) struct CalicoApis {
    pub(super) blocks: ApiResource,
    pub(super) affinities: Option<ApiResource>,
    pub(super) pools: Option<ApiResource>,
    pub(super) felix: Option<ApiResource>,
    pub(super) notes: Vec<String>,
}

/// The client configuration: an explicit kubeconfig, else what kube infers (KUBECONFIG,
/// `~/.kube/config`, in-cluster), else MicroK8s's own kubeconfig.
pub(super) async fn load_config(cfg: &KubeSourceConfig) -> Result<Config> {
    let from_file = |path: PathBuf| async move {
        let kc =
            kube::config::Kubeconfig::read_from(&path).map_err(|source| KubeError::Kubeconfig {
                path: path.clone(),
                source,
            })?;
        Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|source| KubeError::Kubeconfig { path, source })
    };
    if let Some(path) = &cfg.kubeconfig {
        return from_file(path.clone()).await;
    }
    match Config::infer().await {
        Ok(c) => Ok(c),
        Err(e) if std::path::Path::new(MICROK8S_KUBECONFIG).exists() => {
            tracing::info!(error = %e, path = MICROK8S_KUBECONFIG, "using the MicroK8s kubeconfig");
            from_file(PathBuf::from(MICROK8S_KUBECONFIG)).await
        }
        Err(e) => Err(KubeError::Infer(e)),
    }
}

/// Finds which group/version serves Calico's IPAM resources. `pinned_group` costs one request
/// per candidate and works with or without aggregated discovery; a candidate that errors (an
/// aggregated Calico API server that is down) is skipped, not fatal.
pub(super) async fn discover_ipam(client: &Client, cfg: &KubeSourceConfig) -> Result<CalicoApis> {
    let candidates: Vec<&str> = match &cfg.ipam_api {
        Some(forced) => vec![forced.as_str()],
        None => IPAM_APIS.to_vec(),
    };
    let mut found: Vec<(String, Vec<ApiResource>)> = Vec::new();
    // A candidate that is simply not served answers 404; anything else (unreachable, 403)
    // is reported if nothing is found, rather than a misleading "no IPAM API".
    let mut failure: Option<KubeError> = None;
    for gv_str in &candidates {
        let Ok(gv) = gv_str.parse::<GroupVersion>() else {
            tracing::warn!(api = gv_str, "not a group/version; skipped");
            continue;
        };
        let res = bounded(
            || format!("discovering {gv_str}"),
            cfg.request_timeout,
            discovery::pinned_group(client, &gv),
        )
        .await;
        match res {
            Ok(group) => {
                let listable = group
                    .versioned_resources(&gv.version)
                    .into_iter()
                    .filter(|(_, caps)| {
                        caps.supports_operation(verbs::LIST)
                            && caps.supports_operation(verbs::WATCH)
                    })
                    .map(|(ar, _)| ar)
                    .collect();
                found.push((gv_str.to_string(), listable));
            }
            Err(e) => {
                tracing::debug!(api = gv_str, error = %e, "IPAM API candidate not served");
                let not_served = matches!(
                    &e,
                    KubeError::Api { source: kube::Error::Api(s), .. } if s.code == 404
                );
                if !not_served {
                    failure.get_or_insert(e);
                }
            }
        }
    }
    if found.is_empty() {
        if let Some(e) = failure {
            return Err(e);
        }
    }
    let pick = |plural: &str, prefer: Option<&str>| {
        let in_gv = |gv: &str| {
            found
                .iter()
                .filter(|(g, _)| g == gv)
                .flat_map(|(_, rs)| rs.iter())
                .find(|ar| ar.plural == plural)
                .cloned()
        };
        prefer
            .and_then(in_gv)
            .or_else(|| found.iter().find_map(|(g, _)| in_gv(g)))
    };
    let blocks = pick("ipamblocks", None).ok_or_else(|| KubeError::NoIpamApi {
        tried: candidates.join(", "),
    })?;
    let affinities = pick("blockaffinities", Some(&blocks.api_version));
    // Calico's configuration: the aggregated v3 API first (it is what calicoctl and the
    // operator write through), else the CRDs it is stored in; same fields in both.
    let mut notes = Vec::new();
    let mut config = |plural: &str, without: &str| {
        let found = pick(plural, None);
        if found.is_none() {
            notes.push(format!(
                "{plural}: not served by {}: {without}",
                candidates.join(" or ")
            ));
        }
        found
    };
    let pools = config("ippools", POOLS_UNREAD);
    let felix = config("felixconfigurations", FELIX_UNREAD);
    tracing::info!(
        ipamblocks = %blocks.api_version,
        blockaffinities = ?affinities.as_ref().map(|a| &a.api_version),
        ippools = ?pools.as_ref().map(|a| &a.api_version),
        felixconfigurations = ?felix.as_ref().map(|a| &a.api_version),
        "discovered Calico APIs"
    );
    Ok(CalicoApis {
        blocks,
        affinities,
        pools,
        felix,
        notes,
    })
}

/// What the checks assume without the IP pools.
pub(super) const POOLS_UNREAD: &str = "every block is taken as VXLAN";
/// What the checks assume without the FelixConfigurations.
pub(super) const FELIX_UNREAD: &str =
    "VNI, port and MTU from the config keys (vxlan_vni, vxlan_port, vxlan_mtu)";

/// Keeps `ar` only if listing it is allowed: a resource the agent's RBAC does not grant is
/// noted (and its fallback used) instead of failing the datastore over and over.
pub(super) async fn probe_readable(
    client: &Client,
    cfg: &KubeSourceConfig,
    ar: Option<ApiResource>,
    without: &str,
    notes: &mut Vec<String>,
) -> Option<ApiResource> {
    let ar = ar?;
    let api: kube::Api<LiteObject> = kube::Api::all_with(client.clone(), &ar);
    let res = bounded(
        || format!("listing {}", ar.plural),
        cfg.request_timeout,
        api.list(&kube::api::ListParams::default().limit(1)),
    )
    .await;
    let (why, message) = match res {
        Err(KubeError::Forbidden { message, .. }) => ("forbidden by RBAC", message),
        Err(KubeError::Api {
            source: kube::Error::Api(s),
            ..
        }) if s.code == 404 => ("not found", s.message.clone()),
        // Anything else (a timeout, a 5xx) is the list/watch loop's to retry and report.
        _ => return Some(ar),
    };
    tracing::warn!(resource = %ar.plural, api = %ar.api_version, why, "cannot read Calico configuration; degrading to the config keys");
    notes.push(format!(
        "{}/{}: {why} ({message}): {without}",
        ar.api_version, ar.plural
    ));
    None
}
