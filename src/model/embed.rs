//! all-MiniLM-L6-v2 sentence embeddings in tch, as sentence-transformers computes them: a BERT
//! encoder, mean pooling over the attention mask, L2 normalisation. Loads the safetensors and
//! tokenizer.json that set-up put in `$MAGPIE_HOME/all-minilm-l6-v2`; nothing comes from a hub.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};


#[derive(serde::Deserialize)]
struct BertConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: i64,
    num_attention_heads: i64,
    num_hidden_layers: usize,
    #[serde(default = "eps")]
    layer_norm_eps: f64,
}

fn eps() -> f64 {
    1e-12
}

pub struct SentenceEncoder {
    weights: HashMap<String, Tensor>,
    config: BertConfig,
    tokenizer: Tokenizer,
}

impl SentenceEncoder {
    /// Loads the encoder in `dir` onto `device`.
    pub fn load(dir: &Path, device: tch::Device) -> Result<Self> {
        for file in ["config.json", "tokenizer.json", "model.safetensors"] {
            if !dir.join(file).is_file() {
                bail!("{}: embedding model incomplete ({file} is missing); run scripts/setup.sh or pass `model`", dir.display());
            }
        }
        let config_text = std::fs::read_to_string(dir.join("config.json")).with_context(|| format!("{}: cannot read", dir.join("config.json").display()))?;
        let config: BertConfig = serde_json::from_str(&config_text)
            .with_context(|| format!("{}: not a BERT config", dir.join("config.json").display()))?;
        match config.model_type.as_deref() {
            Some("bert") => {}
            other => bail!(
                "{}: model_type {}: the encoder runs BERT-architecture sentence-transformers models (all-MiniLM-L6-v2, all-MiniLM-L12-v2, \
                 bge, e5); MPNet (all-mpnet-base-v2) and other architectures are not implemented",
                dir.join("config.json").display(),
                other.map_or("missing".to_string(), |t| format!("`{t}`"))
            ),
        }
        let weights = Tensor::read_safetensors(dir.join("model.safetensors"))
            .with_context(|| format!("{}: unreadable safetensors", dir.join("model.safetensors").display()))?
            .into_iter()
            .map(|(name, tensor)| (name, tensor.to_device(device)))
            .collect();
        let max_length = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["max_seq_length"].as_u64())
            .unwrap_or(256) as usize;
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_padding(Some(PaddingParams::default()));
        Ok(SentenceEncoder { weights, config, tokenizer })
    }

    fn w(&self, name: &str) -> &Tensor {
        &self.weights[name]
    }

    fn linear(&self, x: &Tensor, prefix: &str) -> Tensor {
        x.linear(self.w(&format!("{prefix}.weight")), Some(self.w(&format!("{prefix}.bias"))))
    }

    fn layer_norm(&self, x: &Tensor, prefix: &str) -> Tensor {
        let size = [self.config.hidden_size];
        x.layer_norm(size.as_slice(), Some(self.w(&format!("{prefix}.weight"))), Some(self.w(&format!("{prefix}.bias"))), self.config.layer_norm_eps, false)
    }

    /// Length of an embedding (the model's hidden size).
    pub fn dimensions(&self) -> usize {
        self.config.hidden_size as usize
    }

    /// Normalised embeddings of `texts`, `[n, hidden]` f32, on the CPU.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor> {
        let encodings = self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        let (n, len) = (encodings.len() as i64, encodings.first().map_or(0, |e| e.len()) as i64);
        let ids: Vec<i64> = encodings.iter().flat_map(|e| e.get_ids().iter().map(|&i| i as i64)).collect();
        let mask: Vec<f32> = encodings.iter().flat_map(|e| e.get_attention_mask().iter().map(|&m| m as f32)).collect();
        let device = self.w("embeddings.word_embeddings.weight").device();
        let ids = Tensor::from_slice(&ids).view([n, len]).to_device(device);
        let mask = Tensor::from_slice(&mask).view([n, len]).to_device(device);
        Ok(tch::no_grad(|| self.forward(&ids, &mask)).to_device(tch::Device::Cpu))
    }

    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Tensor {
        let (n, len) = ids.size2().unwrap();
        let (hidden, heads) = (self.config.hidden_size, self.config.num_attention_heads);
        let head_dim = hidden / heads;
        let positions = Tensor::arange(len, (Kind::Int64, ids.device()));
        let mut x = Tensor::embedding(self.w("embeddings.word_embeddings.weight"), ids, -1, false, false)
            + Tensor::embedding(self.w("embeddings.position_embeddings.weight"), &positions, -1, false, false).unsqueeze(0)
            + self.w("embeddings.token_type_embeddings.weight").get(0);
        x = self.layer_norm(&x, "embeddings.LayerNorm");
        // Padding gets the most negative float, as transformers does.
        let bias: Tensor = (mask.ones_like() - mask) * (f32::MIN as f64);
        let bias = bias.view([n, 1, 1, len]);
        for layer in 0..self.config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            let split = |t: Tensor| t.view([n, len, heads, head_dim]).transpose(1, 2);
            let q = split(self.linear(&x, &format!("{p}.attention.self.query")));
            let k = split(self.linear(&x, &format!("{p}.attention.self.key")));
            let v = split(self.linear(&x, &format!("{p}.attention.self.value")));
            let context = Tensor::scaled_dot_product_attention(&q, &k, &v, Some(&bias), 0.0, false, None::<f64>, false)
                .transpose(1, 2)
                .contiguous()
                .view([n, len, hidden]);
            x = self.layer_norm(&(self.linear(&context, &format!("{p}.attention.output.dense")) + &x), &format!("{p}.attention.output.LayerNorm"));
            let inner = self.linear(&x, &format!("{p}.intermediate.dense")).gelu("none");
            x = self.layer_norm(&(self.linear(&inner, &format!("{p}.output.dense")) + &x), &format!("{p}.output.LayerNorm"));
        }
        let weights = mask.unsqueeze(-1);
        let pooled = (x * &weights).sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            / weights.sum_dim_intlist([1i64].as_slice(), false, Kind::Float).clamp_min(1e-9);
        let norm = pooled.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
        pooled / norm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir() -> std::path::PathBuf {
        crate::test_support::magpie_home().join(crate::home::DEFAULT_EMBEDDING_MODEL_DIR)
    }

    #[test]
    fn an_mpnet_encoder_is_refused_naming_what_is_supported() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"model_type": "mpnet", "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12}"#;
        for (file, text) in [("config.json", config), ("tokenizer.json", "{}"), ("model.safetensors", "")] {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        let error = SentenceEncoder::load(dir.path(), tch::Device::Cpu).err().unwrap().to_string();
        assert!(error.contains("model_type `mpnet`") && error.contains("BERT-architecture") && error.contains("all-mpnet-base-v2"), "{error}");
    }

    /// Vectors written once by scripts/make_embedding_fixture.py with sentence-transformers.
    #[test]
    fn embeddings_match_sentence_transformers() {
        let reference: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(crate::test_support::fixture("minilm-embeddings.json")).unwrap()).unwrap();
        let sentences: Vec<&str> = reference["sentences"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
        let expected: Vec<f32> = reference["embeddings"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)).collect();
        let encoder = SentenceEncoder::load(&model_dir(), tch::Device::Cpu).unwrap();
        let ours: Vec<f32> = Vec::try_from(encoder.embed(&sentences).unwrap().flatten(0, -1)).unwrap();
        assert_eq!(ours.len(), expected.len());
        let worst = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "max abs diff {worst}");
    }

    #[test]
    fn a_missing_embedding_model_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = SentenceEncoder::load(dir.path(), tch::Device::Cpu).err().unwrap().to_string();
        assert!(error.starts_with(&dir.path().display().to_string()), "{error}");
        assert!(error.contains("embedding model incomplete (config.json is missing)"), "{error}");
    }
}
