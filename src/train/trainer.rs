//! The training loop SFT and DPO share, nanoGPT-style: for each optimizer step, micro-batches go
//! forward and backward (the loss divided by the whole step's weight, so accumulation equals one
//! big batch), then clip, AdamW, schedule, log, evaluate, checkpoint.
//!
//! SFT and DPO differ only in their [`Objective`]. The data order is a pure function of the seed
//! and the epoch, so resuming from a checkpoint (`checkpoint`) is the same code path as starting
//! and gives the same losses as an uninterrupted run.
//!
//! Data parallel over a [`World`] of N processes, as accelerate and TRL do it: every micro-batch
//! of the step is N × `per_device_train_batch_size` examples, each rank takes its contiguous
//! slice, the loss is normalised by the whole step's weight, and the optimizer
//! ([`ShardedAdamW`]) sums the gradients over the ranks. With one process this is the
//! single-process loop with [`AdamW`], exactly. Rank 0 writes the run's folder.

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::Tensor;

use super::plan::TrainPlan;
use super::backward::forward_backward;
use super::checkpoint;
use super::metrics::{write_plots, MetricsLog};
use super::objective::{self, Metrics, Objective, Split};
use super::distributed::zero::{ShardedAdamW, BUCKET_ELEMENTS};
use super::distributed::World;
use super::optim::{AdamW, Optimizer};
use crate::model::{Llama, Loaded};
use crate::run::{Prepared, Provenance, RunDir};

/// The order of training examples in `epoch`: a splitmix64 shuffle of (seed, epoch), so any
/// position can be recomputed on resume.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    crate::seed::permutation(n, seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The run's steps over its examples, and where each step's micro-batches come from.
struct Steps {
    examples: usize,
    /// Examples per micro-batch over all ranks.
    batch: usize,
    accumulation: usize,
    seed: u64,
    world: usize,
    micro_per_epoch: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
}

impl Steps {
    fn new(plan: &TrainPlan, examples: usize) -> Result<Steps> {
        if examples == 0 {
            bail!("no training examples are left after tokenisation");
        }
        let (world, accumulation) = (plan.world.size, plan.schedule.accumulation);
        let batch = plan.schedule.per_device_batch * world;
        let micro_per_epoch = examples.div_ceil(batch);
        let steps_per_epoch = micro_per_epoch.div_ceil(accumulation);
        let total_steps = plan.schedule.total_steps(steps_per_epoch);
        let warmup = plan.schedule.warmup_steps(total_steps);
        Ok(Steps { examples, batch, accumulation, seed: plan.seed, world, micro_per_epoch, steps_per_epoch, total_steps, warmup })
    }

    /// The example indices of each micro-batch of optimizer step `step` (0-based), over all
    /// ranks. With several ranks a short last micro-batch is filled up from the start of the
    /// epoch's order (accelerate's `even_batches`), so that every rank has examples.
    fn step_batches(&self, step: usize) -> Vec<Vec<usize>> {
        let (examples, world, batch, accum) = (self.examples, self.world, self.batch, self.accumulation);
        let epoch = step / self.steps_per_epoch;
        let order = epoch_order(examples, self.seed, epoch);
        let first = (step % self.steps_per_epoch) * accum;
        (first..(first + accum).min(self.micro_per_epoch))
            .map(|m| {
                let end = if world > 1 { (m + 1) * batch } else { ((m + 1) * batch).min(examples) };
                (m * batch..end).map(|i| order[i % examples]).collect()
            })
            .collect()
    }
}

/// Rank `rank`'s slice of a micro-batch of `world` ranks' examples.
fn rank_slice(examples: &[usize], rank: usize, world: usize) -> &[usize] {
    let per_rank = examples.len().div_ceil(world);
    &examples[(rank * per_rank).min(examples.len())..((rank + 1) * per_rank).min(examples.len())]
}

