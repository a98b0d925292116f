//! End-to-end test harness of memU on Kubernetes: the deterministic OpenAI-compatible stub
//! (the only stand-in, for paid APIs), an OTLP trace receiver standing in for a collector, and
//! helpers to start real servers.

pub mod eval;
pub mod openai_stub;
pub mod otlp_sink;
pub mod promql;

/// A free loopback port (bound and released; the caller binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .expect("local address")
        .port()
}
