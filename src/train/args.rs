//! The flags every training command takes, named as TRL's `TrainingArguments` names them. They
//! are read once, into a [`TrainPlan`](super::plan::TrainPlan), which is what the loop uses.

use std::path::PathBuf;

use super::memory::Checkpointing;
use super::optim::Schedule;
use crate::flags::{DeviceChoice, OutputFlags};

/// Flags every training command takes. Names follow TRL's `TrainingArguments`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct TrainArgs {
    #[command(flatten)]
    #[serde(skip)]
    pub run: OutputFlags,

    /// Base model: a Hugging Face safetensors directory (`magpie convert` makes one from a GGUF).
    #[arg(long)]
    pub model: PathBuf,

    /// Training dataset(s): parquet files, directories of parts, or globs.
    #[arg(long, short, required = true)]
    pub input: Vec<String>,

    /// Output directory: checkpoints, the final model in `model/`, metrics.jsonl and plots.
    #[arg(long, short)]
    pub output: PathBuf,

    /// Held-out fraction when the data has no `split` column (rows whose split is test, eval or
    /// validation are the eval set when it does).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::fraction_below_one)]
    pub eval_ratio: f64,

    /// Peak learning rate (AdamW), reached after warmup.
    #[arg(long, default_value_t = 2e-5, value_parser = crate::flags::non_negative)]
    pub learning_rate: f64,

    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub lr_scheduler_type: Schedule,

    /// Linear warmup as a fraction of all steps (ignored when --warmup-steps is set).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::fraction)]
    pub warmup_ratio: f64,

    /// Linear warmup in optimizer steps (overrides --warmup-ratio).
    #[arg(long)]
    pub warmup_steps: Option<usize>,

    /// AdamW's decoupled weight decay on every matrix (not on norms or biases), as TRL's
    /// Trainer applies it.
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::non_negative)]
    pub weight_decay: f64,

    /// Clip the global gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::non_negative)]
    pub max_grad_norm: f64,

    /// Passes over the training data (fractions allowed); --max-steps overrides it.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive)]
    pub num_train_epochs: f64,

    /// Stop after this many optimizer steps (overrides --num-train-epochs).
    #[arg(long, value_parser = crate::flags::at_least_one)]
    pub max_steps: Option<usize>,

    /// Examples per micro-batch on each device (process).
    #[arg(long, default_value_t = 8, value_parser = crate::flags::at_least_one)]
    pub per_device_train_batch_size: usize,

    /// Micro-batches summed into one optimizer step.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::at_least_one)]
    pub gradient_accumulation_steps: usize,

    /// Seed of the data order, splits and new weights; a rerun with the same seed reproduces.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Save a checkpoint every N optimizer steps (0: only the final model).
    #[arg(long, default_value_t = 500)]
    pub save_steps: usize,

    /// Keep at most this many checkpoints (oldest deleted first).
    #[arg(long)]
    pub save_total_limit: Option<usize>,

    /// Evaluate every N steps (0: only at the end) when there is an eval split.
    #[arg(long, default_value_t = 0)]
    pub eval_steps: usize,

    /// Log metrics (metrics.jsonl, the progress bar) every N optimizer steps.
    #[arg(long, default_value_t = 1, value_parser = crate::flags::at_least_one)]
    pub logging_steps: usize,

    /// cpu, cuda, cuda:N, or auto (the first CUDA device when libtorch sees one).
    #[arg(long, default_value = "auto", value_parser = crate::flags::device)]
    pub device: DeviceChoice,

    /// Mixed precision as DeepSpeed and FSDP do it: bf16 weights for compute, fp32 master
    /// weights and fp32 Adam moments in the optimizer.
    #[arg(long)]
    pub bf16: bool,

    /// With --bf16: no fp32 master weights and bf16 Adam moments (saves 6 bytes a parameter).
    /// Updates smaller than bf16's spacing are lost, so small learning rates barely train.
    #[arg(long)]
    pub no_fp32_optimizer_state: bool,

    /// Deterministic CUDA kernels (libtorch's deterministic algorithms, cuDNN deterministic,
    /// CUBLAS_WORKSPACE_CONFIG=:4096:8), as transformers' `full_determinism`: a CUDA run and its
    /// resume repeat bit for bit, somewhat slower. CPU runs are deterministic without it.
    #[arg(long)]
    pub full_determinism: bool,

    /// Recompute each block in the backward pass instead of keeping its activations (about a
    /// third more compute). A number N (2 or more): N blocks, spread over the depth. `auto`: the
    /// fewest blocks whose memory plan (`--dry-run`) fits in 90% of the device's memory (none
    /// where the plan without it fits). The flag alone means true.
    #[arg(long, value_name = "true|false|auto|N", num_args = 0..=1, default_value = "false", default_missing_value = "true")]
    pub gradient_checkpointing: Checkpointing,

    #[command(flatten)]
    #[serde(flatten)]
    pub lora: LoraArgs,

    /// With several processes (torchrun, srun): seconds a collective or the rendezvous may wait
    /// for the other ranks before failing, as TRL's `ddp_timeout`.
    #[arg(long, default_value_t = 1800)]
    #[serde(skip)]
    pub ddp_timeout: u64,

    /// Print the memory each rank will need for PROCESSES ranks (default: the launcher's world
    /// size, else 1) and exit without training. Needs only the model's config.json.
    #[arg(long, value_name = "PROCESSES", num_args = 0..=1, default_missing_value = "0")]
    #[serde(skip)]
    pub dry_run: Option<usize>,

    /// Continue from the latest checkpoint in --output.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
}

