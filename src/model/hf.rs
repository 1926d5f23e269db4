//! Hugging Face model directories in and out: memory-mapped safetensors (one file or shards
//! listed in `model.safetensors.index.json`) into a `VarStore`, and a `VarStore` back out as
//! `model.safetensors` (metadata `format=pt`) with `config.json`, tokenizer files and chat template.
//!
//! A saved `config.json` keeps every original field and always carries a top-level `rope_theta`:
//! transformers 5 writes only `rope_parameters`, which mistralrs 0.8.1 refuses.

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

use super::llama::LlamaConfig;

/// Files beside the weights that a saved model carries over from its base.
const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json"];

/// A model directory's `config.json`: the typed fields and the raw JSON to write back.
pub struct ModelDir {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    pub raw_config: serde_json::Value,
}

impl ModelDir {
    /// The dtype `config.json` says the weights are stored in (`torch_dtype`, or transformers
    /// 5's `dtype`); f32 when it says nothing.
    pub fn stored_kind(&self) -> Kind {
        let dtype = self.raw_config.get("torch_dtype").or_else(|| self.raw_config.get("dtype")).and_then(|d| d.as_str());
        match dtype {
            Some("bfloat16") => Kind::BFloat16,
            Some("float16") => Kind::Half,
            _ => Kind::Float,
        }
    }

    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            bail!("{}: model directory not found (a Hugging Face safetensors directory; `magpie convert` makes one from a GGUF)", dir.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let raw_config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
        check_architecture(&raw_config).with_context(|| format!("{}: cannot load this model", path.display()))?;
        let config = LlamaConfig::from_json(&text).with_context(|| format!("{}: not a Llama-family config", path.display()))?;
        Ok(ModelDir { dir: dir.to_path_buf(), config, raw_config })
    }

    /// The safetensors files holding the weights.
    pub fn weight_files(&self) -> Result<Vec<PathBuf>> {
        let index = self.dir.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
            let Some(map) = json["weight_map"].as_object() else {
                bail!("{}: no `weight_map`", index.display());
            };
            let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            return Ok(files.into_iter().map(|f| self.dir.join(f)).collect());
        }
        let single = self.dir.join("model.safetensors");
        if !single.is_file() {
            bail!("{}: no model.safetensors or model.safetensors.index.json", self.dir.display());
        }
        Ok(vec![single])
    }

    /// Copies the checkpoint's tensors into every variable of `vs`, converting dtype. A variable
    /// the checkpoint lacks is an error naming it, and so is a tensor the model has no place for
    /// (another architecture's weights would otherwise be dropped in silence). Two extras are
    /// known to be harmless and skipped: rotary `inv_freq` buffers, and an `lm_head.weight`
    /// stored beside tied embeddings (the sequence classifier has no LM head either).
    pub fn load_into(&self, vs: &nn::VarStore) -> Result<()> {
        let mut variables = vs.variables();
        let mut missing: BTreeSet<String> = variables.keys().cloned().collect();
        for file in self.weight_files()? {
            let handle = std::fs::File::open(&file).with_context(|| format!("{}: cannot open", file.display()))?;
            // SAFETY: the file is only read, and is not expected to change while we copy from it.
            let bytes = unsafe { memmap2::Mmap::map(&handle) }.with_context(|| format!("{}: cannot map", file.display()))?;
            let tensors = SafeTensors::deserialize(&bytes)
                .with_context(|| format!("{}: not a readable safetensors file (truncated or corrupt)", file.display()))?;
            for (name, view) in tensors.tensors() {
                let Some(var) = variables.get_mut(&name) else {
                    if name.ends_with("rotary_emb.inv_freq") || name == "lm_head.weight" {
                        continue;
                    }
                    bail!("{}: tensor `{name}` has no place in a {} model (another architecture?)", file.display(), self.config.model_type.as_deref().unwrap_or("llama"));
                };
                let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor `{name}`", file.display()))?;
                let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
                if shape != var.size() {
                    bail!("{}: tensor `{name}` has shape {shape:?}, the config says {:?}", file.display(), var.size());
                }
                let data = Tensor::from_data_size(view.data(), &shape, kind);
                tch::no_grad(|| var.copy_(&data));
                missing.remove(&name);
            }
        }
        if !missing.is_empty() {
            let names: Vec<_> = missing.into_iter().take(5).collect();
            bail!("{}: the weights lack {}", self.dir.display(), names.join(", "));
        }
        Ok(())
    }
}

/// The architectures the decoder in `llama` computes exactly.
const MODEL_TYPES: &[&str] = &["llama", "qwen2", "mistral"];
const ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
    "Qwen2ForCausalLM",
    "Qwen2ForSequenceClassification",
    "MistralForCausalLM",
    "MistralForSequenceClassification",
];

