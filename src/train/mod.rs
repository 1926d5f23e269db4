//! `magpie sft`, `magpie dpo` and `magpie convert`: Llama-family training on libtorch
//! (REFERENCE §5–6).
//!
//! - `model`: the decoder in tch and Hugging Face directories in and out.
//! - `convert`: GGUF to a Hugging Face directory.
//! - `tokenize`: conversations through the model's chat template, assistant tokens marked.
//! - `trainer`, `optim`, `plot`: the loop SFT and DPO share.
//! - `sft`: the SFT objective and data (masking, packing).
//! - `dpo`: the DPO objective (TRL's losses and metrics, reference models).

pub mod convert;
pub mod dpo;
pub mod examples;
pub mod model;
pub mod optim;
pub mod plot;
pub mod sft;
pub mod tokenize;
pub mod trainer;

use anyhow::Result;

pub use convert::ConvertArgs;
pub use dpo::DpoArgs;
pub use sft::SftArgs;
pub use trainer::TrainArgs;

pub fn sft(args: &SftArgs) -> Result<()> {
    sft::run(args)
}

pub fn dpo(args: &DpoArgs) -> Result<()> {
    dpo::run(args)
}

pub fn convert(args: &ConvertArgs) -> Result<()> {
    convert::run(args)
}
