//! Gradient checkpointing: chosen blocks run without their graph in the forward pass, keeping
//! only their input, and run again with it during the backward pass, last block first. Any
//! number of blocks can be recomputed ([`spread`] picks them evenly over the depth, and
//! `--gradient-checkpointing auto` the fewest that fit the device): a block that keeps its graph
//! holds its activations, a recomputed one its input and the cost of a second forward pass.
//! Per block, not per sub-layer: the MLP holds four fifths of a Llama-3.1-8B block's weights and
//! most of its matrix work, so recomputing MLPs alone would cost most of a whole recompute for
//! about two thirds of the saving.

use tch::{Kind, Tensor};

use super::{Inputs, Llama};
use crate::model::attention::Attend;

/// Which of `blocks` blocks to recompute so that `count` of them are (all of them past
/// `blocks`): spread evenly over the depth.
pub fn spread(blocks: usize, count: usize) -> Vec<bool> {
    let count = count.min(blocks);
    (0..blocks).map(|i| (i + 1) * count / blocks > i * count / blocks).collect()
}

/// A recomputed block: its index, its input as the forward pass saw it (part of the graph of
/// the kept blocks below, or of the embeddings), and its output, a leaf that takes the gradient
/// of what lies above it.
struct Saved {
    index: usize,
    input: Tensor,
    output: Tensor,
}

/// What the recomputing backward keeps from the forward pass.
pub struct Recompute {
    /// The recomputed blocks, lowest first.
    blocks: Vec<Saved>,
    rope: (Tensor, Tensor),
    attend: Attend,
}

impl Llama {
    /// The forward pass with the blocks `recompute` marks run without graphs. Returns the final
    /// hidden states (compute the loss on them and run its backward pass, then
    /// [`Llama::backward_by_recompute`]) and what the recomputation needs.
    pub fn forward_for_recompute(&self, inputs: &Inputs, recompute: &[bool]) -> (Tensor, Recompute) {
        assert_eq!(recompute.len(), self.layers.len(), "one flag per block");
        let (rope, attend) = (self.rope(inputs.positions, self.kind()), inputs.mask.attend(self.device(), self.kind()));
        let mut x = self.embed(inputs.ids);
        let mut blocks = vec![];
        for (index, (layer, recomputed)) in self.layers.iter().zip(recompute).enumerate() {
            if *recomputed {
                let output = tch::no_grad(|| layer.forward(&x, &rope, &attend)).set_requires_grad(true);
                let input = std::mem::replace(&mut x, output.shallow_clone());
                blocks.push(Saved { index, input, output });
            } else {
                x = layer.forward(&x, &rope, &attend);
            }
        }
        (self.final_norm(&x), Recompute { blocks, rope, attend })
    }

    /// After the loss's backward pass: each recomputed block runs again with its graph and takes
    /// its output's gradient, top block first, and hands its input's gradient down: to the
    /// recomputed block just below it directly, else through the graph of the kept blocks below
    /// (and the embeddings).
    pub fn backward_by_recompute(&self, saved: Recompute) {
        let Recompute { mut blocks, rope, attend } = saved;
        let mut handed_down: Option<Tensor> = None;
        while let Some(Saved { index, input, output }) = blocks.pop() {
            let grad = handed_down.take().unwrap_or_else(|| output.grad());
            let x = input.detach().set_requires_grad(true);
            let y = self.layers[index].forward(&x, &rope, &attend);
            (y * grad).sum(Kind::Float).backward();
            if blocks.last().is_some_and(|below| below.index + 1 == index) {
                handed_down = Some(x.grad());
            } else if input.requires_grad() {
                (input * x.grad()).sum(Kind::Float).backward();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{default_positions, LlamaConfig, Weights};
    use crate::model::tests::{fill_deterministic, fixture};
    use crate::model::AttentionMask;
    use tch::{nn, Device};

    /// Every weight's gradient after the backward of the logits' squares, recomputing the blocks
    /// `recompute` marks (`None`: the plain backward), on tiny Llama made four blocks deep.
    fn gradients(recompute: Option<&[bool]>) -> Vec<(String, Tensor)> {
        let text = std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap().replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 4");
        let config = LlamaConfig::from_json(&text).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::causal_lm(&vs.root(), &config, Weights::Random).unwrap();
        fill_deterministic(&vs);
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 17, 3, 40, 41]).view([2, 4]);
        let positions = default_positions(2, 4, Device::Cpu);
        let inputs = Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal };
        match recompute {
            Some(recompute) => {
                let (hidden, saved) = model.forward_for_recompute(&inputs, recompute);
                model.logits(&hidden).square().sum(Kind::Float).backward();
                model.backward_by_recompute(saved);
            }
            None => model.forward(&inputs).square().sum(Kind::Float).backward(),
        }
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, v)| (n, v.grad().copy())).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        named
    }

    /// Kept blocks between recomputed ones, at the bottom (the embeddings' graph) and at the top
    /// (the loss's), and recomputed ones side by side.
    #[test]
    fn any_pattern_of_recomputed_blocks_gives_the_plain_backwards_gradients() {
        let plain = gradients(None);
        assert!(plain.iter().all(|(_, g)| g.defined()) && plain.len() > 30);
        let patterns = [[true, false, true, false], [false, true, false, true], [true, false, false, true], [false, false, true, false],
                        [true, true, false, true], [true; 4]];
        for pattern in patterns {
            for ((name, a), (_, b)) in plain.iter().zip(gradients(Some(&pattern))) {
                let diff = (a - &b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{pattern:?} {name}: {diff}");
            }
        }
    }

    #[test]
    fn spread_marks_the_count_evenly() {
        assert_eq!(spread(4, 0), [false; 4]);
        assert_eq!(spread(4, 4), [true; 4]);
        assert_eq!(spread(4, 9), [true; 4]);
        assert_eq!(spread(4, 2), [false, true, false, true]);
        assert_eq!(spread(32, 12).iter().filter(|r| **r).count(), 12);
    }
}
