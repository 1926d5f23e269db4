//! The language-model head over the vocabulary: target-token log-probabilities, and the loss
//! gradients through them, computed a chunk of tokens at a time, so that no `[tokens, vocab]`
//! f32 tensor is ever held whole. (At 8,192 tokens and Llama 3's 128,256-token vocabulary one is
//! 4 GiB, and autograd would keep it, its log-softmax and its bf16 original until the backward.)
//!
//! Only the positions that have a target are projected (SFT's assistant tokens, DPO's
//! completions). Each chunk's logits are made, used and dropped under no grad. The gradient a loss
//! sends through them, `dL/dlogits = c · (softmax − onehot)` with `c = −dL/dlog p` per token, is
//! turned at once into the gradients of the hidden states (`G_h`) and of the head's weight
//! (`G_W`, summed over chunks in f32). The loss handed back is its value plus the linear
//! surrogate `s = ⟨h, G_h⟩ + ⟨W, G_W⟩` minus itself: zero in value, and exactly those gradients
//! in the backward pass (the device the trainer's gradient checkpointing uses too). This is what
//! Liger Kernel's fused linear cross-entropy does. With bf16 weights the surrogate is in bf16, so
//! the trainer's loss scale reaches `G_h` and `G_W` rounded to bf16 (a relative 2⁻⁹, the same
//! for every element).
//!
//! SFT's loss, the summed `−log p`, has `c = 1` before any log-prob is known: one pass. DPO's loss
//! is a function of the summed log-probs of each sequence: a first pass computes them, autograd
//! gives `c` from the loss, a second pass turns `c` into `G_h` and `G_W`.

use tch::{Kind, Tensor};

use super::batch::Batch;
use crate::model::Llama;

/// How many logits (tokens × vocabulary) one chunk holds unless the memory plan allows more:
/// 2²⁷ f32 values, 512 MiB (about 1,000 tokens of Llama 3's vocabulary).
pub const DEFAULT_CHUNK_LOGITS: i64 = 1 << 27;
/// The most a chunk holds: 2³⁰ f32 values, 4 GiB (8,371 tokens of Llama 3's vocabulary, the
/// seed's micro-batch in one chunk). Each chunk adds its `G_W` into the f32 sum, so fewer,
/// larger chunks rewrite it fewer times (Llama 3's is 2.1 GB).
pub const LARGEST_CHUNK_LOGITS: i64 = 1 << 30;

/// What the head's loss holds at its peak for `tokens` targets in chunks of `chunk_logits`, in
/// bytes (the `--dry-run` plan): one chunk's f32 logits with, at most, an f32 temporary of their
/// size (logsumexp's `exp(x - max)`) or their copy in the weights' dtype (made from them, or their
/// gradient), `G_W` in f32 and then in the weights' dtype, a chunk's `G_W` in the weights' dtype
/// (added into the f32 `G_W` in place), and the targets' hidden states with `G_h`. A frozen head
/// (`head_trains` false: LoRA) has no `G_W`.
pub fn peak_bytes(vocab: i64, hidden: i64, tokens: i64, element: f64, head_trains: bool, chunk_logits: i64) -> f64 {
    let chunk = chunk_tokens(chunk_logits, vocab).min(tokens.max(1)) as f64 * vocab as f64;
    let weight = if head_trains { (vocab * hidden) as f64 } else { 0.0 };
    chunk * (4.0 + element.max(4.0)) + weight * (4.0 + 2.0 * element) + 2.0 * (tokens * hidden) as f64 * element
}

/// Targets a chunk of `chunk_logits` logits holds (at least one).
pub fn chunk_tokens(chunk_logits: i64, vocab: i64) -> i64 {
    (chunk_logits / vocab).max(1)
}

/// Log-probabilities of a batch's targets, one entry per target, in row-major order.
pub struct TargetLogProbs {
    /// `[targets]` log p(target), f32.
    pub logps: Tensor,
    /// `[targets]` the mean logit over the vocabulary at each target (TRL's `logits/*`).
    pub mean_logits: Tensor,
    /// `[targets]` the document of each target (`Batch::target_documents`).
    documents: Tensor,
    count: i64,
}

impl TargetLogProbs {
    /// `values` (one per target) summed per document of the batch, `[documents]` (per row when
    /// each row is one document).
    pub fn per_document(&self, values: &Tensor) -> Tensor {
        Tensor::zeros([self.count], (Kind::Float, values.device())).index_add(0, &self.documents, &values.to_kind(Kind::Float))
    }
}

