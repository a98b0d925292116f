//! The operator's permissions, as one table: `rbacgen` renders it into the ClusterRole that
//! installs use (`config/rbac/operator.yaml`), and the e2e test runs the operator under exactly
//! that role, so a permission the code needs but the table lacks fails the suite.

use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Verbs on the children the operator applies, watches and cleans up.
const MANAGE: &[&str] = &[
    "get", "list", "watch", "create", "patch", "update", "delete",
];
/// Verbs on optional third-party objects it applies but does not watch.
const APPLY: &[&str] = &["get", "list", "create", "patch", "update", "delete"];

/// (API group, resources, verbs), least privilege for what `reconcile.rs` touches.
pub const RULES: &[(&str, &[&str], &[&str])] = &[
    (
        "memu.dev",
        &["memuclusters"],
        &["get", "list", "watch", "patch", "update"],
    ),
    (
        "memu.dev",
        &["memuclusters/status"],
        &["get", "patch", "update"],
    ),
    ("memu.dev", &["memuclusters/finalizers"], &["update"]),
    ("apps", &["deployments", "statefulsets"], MANAGE),
    ("", &["services", "configmaps", "serviceaccounts"], MANAGE),
    // The Citus credentials and the admin API key are created once and read back (membership
    // check, rollout version), and the spec.tls Secret is looked up by name (metadata only, to
    // report it missing); nothing else.
    ("", &["secrets"], &["get", "create"]),
    // The Delete policy removes the data volume claims.
    (
        "",
        &["persistentvolumeclaims"],
        &["get", "list", "delete", "deletecollection"],
    ),
    ("autoscaling", &["horizontalpodautoscalers"], MANAGE),
    ("policy", &["poddisruptionbudgets"], MANAGE),
    ("batch", &["jobs"], MANAGE),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    (
        "coordination.k8s.io",
        &["leases"],
        &["get", "create", "update", "patch"],
    ),
    // Which optional CRDs are installed (CloudNativePG, prometheus-operator, KEDA).
    (
        "apiextensions.k8s.io",
        &["customresourcedefinitions"],
        &["get"],
    ),
    ("postgresql.cnpg.io", &["clusters"], APPLY),
    ("monitoring.coreos.com", &["servicemonitors"], APPLY),
    (
        "keda.sh",
        &["scaledobjects", "triggerauthentications"],
        APPLY,
    ),
];

pub const ROLE_NAME: &str = "memu-operator";

pub fn cluster_role() -> ClusterRole {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ClusterRole {
        metadata: ObjectMeta {
            name: Some(ROLE_NAME.into()),
            labels: Some(
                [(
                    "app.kubernetes.io/name".to_string(),
                    "memu-operator".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        rules: Some(
            RULES
                .iter()
                .map(|(group, resources, verbs)| PolicyRule {
                    api_groups: Some(vec![group.to_string()]),
                    resources: Some(strings(resources)),
                    verbs: strings(verbs),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    }
}
