//! `magpie sft`, `magpie dpo` and `magpie convert`: Llama-family training on libtorch
//! (REFERENCE §5–6).
//!
//! - `model`: the decoder in tch and Hugging Face directories in and out.
//! - `convert`: GGUF to a Hugging Face directory.
//! - `tokenize`: conversations through the model's chat template, assistant tokens marked.
//! - `trainer`, `optim`, `plot`: the loop SFT and DPO share.
//! - `sft`: the SFT objective and data (masking, packing).

pub mod convert;
pub mod model;
pub mod optim;
pub mod plot;
pub mod sft;
pub mod tokenize;
pub mod trainer;

use anyhow::{bail, Result};

pub use convert::ConvertArgs;
pub use sft::SftArgs;
pub use trainer::TrainArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,

    /// DPO temperature β.
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
}

pub fn sft(args: &SftArgs) -> Result<()> {
    sft::run(args)
}

pub fn dpo(_args: &DpoArgs) -> Result<()> {
    bail!("`magpie dpo` is not yet implemented (issue #6)")
}

pub fn convert(args: &ConvertArgs) -> Result<()> {
    convert::run(args)
}