/// The targets' hidden states and ids, and the head they go through.
struct Head<'a> {
    /// `[targets, hidden]`, part of the graph when the caller's hidden states are.
    hidden: Tensor,
    weight: &'a Tensor,
    targets: Tensor,
    documents: Tensor,
    count: i64,
    chunk: i64,
}

impl<'a> Head<'a> {
    fn new(model: &'a Llama, hidden: &Tensor, batch: &Batch, chunk_logits: i64) -> Self {
        let (batch_rows, seq, width) = hidden.size3().expect("hidden states are [rows, seq, hidden]");
        let at = &batch.target_positions;
        let weight = model.head_weight();
        Head {
            hidden: hidden.reshape([batch_rows * seq, width]).index_select(0, at),
            targets: batch.targets.view([-1]).index_select(0, at),
            documents: batch.target_documents.shallow_clone(),
            count: batch.documents,
            chunk: chunk_tokens(chunk_logits, weight.size()[0]),
            weight,
        }
    }

    /// `(start, length)` of each chunk of targets.
    fn spans(&self) -> Vec<(i64, i64)> {
        let (n, chunk) = (self.targets.size()[0], self.chunk);
        (0..n).step_by(chunk as usize).map(|start| (start, chunk.min(n - start))).collect()
    }

    /// One chunk's f32 logits, `[length, vocab]`, outside the graph.
    fn logits(&self, (start, len): (i64, i64)) -> Tensor {
        tch::no_grad(|| self.hidden.detach().narrow(0, start, len).linear::<Tensor>(&self.weight.detach(), None).to_kind(Kind::Float))
    }

    /// log p(target) and log Σ exp(logits) of one chunk.
    fn log_probs(&self, logits: &Tensor, (start, len): (i64, i64)) -> (Tensor, Tensor) {
        let targets = self.targets.narrow(0, start, len).unsqueeze(1);
        let lse = logits.logsumexp([1i64].as_slice(), false);
        (logits.gather(1, &targets, false).squeeze_dim(1) - &lse, lse)
    }

    /// Adds a chunk's share of `G_h` (its rows) and `G_W`, for `dL/dlogits = c · (softmax − onehot)`.
    /// Consumes the chunk's logits (overwritten in place).
    fn backward(&self, mut logits: Tensor, lse: &Tensor, c: &Tensor, (start, len): (i64, i64), grad_hidden: &Tensor, grad_weight: &mut Option<Tensor>) {
        tch::no_grad(|| {
            let _ = logits.g_sub_(&lse.unsqueeze(1)).exp_().g_mul_(&c.unsqueeze(1));
            let _ = logits.scatter_add_(1, &self.targets.narrow(0, start, len).unsqueeze(1), &(-c).unsqueeze(1));
            let d_logits = logits.to_kind(self.weight.kind());
            grad_hidden.narrow(0, start, len).copy_(&d_logits.matmul(&self.weight.detach()));
            if let Some(grad_weight) = grad_weight {
                // Added in place, widened element by element: no f32 copy of the chunk's G_W.
                let d_weight = d_logits.tr().matmul(&self.hidden.detach().narrow(0, start, len));
                let _ = grad_weight.g_add_(&d_weight);
            }
        })
    }

    /// `G_h` and `G_W` before any chunk is added; no `G_W` for a frozen head (LoRA).
    fn zero_gradients(&self) -> (Tensor, Option<Tensor>) {
        let grad_hidden = Tensor::zeros_like(&self.hidden);
        (grad_hidden, self.weight.requires_grad().then(|| Tensor::zeros(self.weight.size(), (Kind::Float, self.weight.device()))))
    }

    /// `value` (no grad) plus `s − s` for the surrogate `s = ⟨h, G_h⟩ + ⟨W, G_W⟩`: the same value,
    /// and a backward pass that sends `G_h` and `G_W` (times the upstream gradient) into the graph.
    fn with_gradients(&self, value: Tensor, grad_hidden: Tensor, grad_weight: Option<Tensor>) -> Tensor {
        let inner = |a: &Tensor, b: &Tensor| a.flatten(0, -1).dot(&b.flatten(0, -1));
        let hidden_term = inner(&self.hidden, &grad_hidden);
        let surrogate = match grad_weight {
            Some(grad_weight) => hidden_term + inner(self.weight, &grad_weight.to_kind(self.weight.kind())),
            None => hidden_term,
        };
        value + (&surrogate - surrogate.detach())
    }

    fn target_log_probs(&self, logps: Tensor, mean_logits: Tensor) -> TargetLogProbs {
        TargetLogProbs { logps, mean_logits, documents: self.documents.shallow_clone(), count: self.count }
    }
}

