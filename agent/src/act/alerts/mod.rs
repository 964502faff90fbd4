//! Alerts (DESIGN.md §7): webhook, Slack, PagerDuty and Alertmanager sinks behind a durable,
//! at-least-once spool.
//!
//! - [`lifecycle`] — pure per-finding state machine (pending_for, escalation, repeat,
//!   resolve, flap damping, repaired-before-paged);
//! - [`spool`] — CRC-framed append-only queue and the persisted set of alerted findings;
//! - [`webhook`], [`slack`], [`pagerduty`], [`alertmanager`] — one request shape each;
//! - [`delivery`] — the HTTP transport trait, retry classification, Retry-After, backoff;
//! - [`engine`] — the [`Alerter`] that wires them; [`AlertConsumer`] runs it on the finding
//!   stream.
//!
//! Sinks are reached from the agent's own network namespace: the consumer runs on its own
//! thread, spawned by the daemon's loop thread, which never enters the `--netns` target (only
//! short-lived helper threads do, to create netlink sockets: `observe::netns`).

pub mod alertmanager;
pub mod delivery;
pub mod engine;
pub mod lifecycle;
pub mod notification;
pub mod pagerduty;
pub mod redact;
pub mod sink;
pub mod slack;
pub mod spool;
pub mod webhook;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

pub use delivery::{HttpRequest, HttpResponse, ReqwestTransport, Transport, TransportError};
pub use engine::{Alerter, AlerterError};
pub use notification::{AlertState, Notification};
pub use sink::Sink;

use crate::{
    config::{AlertsConfig, SinkKind},
    daemon::{Consumer, FindingsDelta},
    serve::{Metrics, StatusHandle},
};

/// How often pending deliveries and time-based transitions are looked at: a finding pages
/// within `pending_for` + this, a resolve goes out well within 3 s.
pub const TICK: Duration = Duration::from_millis(250);

/// The alert consumer of the finding stream.
pub struct AlertConsumer {
    alerter: Alerter<ReqwestTransport>,
    status: StatusHandle,
    last: Option<crate::serve::status::AlertsStatus>,
}

impl AlertConsumer {
    pub fn new(
        config: &AlertsConfig,
        node: &str,
        status: StatusHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, AlertSetupError> {
        let connect = config
            .sinks
            .iter()
            .map(|s| s.timeout)
            .min()
            .unwrap_or(Duration::from_secs(10));
        let transport = ReqwestTransport::new(connect).map_err(AlertSetupError::Transport)?;
        let alerter = Alerter::open(config, node, transport, Some(metrics))?;
        Ok(AlertConsumer {
            alerter,
            status,
            last: None,
        })
    }

    async fn step(&mut self) {
        let now = SystemTime::now();
        self.alerter.step(now).await;
        let s = self.alerter.status(now);
        if self.last.as_ref() != Some(&s) {
            self.last = Some(s.clone());
            self.status.update(|st| st.alerts = s).await;
        }
    }
}

/// Status rows for sinks that cannot run because delivery could not start (the spool
/// directory is unusable): each says why, so alerts are never off silently.
pub fn disabled_sinks(
    config: &AlertsConfig,
    why: &AlertSetupError,
) -> Vec<crate::serve::status::AlertSinkStatus> {
    config
        .sinks
        .iter()
        .map(|s| crate::serve::status::AlertSinkStatus {
            name: s.name.clone(),
            kind: s.kind.to_string(),
            pending: 0,
            sent: 0,
            failed: 0,
            last_error: Some(format!("disabled: {why}")),
            last_success: None,
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AlertSetupError {
    #[error("{0}")]
    Alerter(#[from] AlerterError),
    #[error("HTTP client: {0}")]
    Transport(TransportError),
}

impl Consumer for AlertConsumer {
    const NAME: &'static str = "alerts";
    const TICK: Option<Duration> = Some(TICK);

    async fn consume(&mut self, delta: Arc<FindingsDelta>, _missed: u64) {
        if let Some(node) = delta.local_node.as_deref().filter(|n| !n.is_empty()) {
            self.alerter.set_node(node);
        }
        // Every delta carries the whole open set: missed ones need no catching up.
        self.alerter.observe(&delta.open, delta.in_sync, delta.at);
        self.step().await;
    }

    async fn tick(&mut self) {
        self.step().await;
    }
}

/// One sink's answer to `watchdog alert test`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TestResult {
    pub sink: String,
    pub kind: SinkKind,
    /// `scheme://host/…`.
    pub url: String,
    /// HTTP status of the firing and the resolve (None: no response).
    pub firing: Option<u16>,
    pub resolved: Option<u16>,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Sends a marked test notification and its resolve through each sink (or only `only`), one
/// attempt each, without the spool.
pub async fn send_test<T: Transport>(
    config: &AlertsConfig,
    node: &str,
    only: Option<&str>,
    transport: &T,
) -> Vec<TestResult> {
    let mut out = Vec::new();
    for (name, kind, sink) in engine::load_sinks(&config.sinks) {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let sink = match sink {
            Ok(s) => s,
            Err(e) => {
                out.push(TestResult {
                    sink: name,
                    kind,
                    url: String::new(),
                    firing: None,
                    resolved: None,
                    ok: false,
                    error: Some(e.to_string()),
                });
                continue;
            }
        };
        let mut result = TestResult {
            sink: name,
            kind,
            url: sink.redacted_url(),
            firing: None,
            resolved: None,
            ok: false,
            error: None,
        };
        let now = SystemTime::now();
        let secrets = sink.secrets();
        for status in [AlertState::Firing, AlertState::Resolved] {
            let n = Notification::test(node, status, now);
            let req = sink.request(&n, &engine::new_id(), SystemTime::now());
            let code = match transport.post(req).await {
                Ok(r) => {
                    if !(200..300).contains(&r.status) {
                        let body = r.body.trim();
                        result.error.get_or_insert_with(|| {
                            redact::scrub(&format!("HTTP {} {body}", r.status), &secrets)
                                .trim()
                                .to_string()
                        });
                    }
                    Some(r.status)
                }
                Err(e) => {
                    result
                        .error
                        .get_or_insert_with(|| redact::scrub(&e.to_string(), &secrets));
                    None
                }
            };
            match status {
                AlertState::Firing => result.firing = code,
                AlertState::Resolved => result.resolved = code,
            }
        }
        result.ok = [result.firing, result.resolved]
            .iter()
            .all(|c| c.is_some_and(|c| (200..300).contains(&c)));
        out.push(result);
    }
    out
}

#[cfg(test)]
mod tests;
