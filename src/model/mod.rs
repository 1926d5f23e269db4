//! The models every stage shares, in tch and plain Rust:
//! - `llama`: the Llama-family decoder (Llama, Qwen2, Mistral) with LM or score head, its
//!   `attention` kernels (SDPA; varlen flash attention, `flash_attention.cpp`); `hf`:
//!   Hugging Face safetensors directories in and out; `reward`: a sequence-classification
//!   reward model on top of them.
//! - `embed`: the sentence encoder (all-MiniLM-L6-v2) for semantic dedup.
//! - `tokenize`: chat-template tokenisation with assistant-only targets.
//! - `chat_template` (Jinja) and `pre_query` (Magpie's pre-query templates derived from it).
//! - `gguf` (metadata reader) and `convert` (GGUF to a Hugging Face directory, `magpie convert`).
//! - `lora`: PEFT's LoRA adapters on the decoder's linear layers; `merge` (`magpie merge`)
//!   folds them into full weights.

pub mod attention;
pub mod chat_template;
pub mod convert;
pub mod embed;
pub mod families;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod lora;
pub mod merge;
pub mod pre_query;
pub mod reward;
pub mod tokenize;

use anyhow::Result;
use std::path::Path;
use lora::{Adapters, LoraConfig};
use tch::{nn, Device, Kind};

pub use hf::ModelDir;
pub use attention::AttentionMask;
pub use llama::{Inputs, Llama, LlamaConfig, Weights};

/// A model with the store that owns its weights, and its LoRA adapters when it has them.
pub struct Loaded {
    pub vs: nn::VarStore,
    pub model: Llama,
    pub dir: ModelDir,
    pub adapters: Option<Adapters>,
}

impl Loaded {
    /// Freezes the base weights (no gradient, so no optimizer state or master copy) and attaches
    /// LoRA adapters in f32: PEFT's fresh initialisation (from `seed`), or the PEFT adapter
    /// saved in `from`.
    pub fn add_adapters(&mut self, config: &LoraConfig, from: Option<&Path>, seed: u64) -> Result<()> {
        self.vs.freeze();
        let vs = nn::VarStore::new(self.vs.device());
        self.model.add_adapters(&vs.root(), config, seed)?;
        let adapters = Adapters { vs, config: config.clone() };
        if let Some(dir) = from {
            adapters.load(dir)?;
        }
        self.adapters = Some(adapters);
        Ok(())
    }

    /// The store that trains: the adapters', or the model's own weights.
    pub fn trained(&self) -> &nn::VarStore {
        self.adapters.as_ref().map_or(&self.vs, |a| &a.vs)
    }

    /// Writes what trains into the existing folder `dir`, with the tokenizer files: a PEFT
    /// adapter folder, or a whole Hugging Face model.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        match &self.adapters {
            Some(adapters) => {
                adapters.write_files(&self.dir.dir, dir)?;
                hf::copy_tokenizer_files(&self.dir, dir)
            }
            None => hf::write_model_files(&self.vs, &self.dir, dir),
        }
    }

    /// Saves what trains as the folder `dir`, atomically, with a manifest.
    pub fn save(&self, dir: &Path, provenance: &crate::run::Provenance) -> Result<()> {
        let kind = if self.adapters.is_some() { "adapter" } else { "model" };
        crate::run::write_dir(dir, kind, provenance, |tmp| self.write_files(tmp))
    }

    /// Loads what [`Loaded::write_files`] wrote into `dir` back into what trains.
    pub fn load_trained(&self, dir: &Path) -> Result<()> {
        match &self.adapters {
            Some(adapters) => adapters.load(dir),
            None => ModelDir::open(dir)?.load_into(&self.vs),
        }
    }
}

