//! Writing back to the cluster: the `VXLANDataplaneHealthy` Node condition and Events on the
//! local Node, so `kubectl describe node` shows what the watchdog sees.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::time::Instant;

use super::{error::bounded, KubeSource, LiteObject, Result, CONDITION_TYPE};
use crate::model::{Finding, Severity};

/// What [`KubeSource::publish_event`] did with a finding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// `publish_events` is off.
    Disabled,
    /// Only critical findings become Events.
    NotCritical,
    /// A new Event was created (its name).
    Created(String),
    /// A repeat within the aggregation window: the existing Event's count was patched.
    Updated { name: String, count: u32 },
    /// A repeat counted locally; the Event is patched at most every `event_update_interval`.
    Aggregated { name: String, count: u32 },
    /// More new Events than `events_per_minute`: not sent.
    RateLimited,
}

struct EventRecord {
    name: String,
    count: u32,
    first: SystemTime,
    last_seen: Instant,
    last_sent: Instant,
}

struct LastCondition {
    healthy: bool,
    reason: String,
    message: String,
    transition: SystemTime,
    sent: Instant,
}

#[derive(Default)]
struct State {
    condition: Option<LastCondition>,
    events: HashMap<String, EventRecord>,
    created: VecDeque<Instant>,
    suppressed: u64,
}

/// Rate-limit and aggregation state shared by clones of a [`KubeSource`].
#[derive(Default)]
pub(super) struct Publisher {
    state: Mutex<State>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `gateway-wrong-vtep` → `GatewayWrongVtep` (Event reasons are UpperCamelCase).
fn camel(id: &str) -> String {
    id.split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(super) async fn publish_condition(
    src: &KubeSource,
    healthy: bool,
    reason: &str,
    message: &str,
) -> Result<bool> {
    let now = SystemTime::now();
    let node = &src.local_node();
    let transition = {
        let st = src.publisher.state.lock().unwrap();
        match &st.condition {
            Some(c)
                if c.healthy == healthy
                    && c.reason == reason
                    && c.message == message
                    && c.sent.elapsed() < src.cfg.condition_refresh =>
            {
                return Ok(false);
            }
            Some(c) if c.healthy == healthy => c.transition,
            _ => now,
        }
    };
    // Strategic merge: conditions merge by `type`. A JSON merge patch would replace the whole
    // list and wipe kubelet's Ready condition.
    let body = json!({"status": {"conditions": [{
        "type": CONDITION_TYPE,
        "status": if healthy { "True" } else { "False" },
        "reason": reason,
        "message": truncate(message, 1024),
        "lastHeartbeatTime": rfc3339(now),
        "lastTransitionTime": rfc3339(transition),
    }]}});
    let api: Api<LiteObject> = Api::all_with(src.client.clone(), &src.apis.nodes);
    bounded(
        || format!("patching Node/{node} status condition {CONDITION_TYPE}"),
        src.cfg.request_timeout,
        api.patch_status(node, &PatchParams::default(), &Patch::Strategic(body)),
    )
    .await?;
    src.publisher.state.lock().unwrap().condition = Some(LastCondition {
        healthy,
        reason: reason.to_string(),
        message: message.to_string(),
        transition,
        sent: Instant::now(),
    });
    Ok(true)
}

pub(super) async fn publish_event(src: &KubeSource, finding: &Finding) -> Result<EventOutcome> {
    let cfg = &src.cfg;
    if !cfg.publish_events {
        return Ok(EventOutcome::Disabled);
    }
    if finding.severity != Severity::Critical {
        return Ok(EventOutcome::NotCritical);
    }
    let key = format!("{:?}", finding.key());
    let reason = camel(finding.check.as_str());
    publish_node_event(src, key, &reason, "Warning", &finding.message).await
}

/// An Event on the local Node about something the agent did (`kind`: `Normal` or `Warning`),
/// aggregated per `key` and rate-limited like the finding Events.
pub(super) async fn publish_action_event(
    src: &KubeSource,
    key: &str,
    reason: &str,
    kind: &str,
    message: &str,
) -> Result<EventOutcome> {
    if !src.cfg.publish_events {
        return Ok(EventOutcome::Disabled);
    }
    publish_node_event(src, format!("action:{key}"), reason, kind, message).await
}

async fn publish_node_event(
    src: &KubeSource,
    key: String,
    reason: &str,
    kind: &str,
    message: &str,
) -> Result<EventOutcome> {
    let cfg = &src.cfg;
    let node = &src.local_node();
    let ns = &cfg.event_namespace;
    let ar = ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(src.client.clone(), ns, &ar);
    let now = SystemTime::now();

    // Decide under the lock, send without it.
    enum Plan {
        Create(String),
        Update(String, u32, SystemTime),
    }
    let plan = {
        let mut st = src.publisher.state.lock().unwrap();
        let window = cfg.event_aggregation_window;
        st.events.retain(|_, r| r.last_seen.elapsed() < window);
        match st.events.get_mut(&key) {
            Some(r) => {
                r.count += 1;
                r.last_seen = Instant::now();
                if r.last_sent.elapsed() < cfg.event_update_interval {
                    return Ok(EventOutcome::Aggregated {
                        name: r.name.clone(),
                        count: r.count,
                    });
                }
                r.last_sent = Instant::now();
                Plan::Update(r.name.clone(), r.count, r.first)
            }
            None => {
                while st
                    .created
                    .front()
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(60))
                {
                    st.created.pop_front();
                }
                if st.created.len() >= cfg.events_per_minute as usize {
                    st.suppressed += 1;
                    return Ok(EventOutcome::RateLimited);
                }
                st.created.push_back(Instant::now());
                let nanos = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                let name = format!("{node}.{nanos:x}");
                st.events.insert(
                    key.clone(),
                    EventRecord {
                        name: name.clone(),
                        count: 1,
                        first: now,
                        last_seen: Instant::now(),
                        last_sent: Instant::now(),
                    },
                );
                Plan::Create(name)
            }
        }
    };
    let message = truncate(message, 1024);
    match plan {
        Plan::Create(name) => {
            let mut obj = DynamicObject::new(&name, &ar).within(ns);
            // Kubelet's convention for Node events: uid = node name, which is what
            // `kubectl describe node` searches for.
            obj.data = json!({
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node, "uid": node},
                "reason": reason,
                "message": message,
                "type": kind,
                "source": {"component": "dataplane-watchdog", "host": node},
                "reportingComponent": "dataplane-watchdog",
                "reportingInstance": node,
                "firstTimestamp": rfc3339(now),
                "lastTimestamp": rfc3339(now),
                "count": 1,
            });
            let sent = bounded(
                || format!("creating Event {ns}/{name} for Node/{node}"),
                cfg.request_timeout,
                api.create(&PostParams::default(), &obj),
            )
            .await;
            if let Err(e) = sent {
                // Forget it so the next occurrence retries the create.
                src.publisher.state.lock().unwrap().events.remove(&key);
                return Err(e);
            }
            Ok(EventOutcome::Created(name))
        }
        Plan::Update(name, count, first) => {
            let body = json!({
                "count": count,
                "message": message,
                "firstTimestamp": rfc3339(first),
                "lastTimestamp": rfc3339(now),
            });
            bounded(
                || format!("updating Event {ns}/{name} for Node/{node}"),
                cfg.request_timeout,
                api.patch(&name, &PatchParams::default(), &Patch::Merge(body)),
            )
            .await?;
            Ok(EventOutcome::Updated { name, count })
        }
    }
}

