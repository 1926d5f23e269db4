//! `magpie dpo`: preference optimisation with TRL's formulas (docs/upstream.md §5).
//!
//! Each pair's prompt is rendered with a generation prompt and each completion is what the full
//! conversation adds after it. `max_prompt_length` keeps the end of the prompt, then `max_length`
//! bounds prompt + completion; pairs with nothing of a completion left are dropped and counted.
//! Chosen and rejected go through one forward pass as a concatenated batch of 2B rows (with
//! `padding_free`, one row of the 2B sequences back to back, attending within each: no padding),
//! and a sequence's log-probability is the sum over its completion tokens.
//!
//! The reference model is either a frozen copy held during training, or, with
//! `precompute_ref_log_probs`, one pass over the data before training whose results are cached
//! in `$MAGPIE_CACHE` (`reference`), so that no reference model is held while training.
//! With LoRA it is the policy as it starts (its fresh adapters off, or a frozen copy of the
//! adapter it was loaded with, as TRL does it), unless `--ref-model` names one; precomputed,
//! the starting policy computes it (not cached).

use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

use crate::model::{load_causal_lm, Llama, Loaded};
use crate::model::tokenize::ChatTokenizer;
use super::args::TrainArgs;
use super::batch::{upload, Batch, Document};
use super::lm_head::{loss_of_log_probs, TargetLogProbs};
use super::driver;
use super::memory::Workload;
use super::objective::{Metrics, Objective, Split};
use super::reference::{compute_reference, precomputed_reference, reference_logps};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    /// Reference-free SimPO: length-normalised log-probs and a target margin `simpo_gamma`.
    Simpo,
}

#[derive(clap::Args, Debug, Clone)]
pub struct DpoArgs {
    #[command(flatten)]
    pub train: TrainArgs,

    /// β: how far the policy may move from the reference.
    #[arg(long, default_value_t = 0.1, value_parser = crate::flags::positive)]
    pub beta: f64,

    /// The preference loss, as TRL's `loss_type`: sigmoid (DPO), ipo, hinge, robust, or simpo
    /// (reference-free).
    #[arg(long, value_enum, default_value_t = LossType::Sigmoid)]
    pub loss_type: LossType,

    /// ε: the assumed share of flipped preference labels (sigmoid and robust losses).
    #[arg(long, default_value_t = 0.0, value_parser = parse_label_smoothing)]
    pub label_smoothing: f64,

    /// SimPO's target reward margin γ (the logits subtract γ/β).
    #[arg(long, default_value_t = 0.5, value_parser = crate::flags::non_negative)]
    pub simpo_gamma: f64,

    /// Bound on prompt + completion tokens.
    #[arg(long, default_value_t = 1024, value_parser = crate::flags::at_least_one)]
    pub max_length: usize,

    /// Prompts longer than this keep their last tokens.
    #[arg(long, default_value_t = 512, value_parser = crate::flags::at_least_one)]
    pub max_prompt_length: usize,

    /// Reference model directory (default: the --model being trained, before training).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,

    /// Compute reference log-probs once before training and cache them in
    /// $MAGPIE_CACHE/dpo-reference-logps/ (keyed by the tokenised pairs, the reference weights,
    /// the dtype, the device and the layout), instead of holding a reference model. With LoRA
    /// and no --ref-model the starting policy computes them, not cached.
    #[arg(long)]
    pub precompute_ref_log_probs: bool,

    /// TRL's `padding_free`: each micro-batch's chosen and rejected sequences go back to back in
    /// one row, each attending only within itself (positions restart per sequence), so no token
    /// is padding. On CUDA in bf16 this is varlen flash attention; elsewhere a per-sequence mask
    /// over the whole row, whose size grows as the square of the micro-batch's tokens.
    #[arg(long)]
    pub padding_free: bool,
}

/// The loss's settings.
#[derive(Clone, Copy, Debug)]
pub struct LossConfig {
    pub loss_type: LossType,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
}

/// Per-pair sequence statistics of a concatenated batch: summed completion log-probs, completion
/// token counts, and summed raw logits over completion tokens (for `logits/*`).
pub struct SequenceStats {
    pub logps: Tensor,
    pub tokens: Tensor,
    pub logit_sums: Tensor,
}

