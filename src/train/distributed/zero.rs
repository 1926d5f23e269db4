//! AdamW with its state sharded over the ranks: ZeRO stage 1, as DeepSpeed and PyTorch's
//! `ZeroRedundancyOptimizer` do it. Each rank keeps the fp32 master weights and the Adam moments of
//! its own shard only (1/N of 12 bytes a parameter), so an 8B model's 96 GB of optimizer state
//! spreads over the GPUs.
//!
//! The parameters, sorted by name as [`AdamW`](crate::train::optim::AdamW) keeps them, are laid
//! end to end and cut into buckets of about [`BUCKET_ELEMENTS`] (whole parameters each). A step:
//! 1. each bucket's gradients are flattened (f32) and reduce-scattered, so the rank receives its
//!    contiguous chunk of the sum;
//! 2. the global gradient norm is the all-reduced sum of the chunks' squares; clipping scales the
//!    chunks;
//! 3. the rank applies AdamW (`AdamConfig::update`, the fused kernel the single-process optimizer
//!    uses, on each parameter's segment of the chunk) to its master chunk;
//! 4. each bucket's updated chunks are all-gathered, in the weights' dtype, into one flat buffer
//!    and copied into the weights, so every rank holds the same model.
//!
//! The collectives are asynchronous and pipelined: up to [`IN_FLIGHT_BUCKETS`] buckets' worth of
//! elements are in flight while the next bucket is flattened (1) or updated (3); a block's worth
//! and a bucket while the reduction overlaps the backward pass ([`reduction_window`]).
//!
//! With bf16 weights and several micro-batches a step, step 1 runs for every micro-batch and
//! adds into the f32 chunks instead (ZeRO-2's gradient reduction), so micro-batch gradients are
//! summed in f32 without a full-size f32 copy on each rank. Then the reduction overlaps the
//! backward pass: it runs block by block, top first (`train::backward`), and a bucket's
//! reduce-scatter starts as soon as the blocks its parameters belong to are done (tch exposes
//! no gradient hooks; the blockwise backward pass stands in for them). Every rank runs the same
//! blocks in the same order, so the collectives start in the same order on every rank. The
//! embeddings, the final norm and the head are reduced after the backward pass.

use anyhow::{bail, Result};
use std::ops::Range;
use std::path::Path;
use tch::{nn, Kind, Tensor};

use super::flight::{pipelined, Flight};
use super::process_group::{Pending, ProcessGroup};
use crate::model::Llama;
use crate::train::fused;
use crate::train::optim::{clip_coefficient, read_state, trainable, zero_grads, AdamConfig, Optimizer};

/// About 128 MB of f32 gradients per reduce-scatter.
pub const BUCKET_ELEMENTS: i64 = 1 << 25;
/// Buckets' worth of elements whose collectives may be in flight at once: one bucket
/// communicates while the next is flattened or updated.
pub const IN_FLIGHT_BUCKETS: i64 = 2;

/// Elements the reduce-scatters may have in flight while the backward pass runs: the largest
/// block's and one bucket more. On NCCL, completing a collective makes the compute stream wait
/// for it, so with two buckets in flight the block below could not start its backward until all
/// but two of this block's buckets were reduced; with a block's worth, it runs while they fly.
pub fn reduction_window(largest_block: i64, bucket_elements: i64) -> i64 {
    (IN_FLIGHT_BUCKETS * bucket_elements).max(largest_block + bucket_elements)
}

