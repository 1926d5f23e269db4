//! A training command's flags read once into a typed plan (torchtitan's `config.build()`,
//! ripgrep's high-level args): the optimizer, the schedule, the checkpoints, the precision, the
//! ranks and the device. Sentinels are resolved here (`--save-steps 0`, `--max-grad-norm 0`,
//! `--eval-steps 0`, `--dry-run` without a count), so the loop never reads a flag.

use anyhow::{Context, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use tch::{Device, Kind};

use super::args::TrainArgs;
use super::distributed::{Launch, World};
use super::memory::{Checkpointing, Fit};
use super::optim::Schedule;
use crate::model::lora::LoraConfig;

/// What a training run does, from its flags.
pub struct TrainPlan {
    /// The base model's folder.
    pub model: PathBuf,
    /// The training datasets as given (files, folders, globs).
    pub inputs: Vec<String>,
    /// The run's folder.
    pub output: PathBuf,
    /// Replace a finished run of ours at `output`.
    pub overwrite: bool,
    /// Seed of the data order, the splits and new weights.
    pub seed: u64,
    /// Held-out share when the data has no `split` column.
    pub eval_ratio: f64,
    pub optimizer: OptimizerPlan,
    pub schedule: SchedulePlan,
    pub checkpoints: CheckpointPlan,
    /// Evaluate every N steps; `None`: only at the end.
    pub eval_every: Option<usize>,
    /// Log every N optimizer steps (at least 1).
    pub logging_steps: usize,
    pub precision: Precision,
    /// Blocks run again in the backward pass and the vocabulary head's chunk: from the flag here,
    /// then sized to the device by the driver (`memory::resolve`).
    pub fit: Fit,
    /// LoRA adapters instead of full fine-tuning.
    pub lora: Option<LoraPlan>,
    /// The ranks training together (one without a launcher).
    pub world: World,
    /// This rank's device.
    pub device: Device,
    /// The flags as given, which a resumed run must share (the run claim and checkpoints hold
    /// them).
    pub flags: Value,
}

/// LoRA: the adapters' shape, and the saved adapter the run starts from (fresh ones otherwise).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPlan {
    pub config: LoraConfig,
    pub from: Option<PathBuf>,
}

/// AdamW's settings besides the learning rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimizerPlan {
    /// Decoupled weight decay on every matrix.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
}

/// The compute dtype and what the optimizer keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Precision {
    /// The weights' and activations' dtype: f32, or bf16 with `--bf16`.
    pub dtype: Kind,
    /// fp32 master weights (under bf16) and fp32 Adam moments.
    pub fp32_state: bool,
}

/// The learning rate over the steps, and the batches that make a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulePlan {
    pub lr: Schedule,
    /// The peak learning rate, reached after warmup.
    pub peak_lr: f64,
    pub warmup: Warmup,
    pub length: Length,
    /// Examples per micro-batch on each rank.
    pub per_device_batch: usize,
    /// Micro-batches per optimizer step.
    pub accumulation: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Warmup {
    /// A share of all steps, rounded up.
    Ratio(f64),
    Steps(usize),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Length {
    /// Passes over the data (fractions allowed), rounded up to whole steps.
    Epochs(f64),
    Steps(usize),
}

/// When checkpoints are saved, how many are kept, and whether the run continues from one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CheckpointPlan {
    /// Save every N optimizer steps; `None`: only the final model.
    pub every: Option<usize>,
    /// Keep at most this many (at least 1), oldest removed first.
    pub keep: Option<usize>,
    /// Continue from the newest checkpoint in the output.
    pub resume: bool,
}

impl Precision {
    /// Whether micro-batch gradients are summed in f32 ([`GradientSums`](super::optim::GradientSums)):
    /// bf16 weights, fp32 optimizer state, and more than one micro-batch a step.
    pub fn f32_gradient_sums(&self, micro_batches: usize) -> bool {
        self.dtype != Kind::Float && self.fp32_state && micro_batches > 1
    }
}

impl TrainPlan {
    pub fn f32_gradient_sums(&self) -> bool {
        self.precision.f32_gradient_sums(self.schedule.accumulation)
    }
}

impl SchedulePlan {
    /// All optimizer steps for `steps_per_epoch`.
    pub fn total_steps(&self, steps_per_epoch: usize) -> usize {
        match self.length {
            Length::Steps(steps) => steps,
            Length::Epochs(epochs) => (epochs * steps_per_epoch as f64).ceil() as usize,
        }
    }

    /// Warmup steps of a run of `total` steps.
    pub fn warmup_steps(&self, total: usize) -> usize {
        match self.warmup {
            Warmup::Steps(steps) => steps,
            Warmup::Ratio(ratio) => (ratio * total as f64).ceil() as usize,
        }
    }
}

