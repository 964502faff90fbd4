//! The alerter: lifecycle → spool → sinks, with the delivery rules of DESIGN.md §7.
//!
//! Each notification is spooled (fsynced) once per sink that wants it, before any attempt,
//! and removed only after a 2xx or a permanent failure. Per sink and finding only the oldest
//! spooled notification is eligible, so a resolve never overtakes its trigger; a finding
//! waiting for its retry delay does not hold up the others. Each sink has at most one request
//! in flight (a spawned task bounded by the sink's timeout), sinks run in parallel, and a pass
//! waits at most `PASS` (200 ms) for answers: a hanging receiver delays only its own sink.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use super::{
    alertmanager,
    delivery::{classify, next_delay, HttpResponse, Outcome, Transport, TransportError},
    lifecycle::{Alerted, Lifecycle, Policy},
    notification::{AlertState, Notification, Reason},
    redact::scrub,
    sink::{Sink, SinkError},
    spool::{Spool, SpoolError, Spooled},
};
use crate::{
    config::{AlertsConfig, SinkConfig, SinkKind},
    model::Finding,
    serve::{
        status::{AlertRecord, AlertSinkStatus, AlertsStatus, DampedAlert},
        Metrics,
    },
};

/// Recent deliveries kept for status.
const RECENT: usize = 32;
/// How long one pass waits for answers; a request still running then is settled later.
const PASS: Duration = Duration::from_millis(200);

/// One spooled notification for one sink.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// The notification id (`webhook-id`): the same on every retry and after a restart.
    pub id: String,
    pub sink: String,
    pub notification: Notification,
    #[serde(with = "humantime_serde")]
    pub created_at: SystemTime,
}

impl Spooled for Entry {
    fn rank(&self) -> u8 {
        self.notification.finding.severity as u8
    }
}

struct InFlight {
    idx: usize,
    handle: tokio::task::JoinHandle<Result<HttpResponse, TransportError>>,
}

#[derive(Debug, Default)]
struct Attempt {
    attempts: u32,
    next_at: Option<SystemTime>,
}

struct Slot {
    name: String,
    kind: SinkKind,
    /// `None`: disabled (its secrets could not be loaded; `last_error` says why).
    sink: Option<Sink>,
    sent: u64,
    failed: u64,
    last_error: Option<String>,
    last_success: Option<SystemTime>,
    /// Alertmanager: alerts it holds that need re-posting.
    am_firing: BTreeMap<String, Notification>,
    am_resolved: BTreeMap<String, (Notification, SystemTime)>,
    am_last_refresh: Option<SystemTime>,
}

/// Sends the findings' notifications. Generic over the HTTP transport (a fake in tests).
pub struct Alerter<T: Transport> {
    lifecycle: Lifecycle,
    spool: Spool<Entry>,
    slots: Vec<Slot>,
    transport: Arc<T>,
    attempts: HashMap<u64, Attempt>,
    in_flight: HashMap<u64, InFlight>,
    sent: u64,
    failed: u64,
    dropped: u64,
    recent: VecDeque<AlertRecord>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug, thiserror::Error)]