impl SequenceStats {
    /// Each row's sums of its targets' log-probs (TRL's `selective_log_softmax`, summed), of its
    /// target count, and of its targets' mean logits.
    fn of(values: &TargetLogProbs) -> Self {
        SequenceStats {
            logps: values.per_document(&values.logps),
            tokens: values.per_document(&Tensor::ones_like(&values.logps)),
            logit_sums: values.per_document(&values.mean_logits.detach()),
        }
    }
}

/// Per-pair losses and rewards, exactly docs/upstream.md §5's table. Inputs are `[pairs]` summed
/// log-probs (policy, reference) and completion lengths.
pub struct PairLosses {
    pub losses: Tensor,
    pub chosen_rewards: Tensor,
    pub rejected_rewards: Tensor,
}

pub fn pair_losses(c: &LossConfig, policy: (&Tensor, &Tensor), reference: (&Tensor, &Tensor), lengths: (&Tensor, &Tensor)) -> PairLosses {
    let (beta, eps) = (c.beta, c.label_smoothing);
    let sigmoid_loss = |logits: &Tensor| -> Tensor {
        -(logits * beta).log_sigmoid() * (1.0 - eps) - (-(logits * beta)).log_sigmoid() * eps
    };
    match c.loss_type {
        LossType::Simpo => {
            let (lc, lr) = (policy.0 / lengths.0, policy.1 / lengths.1);
            let logits = &lc - &lr - c.simpo_gamma / beta;
            PairLosses { losses: sigmoid_loss(&logits), chosen_rewards: (lc * beta).detach(), rejected_rewards: (lr * beta).detach() }
        }
        LossType::Ipo => {
            // IPO works on length-normalised log-ratios, and so do its rewards.
            let ratio_c = (policy.0 - reference.0) / lengths.0;
            let ratio_r = (policy.1 - reference.1) / lengths.1;
            let losses = (&ratio_c - &ratio_r - 1.0 / (2.0 * beta)).square();
            PairLosses { losses, chosen_rewards: (ratio_c * beta).detach(), rejected_rewards: (ratio_r * beta).detach() }
        }
        other => {
            let (ratio_c, ratio_r) = (policy.0 - reference.0, policy.1 - reference.1);
            let delta = &ratio_c - &ratio_r;
            let losses = match other {
                LossType::Sigmoid => sigmoid_loss(&delta),
                LossType::Hinge => (-(&delta * beta) + 1.0).relu(),
                LossType::Robust => {
                    (-(&delta * beta).log_sigmoid() * (1.0 - eps) + (-(&delta * beta)).log_sigmoid() * eps) / (1.0 - 2.0 * eps)
                }
                LossType::Ipo | LossType::Simpo => unreachable!(),
            };
            PairLosses { losses, chosen_rewards: (ratio_c * beta).detach(), rejected_rewards: (ratio_r * beta).detach() }
        }
    }
}

/// ε in [0, 0.5): at 0.5 the robust loss divides by zero, and above it the labels flip.
fn parse_label_smoothing(text: &str) -> Result<f64, String> {
    match crate::flags::non_negative(text)? {
        v if v < 0.5 => Ok(v),
        _ => Err(format!("label smoothing is a share of flipped labels in [0, 0.5), got `{text}`")),
    }
}

/// One preference pair, tokenised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    pub chosen: Document,
    pub rejected: Document,
}

/// Tokenises `(prompt, chosen, rejected)` rows with TRL's truncation; returns the pairs and how
/// many were dropped because nothing of a completion was left.
pub fn tokenize_pairs(tokenizer: &ChatTokenizer, rows: &[Vec<Vec<crate::data::Message>>], max_length: usize, max_prompt_length: usize) -> Result<(Vec<Pair>, usize)> {
    use rayon::prelude::*;
    let pairs: Vec<Option<Pair>> = rows
        .par_iter()
        .enumerate()
        .map(|(row, columns)| {
            let [prompt, chosen, rejected] = &columns[..] else { unreachable!("three columns requested") };
            let mut sides = vec![];
            for completion in [chosen, rejected] {
                let (mut p, c) = tokenizer.prompt_and_completion(prompt, completion).with_context(|| format!("pair {row}"))?;
                if p.len() > max_prompt_length {
                    p.drain(..p.len() - max_prompt_length);
                }
                let prompt_len = p.len();
                let mut ids = p;
                ids.extend(c);
                ids.truncate(max_length);
                if ids.len() <= prompt_len {
                    return Ok(None);
                }
                sides.push(Document::from_labels(ids, |i| i >= prompt_len));
            }
            let rejected = sides.pop().expect("two sides");
            Ok(Some(Pair { chosen: sides.pop().expect("two sides"), rejected }))
        })
        .collect::<Result<_>>()?;
    let dropped = pairs.iter().filter(|p| p.is_none()).count();
    Ok((pairs.into_iter().flatten().collect(), dropped))
}

