//! The Redis the operator runs for `spec.cache.managed`: a one-pod StatefulSet and a ClusterIP
//! Service, with a password generated once into the Secret `<cluster>-redis`. It holds only what
//! can be recomputed (query embeddings, retrieve results, rate-limit buckets), so it has no
//! volume and no persistence: a restart costs cache misses, never data.

use super::*;
use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, TCPSocketAction};
use memu_crds::cluster::ManagedCacheSpec;

pub const DEFAULT_REDIS_IMAGE: &str = "redis:7.4-alpine";
pub const REDIS_PORT: i32 = 6379;
const DEFAULT_MAX_MEMORY_MIB: u32 = 512;
/// The official image's `redis` user.
const REDIS_UID: i64 = 999;
/// Secret keys: the password, the URL the workers read, and a Redis config file that sets the
/// password (so it never appears in the server's command line or the pod spec).
pub const PASSWORD_KEY: &str = "password";
pub const URL_KEY: &str = "url";
pub const AUTH_CONF_KEY: &str = "auth.conf";
const AUTH_DIR: &str = "/etc/memu-redis";

/// Name of the StatefulSet, Service and Secret of the managed Redis.
pub fn cache_name(cluster: &MemUCluster) -> String {
    format!("{}-redis", name(cluster))
}

pub fn managed_cache(cluster: &MemUCluster) -> Option<&ManagedCacheSpec> {
    cluster.spec.cache.as_ref().and_then(|c| c.managed.as_ref())
}

/// The Secret key the workers read `REDIS_URL` from: the external one, or the managed Redis's.
pub fn redis_url_secret(cluster: &MemUCluster) -> Option<SecretKeyRef> {
    let cache = cluster.spec.cache.as_ref()?;
    match (&cache.redis_url_secret, &cache.managed) {
        (Some(external), _) => Some(external.clone()),
        (None, Some(_)) => Some(SecretKeyRef {
            name: cache_name(cluster),
            key: URL_KEY.into(),
        }),
        (None, None) => None,
    }
}

/// The generated login of the managed Redis (created once, never rewritten: the running Redis
/// and workers hold the password). The password must be URL-safe (alphanumeric).
pub fn cache_secret(cluster: &MemUCluster, password: &str) -> Secret {
    let host = format!("{}.{}.svc", cache_name(cluster), namespace(cluster));
    Secret {
        metadata: meta(cluster, cache_name(cluster), "cache", true),
        string_data: Some(BTreeMap::from([
            (PASSWORD_KEY.into(), password.into()),
            (
                URL_KEY.into(),
                format!("redis://:{password}@{host}:{REDIS_PORT}/0"),
            ),
            (AUTH_CONF_KEY.into(), format!("requirepass {password}\n")),
        ])),
        ..Default::default()
    }
}