/// Fails on a config whose `model_type` or `architectures` the decoder does not implement (a
/// Gemma checkpoint would otherwise load and compute the wrong model).
fn check_architecture(config: &serde_json::Value) -> Result<()> {
    match config["model_type"].as_str() {
        Some(t) if MODEL_TYPES.contains(&t) => {}
        Some(t) => bail!("model_type `{t}` is not supported (supported: {})", MODEL_TYPES.join(", ")),
        None => bail!("config.json has no `model_type` (supported: {})", MODEL_TYPES.join(", ")),
    }
    for architecture in config["architectures"].as_array().into_iter().flatten() {
        let name = architecture.as_str().unwrap_or("?");
        if !ARCHITECTURES.contains(&name) {
            bail!("architecture `{name}` is not supported (supported: {})", ARCHITECTURES.join(", "));
        }
    }
    Ok(())
}

fn kind_of(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        other => bail!("dtype {other:?} is not supported"),
    })
}

/// One tensor as the safetensors writer takes it. Its bytes are copied to the host only when the
/// writer reaches it, one tensor at a time, so saving never holds a second full copy of the model
/// in host memory (an 8B checkpoint would otherwise need 16 GB and more of RAM).
struct TensorView {
    tensor: Tensor,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl TensorView {
    fn new(tensor: &Tensor) -> Result<Self> {
        let dtype = match tensor.kind() {
            Kind::Float => Dtype::F32,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Half => Dtype::F16,
            other => bail!("cannot save a {other:?} tensor"),
        };
        Ok(TensorView { tensor: tensor.shallow_clone(), dtype, shape: tensor.size().iter().map(|&d| d as usize).collect() })
    }
}

impl View for &TensorView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let host = self.tensor.to_device(tch::Device::Cpu).contiguous();
        let numel = host.numel();
        let mut bytes = vec![0u8; self.data_len()];
        host.copy_data_u8(&mut bytes, numel);
        Cow::Owned(bytes)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.tensor.kind().elt_size_in_bytes()
    }
}

/// Writes `tensors` as one safetensors file with `format=pt` metadata, which transformers checks,
/// through a temporary sibling, copying one tensor at a time to the host.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let views: Vec<(String, TensorView)> = tensors.iter().map(|(name, t)| Ok((name.clone(), TensorView::new(t)?))).collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = crate::run::temporary_sibling(path)?;
    if let Err(e) = safetensors::tensor::serialize_to_file(views.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata), &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// `config.json` as a saved model carries it: the original fields, a top-level `rope_theta`, and
/// the dtype the weights were written in.
fn saved_config(raw: &serde_json::Value, config: &LlamaConfig, kind: Kind) -> serde_json::Value {
    let mut out = raw.clone();
    out["rope_theta"] = serde_json::json!(config.rope_theta());
    if let Some(params) = raw.get("rope_parameters")
        && raw.get("rope_scaling").is_none()
        && params.get("rope_type").and_then(|t| t.as_str()) != Some("default")
    {
        out["rope_scaling"] = params.clone();
    }
    let dtype = match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        _ => "float32",
    };
    out["torch_dtype"] = serde_json::json!(dtype);
    out
}

/// Writes the variables of `vs` as a Hugging Face model into the existing directory `dir`,
/// beside the base model's tokenizer files.
pub fn write_model_files(vs: &nn::VarStore, base: &ModelDir, dir: &Path) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let kind = tensors.first().map_or(Kind::Float, |(_, t)| t.kind());
    write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let config = saved_config(&base.raw_config, &base.config, kind);
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config)?).with_context(|| format!("{}: cannot write", config_path.display()))?;
    copy_tokenizer_files(base, dir)
}

/// Copies the base model's tokenizer files and chat template into `dir`.
pub fn copy_tokenizer_files(base: &ModelDir, dir: &Path) -> Result<()> {
    for file in TOKENIZER_FILES {
        let (source, target) = (base.dir.join(file), dir.join(file));
        // Copying a file onto itself would truncate it.
        if source.is_file() && source.canonicalize().ok() != target.canonicalize().ok() {
            std::fs::copy(&source, &target).with_context(|| format!("{}: cannot copy", source.display()))?;
        }
    }
    Ok(())
}

/// Saves the variables of `vs` as a Hugging Face directory `dir`, atomically, with a manifest.
pub fn save(vs: &nn::VarStore, base: &ModelDir, dir: &Path, provenance: &crate::run::Provenance) -> Result<()> {
    crate::run::write_dir(dir, "model", provenance, |tmp| write_model_files(vs, base, tmp))
}
