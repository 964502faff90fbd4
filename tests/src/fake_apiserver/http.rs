//! HTTP side of the fake: accept loop, routing, list/watch/patch/create handlers.

use std::{collections::HashMap, convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::broadcast::error::RecvError};

use super::{event_line, Broadcast, Recorded, Res, State};

type Body = BoxBody<Bytes, Infallible>;

pub(super) async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let mut inner = state.inner.lock().unwrap();
        if inner.down {
            drop(sock);
            continue;
        }
        inner.conns.retain(|c| !c.is_finished());
        let st = state.clone();
        let conn = tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { Ok::<_, Infallible>(handle(st, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc)
                .await;
        });
        inner.conns.push(conn.abort_handle());
    }
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `a%3Db+c` → `a=b c`, as a query string is encoded.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (hex, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let (delay, unavailable, unauthorized) = {
        let i = st.inner.lock().unwrap();
        (i.delay, i.unavailable, i.unauthorized)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if unavailable {
        return status(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "fake: unavailable",
        );
    }
    if unauthorized {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let q = query(&req);
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body: Value = if method == Method::GET {
        Value::Null
    } else {
        let bytes = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    if method != Method::GET {
        st.inner.lock().unwrap().requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            content_type: content_type.clone(),
            body: body.clone(),
        });
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segs.as_slice()) {
        (&Method::GET, ["api"]) => full(
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"],
                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                   "serverAddress": st.addr.to_string()}]}),
        ),
        (&Method::GET, ["apis"]) => full(StatusCode::OK, api_group_list(&st)),
        (&Method::GET, ["api", "v1"]) => full(
            StatusCode::OK,
            resource_list(
                "v1",
                &[
                    (
                        "nodes",
                        "Node",
                        false,
                        &["get", "list", "watch", "patch"][..],
                    ),
                    ("nodes/status", "Node", false, &["get", "patch"][..]),
                    ("nodes/proxy", "NodeProxyOptions", false, &["get"][..]),
                    ("pods", "Pod", true, &["get", "list", "watch"][..]),
                    (
                        "events",
                        "Event",
                        true,
                        &["create", "get", "list", "patch", "watch"][..],
                    ),
                ],
            ),
        ),
        (&Method::GET, ["apis", g, v]) => {
            let gv = format!("{g}/{v}");
            if st.cfg.calico_apis.contains(&gv) {
                let verbs = &[
                    "get", "list", "watch", "create", "update", "patch", "delete",
                ][..];
                let mut resources = vec![
                    ("ipamblocks", "IPAMBlock", false, verbs),
                    ("blockaffinities", "BlockAffinity", false, verbs),
                ];
                if st.cfg.calico_config {
                    resources.push(("ippools", "IPPool", false, verbs));
                    resources.push(("felixconfigurations", "FelixConfiguration", false, verbs));
                }
                full(StatusCode::OK, resource_list(&gv, &resources))
            } else {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "the server could not find the requested resource",
                )
            }
        }
        (&Method::GET, ["api", "v1", "nodes"]) => list_or_watch(&st, Res::Nodes, &q, "v1"),
        (&Method::GET, ["api", "v1", "pods"]) => list_or_watch(&st, Res::Pods, &q, "v1"),
        (&Method::GET, ["api", "v1", "nodes", node, "proxy", "pods"]) => kubelet_pods(&st, node),
        (&Method::GET, ["api", "v1", "nodes", name]) => get(&st, Res::Nodes, name),
        (&Method::GET, ["apis", g, v, plural]) => {
            let gv = format!("{g}/{v}");
            match Res::from_plural(plural) {
                Some(res @ (Res::IpamBlocks | Res::BlockAffinities))
                    if st.cfg.calico_apis.contains(&gv) =>
                {
                    list_or_watch(&st, res, &q, &gv)
                }
                Some(res @ (Res::IpPools | Res::FelixConfigurations))
                    if st.cfg.calico_apis.contains(&gv) && st.cfg.calico_config =>
                {
                    list_or_watch(&st, res, &q, &gv)
                }
                _ => status(StatusCode::NOT_FOUND, "NotFound", "no such resource"),
            }
        }
        (&Method::PATCH, ["api", "v1", "nodes", name, "status"]) => {
            patch_node_status(&st, name, &body, content_type.as_deref())
        }
        (&Method::POST, ["api", "v1", "namespaces", ns, "events"]) => {
            let mut obj = body;
            obj["metadata"]["namespace"] = json!(ns);
            let key = format!("{ns}/{}", obj["metadata"]["name"].as_str().unwrap_or(""));
            st.put(Res::Events, obj);
            get(&st, Res::Events, &key).map_status(StatusCode::CREATED)
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => list_pods(&st, ns, &q),
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let key = format!("{ns}/{name}");
            let found = get(&st, Res::Pods, &key);
            if found.status().is_success() {
                st.delete(Res::Pods, &key);
            }
            found
        }
        (&Method::PATCH, ["api", "v1", "namespaces", ns, "events", name]) => {
            let key = format!("{ns}/{name}");
            let Some(mut obj) = st
                .inner
                .lock()
                .unwrap()
                .objects
                .get(&Res::Events)
                .and_then(|m| m.get(&key))
                .cloned()
            else {
                return status(StatusCode::NOT_FOUND, "NotFound", "no such event");
            };
            merge_patch(&mut obj, &body);
            st.put(Res::Events, obj);
            get(&st, Res::Events, &key)
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("fake: no route for {method} {path}"),
        ),
    }
}

