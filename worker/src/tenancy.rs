//! Tenants, API keys, the audit log and the cost report: the records behind authentication and
//! per-tenant limits. Keys are random, shown once, and stored only as a SHA-256 digest next to a
//! short public id used to find them.

use std::collections::BTreeSet;
use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::Rng as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;
use utoipa::ToSchema;
use uuid::Uuid;

/// Tenant created by the migrations; rows written before tenancy belong to it.
pub const DEFAULT_TENANT: &str = "default";
/// Tenant of the bootstrap admin key (platform operations).
pub const SYSTEM_TENANT: &str = "system";
const KEY_PREFIX: &str = "memu";

/// What a key may do. Data routes need `read` or `write`; tenant and key management, the audit
/// log and the cost report need `admin`. Scopes do not imply each other.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ApiScope {
    Read,
    Write,
    Admin,
}

impl ApiScope {
    pub fn as_str(self) -> &'static str {
        match self {
            ApiScope::Read => "read",
            ApiScope::Write => "write",
            ApiScope::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim() {
            "read" => Some(ApiScope::Read),
            "write" => Some(ApiScope::Write),
            "admin" => Some(ApiScope::Admin),
            _ => None,
        }
    }
}

impl fmt::Display for ApiScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Comma-separated scopes as stored (`read,write`).
pub fn scopes_to_text(scopes: &BTreeSet<ApiScope>) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses stored or typed scopes; the error names the unknown one.
pub fn parse_scopes(text: &str) -> Result<BTreeSet<ApiScope>, String> {
    let mut scopes = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        scopes.insert(ApiScope::parse(part).ok_or_else(|| {
            format!(
                "unknown scope `{}` (expected read, write, admin)",
                part.trim()
            )
        })?);
    }
    if scopes.is_empty() {
        return Err("at least one scope is needed (read, write, admin)".into());
    }
    Ok(scopes)
}

/// Per-tenant limits; `None` falls back to the worker's configured default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    /// Requests per second (token bucket, burst = 2 s worth).
    pub rate_limit_rps: Option<f64>,
    /// Memorize jobs per UTC day.
    pub memorize_per_day: Option<u64>,
    /// LLM tokens (prompt + completion) per UTC day.
    pub tokens_per_day: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct Tenant {
    pub tenant_id: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub limits: TenantLimits,
}

/// A stored key: everything but the secret, which exists only as its digest.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub tenant_id: String,
    pub name: String,
    pub scopes: BTreeSet<ApiScope>,
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKeyRecord {
    /// Usable now: not revoked, not expired.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| at > now)
    }
}

/// A freshly generated key: `secret` is the whole bearer token, shown once.
pub struct NewKey {
    pub key_id: String,
    pub secret: secrecy::SecretString,
    pub secret_hash: String,
}

/// Generates a key `memu_<key id>_<secret>`: 12 lowercase alphanumerics of public id, 32
/// random bytes of secret (base64url).
pub fn generate_key() -> NewKey {
    let mut rng = rand::rng();
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let key_id: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    let mut secret = [0u8; 32];
    rng.fill(&mut secret);
    let token = format!(
        "{KEY_PREFIX}_{key_id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    NewKey {
        secret_hash: hash_key(&token),
        key_id,
        secret: token.into(),
    }
}

/// SHA-256 of the whole token: keys carry 256 random bits, so a fast digest is enough (no
/// password stretching needed) and lookups stay cheap.
pub fn hash_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The public id of a token of our format, or None when it is not one.
pub fn key_id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(KEY_PREFIX)?.strip_prefix('_')?;
    let (key_id, secret) = rest.split_once('_')?;
    let well_formed = key_id.len() == 12
        && key_id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && (40..=64).contains(&secret.len());
    well_formed.then_some(key_id)
}

/// Whether `token` is the key whose digest is stored (constant time in the digest).
pub fn key_matches(token: &str, record: &ApiKeyRecord) -> bool {
    hash_key(token)
        .as_bytes()
        .ct_eq(record.secret_hash.as_bytes())
        .into()
}

/// Tenant ids: 1–63 of lowercase letters, digits and `-`, starting with a letter or digit
/// (they appear in metrics labels, Secret names and URLs).
pub fn validate_tenant_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    match ok {
        true => Ok(()),
        false => Err(
            "tenant_id must be 1-63 lowercase letters, digits or '-', not starting with '-'".into(),
        ),
    }
}

/// One authenticated request, appended to the audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub id: Uuid,
    pub tenant_id: String,
    pub at: DateTime<Utc>,
    pub key_id: Option<String>,
    pub method: String,
    /// The route template (`/api/v1/users/{user_id}/items`), never the raw path or query.
    pub route: String,
    pub target_user: Option<String>,
    pub status: u16,
}

/// LLM tokens and cost of one tenant, user, provider and model on one UTC day.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CostRow {
    pub day: String,
    pub tenant_id: String,
    pub user_id: String,
    pub provider: String,
    pub model: String,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

/// What a tenant used today (UTC), for its daily quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DailyUsage {
    pub memorize_jobs: u64,
    pub tokens: u64,
}

/// Pseudonym that replaces an erased user's id in the audit log: the trail stays countable, the
/// id is gone.
pub fn erased_user_pseudonym(tenant_id: &str, user_id: &str) -> String {
    let digest = Sha256::digest(format!("{tenant_id}\u{0}{user_id}").as_bytes());
    format!("erased:{}", &hex::encode(digest)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;

    #[test]
    fn generated_keys_parse_and_match_only_themselves() {
        let key = generate_key();
        let token = key.secret.expose_secret();
        assert_eq!(key_id_of(token), Some(key.key_id.as_str()));
        let record = ApiKeyRecord {
            key_id: key.key_id.clone(),
            tenant_id: "t".into(),
            name: String::new(),
            scopes: parse_scopes("read").unwrap(),
            secret_hash: key.secret_hash.clone(),
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        assert!(key_matches(token, &record));
        let mut forged = token.to_string();
        forged.pop();
        forged.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert!(!key_matches(&forged, &record));
        assert_ne!(generate_key().key_id, key.key_id);
    }

    #[test]
    fn malformed_tokens_have_no_key_id() {
        for bad in [
            "",
            "memu_",
            "memu_short_x",
            "other_abcdefghijkl_0123456789012345678901234567890123456789",
            "memu_ABCDEFGHIJKL_0123456789012345678901234567890123456789",
        ] {
            assert_eq!(key_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn scopes_parse_and_name_the_unknown_one() {
        let s = parse_scopes("write, read").unwrap();
        assert_eq!(scopes_to_text(&s), "read,write");
        assert!(parse_scopes("read,root").unwrap_err().contains("root"));
        assert!(parse_scopes("").is_err());
    }

    #[test]
    fn expiry_and_revocation_end_a_key() {
        let now = Utc::now();
        let mut record = ApiKeyRecord {
            key_id: "k".into(),
            tenant_id: "t".into(),
            name: String::new(),
            scopes: BTreeSet::new(),
            secret_hash: String::new(),
            created_at: now,
            expires_at: Some(now + chrono::Duration::hours(1)),
            revoked_at: None,
            last_used_at: None,
        };
        assert!(record.is_active(now));
        assert!(!record.is_active(now + chrono::Duration::hours(2)));
        record.revoked_at = Some(now);
        assert!(!record.is_active(now));
    }

    #[test]
    fn tenant_ids_are_label_safe() {
        assert!(validate_tenant_id("acme-01").is_ok());
        for bad in ["", "-x", "Acme", "a/b", &"x".repeat(64)] {
            assert!(validate_tenant_id(bad).is_err(), "{bad}");
        }
    }
}
