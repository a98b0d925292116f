//! Helpers of the operator's e2e tests against the real control plane that `e2e/k8s/start.sh`
//! starts (the test script exports its kubeconfig) and of the Helm chart's tests.
// Every test crate that includes this module uses a part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

pub fn kubeconfig_path() -> String {
    std::env::var("MEMU_TEST_KUBECONFIG").expect(
        "MEMU_TEST_KUBECONFIG is not set: run the suite through e2e/test.sh, which starts a real \
         kube-apiserver with e2e/k8s/start.sh",
    )
}

pub async fn client() -> Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = Kubeconfig::read_from(kubeconfig_path()).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A path of the repository, from the operator crate's directory.
pub fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

/// Applies the CRDs of a YAML file (a repository path, or an absolute one) and waits until the
/// API server serves them.
pub async fn apply_yaml_file(client: &Client, path: &str) {
    let file = if Path::new(path).is_absolute() {
        path.to_string()
    } else {
        repo(path)
    };
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for doc in text.split("\n---") {
        if doc.trim().is_empty() {
            continue;
        }
        let crd: CustomResourceDefinition = serde_norway::from_str(doc).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("memu-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        eventually(&format!("CRD {name} established"), || async {
            crds.get(&name)
                .await
                .ok()
                .and_then(|c| c.status)
                .and_then(|s| s.conditions)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await;
    }
}

/// Polls `check` (bounded count) until it holds; the bound is a count, not a timing assertion.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..240 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("never happened: {what}");
}

/// A committed sample MemUCluster of `config/samples/`.
pub fn sample(name: &str) -> Value {
    serde_norway::from_str(
        &std::fs::read_to_string(repo(&format!("config/samples/{name}.yaml"))).unwrap(),
    )
    .unwrap()
}

/// A running `memu-operator` process, killed when dropped.
pub struct Operator(Child);

impl Operator {
    /// Runs the operator binary of this build with `args` and `env`, stderr to `/tmp/{log}.log`.
    pub fn spawn<'a>(
        args: impl IntoIterator<Item = &'a str>,
        env: impl IntoIterator<Item = (&'a str, &'a str)>,
        log: &str,
    ) -> Operator {
        Operator(
            Command::new(env!("CARGO_BIN_EXE_memu-operator"))
                .args(args)
                .envs(env)
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(format!("/tmp/{log}.log"))
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null()),
                )
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[allow(unused_imports)] // Not every test file binds a port.
pub use memu_e2e::free_port;

pub async fn create_namespace(client: &Client, ns: &str) -> Api<Namespace> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    namespaces
}

/// A kubeconfig (written into `dir`) that authenticates as the ServiceAccount `account` of `ns`
/// with a token from the TokenRequest API, against the test cluster: whoever uses it has exactly
/// the permissions bound to that account.
pub async fn service_account_kubeconfig(
    client: &Client,
    ns: &str,
    account: &str,
    dir: &Path,
) -> String {
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(
            account,
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let admin: Value =
        serde_norway::from_str(&std::fs::read_to_string(kubeconfig_path()).unwrap()).unwrap();
    let cluster = admin["clusters"][0].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": account}}],
        "current-context": "operator",
    });
    let path = dir.join(format!("{ns}-{account}.kubeconfig"));
    std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
    path.display().to_string()
}

/// A volume bound in advance to the data claim of the small sample's SQLite worker in `ns` (the
/// test cluster has no provisioner). Returns its name; delete it at the end.
pub async fn small_sample_volume(client: &Client, ns: &str) -> String {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let name = format!("{ns}-pv");
    pvs.create(&PostParams::default(), &serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"], "hostPath": {"path": "/tmp/memu-e2e-pv"},
                 "claimRef": {"namespace": ns, "name": "data-memu-small-worker-0"}},
    })).unwrap()).await.unwrap();
    name
}

/// The helm binary e2e/test.sh builds (`e2e/scripts/install-helm-tools.sh`), or `None` with a
/// message naming what is missing when the suite runs outside the test script.
pub fn helm_or_skip(test: &str, needs_cluster: bool) -> Option<Helm> {
    let missing: Vec<&str> = ["MEMU_TEST_HELM", "MEMU_TEST_KUBECONFIG"]
        .into_iter()
        .filter(|v| (needs_cluster || *v == "MEMU_TEST_HELM") && std::env::var_os(v).is_none())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped {test}: {} not set (e2e/test.sh builds helm with \
             e2e/scripts/install-helm-tools.sh, starts the control plane and sets them)",
            missing.join(" and ")
        );
        return None;
    }
    Some(Helm {
        bin: std::env::var("MEMU_TEST_HELM").unwrap(),
        home: tempfile::tempdir().unwrap(),
    })
}

/// helm with its cache, configuration and data in a directory of its own.
pub struct Helm {
    bin: String,
    home: tempfile::TempDir,
}

impl Helm {
    /// Runs helm; returns its output whatever the exit status.
    pub fn output<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Output {
        let home = self.home.path();
        Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env_remove("KUBECONFIG")
            .output()
            .unwrap()
    }

    /// Runs helm and returns its stdout; panics with stderr when it fails.
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "helm {} failed: {}{}",
            args.iter()
                .map(|a| a.as_ref().to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

/// The documents of a multi-document YAML stream (empty ones dropped).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The chart's directory.
pub fn chart() -> String {
    repo("charts/memu-operator")
}