/// Loss and metrics over the whole eval split, weighted means, under `eval_` names. The ranks
/// take the batches in turn; a rank left without one evaluates the first with weight 0, so that
/// every rank sums the same metrics.
pub fn evaluate(objective: &dyn Objective, model: &Llama, per_device_batch: usize, world: &World) -> Result<Option<BTreeMap<String, f64>>> {
    let n = objective.len(Split::Eval);
    if n == 0 {
        return Ok(None);
    }
    let mut sums = Metrics::new();
    let indices: Vec<usize> = (0..n).collect();
    let chunks: Vec<&[usize]> = indices.chunks(per_device_batch).collect();
    let mine: Vec<(&[usize], f64)> = match chunks.iter().skip(world.rank).step_by(world.size).map(|c| (*c, 1.0)).collect::<Vec<_>>() {
        none if none.is_empty() => vec![(chunks[0], 0.0)],
        some => some,
    };
    for (chunk, scale) in mine {
        let batch = objective.collate(Split::Eval, chunk, model.device())?;
        let (_, metrics) = tch::no_grad(|| -> Result<_> {
            objective.loss(model, &model.hidden_states(&batch.inputs()), &batch, Split::Eval)
        })?;
        objective::accumulate(&mut sums, metrics.into_iter().map(|(k, v)| (k, v * scale)).collect());
    }
    let weight: f64 = (0..n).map(|i| objective.weight(Split::Eval, i)).sum();
    let sums = world_sums(world, sums)?;
    Ok(Some(objective::read(&sums, weight.max(1.0))?.into_iter().map(|(k, v)| (format!("eval_{k}"), v)).collect()))
}

/// Metric sums over every rank (one all-reduce); a single process's as they are.
fn world_sums(world: &World, sums: Metrics) -> Result<Metrics> {
    let (keys, values): (Vec<&'static str>, Vec<Tensor>) = sums.into_iter().unzip();
    Ok(keys.into_iter().zip(world.sum_scalars(&values)?).collect())
}

/// What a finished run reports.
pub struct Summary {
    pub steps: usize,
    pub last: BTreeMap<String, f64>,
    pub eval: Option<BTreeMap<String, f64>>,
}

/// One training run: the model, its optimizer, the plan of steps and the run's folder.
pub struct Trainer<'a> {
    objective: &'a dyn Objective,
    loaded: &'a Loaded,
    plan: &'a TrainPlan,
    provenance: Provenance,
    steps: Steps,
    opt: Box<dyn Optimizer + 'a>,
    /// Rank 0's output folder; other ranks write only their optimizer shards.
    output: Option<RunDir>,
    /// Rank 0's metrics.jsonl; other ranks log nothing.
    log: Option<MetricsLog>,
    bar: ProgressBar,
    start: usize,
    /// For MFU: the policy's matrix parameters and its GPUs' dense peak FLOP/s (CUDA only).
    flops: Option<(i64, f64)>,
}

/// Trains `loaded` on `objective` (`stage`: `sft` or `dpo`) and saves the final model to
/// `output/model`. `extra` holds the objective's own settings, which a resumed checkpoint must
/// share; `output` is what `checkpoint::prepare_output` decided for the folder (rank 0 only).
pub fn train(objective: &dyn Objective, loaded: &Loaded, plan: &TrainPlan, stage: &str, extra: &Value, output: Option<Prepared>) -> Result<Summary> {
    Trainer::new(objective, loaded, plan, stage, extra, output)?.run()
}

