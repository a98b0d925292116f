//! Operator metrics: reconcile count, duration and errors, leadership, and per MemUCluster its
//! readiness, phase and workload replicas (for alerts and dashboards; see docs/observability.md).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use memu_crds::cluster::{MemUCluster, MemUClusterStatus};

/// One kind of request to the Kubernetes API.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequestLabels {
    /// `watch`, `get` (reads and lists), `create`, `update`, `patch` or `delete`.
    pub verb: &'static str,
}

impl KubeRequestLabels {
    pub fn of<B>(request: &http::Request<B>) -> Self {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let verb = match *request.method() {
            http::Method::GET if watch => "watch",
            http::Method::GET => "get",
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "other",
        };
        Self { verb }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

/// One MemUCluster. Not `namespace`/`name`: those would clash with the target labels
/// Prometheus gives the operator's own pod.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster_namespace: String,
    pub cluster_name: String,
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub cluster_namespace: String,
    pub cluster_name: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkloadLabels {
    pub cluster_namespace: String,
    pub cluster_name: String,
    pub tier: String,
    /// `api`, `pipeline`, or `worker` (one process serving both, the small tier).
    pub component: String,
    /// `desired` or `ready`.
    pub state: String,
}

/// The series one cluster has now, so that a change of tier or phase drops the old ones.
#[derive(Clone, Debug)]
struct ClusterSeries {
    recorded: Instant,
    ready: Option<ClusterLabels>,
    phase: Option<PhaseLabels>,
    workloads: Vec<WorkloadLabels>,
}

pub struct OperatorMetrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub duration: Histogram,
    pub errors: Counter,
    /// Requests this process sent to the Kubernetes API (cost per reconcile, API load).
    pub kube_requests: Family<KubeRequestLabels, Counter>,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    cluster_ready: Family<ClusterLabels, Gauge>,
    cluster_phase: Family<PhaseLabels, Gauge>,
    workload_replicas: Family<WorkloadLabels, Gauge>,
    clusters: Mutex<BTreeMap<(String, String), ClusterSeries>>,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let errors = Counter::default();
        let kube_requests = Family::<KubeRequestLabels, Counter>::default();
        let leader = Gauge::default();
        let cluster_ready = Family::<ClusterLabels, Gauge>::default();
        let cluster_phase = Family::<PhaseLabels, Gauge>::default();
        let workload_replicas = Family::<WorkloadLabels, Gauge>::default();
        registry.register(
            "memu_operator_reconciles",
            "Reconciles of MemUClusters by result",
            reconciles.clone(),
        );
        registry.register(
            "memu_operator_reconcile_duration_seconds",
            "Time of one reconcile",
            duration.clone(),
        );
        registry.register(
            "memu_operator_reconcile_errors",
            "Reconciles that failed and were requeued",
            errors.clone(),
        );
        registry.register(
            "memu_operator_kube_requests",
            "Requests sent to the Kubernetes API by verb",
            kube_requests.clone(),
        );
        registry.register(
            "memu_operator_leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        registry.register(
            "memu_operator_cluster_ready",
            "1 while the MemUCluster's Ready condition is True, else 0",
            cluster_ready.clone(),
        );
        registry.register(
            "memu_operator_cluster_phase",
            "1 for the MemUCluster's current status.phase",
            cluster_phase.clone(),
        );
        registry.register(
            "memu_operator_workload_replicas",
            "Desired and ready replicas of each workload of a MemUCluster",
            workload_replicas.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            duration,
            errors,
            kube_requests,
            leader,
            cluster_ready,
            cluster_phase,
            workload_replicas,
            clusters: Mutex::new(BTreeMap::new()),
        }
    }
}

