//! What `magpie sft` and `magpie dpo` share around the loop, in order: `--dry-run`'s memory plan,
//! the flags read into a plan (the ranks and the device joined), the seed, the model named, the rows read, the output checked once
//! (before anything is loaded or tokenised), then the objective the stage builds from its rows,
//! and training. Only the objective differs between the two commands.

use anyhow::Result;
use serde_json::Value;
use std::path::PathBuf;
use super::args::TrainArgs;
use super::checkpoint;
use super::examples::{read_rows, TrainingRows};
use super::memory::{self, Workload};
use super::objective::Objective;
use super::plan::TrainPlan;
use super::trainer::{self, Summary};
use crate::model::{load_causal_lm, Loaded};

/// One training command's shape: its name, the columns it reads, the work of one micro-batch
/// (for `--dry-run`), the models it reads besides `--model`, and its objective's settings (which
/// a resumed run must share).
pub struct Command<'a> {
    pub args: &'a TrainArgs,
    pub stage: &'static str,
    pub columns: &'a [&'a str],
    pub workload: Workload,
    pub also_reads: Vec<PathBuf>,
    pub settings: Value,
}

/// What a command builds from its rows: the objective and the policy to train.
pub struct Built<O> {
    pub objective: O,
    pub policy: Loaded,
}

/// Runs `command`; `build` turns the rows into the objective on the plan's device. Returns the
/// summary on rank 0, `None` on the other ranks and with `--dry-run`.
pub fn run<O: Objective>(command: Command, build: impl FnOnce(TrainingRows, &TrainPlan) -> Result<Built<O>>) -> Result<Option<Summary>> {
    let args = command.args;
    if let Some(processes) = args.dry_run_processes()? {
        let config = crate::model::ModelDir::open(&args.model)?.config;
        let lora = args.lora_plan()?.map(|l| l.config);
        // `auto` decides for this machine's device; a login node without the run's GPU plans too.
        let device = args.device.resolve(None).ok();
        let (fit, why) = memory::resolve(args.gradient_checkpointing, &config, args.precision(), processes as i64, &command.workload,
                                         lora.as_ref(), device, || device.and_then(memory::device_memory));
        print!("{}{}", why.map_or(String::new(), |why| why + "\n"),
               memory::render(&config, args.precision(), fit, processes as i64, &command.workload, lora.as_ref()));
        return Ok(None);
    }
    if args.full_determinism {
        super::determinism::enable()?; // before the plan joins the ranks and touches CUDA
        let workspace = std::env::var("CUBLAS_WORKSPACE_CONFIG").unwrap_or_default();
        let state = if super::determinism::enabled() { "on" } else { "off" };
        eprintln!("full determinism: libtorch's deterministic algorithms {state}, CUBLAS_WORKSPACE_CONFIG={workspace}");
    }
    let mut plan = args.plan()?;
    tch::manual_seed(plan.seed as i64);
    let config = crate::model::ModelDir::open(&plan.model)?.config; // a missing model is named before anything else
    let lora = plan.lora.as_ref().map(|l| &l.config);
    let (fit, why) = memory::resolve(args.gradient_checkpointing, &config, plan.precision, plan.world.size as i64, &command.workload,
                                     lora, Some(plan.device), || memory::device_memory(plan.device));
    plan.fit = fit;
    if let Some(why) = why.filter(|_| plan.world.is_main()) {
        eprintln!("{why}");
    }
    let rows = read_rows(&plan.inputs, command.columns, plan.eval_ratio, plan.seed)?;
    let mut inputs = rows.files.clone();
    inputs.push(plan.model.clone());
    inputs.extend(command.also_reads);
    inputs.extend(plan.lora.as_ref().and_then(|l| l.from.clone()));
    let output = if plan.world.is_main() { Some(checkpoint::prepare_output(&plan, command.stage, &command.settings, &inputs)?) } else { None };
    let built = build(rows, &plan)?;
    let summary = trainer::train(&built.objective, &built.policy, &plan, command.stage, &command.settings, output)?;
    Ok(plan.world.is_main().then_some(summary))
}

/// The model to train, in the plan's dtype on its device: with LoRA, frozen, with its adapters.
pub fn load_policy(plan: &TrainPlan) -> Result<Loaded> {
    let mut policy = load_causal_lm(&plan.model, plan.device, plan.precision.dtype)?;
    if let Some(lora) = &plan.lora {
        policy.add_adapters(&lora.config, lora.from.as_deref(), plan.seed)?;
    }
    Ok(policy)
}