impl<'a> Trainer<'a> {
    pub fn new(objective: &'a dyn Objective, loaded: &'a Loaded, plan: &'a TrainPlan, stage: &str, extra: &Value, output: Option<Prepared>) -> Result<Self> {
        let (world, precision) = (&plan.world, plan.precision);
        let steps = Steps::new(plan, objective.len(Split::Train))?;
        let output = output.map(Prepared::apply).transpose()?;
        world.barrier()?; // the other ranks read the folder only once rank 0 has set it up
        let provenance = Provenance::new(stage, checkpoint::settings(plan, extra));
        if precision.dtype == tch::Kind::BFloat16 && !precision.fp32_state && plan.schedule.peak_lr < 1e-4 {
            eprintln!(
                "warning: --no-fp32-optimizer-state keeps no fp32 master weights: at --learning-rate {:e} most updates are smaller than bf16's spacing and are lost",
                plan.schedule.peak_lr
            );
        }
        let weight_decay = plan.optimizer.weight_decay;
        let f32_sums = plan.f32_gradient_sums();
        let mut opt: Box<dyn Optimizer + 'a> = match world.group() {
            None => Box::new(AdamW::new(loaded.trained(), weight_decay, precision.fp32_state, f32_sums)),
            Some(group) => Box::new(ShardedAdamW::new(loaded.trained(), weight_decay, precision.fp32_state, f32_sums, group, BUCKET_ELEMENTS)),
        };
        let start = if plan.checkpoints.resume { checkpoint::resume(loaded, opt.as_mut(), &plan.output, &provenance.settings)? } else { 0 };
        let log = if world.is_main() { Some(MetricsLog::open(&plan.output, start)?) } else { None };
        let bar = if world.is_main() { ProgressBar::new(steps.total_steps as u64) } else { ProgressBar::hidden() }.with_position(start as u64);
        bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
        bar.set_prefix("train");
        let flops = plan.device.is_cuda().then(super::metrics::gpu_peak_flops).flatten().map(|peak| (matmul_parameters(&loaded.dir.config), peak));
        Ok(Trainer { objective, loaded, plan, provenance, steps, opt, output, log, bar, start, flops })
    }

    /// The loop, one optimizer step per pass.
    pub fn run(mut self) -> Result<Summary> {
        let (plan, total) = (self.plan, self.steps.total_steps);
        let mut eval = None;
        let mut last = BTreeMap::new();
        if self.start == 0 && plan.eval_every.is_some() {
            eval = self.evaluate_and_log(0)?; // the baseline later evaluations are read against
        }
        let mut last_saved = self.start;
        // Since the last step whose metrics were read: when its successor started, and the tokens
        // seen. Throughput is measured over that interval, which starts after a host sync, so
        // on CUDA it counts exactly the work queued within it.
        let (mut interval_start, mut interval_tokens) = (None, 0);
        for step in self.start..total {
            let started = *interval_start.get_or_insert_with(Instant::now);
            let lr = plan.schedule.lr.lr(plan.schedule.peak_lr, step, self.steps.warmup, total);
            let (mut sums, weight, step_tokens, grad_norm) = self.forward_backward_step(step)?;
            interval_tokens += step_tokens;
            let done = step + 1;
            let evaluate = plan.eval_every.is_some_and(|every| done % every == 0) || done == total;
            let save = plan.checkpoints.every.is_some_and(|every| done % every == 0) && done < total;
            // Metrics cross to the host only on logging, evaluation and save steps (one copy),
            // before the update, so a non-finite step is never applied there nor saved. On other
            // steps nothing waits for the device; a divergence shows at the next such step.
            if done % plan.logging_steps == 0 || evaluate || save {
                sums.insert("tokens", Tensor::from(interval_tokens as f64 * weight).to_device(self.loaded.model.device())); // read() divides by weight
                let mut sums = world_sums(&plan.world, sums)?;
                sums.insert("grad_norm", grad_norm * weight); // already global
                let mut metrics = objective::read(&sums, weight)?;
                let grad_norm = metrics.remove("grad_norm").unwrap_or(f64::NAN);
                let tokens = metrics.remove("tokens").unwrap_or(0.0).round() as usize;
                let loss = metrics.get("loss").copied().unwrap_or(f64::NAN);
                if !loss.is_finite() || !grad_norm.is_finite() {
                    self.bar.abandon();
                    let kept = if last_saved > 0 { format!("checkpoint-{last_saved} is kept") } else { "no checkpoint was saved yet".into() };
                    bail!("step {done}: loss is {loss}, gradient norm {grad_norm}; stopping ({kept}). Lower --learning-rate or check the data.");
                }
                self.opt.step(lr)?;
                self.log_step(done, lr, grad_norm, tokens, started.elapsed().as_secs_f64(), &metrics)?;
                (interval_start, interval_tokens) = (None, 0);
                last = metrics;
            } else {
                self.opt.step(lr)?;
                self.bar.inc(1);
            }
            if evaluate {
                eval = self.evaluate_and_log(done)?.or(eval);
            }
            if save {
                checkpoint::save(self.loaded, self.opt.as_ref(), done, plan, &self.provenance)?;
                last_saved = done;
            }
        }
        self.bar.finish();
        if let Some(name) = first_non_finite_weight(self.loaded.trained()) {
            bail!(
                "after step {total}, weight `{name}` holds NaN or infinite values; the model is not saved and the run not marked finished \
                 (lower --learning-rate or check the data)"
            );
        }
        if let (Some(log), Some(output)) = (&self.log, &self.output) {
            self.loaded.save(&plan.output.join("model"), &self.provenance)?;
            // The model is saved; a plot that fails should not turn that into a failed run.
            if let Err(e) = write_plots(log, self.objective, &plan.output) {
                eprintln!("warning: no plots: {e:#}");
            }
            checkpoint::finish_output(output, &self.provenance)?;
        }
        plan.world.barrier()?; // every rank ends when the run is finished
        Ok(Summary { steps: total, last, eval })
    }

    /// Forward and backward over the step's micro-batches, then gradient clipping. Returns the
    /// summed metrics and the step's weight (on the host they become weighted means), the tokens
    /// this rank saw and the gradient norm before clipping; the tensors stay on the device.
    fn forward_backward_step(&mut self, step: usize) -> Result<(Metrics, f64, usize, tch::Tensor)> {
        let (objective, device, world) = (self.objective, self.loaded.model.device(), &self.plan.world);
        let micro = self.steps.step_batches(step);
        let weight: f64 = micro.iter().flatten().map(|&i| objective.weight(Split::Train, i)).sum::<f64>().max(1.0);
        self.opt.zero_grad();
        let mut sums = Metrics::new();
        let mut tokens = 0;
        for (m, examples) in micro.iter().enumerate() {
            // LoRA's dropout masks come from a stream of (seed, step, micro-batch, rank), so a
            // resumed run draws the masks the uninterrupted one drew.
            let stream = crate::seed::mix(self.plan.seed ^ crate::seed::mix(((world.rank as u64) << 48) ^ ((step as u64) << 16) ^ m as u64));
            self.loaded.model.set_dropout(objective.dropout().then_some(stream));
            let batch = objective.collate(Split::Train, rank_slice(examples, world.rank, world.size), device)?;
            tokens += batch.tokens;
            // A sharded optimizer starts reducing each block's gradients once they are final.
            let early = self.opt.reduces_during_backward();
            let opt = &mut self.opt;
            let mut block_done = |block: usize| opt.block_done(block);
            let block_done = early.then_some(&mut block_done as &mut dyn FnMut(usize) -> Result<()>);
            objective::accumulate(&mut sums, forward_backward(objective, &self.loaded.model, &batch, 1.0 / weight, self.plan.fit.recomputed_blocks, block_done)?);
            self.opt.accumulate()?;
        }
        self.loaded.model.set_dropout(None);
        let grad_norm = self.opt.finish_gradients(self.plan.optimizer.max_grad_norm)?;
        Ok((sums, weight, tokens, grad_norm))
    }

    fn log_step(&mut self, done: usize, lr: f64, grad_norm: f64, tokens: usize, seconds: f64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let mut row = json!({"step": done, "epoch": done as f64 / self.steps.steps_per_epoch as f64, "lr": lr, "grad_norm": grad_norm,
                             "tokens": tokens, "tokens_per_second": tokens as f64 / seconds});
        for (k, v) in metrics {
            row[k] = json!(v);
        }
        if let Some((parameters, peak)) = self.flops {
            row["mfu"] = json!(super::metrics::mfu(parameters, tokens, seconds, self.plan.world.size, peak));
        }
        if let Some(log) = self.log.as_mut().filter(|_| done.is_multiple_of(self.plan.logging_steps) || done == self.steps.total_steps) {
            log.push(row)?;
        }
        let rewards: String = [("rewards/accuracies", "acc"), ("rewards/margins", "margin")]
            .iter()
            .filter_map(|(key, short)| metrics.get(*key).map(|v| format!(" {short} {v:.3}")))
            .collect();
        let loss = metrics.get("loss").copied().unwrap_or(f64::NAN);
        self.bar.set_message(format!("loss {loss:.4}{rewards} lr {lr:.2e} {:.0} tok/s", tokens as f64 / seconds));
        self.bar.inc(1);
        Ok(())
    }

    /// Evaluates, prints and logs the eval metrics at step `done`; `None` without an eval split.
    fn evaluate_and_log(&mut self, done: usize) -> Result<Option<BTreeMap<String, f64>>> {
        let Some(metrics) = evaluate(self.objective, &self.loaded.model, self.plan.schedule.per_device_batch, &self.plan.world)? else { return Ok(None) };
        let mut row = json!({"step": done});
        for (k, v) in &metrics {
            row[k] = json!(v);
        }
        if let Some(log) = &mut self.log {
            self.bar.println(format!("step {done}: {}", metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join("  ")));
            log.push(row)?;
        }
        Ok(Some(metrics))
    }
}

