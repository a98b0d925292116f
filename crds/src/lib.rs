//! API types shared by the operator and the worker.
//!
//! `worker` is the worker's configuration file schema: the worker reads it, the operator renders it
//! into the ConfigMap it mounts, so both sides agree on one serde type with one set of defaults.

pub mod worker;

#[cfg(feature = "kube")]
pub mod cluster;
#[cfg(feature = "kube")]
pub mod reference;
