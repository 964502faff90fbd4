//! Desired state: the `Datastore` sources (file, kubernetes) → `model::DesiredState`.
//!
//! Every source turns what it reads into [`RawNode`] records (strings plus where each came
//! from) and hands them to [`build`], which does all validation in one place: an invalid entry
//! becomes a [`DatastoreProblem`](crate::model::DatastoreProblem) and is left out (the node, or just the bad block), never
//! guessed at and never a reason to fail the whole load. Only a source that cannot be read or
//! parsed at all is a [`DatastoreError`].

pub mod file;
pub mod kubernetes;
mod validate;

use std::{future::Future, path::PathBuf};

pub use self::{
    file::{FileDatastore, FileFormat},
    kubernetes::{KubeSource, KubeSourceConfig},
    validate::{build, RawField, RawNode},
};
use crate::{
    config::{Config, DatastoreSource},
    model::DesiredState,
};

/// A source of desired state. The daemon calls `load` on every resync (and whenever the
/// source says something changed); a source may cache between calls, hence `&mut self`.
pub trait Datastore {
    /// Read the whole desired state now. Invalid entries are in `DesiredState::problems`;
    /// `Err` means nothing usable could be read (the caller keeps its previous state).
    fn load(&mut self) -> impl Future<Output = Result<DesiredState, DatastoreError>> + Send;

    /// Human description for logs and status (`file:/etc/dataplane-watchdog/nodes.yaml`).
    fn describe(&self) -> String;
}

/// Why a source could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    #[error("datastore file {}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax error or wrong overall shape (e.g. no `nodes` list). Line and column are
    /// 1-based, when the parser knows them.
    #[error("datastore file {}: {}{message}", path.display(), position(*line, *column))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    /// Any other source (kubernetes): `source` is its `describe()`.
    #[error("datastore {source}: {error}")]
    Backend {
        source: String,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn position(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l} column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

/// `datastore.source = "none"`: no peers, only the checks that need no datastore run.
#[derive(Debug, Clone)]
pub struct NoDatastore {
    pub local_node: String,
}

impl Datastore for NoDatastore {
    async fn load(&mut self) -> Result<DesiredState, DatastoreError> {
        Ok(DesiredState {
            source: self.describe(),
            local_node: self.local_node.clone(),
            ..DesiredState::default()
        })
    }

    fn describe(&self) -> String {
        "none".to_string()
    }
}

/// The configured source, chosen at run time (the trait itself is not object-safe).
#[derive(Debug)]
pub enum AnyDatastore {
    File(FileDatastore),
    /// Boxed: the client is large next to the other sources.
    Kubernetes(Box<KubeSource>),
    None(NoDatastore),
}

impl AnyDatastore {
    /// The source `config.datastore` names. Kubernetes connects (credentials, IPAM API
    /// discovery) here, so an unreachable API server or missing RBAC is an error now, with
    /// one line naming what failed.
    pub async fn from_config(config: &Config) -> Result<AnyDatastore, DatastoreError> {
        Ok(match config.datastore.source {
            DatastoreSource::File => AnyDatastore::File(FileDatastore::new(
                config.datastore.path.clone(),
                config.node_name.clone(),
            )),
            DatastoreSource::Kubernetes => {
                let cfg = KubeSourceConfig::from_config(config);
                let kubeconfig = cfg.kubeconfig.clone();
                let src = KubeSource::connect(cfg).await.map_err(|e| {
                    // Name the server when the credentials were read, else the kubeconfig.
                    let source = match (e.server(), &kubeconfig) {
                        (Some(server), _) => format!("kubernetes:{server}"),
                        (None, Some(p)) => format!("kubernetes (kubeconfig {})", p.display()),
                        (None, None) => "kubernetes".to_string(),
                    };
                    DatastoreError::Backend {
                        source,
                        error: Box::new(e),
                    }
                })?;
                AnyDatastore::Kubernetes(Box::new(src))
            }
            DatastoreSource::None => AnyDatastore::None(NoDatastore {
                local_node: config.node_name.clone(),
            }),
        })
    }

    /// The Kubernetes source, for the daemon's list/watch ([`KubeSource::spawn`]) and
    /// publishing; `None` for the other sources.
    pub fn kubernetes(&self) -> Option<&KubeSource> {
        match self {
            AnyDatastore::Kubernetes(k) => Some(k),
            _ => None,
        }
    }
}

impl Datastore for AnyDatastore {
    async fn load(&mut self) -> Result<DesiredState, DatastoreError> {
        match self {
            AnyDatastore::File(d) => d.load().await,
            AnyDatastore::Kubernetes(d) => d.load().await,
            AnyDatastore::None(d) => d.load().await,
        }
    }

    fn describe(&self) -> String {
        match self {
            AnyDatastore::File(d) => d.describe(),
            AnyDatastore::Kubernetes(d) => d.source_name(),
            AnyDatastore::None(d) => d.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_datastore_has_no_peers() {
        let mut d = AnyDatastore::None(NoDatastore {
            local_node: "a".into(),
        });
        let s = d.load().await.unwrap();
        assert_eq!(s.local_node, "a");
        assert!(s.nodes.is_empty() && s.problems.is_empty());
        assert_eq!(d.describe(), "none");
        assert_eq!(s.source, "none");
    }

    #[test]
    fn backend_errors_name_the_source() {
        let e = DatastoreError::Backend {
            source: "kubernetes".into(),
            error: "connection refused".into(),
        };
        assert_eq!(e.to_string(), "datastore kubernetes: connection refused");
    }
}