/// Where reference log-probs come from.
pub enum Reference {
    /// A frozen model run on each batch.
    Live(Loaded),
    /// `[chosen, rejected]` summed log-probs per pair, per split.
    Precomputed([Vec<[f64; 2]>; 2]),
    /// The LoRA policy as it started (`Llama::as_started`), as TRL does it for a PEFT model
    /// without a reference model: fresh adapters switched off (the base), or frozen copies of
    /// the adapter it was loaded with. No second model in memory.
    StartingPolicy,
    /// SimPO needs none.
    None,
}

pub struct DpoObjective {
    pub pairs: [Vec<Pair>; 2],
    pub reference: Reference,
    pub loss: LossConfig,
    pub pad_id: i64,
    pub padding_free: bool,
    /// Logits a chunk of the vocabulary head holds (`memory::Fit`).
    pub head_chunk_logits: i64,
}

impl DpoObjective {
    /// Reference log-probs `[chosen], [rejected]` for a batch.
    fn reference_logps(&self, policy: &Llama, batch: &Batch, split: Split) -> Result<(Tensor, Tensor)> {
        let n = batch.examples.len() as i64;
        let device = batch.ids.device();
        let halves = |logps: Tensor| Ok((logps.narrow(0, 0, n), logps.narrow(0, n, n)));
        match &self.reference {
            Reference::Live(reference) => halves(reference_logps(&reference.model, batch)),
            Reference::StartingPolicy => halves(policy.as_started(|| reference_logps(policy, batch))),
            Reference::Precomputed(cached) => {
                let rows: Vec<[f64; 2]> = batch.examples.iter().map(|&e| cached[split.index()][e]).collect();
                let column = |k: usize| upload(Tensor::from_slice(&rows.iter().map(|r| r[k] as f32).collect::<Vec<_>>()), device);
                Ok((column(0), column(1)))
            }
            Reference::None => Ok((Tensor::zeros([n], (Kind::Float, device)), Tensor::zeros([n], (Kind::Float, device)))),
        }
    }
}

impl Objective for DpoObjective {
    fn len(&self, split: Split) -> usize {
        self.pairs[split.index()].len()
    }

    fn weight(&self, _split: Split, _example: usize) -> f64 {
        1.0
    }

    fn collate(&self, split: Split, examples: &[usize], device: Device) -> Result<Batch> {
        let pairs = &self.pairs[split.index()];
        // The chosen sequences, then the rejected: the documents' order, whatever the rows.
        let sequences = examples.iter().map(|&e| &pairs[e].chosen).chain(examples.iter().map(|&e| &pairs[e].rejected));
        let rows: Vec<Vec<&Document>> = match self.padding_free {
            true => vec![sequences.collect()],
            false => sequences.map(|d| vec![d]).collect(),
        };
        Ok(Batch::from_rows(&rows, self.pad_id, self.padding_free, examples.to_vec(), device))
    }