/// Loads a causal language model from a Hugging Face directory onto `device` in `kind`, tensor by
/// tensor into uninitialised weights of that dtype: the peak is the model in `kind` plus one
/// checkpoint tensor (an 8B bf16 model: 16 GB on the GPU, not the 48 GB of f32-then-cast).
pub fn load_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<Loaded> {
    let dir = ModelDir::open(dir)?;
    let vs = nn::VarStore::new(device);
    let model = Llama::causal_lm(&vs.root(), &dir.config, Weights::Uninit(kind))?;
    dir.load_into(&vs)?;
    Ok(Loaded { vs, model, dir, adapters: None })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::collections::HashMap;
    use tch::Tensor;

    pub use crate::test_support::fixture;

    /// Reference tensors written by `scripts/tiny_models.py::write_tensors_json`; `input_ids` are
    /// i64, everything else f32.
    pub fn reference(path: &Path) -> HashMap<String, Tensor> {
        let json: HashMap<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        json.into_iter()
            .map(|(name, t)| {
                let shape: Vec<i64> = t["shape"].as_array().unwrap().iter().map(|d| d.as_i64().unwrap()).collect();
                let data = t["data"].as_array().unwrap();
                let tensor = if name == "input_ids" {
                    Tensor::from_slice(&data.iter().map(|v| v.as_i64().unwrap()).collect::<Vec<_>>())
                } else {
                    Tensor::from_slice(&data.iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>())
                };
                (name, tensor.view(shape.as_slice()))
            })
            .collect()
    }

    /// The deterministic weights `scripts/tiny_models.py` gives the tiny fixtures (the repository
    /// tracks their configs and reference outputs, not weight files).
    pub fn fill_deterministic(vs: &nn::VarStore) {
        let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (p, (name, mut var)) in variables.into_iter().enumerate() {
            let offset = if name.ends_with("norm.weight") { 1.0 } else { 0.0 };
            let values: Vec<f32> = (0..var.numel() as u64)
                .map(|k| {
                    let h = (k * 2_654_435_761 + p as u64 * 40_503 + 12_345) & 0xFFFF_FFFF;
                    (((h >> 8) % 2001) as f64 - 1000.0) / 1000.0 * 0.1 + offset
                })
                .map(|v| v as f32)
                .collect();
            tch::no_grad(|| var.copy_(&Tensor::from_slice(&values).view(var.size().as_slice())));
        }
    }

    /// A tiny fixture (`tiny-llama`, `tiny-qwen2`) as a causal LM with its deterministic weights.
    pub fn tiny(name: &str) -> Loaded {
        let dir = ModelDir::open(&fixture(name)).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::causal_lm(&vs.root(), &dir.config, Weights::Random).unwrap();
        fill_deterministic(&vs);
        Loaded { vs, model, dir, adapters: None }
    }

    /// A tiny fixture saved and loaded back onto `device` in `kind` (through `load_causal_lm`, as
    /// training loads models); the folder lives as long as the returned guard.
    pub fn tiny_on(name: &str, device: Device, kind: Kind) -> (tempfile::TempDir, Loaded) {
        let dir = tempfile::tempdir().unwrap();
        let tiny = tiny(name);
        hf::save(&tiny.vs, &tiny.dir, &dir.path().join("m"), &crate::run::Provenance::new("test", ())).unwrap();
        let loaded = load_causal_lm(&dir.path().join("m"), device, kind).unwrap();
        (dir, loaded)
    }

    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn causal_logits(loaded: &Loaded, ids: &Tensor) -> Tensor {
        let (b, t) = ids.size2().unwrap();
        let positions = llama::default_positions(b, t, Device::Cpu);
        tch::no_grad(|| loaded.model.forward(&Inputs { ids, positions: &positions, mask: &AttentionMask::Causal }))
    }

    #[test]
    fn logits_match_transformers_on_tiny_llama_and_qwen2() {
        for name in ["tiny-llama", "tiny-qwen2"] {
            let loaded = tiny(name);
            let want = reference(&fixture(name).join("reference.json"));
            let got = causal_logits(&loaded, &want["input_ids"]);
            let diff = max_abs_diff(&got, &want["logits"]);
            assert!(diff <= 1e-4, "{name}: max abs diff {diff}");
        }
    }

    #[test]
    fn the_pad_row_of_the_embeddings_gets_no_gradient_from_the_lookup_when_the_config_names_a_pad_token() {
        let ids = Tensor::from_slice(&[5i64, 2, 2, 7]).view([1, 4]);
        for (pad, pad_row_trains) in [(Some(2), false), (None, true)] {
            let dir = ModelDir::open(&fixture("tiny-llama")).unwrap();
            let mut config = dir.config.clone();
            config.pad_token_id = pad;
            let vs = nn::VarStore::new(Device::Cpu);
            let model = Llama::causal_lm(&vs.root(), &config, Weights::Random).unwrap();
            model.embed(&ids).square().sum(Kind::Float).backward();
            let grad = vs.variables()["model.embed_tokens.weight"].grad();
            let row_norm = |row: i64| grad.get(row).abs().sum(Kind::Float).double_value(&[]);
            assert_eq!(row_norm(2) > 0.0, pad_row_trains, "pad {pad:?}");
            assert!(row_norm(5) > 0.0 && row_norm(7) > 0.0);
        }
    }

    #[test]
    fn reward_scores_match_transformers_at_the_last_non_pad_token() {
        let dir = ModelDir::open(&fixture("tiny-llama-reward")).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::sequence_classifier(&vs.root(), &dir.config, Weights::Random).unwrap();
        fill_deterministic(&vs);
        let want = reference(&fixture("tiny-llama-reward").join("reference.json"));
        let ids = &want["input_ids"];
        let positions = llama::default_positions(2, ids.size()[1], Device::Cpu);
        let got = tch::no_grad(|| model.scores(&Inputs { ids, positions: &positions, mask: &AttentionMask::Causal }));
        assert!(max_abs_diff(&got, &want["scores"]) <= 1e-4);
    }

    #[test]
    fn saved_model_loads_back_with_rope_theta_and_the_same_logits() {
        let loaded = tiny("tiny-llama");
        let out = tempfile::tempdir().unwrap();
        let saved = out.path().join("saved");
        hf::save(&loaded.vs, &loaded.dir, &saved, &crate::run::Provenance::new("test", ())).unwrap();
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["rope_theta"], 500000.0);
        assert_eq!(config["rope_scaling"]["rope_type"], "llama3");
        assert_eq!(config["rope_parameters"]["rope_type"], "llama3", "original fields stay");
        let again = load_causal_lm(&saved, Device::Cpu, Kind::Float).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200]).view([1, 4]);
        assert_eq!(max_abs_diff(&causal_logits(&loaded, &ids), &causal_logits(&again, &ids)), 0.0);
        // Loaded in bf16: every weight is made in bf16 and filled from the file (no f32 copy
        // first), each the checkpoint's value rounded to bf16.
        let bf16 = load_causal_lm(&saved, Device::Cpu, Kind::BFloat16).unwrap();
        let f32_weights = again.vs.variables();
        for (name, weight) in bf16.vs.variables() {
            assert_eq!(weight.kind(), Kind::BFloat16, "{name}");
            assert!(weight.requires_grad(), "{name} is trainable");
            assert_eq!(max_abs_diff(&weight.to_kind(Kind::Float), &f32_weights[&name].to_kind(Kind::BFloat16).to_kind(Kind::Float)), 0.0, "{name}");
        }
    }

    #[test]
    fn sharded_checkpoints_load_through_their_index() {
        let out = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("tiny-llama/config.json"), out.path().join("config.json")).unwrap();
        let whole = tiny("tiny-llama");
        let mut tensors: Vec<(String, Tensor)> = whole.vs.variables().into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let second = tensors.split_off(tensors.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (file, part) in [("model-00001-of-00002.safetensors", &tensors), ("model-00002-of-00002.safetensors", &second)] {
            hf::write_safetensors(part, &out.path().join(file)).unwrap();
            for (name, _) in part.iter() {
                weight_map.insert(name.clone(), serde_json::json!(file));
            }
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(out.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        let sharded = load_causal_lm(out.path(), Device::Cpu, Kind::Float).unwrap();
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200]).view([1, 4]);
        assert_eq!(max_abs_diff(&causal_logits(&sharded, &ids), &causal_logits(&whole, &ids)), 0.0);
    }

    #[test]
    fn missing_weights_and_directories_are_named() {
        let err = load_causal_lm(Path::new("/nonexistent/model"), Device::Cpu, Kind::Float).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/model"), "{err}");
        let out = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("tiny-llama/config.json"), out.path().join("config.json")).unwrap();
        let err = load_causal_lm(out.path(), Device::Cpu, Kind::Float).err().unwrap();
        assert!(err.to_string().contains("no model.safetensors"), "{err}");
        std::fs::write(out.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
        let err = format!("{:#}", load_causal_lm(out.path(), Device::Cpu, Kind::Float).err().unwrap());
        assert!(err.contains("truncated or corrupt"), "{err}");
    }

    #[test]
    fn other_architectures_and_stray_tensors_are_refused() {
        let out = tempfile::tempdir().unwrap();
        let loaded = tiny("tiny-llama");
        hf::save(&loaded.vs, &loaded.dir, out.path(), &crate::run::Provenance::new("test", ())).unwrap();
        let config_path = out.path().join("config.json");
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
        let with = |key: &str, value: serde_json::Value| {
            let mut changed = config.clone();
            changed[key] = value;
            std::fs::write(&config_path, changed.to_string()).unwrap();
            load_causal_lm(out.path(), Device::Cpu, Kind::Float).err().map(|e| format!("{e:#}")).unwrap_or_default()
        };
        assert!(with("model_type", serde_json::json!("gemma")).contains("model_type `gemma` is not supported"));
        assert!(with("architectures", serde_json::json!(["GemmaForCausalLM"])).contains("architecture `GemmaForCausalLM` is not supported"));
        std::fs::write(&config_path, config.to_string()).unwrap();
        // A tensor the model has no place for, e.g. another architecture's extra norm.
        let mut tensors: Vec<(String, Tensor)> = loaded.vs.variables().into_iter().collect();
        tensors.push(("model.layers.0.post_feedforward_layernorm.weight".into(), Tensor::ones([8], (Kind::Float, Device::Cpu))));
        hf::write_safetensors(&tensors, &out.path().join("model.safetensors")).unwrap();
        let err = format!("{:#}", load_causal_lm(out.path(), Device::Cpu, Kind::Float).err().unwrap());
        assert!(err.contains("tensor `model.layers.0.post_feedforward_layernorm.weight` has no place"), "{err}");
    }
}
