//! The one-line errors `main` prints for a configuration it cannot use: the file, the key,
//! the line when known.

use std::{
    io,
    path::{Path, PathBuf},
};

/// Why the configuration could not be used. `Display` is the one line `main` prints.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {}: file not found", path.display())]
    NotFound { path: PathBuf },
    #[error("config {}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// TOML syntax error, unknown key or a value of the wrong type/shape. `key` is the dotted
    /// path (`datastore.stale_after`), empty for a syntax error outside any key.
    #[error("config {}: {}{message}", path.display(), location(key, *line))]
    Parse {
        path: PathBuf,
        key: String,
        line: Option<usize>,
        message: String,
    },
    /// Parsed fine but not usable.
    #[error("config {}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The offending key, when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Parse { key, .. } | ConfigError::Invalid { key, .. }
                if !key.is_empty() =>
            {
                Some(key)
            }
            _ => None,
        }
    }
}

fn location(key: &str, line: Option<usize>) -> String {
    match (key.is_empty(), line) {
        (false, _) => format!("{key}: "),
        (true, Some(line)) => format!("line {line}: "),
        (true, None) => String::new(),
    }
}

/// Turn a serde/toml error into one line naming the key.
pub(super) fn parse_error(
    path: &Path,
    text: &str,
    err: serde_path_to_error::Error<toml::de::Error>,
) -> ConfigError {
    // serde_path_to_error reports "." for the root (syntax errors): name the line instead.
    let key = match err.path().to_string() {
        k if k == "." => String::new(),
        k => k,
    };
    let inner = err.into_inner();
    let line = inner.span().map(|span| {
        text.as_bytes()[..span.start.min(text.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    });
    ConfigError::Parse {
        path: path.to_path_buf(),
        key,
        line,
        message: toml_message(&inner),
    }
}

/// A toml error's message on one line. It can span lines ("invalid table header\nexpected
/// `.`, `]`") or be empty (a value missing after `=`). The node file's TOML errors too.
pub(crate) fn toml_message(err: &toml::de::Error) -> String {
    let message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        "invalid TOML (a value is missing or malformed)".to_string()
    } else {
        message
    }
}
