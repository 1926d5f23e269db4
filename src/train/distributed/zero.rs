//! AdamW with its state sharded over the ranks: ZeRO stage 1, as DeepSpeed and PyTorch's
//! `ZeroRedundancyOptimizer` do it. Each rank keeps the fp32 master weights and the Adam moments of
//! its own shard only (1/N of 12 bytes a parameter), so an 8B model's 96 GB of optimizer state
//! spreads over the GPUs.
//!
//! The parameters, sorted by name as [`AdamW`](crate::train::optim::AdamW) keeps them, are laid
//! end to end and cut into buckets of about [`BUCKET_ELEMENTS`] (whole parameters each). A step:
//! 1. each bucket's gradients are flattened (f32) and all-reduced, one bucket at a time, and the
//!    rank keeps its contiguous chunk of the sum;
//! 2. the global gradient norm is the all-reduced sum of the chunks' squares; clipping scales the
//!    chunks;
//! 3. the rank applies AdamW (`AdamConfig::update`, the fused kernel the single-process optimizer
//!    uses, on each parameter's segment of the chunk) to its master chunk;
//! 4. each bucket's updated chunks are all-gathered in the weights' dtype and copied into the
//!    weights, so every rank holds the same model.
//!
//! With bf16 weights and several micro-batches a step, step 1 runs after every micro-batch and
//! adds into the f32 chunks instead (ZeRO-2's gradient reduction), so micro-batch gradients are
//! summed in f32 without a full-size f32 copy on each rank.
//!
//! The reduction waits for the backward pass to end (tch exposes no gradient hooks to overlap it).

use anyhow::{bail, Result};
use std::ops::Range;
use std::path::Path;
use tch::{nn, Kind, Tensor};

use super::process_group::ProcessGroup;
use crate::train::fused;
use crate::train::optim::{clip_coefficient, read_state, trainable, zero_grads, AdamConfig, Optimizer};

/// About 128 MB of f32 gradients per all-reduce.
pub const BUCKET_ELEMENTS: i64 = 1 << 25;

pub struct ShardedAdamW<'a> {
    config: AdamConfig,
    steps: i64,
    group: &'a ProcessGroup,
    /// The trainable weights, sorted by name.
    params: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    /// Reduce every micro-batch into the f32 gradient shards (ZeRO-2 style), so that bf16
    /// micro-batch gradients are summed in f32 without a full-size f32 copy on each rank.
    reduce_each_micro_batch: bool,
}

/// Consecutive parameters reduced and gathered together, and this rank's chunk of them.
struct Bucket {
    params: Range<usize>,
    /// Where each parameter starts in the bucket's flat layout.
    offsets: Vec<i64>,
    /// Elements per rank: the bucket's elements padded up to a multiple of the world size, / N.
    chunk: i64,
    /// This rank's chunk of the reduced gradient (f32), of the master weights and of the moments.
    grad: Tensor,
    master: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    segments: Vec<Segment>,
}

/// The part of one parameter inside this rank's chunk.
struct Segment {
    /// Where it starts in the chunk.
    at: i64,
    len: i64,
    decay: bool,
}

impl<'a> ShardedAdamW<'a> {
    /// Over the trainable variables of `vs`; the state is f32 with `fp32_state`, else the
    /// weights' dtype. With `f32_sums`, each micro-batch's gradients are reduced and added into
    /// this rank's f32 gradient shards. `bucket_elements` sizes the buckets ([`BUCKET_ELEMENTS`]
    /// in training).
    pub fn new(vs: &nn::VarStore, weight_decay: f64, fp32_state: bool, f32_sums: bool, group: &'a ProcessGroup, bucket_elements: i64) -> Self {
        let params = trainable(vs);
        let mut buckets = vec![];
        let mut start = 0;
        while start < params.len() {
            let mut end = start;
            let mut elements = 0;
            while end < params.len() && (end == start || elements + params[end].1.numel() as i64 <= bucket_elements) {
                elements += params[end].1.numel() as i64;
                end += 1;
            }
            buckets.push(Bucket::new(&params, start..end, fp32_state, group));
            start = end;
        }
        ShardedAdamW { config: AdamConfig::new(weight_decay), steps: 0, group, params, buckets, reduce_each_micro_batch: f32_sums }
    }