/// LoRA adapters instead of full fine-tuning, with the names of TRL's `ModelConfig` and the
/// meaning of PEFT's `LoraConfig`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct LoraArgs {
    /// Train LoRA adapters (PEFT's format) instead of every weight: the base model stays frozen
    /// in its dtype, only the f32 adapters take gradients and optimizer state, and the model
    /// saved is a PEFT adapter folder (`magpie merge` folds it into full weights). DPO's
    /// reference is then the policy as it starts (fresh adapters off, or a frozen copy of the
    /// --adapter it loaded), unless --ref-model is given.
    #[arg(long, help_heading = "LoRA")]
    pub use_peft: bool,

    /// LoRA rank r.
    #[arg(long, default_value_t = 16, requires = "use_peft", value_parser = clap::value_parser!(i64).range(1..), help_heading = "LoRA")]
    pub lora_r: i64,

    /// LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with --use-rslora).
    #[arg(long, default_value_t = 32.0, requires = "use_peft", value_parser = crate::flags::non_negative, help_heading = "LoRA")]
    pub lora_alpha: f64,

    /// Dropout on the adapters' inputs while training.
    #[arg(long, default_value_t = 0.05, requires = "use_peft", value_parser = crate::flags::fraction_below_one, help_heading = "LoRA")]
    pub lora_dropout: f64,

    /// Modules that get adapters, comma-separated: q_proj, k_proj, v_proj, o_proj, gate_proj,
    /// up_proj, down_proj, or all-linear (all seven). PEFT's default for Llama is q_proj,v_proj.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj", requires = "use_peft", help_heading = "LoRA")]
    pub lora_target_modules: Vec<String>,

    /// Rank-stabilised LoRA: scale by alpha / sqrt(r) (PEFT's use_rslora).
    #[arg(long, requires = "use_peft", help_heading = "LoRA")]
    pub use_rslora: bool,

    /// Start from this PEFT adapter folder (its adapter_config.json sets r, alpha, dropout and
    /// the targets), e.g. a `magpie sft --use-peft` model to train further with DPO.
    #[arg(long, value_name = "DIR", help_heading = "LoRA",
          conflicts_with_all = ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora"])]
    pub adapter: Option<PathBuf>,
}

impl LoraArgs {
    /// Whether the run trains adapters (`--use-peft` or `--adapter`).
    pub fn enabled(&self) -> bool {
        self.use_peft || self.adapter.is_some()
    }
}

/// Training flags parsed as the command line would parse them, for tests.
#[cfg(test)]
pub fn parse_for_test<'a>(argv: impl IntoIterator<Item = &'a str>) -> TrainArgs {
    #[derive(clap::Parser)]
    #[command(args_override_self = true)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }
    <Cli as clap::Parser>::parse_from(std::iter::once("magpie").chain(argv)).train
}