impl OperatorMetrics {
    pub fn observe(&self, elapsed: Duration, ok: bool) {
        self.duration.observe(elapsed.as_secs_f64());
        self.reconciles
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// Sets the cluster's gauges from the status just written.
    pub fn record_cluster(&self, cluster: &MemUCluster, status: &MemUClusterStatus) {
        let namespace = cluster.metadata.namespace.clone().unwrap_or_default();
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let tier = serde_json::to_value(cluster.spec.tier)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let mut series = ClusterSeries {
            recorded: Instant::now(),
            ready: Some(ClusterLabels {
                cluster_namespace: namespace.clone(),
                cluster_name: name.clone(),
                tier: tier.clone(),
            }),
            phase: status.phase.clone().map(|phase| PhaseLabels {
                cluster_namespace: namespace.clone(),
                cluster_name: name.clone(),
                phase,
            }),
            workloads: Vec::new(),
        };
        // One process serving both roles (the small tier) reports the same workload twice.
        let workloads: Vec<(&str, i32, i32)> = match (&status.api, &status.pipeline) {
            (Some(a), Some(p)) if a.selector == p.selector => {
                vec![("worker", a.desired_replicas, a.ready_replicas)]
            }
            (api, pipeline) => [("api", api), ("pipeline", pipeline)]
                .into_iter()
                .filter_map(|(c, w)| {
                    w.as_ref()
                        .map(|w| (c, w.desired_replicas, w.ready_replicas))
                })
                .collect(),
        };
        let mut values = Vec::new();
        for (component, desired, ready_replicas) in workloads {
            for (state, n) in [("desired", desired), ("ready", ready_replicas)] {
                let labels = WorkloadLabels {
                    cluster_namespace: namespace.clone(),
                    cluster_name: name.clone(),
                    tier: tier.clone(),
                    component: component.into(),
                    state: state.into(),
                };
                values.push((labels.clone(), n));
                series.workloads.push(labels);
            }
        }
        let mut clusters = self.clusters.lock().expect("metrics lock");
        if let Some(old) = clusters.insert((namespace, name), series.clone()) {
            self.remove(&old, Some(&series));
        }
        if let Some(labels) = &series.ready {
            self.cluster_ready.get_or_create(labels).set(ready as i64);
        }
        if let Some(labels) = &series.phase {
            self.cluster_phase.get_or_create(labels).set(1);
        }
        for (labels, n) in values {
            self.workload_replicas.get_or_create(&labels).set(n as i64);
        }
    }

    /// Drops the gauges of a deleted cluster.
    pub fn forget_cluster(&self, namespace: &str, name: &str) {
        let mut clusters = self.clusters.lock().expect("metrics lock");
        if let Some(old) = clusters.remove(&(namespace.to_string(), name.to_string())) {
            self.remove(&old, None);
        }
    }

    /// Drops the gauges of every cluster not in `existing` (namespace, name), a list taken at
    /// `listed_at`; a cluster recorded since then may be newer than the list and stays.
    pub fn retain_clusters(&self, existing: &BTreeSet<(String, String)>, listed_at: Instant) {
        let mut clusters = self.clusters.lock().expect("metrics lock");
        let gone: Vec<_> = clusters
            .iter()
            .filter(|(k, s)| !existing.contains(*k) && s.recorded <= listed_at)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(old) = clusters.remove(&key) {
                self.remove(&old, None);
            }
        }
    }

    /// Removes the series of `old` that `new` does not have.
    fn remove(&self, old: &ClusterSeries, new: Option<&ClusterSeries>) {
        if let Some(l) = &old.ready
            && new.and_then(|n| n.ready.as_ref()) != Some(l)
        {
            self.cluster_ready.remove(l);
        }
        if let Some(l) = &old.phase
            && new.and_then(|n| n.phase.as_ref()) != Some(l)
        {
            self.cluster_phase.remove(l);
        }
        for l in &old.workloads {
            if !new.is_some_and(|n| n.workloads.contains(l)) {
                self.workload_replicas.remove(l);
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("write to String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(method: http::Method, uri: &str) -> &'static str {
        let request = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap();
        KubeRequestLabels::of(&request).verb
    }

    #[test]
    fn kube_requests_are_counted_by_verb() {
        use http::Method;
        let path = "/apis/apps/v1/namespaces/a/statefulsets";
        assert_eq!(
            verb(Method::GET, &format!("{path}?watch=true&resourceVersion=1")),
            "watch"
        );
        assert_eq!(verb(Method::GET, &format!("{path}?labelSelector=x")), "get");
        assert_eq!(verb(Method::GET, &format!("{path}/s")), "get");
        assert_eq!(
            verb(Method::PATCH, &format!("{path}/s?fieldManager=m")),
            "patch"
        );
        assert_eq!(verb(Method::POST, path), "create");
        assert_eq!(verb(Method::PUT, &format!("{path}/s")), "update");
        assert_eq!(verb(Method::DELETE, &format!("{path}/s")), "delete");
        let metrics = OperatorMetrics::default();
        metrics
            .kube_requests
            .get_or_create(&KubeRequestLabels { verb: "patch" })
            .inc();
        assert!(
            metrics
                .encode()
                .contains("memu_operator_kube_requests_total{verb=\"patch\"} 1")
        );
    }
}
