//! Guarded repair (DESIGN §8): the writes of a finding's remedies, only when every guard rail
//! allows them, re-derived from a fresh kernel read immediately before, read back after, and
//! stopped when something keeps undoing them.
//!
//! - [`guard`]: the rails and budgets (pure);
//! - [`contest`]: revert counting and backoff (pure);
//! - [`verify`]: does the kernel hold the object a remedy writes (pure);
//! - [`repairer`]: one repair pass over the open findings, through a [`Kernel`];
//! - [`ledger`]: what repair did, shared with the loop so findings carry it;
//! - [`report`]: outcomes as audit records, log lines and the `repair-contested` finding.

pub mod contest;
pub mod guard;
pub mod ledger;
pub mod repairer;
pub mod report;
pub mod verify;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use contest::{Contest, ContestTracker};
pub use guard::{Guard, Refusal, Situation};
pub use ledger::{FindingKey, RepairLink};
pub use repairer::{Kernel, NetlinkKernel, Outcome, Pass, PassReport, Repairer};

use crate::{model::Remedy, observe};

/// Errors of repair's own I/O (the kernel connection).
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("cannot open the repair connection: {0}")]
    Connect(#[source] observe::Error),
}

/// The kernel object a remedy writes, as identity: a route by destination (and metric) on its
/// device, a neighbour by address, an FDB entry by MAC. Budgets and contests are per object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey(pub String);

impl ObjectKey {
    pub fn of(remedy: &Remedy) -> Self {
        let metric = |m: &Option<u32>| m.map(|m| format!(" metric {m}")).unwrap_or_default();
        ObjectKey(match remedy {
            Remedy::RouteReplace {
                device,
                destination,
                metric: m,
                ..
            }
            | Remedy::RouteDelete {
                device,
                destination,
                metric: m,
                ..
            } => format!("route {destination}{} dev {device}", metric(m)),
            Remedy::RouteAdd {
                device,
                destination,
                ..
            } => format!("route {destination} dev {device}"),
            Remedy::NeighReplace { device, ip, .. } => format!("neigh {ip} dev {device}"),
            Remedy::FdbReplace { device, mac, .. } => format!("fdb {mac} dev {device}"),
        })
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The result of one repair action (DESIGN §8's statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairResult {
    Planned,
    Applied,
    Failed,
    Refused,
    Contested,
}

impl RepairResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairResult::Planned => "planned",
            RepairResult::Applied => "applied",
            RepairResult::Failed => "failed",
            RepairResult::Refused => "refused",
            RepairResult::Contested => "contested",
        }
    }

    /// Which of several results speaks for a finding with several writes: the worst.
    fn rank(self) -> u8 {
        match self {
            RepairResult::Contested => 5,
            RepairResult::Failed => 4,
            RepairResult::Refused => 3,
            RepairResult::Planned => 2,
            RepairResult::Applied => 1,
        }
    }
}

impl fmt::Display for RepairResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests;
