//! In-process vector search for the embedded store.
//!
//! Each user's vectors live in one contiguous buffer so a search is a linear scan of dot products
//! that the compiler vectorises, with no per-row decoding: `f32` rows (exact), or int8 codes with
//! one scale per row (a quarter of the memory; the caller rescores the best candidates with the
//! exact vectors). Users are loaded lazily from the database and evicted least-recently-used.
//! Updates are idempotent by item id, so a write that races a load can never duplicate or lose a
//! row (see `UserIndexes::entry`).

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

/// How rows are held in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowEncoding {
    F32,
    /// Symmetric per-row int8: `x ≈ code × scale`, `scale = max|x| / 127`.
    Int8,
}

#[derive(Debug)]
enum Rows {
    F32(Vec<f32>),
    Int8 { codes: Vec<i8>, scales: Vec<f32> },
}

/// A vector's int8 codes and scale.
pub fn quantize(vector: &[f32]) -> (Vec<i8>, f32) {
    let max = vector.iter().fold(0f32, |m, x| m.max(x.abs()));
    if max == 0.0 {
        return (vec![0; vector.len()], 0.0);
    }
    let scale = max / 127.0;
    let codes = vector
        .iter()
        .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (codes, scale)
}

#[derive(Debug)]
pub struct UserVectors {
    dim: usize,
    loaded: bool,
    ids: Vec<Uuid>,
    meta: Vec<RowMeta>,
    rows: Rows,
    position: HashMap<Uuid, usize>,
}

impl UserVectors {
    fn new(dim: usize, encoding: RowEncoding) -> Self {
        Self {
            dim,
            loaded: false,
            ids: Vec::new(),
            meta: Vec::new(),
            rows: match encoding {
                RowEncoding::F32 => Rows::F32(Vec::new()),
                RowEncoding::Int8 => Rows::Int8 {
                    codes: Vec::new(),
                    scales: Vec::new(),
                },
            },
            position: HashMap::new(),
        }
    }

    /// Bytes the vectors take (ids and filter fields aside).
    #[cfg(test)]
    fn vector_bytes(&self) -> usize {
        match &self.rows {
            Rows::F32(data) => data.len() * 4,
            Rows::Int8 { codes, scales } => codes.len() + scales.len() * 4,
        }
    }

    /// True when scores are approximate and the caller must rescore with the exact vectors.
    pub fn is_approximate(&self) -> bool {
        matches!(self.rows, Rows::Int8 { .. })
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
        let dim = self.dim;
        let pos = match self.position.get(&id) {
            Some(&pos) => {
                self.meta[pos] = meta;
                pos
            }
            None => {
                let pos = self.ids.len();
                self.position.insert(id, pos);
                self.ids.push(id);
                self.meta.push(meta);
                match &mut self.rows {
                    Rows::F32(data) => data.resize(data.len() + dim, 0.0),
                    Rows::Int8 { codes, scales } => {
                        codes.resize(codes.len() + dim, 0);
                        scales.push(0.0);
                    }
                }
                pos
            }
        };
        match &mut self.rows {
            Rows::F32(data) => data[pos * dim..(pos + 1) * dim].copy_from_slice(vector),
            Rows::Int8 { codes, scales } => {
                let (row, scale) = quantize(vector);
                codes[pos * dim..(pos + 1) * dim].copy_from_slice(&row);
                scales[pos] = scale;
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
            match &mut self.rows {
                Rows::F32(data) => move_row(data, last, pos, self.dim),
                Rows::Int8 { codes, scales } => {
                    move_row(codes, last, pos, self.dim);
                    scales.swap(pos, last);
                }
            }
            self.position.insert(moved, pos);
        }
        self.ids.pop();
        self.meta.pop();
        match &mut self.rows {
            Rows::F32(data) => data.truncate(last * self.dim),
            Rows::Int8 { codes, scales } => {
                codes.truncate(last * self.dim);
                scales.pop();
            }
        }
    }

    /// The `k` best (id, cosine) pairs that pass the filter, best first; with int8 rows the
    /// cosines are approximate (see `is_approximate`).
    pub fn search(&self, query: &[f32], filter: &ItemFilter, k: usize) -> Vec<(Uuid, f32)> {
        if k == 0 {
            return Vec::new();
        }
        let unfiltered = filter == &ItemFilter::default();
        let passes = |i: &usize| unfiltered || self.meta[*i].matches(filter);
        let mut scored: Vec<(f32, usize)> = match &self.rows {
            Rows::F32(data) => data
                .chunks_exact(self.dim)
                .enumerate()
                .filter(|(i, _)| passes(i))
                .map(|(i, row)| (dot_unrolled(row, query), i))
                .collect(),
            Rows::Int8 { codes, scales } => {
                let (query_codes, query_scale) = quantize(query);
                codes
                    .chunks_exact(self.dim)
                    .enumerate()
                    .filter(|(i, _)| passes(i))
                    .map(|(i, row)| {
                        let dot = dot_i8(row, &query_codes) as f32;
                        (dot * scales[i] * query_scale, i)
                    })
                    .collect()
            }
        };
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

/// int8 dot product in i32 with independent accumulators so the loop vectorises.
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    let mut acc = [0i32; 16];
    let chunks_a = a.chunks_exact(16);
    let chunks_b = b.chunks_exact(16);
    let tail: i32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| *x as i32 * *y as i32)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for j in 0..16 {
            acc[j] += ca[j] as i32 * cb[j] as i32;
        }
    }
    acc.iter().sum::<i32>() + tail
}

