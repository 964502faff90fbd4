//! The `file` datastore (DESIGN.md §6): a YAML or TOML list of nodes, for clusters without API
//! access and for tests.
//!
//! ```yaml
//! nodes:
//!   - name: k8s03
//!     node_ip: 192.168.77.3          # FDB destination (Calico IPv4Address without the prefix)
//!     vtep_ip: 10.1.235.133          # Calico IPv4VXLANTunnelAddr
//!     vtep_mac: 66:aa:bb:cc:dd:ee    # optional; derived like Felix when absent
//!     blocks: [10.1.235.128/26, 10.1.235.192/26]
//!     borrowed: [10.1.240.7/32]      # optional
//!     # dual stack (optional): the IPv6 overlay, vxlan-v6.calico; IPv6 CIDRs go in blocks/borrowed
//!     node_ipv6: fd00:77::3          # Calico IPv6Address without the prefix
//!     vtep_ipv6: fd10:1:235::133     # Calico IPv6VXLANTunnelAddr
//!     vtep_mac_v6: 66:11:22:33:44:55 # optional; derived like Felix from name + "-v6"
//! ```
//!
//! TOML uses the same keys as `[[nodes]]` tables. The format is chosen by extension (`.toml`;
//! `.yaml`, `.yml`, `.json` are YAML) and otherwise sniffed.
//!
//! flannel (`profile = "flannel"`) uses the same fields: `node_ip` is the node's
//! `flannel.alpha.coreos.com/public-ip`, `vtep_ip` the network address of its subnet (the
//! `.0` of `spec.podCIDR`), `vtep_mac` the `VtepMAC` of `backend-data` (flannel does not
//! derive it, so give it), and `blocks` is `[spec.podCIDR]`.
//!
//! A file that cannot be read or parsed at all is a [`DatastoreError`]; anything wrong inside a
//! node entry is a problem for that entry only (see [`super::build`]).

use std::{
    collections::{btree_map, BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::{de::IgnoredAny, Deserialize};
use serde_saphyr::options::DuplicateKeyPolicy;

use super::{build, Datastore, DatastoreError, RawField, RawNode};
use crate::model::{DatastoreProblem, DesiredState};

/// Keys a node entry may have.
const NODE_KEYS: [&str; 9] = [
    "name",
    "node_ip",
    "vtep_ip",
    "vtep_mac",
    "blocks",
    "borrowed",
    "node_ipv6",
    "vtep_ipv6",
    "vtep_mac_v6",
];

/// Syntax of a node file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Yaml,
    Toml,
}

impl FileFormat {
    /// By extension, else by content: TOML when a line starts with `[[nodes]]` or `nodes =`.
    pub fn detect(path: &Path, text: &str) -> FileFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("toml") => return FileFormat::Toml,
            Some(e)
                if ["yaml", "yml", "json"]
                    .iter()
                    .any(|y| e.eq_ignore_ascii_case(y)) =>
            {
                return FileFormat::Yaml
            }
            _ => {}
        }
        let toml_like = text.lines().map(str::trim_start).any(|l| {
            l.starts_with("[[nodes]]")
                || l.strip_prefix("nodes")
                    .is_some_and(|r| r.trim_start().starts_with('='))
        });
        if toml_like {
            FileFormat::Toml
        } else {
            FileFormat::Yaml
        }
    }
}

/// `datastore.source = "file"`: re-reads the file on every `load`.
#[derive(Debug, Clone)]
pub struct FileDatastore {
    path: PathBuf,
    local_node: String,
    format: Option<FileFormat>,
}

impl FileDatastore {
    /// Format detected per load from extension/content.
    pub fn new(path: impl Into<PathBuf>, local_node: impl Into<String>) -> Self {
        FileDatastore {
            path: path.into(),
            local_node: local_node.into(),
            format: None,
        }
    }