    fn loss(&self, model: &Llama, hidden: &Tensor, batch: &Batch, split: Split) -> Result<(Tensor, Metrics)> {
        let n = batch.examples.len() as i64;
        let (ref_c, ref_r) = self.reference_logps(model, batch, split)?;
        let half = |t: &Tensor, k: i64| t.narrow(0, k * n, n);
        // The loss's parts, kept for the metrics (which detach them).
        let mut parts = None;
        let loss = loss_of_log_probs(model, hidden, batch, self.head_chunk_logits, |values| {
            let stats = SequenceStats::of(values);
            let (len_c, len_r) = (half(&stats.tokens, 0), half(&stats.tokens, 1));
            let out = pair_losses(&self.loss, (&half(&stats.logps, 0), &half(&stats.logps, 1)), (&ref_c, &ref_r), (&len_c, &len_r));
            let loss = out.losses.sum(Kind::Float);
            parts = Some((out, stats));
            loss
        });
        let (out, stats) = parts.expect("the loss was computed");
        let (logp_c, logp_r) = (half(&stats.logps, 0), half(&stats.logps, 1));
        let sum = |t: &Tensor| t.detach().sum(Kind::Float);
        let nf = n as f64;
        // logits/* are TRL's batch means over all completion tokens (and vocab), per pair here.
        let mean_logits = |k: i64| sum(&half(&stats.logit_sums, k)) / sum(&half(&stats.tokens, k)).clamp_min(1.0) * nf;
        let metrics = Metrics::from([
            ("loss", sum(&out.losses)),
            ("rewards/chosen", sum(&out.chosen_rewards)),
            ("rewards/rejected", sum(&out.rejected_rewards)),
            ("rewards/accuracies", sum(&out.chosen_rewards.gt_tensor(&out.rejected_rewards).to_kind(Kind::Float))),
            ("rewards/margins", sum(&(&out.chosen_rewards - &out.rejected_rewards))),
            ("logps/chosen", sum(&logp_c)),
            ("logps/rejected", sum(&logp_r)),
            ("logits/chosen", mean_logits(0)),
            ("logits/rejected", mean_logits(1)),
        ]);
        Ok((loss, metrics))
    }

    fn dropout(&self) -> bool {
        false // TRL's DPOConfig.disable_dropout, on by default
    }

