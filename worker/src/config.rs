//! Loading the worker configuration: YAML file, then `MEMU_*` environment variables (env wins),
//! then validation. Every error names the key (and the variable or file it came from).
//!
//! Environment variables map to keys by lower-casing and splitting on `__`:
//! `MEMU_SERVER__LISTEN=0.0.0.0:8080` sets `server.listen`. A value is taken as a string where the
//! schema expects one (so an API key `007` stays `007`), and parsed as YAML otherwise
//! (`MEMU_MEMORY__MEMORY_TYPES=[profile, event]`).

use std::path::Path;

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde_json::{Map, Value};

pub use memu_crds::worker::WorkerConfig;

/// The string values of every `*_env` key: names of variables that hold secrets.
fn collect_env_names(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match v {
                    Value::String(name) if key.ends_with("_env") => out.push(name.clone()),
                    other => collect_env_names(other, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_env_names(v, out)),
        _ => {}
    }
}

/// Variables with the prefix that are not configuration keys: the configuration file, and the
/// client's key and base URL (read by `memu-worker mcp` and by memU's SDK in the same shell).
const RESERVED: &[&str] = &["MEMU_CONFIG", "MEMU_API_KEY", "MEMU_API_BASE_URL"];
const PREFIX: &str = "MEMU_";

/// Loads the configuration from an optional YAML file and the process environment.
pub fn load(file: Option<&Path>) -> anyhow::Result<WorkerConfig> {
    load_from(file, std::env::vars())
}

/// Like [`load`], with the environment given (tests).
pub fn load_from(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<WorkerConfig> {
    let file_value = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let parsed: Value = serde_norway::from_str(&text)
                .with_context(|| format!("config file {} is not valid YAML", path.display()))?;
            match parsed {
                Value::Null => Value::Object(Map::new()),
                Value::Object(_) => parsed,
                _ => bail!(
                    "config file {} must hold a mapping at the top level",
                    path.display()
                ),
            }
        }
        None => Value::Object(Map::new()),
    };
    // Defaults, then the file, then the environment: a partial profile such as
    // `providers.local.model_dir` lands on top of the built-in one instead of replacing it.
    let mut value = serde_json::to_value(WorkerConfig::default())?;
    merge(&mut value, file_value);
    let schema = serde_json::to_value(schemars::schema_for!(WorkerConfig))?;
    let env: Vec<(String, String)> = env.into_iter().collect();
    // Variables the configuration names as the source of a secret (`*_env` keys, such as
    // `auth.bootstrap_admin_key_env` or a profile's `api_key_env`) hold that secret, not
    // configuration, whatever their prefix.
    let mut secret_sources = Vec::new();
    collect_env_names(&value, &mut secret_sources);
    secret_sources.extend(
        env.iter()
            .filter(|(k, _)| k.starts_with(PREFIX) && k.ends_with("_ENV"))
            .map(|(_, v)| v.clone()),
    );
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(PREFIX) && !RESERVED.contains(&k.as_str()) && !secret_sources.contains(k)
        })
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let key = path.join(".");
        let expects_string = schema_expects_string(&schema, &schema, &path).with_context(|| {
            format!("environment variable {name}: no configuration key `{key}`")
        })?;
        let parsed = if expects_string {
            Value::String(raw)
        } else {
            serde_norway::from_str(&raw).with_context(|| {
                format!("environment variable {name}: `{raw}` is not a valid value for `{key}`")
            })?
        };
        set_path(&mut value, &path, parsed);
    }
    let config: WorkerConfig = serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        anyhow::anyhow!("invalid configuration at `{key}`: {}", e.inner())
    })?;
    config.validate()?;
    Ok(config)
}

/// Merges `over` into `base`: mappings key by key, anything else replaced.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

/// Whether the schema at `path` accepts a string (None when the key does not exist).
fn schema_expects_string(root: &Value, node: &Value, path: &[String]) -> Option<bool> {
    let node = resolve(root, node);
    let Some((head, rest)) = path.split_first() else {
        return Some(accepts_string(root, node));
    };
    if let Some(variants) = node
        .get("anyOf")
        .or_else(|| node.get("oneOf"))
        .and_then(Value::as_array)
    {
        return variants
            .iter()
            .find_map(|v| schema_expects_string(root, v, path));
    }
    let child = node
        .get("properties")
        .and_then(|p| p.get(head))
        .or_else(|| node.get("additionalProperties").filter(|a| a.is_object()))?;
    schema_expects_string(root, child, rest)
}

fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(reference) => reference
            .strip_prefix("#/")
            .and_then(|p| p.split('/').try_fold(root, |n, seg| n.get(seg)))
            .map(|target| resolve(root, target))
            .unwrap_or(node),
        None => node,
    }
}

fn accepts_string(root: &Value, node: &Value) -> bool {
    let node = resolve(root, node);
    match node.get("type") {
        Some(Value::String(t)) => t == "string",
        Some(Value::Array(types)) => types.iter().any(|t| t == "string"),
        _ => node
            .get("anyOf")
            .or_else(|| node.get("oneOf"))
            .and_then(Value::as_array)
            .is_some_and(|vs| {
                vs.iter().all(|v| {
                    let v = resolve(root, v);
                    accepts_string(root, v) || v.get("type") == Some(&Value::String("null".into()))
                }) && vs.iter().any(|v| accepts_string(root, v))
            }),
    }
}

