//! Operator metrics: reconcile count, duration and errors.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

pub struct OperatorMetrics {
    registry: Mutex<Registry>,
    pub reconciles: Family<ResultLabels, Counter>,
    pub duration: Histogram,
    pub errors: Counter,
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ResultLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let errors = Counter::default();
        let leader = Gauge::default();
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
            "memu_operator_leader",
            "1 while this replica is the leader",
            leader.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            reconciles,
            duration,
            errors,
            leader,
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

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry lock");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("write to String");
        out
    }
}
