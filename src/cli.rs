//! The command line: one subcommand per stage, each args struct owned by its stage's module so
//! the library can be driven without the CLI. `--recipe FILE.yaml` is spliced in by `recipe`.

use magpie::{data::inspect::InspectArgs, doctor::DoctorArgs, eval::EvalArgs, filter::FilterArgs, model::convert::ConvertArgs, model::merge::MergeArgs, synth::SynthArgs, train::{DpoArgs, SftArgs}};
use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use std::ffi::OsString;

/// The Magpie alignment recipe (arXiv 2406.08464) as one binary: synthesise instructions and
/// responses from an aligned model's pre-query template, filter them, and train on them.
///
/// Every stage reads and writes one parquet dataset format; `magpie inspect` shows any of them.
#[derive(Parser, Debug)]
#[command(name = "magpie", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Synthesise instructions and responses from an instruct model's pre-query template.
    #[command(args_override_self = true)]
    Synth(SynthArgs),
    /// Tag, deduplicate, score and select rows (e.g. down to Magpie-Pro-300K).
    #[command(args_override_self = true)]
    Filter(FilterArgs),
    /// Supervised fine-tuning of a Llama-family model on conversations.
    #[command(args_override_self = true)]
    Sft(SftArgs),
    /// Direct preference optimisation on chosen/rejected pairs, as TRL computes it.
    #[command(args_override_self = true)]
    Dpo(DpoArgs),
    /// Judge a trained model's answers against a baseline's (both orders) or grade them 1-10,
    /// with a local judge model.
    #[command(args_override_self = true)]
    Eval(EvalArgs),
    /// Show a dataset: rows, schema, null counts, length statistics and sample conversations.
    #[command(args_override_self = true)]
    Inspect(InspectArgs),
    /// Convert a GGUF model (llama architecture) into a Hugging Face safetensors directory.
    #[command(args_override_self = true)]
    Convert(ConvertArgs),
    /// Fold a LoRA adapter (PEFT's format) into its base model: a full model transformers and
    /// mistralrs load.
    #[command(args_override_self = true)]
    Merge(MergeArgs),
    /// Check this machine: CPU features, llama.cpp's CPU paths, libtorch and CUDA, models, cache.
    Doctor(DoctorArgs),
}

/// Parses `argv` with any `--recipe` spliced in. A flag given twice takes its last value.
/// Clap's own errors (and `--help`) come back as a `clap::Error` for `main` to print and exit
/// with.
pub fn parse(argv: impl IntoIterator<Item = OsString>) -> Result<Cli> {
    let expanded = crate::recipe::expand(&Cli::command(), argv.into_iter().collect())?;
    Ok(Cli::try_parse_from(&expanded.argv).map_err(|error| expanded.attribute(error))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// `--help` is the manual: every argument of every command says what it does.
    #[test]
    fn every_argument_of_every_command_is_documented() {
        let mut bare = vec![];
        for command in Cli::command().get_subcommands() {
            for arg in command.get_arguments().filter(|a| !matches!(a.get_id().as_str(), "help" | "version")) {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    bare.push(format!("magpie {} {}", command.get_name(), arg.get_long().map_or(arg.get_id().to_string(), |l| format!("--{l}"))));
                }
            }
        }
        assert!(bare.is_empty(), "arguments without a doc comment: {bare:?}");
    }
}
