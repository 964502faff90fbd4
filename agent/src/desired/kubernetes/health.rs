//! Whether the cached state can be trusted: per-resource health, the snapshot
//! [`KubeSource::spawn`](super::KubeSource::spawn) publishes, and the `datastore-stale`
//! findings. Pure: the list/watch loops record facts, the verdict is computed from them here.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use super::KubeSourceConfig;
use crate::model::{CheckId, DesiredState, Finding, Severity};

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

/// What [`KubeSource::spawn`](super::KubeSource::spawn) publishes.
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
    pub(super) fn with_ipam(mut self, ipam: Option<&str>) -> Self {
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
pub(super) fn stale_causes(
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

/// The causes as one line (`stale_reason`); `None` when there are none.
pub(super) fn join_causes(causes: &[StaleCause]) -> Option<String> {
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

#[cfg(test)]
mod tests;
