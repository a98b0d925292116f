//! The managed Redis as the operator renders it, started for real: Debian's `redis-server` gets
//! the rendered arguments and the Secret's `auth.conf`, and must refuse a client without the
//! password, serve one with the password from the Secret's URL, and cap its memory.

use std::process::Command;

use memu_crds::cluster::MemUCluster;
use memu_operator::render;
use serde_json::json;

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs (e2e/scripts/install-redis.sh installs it)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_rendered_redis_requires_the_generated_password() {
    if std::env::var("MEMU_TEST_REDIS_URL").is_err() && std::env::var("CI").is_err() {
        eprintln!("skipped: MEMU_TEST_REDIS_URL is unset (e2e/test.sh installs redis-server)");
        return;
    }
    let cluster: MemUCluster = serde_json::from_value(json!({
        "apiVersion": "memu.dev/v1alpha1",
        "kind": "MemUCluster",
        "metadata": {"name": "mem", "namespace": "team", "uid": "uid-1"},
        "spec": {"tier": "large", "cache": {"managed": {"maxMemoryMiB": 64}}},
    }))
    .unwrap();
    let password = "Gen3ratedPassw0rdGen3ratedPassw0";
    let secret = render::cache_secret(&cluster, password);
    let data = secret.string_data.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("auth.conf");
    std::fs::write(&conf, &data["auth.conf"]).unwrap();
    let mut args = render::redis_args(
        render::managed_cache(&cluster)
            .unwrap()
            .max_memory_mib
            .unwrap(),
    );
    // The pod mounts the file at a fixed path; here it is in the temporary directory.
    args[0] = conf.display().to_string();
    let port = memu_e2e::free_port();
    let mut server = Command::new("redis-server")
        .args(&args)
        // Later options win: a loopback port of the test's own instead of 6379.
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir.path())
        .spawn()
        .expect("redis-server starts");
    let mut answer = String::new();
    for _ in 0..100 {
        answer = redis_cli(port, &["ping"]);
        if !answer.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = &data["url"];
    let from_url = url
        .strip_prefix("redis://:")
        .and_then(|rest| rest.split_once('@'))
        .map(|(pw, _)| pw.to_string())
        .unwrap();
    let with_password = |command: &[&str]| {
        let mut args = vec!["-a", from_url.as_str(), "--no-auth-warning"];
        args.extend_from_slice(command);
        redis_cli(port, &args)
    };
    let authed = with_password(&["ping"]);
    let maxmemory = with_password(&["config", "get", "maxmemory"]);
    let policy = with_password(&["config", "get", "maxmemory-policy"]);
    server.kill().ok();
    server.wait().ok();
    assert!(
        answer.contains("NOAUTH"),
        "no password, no access: {answer}"
    );
    assert_eq!(authed, "PONG");
    assert!(
        maxmemory.ends_with(&(64u64 << 20).to_string()),
        "{maxmemory}"
    );
    assert!(policy.ends_with("allkeys-lru"), "{policy}");
}