impl TrainArgs {
    /// The plan of the run, on the ranks the launcher's environment names (joining them).
    pub fn plan(&self) -> Result<TrainPlan> {
        let (world, device) = World::from_env(self.device, Duration::from_secs(self.ddp_timeout))?;
        Ok(TrainPlan {
            model: self.model.clone(),
            inputs: self.input.clone(),
            output: self.output.clone(),
            overwrite: self.run.overwrite,
            seed: self.seed,
            eval_ratio: self.eval_ratio,
            optimizer: OptimizerPlan {
                weight_decay: self.weight_decay,
                max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            },
            schedule: SchedulePlan {
                lr: self.lr_scheduler_type,
                peak_lr: self.learning_rate,
                warmup: self.warmup_steps.map_or(Warmup::Ratio(self.warmup_ratio), Warmup::Steps),
                length: self.max_steps.map_or(Length::Epochs(self.num_train_epochs), Length::Steps),
                per_device_batch: self.per_device_train_batch_size,
                accumulation: self.gradient_accumulation_steps,
            },
            checkpoints: CheckpointPlan {
                every: (self.save_steps > 0).then_some(self.save_steps),
                keep: self.save_total_limit.map(|n| n.max(1)),
                resume: self.resume,
            },
            eval_every: (self.eval_steps > 0).then_some(self.eval_steps),
            logging_steps: self.logging_steps.max(1),
            precision: self.precision(),
            // `auto` is decided by the driver, against the model's memory plan.
            fit: Fit::recomputing(match self.gradient_checkpointing {
                Checkpointing::On => usize::MAX,
                Checkpointing::Blocks(count) => count,
                Checkpointing::Off | Checkpointing::Auto => 0,
            }),
            lora: self.lora_plan()?,
            world,
            device,
            flags: serde_json::to_value(self)?,
        })
    }

    /// `--use-peft` and the `--lora-*` flags, or `--adapter`'s saved config.
    pub fn lora_plan(&self) -> Result<Option<LoraPlan>> {
        let flags = &self.lora;
        Ok(match &flags.adapter {
            Some(dir) => Some(LoraPlan { config: LoraConfig::read(dir).context("--adapter")?, from: Some(dir.clone()) }),
            None if flags.use_peft => {
                let config = LoraConfig::new(flags.lora_r, flags.lora_alpha, flags.lora_dropout, &flags.lora_target_modules, flags.use_rslora)
                    .context("--lora-target-modules")?;
                Some(LoraPlan { config, from: None })
            }
            None => None,
        })
    }

    /// `--bf16` and `--no-fp32-optimizer-state` as one setting.
    pub fn precision(&self) -> Precision {
        Precision { dtype: if self.bf16 { Kind::BFloat16 } else { Kind::Float }, fp32_state: !self.no_fp32_optimizer_state }
    }

    /// With `--dry-run`: the processes to plan for (a bare `--dry-run`, or 0: the launcher's world
    /// size, else 1).
    pub fn dry_run_processes(&self) -> Result<Option<usize>> {
        Ok(match self.dry_run {
            None => None,
            Some(0) => Some(Launch::from_env()?.map_or(1, |launch| launch.world)),
            Some(n) => Some(n),
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::train::args::parse_for_test;
    use super::*;

    fn plan(extra: &[&str]) -> TrainPlan {
        parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--device", "cpu"].into_iter().chain(extra.iter().copied())).plan().unwrap()
    }

    #[test]
    fn sentinels_and_overrides_are_resolved_once() {
        let defaults = plan(&[]);
        assert_eq!(defaults.optimizer.max_grad_norm, Some(1.0));
        assert_eq!(defaults.checkpoints, CheckpointPlan { every: Some(500), keep: None, resume: false });
        assert_eq!((defaults.eval_every, defaults.schedule.warmup, defaults.schedule.length), (None, Warmup::Ratio(0.0), Length::Epochs(1.0)));
        assert_eq!((defaults.device, defaults.world.size, defaults.precision.dtype), (Device::Cpu, 1, Kind::Float));

        let set = plan(&["--max-grad-norm", "0", "--save-steps", "0", "--save-total-limit", "0", "--eval-steps", "5", "--warmup-ratio", "0.5",
                         "--warmup-steps", "3", "--max-steps", "7", "--num-train-epochs", "2", "--bf16", "--no-fp32-optimizer-state"]);
        assert_eq!(set.optimizer.max_grad_norm, None);
        assert_eq!((set.checkpoints.every, set.checkpoints.keep, set.eval_every), (None, Some(1), Some(5)));
        assert_eq!((set.schedule.warmup, set.schedule.length), (Warmup::Steps(3), Length::Steps(7)));
        assert_eq!(set.precision, Precision { dtype: Kind::BFloat16, fp32_state: false });
        assert_eq!((set.schedule.total_steps(100), set.schedule.warmup_steps(7)), (7, 3));
        assert_eq!((defaults.schedule.total_steps(10), plan(&["--num-train-epochs", "1.25"]).schedule.total_steps(10)), (10, 13));
    }

    #[test]
    fn the_recorded_flags_are_the_flags_as_given() {
        let flags = plan(&["--device", "cpu", "--overwrite", "--resume", "--dry-run", "2"]).flags;
        assert_eq!(flags["device"], "cpu");
        assert_eq!(flags["learning_rate"], 2e-5);
        for unrecorded in ["overwrite", "resume", "dry_run", "recipe", "run", "ddp_timeout"] {
            assert!(flags.get(unrecorded).is_none(), "{unrecorded} is not a setting a resumed run must share");
        }
    }

    #[test]
    fn a_bare_dry_run_plans_for_one_process_without_a_launcher() {
        let args = |extra: &[&str]| parse_for_test(["--model", "m", "-i", "x", "-o", "y"].into_iter().chain(extra.iter().copied()));
        assert_eq!(args(&[]).dry_run_processes().unwrap(), None);
        assert_eq!(args(&["--dry-run"]).dry_run_processes().unwrap(), Some(1));
        assert_eq!(args(&["--dry-run", "8"]).dry_run_processes().unwrap(), Some(8));
    }
}
