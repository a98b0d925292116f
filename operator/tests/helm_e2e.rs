//! The Helm chart installed into the real control plane of `e2e/k8s/start.sh`: `helm install`
//! creates the ServiceAccount, the generated ClusterRole and its binding, the operator Deployment
//! (kwok runs its pods); then this build's `memu-operator` runs as a local process with a token of
//! the chart's ServiceAccount and exactly the arguments and environment of the rendered
//! Deployment, reconciles the small sample to Ready, and `helm uninstall` removes it all but the
//! CRD.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};

use common::{
    Operator, chart, client, create_namespace, eventually, free_port, helm_or_skip,
    kubeconfig_path, sample, service_account_kubeconfig, small_sample_volume, yaml_documents,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use memu_crds::cluster::MemUCluster;
use serde_json::{Value, json};

/// The process a container of the rendered Deployment would run: its arguments and environment,
/// with the downward-API variables resolved for `pod` and `$(VAR)` references expanded as the
/// kubelet does.
fn container_process(
    deployment: &Value,
    pod: &Pod,
) -> (String, Vec<String>, BTreeMap<String, String>) {
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let mut env = BTreeMap::new();
    for var in c["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = var["value"].as_str() {
            v.to_string()
        } else {
            match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod.metadata.name.clone().unwrap(),
                Some("metadata.namespace") => pod.metadata.namespace.clone().unwrap(),
                _ => panic!("the test cannot resolve {var}"),
            }
        };
        env.insert(name, value);
    }
    let expand = |arg: &str| {
        env.iter().fold(arg.to_string(), |a, (k, v)| {
            a.replace(&format!("$({k})"), v)
        })
    };
    let command = c["command"][0].as_str().unwrap().to_string();
    let args = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| expand(a.as_str().unwrap()))
        .collect();
    (command, args, env)
}

/// The flag value `--name=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{name}=")))
        .unwrap_or_else(|| panic!("no --{name} in {args:?}"))
}

/// A plain HTTP GET on loopback (what the kubelet's httpGet probe does); the status line and body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

#[tokio::test]
async fn helm_install_runs_the_operator_under_the_charts_account_and_flags() {
    let Some(helm) = helm_or_skip("helm install", true) else {
        return;
    };
    let client = client().await;
    let pid = std::process::id();
    let ns = format!("helm-e2e-{pid}");
    // Cluster-scoped names (ClusterRole, binding) come from the release name: one per test run.
    let release = format!("op-{pid}");
    let namespaces = create_namespace(&client, &ns).await;
    let kubeconfig = kubeconfig_path();
    let port = free_port().to_string();
    let chart = chart();
    let watch = format!("watchNamespace={ns}");
    let metrics = format!("metrics.port={port}");
    let base = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--namespace",
        ns.as_str(),
    ];
    let with = |args: &[&str]| -> Vec<String> {
        args.iter()
            .map(|a| a.to_string())
            .chain(base.iter().map(|a| a.to_string()))
            .collect()
    };
    // The operator watches only this namespace, so it never touches the other tests' clusters.
    helm.run(&with(&[
        "install",
        &release,
        &chart,
        "--wait",
        "--timeout",
        "5m",
        "--set",
        &watch,
        "--set",
        &metrics,
    ]));

    // The Deployment is available: kwok runs its two pods.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let fullname = format!("{release}-memu-operator");
    eventually("the operator Deployment is available", || async {
        deployments
            .get(&fullname)
            .await
            .ok()
            .and_then(|d| d.status)
            .is_some_and(|s| {
                s.ready_replicas == Some(2)
                    && s.conditions
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Available" && c.status == "True")
            })
    })
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/instance={release}")))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2);

    // The manifest Helm applied: the operator's process as the Deployment would start it, in the
    // place of one of its (simulated) pods.
    let manifest = yaml_documents(&helm.run(&with(&["get", "manifest", &release])));
    let deployment = manifest.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &pods.items[0];
    let (command, args, env) = container_process(deployment, pod);
    assert_eq!(command, "/usr/local/bin/memu-operator");
    let account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_kubeconfig = service_account_kubeconfig(&client, &ns, account, dir.path()).await;
    let operator = Operator::spawn(
        args.iter().map(String::as_str),
        env.iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([("KUBECONFIG", token_kubeconfig.as_str())]),
        &format!("memu-helm-e2e-{ns}"),
    );

    // The probes' endpoint answers on the chart's metrics port.
    let probe =
        &deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"];
    let probe_path = probe["path"].as_str().unwrap().to_string();
    assert_eq!(flag(&args, "metrics-addr"), format!("0.0.0.0:{port}"));
    eventually("the operator answers its liveness probe", || async {
        http_get(port.parse().unwrap(), &probe_path)
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.ends_with("ok"))
    })
    .await;

    // It leads through the chart's Lease in the release namespace, as the pod it stands in for.
    assert_eq!(flag(&args, "lease-namespace"), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease_name = flag(&args, "lease-name").to_string();
    let identity = pod.metadata.name.clone().unwrap();
    eventually("the operator holds the chart's Lease", || async {
        leases
            .get_opt(&lease_name)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
            .as_deref()
            == Some(identity.as_str())
    })
    .await;

    // With the chart's RBAC only, it reconciles the small sample to Ready.
    let pv = small_sample_volume(&client, &ns).await;
    let clusters: Api<MemUCluster> = Api::namespaced(client.clone(), &ns);
    let mut small = sample("small");
    small["metadata"]["namespace"] = json!(ns);
    let small: MemUCluster = serde_json::from_value(small).unwrap();
    clusters
        .patch(
            "memu-small",
            &PatchParams::apply("memu-e2e").force(),
            &Patch::Apply(&small),
        )
        .await
        .unwrap();
    eventually("the small sample is Ready", || async {
        clusters
            .get("memu-small")
            .await
            .ok()
            .and_then(|c| c.status)
            .is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
    })
    .await;

    // An upgrade to one replica scales the Deployment and drops the disruption budget.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    assert!(pdbs.get_opt(&fullname).await.unwrap().is_some());
    helm.run(&with(&[
        "upgrade",
        &release,
        &chart,
        "--reuse-values",
        "--set",
        "replicaCount=1",
        "--wait",
        "--timeout",
        "5m",
    ]));
    assert_eq!(
        deployments
            .get(&fullname)
            .await
            .unwrap()
            .spec
            .unwrap()
            .replicas,
        Some(1)
    );
    assert!(pdbs.get_opt(&fullname).await.unwrap().is_none());

    // Uninstall: the operator's objects go, the CRD (installed from crds/) and the clusters stay.
    drop(operator);
    clusters
        .delete("memu-small", &DeleteParams::default())
        .await
        .unwrap();
    helm.run(&with(&["uninstall", &release, "--wait", "--timeout", "5m"]));
    assert!(deployments.get_opt(&fullname).await.unwrap().is_none());
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt(account)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get_opt(&format!("{fullname}-metrics"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<ClusterRole>::all(client.clone())
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<ClusterRoleBinding>::all(client.clone())
            .get_opt(&fullname)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        Api::<CustomResourceDefinition>::all(client.clone())
            .get_opt("memuclusters.memu.dev")
            .await
            .unwrap()
            .is_some(),
        "helm never deletes the CRDs of crds/"
    );
    let releases = helm.run(&with(&["list", "--all", "--short"]));
    assert!(releases.trim().is_empty(), "{releases}");

    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .delete(&pv, &DeleteParams::default())
        .await
        .unwrap();
}
