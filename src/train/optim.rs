//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments), with
//! weight decay only on matrices (norms and biases are excluded, as the HF Trainer does), global
//! gradient-norm clipping, and transformers' learning-rate schedules with warmup (cosine, linear,
//! constant).
//!
//! Mixed precision as DeepSpeed, FSDP and the HF Trainer do it: with bf16 weights the optimizer
//! keeps an fp32 master copy of each weight and fp32 moments, updates the master and copies it
//! back into the bf16 weight. Without the master, an update smaller than bf16's spacing (about
//! 1.2e-4 at 0.02, 8e-3 at 1.0) rounds away: at lr 1e-6 almost nothing would train.
//!
//! The update itself is libtorch's fused AdamW kernel (`fused`), as `torch.optim.AdamW(fused=True)`
//! runs it; the state is kept here rather than in `tch::nn::Optimizer` so that it (moments and
//! master weights) can be saved in a checkpoint and resumed exactly.

use super::fused;
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Kind, Tensor};

/// What a training loop needs of its optimizer, one process's part of it.
pub trait Optimizer {
    fn zero_grad(&mut self);
    /// Makes the gradients final (summed over the ranks when data-parallel) and clips them to a
    /// global L2 norm of `max_norm` (`None`: no clipping). Returns the norm before clipping, a 0-dim
    /// f32 tensor on the device, so nothing waits for it.
    fn finish_gradients(&mut self, max_norm: Option<f64>) -> Result<Tensor>;
    /// After each micro-batch's backward pass: moves its gradients into the optimizer's f32
    /// sums, when it keeps them ([`GradientSums`]).
    fn accumulate(&mut self) -> Result<()>;
    /// Whether it starts reducing a block's gradients during the backward pass, as soon as
    /// [`Optimizer::block_done`] says they are final.
    fn reduces_during_backward(&self) -> bool {
        false
    }
    /// During a micro-batch's backward pass, top block first: block `index`'s weights have their
    /// final gradients.
    fn block_done(&mut self, _index: usize) -> Result<()> {
        Ok(())
    }
    fn step(&mut self, lr: f64) -> Result<()>;
    /// Completed optimizer steps (the bias corrections' t).
    fn steps(&self) -> i64;
    /// Writes this process's state (moments, master weights) into a checkpoint folder.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Reads what [`Optimizer::save`] wrote, after `steps` steps.
    fn load(&mut self, dir: &Path, steps: i64) -> Result<()>;
}

/// AdamW's hyper-parameters, torch.optim.AdamW's defaults but for weight decay.
#[derive(Clone, Copy, Debug)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamConfig {
    pub fn new(weight_decay: f64) -> AdamConfig {
        AdamConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay }
    }

    /// One AdamW update of every tensor of `group` in place at step `t` (1-based), by libtorch's
    /// fused kernel, as `torch.optim.AdamW(fused=True)` computes it; grads in the moments' dtype.
    /// `decay` is false for norms and biases.
    pub fn update(&self, group: &fused::Group, decay: bool, lr: f64, t: i64) -> Result<()> {
        let weight_decay = if decay { self.weight_decay } else { 0.0 };
        fused::adamw(group, &fused::Hyper { lr, beta1: self.beta1, beta2: self.beta2, weight_decay, eps: self.eps, step: t })
    }
}

/// Elements of gradients converted to the moments' dtype for one fused-kernel call: 2²⁸, 1 GiB
/// of f32. Converting every gradient at once would hold an f32 copy of the whole model (32 GB at
/// 8B) beside the bf16 gradients.
pub const SLICE_ELEMENTS: i64 = 1 << 28;

