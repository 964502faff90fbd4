//! What repair did, shared between the repair consumer (which writes it) and the loop (which
//! reads it when it publishes): each finding carries its `repair` (open and cleared, so an
//! alert can say "fixed by repair"), and contested objects become `repair-contested`
//! findings.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use super::{ObjectKey, Outcome, RepairResult};
use crate::model::{CheckId, DesiredState, Finding, RepairInfo};

/// [`Finding::key`].
pub type FindingKey = (CheckId, String, Option<String>, Option<String>);

/// Findings remembered at most (the open ones that have remedies, and just-cleared ones).
const MAX_FINDINGS: usize = 4096;

#[derive(Debug, Default)]
struct Shared {
    /// Per finding, the latest result per object.
    by_finding: BTreeMap<FindingKey, BTreeMap<ObjectKey, RepairInfo>>,
    /// `repair-contested` findings of the contests running now.
    contested: Vec<Finding>,
    /// The desired state the findings were derived from, for re-deriving them.
    desired: Option<Arc<DesiredState>>,
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
        let mut s = self.lock();
        if s.by_finding.len() >= MAX_FINDINGS && !s.by_finding.contains_key(&o.finding) {
            return;
        }
        s.by_finding.entry(o.finding.clone()).or_default().insert(
            o.object.clone(),
            RepairInfo {
                action: o.remedy.action().to_string(),
                status: o.result.as_str().to_string(),
                command: Some(o.remedy.to_string()),
                reason: Some(o.message.clone()),
            },
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

    /// Sets each finding's `repair` from the ledger: the worst result over its objects (one
    /// failed write of six is a failed repair).
    pub fn annotate<'a>(&self, findings: impl IntoIterator<Item = &'a mut Finding>) {
        let s = self.lock();
        for f in findings {
            if let Some(objects) = s.by_finding.get(&f.key()) {
                f.repair = objects.values().max_by_key(|i| rank(&i.status)).cloned();
            }
        }
    }

    /// Cleared findings are annotated one last time, then forgotten.
    pub fn forget(&self, cleared: &[Finding]) {
        let mut s = self.lock();
        for f in cleared {
            s.by_finding.remove(&f.key());
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
