//! In-process exact vector search for the embedded store.
//!
//! Each user's vectors live in one contiguous `Vec<f32>` so a search is a linear scan of dot
//! products that the compiler vectorises, with no per-row decoding. Users are loaded lazily from
//! the database and evicted least-recently-used. Updates are idempotent by item id, so a write
//! that races a load can never duplicate or lose a row (see `UserIndexes::entry`).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use tokio::sync::RwLock;
use uuid::Uuid;

use crate::model::{ItemFilter, MemoryType};

/// What a filter needs to know of a row, kept beside the vector.
#[derive(Clone, Debug, PartialEq)]
pub struct RowMeta {
    pub agent_id: Arc<str>,
    pub memory_type: MemoryType,
    /// `happened_at`, else `created_at`, in microseconds.
    pub at_micros: i64,
}

impl RowMeta {
    fn matches(&self, filter: &ItemFilter) -> bool {
        if let Some(agent) = &filter.agent_id
            && &*self.agent_id != agent.as_str()
        {
            return false;
        }
        if !filter.memory_types.is_empty() && !filter.memory_types.contains(&self.memory_type) {
            return false;
        }
        filter
            .since
            .is_none_or(|s| self.at_micros >= s.timestamp_micros())
            && filter
                .until
                .is_none_or(|u| self.at_micros < u.timestamp_micros())
    }
}

#[derive(Debug)]
pub struct UserVectors {
    dim: usize,
    loaded: bool,
    ids: Vec<Uuid>,
    meta: Vec<RowMeta>,
    data: Vec<f32>,
    position: HashMap<Uuid, usize>,
}

impl UserVectors {
    fn new(dim: usize) -> Self {
        Self {
            dim,
            loaded: false,
            ids: Vec::new(),
            meta: Vec::new(),
            data: Vec::new(),
            position: HashMap::new(),
        }
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn mark_loaded(&mut self) {
        self.loaded = true;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }

    /// Inserts or replaces the row of `id`.
    pub fn upsert(&mut self, id: Uuid, meta: RowMeta, vector: &[f32]) {
        debug_assert_eq!(vector.len(), self.dim);
        match self.position.get(&id) {
            Some(&pos) => {
                self.meta[pos] = meta;
                self.data[pos * self.dim..(pos + 1) * self.dim].copy_from_slice(vector);
            }
            None => {
                self.position.insert(id, self.ids.len());
                self.ids.push(id);
                self.meta.push(meta);
                self.data.extend_from_slice(vector);
            }
        }
    }

    /// Updates the filter fields of `id` without touching its vector.
    pub fn update_meta(&mut self, id: Uuid, meta: RowMeta) {
        if let Some(&pos) = self.position.get(&id) {
            self.meta[pos] = meta;
        }
    }

    /// Removes `id` by moving the last row into its place.
    pub fn remove(&mut self, id: Uuid) {
        let Some(pos) = self.position.remove(&id) else {
            return;
        };
        let last = self.ids.len() - 1;
        if pos != last {
            let moved = self.ids[last];
            self.ids.swap(pos, last);
            self.meta.swap(pos, last);
            let (head, tail) = self.data.split_at_mut(last * self.dim);
            head[pos * self.dim..(pos + 1) * self.dim].copy_from_slice(&tail[..self.dim]);
            self.position.insert(moved, pos);
        }
        self.ids.pop();
        self.meta.pop();
        self.data.truncate(last * self.dim);
    }

    /// The `k` best (id, cosine) pairs that pass the filter, best first.
    pub fn search(&self, query: &[f32], filter: &ItemFilter, k: usize) -> Vec<(Uuid, f32)> {
        if k == 0 {
            return Vec::new();
        }
        let unfiltered = filter == &ItemFilter::default();
        let mut scored: Vec<(f32, usize)> = self
            .data
            .chunks_exact(self.dim)
            .enumerate()
            .filter(|(i, _)| unfiltered || self.meta[*i].matches(filter))
            .map(|(i, row)| (dot_unrolled(row, query), i))
            .collect();
        let by_score_desc = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0);
        if scored.len() > k {
            scored.select_nth_unstable_by(k - 1, by_score_desc);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_score_desc);
        scored.into_iter().map(|(s, i)| (self.ids[i], s)).collect()
    }
}

