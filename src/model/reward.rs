//! A Hugging Face `LlamaForSequenceClassification` reward model (safetensors + `score` head, e.g.
//! FsfairX-LLaMA3-RM) in tch: each conversation, rendered with the model's own chat template and
//! truncated to `max_length` tokens (keeping the start), is scored at its last token.

use super::attention::AttentionMask;
use super::llama::{self, Inputs, Llama};
use super::tokenize::ChatTokenizer;
use super::ModelDir;
use crate::data::Message;
use anyhow::{Context, Result};
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// A loaded reward model.
pub struct RewardModel {
    pub name: String,
    model: Llama,
    _vs: nn::VarStore,
    tokenizer: ChatTokenizer,
    max_length: usize,
    batch_size: usize,
}

impl RewardModel {
    pub fn load(dir: &Path, max_length: usize, batch_size: usize, device: Device) -> Result<Self> {
        let model_dir = ModelDir::open(dir).with_context(|| "reward_scores: reward_model")?;
        let vs = nn::VarStore::new(device);
        let model = Llama::sequence_classifier(&vs.root(), &model_dir.config, crate::model::Weights::Uninit(tch::Kind::Float))?;
        model_dir.load_into(&vs).with_context(|| format!("{}: not a LlamaForSequenceClassification checkpoint (it needs `score.weight`)", dir.display()))?;
        let tokenizer = ChatTokenizer::load(dir)?;
        let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| dir.display().to_string());
        Ok(RewardModel { name, model, _vs: vs, tokenizer, max_length: max_length.max(2), batch_size: batch_size.max(1) })
    }

    /// The first score of each conversation. Conversations are batched in length order (less
    /// padding); right padding and causal attention keep each score what it is alone.
    pub fn score(&self, conversations: &[Vec<Message>]) -> Result<Vec<f64>> {
        let mut rows = Vec::with_capacity(conversations.len());
        for messages in conversations {
            let text = self.tokenizer.template.render(messages, false)?;
            let encoding = self.tokenizer.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("reward tokenizer: {e}"))?;
            let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i as i64).collect();
            ids.truncate(self.max_length);
            rows.push(ids);
        }
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let mut out = vec![0.0; rows.len()];
        for chunk in order.chunks(self.batch_size) {
            let width = chunk.iter().map(|&i| rows[i].len()).max().unwrap_or(1).max(1);
            let padded: Vec<i64> =
                chunk.iter().flat_map(|&i| rows[i].iter().copied().chain(std::iter::repeat(self.tokenizer.pad_id)).take(width)).collect();
            let device = self.model.device();
            let ids = Tensor::from_slice(&padded).view([chunk.len() as i64, width as i64]).to_device(device);
            let last = Tensor::from_slice(&chunk.iter().map(|&i| rows[i].len().max(1) as i64 - 1).collect::<Vec<_>>()).to_device(device);
            let positions = llama::default_positions(chunk.len() as i64, width as i64, device);
            let scores = tch::no_grad(|| self.model.scores_at(&Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal }, &last));
            let first: Vec<f64> = scores.select(1, 0).to_kind(Kind::Double).to_device(Device::Cpu).try_into()?;
            for (&i, score) in chunk.iter().zip(first) {
                out[i] = score;
            }
        }
        Ok(out)
    }
}
