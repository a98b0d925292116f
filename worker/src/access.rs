//! Access control: resolves a bearer key to its tenant and scopes, enforces per-tenant rate
//! limits and daily quotas, and manages tenants and keys for the admin API and CLI.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};

use memu_crds::worker::{AuthConfig, AuthMode};

use crate::cache::Cache;
use crate::store::{MemoryStore, StoreError};
use crate::tenancy::{
    ApiKeyRecord, ApiScope, DEFAULT_TENANT, SYSTEM_TENANT, Tenant, TenantLimits, generate_key,
    hash_key, key_id_of, key_matches, validate_tenant_id,
};

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// No usable key: missing, malformed, unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("tenant {0} not found")]
    UnknownTenant(String),
    #[error("this key lacks the `{0}` scope")]
    Forbidden(ApiScope),
    #[error("{what}; retry in {retry_after_secs} s")]
    Limited {
        what: &'static str,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who is calling: the tenant every read and write is confined to.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub tenant_id: String,
    /// None when authentication is disabled.
    pub key_id: Option<String>,
    pub scopes: BTreeSet<ApiScope>,
    /// The tenant's own limits, read with the key (defaults fill what is unset).
    pub limits: TenantLimits,
}

impl Principal {
    pub fn require(&self, scope: ApiScope) -> Result<(), AccessError> {
        match self.scopes.contains(&scope) {
            true => Ok(()),
            false => Err(AccessError::Forbidden(scope)),
        }
    }
}

/// A key just created: the token is shown once and never stored.
pub struct IssuedKey {
    pub record: ApiKeyRecord,
    pub token: SecretString,
}

struct CachedKey {
    record: ApiKeyRecord,
    limits: TenantLimits,
    fetched: Instant,
}

pub struct Access {
    store: Arc<dyn MemoryStore>,
    config: AuthConfig,
    keys: Mutex<HashMap<String, CachedKey>>,
    /// Holds the tenants' token buckets: Redis (shared by the replicas) or this process.
    limiter: Arc<dyn Cache>,
}

/// Start of the current UTC day, and seconds until the next.
fn utc_day() -> (DateTime<Utc>, u64) {
    let now = Utc::now();
    let start = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let left = (start + chrono::Duration::days(1) - now)
        .num_seconds()
        .max(1) as u64;
    (start, left)
}

impl Access {
    pub fn new(store: Arc<dyn MemoryStore>, config: AuthConfig, limiter: Arc<dyn Cache>) -> Self {
        Self {
            store,
            config,
            keys: Mutex::new(HashMap::new()),
            limiter,
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.mode == AuthMode::ApiKeys
    }

    /// The principal of a bearer token (or of every request, when authentication is off).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, AccessError> {
        if !self.enabled() {
            return Ok(Principal {
                tenant_id: DEFAULT_TENANT.into(),
                key_id: None,
                scopes: [ApiScope::Read, ApiScope::Write, ApiScope::Admin].into(),
                limits: TenantLimits::default(),
            });
        }
        let (record, limits) = self.verified_key(bearer).await?;
        Ok(Principal {
            tenant_id: record.tenant_id,
            key_id: Some(record.key_id),
            scopes: record.scopes,
            limits,
        })
    }

    async fn verified_key(
        &self,
        bearer: Option<&str>,
    ) -> Result<(ApiKeyRecord, TenantLimits), AccessError> {
        let token = bearer.ok_or(AccessError::Unauthorized(
            "missing `Authorization: Bearer <api key>` header",
        ))?;
        let key_id = key_id_of(token).ok_or(AccessError::Unauthorized(
            "the bearer token is not a memU API key",
        ))?;
        let ttl = Duration::from_secs(self.config.key_cache_secs);
        let cached = self
            .keys
            .lock()
            .expect("key cache lock")
            .get(key_id)
            .filter(|c| c.fetched.elapsed() < ttl)
            .map(|c| (c.record.clone(), c.limits.clone()));
        let (record, limits) = match cached {
            Some(hit) => hit,
            None => {
                let record = self
                    .store
                    .find_api_key(key_id)
                    .await?
                    .ok_or(AccessError::Unauthorized("unknown API key"))?;
                let limits = self
                    .store
                    .get_tenant(&record.tenant_id)
                    .await?
                    .map(|t| t.limits)
                    .unwrap_or_default();
                if record
                    .last_used_at
                    .is_none_or(|at| Utc::now() - at > chrono::Duration::minutes(1))
                {
                    // Coarse last-use stamp: at most one write a minute per key.
                    self.store.touch_api_key(key_id, Utc::now()).await?;
                }
                self.keys.lock().expect("key cache lock").insert(
                    key_id.to_string(),
                    CachedKey {
                        record: record.clone(),
                        limits: limits.clone(),
                        fetched: Instant::now(),
                    },
                );
                (record, limits)
            }
        };
        if !key_matches(token, &record) {
            return Err(AccessError::Unauthorized("unknown API key"));
        }
        if !record.is_active(Utc::now()) {
            return Err(AccessError::Unauthorized(
                "this API key is revoked or expired",
            ));
        }
        Ok((record, limits))
    }

