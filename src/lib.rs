//! magpie: the Magpie alignment recipe (arXiv 2406.08464) as one library and binary.
//!
//! - `data`: the one parquet dataset format all stages share.
//! - `synth`: instruction and response synthesis from a pre-query template.
//! - `filter`: tags, dedup, scores and selection.
//! - `train`: SFT and DPO of Llama-family models on libtorch, and GGUF conversion.
//! - `cli` and `recipe`: the command line and YAML recipes.

pub mod chat_template;
pub mod cli;
pub mod data;
pub mod filter;
pub mod gguf;
pub mod recipe;
pub mod synth;
pub mod train;