    /// Bytes this rank's optimizer holds between steps (gradient shards, master weights, moments)
    /// and, at most at once, during one (a bucket's reduce and gather buffers).
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> (i64, i64) {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let kept = self.buckets.iter().map(|b| bytes(&b.grad) + bytes(&b.master) + bytes(&b.exp_avg) + bytes(&b.exp_avg_sq)).sum::<i64>();
        let world = self.group.size as i64;
        let transient = self.buckets.iter().map(|b| {
            let weight_kind = self.params[b.params.start].1.kind();
            let gather = b.chunk * world * weight_kind.elt_size_in_bytes() as i64
                + if b.master.kind() == weight_kind { 0 } else { b.chunk * weight_kind.elt_size_in_bytes() as i64 };
            (b.chunk * world * 4).max(gather)
        });
        (kept, transient.max().unwrap_or(0))
    }

    fn state_file(&self) -> String {
        format!("optimizer-rank{}-of-{}.safetensors", self.group.rank, self.group.size)
    }
}

impl Bucket {
    fn new(params: &[(String, Tensor)], range: Range<usize>, fp32_state: bool, group: &ProcessGroup) -> Bucket {
        let mut offsets = vec![];
        let mut elements = 0;
        for (_, value) in &params[range.clone()] {
            offsets.push(elements);
            elements += value.numel() as i64;
        }
        let world = group.size as i64;
        let chunk = (elements + world - 1) / world;
        let (lo, hi) = (group.rank as i64 * chunk, (group.rank as i64 + 1) * chunk);
        let first = &params[range.start].1;
        let kind = if fp32_state { Kind::Float } else { first.kind() };
        let zeros = |kind| Tensor::zeros([chunk], (kind, first.device()));
        let (master, mut segments) = (zeros(kind), vec![]);
        tch::no_grad(|| {
            for ((_, value), &offset) in params[range.clone()].iter().zip(&offsets) {
                let (from, to) = (offset.max(lo), (offset + value.numel() as i64).min(hi));
                if from < to {
                    let segment = Segment { at: from - lo, len: to - from, decay: value.dim() >= 2 };
                    master.narrow(0, segment.at, segment.len).copy_(&value.view([-1]).narrow(0, from - offset, segment.len));
                    segments.push(segment);
                }
            }
        });
        Bucket { params: range, offsets, chunk, grad: zeros(Kind::Float), exp_avg: zeros(kind), exp_avg_sq: zeros(kind), master, segments }
    }

    /// All-reduces the bucket's gradients and keeps this rank's chunk of the sum, or adds it to
    /// the chunk (`add`: one micro-batch of several).
    fn reduce(&mut self, params: &[(String, Tensor)], group: &ProcessGroup, add: bool) -> Result<()> {
        let flat = Tensor::zeros([self.chunk * group.size as i64], (Kind::Float, self.grad.device()));
        for ((_, value), &offset) in params[self.params.clone()].iter().zip(&self.offsets) {
            let grad = value.grad();
            if grad.defined() {
                flat.narrow(0, offset, value.numel() as i64).copy_(&grad.view([-1]));
            }
        }
        group.all_reduce_sum(&flat)?;
        let mine = flat.narrow(0, group.rank as i64 * self.chunk, self.chunk);
        if add {
            let _ = self.grad.g_add_(&mine);
        } else {
            self.grad.copy_(&mine);
        }
        Ok(())
    }

    /// Gathers every rank's updated chunk into the weights.
    fn gather(&self, params: &[(String, Tensor)], group: &ProcessGroup) -> Result<()> {
        let kind = params[self.params.start].1.kind();
        let flat = Tensor::empty([self.chunk * group.size as i64], (kind, self.master.device()));
        group.all_gather(&flat, &self.master.to_kind(kind))?;
        for ((_, value), &offset) in params[self.params.clone()].iter().zip(&self.offsets) {
            value.shallow_clone().copy_(&flat.narrow(0, offset, value.numel() as i64).view(value.size().as_slice()));
        }
        Ok(())
    }

