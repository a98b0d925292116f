//! memU worker: the data plane of memU on Kubernetes.
//!
//! Layers, outermost first: `api` (HTTP), `service` (memory operations), `pipeline` (memorize
//! jobs), `store` (SQLite or Postgres + pgvector) and `providers` (embeddings and LLMs).

pub mod access;
pub mod admin_cli;
pub mod api;
pub mod cache;
pub mod config;
pub mod llm;
pub mod mcp;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod prompts;
pub mod providers;
pub mod retrieval;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tenancy;
