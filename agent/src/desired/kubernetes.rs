//! Kubernetes datastore: Nodes (+ Calico IPAMBlocks and BlockAffinities) → [`DesiredState`].
//!
//! Two ways in:
//! - [`KubeSource::list_once`]: one consistent list of everything, for `watchdog scan`.
//! - [`KubeSource::spawn`]: list + watch per resource in the background, publishing a
//!   [`KubeSnapshot`] (desired state + datastore health) on a `tokio::sync::watch` channel.
//!
//! The incident this project exists for was an event-only consumer that missed one event and
//! kept a stale view for two hours while its watch looked healthy. So the watch is not trusted:
//! - a short server-side watch timeout, plus a client-side idle limit: a stream that delivers
//!   neither event nor bookmark is dropped and re-established;
//! - a periodic consistent relist (default 5 min) compared with the cache: a difference means
//!   the watch missed events; the snapshot is flagged stale, the cache is replaced by the relist
//!   and the watch restarted from the relist's resourceVersion;
//! - when the API server is unreachable the last good state is kept and reported with its age;
//!   after `stale_after` without contact the snapshot is flagged stale; it recovers by itself.
//!
//! Credentials: an explicit kubeconfig path, else `KUBECONFIG` / `~/.kube/config` / the
//! in-cluster service account, else MicroK8s's [`MICROK8S_KUBECONFIG`].

mod parse;
mod publish;
mod store;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use kube::{
    api::{Api, ApiResource, ListParams, ObjectMeta, WatchEvent, WatchParams},
    core::GroupVersion,
    discovery::{self, verbs},
    Client, Config, Resource,
};
use serde::Serialize;
use tokio::{
    sync::{watch, Notify},
    task::JoinSet,
    time::Instant,
};

pub use self::{
    parse::{build_desired, AffinityInfo, BlockInfo, CacheView, KubeProfile, LiteObject, NodeInfo},
    publish::EventOutcome,
    store::{Difference, Entry, Store},
};
use crate::model::{CheckId, DesiredState, Finding, Severity};

/// Where MicroK8s keeps a kubeconfig for its own cluster.
pub const MICROK8S_KUBECONFIG: &str = "/var/snap/microk8s/current/credentials/client.config";

/// Calico IPAM group/versions, in order of preference: Calico ≥ 3.32 may serve IPAM natively as
/// `projectcalico.org/v3`; older releases keep it in the `crd.projectcalico.org/v1` CRDs.
pub const IPAM_APIS: [&str; 2] = ["projectcalico.org/v3", "crd.projectcalico.org/v1"];

/// Name of the Node condition written by [`KubeSource::publish_condition`].
pub const CONDITION_TYPE: &str = "VXLANDataplaneHealthy";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes credentials found (KUBECONFIG, ~/.kube/config, in-cluster service account, \
         {MICROK8S_KUBECONFIG}): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "no Calico IPAM API found: none of {tried} serves ipamblocks (set datastore.ipam_api, or \
         use profile = \"flannel\")"
    )]
    NoIpamApi { tried: String },
    /// The API server answered with an error status (other than 403).
    #[error("{what}: {}", describe_kube_error(source))]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// 403: the credentials lack a verb on a resource. `message` is the server's, which names
    /// the user, verb and resource.
    #[error(
        "{what}: forbidden by RBAC: {message} (the agent needs get/list/watch on nodes and the \
         Calico IPAM resources: apply systemd/rbac.yaml)"
    )]
    Forbidden { what: String, message: String },
    /// No answer at all: connection refused or reset, DNS, TLS.
    #[error("{what}: API server unreachable: {}", describe_kube_error(source))]
    Unreachable {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// Any of the above while connecting to `server` (the kubeconfig's URL): displayed as the
    /// inner error; [`KubeError::server`] lets callers name the source.
    #[error("{error}")]
    AtServer {
        server: String,
        #[source]
        error: Box<KubeError>,
    },
}

impl KubeError {
    /// 401: the server rejected the credentials themselves (expired token, rotated client
    /// certificate). Retrying with the same client cannot help; a reconnect re-reads them.
    fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            KubeError::Api { source: kube::Error::Api(status), .. } if status.code == 401
        )
    }

    /// The API server URL, when the error happened talking to a known one.
    pub fn server(&self) -> Option<&str> {
        match self {
            KubeError::AtServer { server, .. } => Some(server),
            _ => None,
        }
    }

    /// Sorts a client error by what the operator has to do about it.
    fn from_kube(what: String, source: kube::Error) -> Self {
        match &source {
            kube::Error::Api(status) if status.code == 403 => KubeError::Forbidden {
                what,
                message: status.message.clone(),
            },
            kube::Error::Api(_)
            | kube::Error::SerdeError(_)
            | kube::Error::FromUtf8(_)
            | kube::Error::LinesCodecMaxLineLengthExceeded
            | kube::Error::BuildRequest(_)
            | kube::Error::HttpError(_) => KubeError::Api { what, source },
            _ => KubeError::Unreachable { what, source },
        }
    }
}

/// One line for a kube client error: the server's own message for API errors, else the chain
/// of causes (`client error (Connect): tcp connect error: Connection refused (os error 111)`).
fn describe_kube_error(e: &kube::Error) -> String {
    if let kube::Error::Api(status) = e {
        return format!("{} {}: {}", status.code, status.reason, status.message);
    }
    // kube's own wrappers ("ServiceError: client error (Connect)") add a type name, not a fact.
    let start: Option<&(dyn std::error::Error + 'static)> = match e {
        kube::Error::Service(inner) => Some(inner.as_ref()),
        kube::Error::HyperError(inner) => Some(inner),
        _ => Some(e),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut cur = start;
    while let Some(err) = cur {
        let text = err.to_string();
        // Wrappers often repeat their cause's text; keep each fact once.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

pub type Result<T, E = KubeError> = std::result::Result<T, E>;

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
struct Apis {
    nodes: ApiResource,
    blocks: Option<ApiResource>,
    affinities: Option<ApiResource>,
}

/// A connected Kubernetes datastore. Cheap to clone.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    /// `kubernetes:<server url>`, or `kubernetes` for a client built elsewhere.
    source: String,
    cfg: Arc<KubeSourceConfig>,
    apis: Apis,
    publisher: Arc<publish::Publisher>,
}

/// `load` is one consistent list ([`KubeSource::list_once`]); the daemon prefers
/// [`KubeSource::spawn`], which also tracks staleness.
impl super::Datastore for KubeSource {
    async fn load(&mut self) -> std::result::Result<DesiredState, super::DatastoreError> {
        self.list_once()
            .await
            .map_err(|e| super::DatastoreError::Backend {
                source: self.source.clone(),
                error: Box::new(e),
            })
    }

    fn describe(&self) -> String {
        self.source_name()
    }
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("source", &self.source)
            .field("node", &self.cfg.node_name)
            .field("ipam_api", &self.ipam_api())
            .finish()
    }
}

async fn bounded<T>(
    what: impl Fn() -> String,
    after: Duration,
    fut: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(KubeError::from_kube(what(), source)),
        Err(_) => Err(KubeError::Timeout {
            what: what(),
            after,
        }),
    }
}

