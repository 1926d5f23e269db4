//! The training loop SFT and DPO share, nanoGPT-style: for each optimizer step, micro-batches go
//! forward and backward (the loss divided by the whole step's weight, so accumulation equals one
//! big batch), then clip, AdamW, schedule, log, evaluate, checkpoint.
//!
//! SFT and DPO differ only in their [`Objective`]: how examples become model inputs and how final
//! hidden states become a summed loss and metrics.
//!
//! A checkpoint (`checkpoint-{step}/`) is a loadable HF model plus `optimizer.safetensors` and
//! `trainer_state.json` (step, data position, seed, settings). The data order is a pure function of
//! the seed and the epoch, so resuming from a checkpoint is the same code path as starting and gives
//! the same losses as an uninterrupted run.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::model::{hf, AttentionMask, Inputs, Llama, Loaded};
use super::optim::{AdamW, Schedule};
use super::plot;

/// Flags every training command takes. Names follow TRL's `TrainingArguments`.
#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct TrainArgs {
    /// YAML recipe whose keys are these flags' names; flags on the command line override it.
    #[arg(long, value_name = "FILE.yaml")]
    #[serde(skip)]
    pub recipe: Option<PathBuf>,

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
    #[arg(long, default_value_t = 0.0)]
    pub eval_ratio: f64,

    #[arg(long, default_value_t = 2e-5)]
    pub learning_rate: f64,

    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum, default_value_t = Schedule::Cosine)]
    pub lr_scheduler_type: Schedule,

    /// Linear warmup as a fraction of all steps (ignored when --warmup-steps is set).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,

    #[arg(long)]
    pub warmup_steps: Option<usize>,

    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,

    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,

    #[arg(long, default_value_t = 1.0)]
    pub num_train_epochs: f64,

    /// Stop after this many optimizer steps (overrides --num-train-epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,

    #[arg(long, default_value_t = 8)]
    pub per_device_train_batch_size: usize,

    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: usize,

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

    #[arg(long, default_value_t = 1)]
    pub logging_steps: usize,

    /// cpu, cuda, or auto (cuda when libtorch sees one).
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// bf16 weights (fp32 optimizer state unless --no-fp32-optimizer-state).
    #[arg(long)]
    pub bf16: bool,

    /// Keep Adam moments in bf16 too, when --bf16.
    #[arg(long)]
    pub no_fp32_optimizer_state: bool,

    /// Recompute each block in the backward pass instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Continue from the latest checkpoint in --output.
    #[arg(long)]
    #[serde(skip)]
    pub resume: bool,
}

impl TrainArgs {
    pub fn device(&self) -> Result<Device> {
        Ok(match self.device.as_str() {
            "cpu" => Device::Cpu,
            "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
            "cuda" => bail!("--device cuda: libtorch sees no CUDA device"),
            "auto" => Device::cuda_if_available(),
            other => bail!("--device {other}: expected cpu, cuda or auto"),
        })
    }

    pub fn kind(&self) -> Kind {
        if self.bf16 { Kind::BFloat16 } else { Kind::Float }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

/// One micro-batch ready for the model: `[rows, seq]` tensors and, per row, which examples it
/// holds. `targets[i]` is the token predicted at position i (`-100`: no loss).
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: AttentionMask,
    pub targets: Tensor,
    pub examples: Vec<usize>,
    pub tokens: usize,
}

/// One tokenised sequence: ids and, per position, the id it is trained to predict next
/// (`-100` where there is no loss).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Document {
    pub ids: Vec<i64>,
    pub targets: Vec<i64>,
}

impl Document {
    /// Shifts per-token labels (`Some(id)` where the token is a target) into next-token targets.
    pub fn from_labels(ids: Vec<i64>, is_target: impl Fn(usize) -> bool) -> Document {
        let targets = (0..ids.len()).map(|i| if i + 1 < ids.len() && is_target(i + 1) { ids[i + 1] } else { -100 }).collect();
        Document { ids, targets }
    }

    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != -100).count()
    }
}