/// The parameters a token's forward pass multiplies by: all but the input embeddings (which are
/// looked up), counted once when the LM head shares them.
fn matmul_parameters(config: &crate::model::LlamaConfig) -> i64 {
    let embeddings = if config.tie_word_embeddings { 0 } else { config.vocab_size * config.hidden_size };
    super::memory::parameters(config) - embeddings
}

/// The first trainable weight (by name) that holds a NaN or an infinity: the final state is
/// checked before it is saved, since the metrics only guard the steps before each update.
fn first_non_finite_weight(vs: &tch::nn::VarStore) -> Option<String> {
    let mut variables: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables.into_iter().find(|(_, t)| t.isfinite().all().int64_value(&[]) == 0).map(|(name, _)| name)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::tests::{fixture, tiny};
    use crate::train::batch::{Batch, Document};
    use crate::train::checkpoint::checkpoint_dirs;
    use crate::train::sft::SftObjective;
    use crate::train::args::parse_for_test;
    use std::collections::HashMap;
    use std::path::Path;
    use tch::{Device, Kind};

    fn plan(output: &Path, extra: &[&str]) -> TrainPlan {
        let model = fixture("tiny-llama");
        let base = ["--model", model.to_str().unwrap(), "-i", "unused", "-o", output.to_str().unwrap(), "--device", "cpu"];
        parse_for_test(base.iter().copied().chain(extra.iter().copied())).plan().unwrap()
    }

    /// Twelve short documents over the tiny vocabulary, half of each a target.
    pub(crate) fn objective() -> SftObjective {
        let docs = (0..12)
            .map(|i| Document::from_labels((0..6 + i % 5).map(|t| ((i * 31 + t * 7) % 250 + 1) as i64).collect(), |t| t >= 3))
            .collect();
        SftObjective::new(docs, vec![], false, 64, 0, crate::train::lm_head::DEFAULT_CHUNK_LOGITS)
    }

    fn metrics(output: &Path) -> Vec<Value> {
        std::fs::read_to_string(output.join("metrics.jsonl")).unwrap().lines().map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| k != "tokens_per_second");
            v
        }).collect()
    }

    fn run(output: &Path, extra: &[&str]) -> Result<Summary> {
        run_on(&adapted(&plan(output, extra)), output, extra)
    }

    /// The tiny model, with the plan's LoRA adapters when it has them.
    fn adapted(p: &TrainPlan) -> Loaded {
        let mut loaded = tiny("tiny-llama");
        if let Some(lora) = &p.lora {
            loaded.add_adapters(&lora.config, lora.from.as_deref(), p.seed).unwrap();
        }
        loaded
    }

    fn run_on(loaded: &Loaded, output: &Path, extra: &[&str]) -> Result<Summary> {
        let p = plan(output, extra);
        let output = checkpoint::prepare_output(&p, "sft", &json!({}), &[])?;
        train(&objective(), loaded, &p, "sft", &json!({}), Some(output))
    }

    const SETTINGS: &[&str] = &["--max-steps", "6", "--save-steps", "2", "--per-device-train-batch-size", "2",
                                "--gradient-accumulation-steps", "2", "--learning-rate", "1e-3", "--warmup-steps", "2",
                                "--weight-decay", "0.1"];

    #[test]
    fn a_resumed_run_logs_the_same_losses_as_an_uninterrupted_one() {
        let whole = tempfile::tempdir().unwrap();
        run(whole.path(), SETTINGS).unwrap();
        let want = metrics(whole.path());
        assert_eq!(want.len(), 6);
        assert!(want[5]["loss"].as_f64().unwrap() < want[0]["loss"].as_f64().unwrap(), "training lowers the loss");

        // A run killed after step 4's checkpoint: what it wrote after that is lost or stale.
        let killed = tempfile::tempdir().unwrap();
        run(killed.path(), SETTINGS).unwrap();
        std::fs::remove_dir_all(killed.path().join("model")).unwrap();
        std::fs::remove_file(killed.path().join(crate::run::MANIFEST)).unwrap();
        let stale: String = std::fs::read_to_string(killed.path().join("metrics.jsonl")).unwrap().lines().take(5).map(|l| format!("{l}\n")).collect();
        std::fs::write(killed.path().join("metrics.jsonl"), stale).unwrap();
        let resumed: Vec<&str> = SETTINGS.iter().copied().chain(["--resume"]).collect();
        run(killed.path(), &resumed).unwrap();
        assert_eq!(metrics(killed.path()), want);
        assert!(killed.path().join("model/model.safetensors").is_file());
        assert!(killed.path().join("loss.png").is_file());
    }

    /// LoRA with dropout: the loss falls, the base weights are untouched, the model saved is a
    /// PEFT adapter, and a resumed run (masks and all) logs the uninterrupted run's losses.
    #[test]
    fn lora_trains_only_its_adapters_and_resumes_to_the_same_losses() {
        let settings: Vec<&str> = SETTINGS.iter().copied().chain(["--use-peft", "--lora-r", "4", "--lora-target-modules", "all-linear",
                                                                    "--lora-dropout", "0.2", "--gradient-checkpointing"]).collect();
        let whole = tempfile::tempdir().unwrap();
        let loaded = adapted(&plan(whole.path(), &settings));
        run_on(&loaded, whole.path(), &settings).unwrap();
        let want = metrics(whole.path());
        assert!(want[5]["loss"].as_f64().unwrap() < want[0]["loss"].as_f64().unwrap(), "training lowers the loss");
        let base = tiny("tiny-llama");
        for (name, weight) in loaded.vs.variables() {
            assert!(weight.equal(&base.vs.variables()[&name]), "{name} changed");
        }
        let model = whole.path().join("model");
        assert!(model.join("adapter_model.safetensors").is_file() && model.join("adapter_config.json").is_file());
        assert!(!model.join("model.safetensors").exists(), "an adapter folder, not a full model");
        assert!(whole.path().join("checkpoint-2/adapter_model.safetensors").is_file());

        let killed = tempfile::tempdir().unwrap();
        run(killed.path(), &settings).unwrap();
        std::fs::remove_dir_all(killed.path().join("model")).unwrap();
        std::fs::remove_file(killed.path().join(crate::run::MANIFEST)).unwrap();
        std::fs::remove_dir_all(killed.path().join("checkpoint-4")).unwrap();
        let stale: String = std::fs::read_to_string(killed.path().join("metrics.jsonl")).unwrap().lines().take(3).map(|l| format!("{l}\n")).collect();
        std::fs::write(killed.path().join("metrics.jsonl"), stale).unwrap();
        let resumed: Vec<&str> = settings.iter().copied().chain(["--resume"]).collect();
        run(killed.path(), &resumed).unwrap();
        assert_eq!(metrics(killed.path()), want);
    }

    #[test]
    fn a_logged_line_counts_the_tokens_of_every_step_since_the_last_one() {
        let each_step = tempfile::tempdir().unwrap();
        run(each_step.path(), &["--max-steps", "6", "--save-steps", "0", "--logging-steps", "1"]).unwrap();
        let every_third = tempfile::tempdir().unwrap();
        run(every_third.path(), &["--max-steps", "6", "--save-steps", "0", "--logging-steps", "3"]).unwrap();
        let per_step: Vec<u64> = metrics(each_step.path()).iter().map(|m| m["tokens"].as_u64().unwrap()).collect();
        let logged: Vec<(u64, u64)> = metrics(every_third.path()).iter().map(|m| (m["step"].as_u64().unwrap(), m["tokens"].as_u64().unwrap())).collect();
        assert_eq!(logged, vec![(3, per_step[..3].iter().sum()), (6, per_step[3..].iter().sum())]);
    }

    #[test]
    fn resume_refuses_other_settings_and_missing_checkpoints() {
        let out = tempfile::tempdir().unwrap();
        let err = run(out.path(), &["--resume"]).err().unwrap().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
        run(out.path(), SETTINGS).unwrap();
        // As a run killed before its end would leave it: no final model, no manifest.
        std::fs::remove_dir_all(out.path().join("model")).unwrap();
        std::fs::remove_file(out.path().join(crate::run::MANIFEST)).unwrap();
        let mut other: Vec<&str> = SETTINGS.to_vec();
        other[9] = "5e-4";
        other.push("--resume");
        let err = run(out.path(), &other).err().unwrap().to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn a_diverging_run_stops_on_nan_and_keeps_its_last_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        let err = run(out.path(), &["--max-steps", "8", "--save-steps", "1", "--learning-rate", "1e30", "--max-grad-norm", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("loss is NaN") || err.contains("gradient norm"), "{err}");
        let kept = checkpoint_dirs(out.path());
        assert!(!kept.is_empty(), "{err}");
        assert!(err.contains(&format!("checkpoint-{} is kept", kept.last().unwrap().0)), "{err}");
        assert!(!out.path().join("model").exists(), "no final model from a failed run");
    }

    #[test]
    fn a_last_step_that_breaks_the_weights_leaves_no_finished_model() {
        // lr beyond f32's range: step 1's loss and gradients are finite, its update is not.
        let out = tempfile::tempdir().unwrap();
        let err = run(out.path(), &["--max-steps", "1", "--save-steps", "0", "--learning-rate", "1e39", "--max-grad-norm", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("holds NaN or infinite values"), "{err}");
        assert!(!out.path().join("model").exists() && !out.path().join(crate::run::MANIFEST).exists());
    }

    /// Sixteen bf16 micro-batches: the optimizer's sum of their gradients is their f32 sum (a
    /// bf16 running sum is off by about 1e-3 relative).
    #[test]
    fn bf16_gradients_of_sixteen_micro_batches_are_summed_in_f32() {
        let objective = objective();
        let mut loaded = tiny("tiny-llama");
        loaded.vs.set_kind(Kind::BFloat16);
        let batches: Vec<Batch> = (0..16).map(|m| objective.collate(Split::Train, &[m % 12, (m * 5 + 1) % 12], Device::Cpu).unwrap()).collect();
        let names: Vec<String> = crate::train::optim::trainable(&loaded.vs).into_iter().map(|(n, _)| n).collect();
        let grads = || -> Vec<Tensor> { crate::train::optim::trainable(&loaded.vs).into_iter().map(|(_, v)| v.grad().to_kind(Kind::Double)).collect() };
        let mut opt = AdamW::new(&loaded.vs, 0.0, true, false);
        let mut want: Option<Vec<Tensor>> = None;
        for batch in &batches {
            opt.zero_grad();
            forward_backward(&objective, &loaded.model, batch, 1.0 / 16.0, 0, None).unwrap();
            want = Some(match want {
                None => grads(),
                Some(sum) => sum.iter().zip(grads()).map(|(a, b)| a + b).collect(),
            });
        }
        let want = want.unwrap();
        let relative_error = |f32_sums: bool| {
            let mut opt = AdamW::new(&loaded.vs, 0.0, true, f32_sums);
            opt.zero_grad();
            for batch in &batches {
                forward_backward(&objective, &loaded.model, batch, 1.0 / 16.0, 0, None).unwrap();
                opt.accumulate().unwrap();
            }
            let got: Vec<Tensor> = if f32_sums { (0..names.len()).map(|i| opt.gradient_sum(i).to_kind(Kind::Double)).collect() } else { grads() };
            let diff: f64 = got.iter().zip(&want).map(|(g, w)| (g - w).square().sum(Kind::Double).double_value(&[])).sum();
            let norm: f64 = want.iter().map(|w| w.square().sum(Kind::Double).double_value(&[])).sum();
            (diff / norm).sqrt()
        };
        let (f32_error, bf16_error) = (relative_error(true), relative_error(false));
        assert!(f32_error < 1e-4, "f32 sums: {f32_error:e} relative");
        assert!(bf16_error > 1e-4, "a bf16 running sum is worse ({bf16_error:e}), else this test cannot fail");
    }

    #[test]
    fn bf16_weights_train_with_f32_moments_and_save_as_bf16() {
        let out = tempfile::tempdir().unwrap();
        let p = plan(out.path(), &["--max-steps", "2", "--save-steps", "1", "--learning-rate", "1e-3", "--bf16"]);
        let mut loaded = tiny("tiny-llama");
        loaded.vs.set_kind(p.precision.dtype);
        let output = checkpoint::prepare_output(&p, "sft", &json!({}), &[]).unwrap();
        let summary = train(&objective(), &loaded, &p, "sft", &json!({}), Some(output)).unwrap();
        assert!(summary.last["loss"].is_finite());
        let saved: HashMap<String, Tensor> = Tensor::read_safetensors(out.path().join("model/model.safetensors")).unwrap().into_iter().collect();
        assert_eq!(saved["model.norm.weight"].kind(), Kind::BFloat16);
        let moments: HashMap<String, Tensor> = Tensor::read_safetensors(out.path().join("checkpoint-1/optimizer.safetensors")).unwrap().into_iter().collect();
        assert_eq!(moments["exp_avg.model.norm.weight"].kind(), Kind::Float);
        let config: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("model/config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 42, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 42, 0));
        assert_ne!(a, epoch_order(100, 42, 1));
        assert_ne!(a, epoch_order(100, 7, 0));
    }
}
