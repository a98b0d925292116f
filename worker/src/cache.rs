//! The cache layer: Redis when configured (shared by every replica), else one process's memory.
//! A cache never fails a request: errors are logged and count as misses.
//!
//! Retrieve results are keyed by the user's *generation*, a counter every write of that user
//! bumps, so a write invalidates all of the user's cached results at once, on every replica
//! sharing the Redis.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::AsyncCommands;

#[async_trait]
pub trait Cache: Send + Sync {
    /// `redis` or `memory`.
    fn kind(&self) -> &'static str;
    async fn get(&self, key: &str) -> Option<Vec<u8>>;
    async fn set(&self, key: &str, value: &[u8], ttl: Duration);
    /// The current value of a counter (0 when never bumped).
    async fn counter(&self, key: &str) -> u64;
    async fn bump(&self, key: &str);
    /// Takes one request from the token bucket `key` (`rate` per second, `burst` at once):
    /// `Err(wait)` when empty. Redis makes the bucket shared by every replica.
    async fn take_token(&self, key: &str, rate: f64, burst: f64) -> Result<(), Duration>;
}

/// The bucket as GCRA: `tat` is the theoretical arrival time of the next request. Returns the
/// new `tat`, or how long to wait (all in microseconds).
fn gcra(tat: Option<f64>, now: f64, rate: f64, burst: f64) -> Result<f64, f64> {
    let interval = 1e6 / rate;
    let tolerance = (burst - 1.0).max(0.0) * interval;
    let tat = tat.unwrap_or(now).max(now);
    match tat - now > tolerance {
        true => Err(tat - now - tolerance),
        false => Ok(tat + interval),
    }
}

/// GCRA in Redis, timed by the Redis server's clock so replicas' clocks do not matter.
const TAKE_TOKEN_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then return math.ceil(tat - now - tolerance) end
local new = math.floor(tat + interval)
redis.call('SET', KEYS[1], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000)
return 0
";

/// One process's cache: an LRU with expiry, and counters.
pub struct MemoryCache {
    entries: Mutex<lru::LruCache<String, (Instant, Vec<u8>)>>,
    counters: Mutex<HashMap<String, u64>>,
    /// Token buckets: next theoretical arrival, in microseconds since `epoch`.
    buckets: Mutex<HashMap<String, f64>>,
    epoch: Instant,
}

impl MemoryCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(capacity.max(1)).expect("nonzero"),
            )),
            counters: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut entries = self.entries.lock().expect("cache lock");
        match entries.get(key) {
            Some((expires, value)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.pop(key);
                None
            }
            None => None,
        }
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) {
        self.entries
            .lock()
            .expect("cache lock")
            .put(key.to_string(), (Instant::now() + ttl, value.to_vec()));
    }

    async fn counter(&self, key: &str) -> u64 {
        *self
            .counters
            .lock()
            .expect("cache lock")
            .get(key)
            .unwrap_or(&0)
    }

    async fn bump(&self, key: &str) {
        *self
            .counters
            .lock()
            .expect("cache lock")
            .entry(key.to_string())
            .or_default() += 1;
    }

    async fn take_token(&self, key: &str, rate: f64, burst: f64) -> Result<(), Duration> {
        let now = self.epoch.elapsed().as_secs_f64() * 1e6;
        let mut buckets = self.buckets.lock().expect("cache lock");
        match gcra(buckets.get(key).copied(), now, rate, burst) {
            Ok(tat) => {
                buckets.insert(key.to_string(), tat);
                Ok(())
            }
            Err(wait) => Err(Duration::from_micros(wait.ceil() as u64)),
        }
    }
}

/// Redis, through a connection manager that reconnects by itself.
pub struct RedisCache {
    connection: redis::aio::ConnectionManager,
}

impl RedisCache {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("cache: the Redis URL is not valid: {e}"))?;
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            redis::aio::ConnectionManager::new(client),
        )
        .await
        .map_err(|_| anyhow::anyhow!("cache: Redis did not answer within 10 s"))?
        .map_err(|e| anyhow::anyhow!("cache: cannot connect to Redis: {e}"))?;
        Ok(Self { connection })
    }
}

fn warn(op: &str, e: redis::RedisError) {
    tracing::warn!(op, error = %e, "Redis cache error (treated as a miss)");
}

#[async_trait]
impl Cache for RedisCache {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut c = self.connection.clone();
        c.get::<_, Option<Vec<u8>>>(key)
            .await
            .map_err(|e| warn("get", e))
            .ok()
            .flatten()
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) {
        let mut c = self.connection.clone();
        let _ = c
            .set_ex::<_, _, ()>(key, value, ttl.as_secs().max(1))
            .await
            .map_err(|e| warn("set", e));
    }

    async fn counter(&self, key: &str) -> u64 {
        let mut c = self.connection.clone();
        c.get::<_, Option<u64>>(key)
            .await
            .map_err(|e| warn("counter", e))
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    async fn bump(&self, key: &str) {
        let mut c = self.connection.clone();
        let _ = c
            .incr::<_, _, u64>(key, 1)
            .await
            .map_err(|e| warn("bump", e));
    }

    async fn take_token(&self, key: &str, rate: f64, burst: f64) -> Result<(), Duration> {
        let interval = 1e6 / rate;
        let tolerance = (burst - 1.0).max(0.0) * interval;
        let mut c = self.connection.clone();
        let wait: Result<i64, _> = redis::Script::new(TAKE_TOKEN_SCRIPT)
            .key(key)
            .arg(interval)
            .arg(tolerance)
            .invoke_async(&mut c)
            .await;
        match wait {
            Ok(0) => Ok(()),
            Ok(micros) => Err(Duration::from_micros(micros.max(1) as u64)),
            // Like every cache error: the request goes on (an outage must not stop the API).
            Err(e) => {
                warn("take_token", e);
                Ok(())
            }
        }
    }
}

/// Key of a user's generation counter.
pub fn generation_key(user: crate::model::UserRef<'_>) -> String {
    // Tenant ids cannot contain ':' so the key is unambiguous.
    format!("memu:gen:{}:{}", user.tenant_id, user.user_id)
}

/// f32 vectors as little-endian bytes, for the embedding cache.
pub fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn decode_vector(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_cache_expires_and_counts() {
        let cache = MemoryCache::new(8);
        cache.set("a", b"1", Duration::from_secs(60)).await;
        assert_eq!(cache.get("a").await.as_deref(), Some(&b"1"[..]));
        cache.set("b", b"2", Duration::ZERO).await;
        assert_eq!(cache.get("b").await, None);
        assert_eq!(cache.counter("g").await, 0);
        cache.bump("g").await;
        cache.bump("g").await;
        assert_eq!(cache.counter("g").await, 2);
        // 1 per second with a burst of 2: two now, the third waits about a second.
        assert!(cache.take_token("t", 1.0, 2.0).await.is_ok());
        assert!(cache.take_token("t", 1.0, 2.0).await.is_ok());
        let wait = cache.take_token("t", 1.0, 2.0).await.unwrap_err();
        assert!(wait > Duration::from_millis(500) && wait <= Duration::from_secs(1));
        assert!(cache.take_token("other", 1.0, 2.0).await.is_ok());
        let v = vec![0.5f32, -1.25, 3.0];
        assert_eq!(decode_vector(&encode_vector(&v)).unwrap(), v);
        assert!(decode_vector(&[1, 2, 3]).is_none());
    }
}