pub struct ShardedAdamW<'a> {
    config: AdamConfig,
    steps: i64,
    group: &'a ProcessGroup,
    /// The trainable weights, sorted by name.
    params: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    /// Elements of the gathers in flight at most (a bucket larger than that flies alone).
    flight_elements: i64,
    /// Reduce every micro-batch into the f32 gradient shards (ZeRO-2 style), so that bf16
    /// micro-batch gradients are summed in f32 without a full-size f32 copy on each rank.
    reduce_each_micro_batch: bool,
    /// Each parameter's block (`Llama::block_of`), whose backward pass makes its gradient final.
    blocks: Vec<Option<usize>>,
    /// The reduction under way: which parameters have their final gradients, which buckets'
    /// reduce-scatters have started, and those in flight (with their receiving buffers), within
    /// [`reduction_window`] when they overlap the backward pass.
    final_params: Vec<bool>,
    started: Vec<bool>,
    reduction: Flight<(usize, (Pending<'a>, Tensor))>,
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
        let flight_elements = IN_FLIGHT_BUCKETS * bucket_elements;
        let blocks: Vec<Option<usize>> = params.iter().map(|(name, _)| Llama::block_of(name)).collect();
        let mut block_elements = std::collections::HashMap::<usize, i64>::new();
        for ((_, value), block) in params.iter().zip(&blocks) {
            if let Some(block) = block {
                *block_elements.entry(*block).or_default() += value.numel() as i64;
            }
        }
        let largest_block = block_elements.into_values().max().unwrap_or(0);
        let reduction = Flight::new(if f32_sums { reduction_window(largest_block, bucket_elements) } else { flight_elements });
        let (final_params, started) = (vec![false; params.len()], vec![false; buckets.len()]);
        ShardedAdamW { config: AdamConfig::new(weight_decay), steps: 0, group, params, buckets, flight_elements, reduce_each_micro_batch: f32_sums,
                       blocks, final_params, started, reduction }
    }

    /// Starts, in layout order, the reduce-scatter of every bucket not yet started whose
    /// parameters all have their final gradients, completing the oldest in flight to make room:
    /// into the f32 chunks, or to be added to them (`add`).
    fn start_final_buckets(&mut self, add: bool) -> Result<()> {
        for b in 0..self.buckets.len() {
            if self.started[b] || !self.buckets[b].params.clone().all(|p| self.final_params[p]) {
                continue;
            }
            let size = self.buckets[b].elements(self.group);
            let buckets = &mut self.buckets;
            self.reduction.make_room(size, |(j, sent)| buckets[j].received(sent, add))?;
            let sent = self.buckets[b].start_reduce(&self.params, self.group, add)?;
            self.reduction.push(size, (b, sent));
            self.started[b] = true;
        }
        Ok(())
    }

    /// Reduce-scatters the gradients of every bucket not yet started and waits for all of them:
    /// every bucket's gradients are then in its f32 chunk, or added to it (`add`).
    fn reduce_gradients(&mut self, add: bool) -> Result<()> {
        self.final_params.fill(true);
        self.start_final_buckets(add)?;
        let buckets = &mut self.buckets;
        self.reduction.finish(|(j, sent)| buckets[j].received(sent, add))?;
        self.final_params.fill(false);
        self.started.fill(false);
        Ok(())
    }

    /// Gathers every bucket's chunks into the weights, after `update` (if any) changes the chunk.
    fn gather_weights(&mut self, mut update: impl FnMut(&Bucket) -> Result<()>) -> Result<()> {
        let (params, group) = (&self.params, self.group);
        pipelined(
            &mut self.buckets,
            |b| b.elements(group),
            self.flight_elements,
            |b| {
                update(b)?;
                b.start_gather(params, group)
            },
            |b, sent| b.gathered(params, sent),
        )
    }

    /// Bytes this rank's optimizer holds between steps (gradient shards, master weights, moments)
    /// and, at most at once, during one (the reduce or gather buffers of the buckets in flight).
    #[cfg(test)]
    pub fn allocated_bytes(&self) -> (i64, i64) {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let kept = self.buckets.iter().map(|b| bytes(&b.grad) + bytes(&b.master) + bytes(&b.exp_avg) + bytes(&b.exp_avg_sq)).sum::<i64>();
        // (elements, bytes of the reduce, bytes of the gather) of each bucket.
        let mut buffers: Vec<(i64, i64, i64)> = self.buckets.iter().map(|b| {
            let (weight_kind, elements) = (self.params[b.params.start].1.kind(), b.elements(self.group));
            let weight_element = weight_kind.elt_size_in_bytes() as i64;
            let received = if self.reduce_each_micro_batch { b.chunk * 4 } else { 0 };
            let cast = if b.master.kind() == weight_kind { 0 } else { b.chunk * weight_element };
            (elements, elements * 4 + received, elements * weight_element + cast)
        }).collect();
        let mut peak = 0;
        // Each phase's bytes of a bucket, and the elements it may have in flight.
        type Phase = (fn(&(i64, i64, i64)) -> i64, i64);
        let phases: [Phase; 2] = [(|b| b.1, self.reduction.limit()), (|b| b.2, self.flight_elements)];
        for (phase, limit) in phases {
            let (flying, most) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
            let start = |b: &(i64, i64, i64)| {
                flying.set(flying.get() + phase(b));
                most.set(most.get().max(flying.get()));
                Ok(phase(b))
            };
            pipelined(&mut buffers, |b| b.0, limit, start, |_, sent| {
                flying.set(flying.get() - sent);
                Ok(())
            })
            .unwrap();
            peak = peak.max(most.get());
        }
        (kept, peak)
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

    /// Elements of the bucket's flat layout over all ranks (padded to a multiple of the world).
    fn elements(&self, group: &ProcessGroup) -> i64 {
        self.chunk * group.size as i64
    }

    /// Starts reduce-scattering the bucket's gradients (flattened into f32): into this rank's
    /// chunk, or, to be added to it (`add`: one micro-batch of several), into a buffer of its own.
    fn start_reduce<'g>(&self, params: &[(String, Tensor)], group: &'g ProcessGroup, add: bool) -> Result<(Pending<'g>, Tensor)> {
        let flat = Tensor::zeros([self.elements(group)], (Kind::Float, self.grad.device()));
        for ((_, value), &offset) in params[self.params.clone()].iter().zip(&self.offsets) {
            let grad = value.grad();
            if grad.defined() {
                flat.narrow(0, offset, value.numel() as i64).copy_(&grad.view([-1]));
            }
        }
        let mine = if add { Tensor::empty([self.chunk], (Kind::Float, self.grad.device())) } else { self.grad.shallow_clone() };
        Ok((group.reduce_scatter_sum(&mine, &flat)?, mine))
    }

    /// Completes [`Bucket::start_reduce`].
    fn received(&mut self, (pending, mine): (Pending<'_>, Tensor), add: bool) -> Result<()> {
        pending.wait()?;
        if add {
            let _ = self.grad.g_add_(&mine);
        }
        Ok(())
    }

    /// Applies AdamW to this rank's master chunk.
    fn update(&self, config: &AdamConfig, lr: f64, steps: i64) -> Result<()> {
        let kind = self.exp_avg.kind();
        for decay in [true, false] {
            let mut group = fused::Group::default();
            for s in self.segments.iter().filter(|s| s.decay == decay) {
                let part = |t: &Tensor| t.narrow(0, s.at, s.len);
                group.push(part(&self.master), part(&self.grad).to_kind(kind), part(&self.exp_avg), part(&self.exp_avg_sq));
            }
            config.update(&group, decay, lr, steps)?;
        }
        Ok(())
    }

    /// Starts gathering every rank's chunk of the master weights, in the weights' dtype, into
    /// one flat buffer.
    fn start_gather<'g>(&self, params: &[(String, Tensor)], group: &'g ProcessGroup) -> Result<(Pending<'g>, Tensor)> {
        let kind = params[self.params.start].1.kind();
        let flat = Tensor::empty([self.elements(group)], (kind, self.master.device()));
        Ok((group.all_gather(&flat, &self.master.to_kind(kind))?, flat))
    }

    /// Completes [`Bucket::start_gather`]: copies the gathered chunks into the weights.
    fn gathered(&self, params: &[(String, Tensor)], (pending, flat): (Pending<'_>, Tensor)) -> Result<()> {
        pending.wait()?;
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

    /// With f32 sums, the reduction overlaps the backward pass.
    fn reduces_during_backward(&self) -> bool {
        self.reduce_each_micro_batch
    }

    /// Starts the reduce-scatters of the buckets this block's gradients complete.
    fn block_done(&mut self, index: usize) -> Result<()> {
        for (p, block) in self.blocks.iter().enumerate() {
            if *block == Some(index) {
                self.final_params[p] = true;
            }
        }
        tch::no_grad(|| self.start_final_buckets(true))
    }

    /// With `f32_sums`: reduces this micro-batch into the gradient shards (the buckets its
    /// backward pass has not started) and zeroes the weights' gradients for the next one.
    fn accumulate(&mut self) -> Result<()> {
        if !self.reduce_each_micro_batch {
            return Ok(());
        }
        tch::no_grad(|| self.reduce_gradients(true))?;
        zero_grads(self.params.iter().map(|(_, value)| value));
        Ok(())
    }

    fn finish_gradients(&mut self, max_norm: Option<f64>) -> Result<Tensor> {
        tch::no_grad(|| {
            if !self.reduce_each_micro_batch {
                self.reduce_gradients(false)?;
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
        let (config, steps) = (self.config, self.steps);
        tch::no_grad(|| self.gather_weights(|bucket| bucket.update(&config, lr, steps)))
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
        tch::no_grad(|| self.gather_weights(|_| Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::distributed::process_group::tests::on_two_ranks;
    use crate::train::optim::AdamW;
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
        // Each micro-batch reduced into the f32 shards; and buckets of 12, one parameter each,
        // with two buckets' collectives in flight at once (`pipelined`'s test).
        for (port, f32_sums, bucket) in [(29614, true, 24), (29615, false, 12), (29617, true, 12)] {
            let runs = on_two_ranks(port, |group| {
                let vs = weights(Kind::Float);
                train(&mut ShardedAdamW::new(&vs, 0.1, true, f32_sums, group, bucket), &vs, group.rank, 2)
            });
            for got in &runs {
                for (g, w) in got.iter().zip(&want) {
                    assert!(g.allclose(w, 1e-6, 1e-7, false), "f32 sums {f32_sums}, buckets of {bucket}: {g} vs {w}");
                }
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

    /// Summing micro-batches in f32, the reduction starts during the backward pass: the top
    /// block's buckets once it is done, the rest after, none of a block's completed before the
    /// block below runs (a block spans many buckets of 256 here); the gradient shards are those
    /// of reducing after the backward pass.
    #[test]
    fn the_reduction_overlaps_the_blockwise_backward_and_gives_the_same_shards() {
        use crate::train::backward::forward_backward;
        use crate::train::objective::{Objective, Split};
        let results = on_two_ranks(29618, |group| {
            let objective = crate::train::trainer::tests::objective();
            let shards = |overlap: bool| {
                let loaded = crate::model::tests::tiny("tiny-llama");
                let mut sharded = ShardedAdamW::new(&loaded.vs, 0.0, true, true, group, 256);
                assert!(sharded.reduces_during_backward());
                sharded.zero_grad();
                let mut started = vec![];
                for m in 0..2 {
                    let batch = objective.collate(Split::Train, &[2 * m + group.rank], Device::Cpu).unwrap();
                    let mut block_done = |block: usize| -> Result<()> {
                        sharded.block_done(block)?;
                        let (count, flying) = (sharded.started.iter().filter(|s| **s).count(), sharded.reduction.in_flight());
                        started.push((block, count, flying));
                        Ok(())
                    };
                    let block_done = overlap.then_some(&mut block_done as &mut dyn FnMut(usize) -> Result<()>);
                    forward_backward(&objective, &loaded.model, &batch, 0.5, 0, block_done).unwrap();
                    sharded.accumulate().unwrap();
                }
                (sharded.buckets.iter().map(|b| b.grad.copy()).collect::<Vec<_>>(), started, sharded.buckets.len())
            };
            (shards(false), shards(true))
        });
        for ((after, _, _), (during, started, buckets)) in results {
            // A bucket started before its gradients were final would hold part of them.
            for (a, b) in after.iter().zip(&during) {
                assert!(a.allclose(b, 1e-5, 1e-7, false), "{a} vs {b}");
            }
            // Tiny Llama's top block, then the lower one, each micro-batch.
            assert_eq!(started.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 0, 1, 0]);
            assert!(started[0].1 > 2 && started[1].1 > started[0].1 && started[1].1 < buckets, "{started:?} of {buckets} buckets");
            // The top block's buckets are all still in flight when the lower block runs.
            assert_eq!(started[0].2, started[0].1, "{started:?}");
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
        use crate::train::memory::{plan, Fit, Workload};
        use crate::train::plan::Precision;
        let results = on_two_ranks(29613, |group| {
            let mut loaded = crate::model::tests::tiny("tiny-llama");
            loaded.vs.set_kind(Kind::BFloat16);
            let sharded = ShardedAdamW::new(&loaded.vs, 0.0, true, true, group, 4096);
            (sharded.allocated_bytes(), loaded.dir.config.clone())
        });
        let precision = Precision { dtype: Kind::BFloat16, fp32_state: true };
        let rows = plan(&results[0].1, precision, Fit::recomputing(0), 2, &Workload { tokens: 64, reference_model: false, micro_batches: 4 }, None);
        let optimizer: f64 = rows.iter().filter(|(part, _)| !matches!(*part, "weights" | "gradients" | "activations" | "vocabulary head (chunked)")).map(|r| r.1).sum();
        for ((kept, transient), _) in &results {
            assert!(*kept > 0 && *transient > 0);
            assert!(optimizer >= (kept + transient) as f64, "planned {optimizer} bytes, allocated {kept} + {transient}: {rows:?}");
        }
    }
}
