//! Acting on findings: alert sinks and guarded repair.
