//! The bootstrap admin API key of a MemUCluster. The operator generates it once into the Secret
//! `<cluster>-admin-key` (key `api-key`); every serving worker gets it as the environment
//! variable `MEMU_BOOTSTRAP_ADMIN_KEY` and installs it on start as an `admin` key of tenant
//! `system` (the worker stores only its SHA-256). Platform teams use it to create tenants and
//! their keys through the worker's admin API.
//!
//! The key is never logged, never put in an event and never in the status: only the Secret's
//! name is.
//!
//! Format (the worker's): `memu_<key id>_<secret>`, the key id 12 of `[a-z0-9]`, the secret 32
//! random bytes in unpadded base64url (43 characters).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::EventType;
use memu_crds::cluster::MemUCluster;
use rand::Rng as _;
use sha2::{Digest, Sha256};

use crate::render;

/// The worker's variable for the bootstrap admin key.
pub const ENV: &str = "MEMU_BOOTSTRAP_ADMIN_KEY";
/// The key of the Secret that holds the API key.
pub const SECRET_KEY: &str = "api-key";
const PREFIX: &str = "memu_";
const KEY_ID_LEN: usize = 12;
const SECRET_BYTES: usize = 32;

/// The key id of a cluster's bootstrap key. It is derived from the namespace and name rather
/// than drawn at random: a regenerated key (the Secret was deleted) keeps the id, and the worker
/// replaces the stored key of the same id, so the old key stops working. Key ids are public
/// (they are the token's visible part); only the secret part is random.
pub fn key_id(namespace: &str, name: &str) -> String {
    let digest = Sha256::digest(format!("memu.dev/bootstrap-admin-key\n{namespace}/{name}"));
    hex::encode(digest)[..KEY_ID_LEN].to_string()
}

/// A new key with the given id and 32 bytes from the thread's CSPRNG.
pub fn generate(key_id: &str) -> String {
    let mut secret = [0u8; SECRET_BYTES];
    rand::rng().fill(&mut secret);
    format!("{PREFIX}{key_id}_{}", URL_SAFE_NO_PAD.encode(secret))
}

/// Whether `token` has exactly the format this module generates.
pub fn is_well_formed(token: &str) -> bool {
    let Some((id, secret)) = token.strip_prefix(PREFIX).and_then(|r| r.split_once('_')) else {
        return false;
    };
    valid_key_id(id)
        && secret.len() == 43
        && URL_SAFE_NO_PAD
            .decode(secret)
            .is_ok_and(|b| b.len() == SECRET_BYTES)
}

fn valid_key_id(id: &str) -> bool {
    id.len() == KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Whether the worker accepts `token` as a bootstrap key (its own, looser check: a key put in
/// the Secret by hand need not come from [`generate`]).
fn worker_accepts(token: &str) -> bool {
    token
        .trim()
        .strip_prefix(PREFIX)
        .and_then(|r| r.split_once('_'))
        .is_some_and(|(id, secret)| valid_key_id(id) && (40..=64).contains(&secret.len()))
}

/// The API key a Secret holds (`data` as the API server returns it, or `stringData` as
/// rendered), if any.
pub fn token_of(secret: &Secret) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(SECRET_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(SECRET_KEY))
                .cloned()
        })
}

/// What a reconcile does about the admin-key Secret. `Debug` shows only the variant and the
/// Secret's name, so a logged plan cannot leak the key.
pub enum Plan {
    /// Absent: create this one, with a newly generated key.
    Create(Secret),
    /// Present: left exactly as it is. It is created once; rewriting it would lock out whoever
    /// holds the key.
    Keep(Secret),
    /// Present but its `api-key` is missing or not a memU API key: also left alone (never
    /// overwritten), but the workers refuse to start until it is fixed or deleted.
    KeepUnusable(Secret),
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (variant, secret) = match self {
            Plan::Create(s) => ("Create", s),
            Plan::Keep(s) => ("Keep", s),
            Plan::KeepUnusable(s) => ("KeepUnusable", s),
        };
        f.debug_tuple(variant)
            .field(&secret.metadata.name.as_deref().unwrap_or_default())
            .finish()
    }
}

/// Decides from the stored Secret (if any); `generate` (given the key id) is called only when
/// a Secret has to be created.
pub fn plan(
    cluster: &MemUCluster,
    existing: Option<Secret>,
    generate: impl FnOnce(&str) -> String,
) -> Plan {
    match existing {
        None => {
            let id = key_id(
                cluster.metadata.namespace.as_deref().unwrap_or("default"),
                cluster.metadata.name.as_deref().unwrap_or_default(),
            );
            Plan::Create(render::admin_key_secret(cluster, &generate(&id)))
        }
        Some(s) if token_of(&s).is_some_and(|t| worker_accepts(&t)) => Plan::Keep(s),
        Some(s) => Plan::KeepUnusable(s),
    }
}

impl Plan {
    /// The event a reconcile records for this plan (after a successful create, for `Create`).
    /// It names the Secret, never the key.
    pub fn event(&self, secret_name: &str) -> Option<(EventType, &'static str, String)> {
        match self {
            Plan::Create(_) => Some((
                EventType::Normal,
                "AdminKeyCreated",
                format!(
                    "generated a bootstrap admin API key into Secret {secret_name} (key \
                     {SECRET_KEY}); the workers install it on start"
                ),
            )),
            Plan::Keep(_) => None,
            Plan::KeepUnusable(_) => Some((
                EventType::Warning,
                "AdminKeyUnusable",
                format!(
                    "Secret {secret_name} has no memU API key (memu_<12 chars>_<secret>) under \
                     {SECRET_KEY}, so the workers cannot start; delete the Secret to have a new \
                     key generated"
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_workers_format_and_differ() {
        let id = key_id("apps", "memu");
        let a = generate(&id);
        let b = generate(&id);
        assert!(is_well_formed(&a) && is_well_formed(&b), "{}", a.len());
        assert!(worker_accepts(&a));
        assert_eq!(a.len(), "memu_".len() + 12 + 1 + 43);
        assert!(a.starts_with(&format!("memu_{id}_")));
        assert_ne!(a, b, "the secret part is random");
    }

    #[test]
    fn the_key_id_is_stable_per_cluster_and_distinct_across_clusters() {
        let id = key_id("apps", "memu");
        assert!(valid_key_id(&id));
        assert_eq!(id, key_id("apps", "memu"));
        assert_ne!(id, key_id("other", "memu"));
        assert_ne!(id, key_id("apps", "memu2"));
        // The separator keeps `a/bc` and `ab/c` apart.
        assert_ne!(key_id("a", "bc"), key_id("ab", "c"));
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good = generate(&key_id("apps", "memu"));
        assert!(is_well_formed(&good));
        let secret = &good[good.len() - 43..];
        for bad in [
            String::new(),
            "memu_".into(),
            format!("memu_ABCDEFGHIJKL_{secret}"),
            format!("memu_abc_{secret}"),
            format!("mem_abcdefghijkl_{secret}"),
            format!("memu_abcdefghijkl_{}", &secret[..42]),
            format!("memu_abcdefghijkl_{}=", &secret[..42]),
            format!("memu_abcdefghijkl_{}+", &secret[..42]),
        ] {
            assert!(!is_well_formed(&bad), "{bad}");
        }
        assert!(!worker_accepts("memu_abcdefghijkl_short"));
        assert!(!worker_accepts("not a key"));
    }
}
