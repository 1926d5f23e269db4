//! magpie: the Magpie alignment recipe (arXiv 2406.08464) as one library and binary.
//!
//! The stages sit side by side and never import each other (ARCHITECTURE.md):
//! - `synth`: instruction and response synthesis from a pre-query template.
//! - `filter`: tags, dedup, scores and selection.
//! - `train`: SFT and DPO of Llama-family models on libtorch.
//! - `eval`: answers of a trained model judged against a baseline, or graded, by a local judge.
//!
//! They share one floor:
//! - `run`: every stage's output life cycle (guards, run claim, temporaries, manifest, planned
//!   removal).
//! - `data`: the one parquet dataset format all stages share.
//! - `model`: the models (Llama-family decoder, HF load/save, reward model, sentence encoder,
//!   tokenizer, chat and pre-query templates, GGUF reading and conversion).
//! - `engine`: the generation engines (llama.cpp, mistralrs) and model lookup.
//! - `home` (model and cache folders), `seed` (deterministic randomness), `cpu` (what this CPU
//!   can run), `plot` (PNG charts with an embedded font), `doctor`, `torch_ffi` (the C++ shims'
//!   error convention).
//!
//! The command line (`cli`, `recipe`: flags and YAML recipes) is the binary's, in `main.rs`, above
//! every stage.

pub mod cpu;
pub mod data;
pub mod doctor;
pub mod engine;
pub mod eval;
pub mod filter;
pub mod flags;
pub mod home;
pub mod model;
pub mod run;
pub mod plot;
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

    /// The floor, lowest first: a floor module may use only the ones before it (tests aside).
    const FLOOR: &[&str] = &["seed", "cpu", "home", "torch_ffi", "flags", "run", "plot", "data", "model", "engine", "doctor"];

    /// The first names of every `crate::` path in `code`: `crate::a::b` gives `a`, and
    /// `crate::{a::b, c::{d, e}}` gives `a` and `c`.
    fn crate_roots(code: &str) -> Vec<String> {
        let name = |text: &str| text.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let mut roots = vec![];
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let Some(list) = rest.strip_prefix('{') else {
                roots.push(name(rest));
                continue;
            };
            // The list's items at depth 0, each starting after `{` or a comma at depth 0.
            let mut depth = 0;
            roots.push(name(list));
            for (i, c) in list.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => roots.push(name(&list[i + 1..])),
                    _ => {}
                }
            }
        }
        roots
    }

    /// `(file, module)` for every `crate::<module>` path to one of `modules` in the non-test code
    /// of the files under `src/<folder>` (or `src/<folder>.rs`).
    fn uses_of(folder: &str, modules: &[&str]) -> Vec<(String, String)> {
        let mut found = vec![];
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let root = if src.join(folder).is_dir() { src.join(folder) } else { src.join(format!("{folder}.rs")) };
        let mut pending = vec![root];
        while let Some(path) = pending.pop() {
            if path.is_dir() {
                pending.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
                let roots = crate_roots(code);
                for module in modules.iter().filter(|m| roots.iter().any(|r| r == *m)) {
                    found.push((path.display().to_string(), module.to_string()));
                }
            }
        }
        found
    }

    fn stage_paths(folder: &str) -> Vec<(String, String)> {
        uses_of(folder, STAGES)
    }

    #[test]
    fn crate_paths_are_read_inside_braced_lists() {
        let code = "use crate::{data::x, eval::{A, B}, train::{DpoArgs, SftArgs}};\nuse crate::synth;\nfn f() { crate::filter::run() }";
        assert_eq!(crate_roots(code), ["data", "eval", "train", "synth", "filter"]);
    }

    /// Every module of the library is a stage or on the floor, so none escapes the checks below.
    #[test]
    fn every_library_module_is_a_stage_or_on_the_floor() {
        let lib = include_str!("lib.rs");
        for line in lib.lines().filter_map(|l| l.strip_prefix("pub mod ")) {
            let module = line.trim_end_matches(';');
            assert!(STAGES.contains(&module) || FLOOR.contains(&module), "lib.rs declares `{module}`, neither a stage nor on the floor");
        }
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
        for folder in FLOOR {
            let used = stage_paths(folder);
            assert!(used.is_empty(), "{folder} uses a stage: {used:?}");
        }
    }

    /// No circles in the floor: `run` never calls back up into `data`, `model` never into
    /// `engine`, and so on.
    #[test]
    fn a_floor_module_uses_only_the_floor_below_it() {
        for (level, folder) in FLOOR.iter().enumerate() {
            let above = uses_of(folder, &FLOOR[level + 1..]);
            assert!(above.is_empty(), "{folder} uses a floor module above it: {above:?}");
        }
    }
}
