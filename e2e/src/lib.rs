//! End-to-end test harness of memU on Kubernetes: the deterministic OpenAI-compatible stub
//! (the only stand-in, for paid APIs), an OTLP trace receiver standing in for a collector, and
//! helpers to start real servers.

pub mod eval;
pub mod openai_stub;
pub mod otlp_sink;
pub mod promql;
