//! Kubernetes datastore: Nodes (+ Calico IPAMBlocks, BlockAffinities, IPPools and
//! FelixConfigurations) → [`DesiredState`].
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
//!
//! Layout: `client` connects (credentials, API discovery); `list_watch` runs one resource's
//! list/watch into the shared cache of `runtime`, which publishes the snapshots whose trust
//! `health` judges; `parse` turns cached objects into the desired state; `publish` writes
//! conditions and Events back. This file is the public face: [`KubeSource`].

mod calico_config;
mod client;
mod config;
mod error;
mod health;
mod kubelet;
mod list_watch;
mod parse;
mod publish;
mod runtime;
mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use kube::{
    api::{Api, ApiResource},
    Client,
};
use tokio::{sync::watch, task::JoinSet};

use self::{
    client::Apis,
    error::bounded,
    list_watch::{list_all, run_resource, Backoff, Watched},
    runtime::{lock, run_publisher, Runtime, Shared},
};
pub use self::{
    client::{IPAM_APIS, MICROK8S_KUBECONFIG},
    config::KubeSourceConfig,
    error::{KubeError, Result},
    health::{stale_findings, KubeSnapshot, ResourceHealth, StaleCause},
    parse::{
        build_desired, AffinityInfo, BlockInfo, CacheView, FelixConfigInfo, KubeProfile,
        LiteObject, NodeInfo, PoolEncap, PoolInfo,
    },
    publish::EventOutcome,
    store::{Difference, Entry, Store},
};
use crate::model::DesiredState;

/// Name of the Node condition written by [`KubeSource::publish_condition`].
pub const CONDITION_TYPE: &str = "VXLANDataplaneHealthy";

/// A connected Kubernetes datastore. Cheap to clone.
#[derive(Clone)]
pub struct KubeSource {
    client: Client,
    /// `kubernetes:<server url>`, or `kubernetes` for a client built elsewhere.
    source: String,
    cfg: Arc<KubeSourceConfig>,
    apis: Apis,
    publisher: Arc<publish::Publisher>,
    /// The local node's name when it was found by address instead of configured: the Node
    /// whose condition and Events are written.
    adopted_node: Arc<std::sync::RwLock<Option<String>>>,
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

impl KubeSource {
    /// Builds the client from the configured credentials and, for Calico, discovers which API
    /// serves the IPAM objects. Fails if the API server cannot be reached for discovery.
    pub async fn connect(cfg: KubeSourceConfig) -> Result<Self> {
        let mut kcfg = client::load_config(&cfg).await?;
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
        let apis = match cfg.profile {
            KubeProfile::Calico => {
                let found = client::discover_ipam(&client, &cfg).await?;
                let mut notes = found.notes;
                let pools = client::probe_readable(
                    &client,
                    &cfg,
                    found.pools,
                    client::POOLS_UNREAD,
                    &mut notes,
                )
                .await;
                let felix = client::probe_readable(
                    &client,
                    &cfg,
                    found.felix,
                    client::FELIX_UNREAD,
                    &mut notes,
                )
                .await;
                Apis {
                    nodes,
                    blocks: Some(found.blocks),
                    affinities: found.affinities,
                    pools,
                    felix,
                    notes,
                }
            }
            KubeProfile::Flannel => Apis {
                nodes,
                blocks: None,
                affinities: None,
                pools: None,
                felix: None,
                notes: Vec::new(),
            },
        };
        Ok(KubeSource {
            adopted_node: Arc::default(),
            publisher: Arc::new(publish::Publisher::default()),
            client,
            source: "kubernetes".to_string(),
            cfg: Arc::new(cfg),
            apis,
        })
    }

    /// The IPAM group/version in use (`crd.projectcalico.org/v1`), `None` for flannel.
    pub fn ipam_api(&self) -> Option<&str> {
        self.apis.blocks.as_ref().map(|b| b.api_version.as_str())
    }

    pub fn config(&self) -> &KubeSourceConfig {
        &self.cfg
    }

    /// The daemon found this host's node by address (its host name is no node's): conditions
    /// and Events go to that Node from now on.
    pub fn adopt_local_node(&self, name: &str) {
        if name != self.cfg.node_name {
            let mut adopted = self
                .adopted_node
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if adopted.as_deref() != Some(name) {
                *adopted = Some(name.to_string());
            }
        }
    }

    /// The Node this agent writes to: the adopted name, else the configured one.
    pub fn local_node(&self) -> String {
        self.adopted_node
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| self.cfg.node_name.clone())
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
        let mut pools = None;
        if let Some(ar) = &self.apis.pools {
            pools = Some(
                bounded(
                    || format!("listing {}", ar.plural),
                    cfg.request_timeout,
                    list_all(&self.api(ar), PoolInfo::from_object, cfg.page_size),
                )
                .await?,
            );
        }
        let mut felix = None;
        if let Some(ar) = &self.apis.felix {
            felix = Some(
                bounded(
                    || format!("listing {}", ar.plural),
                    cfg.request_timeout,
                    list_all(&self.api(ar), FelixConfigInfo::from_object, cfg.page_size),
                )
                .await?,
            );
        }
        let shared = Shared {
            nodes,
            blocks,
            affinities,
            pools,
            felix,
            notes: self.apis.notes.clone(),
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
        if let Some(ar) = &self.apis.pools {
            let key = add("ippools", ar);
            lock(&rt.shared).pools = Some(Store::default());
            tasks.spawn(run_resource(
                rt.clone(),
                Watched {
                    key,
                    api: self.api(ar),
                    compact: PoolInfo::from_object,
                    store: |s| s.pools.get_or_insert_with(Store::default),
                },
            ));
        }
        if let Some(ar) = &self.apis.felix {
            let key = add("felixconfigurations", ar);
            lock(&rt.shared).felix = Some(Store::default());
            tasks.spawn(run_resource(
                rt.clone(),
                Watched {
                    key,
                    api: self.api(ar),
                    compact: FelixConfigInfo::from_object,
                    store: |s| s.felix.get_or_insert_with(Store::default),
                },
            ));
        }
        lock(&rt.shared).notes = self.apis.notes.clone();
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

    /// Records an Event on the local Node about an action of the agent (a repair: reason
    /// `RepairApplied`, …; `kind` `Normal` or `Warning`), aggregated per `key`.
    pub async fn publish_action_event(
        &self,
        key: &str,
        reason: &str,
        kind: &str,
        message: &str,
    ) -> Result<EventOutcome> {
        publish::publish_action_event(self, key, reason, kind, message).await
    }

    /// `[repair] escalate = "restart-calico-node"`: deletes this node's calico-node pod so its
    /// DaemonSet recreates it and Felix resyncs. `namespace/name` of the pod, `None` if none.
    pub async fn restart_calico_node(&self) -> Result<Option<String>> {
        publish::restart_calico_node(self).await
    }
}
