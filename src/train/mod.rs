//! `magpie sft` and `magpie dpo`: Llama-family training on libtorch, on the models in
//! `crate::model` (the decoder, Hugging Face directories, chat tokenisation).
//!
//! - `trainer`: the loop SFT and DPO share, over `plan` (the flags read once: `args` into a
//!   `TrainPlan`), `objective`, `batch`, `backward` (one micro-batch, in one piece or block by block),
//!   `optim` (AdamW with fp32 master weights, schedules), `checkpoint` (the run's folder,
//!   checkpoints, resume) and `metrics` (metrics.jsonl and the PNG plots, drawn by `crate::plot`).
//! - `distributed`: data parallelism over processes (torchrun/Slurm, c10d, ZeRO-1 AdamW).
//! - `memory`: the per-rank memory plan `--dry-run` prints.
//! - `fused`: libtorch's fused AdamW kernel (`fused_adamw.cpp`), which `optim` runs.
//! - `determinism`: `--full-determinism` (libtorch's deterministic kernels, `determinism.cpp`).
//! - `lm_head`: target log-probs and loss gradients over the vocabulary in chunks.
//! - `driver`: what sft and dpo share around the loop (dry run, world, rows, the output check).
//! - `reference`: DPO's reference log-probs computed once and cached.
//! - `examples`: training rows from the dataset format.
//! - `sft`: the SFT objective and data (masking, packing).
//! - `dpo`: the DPO objective (TRL's losses and metrics, reference models).

pub mod args;
pub mod backward;
pub mod batch;
pub mod checkpoint;
pub mod determinism;
pub mod distributed;
pub mod dpo;
pub mod driver;
pub mod examples;
pub mod fused;
pub mod lm_head;
pub mod memory;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod plan;
pub mod reference;
pub mod sft;
pub mod trainer;

use anyhow::Result;

pub use dpo::DpoArgs;
pub use sft::SftArgs;
pub use args::TrainArgs;

pub fn sft(args: &SftArgs) -> Result<()> {
    sft::run(args)
}

pub fn dpo(args: &DpoArgs) -> Result<()> {
    dpo::run(args)
}
