//! The list/watch loop of one resource, generic over its compact entry type: initial list,
//! watch with bookmarks and an idle limit, periodic consistent relists compared with the cache,
//! and retries. Adding a resource takes a [`Watched`] and a store in [`Shared`], nothing here.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use futures::StreamExt;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use tokio::time::Instant;

use super::{
    error::bounded,
    runtime::{lock, Runtime, Shared},
    Entry, KubeError, LiteObject, Store,
};

/// Lists every object of a resource, page by page, reducing each to its compact form as it
/// arrives. No `resourceVersion` is sent: the read is consistent (from etcd/kine), never the
/// API server's watch cache — which is exactly what was stuck in the incident.
pub(super) async fn list_all<T>(
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

/// One resource to list and watch.
pub(super) struct Watched<T> {
    /// Names the resource in health, logs and errors (`ipamblocks`).
    pub(super) key: &'static str,
    pub(super) api: Api<LiteObject>,
    /// Reduces an object to its cache entry as it arrives.
    pub(super) compact: fn(&LiteObject) -> T,
    /// Where in the shared cache this resource's entries live.
    pub(super) store: fn(&mut Shared) -> &mut Store<T>,
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
pub(super) async fn run_resource<T>(rt: Arc<Runtime>, w: Watched<T>) -> String
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
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);
    pub(super) fn new(max: Duration) -> Self {
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
    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::kubernetes::KubeSourceConfig;

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
}
