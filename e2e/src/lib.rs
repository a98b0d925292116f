//! End-to-end test harness of memU on Kubernetes: the deterministic OpenAI-compatible stub
//! (the only stand-in, for paid APIs) and helpers to start real servers.

pub mod eval;
pub mod openai_stub;