async fn load_config(cfg: &KubeSourceConfig) -> Result<Config> {
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
async fn discover_ipam(
    client: &Client,
    cfg: &KubeSourceConfig,
) -> Result<(ApiResource, Option<ApiResource>)> {
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
    tracing::info!(
        ipamblocks = %blocks.api_version,
        blockaffinities = ?affinities.as_ref().map(|a| &a.api_version),
        "discovered Calico IPAM API"
    );
    Ok((blocks, affinities))
}

/// Lists every object of a resource, page by page, reducing each to its compact form as it
/// arrives. No `resourceVersion` is sent: the read is consistent (from etcd/kine), never the
/// API server's watch cache — which is exactly what was stuck in the incident.
async fn list_all<T>(
    api: &Api<LiteObject>,
    compact: fn(&LiteObject) -> T,
    page_size: u32,
) -> kube::Result<Store<T>> {
    let mut store = Store::default();
    let mut lp = ListParams::default().limit(page_size);
    loop {
        let list = api.list(&lp).await?;
        for obj in &list.items {
            store.items.insert(
                obj.name().to_string(),
                Entry {
                    rv: obj.metadata.resource_version.clone().unwrap_or_default(),
                    item: compact(obj),
                },
            );
        }
        if store.position.is_empty() {
            store.position = list.metadata.resource_version.unwrap_or_default();
        }
        match list.metadata.continue_ {
            Some(c) if !c.is_empty() => lp.continue_token = Some(c),
            _ => break,
        }
    }
    Ok(store)
}

impl KubeSource {
    /// Builds the client from the configured credentials and, for Calico, discovers which API
    /// serves the IPAM objects. Fails if the API server cannot be reached for discovery.
    pub async fn connect(cfg: KubeSourceConfig) -> Result<Self> {
        let mut kcfg = load_config(&cfg).await?;
        kcfg.connect_timeout = Some(cfg.request_timeout.min(Duration::from_secs(10)));
        let server = kcfg
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let at = |error| KubeError::AtServer {
            server: server.clone(),
            error: Box::new(error),
        };
        let client = Client::try_from(kcfg).map_err(|e| at(KubeError::Client(e)))?;
        let mut src = Self::with_client(client, cfg).await.map_err(at)?;
        src.source = format!("kubernetes:{server}");
        Ok(src)
    }

    /// [`connect`](Self::connect) until it succeeds, backing off from 250 ms to
    /// `retry_max`; every failure is handed to `on_error` (log it, put it in the status).
    /// For the daemon: an API server that is down at boot (MicroK8s still starting) must not
    /// stop the agent — run this in a task and start the kernel-only checks meanwhile.
    pub async fn connect_retrying(
        cfg: KubeSourceConfig,
        mut on_error: impl FnMut(&KubeError),
    ) -> Self {
        let mut backoff = Backoff::new(cfg.retry_max);
        loop {
            match Self::connect(cfg.clone()).await {
                Ok(src) => return src,
                Err(e) => {
                    on_error(&e);
                    backoff.wait().await;
                }
            }
        }
    }

    /// Like [`connect`](Self::connect) with a client built elsewhere.
    pub async fn with_client(client: Client, cfg: KubeSourceConfig) -> Result<Self> {
        let nodes = ApiResource::erase::<k8s_openapi::api::core::v1::Node>(&());
        let (blocks, affinities) = match cfg.profile {
            KubeProfile::Calico => {
                let (b, a) = discover_ipam(&client, &cfg).await?;
                (Some(b), a)
            }
            KubeProfile::Flannel => (None, None),
        };
        Ok(KubeSource {
            publisher: Arc::new(publish::Publisher::default()),
            client,
            source: "kubernetes".to_string(),
            cfg: Arc::new(cfg),
            apis: Apis {
                nodes,
                blocks,
                affinities,
            },
        })
    }

    /// The IPAM group/version in use (`crd.projectcalico.org/v1`), `None` for flannel.
    pub fn ipam_api(&self) -> Option<&str> {
        self.apis.blocks.as_ref().map(|b| b.api_version.as_str())
    }

    pub fn config(&self) -> &KubeSourceConfig {
        &self.cfg
    }

    /// `kubernetes:https://10.0.0.1:16443`: names the source in logs, status and findings.
    pub fn source_name(&self) -> String {
        self.source.clone()
    }

    fn api(&self, ar: &ApiResource) -> Api<LiteObject> {
        Api::all_with(self.client.clone(), ar)
    }

    /// One consistent list of every resource, validated into a desired state.
    pub async fn list_once(&self) -> Result<DesiredState> {
        let cfg = &self.cfg;
        let nodes = bounded(
            || "listing nodes".to_string(),
            cfg.request_timeout,
            list_all(
                &self.api(&self.apis.nodes),
                NodeInfo::from_object,
                cfg.page_size,
            ),
        )
        .await?;
        let mut blocks = Store::default();
        if let Some(ar) = &self.apis.blocks {
            blocks = bounded(
                || format!("listing {}", ar.plural),
                cfg.request_timeout,
                list_all(&self.api(ar), BlockInfo::from_object, cfg.page_size),
            )
            .await?;
        }
        let mut affinities = Store::default();
        if let Some(ar) = &self.apis.affinities {
            affinities = bounded(
                || format!("listing {}", ar.plural),
                cfg.request_timeout,
                list_all(&self.api(ar), AffinityInfo::from_object, cfg.page_size),
            )
            .await?;
        }
        let shared = Shared {
            nodes,
            blocks,
            affinities,
            health: BTreeMap::new(),
        };
        Ok(shared.build(cfg, &self.source))
    }

    /// Starts list+watch of every resource in the background (needs a Tokio runtime) and
    /// returns the channel of snapshots. The first value has `synced == false`; a new value is
    /// announced whenever the desired state or the staleness verdict changes (ages in the
    /// current value are kept fresh without an announcement). The background tasks stop when
    /// every receiver is dropped.
    pub fn spawn(&self) -> watch::Receiver<KubeSnapshot> {
        let rt = Arc::new(Runtime::new(self.cfg.clone(), self.source.clone()));
        let mut tasks = JoinSet::new();
        let add = |key: &'static str, ar: &ApiResource| {
            lock(&rt.shared).health.insert(
                key.to_string(),
                ResourceHealth {
                    api: format!("{}/{}", ar.api_version, ar.plural),
                    ..Default::default()
                },
            );
            key
        };
        let key = add("nodes", &self.apis.nodes);
        tasks.spawn(run_resource(
            rt.clone(),
            Watched {
                key,
                api: self.api(&self.apis.nodes),
                compact: NodeInfo::from_object,
                store: |s| &mut s.nodes,
            },
        ));
        if let Some(ar) = &self.apis.blocks {
            let key = add("ipamblocks", ar);
            tasks.spawn(run_resource(
                rt.clone(),
                Watched {
                    key,
                    api: self.api(ar),
                    compact: BlockInfo::from_object,
                    store: |s| &mut s.blocks,
                },
            ));
        }
        if let Some(ar) = &self.apis.affinities {
            let key = add("blockaffinities", ar);
            tasks.spawn(run_resource(
                rt.clone(),
                Watched {
                    key,
                    api: self.api(ar),
                    compact: AffinityInfo::from_object,
                    store: |s| &mut s.affinities,
                },
            ));
        }
        let first = rt.snapshot(Arc::new(DesiredState {
            source: self.source.clone(),
            local_node: self.cfg.node_name.clone(),
            ..Default::default()
        }));
        let (tx, rx) = watch::channel(first.with_ipam(self.ipam_api()));
        tokio::spawn(run_publisher(
            rt,
            tx,
            tasks,
            self.ipam_api().map(str::to_string),
        ));
        rx
    }

    /// Sets the `VXLANDataplaneHealthy` condition on the local Node (strategic merge patch on
    /// `nodes/status`, which merges conditions by type). Returns whether a patch was sent:
    /// an unchanged condition is only re-sent every `condition_refresh`.
    pub async fn publish_condition(
        &self,
        healthy: bool,
        reason: &str,
        message: &str,
    ) -> Result<bool> {
        if !self.cfg.publish_condition {
            return Ok(false);
        }
        publish::publish_condition(self, healthy, reason, message).await
    }

    /// Records a Kubernetes Event on the local Node for a critical finding, aggregated per
    /// finding and rate-limited (see [`EventOutcome`]).
    pub async fn publish_event(&self, finding: &crate::model::Finding) -> Result<EventOutcome> {
        publish::publish_event(self, finding).await
    }
}