/// The arguments of `redis-server`: the password from the mounted config file, a memory cap with
/// LRU eviction, and no snapshots or append-only file.
pub fn redis_args(max_memory_mib: u32) -> Vec<String> {
    [
        format!("{AUTH_DIR}/{AUTH_CONF_KEY}"),
        "--port".into(),
        REDIS_PORT.to_string(),
        "--maxmemory".into(),
        format!("{max_memory_mib}mb"),
        "--maxmemory-policy".into(),
        "allkeys-lru".into(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
    ]
    .into()
}

fn max_memory(managed: &ManagedCacheSpec) -> u32 {
    managed.max_memory_mib.unwrap_or(DEFAULT_MAX_MEMORY_MIB)
}

pub fn cache_stateful_set(cluster: &MemUCluster, managed: &ManagedCacheSpec) -> StatefulSet {
    let max_memory = max_memory(managed);
    // Redis's own overhead (buffers, fragmentation) on top of maxmemory.
    let memory = Quantity(format!("{}Mi", max_memory + max_memory / 4));
    let tcp_probe = |period| Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("redis".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(cluster, cache_name(cluster), "cache", true),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(cache_name(cluster)),
            selector: LabelSelector {
                match_labels: Some(selector(cluster, "cache")),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(cluster, "cache")),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    containers: vec![Container {
                        name: "redis".into(),
                        image: Some(
                            managed
                                .image
                                .clone()
                                .unwrap_or_else(|| DEFAULT_REDIS_IMAGE.into()),
                        ),
                        command: Some(vec!["redis-server".into()]),
                        args: Some(redis_args(max_memory)),
                        ports: Some(vec![ContainerPort {
                            name: Some("redis".into()),
                            container_port: REDIS_PORT,
                            ..Default::default()
                        }]),
                        readiness_probe: Some(tcp_probe(5)),
                        liveness_probe: Some(tcp_probe(15)),
                        resources: Some(ResourceRequirements {
                            requests: Some(BTreeMap::from([
                                ("cpu".into(), Quantity("100m".into())),
                                ("memory".into(), memory.clone()),
                            ])),
                            limits: Some(BTreeMap::from([("memory".into(), memory)])),
                            ..Default::default()
                        }),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            ..Default::default()
                        }),
                        volume_mounts: Some(vec![
                            VolumeMount {
                                name: "auth".into(),
                                mount_path: AUTH_DIR.into(),
                                read_only: Some(true),
                                ..Default::default()
                            },
                            // The image's working directory; nothing is persisted there.
                            VolumeMount {
                                name: "data".into(),
                                mount_path: "/data".into(),
                                ..Default::default()
                            },
                            VolumeMount {
                                name: "tmp".into(),
                                mount_path: "/tmp".into(),
                                ..Default::default()
                            },
                        ]),
                        ..Default::default()
                    }],
                    volumes: Some(vec![
                        Volume {
                            name: "auth".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(cache_name(cluster)),
                                items: Some(vec![KeyToPath {
                                    key: AUTH_CONF_KEY.into(),
                                    path: AUTH_CONF_KEY.into(),
                                    ..Default::default()
                                }]),
                                // Readable by the redis group only (fsGroup below).
                                default_mode: Some(0o440),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "data".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                        Volume {
                            name: "tmp".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                    ]),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(REDIS_UID),
                        run_as_group: Some(REDIS_UID),
                        fs_group: Some(REDIS_UID),
                        ..Default::default()
                    }),
                    termination_grace_period_seconds: Some(10),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn cache_service(cluster: &MemUCluster) -> Service {
    Service {
        metadata: meta(cluster, cache_name(cluster), "cache", true),
        spec: Some(ServiceSpec {
            selector: Some(selector(cluster, "cache")),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT,
                target_port: Some(IntOrString::String("redis".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memu_crds::cluster::CacheSpec;

    fn cluster(cache: CacheSpec) -> MemUCluster {
        let mut c: MemUCluster = serde_json::from_value(json!({
            "apiVersion": "memu.dev/v1alpha1",
            "kind": "MemUCluster",
            "metadata": {"name": "mem", "namespace": "team", "uid": "uid-1"},
            "spec": {"tier": "large", "cache": {}},
        }))
        .unwrap();
        c.spec.cache = Some(cache);
        c
    }

    #[test]
    fn the_workers_read_the_managed_url_or_the_external_one() {
        let managed = cluster(CacheSpec {
            managed: Some(ManagedCacheSpec::default()),
            ..Default::default()
        });
        assert_eq!(
            redis_url_secret(&managed),
            Some(SecretKeyRef {
                name: "mem-redis".into(),
                key: "url".into()
            })
        );
        let external_ref = SecretKeyRef {
            name: "ext".into(),
            key: "u".into(),
        };
        let external = cluster(CacheSpec {
            redis_url_secret: Some(external_ref.clone()),
            ..Default::default()
        });
        assert_eq!(redis_url_secret(&external), Some(external_ref));
        assert!(managed_cache(&external).is_none());
    }

    #[test]
    fn the_password_is_only_in_the_secret() {
        let c = cluster(CacheSpec {
            managed: Some(ManagedCacheSpec {
                max_memory_mib: Some(1024),
                ..Default::default()
            }),
            ..Default::default()
        });
        let secret = cache_secret(&c, "s3cretPassw0rd");
        let data = secret.string_data.unwrap();
        assert_eq!(
            data["url"],
            "redis://:s3cretPassw0rd@mem-redis.team.svc:6379/0"
        );
        assert_eq!(data["auth.conf"], "requirepass s3cretPassw0rd\n");
        let sts = cache_stateful_set(&c, managed_cache(&c).unwrap());
        let text = serde_json::to_string(&sts).unwrap();
        assert!(!text.contains("s3cretPassw0rd"));
        let container = &sts.spec.unwrap().template.spec.unwrap().containers[0];
        let args = container.args.clone().unwrap();
        assert_eq!(args[0], "/etc/memu-redis/auth.conf");
        assert!(args.windows(2).any(|w| w == ["--maxmemory", "1024mb"]));
        let limits = container.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["memory"], Quantity("1280Mi".into()));
    }
}