/// Namespaces calico-node runs in: the operator's, then the manifest install's.
pub const CALICO_NODE_NAMESPACES: [&str; 2] = ["calico-system", "kube-system"];

/// Deletes this node's calico-node pod (label `k8s-app=calico-node`, field
/// `spec.nodeName=<node>`, in [`CALICO_NODE_NAMESPACES`]); its DaemonSet recreates it and
/// Felix resyncs from the datastore. Returns `namespace/name` of the pod deleted, `None` when
/// there is none.
pub(super) async fn restart_calico_node(src: &KubeSource) -> Result<Option<String>> {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{DeleteParams, ListParams};
    let node = &src.local_node();
    let params = ListParams::default()
        .labels("k8s-app=calico-node")
        .fields(&format!("spec.nodeName={node}"));
    for ns in CALICO_NODE_NAMESPACES {
        let api: Api<Pod> = Api::namespaced(src.client.clone(), ns);
        let pods = bounded(
            || format!("listing calico-node pods of {node} in {ns}"),
            src.cfg.request_timeout,
            api.list(&params),
        )
        .await?;
        let Some(name) = pods.items.into_iter().find_map(|p| p.metadata.name) else {
            continue;
        };
        bounded(
            || format!("deleting pod {ns}/{name}"),
            src.cfg.request_timeout,
            api.delete(&name, &DeleteParams::default()),
        )
        .await?;
        return Ok(Some(format!("{ns}/{name}")));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_camel_case() {
        assert_eq!(camel("gateway-wrong-vtep"), "GatewayWrongVtep");
        assert_eq!(camel("fdb-missing"), "FdbMissing");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("aé", 2), "a…");
    }
}
