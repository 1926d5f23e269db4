//! `magpie merge`: a PEFT LoRA adapter folded into its base model's weights (PEFT's
//! `merge_and_unload`), written as a full Hugging Face model that transformers and mistralrs load.

use anyhow::{Context, Result};
use std::path::PathBuf;
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
    let loaded = merged(&args.base, &args.adapter, &config)?;
    let provenance = crate::run::Provenance::new("merge", serde_json::json!({"base": args.base, "adapter": args.adapter, "lora": config}));
    super::hf::save(&loaded.vs, &loaded.dir, &args.output, &provenance).with_context(|| format!("{}: cannot write the merged model", args.output.display()))?;
    eprintln!("magpie merge: {} + {} -> {}", args.base.display(), args.adapter.display(), args.output.display());
    Ok(())
}

/// The base model in its stored dtype on the CPU with the adapter's update added into each
/// targeted weight, in that dtype (as PEFT merges).
pub fn merged(base: &std::path::Path, adapter: &std::path::Path, config: &LoraConfig) -> Result<super::Loaded> {
    let kind = super::ModelDir::open(base)?.stored_kind();
    let mut loaded = super::load_causal_lm(base, Device::Cpu, kind)?;
    loaded.add_adapters(config, Some(adapter), 0).with_context(|| format!("{}: does not fit {}", adapter.display(), base.display()))?;
    loaded.model.merge_adapters();
    Ok(loaded)
}
