//! Reward scores from a Hugging Face `LlamaForSequenceClassification` reward model (safetensors +
//! `score` head, e.g. FsfairX-LLaMA3-RM), run in tch: `instruct_reward` for each (instruction,
//! response) and `reward_model` naming the model.
//!
//! With a `responses` column it also scores every sampled response (`rewards`) and builds the
//! preference pair Magpie's DPO data uses: `prompt` (the instruction), `chosen` (the highest
//! reward) and `rejected` (the lowest). Rows whose rewards tie leave the pair null and are counted.
//!
//! Conversations are rendered with the reward model's own chat template, truncated to
//! `max_length` tokens (keeping the start), and scored at their last token.

use super::step::Step;
use super::text::{instructions, responses};
use crate::data::messages::build_messages;
use crate::data::Message;
use crate::model::reward::RewardModel;
use anyhow::{Context, Result};
use arrow::array::{Array, Float64Array, Float64Builder, ListBuilder, RecordBatch, StringArray};
use serde_json::{json, Value};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

/// `reward_scores` in a recipe.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardScoresConfig {
    /// A Hugging Face LlamaForSequenceClassification directory (safetensors, `score` head).
    pub reward_model: Option<PathBuf>,
    /// Tokens per conversation; longer ones keep their start.
    pub max_length: usize,
    /// Conversations scored together.
    pub batch_size: usize,
    /// cpu, cuda, cuda:N or auto.
    pub device: crate::flags::DeviceChoice,
}

impl Default for RewardScoresConfig {
    fn default() -> Self {
        RewardScoresConfig { reward_model: None, max_length: 2048, batch_size: 8, device: crate::flags::DeviceChoice::Auto }
    }
}

pub struct RewardScores {
    model: RewardModel,
    scored: u64,
    pairs: u64,
    ties: u64,
}

impl RewardScores {
    pub fn new(config: RewardScoresConfig) -> Result<Self> {
        let Some(reward_model) = config.reward_model else {
            anyhow::bail!("reward_scores: `reward_model` is required (a LlamaForSequenceClassification directory)");
        };
        let device = config.device.resolve(None)?;
        let model = RewardModel::load(&reward_model, config.max_length, config.batch_size, device)?;
        Ok(RewardScores { model, scored: 0, pairs: 0, ties: 0 })
    }
}

fn exchange(instruction: &str, response: &str) -> Vec<Message> {
    vec![Message::new("user", instruction), Message::new("assistant", response)]
}

/// Index of the highest and the lowest reward (first on ties), or `None` when all are equal.
pub fn best_and_worst(rewards: &[f64]) -> Option<(usize, usize)> {
    let best = (0..rewards.len()).reduce(|a, b| if rewards[b] > rewards[a] { b } else { a })?;
    let worst = (0..rewards.len()).reduce(|a, b| if rewards[b] < rewards[a] { b } else { a })?;
    (rewards[best] > rewards[worst]).then_some((best, worst))
}