// ---------------------------------------------------------------------------------------------
// Background list/watch
// ---------------------------------------------------------------------------------------------

/// Health of one watched resource. Timestamps are wall-clock so they serialize for the status
/// API; ages are computed by the reader.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResourceHealth {
    /// `crd.projectcalico.org/v1/ipamblocks`.
    pub api: String,
    /// The initial list completed.
    pub synced: bool,
    pub objects: usize,
    /// Last ADDED/MODIFIED/DELETED event.
    #[serde(with = "humantime_serde")]
    pub last_event: Option<SystemTime>,
    #[serde(with = "humantime_serde")]
    pub last_bookmark: Option<SystemTime>,
    /// Last successful exchange of any kind (list, watch established, event, bookmark).
    #[serde(with = "humantime_serde")]
    pub last_contact: Option<SystemTime>,
    /// Last successful full list: initial, after 410 Gone or errors, or periodic (matching or
    /// corrected).
    #[serde(with = "humantime_serde")]
    pub last_relist: Option<SystemTime>,
    /// Relists that found the cache differing from the server: missed watch events.
    pub relist_mismatches: u64,
    /// The differences of the last relist, when it found any; cleared by a clean relist.
    pub mismatch: Option<String>,
    /// Watches re-established (server timeout, idle stream, error, 410 Gone).
    pub watch_restarts: u64,
    /// Relists forced by `410 Gone`.
    pub gone: u64,
    pub last_error: Option<String>,
}

/// What [`KubeSource::spawn`] publishes.
#[derive(Debug, Clone, Serialize)]
pub struct KubeSnapshot {
    #[serde(skip)]
    pub desired: Arc<DesiredState>,
    /// Every resource completed its initial list: `desired` is complete.
    pub synced: bool,
    /// The data cannot be trusted to be current: the daemon reports `datastore-stale`.
    pub stale: bool,
    pub stale_reason: Option<String>,
    /// Why, per resource (empty when not stale); `stale_reason` is these joined.
    pub stale_causes: Vec<StaleCause>,
    /// Per resource (`nodes`, `ipamblocks`, `blockaffinities`).
    pub resources: BTreeMap<String, ResourceHealth>,
    /// Sum of the per-resource relist mismatches.
    pub relist_mismatches: u64,
    pub ipam_api: Option<String>,
    /// Set on the last value before the channel closes: why the list/watch ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
}

impl KubeSnapshot {
    fn with_ipam(mut self, ipam: Option<&str>) -> Self {
        self.ipam_api = ipam.map(str::to_string);
        self
    }

    /// Age of the freshest proof that the cache is current (event, bookmark or full list) of
    /// the least recently heard-from resource (`datastore_last_event_age_seconds`). `None`
    /// until every resource has been listed once.
    pub fn last_event_age(&self, now: SystemTime) -> Option<Duration> {
        self.resources
            .values()
            .map(|h| {
                let last = h.last_event.max(h.last_bookmark).max(h.last_relist);
                last.map(|t| now.duration_since(t).unwrap_or_default())
            })
            .try_fold(Duration::ZERO, |acc, age| age.map(|a| acc.max(a)))
    }

    /// The `datastore` section of the status API for this snapshot. `error` is every
    /// resource's last error, when any resource has one.
    pub fn datastore_status(&self, now: SystemTime) -> crate::serve::status::DatastoreStatus {
        let errors: Vec<String> = self
            .resources
            .iter()
            .filter_map(|(k, h)| h.last_error.as_ref().map(|e| format!("{k}: {e}")))
            .collect();
        crate::serve::status::DatastoreStatus {
            source: self.desired.source.clone(),
            last_event_age_seconds: self.last_event_age(now).map(|d| d.as_secs_f64()),
            last_relist: self.last_relist(),
            stale: self.stale,
            nodes: self.desired.nodes.len(),
            problems: self.desired.problems.len(),
            error: (!errors.is_empty()).then(|| errors.join("; ")),
        }
    }

    /// Oldest successful relist over all resources.
    pub fn last_relist(&self) -> Option<SystemTime> {
        self.resources
            .values()
            .map(|h| h.last_relist)
            .try_fold(None::<SystemTime>, |acc, t| {
                t.map(|t| Some(acc.map_or(t, |a| a.min(t))))
            })
            .flatten()
    }
}

struct Shared {
    nodes: Store<NodeInfo>,
    blocks: Store<BlockInfo>,
    affinities: Store<AffinityInfo>,
    health: BTreeMap<String, ResourceHealth>,
}