    fn reward_plot(&self) -> Option<(&'static str, &'static [&'static str])> {
        Some(("rewards.png", &["rewards/accuracies", "rewards/margins"]))
    }
}

pub fn run(args: &DpoArgs) -> Result<()> {
    let train_args = &args.train;
    let reference_dir = args.ref_model.clone().unwrap_or_else(|| train_args.model.clone());
    // With LoRA and no --ref-model, the reference is the policy as it starts.
    let lora_reference = train_args.lora.enabled() && args.ref_model.is_none();
    let command = driver::Command {
        args: train_args,
        stage: "dpo",
        columns: &["prompt", "chosen", "rejected"],
        workload: Workload {
            tokens: (2 * train_args.per_device_train_batch_size * args.max_length) as i64,
            reference_model: args.loss_type != LossType::Simpo && !args.precompute_ref_log_probs && !lora_reference,
            micro_batches: train_args.gradient_accumulation_steps,
        },
        also_reads: vec![reference_dir.clone()],
        settings: json!({"beta": args.beta, "loss_type": args.loss_type, "label_smoothing": args.label_smoothing,
                         "simpo_gamma": args.simpo_gamma, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
                         "ref_model": reference_dir, "precompute_ref_log_probs": args.precompute_ref_log_probs,
                         "padding_free": args.padding_free}),
    };
    let summary = driver::run(command, |rows, plan| {
        let (device, dtype) = (plan.device, plan.precision.dtype);
        let tokenizer = ChatTokenizer::load(&plan.model)?;
        let [train, eval] = rows.splits;
        let (train_pairs, train_dropped) = tokenize_pairs(&tokenizer, &train, args.max_length, args.max_prompt_length)?;
        let (eval_pairs, eval_dropped) = tokenize_pairs(&tokenizer, &eval, args.max_length, args.max_prompt_length)?;
        eprintln!(
            "magpie dpo: {} train / {} eval pairs ({} dropped: no completion token within max_length; {} dropped: null prompt, chosen or rejected)",
            train_pairs.len(),
            eval_pairs.len(),
            train_dropped + eval_dropped,
            rows.null_rows
        );
        let loss = LossConfig { loss_type: args.loss_type, beta: args.beta, label_smoothing: args.label_smoothing, simpo_gamma: args.simpo_gamma };
        let mut objective = DpoObjective { pairs: [train_pairs, eval_pairs], reference: Reference::None, loss, pad_id: tokenizer.pad_id, padding_free: args.padding_free,
                                          head_chunk_logits: plan.fit.head_chunk_logits };
        if lora_reference {
            // The reference is the policy as it starts: no second model.
            let mut policy = driver::load_policy(plan)?;
            objective.reference = match (args.loss_type, args.precompute_ref_log_probs) {
                (LossType::Simpo, _) => Reference::None,
                (_, true) => Reference::Precomputed(compute_reference(&objective, &policy.model, plan.schedule.per_device_batch, device, &plan.world)?),
                (_, false) => {
                    if plan.lora.as_ref().is_some_and(|l| l.from.is_some()) {
                        policy.model.keep_starting_adapters();
                    }
                    Reference::StartingPolicy
                }
            };
            return Ok(driver::Built { objective, policy });
        }
        objective.reference = match (args.loss_type, args.precompute_ref_log_probs) {
            (LossType::Simpo, _) => Reference::None,
            // The layout is in the key: padded and padding-free log-probs differ by rounding.
            (_, true) => Reference::Precomputed(precomputed_reference(&objective, &(&objective.pairs, args.padding_free), plan, &reference_dir)?),
            (_, false) => {
                let mut reference = load_causal_lm(&reference_dir, device, dtype)?;
                reference.vs.freeze();
                Reference::Live(reference)
            }
        };
        let policy = driver::load_policy(plan)?; // after the precomputed reference is freed
        Ok(driver::Built { objective, policy })
    })?;
    let Some(summary) = summary else { return Ok(()) };
    let show = |m: &std::collections::BTreeMap<String, f64>, prefix: &str| {
        ["loss", "rewards/accuracies", "rewards/margins"]
            .iter()
            .filter_map(|k| m.get(&format!("{prefix}{k}")).map(|v| format!("{prefix}{k} {v:.4}")))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!("magpie dpo: {} steps; last step: {}", summary.steps, show(&summary.last, ""));
    if let Some(eval) = &summary.eval {
        eprintln!("magpie dpo: eval: {}", show(eval, "eval_"));
    }
    eprintln!("magpie dpo: model in {}", train_args.output.join("model").display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::lm_head::DEFAULT_CHUNK_LOGITS;
    use crate::train::reference::{cache_key, compute_reference, read_cache, write_cache};
    use crate::train::distributed::World;
    use crate::data::Message;
    use crate::model::tests::{fixture, tiny};

    fn config(loss_type: LossType, beta: f64, label_smoothing: f64) -> LossConfig {
        LossConfig { loss_type, beta, label_smoothing, simpo_gamma: 0.5 }
    }

    fn scalar(t: &Tensor) -> f64 {
        t.double_value(&[0])
    }

    #[test]
    fn each_loss_matches_hand_computed_values() {
        // Policy log-probs (-10, -12), reference (-11, -11), lengths (5, 4): Δ = 2; β = 0.5, ε = 0.2.
        let t = |v: f32| Tensor::from_slice(&[v]);
        let (pc, pr, rc, rr, lc, lr) = (t(-10.), t(-12.), t(-11.), t(-11.), t(5.), t(4.));
        let loss = |kind| scalar(&pair_losses(&config(kind, 0.5, 0.2), (&pc, &pr), (&rc, &rr), (&lc, &lr)).losses);
        let (ls1, lsm1) = (-0.313_261_687_518_222_8, -1.313_261_687_518_222_8); // log σ(1), log σ(-1)
        assert!((loss(LossType::Sigmoid) - (-0.8 * ls1 - 0.2 * lsm1)).abs() < 1e-6);
        assert!(loss(LossType::Hinge).abs() < 1e-6, "relu(1 - βΔ) = 0");
        assert!((loss(LossType::Robust) - (-0.8 * ls1 + 0.2 * lsm1) / 0.6).abs() < 1e-6);
        // IPO: (1/5 - (-1/4) - 1/(2β))² = (0.45 - 1)².
        assert!((loss(LossType::Ipo) - 0.3025).abs() < 1e-6);
        // SimPO: mean logps -2 and -3, logits 1 - γ/β = 0, so loss = ln 2 whatever ε.
        assert!((loss(LossType::Simpo) - std::f64::consts::LN_2).abs() < 1e-6);
        let out = pair_losses(&config(LossType::Sigmoid, 0.5, 0.0), (&pc, &pr), (&rc, &rr), (&lc, &lr));
        assert!((scalar(&out.chosen_rewards) - 0.5).abs() < 1e-6 && (scalar(&out.rejected_rewards) + 0.5).abs() < 1e-6);
    }

    fn fixture_objective(loss_type: LossType, label_smoothing: f64, reference: Reference) -> (DpoObjective, serde_json::Value) {
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("dpo-reference.json")).unwrap()).unwrap();
        let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<i64>>();
        let pairs = json["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let prompt = ids(&p["prompt"]);
                let side = |c: &serde_json::Value| Document::from_labels([prompt.clone(), ids(c)].concat(), |i| i >= prompt.len());
                Pair { chosen: side(&p["chosen"]), rejected: side(&p["rejected"]) }
            })
            .collect();
        let loss = LossConfig { loss_type, beta: json["beta"].as_f64().unwrap(), label_smoothing, simpo_gamma: json["simpo_gamma"].as_f64().unwrap() };
        (DpoObjective { pairs: [pairs, vec![]], reference, loss, pad_id: 0, padding_free: false, head_chunk_logits: DEFAULT_CHUNK_LOGITS }, json)
    }

