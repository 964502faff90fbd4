//! A small fake kube-apiserver speaking the real protocol the kube client uses, over plain
//! HTTP on 127.0.0.1: discovery documents, lists with a resourceVersion, chunked watch streams
//! (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR), 410 Gone, strategic-merge patch of `nodes/status`,
//! Event creation. Programmable from tests, including the faults that matter here:
//! the server going down, slow responses, 503s, expired history, and the incident's own
//! failure: a SILENT WATCH that stays open while objects change underneath it.
//!
//! ```no_run
//! # async fn demo() {
//! use watchdog_lab::fake_apiserver::{FakeApiServer, FakeConfig, Res};
//! let server = FakeApiServer::start(FakeConfig::default()).await;
//! let kubeconfig = server.write_kubeconfig();
//! server.put(Res::Nodes, serde_json::json!({"metadata": {"name": "k8s01"}}));
//! # }
//! ```

mod http;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::broadcast, task::AbortHandle};

/// The resources the fake serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Nodes,
    IpamBlocks,
    BlockAffinities,
    IpPools,
    FelixConfigurations,
    /// Namespaced (`namespace/name`); listed with label and field selectors, deletable
    /// (the repair escalation deletes calico-node pods; the kubelet check lists them).
    Pods,
    Events,
}

/// How a node's kubelet answers `GET /api/v1/nodes/<node>/proxy/pods`.
#[derive(Debug, Clone, Default)]
pub(crate) struct KubeletState {
    /// Its list as of when its watch died (`None`: live, it knows every bound pod).
    pub(crate) frozen: Option<Vec<Value>>,
    /// The proxy answers this status instead (403, 503, …).
    pub(crate) error: Option<u16>,
}

impl Res {
    pub fn plural(self) -> &'static str {
        match self {
            Res::Nodes => "nodes",
            Res::IpamBlocks => "ipamblocks",
            Res::BlockAffinities => "blockaffinities",
            Res::IpPools => "ippools",
            Res::FelixConfigurations => "felixconfigurations",
            Res::Pods => "pods",
            Res::Events => "events",
        }
    }
    pub fn kind(self) -> &'static str {
        match self {
            Res::Nodes => "Node",
            Res::IpamBlocks => "IPAMBlock",
            Res::BlockAffinities => "BlockAffinity",
            Res::IpPools => "IPPool",
            Res::FelixConfigurations => "FelixConfiguration",
            Res::Pods => "Pod",
            Res::Events => "Event",
        }
    }
    fn from_plural(p: &str) -> Option<Res> {
        [
            Res::Nodes,
            Res::IpamBlocks,
            Res::BlockAffinities,
            Res::IpPools,
            Res::FelixConfigurations,
            Res::Pods,
            Res::Events,
        ]
        .into_iter()
        .find(|r| r.plural() == p)
    }
}

/// How the fake is set up at start.
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Group/versions serving the Calico IPAM resources: `crd.projectcalico.org/v1`,
    /// `projectcalico.org/v3`, both, or none.
    pub calico_apis: Vec<String>,
    /// Whether those group/versions also serve `ippools` and `felixconfigurations` (Calico's
    /// CRDs always do; `false` plays an install without them).
    pub calico_config: bool,
    /// How often open watches that asked for bookmarks get one.
    pub bookmark_interval: Duration,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            calico_apis: vec!["crd.projectcalico.org/v1".to_string()],
            calico_config: true,
            bookmark_interval: Duration::from_millis(500),
        }
    }
}

/// A request the fake received that changes something (everything but GET).
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: Value,
}

/// A watch event as broadcast to open watch streams.
#[derive(Debug, Clone)]
enum Broadcast {
    Event {
        res: Res,
        rv: u64,
        line: Bytes,
    },
    /// History expired: open watches end with ERROR 410.
    Gone,
}