/// Summed next-token cross-entropy over the batch's targets, computed in f32 in chunks of
/// `chunk_logits` logits, with gradients into `hidden` and the head when `hidden` is part of a
/// graph.
pub fn summed_cross_entropy(model: &Llama, hidden: &Tensor, batch: &Batch, chunk_logits: i64) -> Tensor {
    let head = Head::new(model, hidden, batch, chunk_logits);
    let mut loss = Tensor::zeros([], (Kind::Float, hidden.device()));
    let mut grads = hidden.requires_grad().then(|| head.zero_gradients());
    for span in head.spans() {
        let logits = head.logits(span);
        let (logps, lse) = head.log_probs(&logits, span);
        loss -= logps.sum(Kind::Float);
        if let Some((grad_hidden, grad_weight)) = &mut grads {
            head.backward(logits, &lse, &Tensor::ones_like(&logps), span, grad_hidden, grad_weight);
        }
    }
    match grads {
        Some((grad_hidden, grad_weight)) => head.with_gradients(loss, grad_hidden, grad_weight),
        None => loss,
    }
}

/// The targets' log-probabilities, outside any graph (evaluation, reference models).
pub fn target_log_probs(model: &Llama, hidden: &Tensor, batch: &Batch) -> TargetLogProbs {
    first_pass(&Head::new(model, hidden, batch, DEFAULT_CHUNK_LOGITS)).0
}

/// The log-probs, and each chunk's log Σ exp(logits) for a second pass to reuse.
fn first_pass(head: &Head) -> (TargetLogProbs, Vec<Tensor>) {
    let (mut logps, mut means, mut lses) = (vec![], vec![], vec![]);
    for span in head.spans() {
        let logits = head.logits(span);
        means.push(logits.mean_dim(1, false, Kind::Float));
        let (chunk_logps, lse) = head.log_probs(&logits, span);
        logps.push(chunk_logps);
        lses.push(lse);
    }
    let cat = |parts: Vec<Tensor>| if parts.is_empty() { Tensor::zeros([0], (Kind::Float, head.hidden.device())) } else { Tensor::cat(&parts, 0) };
    (head.target_log_probs(cat(logps), cat(means)), lses)
}

