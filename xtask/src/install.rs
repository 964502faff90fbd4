//! `cargo xtask install`: binary, systemd unit, example config.
use std::path::Path;

use anyhow::{bail, Result};

pub fn run(_root: &Path, _dry_run: bool) -> Result<()> {
    bail!("install is not implemented yet (issue 4)")
}
