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
use crate::{
    checks::{DatastoreHealth, DeviceSpec, StaleNote},
    model::{DesiredState, Finding},
};

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
            notes: self.desired.cluster.notes.clone(),
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

impl KubeSnapshot {
    /// What this snapshot says about the datastore's freshness, for the checks to judge
    /// (`datastore-stale` is decided there, with every other finding).
    pub fn health(&self) -> DatastoreHealth {
        DatastoreHealth {
            source: self.desired.source.clone(),
            nodes: self.desired.nodes.len(),
            stale: self
                .stale_causes
                .iter()
                .map(|c| StaleNote {
                    resource: c.resource().to_string(),
                    kind: match c {
                        StaleCause::NeverListed { .. } => "never-listed",
                        StaleCause::NoContact { .. } => "no-contact",
                        StaleCause::MissedEvents { .. } => StaleNote::MISSED_EVENTS,
                    },
                    text: c.to_string(),
                })
                .collect(),
            relist_mismatches: self.relist_mismatches,
            watch_ended: self.ended.clone(),
        }
    }
}

/// The checks' `datastore-stale` verdict on a snapshot alone (none when it is fresh), for
/// callers without an engine (`scan`, tests). `device` is the first overlay device.
pub fn stale_findings(snap: &KubeSnapshot, device: &str) -> Vec<Finding> {
    crate::checks::datastore_findings(None, Some(&snap.health()), &[DeviceSpec::for_name(device)])
}

fn trunc(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

#[cfg(test)]
mod tests;