/// `GET /api/v1/namespaces/<ns>/pods` with `labelSelector` (`k=v[,k=v]`) and
/// `fieldSelector` (`spec.nodeName=<node>`, the only field the fake knows).
fn list_pods(st: &State, ns: &str, q: &HashMap<String, String>) -> Response<Body> {
    let pairs = |s: Option<&String>| -> Vec<(String, String)> {
        s.map(|s| {
            s.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default()
    };
    let labels = pairs(q.get("labelSelector"));
    let fields = pairs(q.get("fieldSelector"));
    let inner = st.inner.lock().unwrap();
    let items: Vec<Value> = inner
        .objects
        .get(&Res::Pods)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.split_once('/').is_some_and(|(n, _)| n == ns))
                .map(|(_, v)| v)
                .filter(|p| {
                    labels
                        .iter()
                        .all(|(k, v)| p["metadata"]["labels"][k].as_str() == Some(v))
                        && fields.iter().all(|(k, v)| {
                            k == "spec.nodeName" && p["spec"]["nodeName"].as_str() == Some(v)
                        })
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    full(
        StatusCode::OK,
        json!({"kind": "PodList", "apiVersion": "v1",
               "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
    )
}

trait MapStatus {
    fn map_status(self, code: StatusCode) -> Self;
}
impl MapStatus for Response<Body> {
    fn map_status(mut self, code: StatusCode) -> Self {
        if self.status().is_success() {
            *self.status_mut() = code;
        }
        self
    }
}

fn api_group_list(st: &State) -> Value {
    let mut groups: Vec<Value> = Vec::new();
    for gv in &st.cfg.calico_apis {
        let (g, v) = gv.split_once('/').unwrap_or((gv, "v1"));
        let entry = json!({"groupVersion": gv, "version": v});
        match groups.iter_mut().find(|x| x["name"] == g) {
            Some(x) => x["versions"].as_array_mut().unwrap().push(entry),
            None => groups
                .push(json!({"name": g, "versions": [entry.clone()], "preferredVersion": entry})),
        }
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(gv: &str, resources: &[(&str, &str, bool, &[&str])]) -> Value {
    let rs: Vec<Value> = resources
        .iter()
        .map(|(name, kind, namespaced, verbs)| {
            json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind,
                   "verbs": verbs})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
}

fn get(st: &State, res: Res, key: &str) -> Response<Body> {
    let obj = st
        .inner
        .lock()
        .unwrap()
        .objects
        .get(&res)
        .and_then(|m| m.get(key))
        .cloned();
    match obj {
        Some(o) => full(StatusCode::OK, o),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} {key} not found", res.plural()),
        ),
    }
}

/// `a.b=c,d!=e` against the object's JSON (what the API server supports for pods).
fn matches_fields(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (path, want, equal) = match term.split_once("!=") {
            Some((p, v)) => (p, v, false),
            None => match term.split_once("==").or_else(|| term.split_once('=')) {
                Some((p, v)) => (p, v, true),
                None => return false,
            },
        };
        let got = path
            .split('.')
            .try_fold(obj, |v, k| v.get(k))
            .and_then(Value::as_str)
            .unwrap_or("");
        (got == want) == equal
    })
}

/// What the kubelet on `node` answers through the node proxy: the pods bound to it (a
/// healthy kubelet), the list frozen when its watch died, or an error.
fn kubelet_pods(st: &State, node: &str) -> Response<Body> {
    let inner = st.inner.lock().unwrap();
    let kubelet = inner.kubelets.get(node).cloned().unwrap_or_default();
    if let Some(code) = kubelet.error {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        drop(inner);
        return status(
            code,
            code.canonical_reason().unwrap_or("Error"),
            &format!("fake: the node proxy to {node} answers {code}"),
        );
    }
    let items = kubelet.frozen.unwrap_or_else(|| inner.pods_on(node));
    full(
        StatusCode::OK,
        json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}),
    )
}

fn gone(message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": "Expired", "code": 410})
}

fn list_or_watch(
    st: &Arc<State>,
    res: Res,
    q: &HashMap<String, String>,
    gv: &str,
) -> Response<Body> {
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let watch = matches!(q.get("watch").map(String::as_str), Some("true" | "1"));
    if st.inner.lock().unwrap().forbidden.contains(&res) {
        // What RBAC answers when the ClusterRole lacks the verb.
        let group = gv.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "{} is forbidden: User \"system:serviceaccount:kube-system:dataplane-watchdog\" \
                 cannot {} resource \"{}\" in API group \"{group}\" at the cluster scope",
                res.plural(),
                if watch { "watch" } else { "list" },
                res.plural()
            ),
        );
    }
    if !watch {
        let mut inner = st.inner.lock().unwrap();
        if let Ok(rv) = rv_param.parse::<u64>() {
            if rv != 0 && rv < inner.compacted {
                return full(StatusCode::GONE, gone("too old resource version"));
            }
        }
        inner.lists_served += 1;
        let selector = q.get("fieldSelector").cloned().unwrap_or_default();
        let items: Vec<Value> = inner
            .objects
            .get(&res)
            .map(|m| {
                m.values()
                    .filter(|o| matches_fields(o, &selector))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        return full(
            StatusCode::OK,
            json!({"kind": format!("{}List", res.kind()), "apiVersion": gv,
                   "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
        );
    }
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let mut timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let mut sub = st.tx.subscribe();
    // Subscribe and snapshot under one lock: nothing falls between replay and live events.
    let (initial, start_rv) = {
        let mut inner = st.inner.lock().unwrap();
        inner.watches_started += 1;
        if inner.ignore_watch_timeout {
            timeout = Duration::from_secs(1800);
        }
        match rv_param.parse::<u64>() {
            Ok(rv) if rv != 0 && rv < inner.compacted => (
                vec![event_line("ERROR", &gone("too old resource version"))],
                None,
            ),
            Ok(rv) if rv != 0 => (
                inner
                    .history
                    .iter()
                    .filter(|(r, rs, _)| *r > rv && *rs == res)
                    .map(|(_, _, l)| l.clone())
                    .collect(),
                Some(inner.rv),
            ),
            // No (or "0") resourceVersion: synthetic ADDED for everything, then live.
            _ => (
                inner
                    .objects
                    .get(&res)
                    .map(|m| m.values().map(|o| event_line("ADDED", o)).collect())
                    .unwrap_or_default(),
                Some(inner.rv),
            ),
        }
    };
    let st2 = st.clone();
    tokio::spawn(async move {
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let Some(mut last_rv) = start_rv else { return };
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(st2.cfg.bookmark_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                _ = tick.tick(), if bookmarks => {
                    let (silent, rv, kind) = {
                        let i = st2.inner.lock().unwrap();
                        (i.silent, i.rv, res.kind())
                    };
                    if silent {
                        continue;
                    }
                    let _ = last_rv;
                    let bm = json!({"kind": kind, "apiVersion": st2.api_version_of(res),
                        "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                        return;
                    }
                }
                msg = sub.recv() => match msg {
                    Ok(Broadcast::Event { res: r, rv, line }) if r == res && rv > last_rv => {
                        last_rv = rv;
                        if tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    Ok(Broadcast::Event { .. }) => {}
                    Ok(Broadcast::Gone) => {
                        let _ = tx.send(event_line("ERROR", &gone("too old resource version"))).await;
                        return;
                    }
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return,
                }
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// RFC 7386 JSON merge patch.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn patch_node_status(
    st: &State,
    name: &str,
    body: &Value,
    content_type: Option<&str>,
) -> Response<Body> {
    let Some(mut node) = st
        .inner
        .lock()
        .unwrap()
        .objects
        .get(&Res::Nodes)
        .and_then(|m| m.get(name))
        .cloned()
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("nodes \"{name}\" not found"),
        );
    };
    let strategic = content_type.is_some_and(|c| c.contains("strategic-merge-patch"));
    let mut patch = body.clone();
    // Strategic merge: status.conditions merge by `type`; everything else merges like JSON.
    let conditions = if strategic {
        patch
            .get_mut("status")
            .and_then(|s| s.as_object_mut())
            .and_then(|s| s.remove("conditions"))
    } else {
        None
    };
    merge_patch(&mut node, &patch);
    if let Some(Value::Array(new)) = conditions {
        if !node["status"]["conditions"].is_array() {
            node["status"]["conditions"] = json!([]);
        }
        let list = node["status"]["conditions"].as_array_mut().unwrap();
        for c in new {
            match list.iter_mut().find(|x| x["type"] == c["type"]) {
                Some(x) => merge_patch(x, &c),
                None => list.push(c),
            }
        }
    }
    st.put(Res::Nodes, node);
    get(st, Res::Nodes, name)
}