struct Inner {
    rv: u64,
    /// Watches (and lists asking for a resourceVersion) older than this get 410 Gone.
    compacted: u64,
    objects: BTreeMap<Res, BTreeMap<String, Value>>,
    /// The "watch cache": every event since `compacted`, replayed to watches that start from
    /// an older resourceVersion.
    history: Vec<(u64, Res, Bytes)>,
    silent: bool,
    ignore_watch_timeout: bool,
    down: bool,
    unavailable: bool,
    unauthorized: bool,
    /// Resources whose list and watch are answered 403 Forbidden (missing RBAC).
    forbidden: Vec<Res>,
    /// Per node, how its kubelet answers the node proxy.
    kubelets: BTreeMap<String, KubeletState>,
    delay: Duration,
    requests: Vec<Recorded>,
    watches_started: usize,
    lists_served: usize,
    conns: Vec<AbortHandle>,
}

pub(crate) struct State {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Broadcast>,
    cfg: FakeConfig,
    addr: SocketAddr,
}

/// The running fake. Dropping it stops the server.
pub struct FakeApiServer {
    state: Arc<State>,
    accept: AbortHandle,
    kubeconfig: Mutex<Option<PathBuf>>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        for c in self.state.inner.lock().unwrap().conns.drain(..) {
            c.abort();
        }
        if let Some(p) = self.kubeconfig.lock().unwrap().take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut v = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    v.push(b'\n');
    Bytes::from(v)
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a random port and serves until dropped.
    pub async fn start(cfg: FakeConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake apiserver");
        let addr = listener.local_addr().unwrap();
        let (tx, _) = broadcast::channel(4096);
        let state = Arc::new(State {
            inner: Mutex::new(Inner {
                rv: 100,
                compacted: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                silent: false,
                ignore_watch_timeout: false,
                down: false,
                unavailable: false,
                unauthorized: false,
                forbidden: Vec::new(),
                kubelets: BTreeMap::new(),
                delay: Duration::ZERO,
                requests: Vec::new(),
                watches_started: 0,
                lists_served: 0,
                conns: Vec::new(),
            }),
            tx,
            cfg,
            addr,
        });
        let accept = tokio::spawn(http::accept_loop(listener, state.clone())).abort_handle();
        FakeApiServer {
            state,
            accept,
            kubeconfig: Mutex::new(None),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// Writes a kubeconfig pointing at this server (removed when the server is dropped).
    pub fn write_kubeconfig(&self) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "fake-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            self.state.addr.port()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        *self.kubeconfig.lock().unwrap() = Some(path.clone());
        path
    }

    /// Creates or replaces an object (keyed by `metadata.name`, or `namespace/name` for
    /// events and pods), stamping a new resourceVersion and emitting ADDED or MODIFIED.
    /// Returns the new resourceVersion.
    pub fn put(&self, res: Res, obj: Value) -> u64 {
        self.state.put(res, obj)
    }

    /// Deletes an object, emitting DELETED. Returns whether it existed.
    pub fn delete(&self, res: Res, name: &str) -> bool {
        self.state.delete(res, name)
    }

    pub fn get(&self, res: Res, name: &str) -> Option<Value> {
        self.state
            .inner
            .lock()
            .unwrap()
            .objects
            .get(&res)?
            .get(name)
            .cloned()
    }

    pub fn list(&self, res: Res) -> Vec<Value> {
        let inner = self.state.inner.lock().unwrap();
        inner
            .objects
            .get(&res)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The incident's failure: watches stay open but deliver nothing (no events, no bookmarks,
    /// and changes made meanwhile never enter the watch history), while lists stay correct.
    pub fn set_silent_watch(&self, on: bool) {
        self.state.inner.lock().unwrap().silent = on;
    }

    /// Watches started from now on ignore `timeoutSeconds`: a dead stream stays open until
    /// the client gives up on it (combine with [`set_silent_watch`](Self::set_silent_watch)).
    pub fn set_ignore_watch_timeout(&self, on: bool) {
        self.state.inner.lock().unwrap().ignore_watch_timeout = on;
    }

    /// Down: every open connection is cut and new ones are closed at once.
    pub fn set_down(&self, on: bool) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.down = on;
        if on {
            for c in inner.conns.drain(..) {
                c.abort();
            }
        }
    }

    /// Every request is answered `503 Service Unavailable` (which kube retries silently).
    pub fn set_unavailable(&self, on: bool) {
        self.state.inner.lock().unwrap().unavailable = on;
    }

    /// The agent's credentials are revoked (expired token, rotated certificate): open
    /// connections are cut and every request is answered `401 Unauthorized` until turned off.
    pub fn set_unauthorized(&self, on: bool) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.unauthorized = on;
        if on {
            for c in inner.conns.drain(..) {
                c.abort();
            }
        }
    }

