//! The one error type of the Kubernetes source, and [`bounded`], where every kube call becomes
//! one: a bare kube error says what failed, not what the operator has to do about it.

use std::{path::PathBuf, time::Duration};

use super::client::MICROK8S_KUBECONFIG;

/// Why talking to the API server failed, sorted by what the operator has to do about it.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes credentials found (KUBECONFIG, ~/.kube/config, in-cluster service account, \
         {MICROK8S_KUBECONFIG}): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error(
        "no Calico IPAM API found: none of {tried} serves ipamblocks (set datastore.ipam_api, or \
         use profile = \"flannel\")"
    )]
    NoIpamApi { tried: String },
    /// The API server answered with an error status (other than 403).
    #[error("{what}: {}", describe_kube_error(source))]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// 403: the credentials lack a verb on a resource. `message` is the server's, which names
    /// the user, verb and resource.
    #[error(
        "{what}: forbidden by RBAC: {message} (the agent needs get/list/watch on nodes and the \
         Calico IPAM resources: apply systemd/rbac.yaml)"
    )]
    Forbidden { what: String, message: String },
    /// No answer at all: connection refused or reset, DNS, TLS.
    #[error("{what}: API server unreachable: {}", describe_kube_error(source))]
    Unreachable {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    /// A request that could not even be built (a node name that is no valid URL path).
    #[error("{what}: {message}")]
    Request { what: String, message: String },
    /// Any of the above while connecting to `server` (the kubeconfig's URL): displayed as the
    /// inner error; [`KubeError::server`] lets callers name the source.
    #[error("{error}")]
    AtServer {
        server: String,
        #[source]
        error: Box<KubeError>,
    },
}

impl KubeError {
    /// 401: the server rejected the credentials themselves (expired token, rotated client
    /// certificate). Retrying with the same client cannot help; a reconnect re-reads them.
    pub(super) fn is_unauthorized(&self) -> bool {
        matches!(
            self,
            KubeError::Api { source: kube::Error::Api(status), .. } if status.code == 401
        )
    }

    /// The API server URL, when the error happened talking to a known one.
    pub fn server(&self) -> Option<&str> {
        match self {
            KubeError::AtServer { server, .. } => Some(server),
            _ => None,
        }
    }

    /// Sorts a client error by what the operator has to do about it.
    fn from_kube(what: String, source: kube::Error) -> Self {
        match &source {
            kube::Error::Api(status) if status.code == 403 => KubeError::Forbidden {
                what,
                message: status.message.clone(),
            },
            kube::Error::Api(_)
            | kube::Error::SerdeError(_)
            | kube::Error::FromUtf8(_)
            | kube::Error::LinesCodecMaxLineLengthExceeded
            | kube::Error::BuildRequest(_)
            | kube::Error::HttpError(_) => KubeError::Api { what, source },
            _ => KubeError::Unreachable { what, source },
        }
    }
}

/// One line for a kube client error: the server's own message for API errors, else the chain
/// of causes (`client error (Connect): tcp connect error: Connection refused (os error 111)`).
fn describe_kube_error(e: &kube::Error) -> String {
    if let kube::Error::Api(status) = e {
        return format!("{} {}: {}", status.code, status.reason, status.message);
    }
    // kube's own wrappers ("ServiceError: client error (Connect)") add a type name, not a fact.
    let start: Option<&(dyn std::error::Error + 'static)> = match e {
        kube::Error::Service(inner) => Some(inner.as_ref()),
        kube::Error::HyperError(inner) => Some(inner),
        _ => Some(e),
    };
    let mut parts: Vec<String> = Vec::new();
    let mut cur = start;
    while let Some(err) = cur {
        let text = err.to_string();
        // Wrappers often repeat their cause's text; keep each fact once.
        if !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

pub type Result<T, E = KubeError> = std::result::Result<T, E>;

/// Runs one kube call with a deadline. kube silently retries 503s with backoff, so without the
/// bound an unavailable server looks like a slow call instead of an error.
pub(super) async fn bounded<T>(
    what: impl Fn() -> String,
    after: Duration,
    fut: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(KubeError::from_kube(what(), source)),
        Err(_) => Err(KubeError::Timeout {
            what: what(),
            after,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_errors_read_as_one_line() {
        let forbidden = KubeError::from_kube(
            "listing nodes".into(),
            kube::Error::Api(Box::new(kube::core::Status {
                code: 403,
                reason: "Forbidden".into(),
                message: "nodes is forbidden: User \"system:serviceaccount:kube-system:dataplane-watchdog\" cannot list resource \"nodes\" in API group \"\" at the cluster scope".into(),
                ..Default::default()
            })),
        );
        let text = forbidden.to_string();
        assert!(matches!(forbidden, KubeError::Forbidden { .. }));
        assert!(
            text.starts_with("listing nodes: forbidden by RBAC: nodes is forbidden"),
            "{text}"
        );
        assert!(text.contains("cannot list resource \"nodes\""), "{text}");
        assert!(text.contains("systemd/rbac.yaml"), "{text}");
        assert!(!text.contains('\n'));
        let gone = KubeError::from_kube(
            "watching nodes".into(),
            kube::Error::Api(Box::new(kube::core::Status {
                code: 410,
                reason: "Expired".into(),
                message: "too old resource version".into(),
                ..Default::default()
            })),
        );
        assert_eq!(
            gone.to_string(),
            "watching nodes: 410 Expired: too old resource version"
        );
    }
}