    /// Force a format instead of detecting it.
    pub fn with_format(mut self, format: FileFormat) -> Self {
        self.format = Some(format);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Datastore for FileDatastore {
    async fn load(&mut self) -> Result<DesiredState, DatastoreError> {
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|source| DatastoreError::Read {
                path: self.path.clone(),
                source,
            })?;
        let format = self
            .format
            .unwrap_or_else(|| FileFormat::detect(&self.path, &text));
        // Parsing thousands of entries churns through many small allocations. On a blocking
        // thread they land in that thread's malloc arena and are returned whole afterwards
        // instead of fragmenting the daemon's heap (measured at 5,000 nodes: 19 MiB of RSS
        // kept for 1.5 MiB of result). The result is copied out so nothing pins that arena.
        let (path, local_node) = (self.path.clone(), self.local_node.clone());
        let parsed = tokio::task::spawn_blocking(move || parse(&text, format, &path, &local_node))
            .await
            .map_err(|e| DatastoreError::Backend {
                source: self.describe(),
                error: Box::new(e),
            })??;
        let state = parsed.clone();
        drop(parsed);
        tracing::debug!(
            path = %self.path.display(),
            nodes = state.nodes.len(),
            problems = state.problems.len(),
            "loaded node file"
        );
        Ok(state)
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

/// The file's top level. Node entries stay untyped so one bad entry cannot fail the file.
#[derive(Deserialize)]
struct Doc {
    nodes: Nodes,
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

/// How node files are read as YAML. The file is the cluster's own list, written by its admins,
/// so its size follows the cluster: no event budget (one would refuse a large cluster), but
/// alias expansion stays limited. YAML 1.2 booleans only (`yes` is a string), and a key given
/// twice reaches the entry, which reports it instead of keeping one of the two.
pub(super) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: None,
        strict_booleans: true,
        duplicate_keys: DuplicateKeyPolicy::PassThrough,
    }
}

/// Parse a node file's text. `path` names the file in errors and problems. Pure: no I/O.
pub fn parse(
    text: &str,
    format: FileFormat,
    path: &Path,
    local_node: &str,
) -> Result<DesiredState, DatastoreError> {
    let parse_err = |line, column, message: String| DatastoreError::Parse {
        path: path.to_path_buf(),
        line,
        column,
        message,
    };
    let mut problems = Vec::new();
    let object = path.display().to_string();
    let doc: Doc = match format {
        FileFormat::Yaml => serde_saphyr::from_str_with_options::<Doc>(text, yaml_options())
            .map_err(|e| {
                let loc = e.location();
                let (line, column) = (
                    loc.map(|l| l.line() as usize),
                    loc.map(|l| l.column() as usize),
                );
                // The message repeats the position; keep ours only.
                let msg = e.without_snippet().to_string();
                let msg = match (line, column) {
                    (Some(l), Some(c)) => msg
                        .strip_suffix(&format!(" at line {l}, column {c}"))
                        .map(str::to_string)
                        .unwrap_or(msg),
                    _ => msg,
                };
                parse_err(line, column, msg.replace('\n', " "))
            })?,
        FileFormat::Toml => toml::from_str::<Doc>(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_column(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            parse_err(line, column, crate::config::toml_message(&e))
        })?,
    };

    for key in doc.other.keys() {
        problems.push(DatastoreProblem {
            object: object.clone(),
            node: None,
            field: key.clone(),
            message: format!("unknown top-level key `{key}` ignored (expected `nodes`)"),
        });
    }
    // Each entry is freed as its record is made.
    let records = doc
        .nodes
        .0
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| raw_node(i, v, &object, &mut problems))
        .collect();
    Ok(build(
        format!("file:{object}"),
        local_node,
        records,
        problems,
    ))
}

/// 1-based line and column (in characters) of byte offset `at`.
fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// A scalar as text (numbers as written: a node named `123`); `None` for absent/null.
/// Anything else is a type error naming what was found.
fn scalar(v: Option<Item>) -> Result<Option<String>, String> {
    match v {
        None | Some(Item::Null) => Ok(None),
        Some(Item::Scalar(s)) => Ok(Some(s)),
        Some(other) => Err(format!("expected a string, found {}", other.kind())),
    }
}

/// One `nodes[i]` entry → a raw record, or problems and `None` when its shape is unusable.
fn raw_node(
    i: usize,
    v: Item,
    object: &str,
    problems: &mut Vec<DatastoreProblem>,
) -> Option<RawNode> {
    let at = |f: &str| format!("nodes[{i}].{f}");
    let Item::Map(entries) = v else {
        problems.push(DatastoreProblem {
            object: object.to_string(),
            node: None,
            field: format!("nodes[{i}]"),
            message: format!(
                "expected a mapping with name, node_ip, vtep_ip, blocks; found {}",
                v.kind()
            ),
        });
        return None;
    };
    let mut bad = false;
    let mut map: BTreeMap<String, Item> = BTreeMap::new();
    let mut given_twice = BTreeSet::new();
    for (key, value) in entries {
        match map.entry(key) {
            btree_map::Entry::Occupied(seen) => {
                given_twice.insert(seen.key().clone());
            }
            btree_map::Entry::Vacant(first) => {
                first.insert(value);
            }
        }
    }
    // The name, if usable, for every problem about this entry.
    let node = match map.get("name") {
        Some(Item::Scalar(n)) if !n.trim().is_empty() && !given_twice.contains("name") => {
            Some(n.clone())
        }
        _ => None,
    };
    let mut report = |field: String, message: String| {
        problems.push(DatastoreProblem {
            object: object.to_string(),
            node: node.clone(),
            field,
            message,
        });
    };

    for key in &given_twice {
        // Which of the two is meant is a guess either way.
        report(
            at(key),
            format!("`{key}` is given more than once; node entry skipped"),
        );
        bad = true;
    }
    let unknown: Vec<&String> = map
        .keys()
        .filter(|k| !NODE_KEYS.contains(&k.as_str()))
        .collect();
    for key in unknown {
        // A misspelt `vtep_mac` would silently become a derived MAC: skip rather than guess.
        report(
            at(key),
            format!(
                "unknown field `{key}` (expected {}); node entry skipped",
                NODE_KEYS.join(", ")
            ),
        );
        bad = true;
    }

    let mut field =
        |key: &str, report: &mut dyn FnMut(String, String)| match scalar(map.remove(key)) {
            Ok(value) => RawField::new(at(key), value),
            Err(e) => {
                report(at(key), e);
                bad = true;
                RawField::new(at(key), None)
            }
        };
    let name = field("name", &mut report);
    let node_ip = field("node_ip", &mut report);
    let vtep_ip = field("vtep_ip", &mut report);
    let vtep_mac = field("vtep_mac", &mut report);
    let node_ipv6 = field("node_ipv6", &mut report);
    let vtep_ipv6 = field("vtep_ipv6", &mut report);
    let vtep_mac_v6 = field("vtep_mac_v6", &mut report);

    let mut list = |key: &str, required: bool| -> Vec<RawField> {
        match map.remove(key) {
            None | Some(Item::Null) => {
                if required {
                    report(
                        at(key),
                        format!("missing {key} (use `{key}: []` for a node without any)"),
                    );
                    bad = true;
                }
                Vec::new()
            }
            Some(Item::List(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(j, item)| {
                    let f = format!("nodes[{i}].{key}[{j}]");
                    match scalar(Some(item)) {
                        Ok(Some(s)) => Some(RawField::new(f, Some(s))),
                        Ok(None) => {
                            report(f, "empty entry".to_string());
                            None
                        }
                        Err(e) => {
                            report(f, e);
                            None
                        }
                    }
                })
                .collect(),
            Some(other) => {
                report(
                    at(key),
                    format!(
                        "expected a list like [10.1.235.128/26], found {}",
                        other.kind()
                    ),
                );
                bad = true;
                Vec::new()
            }
        }
    };
    let blocks = list("blocks", true);
    let borrowed = list("borrowed", false);

    if bad {
        return None;
    }
    Some(RawNode {
        object: object.to_string(),
        name,
        node_ip,
        vtep_ip,
        vtep_mac,
        blocks,
        borrowed,
        node_ipv6,
        vtep_ipv6,
        vtep_mac_v6,
    })
}

mod entry;
use entry::{Item, Nodes};

#[cfg(test)]
mod tests;

/// Property tests: arbitrary and mutated input never panics, and nothing is dropped silently.
#[cfg(test)]
mod props;
