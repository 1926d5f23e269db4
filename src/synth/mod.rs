//! `magpie synth`: harvest instructions from an aligned model by giving it only its pre-query
//! template, then collect its responses (docs/upstream.md §1–2): more turns with `--turns`, several
//! sampled responses per instruction with `--responses`, task control with system prompts.
//!
//! Work is split into chunks of `--chunk-rows` rows; each finished chunk is written as one part
//! file, atomically. Rerunning the same command skips finished chunks, so a kill loses at most the
//! chunk in flight and never duplicates a row. Row `g` always gets the same seed and uuid, and
//! `--shard i/N` takes every N-th chunk, so Slurm array tasks write disjoint parts of one dataset.
//!
//! With `--input`, the rows of an existing dataset are answered instead (`answer`).

pub mod answer;
pub mod driver;
pub mod pipeline;
pub mod rows;
pub mod sanitize;

use anyhow::{bail, Context, Result};
use crate::engine::{EngineChoice, EngineOptions};
use crate::data::chunks::Shard;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SynthArgs {
    #[command(flatten)]
    #[serde(skip)]
    pub run: crate::flags::OutputFlags,

    /// Model: a GGUF file or a Hugging Face safetensors directory. Defaults to the embedded
    /// SmolLM2-135M-Instruct GGUF that scripts/setup.sh puts in $MAGPIE_HOME.
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// Generation engine. `auto`: llama.cpp for GGUF on CPU, mistralrs otherwise, `openai`
    /// when `--base-url` is given.
    #[arg(long, value_enum, default_value_t = EngineChoice::Auto)]
    pub engine: EngineChoice,

    /// The server of `--engine openai`.
    #[command(flatten)]
    #[serde(skip)]
    pub server: crate::engine::openai::ServerFlags,

    /// Pre-query template: `auto` (derived from the model's chat template), a family (llama3,
    /// llama3.1, llama3.3, qwen2, qwen2.5, smollm2, chatml, gemma, gemma2, phi3, mistral, llama2)
    /// or a raw template string (`\n` escapes allowed).
    #[arg(long, default_value = "auto")]
    pub template: String,

    /// Tokens an instruction may not start with, comma-separated (each one token of the model's
    /// vocabulary): `auto`, the template's (Magpie's Llama-3.1 scripts ban `#`, `##`, `###`,
    /// `####`, a markdown heading; other templates none), or `none`. An instruction that starts
    /// with one is drawn again from another seed, up to 16 times.
    #[arg(long, default_value = "auto")]
    pub ban_first_tokens: String,

    /// Answer an existing dataset instead of harvesting: parquet files, folders or globs in our
    /// format (Magpie's released files too). Each row's conversation up to its last user turn is
    /// answered by --model; every other column is kept. Every row with a user turn is answered
    /// (--num is not used); rows without one are skipped and counted.
    #[arg(long, short)]
    pub input: Vec<String>,

    /// Output directory of part files (resumable; rerun the same command to continue).
    #[arg(long, short)]
    #[serde(skip)]
    pub output: Option<PathBuf>,

    /// Instructions to synthesise (attempts; empty ones are dropped and counted).
    #[arg(long, default_value_t = 100, value_parser = crate::flags::at_least_one)]
    pub num: usize,

    /// Instruction sampling temperature.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::temperature)]
    pub temperature: f32,

    /// Instruction nucleus sampling.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::top_p)]
    pub top_p: f32,

    /// Most tokens per instruction.
    #[arg(long, default_value_t = 2048, value_parser = crate::flags::at_least_one)]
    pub max_tokens: usize,

    /// Base seed; row g's seed is derived from it and g.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Stop instructions at their first newline, as Magpie does (`--early-stop-newline false` to
    /// switch off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub early_stop_newline: bool,

    /// Strip numbering and "Task:"-style prefixes and cut at "Answer:" / "## Step 1"; the
    /// generated text is kept in `raw_instruction`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub sanitize: bool,

    /// Response temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::temperature)]
    pub response_temperature: f32,

    /// Response nucleus sampling.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::top_p)]
    pub response_top_p: f32,

    /// Most tokens per response.
    #[arg(long, default_value_t = 4096, value_parser = crate::flags::at_least_one)]
    pub response_max_tokens: usize,

    /// Generate instructions only (no responses), e.g. to answer them with another model later
    /// (`magpie synth --input`).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub instructions_only: bool,

    /// Conversation turns (user + assistant pairs) per row.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::at_least_one)]
    pub turns: usize,

    /// A system prompt put ahead of the user header to steer the topic (task control).
    #[arg(long)]
    pub system_prompt: Option<String>,

    /// Weighted system prompts, one sampled per row (magpie-ultra style), as JSON:
    /// `[{"key": "coding", "weight": 0.125, "prompt": "..."}]`. The key goes to `system_prompt_key`.
    #[arg(long, value_parser = parse_system_prompts)]
    pub system_prompts: Option<SystemPrompts>,

    /// Sampled responses per instruction for preference data, into `responses`.
    #[arg(long, default_value_t = 0)]
    pub responses: usize,

    /// Temperature of the preference responses.
    #[arg(long, default_value_t = 0.8, value_parser = crate::flags::temperature)]
    pub preference_temperature: f32,

    /// This process's shard, `i/N`; defaults to SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT.
    #[arg(long, value_parser = crate::data::chunks::parse_shard)]
    #[serde(skip)]
    pub shard: Option<Shard>,

    /// Rows per checkpointed part file.
    #[arg(long, default_value_t = 128, value_parser = crate::flags::at_least_one)]
    pub chunk_rows: usize,

    /// Sequences decoded together (vLLM's `--max-num-seqs`): 256 in a CUDA build, 32 on CPU.
    #[arg(long, visible_alias = "max-num-seqs", default_value_t = crate::engine::DEFAULT_MAX_NUM_SEQS, value_parser = crate::flags::at_least_one)]
    #[serde(skip)]
    pub batch_size: usize,

    /// CPU threads for the engine (default: all cores).
    #[arg(long)]
    #[serde(skip)]
    pub threads: Option<usize>,

    /// KV-cache budget in tokens across the sequences of a batch, on CPU.
    #[arg(long, default_value_t = 65536)]
    #[serde(skip)]
    pub kv_tokens: usize,

    /// On a GPU: the share of its memory the engine may fill, weights and KV cache together
    /// (as vLLM's flag); the KV cache gets the rest after the weights. A KV cache that cannot hold
    /// one sequence is an error naming the sizes.
    #[arg(long, default_value_t = crate::engine::DEFAULT_GPU_MEMORY_UTILIZATION, value_parser = crate::flags::share)]
    #[serde(skip)]
    pub gpu_memory_utilization: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SystemPrompt {
    pub key: String,
    pub prompt: String,
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

pub type SystemPrompts = Vec<SystemPrompt>;

fn parse_system_prompts(json: &str) -> Result<SystemPrompts, String> {
    let prompts: SystemPrompts =
        serde_json::from_str(json).map_err(|e| format!("expected [{{key, prompt, weight}}, ...]: {e}"))?;
    if prompts.is_empty() || prompts.iter().any(|p| !(p.weight > 0.0)) {
        return Err("need at least one prompt, each with a positive weight".into());
    }
    Ok(prompts)
}

/// What a synth run does, read once from its flags: where it writes, which of the chunks this
/// process takes, the engine's settings (threads resolved), and whether it harvests new
/// instructions or answers existing rows (`flags.input`). Sampling and template settings are read from the
/// flags by the pipeline (they are also the recorded settings).
pub struct SynthPlan<'a> {
    pub flags: &'a SynthArgs,
    pub output: PathBuf,
    pub shard: Shard,
    pub engine: EngineOptions,
}

impl SynthArgs {
    /// The run's plan; every combination the flags cannot make is refused here, naming the flags.
    pub fn plan(&self) -> Result<SynthPlan<'_>> {
        if self.instructions_only && (self.turns > 1 || self.responses > 0) {
            bail!("--instructions-only cannot be combined with --turns > 1 or --responses");
        }
        if self.system_prompt.is_some() && self.system_prompts.is_some() {
            bail!("give --system-prompt or --system-prompts, not both");
        }
        if !self.input.is_empty() && (self.instructions_only || self.system_prompt.is_some() || self.system_prompts.is_some() || self.sanitize) {
            bail!("--input answers existing instructions: --instructions-only, --system-prompt(s) and --sanitize are for harvesting");
        }
        let output = self.output.clone().context("--output is required: the directory to write parts into")?;
        if output.extension().is_some_and(|e| e == "parquet") {
            bail!("{}: synth writes a directory of part files (so it can resume); give a directory", output.display());
        }
        match (self.engine, &self.server.base_url) {
            (EngineChoice::Openai, None) => bail!("--engine openai needs --base-url, the server to generate on"),
            (EngineChoice::Llamacpp | EngineChoice::Mistralrs, Some(_)) => {
                bail!("--base-url is for --engine openai (or auto); --engine {:?} generates in-process", self.engine)
            }
            _ => {}
        }
        let threads = self.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Ok(SynthPlan {
            flags: self,
            output,
            shard: Shard::resolve(self.shard)?,
            engine: EngineOptions::new(self.engine, self.batch_size, threads, self.kv_tokens, self.gpu_memory_utilization)
                .with_server(self.server.options()),
        })
    }
}

pub fn run(args: &SynthArgs) -> Result<()> {
    driver::run(&args.plan()?)
}