impl Step for RewardScores {
    fn name(&self) -> &'static str {
        "reward_scores"
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let instructions: Vec<String> = instructions(&batch).into_iter().map(Option::unwrap_or_default).collect();
        let responses: Vec<String> = responses(&batch).into_iter().map(Option::unwrap_or_default).collect();
        let conversations: Vec<Vec<Message>> = instructions.iter().zip(&responses).map(|(i, r)| exchange(i, r)).collect();
        let rewards = self.model.score(&conversations)?;
        self.scored += rewards.len() as u64;
        let mut batch = super::step::with_column(batch, "instruct_reward", Arc::new(Float64Array::from(rewards)))?;
        let names: StringArray = std::iter::repeat_n(Some(self.model.name.as_str()), batch.num_rows()).collect();
        batch = super::step::with_column(batch, "reward_model", Arc::new(names))?;
        let Some(samples) = batch.column_by_name("responses").cloned() else { return Ok(batch) };
        let samples = samples
            .as_any()
            .downcast_ref::<arrow::array::ListArray>()
            .context("reward_scores: column `responses` must be a list of strings")?;
        let mut texts: Vec<Vec<String>> = vec![];
        for row in 0..instructions.len() {
            texts.push(if samples.is_valid(row) {
                let values = samples.value(row);
                let values = crate::data::messages::as_utf8(&values).context("reward_scores: column `responses` must hold strings")?;
                values.iter().map(|v| v.unwrap_or_default().to_string()).collect()
            } else {
                vec![]
            });
        }
        let all: Vec<Vec<Message>> = instructions.iter().zip(&texts).flat_map(|(i, ts)| ts.iter().map(move |t| exchange(i, t))).collect();
        let mut all_scores = self.model.score(&all)?.into_iter();
        let mut per_row_rewards = ListBuilder::new(Float64Builder::new());
        let (mut prompts, mut chosen, mut rejected) = (vec![], vec![], vec![]);
        for (instruction, texts) in instructions.iter().zip(&texts) {
            let scores: Vec<f64> = all_scores.by_ref().take(texts.len()).collect();
            per_row_rewards.append_value(scores.iter().map(|&s| Some(s)));
            match best_and_worst(&scores) {
                Some((best, worst)) => {
                    self.pairs += 1;
                    prompts.push(Some(vec![Message::new("user", instruction.as_str())]));
                    chosen.push(Some(vec![Message::new("assistant", texts[best].as_str())]));
                    rejected.push(Some(vec![Message::new("assistant", texts[worst].as_str())]));
                }
                None => {
                    self.ties += u64::from(!scores.is_empty());
                    prompts.push(None);
                    chosen.push(None);
                    rejected.push(None);
                }
            }
        }
        batch = super::step::with_column(batch, "rewards", Arc::new(per_row_rewards.finish()))?;
        for (name, rows) in [("prompt", prompts), ("chosen", chosen), ("rejected", rejected)] {
            batch = super::step::with_column(batch, name, build_messages(rows.iter().map(|r| r.as_deref())))?;
        }
        Ok(batch)
    }

    fn report(&self) -> Value {
        json!({ "reward_model": self.model.name, "scored": self.scored, "pairs": self.pairs, "ties_skipped": self.ties })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::step::Step;
    use crate::model::{hf, Llama, ModelDir};
    use std::path::Path;
    use tch::{nn, Device};

    #[test]
    fn best_and_worst_skip_ties() {
        assert_eq!(best_and_worst(&[0.5, 2.0, -1.0]), Some((1, 2)));
        assert_eq!(best_and_worst(&[1.0, 1.0]), None);
        assert_eq!(best_and_worst(&[]), None);
    }

    /// A tiny random LlamaForSequenceClassification over SmolLM2's tokenizer and chat template.
    fn tiny_reward_model(dir: &Path) {
        let smol = dir.join("smol");
        crate::model::convert::convert(&crate::test_support::test_model(), &smol, false).unwrap();
        let rm = dir.join("tiny-rm");
        std::fs::create_dir_all(&rm).unwrap();
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(smol.join(file), rm.join(file)).unwrap();
        }
        let config = json!({"architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "vocab_size": 49152,
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "num_labels": 1, "pad_token_id": 2});
        std::fs::write(rm.join("config.json"), config.to_string()).unwrap();
        let base = ModelDir::open(&rm).unwrap();
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        Llama::sequence_classifier(&vs.root(), &base.config, crate::model::Weights::Random).unwrap();
        hf::write_model_files(&vs, &base, &rm).unwrap();
    }

    #[test]
    fn rewards_pick_the_highest_and_lowest_response_and_count_ties() {
        let dir = tempfile::tempdir().unwrap();
        tiny_reward_model(dir.path());
        let mut step = RewardScores::new(RewardScoresConfig { reward_model: Some(dir.path().join("tiny-rm")), max_length: 512, batch_size: 4, device: crate::flags::DeviceChoice::Cpu }).unwrap();
        let samples = ["Paris is the capital.", "I do not know.", "It is Lyon, obviously!"];
        let mut responses = ListBuilder::new(arrow::array::StringBuilder::new());
        responses.append_value(samples.iter().map(|s| Some(*s)));
        responses.append_value([Some("Same."), Some("Same.")]);
        let batch = crate::test_support::batch(vec![
            ("instruction", Arc::new(StringArray::from(vec!["Capital of France?", "Say same."])) as _),
            ("response", Arc::new(StringArray::from(vec!["Paris.", "Same."])) as _),
            ("responses", Arc::new(responses.finish()) as _),
            ("carried", Arc::new(StringArray::from(vec!["x", "y"])) as _),
        ]);
        let out = step.apply(batch).unwrap();
        let model = &step.model;
        let want: Vec<f64> = model.score(&samples.iter().map(|s| exchange("Capital of France?", s)).collect::<Vec<_>>()).unwrap();
        let (best, worst) = best_and_worst(&want).unwrap();
        let turns = |name: &str| read_back(&out, name);
        assert_eq!(turns("chosen")[0].as_ref().unwrap()[0].content, samples[best]);
        assert_eq!(turns("rejected")[0].as_ref().unwrap()[0].content, samples[worst]);
        assert_eq!(turns("prompt")[0].as_ref().unwrap()[0].content, "Capital of France?");
        assert!(turns("chosen")[1].is_none(), "a tie makes no pair");
        let instruct = out.column_by_name("instruct_reward").unwrap().as_any().downcast_ref::<Float64Array>().unwrap().clone();
        let single = model.score(&[exchange("Capital of France?", "Paris.")]).unwrap()[0];
        assert!((instruct.value(0) - single).abs() < 1e-5, "batched and alone agree");
        assert_eq!(step.report()["ties_skipped"], 1);
        assert_eq!(step.report()["pairs"], 1);
        assert!(out.column_by_name("carried").is_some());
    }

    fn read_back(batch: &RecordBatch, name: &str) -> crate::data::messages::Conversations {
        crate::data::messages::read_turns(batch.column_by_name(name).unwrap().as_ref(), "role", "content")
    }
}
