//! Renamed configuration keys: an operator's config written for an older version keeps working
//! after an upgrade (the .deb never replaces an edited `/etc/dataplane-watchdog/config.toml`),
//! with one deprecation warning per old key naming the new one.
//!
//! A rename ships as one [`RenamedKey`] in [`RENAMED_KEYS`]; the old spelling is moved to the
//! new one in the parsed TOML before the strict (`deny_unknown_fields`) deserialization, so
//! nothing else in the config code knows about it. Giving both spellings is an error.

use std::path::Path;

use super::ConfigError;

/// One renamed key, as dotted paths (`key` or `section.key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenamedKey {
    pub old: &'static str,
    pub new: &'static str,
    /// The version that renamed it (for the warning).
    pub since: &'static str,
}

/// Every rename since the first release, oldest first. None yet.
pub const RENAMED_KEYS: &[RenamedKey] = &[];

/// An old key found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deprecation {
    pub old: &'static str,
    pub new: &'static str,
    pub since: &'static str,
}

impl std::fmt::Display for Deprecation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` is deprecated (renamed to `{}` in {}); it still works, rename it",
            self.old, self.new, self.since
        )
    }
}

/// `text` with every old key of `renames` moved to its new name (`None`: nothing to move, use
/// `text` as it is), and what was moved. Text that is not valid TOML is left to the normal
/// parser to report.
pub(super) fn apply(
    text: &str,
    path: &Path,
    renames: &[RenamedKey],
) -> Result<(Option<String>, Vec<Deprecation>), ConfigError> {
    if renames.is_empty() {
        return Ok((None, Vec::new()));
    }
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Ok((None, Vec::new()));
    };
    let mut found = Vec::new();
    for rename in renames {
        let Some(value) = take(&mut table, rename.old) else {
            continue;
        };
        if !put(&mut table, rename.new, value) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: rename.new.to_string(),
                message: format!(
                    "given twice: also as `{}`, its name before {}; keep only `{}`",
                    rename.old, rename.since, rename.new
                ),
            });
        }
        found.push(Deprecation {
            old: rename.old,
            new: rename.new,
            since: rename.since,
        });
    }
    if found.is_empty() {
        return Ok((None, found));
    }
    let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        key: String::new(),
        message: format!("cannot rewrite renamed keys: {e}"),
    })?;
    Ok((Some(text), found))
}

/// Removes and returns the value at a dotted path.
fn take(table: &mut toml::Table, dotted: &str) -> Option<toml::Value> {
    match dotted.split_once('.') {
        None => table.remove(dotted),
        Some((section, rest)) => take(table.get_mut(section)?.as_table_mut()?, rest),
    }
}

/// Inserts at a dotted path (creating sections); false when the key is already there.
fn put(table: &mut toml::Table, dotted: &str, value: toml::Value) -> bool {
    match dotted.split_once('.') {
        None => {
            if table.contains_key(dotted) {
                return false;
            }
            table.insert(dotted.to_string(), value);
            true
        }
        Some((section, rest)) => {
            let entry = table
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry.as_table_mut() {
                Some(inner) => put(inner, rest, value),
                // Not a table: let the deserializer report the section's wrong type.
                None => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Test-only renames: a top-level key and one moved between sections.
    const TEST_RENAMES: &[RenamedKey] = &[
        RenamedKey {
            old: "resync",
            new: "resync_interval",
            since: "9.9.0",
        },
        RenamedKey {
            old: "status.socket_path",
            new: "status.socket",
            since: "9.9.0",
        },
    ];

    fn load(text: &str) -> Result<(Config, Vec<Deprecation>), ConfigError> {
        Config::from_toml_renamed(text, Path::new("/etc/x/config.toml"), TEST_RENAMES)
    }

    #[test]
    fn an_old_key_is_accepted_under_its_new_name_with_a_warning() {
        let (config, warnings) =
            load("resync = \"90s\"\nmode = \"observe\"\n[status]\nsocket_path = \"/run/x.sock\"\n")
                .unwrap();
        assert_eq!(config.resync_interval, std::time::Duration::from_secs(90));
        assert_eq!(config.status.socket, Path::new("/run/x.sock"));
        assert_eq!(config.mode.as_str(), "observe");
        assert_eq!(
            warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            [
                "`resync` is deprecated (renamed to `resync_interval` in 9.9.0); it still works, rename it",
                "`status.socket_path` is deprecated (renamed to `status.socket` in 9.9.0); it still works, rename it",
            ]
        );
    }

    #[test]
    fn new_names_and_other_keys_are_untouched_and_warn_nothing() {
        let text = "resync_interval = \"90s\"\n[status]\nsocket = \"/run/x.sock\"\n";
        let (config, warnings) = load(text).unwrap();
        assert!(warnings.is_empty());
        assert_eq!(
            config,
            Config::from_toml(text, Path::new("/etc/x/config.toml")).unwrap()
        );
    }

    #[test]
    fn both_spellings_at_once_is_an_error_naming_both() {
        let err = load("resync = \"90s\"\nresync_interval = \"60s\"\n").unwrap_err();
        assert_eq!(err.key(), Some("resync_interval"));
        assert!(err.to_string().contains("`resync`"), "{err}");
    }

    #[test]
    fn unknown_keys_and_syntax_errors_are_still_reported_as_before() {
        let err = load("resync = \"90s\"\nbogus = 1\n").unwrap_err();
        assert_eq!(err.key(), Some("bogus"));
        assert!(load("resync = \n").is_err());
    }

    #[test]
    fn the_shipped_renames_point_at_keys_that_exist() {
        for rename in RENAMED_KEYS {
            assert_ne!(rename.old, rename.new);
            let (section, key) = rename.new.rsplit_once('.').unwrap_or(("", rename.new));
            let example = include_str!("../../../systemd/config.example.toml");
            assert!(
                example.contains(&format!("{key} =")) || example.contains(&format!("# {key} =")),
                "{section}.{key} is not in the example config"
            );
        }
    }
}