/// `loss_of(log-probs)`, with gradients into `hidden` and the head when `hidden` is part of a
/// graph, in chunks of `chunk_logits` logits. `loss_of` sees log-probs that require grad (a
/// leaf), and may return any function of them (and keep what it computed from them, detaching
/// it).
pub fn loss_of_log_probs(model: &Llama, hidden: &Tensor, batch: &Batch, chunk_logits: i64, loss_of: impl FnOnce(&TargetLogProbs) -> Tensor) -> Tensor {
    let head = Head::new(model, hidden, batch, chunk_logits);
    let (values, lses) = first_pass(&head);
    if !hidden.requires_grad() {
        return loss_of(&values);
    }
    let leaf = head.target_log_probs(values.logps.detach().set_requires_grad(true), values.mean_logits.shallow_clone());
    let loss = loss_of(&leaf);
    let d_logps = Tensor::run_backward(&[&loss], &[&leaf.logps], false, false).remove(0);
    let c = -d_logps;
    let (grad_hidden, mut grad_weight) = head.zero_gradients();
    for (span, lse) in head.spans().into_iter().zip(&lses) {
        head.backward(head.logits(span), lse, &c.narrow(0, span.0, span.1), span, &grad_hidden, &mut grad_weight);
    }
    head.with_gradients(loss.detach(), grad_hidden, grad_weight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{max_abs_diff, tiny, tiny_on};
    use crate::train::batch::Document;
    use tch::Device;

    /// Three rows of different lengths, targets only on some positions.
    fn fixture_batch(device: Device) -> Batch {
        let docs = [
            Document::from_labels(vec![1, 20, 30, 40, 50, 60, 70], |i| i >= 3),
            Document::from_labels(vec![1, 80, 90, 100], |i| i >= 1),
            Document::from_labels(vec![1, 11, 12, 13, 14], |i| i >= 2),
        ];
        Batch::from_rows(&[vec![&docs[0]], vec![&docs[1]], vec![&docs[2]]], 0, false, vec![0, 1, 2], device)
    }

    /// The full-logits computation these functions replace: per-target log-probs through autograd.
    fn full_logps(model: &Llama, hidden: &Tensor, batch: &Batch) -> Tensor {
        let logits = model.logits(hidden).to_kind(Kind::Float);
        let vocab = logits.size()[2];
        let flat = logits.view([-1, vocab]).index_select(0, &batch.target_positions);
        let targets = batch.targets.view([-1]).index_select(0, &batch.target_positions);
        flat.log_softmax(-1, Kind::Float).gather(1, &targets.unsqueeze(1), false).squeeze_dim(1)
    }

    /// The gradients of every parameter after `loss.backward()`, zeroed again after reading.
    fn gradients(loaded: &crate::model::Loaded, loss: Tensor) -> Vec<(String, Tensor)> {
        loss.backward();
        let mut grads: Vec<(String, Tensor)> = loaded.vs.variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in loaded.vs.variables() {
            let _ = v.grad().zero_();
        }
        grads
    }

    fn assert_same_gradients(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
        for ((name, x), (_, y)) in a.iter().zip(b) {
            assert!(max_abs_diff(x, y) < 1e-5, "{name}: {}", max_abs_diff(x, y));
        }
    }

    #[test]
    fn chunked_cross_entropy_gives_the_full_logits_loss_and_gradients() {
        chunked_cross_entropy_matches_full_logits(Device::Cpu);
    }

    #[test]
    fn on_cuda_chunked_cross_entropy_gives_the_full_logits_loss_and_gradients() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device here (scripts/gpu-check.sh runs this test on the GPU machine)");
            return;
        }
        chunked_cross_entropy_matches_full_logits(Device::Cuda(0));
    }

    fn chunked_cross_entropy_matches_full_logits(device: Device) {
        let (_dir, loaded) = tiny_on("tiny-llama", device, Kind::Float);
        let batch = fixture_batch(device);
        let hidden = || loaded.model.hidden_states(&batch.inputs());
        let want_loss = -full_logps(&loaded.model, &hidden(), &batch).sum(Kind::Float);
        let want_value = want_loss.double_value(&[]);
        let want = gradients(&loaded, want_loss * 0.25);
        // 256-token vocabulary, 3 tokens a chunk: 4 chunks over the 10 targets, the last short.
        let loss = summed_cross_entropy(&loaded.model, &hidden(), &batch, 3 * 256);
        assert!((loss.double_value(&[]) - want_value).abs() < 1e-5, "{} vs {want_value}", loss.double_value(&[]));
        assert_same_gradients(&gradients(&loaded, loss * 0.25), &want);
        // Outside a graph (evaluation): the same value, nothing to differentiate.
        let eval = tch::no_grad(|| summed_cross_entropy(&loaded.model, &hidden(), &batch, 3 * 256));
        assert!(!eval.requires_grad() && (eval.double_value(&[]) - want_value).abs() < 1e-5);
    }

    #[test]
    fn a_loss_of_summed_log_probs_gets_the_full_logits_gradients() {
        // A DPO-shaped loss: nonlinear in each row's summed log-prob.
        let loss_of = |rows: Tensor| (rows.narrow(0, 0, 1) - rows.narrow(0, 1, 2).sum(Kind::Float) * 0.3).log_sigmoid().neg().sum(Kind::Float);
        let loaded = tiny("tiny-llama");
        let batch = fixture_batch(Device::Cpu);
        let hidden = || loaded.model.hidden_states(&batch.inputs());
        let full = full_logps(&loaded.model, &hidden(), &batch);
        let rows = Tensor::zeros([3], (Kind::Float, Device::Cpu)).index_add(0, &batch.target_positions.floor_divide_scalar(7), &full);
        let want_loss = loss_of(rows.shallow_clone());
        let want_value = want_loss.double_value(&[]);
        let want = gradients(&loaded, want_loss);
        let mut seen = None;
        let loss = loss_of_log_probs(&loaded.model, &hidden(), &batch, 4 * 256, |lp| {
            seen = Some((lp.per_document(&lp.logps).detach(), lp.mean_logits.detach()));
            loss_of(lp.per_document(&lp.logps))
        });
        let (per_row, mean_logits) = seen.expect("loss_of ran");
        assert!((loss.double_value(&[]) - want_value).abs() < 1e-5);
        assert!(max_abs_diff(&per_row, &rows.detach()) < 1e-5);
        assert_same_gradients(&gradients(&loaded, loss), &want);
        // The mean logits over the vocabulary, per target (TRL's logits/* metrics).
        let logits = tch::no_grad(|| loaded.model.logits(&hidden())).view([-1, 256]).index_select(0, &batch.target_positions);
        assert!(max_abs_diff(&mean_logits, &logits.mean_dim(1, false, Kind::Float)) < 1e-5);
    }
}