impl Batch {
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs { ids: &self.ids, positions: &self.positions, mask: &self.mask }
    }

    /// Right-pads `rows` (each one document, or several packed) into `[rows, longest]` tensors.
    /// Packed rows restart positions per document and get a per-document attention mask.
    pub fn from_rows(rows: &[Vec<&Document>], pad_id: i64, packed: bool, examples: Vec<usize>, device: Device) -> Batch {
        let width = rows.iter().map(|r| r.iter().map(|d| d.ids.len()).sum::<usize>()).max().unwrap_or(1).max(1);
        let n = rows.len();
        let (mut ids, mut targets) = (vec![pad_id; n * width], vec![-100i64; n * width]);
        let (mut positions, mut docs) = (vec![0i64; n * width], vec![-1i64; n * width]);
        let mut tokens = 0;
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * width;
            for (d, doc) in row.iter().enumerate() {
                let len = doc.ids.len();
                ids[at..at + len].copy_from_slice(&doc.ids);
                targets[at..at + len].copy_from_slice(&doc.targets);
                for i in 0..len {
                    positions[at + i] = i as i64;
                    docs[at + i] = d as i64;
                }
                at += len;
                tokens += len;
            }
        }
        let tensor = |v: Vec<i64>| Tensor::from_slice(&v).view([n as i64, width as i64]).to_device(device);
        let mask = if packed { AttentionMask::Documents(tensor(docs)) } else { AttentionMask::Causal };
        Batch { ids: tensor(ids), positions: tensor(positions), mask, targets: tensor(targets), examples, tokens }
    }
}

/// Summed next-token cross-entropy over targets that are not `-100`, computed in f32.
pub fn summed_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits.to_kind(Kind::Float).view([-1, vocab]).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::Sum, -100, 0.0)
}

/// Summed metrics of some examples; divided by the summed example weight when logged.
pub type Metrics = BTreeMap<&'static str, f64>;

/// What a training command optimises.
pub trait Objective {
    fn len(&self, split: Split) -> usize;
    /// An example's share of a step's loss normaliser: target tokens for SFT, 1 for a DPO pair.
    fn weight(&self, split: Split, example: usize) -> f64;
    fn collate(&self, split: Split, examples: &[usize], device: Device) -> Result<Batch>;
    /// The micro-batch's summed loss (a scalar with grad) and summed metrics, `loss` among them,
    /// from the policy's final hidden states.
    fn loss(&self, model: &Llama, hidden: &Tensor, batch: &Batch, split: Split) -> Result<(Tensor, Metrics)>;
    /// Metric names to plot beside the loss (`rewards.png` for DPO).
    fn reward_plot(&self) -> Option<(&'static str, &'static [&'static str])> {
        None
    }
}

/// The order of training examples in `epoch`: a Fisher-Yates shuffle driven by splitmix64 of
/// (seed, epoch), so any position can be recomputed on resume.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut state = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

/// Where a step's micro-batches come from.
struct Plan {
    micro_per_epoch: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
}

impl Plan {
    fn new(args: &TrainArgs, examples: usize) -> Result<Plan> {
        if examples == 0 {
            bail!("no training examples are left after tokenisation");
        }
        let batch = args.per_device_train_batch_size.max(1);
        let accum = args.gradient_accumulation_steps.max(1);
        let micro_per_epoch = examples.div_ceil(batch);
        let steps_per_epoch = micro_per_epoch.div_ceil(accum);
        let total_steps = match args.max_steps {
            Some(steps) => steps,
            None => (args.num_train_epochs * steps_per_epoch as f64).ceil() as usize,
        };
        let warmup = args.warmup_steps.unwrap_or((args.warmup_ratio * total_steps as f64).ceil() as usize);
        Ok(Plan { micro_per_epoch, steps_per_epoch, total_steps, warmup })
    }