    fn state(&self, index: usize) -> [(String, Tensor); 3] {
        [("master", &self.master), ("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)].map(|(name, t)| (format!("{name}.{index}"), t.shallow_clone()))
    }
}

impl Optimizer for ShardedAdamW<'_> {
    fn zero_grad(&mut self) {
        zero_grads(self.params.iter().map(|(_, value)| value));
        if self.reduce_each_micro_batch {
            for bucket in &mut self.buckets {
                let _ = bucket.grad.zero_();
            }
        }
    }

    /// With `f32_sums`: reduces this micro-batch into the gradient shards and zeroes the weights'
    /// gradients for the next one.
    fn accumulate(&mut self) -> Result<()> {
        if !self.reduce_each_micro_batch {
            return Ok(());
        }
        tch::no_grad(|| self.buckets.iter_mut().try_for_each(|bucket| bucket.reduce(&self.params, self.group, true)))?;
        zero_grads(self.params.iter().map(|(_, value)| value));
        Ok(())
    }

    fn finish_gradients(&mut self, max_norm: Option<f64>) -> Result<Tensor> {
        tch::no_grad(|| {
            if !self.reduce_each_micro_batch {
                for bucket in &mut self.buckets {
                    bucket.reduce(&self.params, self.group, false)?;
                }
            }
            let squares: Vec<Tensor> = self.buckets.iter().map(|b| b.grad.square().sum(Kind::Float)).collect();
            let total = Tensor::stack(&squares, 0).sum(Kind::Float);
            self.group.all_reduce_sum(&total)?;
            let norm = total.sqrt();
            if let Some(max_norm) = max_norm {
                let coef = clip_coefficient(&norm, max_norm);
                for bucket in &mut self.buckets {
                    let _ = bucket.grad.g_mul_(&coef);
                }
            }
            Ok(norm)
        })
    }

    fn step(&mut self, lr: f64) -> Result<()> {
        self.steps += 1;
        tch::no_grad(|| {
            for bucket in &mut self.buckets {
                let kind = bucket.exp_avg.kind();
                for decay in [true, false] {
                    let mut group = fused::Group::default();
                    for s in bucket.segments.iter().filter(|s| s.decay == decay) {
                        let part = |t: &Tensor| t.narrow(0, s.at, s.len);
                        group.push(part(&bucket.master), part(&bucket.grad).to_kind(kind), part(&bucket.exp_avg), part(&bucket.exp_avg_sq));
                    }
                    self.config.update(&group, decay, lr, self.steps)?;
                }
                bucket.gather(&self.params, self.group)?;
            }
            Ok(())
        })
    }

    fn steps(&self) -> i64 {
        self.steps
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let state: Vec<(String, Tensor)> = self.buckets.iter().enumerate().flat_map(|(i, b)| b.state(i)).collect();
        crate::model::hf::write_safetensors(&state, &dir.join(self.state_file()))
    }

    fn load(&mut self, dir: &Path, steps: i64) -> Result<()> {
        let name = self.state_file();
        let state = read_state(dir, &name)?;
        for (i, bucket) in self.buckets.iter_mut().enumerate() {
            for (key, mut slot) in bucket.state(i) {
                match state.get(&key) {
                    Some(saved) if saved.size() == slot.size() => tch::no_grad(|| slot.copy_(saved)),
                    _ => bail!("{}: `{key}` is missing or of another size (saved for another model or precision)", dir.join(&name).display()),
                }
            }
        }
        self.steps = steps;
        // The weights come from the checkpoint's bf16 model; the fp32 masters are more precise.
        tch::no_grad(|| self.buckets.iter().try_for_each(|b| b.gather(&self.params, self.group)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamW;
    use std::time::Duration;
    use tch::Device;

    /// Weights of several shapes (matrices decayed, vectors not), the same in every call.
    fn weights(kind: Kind) -> nn::VarStore {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let shapes: [&[i64]; 4] = [&[5, 3], &[7], &[4, 4], &[3]];
        for (i, shape) in shapes.iter().enumerate() {
            let n: i64 = shape.iter().product();
            let values = Tensor::arange(n, (Kind::Float, Device::Cpu)).g_mul_scalar(0.01 * (i + 1) as f64).sin().view(*shape);
            let _ = vs.root().var_copy(&format!("w{i}"), &values);
        }
        vs.set_kind(kind);
        vs
    }

    /// Step `step`'s full gradient of weight `i`, and the share of it rank `rank` of `world` holds.
    fn gradient(value: &Tensor, i: usize, step: i64, rank: usize, world: usize) -> Tensor {
        let full = Tensor::arange(value.numel() as i64, (Kind::Float, Device::Cpu)).g_add_scalar(step as f64 + i as f64).cos().view(value.size().as_slice());
        let share = (rank + 1) as f64 / (world * (world + 1) / 2) as f64; // shares sum to 1
        full * share
    }

    /// Three steps with clipping; returns every weight after them.
    fn train(opt: &mut dyn Optimizer, vs: &nn::VarStore, rank: usize, world: usize) -> Vec<Tensor> {
        let params = trainable(vs);
        for step in 0..3 {
            opt.zero_grad();
            for (i, (_, value)) in params.iter().enumerate() {
                (value * gradient(value, i, step, rank, world).to_kind(value.kind())).sum(Kind::Float).backward();
                opt.accumulate().unwrap(); // each weight's backward a micro-batch of its own
            }
            let _norm = opt.finish_gradients(Some(0.5)).unwrap();
            opt.step(1e-2).unwrap();
        }
        params.into_iter().map(|(_, v)| v.to_kind(Kind::Float)).collect()
    }

    /// Runs `body(rank)` on two ranks of a Gloo group over localhost threads.
    fn on_two_ranks<T: Send>(port: u16, body: impl Fn(&ProcessGroup) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let body = &body;
                    s.spawn(move || body(&ProcessGroup::join("127.0.0.1", port, rank, 2, Device::Cpu, Duration::from_secs(60)).unwrap()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn sharded_state_over_two_ranks_equals_the_unsharded_state() {
        let vs = weights(Kind::Float);
        let mut single = AdamW::new(&vs, 0.1, true, false);
        let want = train(&mut single, &vs, 0, 1);
        let state: std::collections::HashMap<String, Tensor> = single.state().into_iter().collect();
        // Buckets of at most 24 elements: [15 + 7] and [16 + 3] elements, so rank 1's chunk of the
        // first bucket starts inside the first parameter and holds all of the second.
        let results = on_two_ranks(29611, |group| {
            let vs = weights(Kind::Float);
            let mut sharded = ShardedAdamW::new(&vs, 0.1, true, false, group, 24);
            let got = train(&mut sharded, &vs, group.rank, 2);
            let names: Vec<String> = sharded.params.iter().map(|(n, _)| n.clone()).collect();
            let buckets: Vec<_> = sharded.buckets.iter().map(|b| (names[b.params.clone()].to_vec(), b.chunk, b.exp_avg.copy(), b.exp_avg_sq.copy())).collect();
            (group.rank as i64, got, buckets)
        });
        let reduced_each_micro_batch = on_two_ranks(29614, |group| {
            let vs = weights(Kind::Float);
            train(&mut ShardedAdamW::new(&vs, 0.1, true, true, group, 24), &vs, group.rank, 2)
        });
        for got in &reduced_each_micro_batch {
            for (g, w) in got.iter().zip(&want) {
                assert!(g.allclose(w, 1e-6, 1e-7, false), "reduced a micro-batch at a time: {g} vs {w}");
            }
        }
        for (rank, got, buckets) in &results {
            for (g, w) in got.iter().zip(&want) {
                assert!(g.allclose(w, 1e-6, 1e-7, false), "weights after 3 steps: {g} vs {w}");
            }
            assert_eq!(buckets.len(), 2);
            // Each rank's chunk of the moments is the matching slice of the unsharded moments.
            for (names, chunk, exp_avg, exp_avg_sq) in buckets {
                let flat_of = |key: &str| {
                    let parts: Vec<Tensor> = names.iter().map(|n| state[&format!("{key}.{n}")].view([-1])).collect();
                    let flat = Tensor::cat(&parts, 0);
                    let padded = Tensor::zeros([chunk * 2], (Kind::Float, Device::Cpu));
                    padded.narrow(0, 0, flat.numel() as i64).copy_(&flat);
                    padded.narrow(0, rank * chunk, *chunk)
                };
                for (key, mine) in [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)] {
                    assert!(mine.allclose(&flat_of(key), 1e-6, 1e-9, false), "{key}: {mine} vs {}", flat_of(key));
                }
            }
        }
    }

    #[test]
    fn bf16_weights_keep_fp32_master_shards_and_resume_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let results = on_two_ranks(29612, |group| {
            let vs = weights(Kind::BFloat16);
            let mut sharded = ShardedAdamW::new(&vs, 0.0, true, false, group, 1 << 20);
            train(&mut sharded, &vs, group.rank, 2);
            sharded.save(dir.path()).unwrap();
            let resumed_vs = weights(Kind::BFloat16);
            let mut resumed = ShardedAdamW::new(&resumed_vs, 0.0, true, false, group, 1 << 20);
            resumed.load(dir.path(), sharded.steps()).unwrap();
            let same = |a: &Tensor, b: &Tensor| a.equal(b);
            let state_equal = sharded.buckets.iter().zip(&resumed.buckets).all(|(a, b)| same(&a.master, &b.master) && same(&a.exp_avg_sq, &b.exp_avg_sq));
            let weights_equal = trainable(&vs).iter().zip(trainable(&resumed_vs)).all(|((_, a), (_, b))| same(a, &b));
            (sharded.buckets[0].master.kind(), state_equal, weights_equal)
        });
        for (kind, state_equal, weights_equal) in results {
            assert_eq!(kind, Kind::Float);
            assert!(state_equal && weights_equal);
        }
        assert!(dir.path().join("optimizer-rank1-of-2.safetensors").is_file());
        let err = read_state(dir.path(), "optimizer-rank0-of-4.safetensors").unwrap_err().to_string();
        assert!(err.contains("optimizer-rank0-of-2.safetensors, optimizer-rank1-of-2.safetensors") && err.contains("same number"), "{err}");
    }

    /// `--dry-run`'s plan covers what two ranks' sharded optimizers really allocate on tiny
    /// Llama in bf16 with f32 sums: gradient shards, master weights, moments, sums, and the
    /// largest bucket's reduce or gather buffers.
    #[test]
    fn the_memory_plan_covers_what_the_sharded_optimizer_allocates() {
        use crate::train::memory::{plan, Workload};
        use crate::train::plan::Precision;
        let results = on_two_ranks(29613, |group| {
            let mut loaded = crate::model::tests::tiny("tiny-llama");
            loaded.vs.set_kind(Kind::BFloat16);
            let sharded = ShardedAdamW::new(&loaded.vs, 0.0, true, true, group, 4096);
            (sharded.allocated_bytes(), loaded.dir.config.clone())
        });
        let precision = Precision { dtype: Kind::BFloat16, fp32_state: true };
        let rows = plan(&results[0].1, precision, false, 2, &Workload { tokens: 64, reference_model: false, micro_batches: 4 }, None);
        let optimizer: f64 = rows.iter().filter(|(part, _)| !matches!(*part, "weights" | "gradients" | "activations" | "vocabulary head (chunked)")).map(|r| r.1).sum();
        for ((kept, transient), _) in &results {
            assert!(*kept > 0 && *transient > 0);
            assert!(optimizer >= (kept + transient) as f64, "planned {optimizer} bytes, allocated {kept} + {transient}: {rows:?}");
        }
    }
}