pub enum AlerterError {
    #[error("alert spool: {0}")]
    Spool(#[from] SpoolError),
}

impl<T: Transport> Alerter<T> {
    /// Opens the spool in `config.spool_dir`, loads each sink's secrets (a sink that cannot
    /// load them is disabled and says why), and restores what a previous run had sent.
    pub fn open(
        config: &AlertsConfig,
        node: &str,
        transport: T,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, AlerterError> {
        let (spool, _) = Spool::<Entry>::open(&config.spool_dir, config.spool_max_entries)?;
        let restored: BTreeMap<String, Alerted> = Spool::<Entry>::load_alerted(&config.spool_dir);
        let slots = config.sinks.iter().map(slot).collect::<Vec<_>>();
        let mut lifecycle = Lifecycle::new(
            Policy {
                pending_for: config.pending_for,
                repeat_interval: config.repeat_interval,
                send_resolved: config.send_resolved,
            },
            node,
            restored.clone(),
        );
        let _ = lifecycle.take_dirty();
        let mut alerter = Alerter {
            lifecycle,
            spool,
            slots,
            transport: Arc::new(transport),
            attempts: HashMap::new(),
            in_flight: HashMap::new(),
            sent: 0,
            failed: 0,
            dropped: 0,
            recent: VecDeque::new(),
            metrics,
        };
        // Alertmanager forgets what is not re-posted: pick the restored alerts up again.
        for (key, a) in &restored {
            let n = Notification {
                dedup_key: key.clone(),
                status: AlertState::Firing,
                reason: Reason::Opened,
                node: node.to_string(),
                finding: a.finding.clone(),
                started_at: a.started_at,
                resolved_at: None,
                previous_severity: None,
                test: false,
            };
            for s in alerter.slots.iter_mut() {
                if s.kind == SinkKind::Alertmanager && s.sink.as_ref().is_some_and(|k| k.wants(&n))
                {
                    s.am_firing.insert(key.clone(), n.clone());
                }
            }
        }
        if !restored.is_empty() || !alerter.spool.is_empty() {
            info!(
                alerted = restored.len(),
                pending = alerter.spool.len(),
                "alerts: restored the alerted findings and the pending notifications"
            );
        }
        alerter.publish_gauges();
        Ok(alerter)
    }

    /// One evaluation's open findings.
    pub fn observe(&mut self, open: &[Arc<Finding>], in_sync: bool, at: SystemTime) {
        self.lifecycle.observe(open, in_sync, at);
    }

    /// See [`Lifecycle::set_node`].
    pub fn set_node(&mut self, node: &str) {
        self.lifecycle.set_node(node);
    }

    /// Everything due at `now`: new notifications spooled, due deliveries attempted,
    /// Alertmanager re-posted.
    pub async fn step(&mut self, now: SystemTime) {
        self.advance(now);
        self.pump(now).await;
        self.refresh_alertmanager(now).await;
    }

    /// Spools the notifications the lifecycle has due, and persists what was sent.
    pub fn advance(&mut self, now: SystemTime) {
        let mut entries = Vec::new();
        for n in self.lifecycle.due(now) {
            for slot in &self.slots {
                let Some(sink) = slot.sink.as_ref().filter(|s| s.wants(&n)) else {
                    continue;
                };
                debug!(sink = %sink.name, dedup_key = %n.dedup_key, status = n.status.as_str(), "alert spooled");
                entries.push(Entry {
                    id: new_id(),
                    sink: sink.name.clone(),
                    notification: n.clone(),
                    created_at: now,
                });
            }
        }
        if !entries.is_empty() {
            // One fsync for the whole evaluation, before any attempt.
            match self.spool.push_all(entries) {
                Ok(dropped) => {
                    for (seq, _) in &dropped {
                        self.attempts.remove(seq);
                    }
                    self.count_dropped(dropped.len());
                }
                Err(e) => error!(error = %e, "alert notifications could not be spooled"),
            }
        }
        if self.lifecycle.take_dirty() {
            if let Err(e) = self.spool.save_alerted(&self.lifecycle.alerted()) {
                error!(error = %e, "cannot persist the alerted findings");
            }
        }
        self.publish_gauges();
    }

    fn count_dropped(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        self.dropped += n as u64;
        warn!(
            dropped = n,
            "alert spool full: dropped the oldest lowest-severity notifications"
        );
        if let Some(m) = &self.metrics {
            m.inc_alerts_dropped(n as u64);
        }
    }

    /// Attempts the due, eligible notifications: one request in flight per sink, sinks in
    /// parallel, for up to `PASS` (200 ms). A request still running then (a slow or hanging
    /// receiver) keeps running and is settled at a later pass, so a stuck sink never delays
    /// the others or the next evaluation.
    pub async fn pump(&mut self, now: SystemTime) {
        let started = tokio::time::Instant::now();
        let deadline = started + PASS;
        let mut unreachable = BTreeSet::new();
        loop {
            self.start_due(now, &unreachable);
            if self.in_flight.is_empty() {
                break;
            }
            // Same map, no change in between: keys and values iterate in the same order.
            let seqs: Vec<u64> = self.in_flight.keys().copied().collect();
            let any =
                futures::future::select_all(self.in_flight.values_mut().map(|f| &mut f.handle));
            let Ok((joined, i, _)) = tokio::time::timeout_at(deadline, any).await else {
                break;
            };
            let seq = seqs[i];
            let f = self.in_flight.remove(&seq).expect("listed above");
            let result = joined.unwrap_or_else(|e| {
                Err(TransportError::Other(format!("delivery task failed: {e}")))
            });
            // Refused or timed out: the sink's other notifications wait for the next pass.
            if result.is_err() {
                unreachable.insert(f.idx);
            }
            // A Retry-After or backoff counts from the answer, not from the start of the pass.
            self.settle(f.idx, seq, result, now + started.elapsed());
        }
        self.publish_gauges();
    }

    /// Starts a request for each sink with none in flight: its oldest due, eligible entry.
    fn start_due(&mut self, now: SystemTime, skip: &BTreeSet<usize>) {
        let busy: BTreeSet<usize> = self.in_flight.values().map(|f| f.idx).collect();
        let mut started: BTreeSet<usize> = BTreeSet::new();
        let mut heads = BTreeSet::new();
        let mut orphans = Vec::new();
        let mut to_start = Vec::new();
        for (seq, e) in self.spool.entries() {
            // Only the oldest per sink and finding: a resolve never overtakes its trigger.
            if !heads.insert((e.sink.clone(), e.notification.dedup_key.clone())) {
                continue;
            }
            let Some(idx) = self.slots.iter().position(|s| s.name == e.sink) else {
                orphans.push(seq);
                continue;
            };
            if busy.contains(&idx) || skip.contains(&idx) || started.contains(&idx) {
                continue;
            }
            let Some(sink) = &self.slots[idx].sink else {
                continue;
            };
            if self
                .attempts
                .get(&seq)
                .and_then(|a| a.next_at)
                .is_some_and(|at| at > now)
            {
                continue;
            }
            started.insert(idx);
            to_start.push((seq, idx, sink.request(&e.notification, &e.id, now)));
        }
        for seq in orphans {
            if let Ok(Some(e)) = self.spool.remove(seq) {
                warn!(sink = %e.sink, dedup_key = %e.notification.dedup_key, "alert for a sink no longer configured dropped");
            }
        }
        for (seq, idx, req) in to_start {
            let transport = self.transport.clone();
            let handle = tokio::spawn(async move { transport.post(req).await });
            self.in_flight.insert(seq, InFlight { idx, handle });
        }
    }

    fn settle(
        &mut self,
        idx: usize,
        seq: u64,
        result: Result<HttpResponse, TransportError>,
        now: SystemTime,
    ) {
        let Some(entry) = self.spool.get(seq).cloned() else {
            return;
        };
        let slot = &mut self.slots[idx];
        let secrets: Vec<String> = slot
            .sink
            .as_ref()
            .map(|s| s.secrets().iter().map(|x| x.to_string()).collect())
            .unwrap_or_default();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let n = &entry.notification;
        let attempt = self.attempts.entry(seq).or_default();
        attempt.attempts += 1;
        let attempts = attempt.attempts;
        let record = |result: &str, message: String| AlertRecord {
            at: now,
            sink: entry.sink.clone(),
            result: result.to_string(),
            check: n.finding.check.to_string(),
            severity: n.finding.severity,
            peer_node: n.finding.peer_node.clone(),
            message,
        };
        match classify(&result, now) {
            Outcome::Delivered => {
                if let Err(e) = self.spool.remove(seq) {
                    error!(error = %e, "alert delivered but cannot be removed from the spool (it may be sent again)");
                }
                self.attempts.remove(&seq);
                slot.sent += 1;
                slot.last_success = Some(now);
                self.sent += 1;
                let took = now.duration_since(entry.created_at).unwrap_or_default();
                if let Some(m) = &self.metrics {
                    m.inc_alert(&entry.sink, "sent");
                    m.observe_alert_delivery(&entry.sink, took.as_secs_f64());
                }
                info!(
                    sink = %entry.sink,
                    kind = slot.kind.as_str(),
                    dedup_key = %n.dedup_key,
                    status = n.status.as_str(),
                    attempts,
                    seconds = took.as_secs_f64(),
                    "alert delivered"
                );
                if slot.kind == SinkKind::Alertmanager && !n.test {
                    match n.status {
                        AlertState::Firing => {
                            slot.am_firing.insert(n.dedup_key.clone(), n.clone());
                            slot.am_resolved.remove(&n.dedup_key);
                        }
                        AlertState::Resolved => {
                            slot.am_firing.remove(&n.dedup_key);
                            slot.am_resolved.insert(
                                n.dedup_key.clone(),
                                (n.clone(), now + alertmanager::RESOLVED_FOR),
                            );
                        }
                    }
                }
                self.push_recent(record("sent", n.summary()));
            }
            Outcome::Retry { after, reason } => {
                let reason = scrub(&reason, &secrets);
                let delay = next_delay(attempts, after, fastrand::f64());
                self.attempts.get_mut(&seq).expect("inserted above").next_at = Some(now + delay);
                if let Some(m) = &self.metrics {
                    m.inc_alert(&entry.sink, "retried");
                }
                warn!(
                    sink = %entry.sink,
                    kind = slot.kind.as_str(),
                    dedup_key = %n.dedup_key,
                    attempts,
                    retry_in_seconds = delay.as_secs_f64(),
                    error = %reason,
                    "alert delivery failed; will retry"
                );
                slot.last_error = Some(reason);
            }
            Outcome::Permanent { reason } => {
                let reason = scrub(&reason, &secrets);
                if let Err(e) = self.spool.remove(seq) {
                    error!(error = %e, "cannot remove a failed alert from the spool");
                }
                self.attempts.remove(&seq);
                slot.failed += 1;
                self.failed += 1;
                if let Some(m) = &self.metrics {
                    m.inc_alert(&entry.sink, "failed");
                }
                error!(
                    sink = %entry.sink,
                    kind = slot.kind.as_str(),
                    dedup_key = %n.dedup_key,
                    attempts,
                    error = %reason,
                    "alert rejected by the receiver; not retried"
                );
                slot.last_error = Some(reason.clone());
                self.push_recent(record("failed", reason));
            }
        }
    }

    fn push_recent(&mut self, r: AlertRecord) {
        self.recent.push_front(r);
        self.recent.truncate(RECENT);
    }

    /// Re-posts what each Alertmanager holds, every [`alertmanager::REFRESH`].
    pub async fn refresh_alertmanager(&mut self, now: SystemTime) {
        // Restored alerts are re-posted only once the first in-sync evaluation has confirmed
        // which of them are still open.
        if !self.lifecycle.synced() {
            return;
        }
        let mut posts = Vec::new();
        for (idx, slot) in self.slots.iter_mut().enumerate() {
            let Some(sink) = &slot.sink else { continue };
            if slot.kind != SinkKind::Alertmanager {
                continue;
            }
            slot.am_resolved.retain(|_, (_, until)| *until > now);
            if slot.am_firing.is_empty() && slot.am_resolved.is_empty() {
                continue;
            }
            if slot
                .am_last_refresh
                .is_some_and(|t| now.duration_since(t).unwrap_or_default() < alertmanager::REFRESH)
            {
                continue;
            }
            slot.am_last_refresh = Some(now);
            let ns = slot
                .am_firing
                .values()
                .chain(slot.am_resolved.values().map(|(n, _)| n));
            posts.push((idx, sink.refresh_request(ns, now)));
        }
        if posts.is_empty() {
            return;
        }
        let transport = &*self.transport;
        let results = join_all(
            posts
                .into_iter()
                .map(|(idx, req)| async move { (idx, transport.post(req).await) }),
        )
        .await;
        for (idx, result) in results {
            let slot = &mut self.slots[idx];
            match classify(&result, now) {
                Outcome::Delivered => {
                    debug!(sink = %slot.name, firing = slot.am_firing.len(), "alertmanager re-posted");
                }
                Outcome::Retry { reason, .. } | Outcome::Permanent { reason } => {
                    let secrets: Vec<String> = slot
                        .sink
                        .as_ref()
                        .map(|s| s.secrets().iter().map(|x| x.to_string()).collect())
                        .unwrap_or_default();
                    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
                    let reason = scrub(&reason, &secrets);
                    warn!(sink = %slot.name, error = %reason, "alertmanager re-post failed; next in a minute");
                    // Try again at the next tick rather than a minute later.
                    slot.am_last_refresh =
                        now.checked_sub(alertmanager::REFRESH - Duration::from_secs(5));
                    slot.last_error = Some(reason);
                }
            }
        }
    }

    /// Notifications spooled and not yet delivered.
    pub fn pending(&self) -> usize {
        self.spool.len()
    }

    /// The earliest time something is due (for tests and idle loops): `None` if nothing
    /// is pending.
    pub fn next_attempt(&self) -> Option<SystemTime> {
        let mut heads = BTreeSet::new();
        self.spool
            .entries()
            .filter(|(_, e)| heads.insert((e.sink.clone(), e.notification.dedup_key.clone())))
            .map(|(seq, _)| {
                self.attempts
                    .get(&seq)
                    .and_then(|a| a.next_at)
                    .unwrap_or(SystemTime::UNIX_EPOCH)
            })
            .min()
    }

    /// The status API's `alerts`.
    pub fn status(&self, now: SystemTime) -> AlertsStatus {
        let mut pending: HashMap<&str, u64> = HashMap::new();
        for (_, e) in self.spool.entries() {
            *pending.entry(e.sink.as_str()).or_default() += 1;
        }
        AlertsStatus {
            pending: self.spool.len() as u64,
            sent: self.sent,
            failed: self.failed,
            dropped: self.dropped,
            sinks: self
                .slots
                .iter()
                .map(|s| AlertSinkStatus {
                    name: s.name.clone(),
                    kind: s.kind.to_string(),
                    pending: pending.get(s.name.as_str()).copied().unwrap_or(0),
                    sent: s.sent,
                    failed: s.failed,
                    last_error: s.last_error.clone(),
                    last_success: s.last_success,
                })
                .collect(),
            damped: self
                .lifecycle
                .damped(now)
                .into_iter()
                .map(|d| DampedAlert {
                    dedup_key: d.dedup_key,
                    check: d.finding.check.to_string(),
                    peer_node: d.finding.peer_node,
                    until: d.until,
                })
                .collect(),
            recent: self.recent.iter().cloned().collect(),
        }
    }

    fn publish_gauges(&self) {
        let Some(m) = &self.metrics else { return };
        let mut pending: HashMap<&str, u64> = HashMap::new();
        for (_, e) in self.spool.entries() {
            *pending.entry(e.sink.as_str()).or_default() += 1;
        }
        for s in &self.slots {
            m.set_alerts_pending(&s.name, pending.get(s.name.as_str()).copied().unwrap_or(0));
        }
    }
}

fn slot(c: &SinkConfig) -> Slot {
    let (sink, last_error) = match Sink::from_config(c) {
        Ok(s) => {
            info!(sink = %s.name, kind = s.kind.as_str(), url = %s.redacted_url(), "alert sink ready");
            (Some(s), None)
        }
        Err(e) => {
            error!(sink = %c.name, error = %e, "alert sink disabled");
            (None, Some(format!("disabled: {e}")))
        }
    };
    Slot {
        name: c.name.clone(),
        kind: c.kind,
        sink,
        sent: 0,
        failed: 0,
        last_error,
        last_success: None,
        am_firing: BTreeMap::new(),
        am_resolved: BTreeMap::new(),
        am_last_refresh: None,
    }
}

/// A notification id: `msg_` and 32 hex digits (random).
pub fn new_id() -> String {
    format!("msg_{:032x}", fastrand::u128(..))
}

/// Disabled sinks' reasons, for `watchdog alert test`.
pub fn load_sinks(configs: &[SinkConfig]) -> Vec<(String, SinkKind, Result<Sink, SinkError>)> {
    configs
        .iter()
        .map(|c| (c.name.clone(), c.kind, Sink::from_config(c)))
        .collect()
}