    /// The example indices of each micro-batch of optimizer step `step` (0-based).
    fn step_batches(&self, step: usize, args: &TrainArgs, examples: usize) -> Vec<Vec<usize>> {
        let (batch, accum) = (args.per_device_train_batch_size.max(1), args.gradient_accumulation_steps.max(1));
        let epoch = step / self.steps_per_epoch;
        let order = epoch_order(examples, args.seed, epoch);
        let first = (step % self.steps_per_epoch) * accum;
        (first..(first + accum).min(self.micro_per_epoch))
            .map(|m| order[m * batch..((m + 1) * batch).min(examples)].to_vec())
            .collect()
    }
}

/// Forward and backward of one micro-batch; returns the summed metrics. With gradient
/// checkpointing, block inputs are kept without graphs and each block is recomputed during its
/// own backward pass, last block first.
fn forward_backward(objective: &dyn Objective, model: &Llama, batch: &Batch, scale: f64, checkpointing: bool) -> Result<Metrics> {
    let inputs = batch.inputs();
    if !checkpointing {
        let hidden = model.hidden_states(&inputs);
        let (loss, metrics) = objective.loss(model, &hidden, batch, Split::Train)?;
        (loss * scale).backward();
        return Ok(metrics);
    }
    let mask = inputs.mask.sdpa_mask();
    let rope = model.rope(inputs.positions, model.kind());
    let mut block_inputs = vec![];
    let last = tch::no_grad(|| {
        let mut x = model.embed(inputs.ids);
        for layer in &model.layers {
            block_inputs.push(x.shallow_clone());
            x = layer.forward(&x, &rope, mask.as_ref());
        }
        x
    });
    let top = last.detach().set_requires_grad(true);
    let (loss, metrics) = objective.loss(model, &model.final_norm(&top), batch, Split::Train)?;
    (loss * scale).backward();
    let mut grad = top.grad();
    for (layer, x) in model.layers.iter().zip(block_inputs).rev() {
        let x = x.detach().set_requires_grad(true);
        let y = layer.forward(&x, &rope, mask.as_ref());
        (y * &grad).sum(Kind::Float).backward();
        grad = x.grad();
    }
    (model.embed(inputs.ids) * grad).sum(Kind::Float).backward();
    Ok(metrics)
}

/// Loss and metrics over the whole eval split, weighted means, under `eval_` names.
pub fn evaluate(objective: &dyn Objective, model: &Llama, args: &TrainArgs) -> Result<Option<BTreeMap<String, f64>>> {
    let n = objective.len(Split::Eval);
    if n == 0 {
        return Ok(None);
    }
    let mut sums = Metrics::new();
    let mut weight = 0.0;
    let indices: Vec<usize> = (0..n).collect();
    for chunk in indices.chunks(args.per_device_train_batch_size.max(1)) {
        let batch = objective.collate(Split::Eval, chunk, model.device())?;
        let (_, metrics) = tch::no_grad(|| -> Result<_> {
            objective.loss(model, &model.hidden_states(&batch.inputs()), &batch, Split::Eval)
        })?;
        for (k, v) in metrics {
            *sums.entry(k).or_default() += v;
        }
        weight += chunk.iter().map(|&i| objective.weight(Split::Eval, i)).sum::<f64>();
    }
    Ok(Some(sums.into_iter().map(|(k, v)| (format!("eval_{k}"), v / weight.max(1.0))).collect()))
}

fn checkpoint_dirs(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut dirs: Vec<(usize, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

/// The settings a checkpoint must agree with to be resumed.
fn settings(args: &TrainArgs, extra: &Value) -> Value {
    json!({"train": args, "objective": extra})
}

fn save_checkpoint(loaded: &Loaded, opt: &AdamW, step: usize, args: &TrainArgs, extra: &Value) -> Result<()> {
    let dir = args.output.join(format!("checkpoint-{step}"));
    crate::data::write::write_dir_atomically(&dir, |tmp| {
        hf::write_model_files(&loaded.vs, &loaded.dir, tmp)?;
        hf::write_safetensors(&opt.state(), &tmp.join("optimizer.safetensors"))?;
        let state = json!({"global_step": step, "optimizer_steps": opt.steps, "seed": args.seed, "settings": settings(args, extra)});
        std::fs::write(tmp.join("trainer_state.json"), serde_json::to_string_pretty(&state)?)?;
        Ok(())
    })?;
    if let Some(limit) = args.save_total_limit {
        let dirs = checkpoint_dirs(&args.output);
        for (_, old) in dirs.iter().take(dirs.len().saturating_sub(limit.max(1))) {
            std::fs::remove_dir_all(old).with_context(|| format!("{}: cannot remove", old.display()))?;
        }
    }
    Ok(())
}

/// Loads the newest checkpoint into the model and optimizer; returns its step.
fn resume(loaded: &Loaded, opt: &mut AdamW, args: &TrainArgs, extra: &Value) -> Result<usize> {
    let Some((step, dir)) = checkpoint_dirs(&args.output).pop() else {
        bail!("{}: --resume, but there is no checkpoint-* here", args.output.display());
    };
    let state_file = dir.join("trainer_state.json");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&state_file).with_context(|| format!("{}: cannot read", state_file.display()))?)
        .with_context(|| format!("{}: not JSON", state_file.display()))?;
    let want = settings(args, extra);
    if state["settings"] != want {
        let differing: Vec<String> = ["train", "objective"]
            .iter()
            .flat_map(|part| {
                let (a, b) = (&state["settings"][part], &want[part]);
                a.as_object().into_iter().flatten().filter(move |(k, v)| b.get(k.as_str()) != Some(v)).map(|(k, _)| k.clone())
            })
            .collect();
        bail!("{}: was made with other settings ({}); resume with the same ones or use a new --output", dir.display(), differing.join(", "));
    }
    hf::ModelDir::open(&dir)?.load_into(&loaded.vs)?;
    let optimizer: HashMap<String, Tensor> = Tensor::read_safetensors(dir.join("optimizer.safetensors"))
        .with_context(|| format!("{}: unreadable optimizer state", dir.display()))?
        .into_iter()
        .collect();
    opt.load_state(&optimizer, state["optimizer_steps"].as_i64().unwrap_or(step as i64))?;
    Ok(step)
}

/// Appends JSON lines to `metrics.jsonl`, dropping lines past `keep_until` first (a resumed run
/// rewrites what the interrupted one logged after its checkpoint).
struct MetricsLog {
    path: PathBuf,
    rows: Vec<Value>,
}

impl MetricsLog {
    fn open(output: &Path, keep_until: usize) -> Result<Self> {
        let path = output.join("metrics.jsonl");
        let rows: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| (s as usize) <= keep_until))
            .collect();
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        crate::data::write::write_atomically(&path, text.as_bytes())?;
        Ok(MetricsLog { path, rows })
    }

    fn push(&mut self, row: Value) -> Result<()> {
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        writeln!(file, "{row}")?;
        self.rows.push(row);
        Ok(())
    }

    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect()
    }
}