/// Dot product with eight independent accumulators so the loop vectorises.
pub fn dot_unrolled(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks_a = a.chunks_exact(8);
    let chunks_b = b.chunks_exact(8);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for j in 0..8 {
            acc[j] += ca[j] * cb[j];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Per-user indexes, least recently used evicted first.
pub struct UserIndexes {
    dim: usize,
    users: Mutex<lru::LruCache<String, Arc<RwLock<UserVectors>>>>,
}

impl UserIndexes {
    pub fn new(dim: usize, max_users: usize) -> Self {
        Self {
            dim,
            users: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(max_users.max(1)).expect("nonzero"),
            )),
        }
    }

    /// The user's index, created empty (not loaded) if absent. A loader takes the write lock and
    /// reads the database while holding it, so a writer that finds the entry waits for the load
    /// and then applies its idempotent change; a writer that finds no entry committed before the
    /// loader will read.
    pub fn entry(&self, user_id: &str) -> Arc<RwLock<UserVectors>> {
        let mut users = self.users.lock().expect("index lock poisoned");
        if let Some(found) = users.get(user_id) {
            return found.clone();
        }
        let fresh = Arc::new(RwLock::new(UserVectors::new(self.dim)));
        users.put(user_id.to_string(), fresh.clone());
        fresh
    }

    /// The user's index if it is cached (writers only update cached users).
    pub fn cached(&self, user_id: &str) -> Option<Arc<RwLock<UserVectors>>> {
        self.users
            .lock()
            .expect("index lock poisoned")
            .peek(user_id)
            .cloned()
    }

    pub fn forget(&self, user_id: &str) {
        self.users.lock().expect("index lock poisoned").pop(user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::normalize;

    fn meta(t: MemoryType) -> RowMeta {
        RowMeta {
            agent_id: Arc::from(""),
            memory_type: t,
            at_micros: 0,
        }
    }

    fn unit(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        normalize(&mut v);
        v
    }

    #[test]
    fn search_ranks_by_cosine_and_filters() {
        let mut index = UserVectors::new(3);
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        index.upsert(a, meta(MemoryType::Event), &unit(&[1.0, 0.0, 0.0]));
        index.upsert(b, meta(MemoryType::Profile), &unit(&[0.9, 0.1, 0.0]));
        index.upsert(c, meta(MemoryType::Event), &unit(&[0.0, 1.0, 0.0]));
        let q = unit(&[1.0, 0.0, 0.0]);
        let hits = index.search(&q, &ItemFilter::default(), 2);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![a, b]);
        let events = ItemFilter {
            memory_types: vec![MemoryType::Event],
            ..Default::default()
        };
        let hits = index.search(&q, &events, 5);
        assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), vec![a, c]);
    }

    #[test]
    fn upsert_is_idempotent_and_remove_keeps_rows_consistent() {
        let mut index = UserVectors::new(2);
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            index.upsert(*id, meta(MemoryType::Event), &unit(&[1.0, i as f32]));
            index.upsert(*id, meta(MemoryType::Event), &unit(&[1.0, i as f32]));
        }
        assert_eq!(index.len(), 5);
        index.remove(ids[1]);
        index.remove(ids[1]);
        assert_eq!(index.len(), 4);
        // Every remaining id still finds its own vector as the best match.
        for (i, id) in ids.iter().enumerate().filter(|(i, _)| *i != 1) {
            let q = unit(&[1.0, i as f32]);
            assert_eq!(index.search(&q, &ItemFilter::default(), 1)[0].0, *id);
        }
    }

    #[test]
    fn unrolled_dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.1).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot_unrolled(&a, &b) - naive).abs() < 1e-3);
    }
}
