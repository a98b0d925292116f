//! Every Argo CD and Flux manifest of `config/` against the real CRDs of those projects
//! (collected by e2e/scripts/install-gitops-crds.sh from their Go modules), installed into the
//! e2e harness's kube-apiserver: each object is server-side applied as a dry run with strict
//! field validation, so a wrong field, type or enum value fails with the API server's message.

mod common;

use common::{apply_yaml_file, client, repo, yaml_documents};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::discovery::pinned_kind;
use serde_json::{Value, json};

fn crds_dir() -> String {
    std::env::var("MEMU_TEST_GITOPS_CRDS").expect(
        "MEMU_TEST_GITOPS_CRDS is not set: run the suite through e2e/test.sh, which collects \
         them with e2e/scripts/install-gitops-crds.sh",
    )
}

/// The Kubernetes objects of the GitOps folders: (file, object). A kustomize `kustomization.yaml`
/// (kustomize.config.k8s.io) is kustomize's input, not an object of the cluster.
fn gitops_objects() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    for dir in ["config/argocd", "config/flux", "config/flux/operator"] {
        for entry in std::fs::read_dir(repo(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path
                .strip_prefix(repo(""))
                .unwrap_or(&path)
                .display()
                .to_string();
            yaml_documents(&text)
                .into_iter()
                .map(move |doc| (name.clone(), doc))
        })
        .filter(|(_, doc)| {
            !doc["apiVersion"]
                .as_str()
                .unwrap_or_default()
                .starts_with("kustomize.config.k8s.io/")
        })
        .collect()
}

async fn dry_run_apply(client: &kube::Client, object: &Value) -> Result<(), String> {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
    let (resource, _) = pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{api_version} {}: not served: {e}", gvk.kind))?;
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let params = PatchParams::apply("memu-e2e").dry_run().validation_strict();
    api.patch(
        object["metadata"]["name"].as_str().unwrap(),
        &params,
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

#[tokio::test]
async fn argocd_and_flux_manifests_pass_their_real_crds() {
    let client = client().await;
    let dir = crds_dir();
    let mut installed = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            apply_yaml_file(&client, &path.display().to_string()).await;
            installed += 1;
        }
    }
    assert!(installed >= 6, "{installed} CRDs in {dir}");
    let objects = gitops_objects();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let wanted: std::collections::BTreeSet<&str> = objects
        .iter()
        .filter_map(|(_, o)| o["metadata"]["namespace"].as_str())
        .collect();
    for ns in wanted {
        match namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("namespace {ns}: {e}"),
        }
    }
    let mut kinds: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    for (file, object) in &objects {
        kinds.push(object["kind"].as_str().unwrap().to_string());
        if let Err(e) = dry_run_apply(&client, object).await {
            failures.push(format!("{file} {}: {e}", object["metadata"]["name"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    kinds.sort();
    kinds.dedup();
    for kind in [
        "Application",
        "HelmRelease",
        "Kustomization",
        "OCIRepository",
        "GitRepository",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} among {kinds:?}");
    }

    // The dry run really validates: a misspelt field and a wrong type are refused.
    let (_, release) = objects
        .iter()
        .find(|(_, o)| o["kind"] == "HelmRelease")
        .unwrap();
    let mut typo = release.clone();
    typo["spec"]["intervall"] = json!("5m");
    let err = dry_run_apply(&client, &typo).await.unwrap_err();
    assert!(err.contains("intervall"), "{err}");
    let (_, application) = objects
        .iter()
        .find(|(_, o)| o["kind"] == "Application")
        .unwrap();
    let mut wrong = application.clone();
    wrong["spec"]["syncPolicy"]["automated"]["prune"] = json!("yes");
    let err = dry_run_apply(&client, &wrong).await.unwrap_err();
    assert!(err.contains("prune"), "{err}");
}