fn write_plots(log: &MetricsLog, objective: &dyn Objective, output: &Path) -> Result<()> {
    let line = |key: &str| plot::Series { name: key.to_string(), points: log.series(key) };
    plot::lines(&output.join("loss.png"), "loss", "loss", &[line("loss"), line("eval_loss")])?;
    if let Some((file, keys)) = objective.reward_plot() {
        let series: Vec<plot::Series> = keys.iter().flat_map(|k| [line(k), line(&format!("eval_{k}"))]).collect();
        plot::lines(&output.join(file), "rewards", "value", &series)?;
    }
    Ok(())
}

/// Evaluates, prints and logs the eval metrics at step `done`; `None` without an eval split.
fn log_evaluation(objective: &dyn Objective, model: &Llama, args: &TrainArgs, done: usize, log: &mut MetricsLog, bar: &ProgressBar) -> Result<Option<BTreeMap<String, f64>>> {
    let Some(metrics) = evaluate(objective, model, args)? else { return Ok(None) };
    let mut row = json!({"step": done});
    for (k, v) in &metrics {
        row[k] = json!(v);
    }
    bar.println(format!("step {done}: {}", metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join("  ")));
    log.push(row)?;
    Ok(Some(metrics))
}

/// What a finished run reports.
pub struct Summary {
    pub steps: usize,
    pub last: BTreeMap<String, f64>,
    pub eval: Option<BTreeMap<String, f64>>,
}

