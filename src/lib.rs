//! magpie: the Magpie alignment recipe (arXiv 2406.08464) as one library and binary.
//!
//! The stages sit side by side and never import each other (ARCHITECTURE.md):
//! - `synth`: instruction and response synthesis from a pre-query template.
//! - `filter`: tags, dedup, scores and selection.
//! - `train`: SFT and DPO of Llama-family models on libtorch.
//! - `eval`: answers of a trained model judged against a baseline, or graded, by a local judge.
//!
//! They share one floor:
//! - `data`: the one parquet dataset format all stages share, and safe outputs (`data::output`).
//! - `model`: the models (Llama-family decoder, HF load/save, reward model, sentence encoder,
//!   tokenizer, chat and pre-query templates, GGUF reading and conversion).
//! - `engine`: the generation engines (llama.cpp, mistralrs) and model lookup.
//! - `home` (model and cache folders), `seed` (deterministic randomness), `cpu` (what this CPU
//!   can run), `plot` (PNG charts with an embedded font), `doctor`, `torch_ffi` (the C++ shims'
//!   error convention).
//! - `cli` and `recipe`: the command line and YAML recipes.

pub mod cli;
pub mod cpu;
pub mod data;
pub mod doctor;
pub mod engine;
pub mod eval;
pub mod filter;
pub mod home;
pub mod model;
pub mod output;
pub mod plot;
pub mod recipe;
pub mod seed;
pub mod synth;
pub mod torch_ffi;
pub mod train;

#[cfg(test)]
pub(crate) mod test_support;

/// The layering ARCHITECTURE.md draws, checked on the source: a stage never uses another stage,
/// and the shared floor uses no stage.
#[cfg(test)]
mod layers {
    const STAGES: &[&str] = &["synth", "filter", "train", "eval"];

    /// `(file, stage)` for every `crate::<stage>` path in the files under `src/<folder>`.
    fn stage_paths(folder: &str) -> Vec<(String, String)> {
        let mut found = vec![];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(folder);
        let mut pending = vec![root];
        while let Some(path) = pending.pop() {
            if path.is_dir() {
                pending.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for stage in STAGES {
                    if text.contains(&format!("crate::{stage}::")) || text.contains(&format!("crate::{stage};")) || text.contains(&format!("crate::{{{stage}")) {
                        found.push((path.display().to_string(), stage.to_string()));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn no_stage_imports_another_stage() {
        for stage in STAGES {
            let crossing: Vec<_> = stage_paths(stage).into_iter().filter(|(_, used)| used != stage).collect();
            assert!(crossing.is_empty(), "{stage} uses another stage: {crossing:?}");
        }
    }

    #[test]
    fn the_shared_floor_imports_no_stage() {
        for folder in ["data", "model", "engine", "output.rs", "plot.rs", "home.rs", "seed.rs", "cpu.rs", "doctor.rs"] {
            let used = stage_paths(folder);
            assert!(used.is_empty(), "{folder} uses a stage: {used:?}");
        }
    }
}
