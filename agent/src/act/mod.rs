//! Acting on findings: alert sinks and guarded repair.

pub mod alerts;
mod plan;
pub mod repair;

pub use plan::{apply_plan, repair_plan, Applied};