    fn metrics_of(objective: &DpoObjective) -> std::collections::BTreeMap<String, f64> {
        let policy = tiny("tiny-llama");
        let batch = objective.collate(Split::Train, &[0, 1], Device::Cpu).unwrap();
        let hidden = tch::no_grad(|| policy.model.hidden_states(&batch.inputs()));
        crate::train::objective::read(&objective.loss(&policy.model, &hidden, &batch, Split::Train).unwrap().1, 1.0).unwrap()
    }

    fn live_reference() -> Reference {
        Reference::Live(tiny("tiny-qwen2"))
    }

    /// Padded, and padding-free (the pairs' sequences back to back in one row, which is only
    /// right if no sequence attends to another and positions restart).
    #[test]
    fn loss_and_metrics_equal_the_pytorch_formulas_for_every_loss_type_padded_or_padding_free() {
        for (name, loss_type) in [("sigmoid", LossType::Sigmoid), ("ipo", LossType::Ipo), ("hinge", LossType::Hinge), ("robust", LossType::Robust), ("simpo", LossType::Simpo)] {
            let (_, json) = fixture_objective(loss_type, 0.0, Reference::None);
            let want = &json["results"][name];
            for padding_free in [false, true] {
                let reference = if loss_type == LossType::Simpo { Reference::None } else { live_reference() };
                let (mut objective, _) = fixture_objective(loss_type, want["label_smoothing"].as_f64().unwrap(), reference);
                objective.padding_free = padding_free;
                let batch = objective.collate(Split::Train, &[0, 1], Device::Cpu).unwrap();
                assert_eq!((batch.ids.size()[0], batch.documents), (if padding_free { 1 } else { 4 }, 4));
                let got = metrics_of(&objective);
                for (key, value) in want.as_object().unwrap() {
                    if key == "label_smoothing" {
                        continue;
                    }
                    let (got, want) = (got[key] / 2.0, value.as_f64().unwrap());
                    assert!((got - want).abs() <= 1e-5 * want.abs() + 1e-7, "{name} {key} (padding-free {padding_free}): ours {got}, PyTorch {want}");
                }
            }
        }
    }

    #[test]
    fn precomputed_reference_log_probs_give_the_live_reference_results_and_are_cached() {
        let (live, _) = fixture_objective(LossType::Sigmoid, 0.0, live_reference());
        let Reference::Live(reference) = &live.reference else { unreachable!() };
        let values = compute_reference(&live, &reference.model, 1, Device::Cpu, &World::single()).unwrap();
        let (precomputed, _) = fixture_objective(LossType::Sigmoid, 0.0, Reference::Precomputed(values.clone()));
        let (a, b) = (metrics_of(&live), metrics_of(&precomputed));
        for (key, value) in &a {
            assert!((value - b[key]).abs() <= 1e-5 * value.abs() + 1e-6, "{key}: {value} vs {}", b[key]);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".cache.parquet");
        write_cache(&path, &values).unwrap();
        assert_eq!(read_cache(&path).unwrap(), values);
        let saved = |name: &str| {
            let loaded = tiny(name);
            crate::model::hf::save(&loaded.vs, &loaded.dir, &dir.path().join(name), &crate::run::Provenance::new("test", ())).unwrap();
            crate::model::ModelDir::open(&dir.path().join(name)).unwrap()
        };
        let key = cache_key(&live.pairs, &saved("tiny-qwen2"), Kind::Float, Device::Cpu).unwrap();
        let other = cache_key(&live.pairs, &saved("tiny-llama"), Kind::Float, Device::Cpu).unwrap();
        assert_ne!(key, other, "the cache is keyed by the reference weights");
        let bf16 = cache_key(&live.pairs, &saved("tiny-qwen2"), Kind::BFloat16, Device::Cpu).unwrap();
        let cuda = cache_key(&live.pairs, &saved("tiny-qwen2"), Kind::Float, Device::Cuda(0)).unwrap();
        assert!(key != bf16 && key != cuda && bf16 != cuda, "the cache is keyed by the compute dtype and device");
    }