    /// Lists and watches of `res` are answered `403 Forbidden` like RBAC without the verb.
    pub fn set_forbidden(&self, res: Res, on: bool) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.forbidden.retain(|r| *r != res);
        if on {
            inner.forbidden.push(res);
        }
    }

    /// The incident's kubelet: its watch dies now, so it keeps listing the pods bound to
    /// `node` at this moment and learns of no new ones or deletions (`false`: alive again).
    pub fn set_kubelet_stalled(&self, node: &str, on: bool) {
        let mut inner = self.state.inner.lock().unwrap();
        let frozen = on.then(|| inner.pods_on(node));
        inner.kubelets.entry(node.to_string()).or_default().frozen = frozen;
    }

    /// The node proxy to `node`'s kubelet answers `code` (403 without `nodes/proxy`, 503 when
    /// the kubelet is unreachable); `None`: answers again.
    pub fn set_kubelet_proxy_error(&self, node: &str, code: Option<u16>) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.kubelets.entry(node.to_string()).or_default().error = code;
    }

    /// Delay before every response.
    pub fn set_delay(&self, d: Duration) {
        self.state.inner.lock().unwrap().delay = d;
    }

    /// Compacts the history: open watches get an ERROR event with a 410 Status, and any watch
    /// or list from an older resourceVersion is answered 410 Gone.
    pub fn expire_history(&self) {
        let mut inner = self.state.inner.lock().unwrap();
        inner.rv += 1;
        inner.compacted = inner.rv;
        inner.history.clear();
        let _ = self.state.tx.send(Broadcast::Gone);
    }

    pub fn resource_version(&self) -> u64 {
        self.state.inner.lock().unwrap().rv
    }

    /// Every non-GET request received, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.inner.lock().unwrap().requests.clone()
    }

    pub fn watches_started(&self) -> usize {
        self.state.inner.lock().unwrap().watches_started
    }

    pub fn lists_served(&self) -> usize {
        self.state.inner.lock().unwrap().lists_served
    }
}

impl Inner {
    /// The pods bound to `node`.
    pub(crate) fn pods_on(&self, node: &str) -> Vec<Value> {
        self.objects
            .get(&Res::Pods)
            .map(|m| {
                m.values()
                    .filter(|p| p["spec"]["nodeName"] == node)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn object_key(res: Res, obj: &Value) -> String {
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match (res, obj["metadata"]["namespace"].as_str()) {
        (Res::Events | Res::Pods, Some(ns)) => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

impl State {
    fn api_version_of(&self, res: Res) -> String {
        match res {
            Res::Nodes | Res::Events | Res::Pods => "v1".to_string(),
            _ => self
                .cfg
                .calico_apis
                .first()
                .cloned()
                .unwrap_or_else(|| "crd.projectcalico.org/v1".into()),
        }
    }

    pub(crate) fn put(&self, res: Res, mut obj: Value) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        if obj.get("kind").is_none() {
            obj["kind"] = json!(res.kind());
            obj["apiVersion"] = json!(self.api_version_of(res));
        }
        let key = object_key(res, &obj);
        let existed = inner
            .objects
            .entry(res)
            .or_default()
            .insert(key, obj.clone())
            .is_some();
        let line = event_line(if existed { "MODIFIED" } else { "ADDED" }, &obj);
        self.emit(&mut inner, res, rv, line);
        rv
    }

    fn delete(&self, res: Res, name: &str) -> bool {
        let mut inner = self.inner.lock().unwrap();
        let Some(mut obj) = inner.objects.entry(res).or_default().remove(name) else {
            return false;
        };
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let line = event_line("DELETED", &obj);
        self.emit(&mut inner, res, rv, line);
        true
    }

    /// Records and broadcasts an event, unless the watch is silent: then it is lost, like the
    /// events kine never delivered to the API server's watch cache.
    fn emit(&self, inner: &mut Inner, res: Res, rv: u64, line: Bytes) {
        if inner.silent {
            return;
        }
        inner.history.push((rv, res, line.clone()));
        let _ = self.tx.send(Broadcast::Event { res, rv, line });
    }
}