/// Moves row `from` over row `to` (rows of `dim` values).
fn move_row<T: Copy>(data: &mut [T], from: usize, to: usize, dim: usize) {
    data.copy_within(from * dim..(from + 1) * dim, to * dim);
}

/// Per-user indexes, least recently used evicted first.
pub struct UserIndexes {
    dim: usize,
    encoding: RowEncoding,
    users: Mutex<lru::LruCache<String, Arc<RwLock<UserVectors>>>>,
}

impl UserIndexes {
    pub fn new(dim: usize, encoding: RowEncoding, max_users: usize) -> Self {
        Self {
            dim,
            encoding,
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
        let fresh = Arc::new(RwLock::new(UserVectors::new(self.dim, self.encoding)));
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
        for encoding in [RowEncoding::F32, RowEncoding::Int8] {
            search_ranks_and_filters(encoding);
        }
    }

    fn search_ranks_and_filters(encoding: RowEncoding) {
        let mut index = UserVectors::new(3, encoding);
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
        for encoding in [RowEncoding::F32, RowEncoding::Int8] {
            upsert_and_remove(encoding);
        }
    }

    fn upsert_and_remove(encoding: RowEncoding) {
        let mut index = UserVectors::new(2, encoding);
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

    #[test]
    fn int8_rows_take_a_quarter_and_keep_cosines_close() {
        let dim = 384;
        let mut exact = UserVectors::new(dim, RowEncoding::F32);
        let mut coded = UserVectors::new(dim, RowEncoding::Int8);
        let vector = |seed: usize| {
            unit(
                &(0..dim)
                    .map(|j| ((seed * 31 + j * 17) % 97) as f32 - 48.0)
                    .collect::<Vec<_>>(),
            )
        };
        for seed in 0..50 {
            let id = Uuid::from_u128(seed as u128);
            exact.upsert(id, meta(MemoryType::Event), &vector(seed));
            coded.upsert(id, meta(MemoryType::Event), &vector(seed));
        }
        assert!(coded.is_approximate() && !exact.is_approximate());
        assert_eq!(exact.vector_bytes(), 50 * dim * 4);
        assert_eq!(coded.vector_bytes(), 50 * (dim + 4));
        let q = vector(1000);
        let truth: HashMap<Uuid, f32> = exact
            .search(&q, &ItemFilter::default(), 50)
            .into_iter()
            .collect();
        for (id, approx) in coded.search(&q, &ItemFilter::default(), 50) {
            assert!(
                (approx - truth[&id]).abs() < 0.02,
                "{approx} vs {}",
                truth[&id]
            );
        }
        // A zero vector quantizes to zeros rather than dividing by zero.
        assert_eq!(quantize(&[0.0; 4]), (vec![0; 4], 0.0));
    }

    #[test]
    fn int8_dot_matches_naive() {
        let a: Vec<i8> = (0..37).map(|i| (i * 7 % 255 - 127) as i8).collect();
        let b: Vec<i8> = (0..37).map(|i| (127 - i * 5) as i8).collect();
        let naive: i32 = a.iter().zip(&b).map(|(x, y)| *x as i32 * *y as i32).sum();
        assert_eq!(dot_i8(&a, &b), naive);
    }
}