fn items<T: Clone>(s: &Store<T>) -> BTreeMap<String, T> {
    s.items
        .iter()
        .map(|(k, e)| (k.clone(), e.item.clone()))
        .collect()
}

impl Shared {
    fn build(&self, cfg: &KubeSourceConfig, source: &str) -> DesiredState {
        let (n, b, a) = (
            items(&self.nodes),
            items(&self.blocks),
            items(&self.affinities),
        );
        let mut desired = build_desired(
            cfg.profile,
            &cfg.node_name,
            &CacheView {
                nodes: &n,
                blocks: &b,
                affinities: &a,
            },
        );
        desired.source = source.to_string();
        desired
    }
}

/// The cache survives a panic in one of its tasks: the publisher notices the task ended and
/// closes the channel (the daemon keeps the last good state, marks it stale and reconnects);
/// a poisoned lock must not turn that into panics everywhere else.
fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Runtime {
    shared: Mutex<Shared>,
    /// Signalled when the cache changed: the publisher rebuilds the desired state.
    dirty: Notify,
    cfg: Arc<KubeSourceConfig>,
    /// [`KubeSource::describe`], stamped on every desired state.
    source: String,
    started: SystemTime,
}

impl Runtime {
    /// An empty cache, as before the first list.
    fn new(cfg: Arc<KubeSourceConfig>, source: String) -> Self {
        Runtime {
            shared: Mutex::new(Shared {
                nodes: Store::default(),
                blocks: Store::default(),
                affinities: Store::default(),
                health: BTreeMap::new(),
            }),
            dirty: Notify::new(),
            cfg,
            source,
            started: SystemTime::now(),
        }
    }

    fn health(&self, key: &str, f: impl FnOnce(&mut ResourceHealth)) {
        let mut s = lock(&self.shared);
        if let Some(h) = s.health.get_mut(key) {
            f(h);
        }
    }

    fn snapshot(&self, desired: Arc<DesiredState>) -> KubeSnapshot {
        let s = lock(&self.shared);
        let now = SystemTime::now();
        let causes = stale_causes(&s.health, &self.cfg, self.started, now);
        KubeSnapshot {
            desired,
            synced: !s.health.is_empty() && s.health.values().all(|h| h.synced),
            stale: !causes.is_empty(),
            stale_reason: join_causes(&causes),
            stale_causes: causes,
            relist_mismatches: s.health.values().map(|h| h.relist_mismatches).sum(),
            resources: s.health.clone(),
            ipam_api: None,
            ended: None,
        }
    }
}

/// Why one resource's cache cannot be trusted to be current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cause", rename_all = "kebab-case")]
pub enum StaleCause {
    /// No list has succeeded since the source started, `waited` ago.
    NeverListed {
        resource: String,
        #[serde(with = "humantime_serde")]
        waited: Duration,
        last_error: Option<String>,
    },
    /// No exchange of any kind with the API server for `silent` (at least `stale_after`).
    NoContact {
        resource: String,
        #[serde(with = "humantime_serde")]
        silent: Duration,
        /// Age of the last ADDED/MODIFIED/DELETED event, and of the last bookmark.
        #[serde(with = "humantime_serde")]
        last_event_age: Option<Duration>,
        #[serde(with = "humantime_serde")]
        last_bookmark_age: Option<Duration>,
        last_error: Option<String>,
    },
    /// The last periodic relist differed from the watch cache: the watch missed events
    /// (the incident's failure). `differences` is `N difference(s): k8s03 changed, …`.
    MissedEvents {
        resource: String,
        differences: String,
    },
}

impl StaleCause {
    pub fn resource(&self) -> &str {
        match self {
            StaleCause::NeverListed { resource, .. }
            | StaleCause::NoContact { resource, .. }
            | StaleCause::MissedEvents { resource, .. } => resource,
        }
    }
}

fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(trunc(d))
}

impl std::fmt::Display for StaleCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let err = |e: &Option<String>| {
            e.as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        };
        match self {
            StaleCause::NeverListed {
                resource,
                waited,
                last_error,
            } => write!(
                f,
                "{resource}: no successful list in {}{}",
                human(*waited),
                err(last_error)
            ),
            StaleCause::NoContact {
                resource,
                silent,
                last_event_age,
                last_bookmark_age,
                last_error,
            } => {
                let ago = |what: &str, age: &Option<Duration>| match age {
                    Some(a) => format!("{what} {} ago", human(*a)),
                    None => format!("no {what} yet"),
                };
                write!(
                    f,
                    "{resource}: no contact with the API server for {} ({}, {}{})",
                    human(*silent),
                    ago("last event", last_event_age),
                    ago("last bookmark", last_bookmark_age),
                    err(last_error)
                )
            }
            StaleCause::MissedEvents {
                resource,
                differences,
            } => write!(
                f,
                "{resource}: the watch missed events (relist found {differences}); cache \
                 replaced by the relist"
            ),
        }
    }
}

/// The staleness verdict per resource: empty when the cached state can be trusted.
fn stale_causes(
    health: &BTreeMap<String, ResourceHealth>,
    cfg: &KubeSourceConfig,
    started: SystemTime,
    now: SystemTime,
) -> Vec<StaleCause> {
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
    let mut causes = Vec::new();
    for (key, h) in health {
        match h.last_contact {
            None if age(started) >= cfg.stale_after => causes.push(StaleCause::NeverListed {
                resource: key.clone(),
                waited: age(started),
                last_error: h.last_error.clone(),
            }),
            Some(t) if age(t) >= cfg.stale_after => causes.push(StaleCause::NoContact {
                resource: key.clone(),
                silent: age(t),
                last_event_age: h.last_event.map(age),
                last_bookmark_age: h.last_bookmark.map(age),
                last_error: h.last_error.clone(),
            }),
            _ => {}
        }
        if let Some(m) = &h.mismatch {
            causes.push(StaleCause::MissedEvents {
                resource: key.clone(),
                differences: m.clone(),
            });
        }
    }
    causes
}