/// Pieces `(tensor, start, len)` of tensors of `numels` elements (flattened), grouped so that no
/// group holds more than `slice` elements: a tensor larger than a slice is cut into several.
pub fn slices(numels: &[i64], slice: i64) -> Vec<Vec<(usize, i64, i64)>> {
    let (mut groups, mut current, mut room) = (vec![], vec![], slice);
    for (i, &n) in numels.iter().enumerate() {
        let mut start = 0;
        while start < n {
            if room == 0 {
                groups.push(std::mem::take(&mut current));
                room = slice;
            }
            let len = (n - start).min(room);
            current.push((i, start, len));
            (start, room) = (start + len, room - len);
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// f32 sums of the micro-batches' gradients, one per parameter, as DeepSpeed's bf16 optimizer
/// keeps them: summed in bf16, 16 micro-batches of N(0,1)/256 values are off by 5e-3 relative.
/// Kept for bf16 weights with fp32 optimizer state and more than one micro-batch a step.
pub struct GradientSums(Vec<Tensor>);

impl GradientSums {
    pub fn new<'a>(values: impl Iterator<Item = &'a Tensor>) -> Self {
        GradientSums(values.map(|v| Tensor::zeros(v.size(), (Kind::Float, v.device()))).collect())
    }

    /// Adds each value's gradient into its sum and zeroes the gradient.
    pub fn add<'a>(&self, values: impl Iterator<Item = &'a Tensor>) {
        tch::no_grad(|| {
            for (sum, value) in self.0.iter().zip(values) {
                let mut grad = value.grad();
                if grad.defined() {
                    let _ = sum.shallow_clone().g_add_(&grad);
                    let _ = grad.zero_();
                }
            }
        })
    }

    pub fn zero(&self) {
        for sum in &self.0 {
            let _ = sum.shallow_clone().zero_();
        }
    }

    /// The summed gradient of parameter `i`.
    pub fn get(&self, i: usize) -> Tensor {
        self.0[i].shallow_clone()
    }
}

/// Parameter `i`'s gradient for the update: its f32 sum when `sums` are kept, else `.grad()`.
fn gradient(value: &Tensor, sums: Option<&GradientSums>, i: usize) -> Tensor {
    sums.map_or_else(|| value.grad(), |s| s.get(i))
}

/// The single-process optimizer: every parameter's state in this process.
pub struct AdamW {
    pub config: AdamConfig,
    pub steps: i64,
    params: Vec<Param>,
    sums: Option<GradientSums>,
    /// Elements converted for one fused call at most ([`SLICE_ELEMENTS`]).
    slice_elements: i64,
    /// The most gradient elements converted for one fused call so far.
    pub peak_converted: i64,
}

/// The sum of the squares of `grads`' elements in f32, `piece` elements of a gradient at a time:
/// a piece's f32 copy and its square fit in one optimizer slice (with half a slice), not two f32
/// copies of a whole gradient (4 GiB for an 8B model's embeddings).
fn sum_of_squares(grads: &[Tensor], piece: i64) -> Tensor {
    let squares: Vec<Tensor> =
        grads.iter().flat_map(|g| g.reshape([-1]).split(piece, 0)).map(|p| p.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
    Tensor::stack(&squares, 0).sum(Kind::Float)
}

/// The file a single process's optimizer state goes to in a checkpoint.
pub const STATE_FILE: &str = "optimizer.safetensors";

struct Param {
    name: String,
    /// The model's weight (what forward and backward use).
    value: Tensor,
    /// The fp32 master copy the update is applied to, when `value` is not fp32 and the state is.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

impl AdamW {
    /// Over every trainable variable of `vs`. With `fp32_state`, moments in f32 and, for weights
    /// that are not f32, an f32 master copy; without, everything in the weights' dtype. With
    /// `f32_sums`, micro-batch gradients are summed in f32 ([`GradientSums`]).
    pub fn new(vs: &nn::VarStore, weight_decay: f64, fp32_state: bool, f32_sums: bool) -> Self {
        let params = trainable(vs)
            .into_iter()
            .map(|(name, value)| {
                let kind = if fp32_state { Kind::Float } else { value.kind() };
                let zeros = || Tensor::zeros(value.size(), (kind, value.device()));
                let master = (value.kind() != kind).then(|| tch::no_grad(|| value.to_kind(kind)));
                Param { decay: value.dim() >= 2, exp_avg: zeros(), exp_avg_sq: zeros(), master, name, value }
            })
            .collect::<Vec<Param>>();
        let sums = f32_sums.then(|| GradientSums::new(params.iter().map(|p| &p.value)));
        AdamW { config: AdamConfig::new(weight_decay), steps: 0, params, sums, slice_elements: SLICE_ELEMENTS, peak_converted: 0 }
    }

    /// Parameter `i`'s f32 gradient sum (with `f32_sums`).
    #[cfg(test)]
    pub fn gradient_sum(&self, i: usize) -> Tensor {
        self.sums.as_ref().expect("f32 sums").get(i)
    }

    /// The same, converting at most `slice_elements` gradient elements per fused call.
    #[cfg(test)]
    pub fn with_slices(mut self, slice_elements: i64) -> Self {
        self.slice_elements = slice_elements;
        self
    }
}

/// The trainable variables of `vs`, sorted by name: the order optimizer state is kept in.
pub fn trainable(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Zeroes the gradients of `values` that have one.
pub fn zero_grads<'a>(values: impl Iterator<Item = &'a Tensor>) {
    for value in values {
        let mut grad = value.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
}

/// `max_norm / (norm + 1e-6)`, at most 1, computed on the device as `clip_grad_norm_` does.
pub fn clip_coefficient(norm: &Tensor, max_norm: f64) -> Tensor {
    (norm + 1e-6).reciprocal().g_mul_scalar(max_norm).clamp_max(1.0)
}

impl AdamW {
    /// The fp32 master copy of weight `name`, when there is one.
    pub fn master(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|p| p.name == name)?.master.as_ref()
    }

    /// The moments and master weights by name, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![];
        for p in &self.params {
            state.push((format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()));
            state.push((format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone()));
            if let Some(master) = &p.master {
                state.push((format!("master.{}", p.name), master.shallow_clone()));
            }
        }
        state
    }
}

impl Optimizer for AdamW {
    fn zero_grad(&mut self) {
        zero_grads(self.params.iter().map(|p| &p.value));
        if let Some(sums) = &self.sums {
            sums.zero();
        }
    }

    fn accumulate(&mut self) -> Result<()> {
        if let Some(sums) = &self.sums {
            sums.add(self.params.iter().map(|p| &p.value));
        }
        Ok(())
    }

    /// As `clip_grad_norm_`: the gradients are already final in a single process.
    fn finish_gradients(&mut self, max_norm: Option<f64>) -> Result<Tensor> {
        Ok(tch::no_grad(|| {
            let grads: Vec<Tensor> =
                self.params.iter().enumerate().map(|(i, p)| gradient(&p.value, self.sums.as_ref(), i)).filter(|g| g.defined()).collect();
            let Some(first) = grads.first() else { return Tensor::zeros([], (Kind::Float, tch::Device::Cpu)) };
            let norm = sum_of_squares(&grads, SLICE_ELEMENTS / 2).sqrt().to_device(first.device());
            if let Some(max_norm) = max_norm {
                let coef = clip_coefficient(&norm, max_norm);
                for mut grad in grads {
                    let _ = grad.g_mul_(&coef.to_kind(grad.kind()));
                }
            }
            norm
        }))
    }

    fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        tch::no_grad(|| {
            for decay in [true, false] {
                let chosen: Vec<(&Param, Tensor)> = self.params.iter().enumerate()
                    .map(|(i, p)| (p, gradient(&p.value, self.sums.as_ref(), i)))
                    .filter(|(p, grad)| p.decay == decay && grad.defined())
                    .collect();
                let numels: Vec<i64> = chosen.iter().map(|(p, _)| p.value.numel() as i64).collect();
                // One fused call per slice, so that gradients converted to the moments' dtype
                // never hold more than a slice at once.
                for pieces in slices(&numels, self.slice_elements) {
                    let mut group = fused::Group::default();
                    let mut converted = 0;
                    for (i, start, len) in pieces {
                        let (p, grad) = &chosen[i];
                        let piece = |t: &Tensor| t.view([-1]).narrow(0, start, len);
                        let kind = p.exp_avg.kind();
                        let grad = grad.reshape([-1]).narrow(0, start, len);
                        if grad.kind() != kind {
                            converted += len;
                        }
                        // The master copy when there is one, else the weight itself (same dtype).
                        let value = piece(p.master.as_ref().unwrap_or(&p.value));
                        group.push(value, grad.to_kind(kind), piece(&p.exp_avg), piece(&p.exp_avg_sq));
                    }
                    self.peak_converted = self.peak_converted.max(converted);
                    self.config.update(&group, decay, lr, self.steps)?;
                }
            }
            for p in &mut self.params {
                if let Some(master) = &p.master {
                    p.value.copy_(master);
                }
            }
            Ok(())
        })
    }

    fn steps(&self) -> i64 {
        self.steps
    }

    fn save(&self, dir: &Path) -> Result<()> {
        crate::model::hf::write_safetensors(&self.state(), &dir.join(STATE_FILE))
    }

    fn load(&mut self, dir: &Path, steps: i64) -> Result<()> {
        let state = read_state(dir, STATE_FILE)?;
        for p in &mut self.params {
            let slots = [("exp_avg", Some(&mut p.exp_avg)), ("exp_avg_sq", Some(&mut p.exp_avg_sq)), ("master", p.master.as_mut())];
            for (prefix, slot) in slots {
                let Some(slot) = slot else { continue };
                let key = format!("{prefix}.{}", p.name);
                let Some(saved) = state.get(&key) else { bail!("optimizer state lacks `{key}` (saved with other precision settings?)") };
                tch::no_grad(|| slot.copy_(saved));
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// The optimizer state file `name` of checkpoint `dir`, by tensor name. A missing file is an
/// error naming the state files that are there (a run of another number of processes).
pub fn read_state(dir: &Path, name: &str) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(name);
    if !path.is_file() {
        let mut found: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("optimizer") && n.ends_with(".safetensors"))
            .collect();
        found.sort();
        bail!(
            "{}: no {name}; it holds {} (optimizer state saved by another number of processes: resume with the same number)",
            dir.display(),
            if found.is_empty() { "no optimizer state".to_string() } else { found.join(", ") }
        );
    }
    Ok(Tensor::read_safetensors(&path).with_context(|| format!("{}: unreadable optimizer state", path.display()))?.into_iter().collect())
}

/// transformers' `lr_scheduler_type` values, each with linear warmup.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based), as `get_{cosine,linear,constant}_schedule_with_warmup`.
    pub fn lr(self, peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Cosine => peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Schedule::Linear => peak * (1.0 - progress).max(0.0),
            Schedule::Constant => peak,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // transformers: warmup 2 of 10 steps at 1e-3 -> [0, 5e-4, 1e-3, 9.62e-4, ...].
        let lrs: Vec<f64> = (0..10).map(|s| Schedule::Cosine.lr(1e-3, s, 2, 10)).collect();
        assert_eq!(lrs[0], 0.0);
        assert!((lrs[1] - 5e-4).abs() < 1e-12);
        assert!((lrs[2] - 1e-3).abs() < 1e-12);
        assert!((lrs[3] - 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI / 8.0).cos())).abs() < 1e-12);
        assert!(lrs[9] > 0.0 && lrs[9] < lrs[8]);
        assert!((Schedule::Linear.lr(1e-3, 6, 2, 10) - 5e-4).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(1e-3, 9, 2, 10), 1e-3);
        assert_eq!(Schedule::Constant.lr(1e-3, 0, 2, 10), 0.0);
    }

    #[test]
    fn one_step_equals_torch_adamw_by_hand() {
        // p = [1, -2] (decayed matrix [1, 2]), g = [0.5, 0.25], lr 0.1, wd 0.01, first step:
        // m_hat = g, v_hat = g^2, so p' = p(1 - lr*wd) - lr * g / (|g| + eps).
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0]).view([1, 2]));
        let loss = (&w * Tensor::from_slice(&[0.5f32, 0.25]).view([1, 2])).sum(Kind::Float);
        let mut opt = AdamW::new(&vs, 0.01, true, false);
        loss.backward();
        opt.step(0.1).unwrap();
        let got: Vec<f32> = w.view([-1]).try_into().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// Three AdamW steps at lr 1e-6 on the same weights and gradients, in f32 and in bf16 with
    /// master weights: the same updates, and the bf16 weights move.
    #[test]
    fn bf16_with_master_weights_keeps_updates_that_bf16_alone_rounds_away() {
        let initial = Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu)) * 0.02;
        let initial = initial.to_kind(Kind::BFloat16).to_kind(Kind::Float); // representable in bf16
        // Gradients representable in bf16 too, so both runs see exactly the same ones.
        let grads: Vec<Tensor> = (0..3).map(|_| Tensor::randn([64, 64], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16).to_kind(Kind::Float)).collect();
        let run = |kind: Kind, fp32_state: bool| {
            let mut vs = nn::VarStore::new(tch::Device::Cpu);
            let w = vs.root().var_copy("w", &initial);
            vs.set_kind(kind);
            let mut opt = AdamW::new(&vs, 0.0, fp32_state, false);
            for g in &grads {
                opt.zero_grad();
                (&w * g.to_kind(kind)).sum(Kind::Float).backward();
                opt.step(1e-6).unwrap();
            }
            let master = opt.master("w").map(|m| m.copy());
            (w.to_kind(Kind::Float), master)
        };
        let (f32_weights, _) = run(Kind::Float, true);
        let (bf16_weights, master) = run(Kind::BFloat16, true);
        let master = master.expect("bf16 weights get an fp32 master copy");
        let f32_update = (&f32_weights - &initial).abs().sum(Kind::Double).double_value(&[]);
        let master_update = (&master - &initial).abs().sum(Kind::Double).double_value(&[]);
        assert!(f32_update > 0.0);
        assert!((master_update - f32_update).abs() <= 1e-6 * f32_update, "{master_update} vs {f32_update}");
        let moved = bf16_weights.ne_tensor(&initial).sum(Kind::Int64).int64_value(&[]);
        assert!(moved > 0, "the saved bf16 weights differ from the initial ones");
        let (pure_bf16, _) = run(Kind::BFloat16, false);
        let moved_pure = pure_bf16.ne_tensor(&initial).sum(Kind::Int64).int64_value(&[]);
        assert!(moved_pure < moved, "pure bf16 loses updates: {moved_pure} vs {moved} moved");
    }

    #[test]
    fn the_sum_of_squares_taken_in_pieces_is_the_whole_ones() {
        let grads = [Tensor::randn([7, 5], (Kind::BFloat16, tch::Device::Cpu)), Tensor::randn([3], (Kind::Float, tch::Device::Cpu))];
        let whole: f64 = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float).double_value(&[])).sum();
        for piece in [1, 4, 35, 100] {
            let pieces = sum_of_squares(&grads, piece).double_value(&[]);
            assert!((pieces - whole).abs() <= 1e-5 * whole, "pieces of {piece}: {pieces} vs {whole}");
        }
    }

    #[test]
    fn slices_cut_large_tensors_and_never_exceed_their_size() {
        assert_eq!(slices(&[3, 10, 2], 4), vec![vec![(0, 0, 3), (1, 0, 1)], vec![(1, 1, 4)], vec![(1, 5, 4)], vec![(1, 9, 1), (2, 0, 2)]]);
        assert_eq!(slices(&[5], 100), vec![vec![(0, 0, 5)]]);
        assert!(slices(&[], 4).is_empty());
    }

    /// bf16 weights with f32 moments: gradients are converted to f32 a slice at a time, the
    /// largest conversion stays within one slice, and the update is the one unsliced.
    #[test]
    fn a_sliced_step_converts_at_most_one_slice_and_updates_as_one_call() {
        let run = |slice: i64| {
            let mut vs = nn::VarStore::new(tch::Device::Cpu);
            let shapes: [&[i64]; 4] = [&[40, 30], &[70], &[25, 25], &[9]];
            let ws: Vec<Tensor> = shapes.iter().enumerate().map(|(i, shape)| {
                let n: i64 = shape.iter().product();
                vs.root().var_copy(&format!("w{i}"), &Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).g_mul_scalar(0.01 * (i + 1) as f64).sin().view(*shape))
            }).collect();
            vs.set_kind(Kind::BFloat16);
            let mut opt = AdamW::new(&vs, 0.1, true, false).with_slices(slice);
            for step in 0..2 {
                opt.zero_grad();
                for (i, w) in ws.iter().enumerate() {
                    (w * Tensor::ones(w.size(), (Kind::BFloat16, tch::Device::Cpu)).g_mul_scalar(0.1 * (i + step + 1) as f64)).sum(Kind::Float).backward();
                }
                opt.step(1e-2).unwrap();
            }
            let masters: Vec<Tensor> = (0..4).map(|i| opt.master(&format!("w{i}")).unwrap().copy()).collect();
            (masters, opt.peak_converted)
        };
        let (whole, whole_peak) = run(1 << 20);
        let (sliced, sliced_peak) = run(300);
        assert_eq!(whole_peak, 1200 + 625, "unsliced, the decayed matrices are converted in one call");
        assert!(sliced_peak <= 300, "{sliced_peak} elements converted at once");
        for (a, b) in whole.iter().zip(&sliced) {
            assert!(a.equal(b), "the same update");
        }
    }
}