    /// With LoRA the reference is the policy with its adapters off: the base model's values (as
    /// a separate copy of it gives), and rewards of exactly 0 while the adapters are fresh.
    #[test]
    fn the_reference_of_a_lora_policy_is_its_base_and_fresh_adapters_give_zero_rewards() {
        let lora = crate::model::lora::LoraConfig::new(4, 8.0, 0.0, &["all-linear".to_string()], false).unwrap();
        let mut policy = tiny("tiny-llama");
        policy.add_adapters(&lora, None, 42).unwrap();
        let metrics = |objective: &DpoObjective| {
            let batch = objective.collate(Split::Train, &[0, 1], Device::Cpu).unwrap();
            let hidden = tch::no_grad(|| policy.model.hidden_states(&batch.inputs()));
            crate::train::objective::read(&objective.loss(&policy.model, &hidden, &batch, Split::Train).unwrap().1, 1.0).unwrap()
        };
        let (adapters_off, _) = fixture_objective(LossType::Sigmoid, 0.0, Reference::StartingPolicy);
        let fresh = metrics(&adapters_off);
        assert_eq!((fresh["rewards/chosen"], fresh["rewards/rejected"], fresh["rewards/margins"]), (0.0, 0.0, 0.0));
        tch::manual_seed(3);
        for (name, mut var) in policy.trained().variables() {
            if name.contains("lora_B") {
                tch::no_grad(|| var.copy_(&(Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) * 0.05)));
            }
        }
        let (separate_base, _) = fixture_objective(LossType::Sigmoid, 0.0, Reference::Live(tiny("tiny-llama")));
        let (trained, copy) = (metrics(&adapters_off), metrics(&separate_base));
        assert!(trained["rewards/chosen"].abs() > 1e-4, "the adapters moved the policy");
        for (key, value) in &copy {
            assert!((value - trained[key]).abs() <= 1e-6 * value.abs() + 1e-7, "{key}: {value} vs {}", trained[key]);
        }
    }

    #[test]
    fn prompts_keep_their_end_and_pairs_without_completion_tokens_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::convert::convert(&crate::test_support::test_model(), &dir.path().join("m"), false).unwrap();
        let tok = ChatTokenizer::load(&dir.path().join("m")).unwrap();
        let row = |question: &str| {
            vec![vec![Message::new("user", question)], vec![Message::new("assistant", "Yes, certainly.")], vec![Message::new("assistant", "No.")]]
        };
        let (pairs, dropped) = tokenize_pairs(&tok, &[row("Short?")], 1024, 512).unwrap();
        assert_eq!((pairs.len(), dropped), (1, 0));
        let (prompt, _) = tok.prompt_and_completion(&row("Short?")[0], &row("Short?")[1]).unwrap();
        let pair = &pairs[0];
        assert_eq!(pair.chosen.ids[..prompt.len()], prompt[..]);
        assert_eq!(pair.chosen.target_count(), pair.chosen.ids.len() - prompt.len(), "every completion token is a target");
        // A long prompt keeps its last 20 tokens (so the generation prompt survives).
        let long = row(&"many words ".repeat(50));
        let (long_prompt, _) = tok.prompt_and_completion(&long[0], &long[1]).unwrap();
        let (cut, _) = tokenize_pairs(&tok, &[long], 1024, 20).unwrap();
        assert_eq!(cut[0].chosen.ids.len() - cut[0].chosen.target_count(), 20);
        assert_eq!(cut[0].chosen.ids[..20], long_prompt[long_prompt.len() - 20..]);
        // max_length below the prompt leaves no completion: dropped and counted.
        let (none, dropped) = tokenize_pairs(&tok, &[row("Short?")], prompt.len(), 512).unwrap();
        assert_eq!((none.len(), dropped), (0, 1));
    }
}