fn join_causes(causes: &[StaleCause]) -> Option<String> {
    (!causes.is_empty()).then(|| {
        causes
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// `datastore-stale` findings for a snapshot (none when it is fresh): one warning naming every
/// stale resource and why, and saying what the checks now run against. Pure: `device` is the
/// first overlay device (findings always name one).
pub fn stale_findings(snap: &KubeSnapshot, device: &str) -> Vec<Finding> {
    if snap.stale_causes.is_empty() {
        return Vec::new();
    }
    let source = &snap.desired.source;
    let nodes = snap.desired.nodes.len();
    let missed = snap
        .stale_causes
        .iter()
        .any(|c| matches!(c, StaleCause::MissedEvents { .. }));
    let unreachable = snap
        .stale_causes
        .iter()
        .any(|c| !matches!(c, StaleCause::MissedEvents { .. }));
    let basis = if unreachable {
        format!("checks run against the last good state ({nodes} nodes) until the API server answers again")
    } else {
        format!("checks run against the relisted state ({nodes} nodes); the watch is being re-established")
    };
    let causes: Vec<String> = snap.stale_causes.iter().map(|c| c.to_string()).collect();
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
    for c in &snap.stale_causes {
        let key = format!(
            "{}.{}",
            c.resource(),
            match c {
                StaleCause::NeverListed { .. } => "never-listed",
                StaleCause::NoContact { .. } => "no-contact",
                StaleCause::MissedEvents { .. } => "missed-events",
            }
        );
        f.evidence.details.insert(key, c.to_string());
    }
    if snap.relist_mismatches > 0 {
        f.evidence.details.insert(
            "relist_mismatches".into(),
            snap.relist_mismatches.to_string(),
        );
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
    vec![f]
}

/// The `datastore-stale` finding while the list/watch is gone (its task ended) and being
/// re-established: the checks keep running against the last good desired state (`nodes`).
pub fn watch_ended_finding(source: &str, nodes: usize, device: &str, why: &str) -> Finding {
    let mut f = Finding::new(
        CheckId::DatastoreStale,
        Severity::Warning,
        device,
        format!(
            "datastore {source} is stale: {why}; checks run against the last good state \
             ({nodes} nodes) until the list/watch is re-established"
        ),
    );
    f.evidence
        .details
        .insert("source".into(), source.to_string());
    f.evidence
        .details
        .insert("watch-ended".into(), why.to_string());
    f.hint = Some(
        "the agent reconnects by itself; if this persists, see the agent's log for why the \
         watch ended and check the API server (`kubectl get nodes` with the agent's kubeconfig)"
            .to_string(),
    );
    f
}

fn trunc(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

async fn run_publisher(
    rt: Arc<Runtime>,
    tx: watch::Sender<KubeSnapshot>,
    mut tasks: JoinSet<String>,
    ipam: Option<String>,
) {
    let mut desired = tx.borrow().desired.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let rebuild = tokio::select! {
            _ = rt.dirty.notified() => true,
            _ = tick.tick() => false,
            _ = tx.closed() => break,
            // The resource loops never return: one that ended panicked or was cancelled. Its
            // cache would freeze while looking healthy; end the channel so the consumer
            // keeps its last good state, marks it stale and starts over.
            Some(ended) = tasks.join_next() => {
                let why = match ended {
                    Err(e) => {
                        tracing::error!(error = %e, "a Kubernetes list/watch task failed; closing the snapshot channel");
                        format!("a list/watch task failed ({e})")
                    }
                    Ok(why) => {
                        tracing::warn!(reason = %why, "a Kubernetes list/watch ended; closing the snapshot channel");
                        why
                    }
                };
                // Left in place for the receiver to read after the close; no announcement.
                tx.send_if_modified(|cur| {
                    cur.ended = Some(why);
                    false
                });
                break;
            }
        };
        if rebuild {
            // Let a burst of events land before rebuilding.
            tokio::time::sleep(rt.cfg.debounce).await;
            let built = lock(&rt.shared).build(&rt.cfg, &rt.source);
            desired = Arc::new(built);
        }
        let snap = rt.snapshot(desired.clone()).with_ipam(ipam.as_deref());
        tx.send_if_modified(|cur| {
            let announce = rebuild
                || cur.stale != snap.stale
                || cur.stale_reason != snap.stale_reason
                || cur.synced != snap.synced
                || cur.relist_mismatches != snap.relist_mismatches;
            *cur = snap;
            announce
        });
    }
    // Dropping `tasks` aborts the resource loops; dropping `tx` closes the channel.
}

/// One resource to list and watch.
struct Watched<T> {
    key: &'static str,
    api: Api<LiteObject>,
    compact: fn(&LiteObject) -> T,
    store: fn(&mut Shared) -> &mut Store<T>,
}

enum WatchEnd {
    /// Re-establish the watch from the current position.
    Rewatch,
    /// A relist replaced the cache: the old stream lost events, start a new one from the
    /// relist's position (no second list needed).
    Restart,
    /// The position is unusable (410 Gone): list again.
    Relist,
}

/// Consecutive 401 answers after which a resource loop gives up its client: the credentials
/// are re-read by a fresh connection (the daemon reconnects with backoff).
const UNAUTHORIZED_LIMIT: u32 = 3;

/// Counts consecutive 401 answers across a resource's lists and watches.
#[derive(Default)]
struct Rejections(u32);

impl Rejections {
    /// Records the outcome of one request; `true` once the credentials are evidently dead.
    fn record(&mut self, err: Option<&KubeError>) -> bool {
        match err {
            Some(e) if e.is_unauthorized() => self.0 += 1,
            _ => self.0 = 0,
        }
        self.0 >= UNAUTHORIZED_LIMIT
    }
}

/// Why a resource loop returned: the snapshot channel closes with this as `ended`.
const CREDENTIALS_REJECTED: &str =
    "the API server rejected the agent's credentials (401 Unauthorized); reconnecting re-reads them";

/// Lists and watches one resource for as long as its client is usable. Returns only when the
/// credentials are rejected (the reason); everything else is retried in place.
async fn run_resource<T>(rt: Arc<Runtime>, w: Watched<T>) -> String
where
    T: Clone + PartialEq + Send + 'static,
{
    let cfg = rt.cfg.clone();
    let mut backoff = Backoff::new(cfg.retry_max);
    let mut rejections = Rejections::default();
    loop {
        // (Re)list: the initial sync, and recovery after 410 Gone or errors.
        let listed = bounded(
            || format!("listing {}", w.key),
            cfg.request_timeout,
            list_all(&w.api, w.compact, cfg.page_size),
        )
        .await;
        let list = match listed {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(resource = w.key, error = %e, "list failed; keeping the last good state");
                rt.health(w.key, |h| h.last_error = Some(e.to_string()));
                if rejections.record(Some(&e)) {
                    return CREDENTIALS_REJECTED.to_string();
                }
                backoff.wait().await;
                continue;
            }
        };
        rejections.record(None);
        backoff.reset();
        {
            let mut s = lock(&rt.shared);
            let n = list.items.len();
            (w.store)(&mut s).replace(list);
            if let Some(h) = s.health.get_mut(w.key) {
                h.synced = true;
                h.objects = n;
                h.last_contact = Some(SystemTime::now());
                h.last_relist = h.last_contact;
                h.last_error = None;
            }
        }
        rt.dirty.notify_one();
        if watch_until_relist(&rt, &w, &mut backoff, &mut rejections).await {
            return CREDENTIALS_REJECTED.to_string();
        }
    }
}

/// Watches from the store's position, with periodic relists, until a full relist is needed
/// (`false`) or the credentials are rejected (`true`).
async fn watch_until_relist<T>(
    rt: &Arc<Runtime>,
    w: &Watched<T>,
    backoff: &mut Backoff,
    rejections: &mut Rejections,
) -> bool
where
    T: Clone + PartialEq + Send + 'static,
{
    let cfg = rt.cfg.clone();
    let mut next_relist = Instant::now() + cfg.relist_interval;
    loop {
        let position = (w.store)(&mut lock(&rt.shared)).position.clone();
        let wp = WatchParams::default()
            // Bookmarks are on by default: they keep a quiet watch visibly alive.
            .timeout(cfg.watch_timeout.as_secs().clamp(1, 290) as u32);
        let started = bounded(
            || format!("watching {}", w.key),
            cfg.request_timeout,
            w.api.watch(&wp, &position),
        )
        .await;
        let stream = match started {
            Ok(s) => s,
            Err(KubeError::Api {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 410 => {
                rt.health(w.key, |h| h.gone += 1);
                return false;
            }
            Err(e) => {
                tracing::warn!(resource = w.key, error = %e, "watch failed");
                rt.health(w.key, |h| h.last_error = Some(e.to_string()));
                if rejections.record(Some(&e)) {
                    return true;
                }
                backoff.wait().await;
                // A long outage still gets its relist (and so its recovery) on schedule.
                if Instant::now() >= next_relist {
                    return false;
                }
                continue;
            }
        };
        rejections.record(None);
        rt.health(w.key, |h| {
            h.last_contact = Some(SystemTime::now());
            h.last_error = None;
        });
        backoff.reset();
        match consume(rt, w, stream, &mut next_relist).await {
            WatchEnd::Rewatch | WatchEnd::Restart => rt.health(w.key, |h| h.watch_restarts += 1),
            WatchEnd::Relist => return false,
        }
    }
}

/// A relist waiting out its grace period before being compared.
struct PendingRelist<T> {
    list: Store<T>,
    deadline: Instant,
}

async fn consume<T, S>(
    rt: &Arc<Runtime>,
    w: &Watched<T>,
    stream: S,
    next_relist: &mut Instant,
) -> WatchEnd
where
    T: Clone + PartialEq + Send + 'static,
    S: futures::Stream<Item = kube::Result<WatchEvent<LiteObject>>> + Send,
{
    let cfg = rt.cfg.clone();
    let idle_limit = cfg.watch_timeout + Duration::from_secs(5);
    // Measured from the last thing the stream delivered, not from each loop turn: a relist
    // firing in between must not keep a dead stream alive.
    let mut idle_deadline = Instant::now() + idle_limit;
    let mut pending: Option<PendingRelist<T>> = None;
    futures::pin_mut!(stream);
    loop {
        let grace_deadline = pending.as_ref().map(|p| p.deadline);
        tokio::select! {
            next = tokio::time::timeout_at(idle_deadline, stream.next()) => {
                idle_deadline = Instant::now() + idle_limit;
                let ev = match next {
                    Err(_) => {
                        tracing::info!(resource = w.key, "watch silent past its timeout; re-establishing");
                        return WatchEnd::Rewatch;
                    }
                    Ok(None) => return WatchEnd::Rewatch,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(resource = w.key, error = %e, "watch stream error");
                        rt.health(w.key, |h| h.last_error = Some(e.to_string()));
                        return WatchEnd::Rewatch;
                    }
                    Ok(Some(Ok(ev))) => ev,
                };
                if let Some(end) = apply_event(rt, w, ev) {
                    return end;
                }
            }
            _ = tokio::time::sleep_until(*next_relist), if pending.is_none() => {
                *next_relist = Instant::now() + cfg.relist_interval;
                let listed = bounded(
                    || format!("relisting {}", w.key),
                    cfg.request_timeout,
                    list_all(&w.api, w.compact, cfg.page_size),
                ).await;
                match listed {
                    Ok(list) => {
                        rt.health(w.key, |h| h.last_contact = Some(SystemTime::now()));
                        pending = Some(PendingRelist { list, deadline: Instant::now() + cfg.relist_grace });
                    }
                    Err(e) => {
                        tracing::warn!(resource = w.key, error = %e, "relist failed");
                        rt.health(w.key, |h| h.last_error = Some(e.to_string()));
                    }
                }
            }
            _ = sleep_until_opt(grace_deadline), if grace_deadline.is_some() => {
                let Some(p) = pending.take() else { continue };
                if finish_relist(rt, w, p.list) {
                    // The watch evidently lost events: do not trust that stream further.
                    return WatchEnd::Restart;
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Applies one watch event to the cache. `Some` ends the stream.
fn apply_event<T>(rt: &Arc<Runtime>, w: &Watched<T>, ev: WatchEvent<LiteObject>) -> Option<WatchEnd>
where
    T: Clone + PartialEq + Send + 'static,
{
    let now = SystemTime::now();
    let mut s = lock(&rt.shared);
    let changed = match ev {
        WatchEvent::Added(obj) | WatchEvent::Modified(obj) => {
            let entry = Entry {
                rv: obj.metadata.resource_version.clone().unwrap_or_default(),
                item: (w.compact)(&obj),
            };
            (w.store)(&mut s).upsert(obj.name(), entry)
        }
        WatchEvent::Deleted(obj) => {
            let rv = obj.metadata.resource_version.clone().unwrap_or_default();
            (w.store)(&mut s).delete(obj.name(), rv)
        }
        WatchEvent::Bookmark(b) => {
            (w.store)(&mut s).position = b.metadata.resource_version;
            if let Some(h) = s.health.get_mut(w.key) {
                h.last_bookmark = Some(now);
                h.last_contact = Some(now);
            }
            return None;
        }
        WatchEvent::Error(status) => {
            let gone = status.code == 410;
            if let Some(h) = s.health.get_mut(w.key) {
                if gone {
                    h.gone += 1;
                } else {
                    h.last_error = Some(format!("watch error {}: {}", status.code, status.message));
                }
            }
            tracing::info!(resource = w.key, code = status.code, message = %status.message, "watch ended by the server");
            return Some(if gone {
                WatchEnd::Relist
            } else {
                WatchEnd::Rewatch
            });
        }
    };
    let n = (w.store)(&mut s).items.len();
    if let Some(h) = s.health.get_mut(w.key) {
        h.last_event = Some(now);
        h.last_contact = Some(now);
        h.objects = n;
    }
    drop(s);
    if changed {
        rt.dirty.notify_one();
    }
    None
}

/// Compares a relist (after its grace period) with the cache. Returns true when they differed:
/// the mismatch is counted, the cache replaced and the caller restarts the watch.
fn finish_relist<T>(rt: &Arc<Runtime>, w: &Watched<T>, list: Store<T>) -> bool
where
    T: Clone + PartialEq + Send + 'static,
{
    let now = SystemTime::now();
    let mut s = lock(&rt.shared);
    let store = (w.store)(&mut s);
    let diffs = store.differences(&list);
    let n = list.items.len();
    if diffs.is_empty() {
        store.prune_tombstones(&list.position);
    } else {
        store.replace(list);
    }
    let h = s.health.get_mut(w.key);
    let Some(h) = h else { return false };
    h.last_relist = Some(now);
    h.objects = n;
    if diffs.is_empty() {
        h.mismatch = None;
        return false;
    }
    const SHOWN: usize = 5;
    let mut text: Vec<String> = diffs.iter().take(SHOWN).map(|d| d.to_string()).collect();
    if diffs.len() > SHOWN {
        text.push(format!("and {} more", diffs.len() - SHOWN));
    }
    let text = format!("{} difference(s): {}", diffs.len(), text.join(", "));
    tracing::warn!(resource = w.key, differences = %text, "relist differs from the watch cache: events were missed");
    h.relist_mismatches += 1;
    h.mismatch = Some(text);
    drop(s);
    rt.dirty.notify_one();
    true
}

/// Retry delay after errors: 250 ms doubling up to `max`, reset on success. Each wait is
/// jittered to 50-100 % of the step, so a fleet of agents does not retry in lockstep against
/// an API server that is coming back, and recovery follows it within `max`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    fn new(max: Duration) -> Self {
        Backoff {
            next: Self::FIRST.min(max),
            max,
        }
    }
    fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }
    /// The next delay to wait (jittered), advancing the step.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next.mul_f64(0.5 + fastrand::f64() * 0.5);
        self.next = (self.next * 2).min(self.max);
        delay
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(contact_ago: Option<u64>, mismatch: Option<&str>) -> ResourceHealth {
        ResourceHealth {
            last_contact: contact_ago.map(|s| SystemTime::now() - Duration::from_secs(s)),
            mismatch: mismatch.map(str::to_string),
            synced: contact_ago.is_some(),
            ..Default::default()
        }
    }

    fn staleness(
        h: &BTreeMap<String, ResourceHealth>,
        cfg: &KubeSourceConfig,
        started: SystemTime,
        now: SystemTime,
    ) -> Option<String> {
        join_causes(&stale_causes(h, cfg, started, now))
    }

    #[test]
    fn staleness_rules() {
        let cfg = KubeSourceConfig {
            stale_after: Duration::from_secs(60),
            ..Default::default()
        };
        let now = SystemTime::now();
        let started = now - Duration::from_secs(3600);
        let mut h = BTreeMap::new();
        h.insert("nodes".to_string(), health(Some(5), None));
        assert_eq!(staleness(&h, &cfg, started, now), None);
        h.insert("ipamblocks".to_string(), health(Some(120), None));
        let r = staleness(&h, &cfg, started, now).unwrap();
        assert!(r.contains("ipamblocks: no contact"), "{r}");
        h.insert(
            "ipamblocks".to_string(),
            health(Some(1), Some("1 difference(s): k8s03 changed")),
        );
        let r = staleness(&h, &cfg, started, now).unwrap();
        assert!(r.contains("missed events"), "{r}");
        h.insert("ipamblocks".to_string(), health(None, None));
        assert!(staleness(&h, &cfg, started, now)
            .unwrap()
            .contains("no successful list"));
        assert_eq!(
            staleness(&h, &cfg, now, now),
            None,
            "not stale before stale_after"
        );
    }

    fn snapshot(causes: Vec<StaleCause>) -> KubeSnapshot {
        let mut desired = DesiredState {
            source: "kubernetes:https://10.0.0.1:16443".into(),
            local_node: "k8s01".into(),
            ..Default::default()
        };
        for n in ["k8s01", "k8s02", "k8s03"] {
            desired.nodes.insert(
                n.into(),
                crate::model::PeerNode {
                    name: n.into(),
                    node_ip: crate::model::v4(192, 168, 77, 1),
                    vtep_ip: crate::model::v4(10, 1, 1, 0),
                    vtep_mac: crate::model::MacAddr::default(),
                    vtep_mac_derived: true,
                    blocks: vec![],
                    borrowed: vec![],
                },
            );
        }
        KubeSnapshot {
            desired: Arc::new(desired),
            synced: true,
            stale: !causes.is_empty(),
            stale_reason: join_causes(&causes),
            stale_causes: causes,
            resources: BTreeMap::new(),
            relist_mismatches: 0,
            ipam_api: None,
            ended: None,
        }
    }

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

    #[test]
    fn kube_errors_read_as_one_line() {
        let forbidden = KubeError::from_kube(
            "listing nodes".into(),
            kube::Error::Api(Box::new(kube::core::Status {
                code: 403,
                reason: "Forbidden".into(),
                message: "nodes is forbidden: User \"system:serviceaccount:kube-system:dataplane-watchdog\" cannot list resource \"nodes\" in API group \"\" at the cluster scope".into(),
                ..Default::default()
            })),
        );
        let text = forbidden.to_string();
        assert!(matches!(forbidden, KubeError::Forbidden { .. }));
        assert!(
            text.starts_with("listing nodes: forbidden by RBAC: nodes is forbidden"),
            "{text}"
        );
        assert!(text.contains("cannot list resource \"nodes\""), "{text}");
        assert!(text.contains("systemd/rbac.yaml"), "{text}");
        assert!(!text.contains('\n'));
        let gone = KubeError::from_kube(
            "watching nodes".into(),
            kube::Error::Api(Box::new(kube::core::Status {
                code: 410,
                reason: "Expired".into(),
                message: "too old resource version".into(),
                ..Default::default()
            })),
        );
        assert_eq!(
            gone.to_string(),
            "watching nodes: 410 Expired: too old resource version"
        );
    }

    #[test]
    fn status_section_reports_ages_staleness_and_errors() {
        let now = SystemTime::now();
        let mut snap = snapshot(vec![StaleCause::NoContact {
            resource: "nodes".into(),
            silent: Duration::from_secs(700),
            last_event_age: None,
            last_bookmark_age: None,
            last_error: None,
        }]);
        snap.resources.insert(
            "nodes".into(),
            ResourceHealth {
                last_relist: Some(now - Duration::from_secs(700)),
                last_error: Some("listing nodes: API server unreachable".into()),
                ..Default::default()
            },
        );
        let st = snap.datastore_status(now);
        assert_eq!(st.source, "kubernetes:https://10.0.0.1:16443");
        assert!(st.stale);
        assert_eq!(st.nodes, 3);
        assert_eq!(st.last_event_age_seconds, Some(700.0));
        assert_eq!(st.last_relist, Some(now - Duration::from_secs(700)));
        assert_eq!(
            st.error.as_deref(),
            Some("nodes: listing nodes: API server unreachable")
        );
    }

    #[test]
    fn fresh_snapshot_has_no_stale_finding() {
        assert!(stale_findings(&snapshot(vec![]), "vxlan.calico").is_empty());
    }

    #[test]
    fn no_contact_finding_names_resource_ages_and_last_good_state() {
        let snap = snapshot(vec![StaleCause::NoContact {
            resource: "nodes".into(),
            silent: Duration::from_secs(663),
            last_event_age: Some(Duration::from_millis(725_400)),
            last_bookmark_age: None,
            last_error: Some("listing nodes: API server unreachable: connection refused".into()),
        }]);
        let f = stale_findings(&snap, "vxlan.calico");
        assert_eq!(f.len(), 1);
        let f = &f[0];
        assert_eq!(f.check, CheckId::DatastoreStale);
        assert_eq!(f.severity, Severity::Warning);
        assert_eq!(f.device, "vxlan.calico");
        assert_eq!(f.peer_node, None);
        assert_eq!(
            f.message,
            "datastore kubernetes:https://10.0.0.1:16443 is stale: nodes: no contact with the API \
             server for 11m 3s (last event 12m 5s ago, no last bookmark yet; last error: listing \
             nodes: API server unreachable: connection refused); checks run against the last good \
             state (3 nodes) until the API server answers again"
        );
        assert!(f.evidence.details.contains_key("nodes.no-contact"));
        assert!(f.hint.as_deref().unwrap().contains("credentials"));
    }

    #[test]
    fn missed_events_finding_says_the_relist_found_differences() {
        let mut snap = snapshot(vec![StaleCause::MissedEvents {
            resource: "nodes".into(),
            differences: "1 difference(s): k8s03 changed".into(),
        }]);
        snap.relist_mismatches = 2;
        let f = &stale_findings(&snap, "flannel.1")[0];
        assert!(
            f.message.contains(
                "nodes: the watch missed events (relist found 1 difference(s): k8s03 changed); \
                 cache replaced by the relist"
            ),
            "{}",
            f.message
        );
        assert!(
            f.message.ends_with("checks run against the relisted state (3 nodes); the watch is being re-established"),
            "{}",
            f.message
        );
        assert_eq!(f.evidence.details["relist_mismatches"], "2");
        assert!(f.hint.as_deref().unwrap().contains("k8s-dqlite"));
    }

    #[test]
    fn several_causes_make_one_finding() {
        // One finding per source: the finding key (check, device, peer, route) is shared.
        let snap = snapshot(vec![
            StaleCause::NeverListed {
                resource: "ipamblocks".into(),
                waited: Duration::from_secs(600),
                last_error: None,
            },
            StaleCause::MissedEvents {
                resource: "nodes".into(),
                differences: "2 difference(s): a added, b deleted".into(),
            },
        ]);
        let f = stale_findings(&snap, "vxlan.calico");
        assert_eq!(f.len(), 1);
        assert!(
            f[0].message
                .contains("ipamblocks: no successful list in 10m"),
            "{}",
            f[0].message
        );
        assert!(f[0].message.contains("a added, b deleted"));
        assert!(
            f[0].message.contains("last good state"),
            "an unreachable resource means the data is old"
        );
        assert_eq!(
            f[0].evidence.details.len(),
            3,
            "{:?}",
            f[0].evidence.details
        );
    }

    #[test]
    fn retries_are_capped_jittered_and_reset() {
        let cfg = KubeSourceConfig::default();
        let mut b = Backoff::new(cfg.retry_max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        // A long outage: the server is retried at most every `retry_max`, and that is a few
        // seconds, so the agent follows it back quickly.
        assert!(
            cfg.retry_max <= Duration::from_secs(5),
            "{:?}",
            cfg.retry_max
        );
        assert!(delays.iter().all(|d| *d <= cfg.retry_max), "{delays:?}");
        assert!(
            delays[11] >= cfg.retry_max / 2,
            "capped, not stuck low: {delays:?}"
        );
        assert!(delays[0] <= Backoff::FIRST && delays[0] >= Backoff::FIRST / 2);
        // Not in lockstep: two agents failing together wait different times.
        let mut other = Backoff::new(cfg.retry_max);
        let theirs: Vec<Duration> = (0..12).map(|_| other.next_delay()).collect();
        assert_ne!(delays, theirs);
        b.reset();
        assert!(b.next_delay() <= Backoff::FIRST);
    }

    #[tokio::test]
    async fn a_panicking_watch_task_closes_the_channel_instead_of_freezing_it() {
        let rt = Arc::new(Runtime::new(
            Arc::new(KubeSourceConfig::default()),
            "kubernetes".into(),
        ));
        let mut tasks: JoinSet<String> = JoinSet::new();
        let poisoner = rt.clone();
        tasks.spawn(async move {
            let _guard = lock(&poisoner.shared);
            panic!("a bug in a resource loop");
        });
        let first = rt.snapshot(Arc::default());
        let (tx, mut rx) = watch::channel(first);
        let publisher = tokio::spawn(run_publisher(rt.clone(), tx, tasks, None));
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while rx.changed().await.is_ok() {}
        })
        .await;
        assert!(
            closed.is_ok(),
            "the channel stayed open after its task died"
        );
        publisher
            .await
            .expect("the publisher itself does not panic");
        let why = rx.borrow().ended.clone().unwrap_or_default();
        assert!(why.contains("task failed"), "{why:?}");
        // The poisoned cache is still readable.
        assert!(lock(&rt.shared).nodes.items.is_empty());
    }

    #[test]
    fn last_event_age_is_the_worst_resource() {
        let now = SystemTime::now();
        let mut snap = KubeSnapshot {
            desired: Arc::default(),
            synced: true,
            stale: false,
            stale_reason: None,
            stale_causes: vec![],
            resources: BTreeMap::new(),
            relist_mismatches: 0,
            ipam_api: None,
            ended: None,
        };
        snap.resources.insert(
            "a".into(),
            ResourceHealth {
                last_bookmark: Some(now - Duration::from_secs(3)),
                ..Default::default()
            },
        );
        snap.resources.insert(
            "b".into(),
            ResourceHealth {
                last_event: Some(now - Duration::from_secs(9)),
                ..Default::default()
            },
        );
        assert_eq!(snap.last_event_age(now), Some(Duration::from_secs(9)));
        snap.resources.insert("c".into(), ResourceHealth::default());
        assert_eq!(snap.last_event_age(now), None);
    }
}
