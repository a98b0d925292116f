//! memU operator: reconciles MemUCluster objects into the memU service's Kubernetes objects.

pub mod admin_key;
pub mod citus;
pub mod leader;
pub mod metrics;
pub mod rbac;
pub mod reconcile;
pub mod render;
