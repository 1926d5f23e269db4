//! `magpie sft`, `magpie dpo` and `magpie convert`: Llama-family training on libtorch
//! (REFERENCE §5–6). Not yet implemented: see issues #5 and #6.

pub mod convert;
pub mod model;

pub use convert::ConvertArgs;

use anyhow::{bail, Result};
use std::path::PathBuf;

/// What SFT and DPO both take.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// YAML recipe whose keys are these flags' names; flags on the command line override it.
    #[arg(long, value_name = "FILE.yaml")]
    pub recipe: Option<PathBuf>,

    /// Base model: a Hugging Face safetensors directory (see `magpie convert` for GGUF files).
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// Training dataset(s): parquet files, directories of parts, or globs.
    #[arg(long, short)]
    pub input: Vec<String>,

    /// Output directory for checkpoints, metrics and plots.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SftArgs {
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,

    /// DPO temperature β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
}

pub fn sft(_args: &SftArgs) -> Result<()> {
    bail!("`magpie sft` is not yet implemented (issue #5)")
}

pub fn dpo(_args: &DpoArgs) -> Result<()> {
    bail!("`magpie dpo` is not yet implemented (issue #6)")
}

pub fn convert(args: &ConvertArgs) -> Result<()> {
    convert::run(args)
}