/// Trains `loaded` on `objective` and saves the final model to `output/model`. `extra` holds the
/// objective's own settings, which a resumed checkpoint must share.
pub fn train(objective: &dyn Objective, loaded: &Loaded, args: &TrainArgs, extra: &Value) -> Result<Summary> {
    let device = loaded.model.device();
    std::fs::create_dir_all(&args.output).with_context(|| format!("{}: cannot create", args.output.display()))?;
    let train_examples = objective.len(Split::Train);
    let plan = Plan::new(args, train_examples)?;
    let fp32_state = !args.no_fp32_optimizer_state;
    let mut opt = AdamW::new(&loaded.vs, args.weight_decay, fp32_state);
    let start = if args.resume { resume(loaded, &mut opt, args, extra)? } else { 0 };
    let mut log = MetricsLog::open(&args.output, start)?;
    let bar = ProgressBar::new(plan.total_steps as u64).with_position(start as u64);
    bar.set_style(ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}").unwrap().progress_chars("=> "));
    bar.set_prefix("train");
    let mut last = BTreeMap::new();
    let mut eval = None;
    let mut last_good = start;
    if start == 0 && args.eval_steps > 0 {
        // The baseline the later evaluations are read against.
        eval = log_evaluation(objective, &loaded.model, args, 0, &mut log, &bar)?;
    }
    for step in start..plan.total_steps {
        let started = Instant::now();
        let micro = plan.step_batches(step, args, train_examples);
        let weight: f64 = micro.iter().flatten().map(|&i| objective.weight(Split::Train, i)).sum();
        let lr = args.lr_scheduler_type.lr(args.learning_rate, step, plan.warmup, plan.total_steps);
        opt.zero_grad();
        let mut sums = Metrics::new();
        let mut tokens = 0;
        for examples in &micro {
            let batch = objective.collate(Split::Train, examples, device)?;
            tokens += batch.tokens;
            for (k, v) in forward_backward(objective, &loaded.model, &batch, 1.0 / weight.max(1.0), args.gradient_checkpointing)? {
                *sums.entry(k).or_default() += v;
            }
        }
        let loss = sums.get("loss").copied().unwrap_or(f64::NAN) / weight.max(1.0);
        let grad_norm = opt.clip_grad_norm(args.max_grad_norm);
        if !loss.is_finite() || !grad_norm.is_finite() {
            bar.abandon();
            let kept = if last_good > 0 { format!("checkpoint-{last_good} is kept") } else { "no checkpoint was saved yet".into() };
            bail!("step {}: loss is {loss}, gradient norm {grad_norm}; stopping ({kept}). Lower --learning-rate or check the data.", step + 1);
        }
        opt.step(lr);
        let done = step + 1;
        let seconds = started.elapsed().as_secs_f64();
        let mut row = json!({"step": done, "epoch": done as f64 / plan.steps_per_epoch as f64, "lr": lr, "grad_norm": grad_norm,
                             "tokens": tokens, "tokens_per_second": tokens as f64 / seconds});
        last.clear();
        for (k, v) in &sums {
            row[*k] = json!(v / weight.max(1.0));
            last.insert(k.to_string(), v / weight.max(1.0));
        }
        if done % args.logging_steps.max(1) == 0 || done == plan.total_steps {
            log.push(row)?;
        }
        let rewards: String = [("rewards/accuracies", "acc"), ("rewards/margins", "margin")]
            .iter()
            .filter_map(|(key, short)| last.get(*key).map(|v| format!(" {short} {v:.3}")))
            .collect();
        bar.set_message(format!("loss {loss:.4}{rewards} lr {lr:.2e} {:.0} tok/s", tokens as f64 / seconds));
        bar.inc(1);
        let eval_now = (args.eval_steps > 0 && done % args.eval_steps == 0) || done == plan.total_steps;
        if eval_now {
            eval = log_evaluation(objective, &loaded.model, args, done, &mut log, &bar)?.or(eval);
        }
        if args.save_steps > 0 && done % args.save_steps == 0 && done < plan.total_steps {
            save_checkpoint(loaded, &opt, done, args, extra)?;
            last_good = done;
        }
    }
    bar.finish();
    hf::save(&loaded.vs, &loaded.dir, &args.output.join("model"))?;
    // The model is saved; a machine without fonts should not turn that into a failed run.
    if let Err(e) = write_plots(&log, objective, &args.output) {
        eprintln!("warning: no plots: {e:#}");
    }
    Ok(Summary { steps: plan.total_steps, last, eval })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::tests::{fixture, tiny};
    use crate::train::sft::SftObjective;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn args(output: &Path, extra: &[&str]) -> TrainArgs {
        let model = fixture("tiny-llama");
        let base = ["t", "--model", model.to_str().unwrap(), "-i", "unused", "-o", output.to_str().unwrap(), "--device", "cpu"];
        Cli::parse_from(base.iter().copied().chain(extra.iter().copied())).train
    }

    /// Twelve short documents over the tiny vocabulary, half of each a target.
    fn objective() -> SftObjective {
        let docs = (0..12)
            .map(|i| Document::from_labels((0..6 + i % 5).map(|t| ((i * 31 + t * 7) % 250 + 1) as i64).collect(), |t| t >= 3))
            .collect();
        SftObjective::new(docs, vec![], false, 64, 0)
    }

    fn metrics(output: &Path) -> Vec<Value> {
        std::fs::read_to_string(output.join("metrics.jsonl")).unwrap().lines().map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| k != "tokens_per_second");
            v
        }).collect()
    }

    fn run(output: &Path, extra: &[&str]) -> Result<Summary> {
        let a = args(output, extra);
        train(&objective(), &tiny("tiny-llama"), &a, &json!({}))
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
        let stale: String = std::fs::read_to_string(killed.path().join("metrics.jsonl")).unwrap().lines().take(5).map(|l| format!("{l}\n")).collect();
        std::fs::write(killed.path().join("metrics.jsonl"), stale).unwrap();
        let resumed: Vec<&str> = SETTINGS.iter().copied().chain(["--resume"]).collect();
        run(killed.path(), &resumed).unwrap();
        assert_eq!(metrics(killed.path()), want);
        assert!(killed.path().join("model/model.safetensors").is_file());
        assert!(killed.path().join("loss.png").is_file());
    }

    #[test]
    fn resume_refuses_other_settings_and_missing_checkpoints() {
        let out = tempfile::tempdir().unwrap();
        let err = run(out.path(), &["--resume"]).err().unwrap().to_string();
        assert!(err.contains("no checkpoint"), "{err}");
        run(out.path(), SETTINGS).unwrap();
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
    fn gradient_checkpointing_gives_the_same_gradients() {
        let objective = objective();
        let batch = objective.collate(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
        let grads = |checkpointing: bool| {
            let loaded = tiny("tiny-llama");
            forward_backward(&objective, &loaded.model, &batch, 0.1, checkpointing).unwrap();
            let mut vars: Vec<(String, Tensor)> = loaded.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            vars.into_iter().map(|(n, t)| (n, t.grad().copy())).collect::<Vec<_>>()
        };
        for ((name, a), (_, b)) in grads(false).iter().zip(grads(true)) {
            let diff = (a - &b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
        }
    }

    #[test]
    fn bf16_weights_train_with_f32_moments_and_save_as_bf16() {
        let out = tempfile::tempdir().unwrap();
        let a = args(out.path(), &["--max-steps", "2", "--save-steps", "1", "--learning-rate", "1e-3", "--bf16"]);
        let mut loaded = tiny("tiny-llama");
        loaded.vs.set_kind(a.kind());
        let summary = train(&objective(), &loaded, &a, &json!({})).unwrap();
        assert!(summary.last["loss"].is_finite());
        let saved: HashMap<String, Tensor> = Tensor::read_safetensors(out.path().join("model/model.safetensors")).unwrap().into_iter().collect();
        assert_eq!(saved["model.norm.weight"].kind(), Kind::BFloat16);
        let moments: HashMap<String, Tensor> = Tensor::read_safetensors(out.path().join("checkpoint-1/optimizer.safetensors")).unwrap().into_iter().collect();
        assert_eq!(moments["exp_avg.model.norm.weight"].kind(), Kind::Float);
        let config: Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("model/config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        let mut other = args(out.path(), &[]);
        other.device = "tpu".into();
        let err = other.device().unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda or auto"), "{err}");
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
