//! `magpie merge`: a PEFT LoRA adapter folded into its base model's weights (PEFT's
//! `merge_and_unload`), written as a full Hugging Face model that transformers and mistralrs load;
//! and the same done once, into the cache, for an adapter folder given where a model is read
//! (`magpie synth --model`, `magpie eval --model`).

use anyhow::{bail, Context, Result};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use tch::Device;

use super::lora::LoraConfig;

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    #[command(flatten)]
    pub run: crate::flags::OutputFlags,

    /// The base model the adapter was trained on (a Hugging Face safetensors directory).
    #[arg(long)]
    pub base: PathBuf,

    /// The PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`): a `magpie
    /// sft`/`dpo --use-peft` model or checkpoint, or one PEFT saved.
    #[arg(long)]
    pub adapter: PathBuf,

    /// Output model directory: new or empty, or an earlier `magpie merge` output with --overwrite.
    #[arg(long, short)]
    pub output: PathBuf,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let config = LoraConfig::read(&args.adapter)?;
    let inputs = [args.base.clone(), args.adapter.clone()];
    crate::run::check(&args.output, &inputs, &crate::run::Rules { overwrite: args.run.overwrite, resumable: None })?;
    merge_into(&args.base, &args.adapter, &config, &args.output)?;
    eprintln!("magpie merge: {} + {} -> {}", args.base.display(), args.adapter.display(), args.output.display());
    Ok(())
}

/// A model folder to generate with for `dir`: `dir` itself, or, for a PEFT adapter folder, its
/// base model (`base_model_name_or_path`) with the adapter merged, written once into
/// `$MAGPIE_CACHE/merged-adapters/` under a key of the adapter's bytes and the base's path,
/// config and weight files, and reused while they are unchanged.
pub fn for_inference(dir: &Path) -> Result<PathBuf> {
    if !super::lora::is_adapter_dir(dir) {
        return Ok(dir.to_path_buf());
    }
    let config = LoraConfig::read(dir)?;
    let base = base_of(dir)?;
    let target = crate::home::cache_dir().join("merged-adapters").join(cache_key(dir, &base)?);
    if crate::run::Manifest::read(&target).ok().flatten().is_some() {
        return Ok(target);
    }
    eprintln!("magpie: merging the adapter {} into {} (once, into {})", dir.display(), base.display(), target.display());
    std::fs::create_dir_all(target.parent().expect("a cache entry has a parent")).with_context(|| format!("{}: cannot create", target.display()))?;
    merge_into(&base, dir, &config, &target)?;
    Ok(target)
}

/// The base model folder an adapter's `adapter_config.json` names.
fn base_of(adapter: &Path) -> Result<PathBuf> {
    let path = adapter.join(super::lora::ADAPTER_CONFIG);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?).with_context(|| format!("{}: not JSON", path.display()))?;
    let Some(base) = json["base_model_name_or_path"].as_str().map(PathBuf::from) else {
        bail!("{}: names no base_model_name_or_path; merge it with `magpie merge --base DIR`", path.display());
    };
    if !base.join("config.json").is_file() {
        bail!("{}: its base model `{}` is not a model folder here; merge it with `magpie merge --base DIR --adapter {}`", path.display(), base.display(), adapter.display());
    }
    Ok(base)
}

/// The merged copy's cache key: the adapter's files byte for byte, and the base's path, config
/// and weight files (their sizes and modification times: hashing 16 GB would take minutes).
fn cache_key(adapter: &Path, base: &Path) -> Result<String> {
    let mut hasher = std::hash::DefaultHasher::new();
    for file in [super::lora::ADAPTER_WEIGHTS, super::lora::ADAPTER_CONFIG] {
        let path = adapter.join(file);
        std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?.hash(&mut hasher);
    }
    let base = std::fs::canonicalize(base).with_context(|| format!("{}: cannot resolve", base.display()))?;
    base.hash(&mut hasher);
    std::fs::read(base.join("config.json"))?.hash(&mut hasher);
    for file in super::ModelDir::open(&base)?.weight_files()? {
        let meta = std::fs::metadata(&file).with_context(|| format!("{}: cannot read", file.display()))?;
        (meta.len(), meta.modified().ok()).hash(&mut hasher);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// Writes `base` with `adapter` merged as the model folder `target`, atomically, with a manifest.
fn merge_into(base: &Path, adapter: &Path, config: &LoraConfig, target: &Path) -> Result<()> {
    let loaded = merged(base, adapter, config)?;
    let provenance = crate::run::Provenance::new("merge", serde_json::json!({"base": base, "adapter": adapter, "lora": config}));
    super::hf::save(&loaded.vs, &loaded.dir, target, &provenance).with_context(|| format!("{}: cannot write the merged model", target.display()))
}

/// The base model in its stored dtype on the CPU with the adapter's update added into each
/// targeted weight, in that dtype (as PEFT merges).
pub fn merged(base: &Path, adapter: &Path, config: &LoraConfig) -> Result<super::Loaded> {
    let kind = super::ModelDir::open(base)?.stored_kind();
    let mut loaded = super::load_causal_lm(base, Device::Cpu, kind)?;
    loaded.add_adapters(config, Some(adapter), 0).with_context(|| format!("{}: does not fit {}", adapter.display(), base.display()))?;
    loaded.model.merge_adapters();
    Ok(loaded)
}
