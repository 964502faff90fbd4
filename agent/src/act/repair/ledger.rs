//! What repair did, shared between the repair consumer (which writes it) and the loop (which
//! reads it when it publishes): each finding carries its `repair` (open and cleared, so an
//! alert can say "fixed by repair"), and contested objects become `repair-contested`
//! findings.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use super::{ObjectKey, Outcome, RepairResult};
use crate::model::{CheckId, DesiredState, Finding, RepairInfo};

/// [`Finding::key`].
pub type FindingKey = (CheckId, String, Option<String>, Option<String>);

/// Findings remembered at most (the open ones that have remedies, and just-cleared ones).
const MAX_FINDINGS: usize = 4096;

#[derive(Debug, Default)]
struct Shared {
    /// Per finding, the latest result per object, and whether a write of it is in flight.
    by_finding: BTreeMap<FindingKey, BTreeMap<ObjectKey, (RepairInfo, bool)>>,
    /// Cleared findings held back while a write for them is in flight (the loop sees the
    /// kernel change before the repairer has read it back): released with the result.
    held: Vec<(Arc<Finding>, Instant)>,
    /// `repair-contested` findings of the contests running now.
    contested: Vec<Finding>,
    /// The desired state the findings were derived from, for re-deriving them.
    desired: Option<Arc<DesiredState>>,
    /// Why the datastore is stale or down, as the loop judges it (file source).
    datastore_down: Option<String>,
    /// Bumped on every change the loop should publish.
    generation: u64,
    published: u64,
}

/// The shared ledger; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct RepairLink {
    inner: Arc<Mutex<Shared>>,
}

impl RepairLink {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records an outcome against its finding.
    pub fn record(&self, o: &Outcome) {
        self.put(o, false);
    }

    /// A write for `o` is about to be sent (`o` is its `planned` outcome).
    pub fn begin(&self, o: &Outcome) {
        self.put(o, true);
    }

    fn put(&self, o: &Outcome, in_flight: bool) {
        let mut s = self.lock();
        if s.by_finding.len() >= MAX_FINDINGS && !s.by_finding.contains_key(&o.finding) {
            return;
        }
        s.by_finding.entry(o.finding.clone()).or_default().insert(
            o.object.clone(),
            (
                RepairInfo {
                    action: o.remedy.action().to_string(),
                    status: o.result.as_str().to_string(),
                    command: Some(o.remedy.to_string()),
                    reason: Some(o.message.clone()),
                },
                in_flight,
            ),
        );
        s.generation += 1;
    }

    /// The `repair-contested` findings now (replacing the previous ones).
    pub fn set_contested(&self, findings: Vec<Finding>) {
        let mut s = self.lock();
        if s.contested != findings {
            s.contested = findings;
            s.generation += 1;
        }
    }

    pub fn contested(&self) -> Vec<Finding> {
        self.lock().contested.clone()
    }

    /// Something was recorded since the loop last published: it should evaluate again.
    pub fn take_changed(&self) -> bool {
        let mut s = self.lock();
        let changed = s.generation != s.published;
        s.published = s.generation;
        changed
    }

    /// The loop offers the desired state it evaluates against; kept only when it changed.
    pub fn offer_desired(&self, desired: Option<&DesiredState>) {
        let mut s = self.lock();
        if s.desired.as_deref() != desired {
            s.desired = desired.cloned().map(Arc::new);
        }
    }

    pub fn desired(&self) -> Option<Arc<DesiredState>> {
        self.lock().desired.clone()
    }

    /// The loop says whether the datastore is stale or down (`None`: fresh).
    pub fn set_datastore_down(&self, why: Option<String>) {
        self.lock().datastore_down = why;
    }

    pub fn datastore_down(&self) -> Option<String> {
        self.lock().datastore_down.clone()
    }

    /// Sets each finding's `repair` from the ledger: the worst result over its objects (one
    /// failed write of six is a failed repair).
    pub fn annotate<'a>(&self, findings: impl IntoIterator<Item = &'a mut Arc<Finding>>) {
        let s = self.lock();
        for f in findings {
            annotate_one(&s, f);
        }
    }

    /// The cleared findings to publish now: those just cleared whose repair is settled, and
    /// held ones whose write has since been read back (or that waited [`HOLD_AT_MOST`]), each
    /// annotated one last time and then forgotten. A held finding open again is dropped: it
    /// never cleared as far as anyone downstream can tell.
    pub fn settle_cleared(
        &self,
        cleared: Vec<Arc<Finding>>,
        open: &[Arc<Finding>],
    ) -> Vec<Arc<Finding>> {
        let mut s = self.lock();
        let now = Instant::now();
        s.held.extend(cleared.into_iter().map(|f| (f, now)));
        let open: BTreeSet<FindingKey> = open.iter().map(|f| f.key()).collect();
        let held = std::mem::take(&mut s.held);
        let mut out = Vec::new();
        for (mut f, since) in held {
            let key = f.key();
            if open.contains(&key) {
                continue;
            }
            let in_flight = s
                .by_finding
                .get(&key)
                .is_some_and(|objects| objects.values().any(|(_, busy)| *busy));
            if in_flight && now.duration_since(since) < HOLD_AT_MOST {
                s.held.push((f, since));
                continue;
            }
            annotate_one(&s, &mut f);
            s.by_finding.remove(&key);
            out.push(f);
        }
        // Results for findings neither open nor held have nobody left to annotate.
        let held_keys: BTreeSet<FindingKey> = s.held.iter().map(|(f, _)| f.key()).collect();
        s.by_finding.retain(|k, objects| {
            open.contains(k) || held_keys.contains(k) || objects.values().any(|(_, busy)| *busy)
        });
        out
    }

    /// Cleared findings are held back while one of their writes is in flight.
    pub fn holding(&self) -> bool {
        !self.lock().held.is_empty()
    }
}

/// A cleared finding is held at most this long for its write's result.
pub const HOLD_AT_MOST: Duration = Duration::from_secs(2);

/// Copies a shared finding only when its annotation changes.
fn annotate_one(s: &Shared, f: &mut Arc<Finding>) {
    if let Some(objects) = s.by_finding.get(&f.key()) {
        let repair = objects
            .values()
            .map(|(info, _)| info)
            .max_by_key(|i| rank(&i.status));
        if f.repair.as_ref() != repair {
            Arc::make_mut(f).repair = repair.cloned();
        }
    }
}

fn rank(status: &str) -> u8 {
    [
        RepairResult::Planned,
        RepairResult::Applied,
        RepairResult::Failed,
        RepairResult::Refused,
        RepairResult::Contested,
    ]
    .into_iter()
    .find(|r| r.as_str() == status)
    .map(RepairResult::rank)
    .unwrap_or(0)
}
