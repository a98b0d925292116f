//! HTTPS: the API is served with the configured certificate only, a renewed certificate is
//! picked up without a restart, and a certificate that does not load stops start-up with an
//! error naming the file.

mod common;

use std::path::Path;

use memu_crds::worker::TlsConfig;

use common::{TestServer, stub, stub_config, with_backend};

/// A self-signed certificate for `localhost`, written as PEM files; returns its PEM.
fn write_certificate(dir: &Path) -> String {
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = issued.cert.pem();
    std::fs::write(dir.join("tls.crt"), &cert).unwrap();
    std::fs::write(dir.join("tls.key"), issued.signing_key.serialize_pem()).unwrap();
    cert
}

fn trusting(cert_pem: &str, api_key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {api_key}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap()])
        .default_headers(headers)
        .build()
        .unwrap()
}

#[tokio::test]
async fn api_is_served_over_https_and_renewed_certificates_are_picked_up() {
    memu_worker::server::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    let first = write_certificate(certs.path());
    let stub = stub().await;
    let (mut config, _db) = with_backend(stub_config(&stub), false).await;
    config.server.tls = Some(TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
        reload_secs: 1,
    });
    let server = TestServer::start(config).await;
    let items = server.url("/api/v1/users/u/items");

    let response = trusting(&first, &server.api_key)
        .get(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = items.replacen("https://", "http://", 1);
    let answered = reqwest::Client::new().get(&plain).send().await;
    assert!(answered.map(|r| !r.status().is_success()).unwrap_or(true));

    // Renewal: new files in place; once re-read, clients trusting only the new one connect.
    let renewed = write_certificate(certs.path());
    let client = trusting(&renewed, &server.api_key);
    let mut served_new = false;
    for _ in 0..100 {
        if client
            .get(&items)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            served_new = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served_new, "the renewed certificate was never served");
    assert!(
        trusting(&first, &server.api_key)
            .get(&items)
            .send()
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_pipeline_only_worker_needs_no_certificate() {
    memu_worker::server::install_crypto_provider();
    let stub = stub().await;
    let (mut config, _db) = with_backend(stub_config(&stub), false).await;
    config.role = memu_crds::worker::Role::Pipeline;
    config.server.tls = Some(TlsConfig {
        cert_file: "/nonexistent/tls.crt".into(),
        key_file: "/nonexistent/tls.key".into(),
        reload_secs: 300,
    });
    let server = TestServer::start(config).await;
    let health = server.base.replacen("https://", "http://", 1) + "/healthz";
    let response = reqwest::get(&health).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_certificate_that_does_not_load_stops_start_up() {
    memu_worker::server::install_crypto_provider();
    let certs = tempfile::tempdir().unwrap();
    write_certificate(certs.path());
    std::fs::write(
        certs.path().join("tls.key"),
        "-----BEGIN PRIVATE KEY-----\nnot a key\n",
    )
    .unwrap();
    let stub = stub().await;
    let (mut config, _db) = with_backend(stub_config(&stub), false).await;
    config.server.tls = Some(TlsConfig {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
        reload_secs: 0,
    });
    let service = memu_worker::server::build_service(config, true)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = memu_worker::server::serve(service, listener, None, std::future::pending())
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("tls.key"), "{message}");
    assert!(!message.contains("not a key"), "{message}");
}