    /// Takes one request from the tenant's bucket (burst = 2 s of the rate).
    pub async fn admit(&self, principal: &Principal) -> Result<(), AccessError> {
        let rate = principal
            .limits
            .rate_limit_rps
            .unwrap_or(self.config.default_rate_limit_rps);
        if rate <= 0.0 {
            return Ok(());
        }
        let burst = (rate * 2.0).max(1.0);
        let key = format!("memu:rate:{}", principal.tenant_id);
        self.limiter
            .take_token(&key, rate, burst)
            .await
            .map_err(|wait| AccessError::Limited {
                what: "request rate limit of the tenant reached",
                retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
            })
    }

    /// Refuses a new memorize job when the tenant used up today's jobs or LLM tokens.
    pub async fn check_daily_quota(&self, principal: &Principal) -> Result<(), AccessError> {
        let limits = &principal.limits;
        let jobs = limits
            .memorize_per_day
            .unwrap_or(self.config.default_memorize_per_day);
        let tokens = limits
            .tokens_per_day
            .unwrap_or(self.config.default_tokens_per_day);
        if jobs == 0 && tokens == 0 {
            return Ok(());
        }
        let (today, left) = utc_day();
        let used = self
            .store
            .tenant_usage_since(&principal.tenant_id, today)
            .await?;
        if jobs > 0 && used.memorize_jobs >= jobs {
            return Err(AccessError::Limited {
                what: "daily memorize quota of the tenant used up",
                retry_after_secs: left,
            });
        }
        if tokens > 0 && used.tokens >= tokens {
            return Err(AccessError::Limited {
                what: "daily LLM token quota of the tenant used up",
                retry_after_secs: left,
            });
        }
        Ok(())
    }

    /// Forgets cached keys so a revocation or limit change here applies at once.
    fn forget_cached(&self) {
        self.keys.lock().expect("key cache lock").clear();
    }

    pub async fn create_tenant(
        &self,
        tenant_id: &str,
        name: &str,
        limits: TenantLimits,
    ) -> Result<Tenant, AccessError> {
        validate_tenant_id(tenant_id).map_err(StoreError::Invalid)?;
        let tenant = Tenant {
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            created_at: Utc::now(),
            limits,
        };
        self.store.create_tenant(&tenant).await?;
        Ok(tenant)
    }

    pub async fn set_limits(
        &self,
        tenant_id: &str,
        limits: &TenantLimits,
    ) -> Result<Option<Tenant>, AccessError> {
        let tenant = self.store.set_tenant_limits(tenant_id, limits).await?;
        self.forget_cached();
        Ok(tenant)
    }

    /// Creates a key of an existing tenant; the token is in the answer only.
    pub async fn issue_key(
        &self,
        tenant_id: &str,
        name: &str,
        scopes: BTreeSet<ApiScope>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<IssuedKey, AccessError> {
        if self.store.get_tenant(tenant_id).await?.is_none() {
            return Err(AccessError::UnknownTenant(tenant_id.to_string()));
        }
        let key = generate_key();
        let record = ApiKeyRecord {
            key_id: key.key_id,
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            scopes,
            secret_hash: key.secret_hash,
            created_at: Utc::now(),
            expires_at,
            revoked_at: None,
            last_used_at: None,
        };
        self.store.insert_api_key(&record, false).await?;
        Ok(IssuedKey {
            record,
            token: key.secret,
        })
    }

    pub async fn revoke_key(&self, tenant_id: &str, key_id: &str) -> Result<bool, AccessError> {
        let done = self.store.revoke_api_key(tenant_id, key_id).await?;
        self.forget_cached();
        Ok(done)
    }

    /// Installs the configured bootstrap admin key (tenant `system`, scope `admin`); a key of the
    /// same id is replaced, so rotating the Secret rotates the key.
    pub async fn install_bootstrap_key(&self) -> anyhow::Result<bool> {
        let Some(token) = crate::config::read_secret(
            &self.config.bootstrap_admin_key_env,
            self.config.bootstrap_admin_key_file.as_deref(),
        )?
        else {
            return Ok(false);
        };
        let token = SecretString::from(token.trim().to_string());
        let Some(key_id) = key_id_of(token.expose_secret()) else {
            anyhow::bail!(
                "the bootstrap admin key in {} is not a memU API key (memu_<12 chars>_<secret>)",
                self.config.bootstrap_admin_key_env
            );
        };
        if self.store.get_tenant(SYSTEM_TENANT).await?.is_none() {
            match self
                .create_tenant(
                    SYSTEM_TENANT,
                    "platform administration",
                    TenantLimits::default(),
                )
                .await
            {
                Ok(_) | Err(AccessError::Store(StoreError::Duplicate(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let record = ApiKeyRecord {
            key_id: key_id.to_string(),
            tenant_id: SYSTEM_TENANT.into(),
            name: "bootstrap admin".into(),
            scopes: [ApiScope::Admin].into(),
            secret_hash: hash_key(token.expose_secret()),
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
        };
        self.store.insert_api_key(&record, true).await?;
        Ok(true)
    }
}