fn set_path(value: &mut Value, path: &[String], leaf: Value) {
    let mut node = value;
    for seg in &path[..path.len() - 1] {
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        node = node
            .as_object_mut()
            .expect("object")
            .entry(seg.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !node.is_object() {
        *node = Value::Object(Map::new());
    }
    node.as_object_mut()
        .expect("object")
        .insert(path[path.len() - 1].clone(), leaf);
}

/// Reads a secret from an environment variable, else from a file (a mounted Secret).
/// The value is never logged; callers wrap it or use it at once.
pub fn read_secret(env_name: &str, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    if !env_name.is_empty()
        && let Ok(value) = std::env::var(env_name)
        && !value.trim().is_empty()
    {
        return Ok(Some(value.trim().to_string()));
    }
    match file {
        Some(path) => {
            let value = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read secret file {}", path.display()))?;
            Ok(Some(value.trim().to_string()))
        }
        None => Ok(None),
    }
}

/// [`read_secret`] wrapped so it cannot be printed by accident.
pub fn read_secret_string(
    env_name: &str,
    file: Option<&Path>,
) -> anyhow::Result<Option<SecretString>> {
    Ok(read_secret(env_name, file)?.map(SecretString::from))
}

#[cfg(test)]
mod tests {
    use super::*;
    use memu_crds::worker::{DatabaseBackend, MemoryType, Role};

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file_and_keeps_strings_as_strings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("worker.yaml");
        std::fs::write(
            &file,
            "role: api\nserver:\n  listen: 127.0.0.1:9000\nproviders:\n  openai:\n    preset: openai\n    chat_model: gpt-4o\n",
        )
        .unwrap();
        let config = load_from(
            Some(&file),
            env(&[
                ("MEMU_SERVER__LISTEN", "0.0.0.0:8081"),
                ("MEMU_SERVER__MAX_BODY_BYTES", "2048"),
                ("MEMU_PROVIDERS__OPENAI__CHAT_MODEL", "007"),
                ("MEMU_DATABASE__BACKEND", "sqlite"),
                ("MEMU_MEMORY__MEMORY_TYPES", "[profile, skill]"),
                ("MEMU_CONFIG", "ignored"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.role, Role::Api);
        assert_eq!(config.server.listen, "0.0.0.0:8081");
        assert_eq!(config.server.max_body_bytes, 2048);
        assert_eq!(
            config.providers["openai"].chat_model.as_deref(),
            Some("007")
        );
        assert_eq!(config.database.backend, DatabaseBackend::Sqlite);
        assert_eq!(
            config.memory.memory_types,
            vec![MemoryType::Profile, MemoryType::Skill]
        );
        // The built-in local profile stays available next to the file's profiles.
        assert!(config.providers.contains_key("local"));
    }

    #[test]
    fn errors_name_the_key() {
        let err = load_from(None, env(&[("MEMU_SERVER__MAX_BODY_BYTES", "lots")])).unwrap_err();
        assert!(
            format!("{err:#}").contains("server.max_body_bytes"),
            "{err:#}"
        );

        let err = load_from(None, env(&[("MEMU_SERVER__LISTN", "x")])).unwrap_err();
        assert!(format!("{err:#}").contains("MEMU_SERVER__LISTN"), "{err:#}");

        // Secrets the configuration points at are not configuration, even with the prefix:
        // the bootstrap admin key (default name) and a provider key named in the file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("profiles.yaml");
        std::fs::write(
            &file,
            "providers:\n  llm:\n    preset: openai\n    api_key_env: MEMU_LLM_API_KEY\n",
        )
        .unwrap();
        let config = load_from(
            Some(&file),
            env(&[
                ("MEMU_BOOTSTRAP_ADMIN_KEY", "memu_x_y"),
                ("MEMU_LLM_API_KEY", "sk-secret"),
                ("MEMU_CACHE__REDIS_URL_ENV", "MEMU_REDIS"),
                ("MEMU_REDIS", "redis://r"),
            ]),
        )
        .unwrap();
        assert_eq!(config.cache.redis_url_env, "MEMU_REDIS");
        let err = load_from(None, env(&[("MEMU_LLM_API_KEY", "sk-secret")])).unwrap_err();
        assert!(format!("{err:#}").contains("MEMU_LLM_API_KEY"), "{err:#}");
        assert!(!format!("{err:#}").contains("sk-secret"), "{err:#}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, "vector:\n  dimension: -3\n").unwrap();
        let err = load_from(Some(&file), env(&[])).unwrap_err();
        assert!(format!("{err:#}").contains("vector.dimension"), "{err:#}");

        std::fs::write(&file, "memory:\n  memory_types: [profile, gossip]\n").unwrap();
        let err = load_from(Some(&file), env(&[])).unwrap_err();
        assert!(
            format!("{err:#}").contains("memory.memory_types"),
            "{err:#}"
        );

        let err = load_from(None, env(&[("MEMU_SERVER__LISTEN", "nowhere")])).unwrap_err();
        assert!(format!("{err:#}").contains("server.listen"), "{err:#}");
    }

    #[test]
    fn partial_profiles_land_on_the_built_in_one() {
        let config = load_from(
            None,
            env(&[("MEMU_PROVIDERS__LOCAL__MODEL_DIR", "/models/minilm")]),
        )
        .unwrap();
        let local = &config.providers["local"];
        assert_eq!(local.preset, memu_crds::worker::ProviderPreset::Local);
        assert_eq!(
            local.model_dir.as_deref(),
            Some(std::path::Path::new("/models/minilm"))
        );
    }

    #[test]
    fn secrets_come_from_env_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-from-file\n").unwrap();
        assert_eq!(
            read_secret("MEMU_TEST_SURELY_UNSET_VAR", Some(&file))
                .unwrap()
                .as_deref(),
            Some("sk-from-file")
        );
        assert_eq!(
            read_secret("MEMU_TEST_SURELY_UNSET_VAR", None).unwrap(),
            None
        );
    }
}
