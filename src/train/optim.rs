//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments), with
//! weight decay only on matrices (norms and biases are excluded, as the HF Trainer does), global
//! gradient-norm clipping, and transformers' learning-rate schedules with warmup (cosine, linear,
//! constant).
//!
//! Written here rather than taken from `tch::nn::Optimizer` so that its state can be saved in a
//! checkpoint and resumed exactly, and kept in f32 while the weights are bf16.

use anyhow::{bail, Result};
use tch::{nn, Kind, Tensor};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Completed optimizer steps (the bias corrections' t).
    pub steps: i64,
    params: Vec<Param>,
}

struct Param {
    name: String,
    value: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
}

impl AdamW {
    /// Over every trainable variable of `vs`; moments in f32 when `fp32_state`, else in the
    /// weights' dtype.
    pub fn new(vs: &nn::VarStore, weight_decay: f64, fp32_state: bool) -> Self {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let params = named
            .into_iter()
            .map(|(name, value)| {
                let kind = if fp32_state { Kind::Float } else { value.kind() };
                let zeros = || Tensor::zeros(value.size(), (kind, value.device()));
                Param { decay: value.dim() >= 2, exp_avg: zeros(), exp_avg_sq: zeros(), name, value }
            })
            .collect();
        AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, steps: 0, params }
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.value.grad();
            if grad.defined() {
                let _ = grad.zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm` (`clip_grad_norm_`);
    /// returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        tch::no_grad(|| {
            let squares: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.value.grad())
                .filter(|g| g.defined())
                .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
                .collect();
            if squares.is_empty() {
                return 0.0;
            }
            let norm = Tensor::stack(&squares, 0).sum(Kind::Float).sqrt().double_value(&[]);
            if max_norm > 0.0 && norm.is_finite() {
                let coef = (max_norm / (norm + 1e-6)).min(1.0);
                if coef < 1.0 {
                    for p in &self.params {
                        let mut grad = p.value.grad();
                        if grad.defined() {
                            let _ = grad.g_mul_scalar_(coef);
                        }
                    }
                }
            }
            norm
        })
    }

    pub fn step(&mut self, lr: f64) {
        self.steps += 1;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        tch::no_grad(|| {
            for p in &mut self.params {
                let grad = p.value.grad();
                if !grad.defined() {
                    continue;
                }
                let kind = p.exp_avg.kind();
                let grad = grad.to_kind(kind);
                let mut value = p.value.to_kind(kind);
                let _ = p.exp_avg.lerp_(&grad, 1.0 - self.beta1);
                p.exp_avg_sq *= self.beta2;
                p.exp_avg_sq += grad.square() * (1.0 - self.beta2);
                if p.decay && self.weight_decay != 0.0 {
                    value *= 1.0 - lr * self.weight_decay;
                }
                let denom = p.exp_avg_sq.sqrt() / bc2.sqrt() + self.eps;
                value -= (&p.exp_avg / denom) * (lr / bc1);
                if value.kind() == p.value.kind() && value.data_ptr() == p.value.data_ptr() {
                    continue;
                }
                p.value.copy_(&value);
            }
        });
    }

    /// The moments by name, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .flat_map(|p| [(format!("exp_avg.{}", p.name), p.exp_avg.shallow_clone()), (format!("exp_avg_sq.{}", p.name), p.exp_avg_sq.shallow_clone())])
            .collect()
    }

    pub fn load_state(&mut self, state: &std::collections::HashMap<String, Tensor>, steps: i64) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("exp_avg", &mut p.exp_avg), ("exp_avg_sq", &mut p.exp_avg_sq)] {
                let key = format!("{prefix}.{}", p.name);
                let Some(saved) = state.get(&key) else { bail!("optimizer state lacks `{key}`") };
                tch::no_grad(|| slot.copy_(saved));
            }
        }
        self.steps = steps;
        Ok(())
    }
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
        let mut opt = AdamW::new(&vs, 0.01, true);
        loss.backward();
        opt.step(0.1);
        let got: Vec<f32> = w.view([-1]).try_into().unwrap();
        let want = [1.0 * (1.0 - 0.001) - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 * (1.0 - 0.001) - 0.1];
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }
}
