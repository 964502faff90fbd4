//! Desired state: the `Datastore` sources (file, kubernetes) → `model::DesiredState`.
pub mod kubernetes;
