//! The backward pass block by block, top block first. Each block's output reaches the block above
//! as a leaf cut from the graph, which takes that block's gradient, so a block's weights have their
//! final gradients as soon as its own backward pass is done: a sharded optimizer reduces them then,
//! while the blocks below still compute. Chosen blocks also run without their graph in the forward
//! pass, keeping only their input, and run again in the backward pass (gradient checkpointing):
//! [`spread`] picks them evenly over the depth, `--gradient-checkpointing auto` the fewest that fit
//! the device. A block that keeps its graph holds its activations, a recomputed one its input and
//! the cost of a second forward pass. Per block, not per sub-layer: the MLP holds four fifths of a
//! Llama-3.1-8B block's weights and most of its matrix work, so recomputing MLPs alone would cost
//! most of a whole recompute for about two thirds of the saving.

use anyhow::Result;
use tch::{Kind, Tensor};

use super::{Inputs, Llama};
use crate::model::attention::Attend;

/// Which of `blocks` blocks to recompute so that `count` of them are (all of them past
/// `blocks`): spread evenly over the depth.
pub fn spread(blocks: usize, count: usize) -> Vec<bool> {
    let count = count.min(blocks);
    (0..blocks).map(|i| (i + 1) * count / blocks > i * count / blocks).collect()
}

/// A block as the forward pass leaves it for the backward pass.
struct Segment {
    index: usize,
    /// Its input: a leaf, which takes the gradient the block hands down.
    input: Tensor,
    /// Its output with the block's graph; none for a recomputed block, run again from `input`.
    output: Option<Tensor>,
}

/// What the blockwise backward pass keeps from the forward pass.
pub struct Blockwise {
    /// The embeddings' output, in the graph of the embedding matrix.
    embedded: Tensor,
    /// The blocks, lowest first.
    blocks: Vec<Segment>,
    /// The top block's output as a leaf: the final norm's input.
    top: Tensor,
    rope: (Tensor, Tensor),
    attend: Attend,
}

impl Llama {
    /// The forward pass with every block's input a leaf cut from the graph of the blocks below,
    /// and the blocks `recompute` marks run without graphs. Returns the final hidden states
    /// (compute the loss on them and run its backward pass, then [`Llama::backward_blockwise`])
    /// and what the backward pass needs.
    pub fn forward_blockwise(&self, inputs: &Inputs, recompute: &[bool]) -> (Tensor, Blockwise) {
        assert_eq!(recompute.len(), self.layers.len(), "one flag per block");
        let (rope, attend) = (self.rope(inputs.positions, self.kind()), inputs.mask.attend(self.device(), self.kind()));
        let embedded = self.embed(inputs.ids);
        let mut x = embedded.detach().set_requires_grad(true);
        let mut blocks = vec![];
        for (index, (layer, recomputed)) in self.layers.iter().zip(recompute).enumerate() {
            let (next, output) = match recomputed {
                true => (tch::no_grad(|| layer.forward(&x, &rope, &attend)), None),
                false => {
                    let output = layer.forward(&x, &rope, &attend);
                    (output.detach(), Some(output))
                }
            };
            let input = std::mem::replace(&mut x, next.set_requires_grad(true));
            blocks.push(Segment { index, input, output });
        }
        (self.final_norm(&x), Blockwise { embedded, blocks, top: x, rope, attend })
    }

    /// After the loss's backward pass: each block, top first, takes its output's gradient
    /// (running again first if it was recomputed) and hands its input's gradient down; then
    /// `done(index)` is called, the block's weights having their final gradients. The embeddings
    /// come last.
    pub fn backward_blockwise(&self, saved: Blockwise, mut done: impl FnMut(usize) -> Result<()>) -> Result<()> {
        let Blockwise { embedded, mut blocks, top, rope, attend } = saved;
        let mut grad = top.grad();
        while let Some(Segment { index, input, output }) = blocks.pop() {
            let output = output.unwrap_or_else(|| self.layers[index].forward(&input, &rope, &attend));
            (output * &grad).sum(Kind::Float).backward();
            done(index)?;
            grad = input.grad();
        }
        if embedded.requires_grad() {
            (embedded * grad).sum(Kind::Float).backward();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::llama::{default_positions, LlamaConfig, Weights};
    use crate::model::tests::{fill_deterministic, fixture};
    use crate::model::AttentionMask;
    use tch::{nn, Device};

    /// Every weight's gradient, by name.
    type Named = Vec<(String, Tensor)>;

    /// Every weight's gradient after the backward of the logits' squares, block by block with
    /// the blocks `recompute` marks recomputed (`None`: the plain backward), on tiny Llama made
    /// four blocks deep; and, block by block, each weight's gradient as it was when its block
    /// was reported done, in the order reported.
    fn gradients(recompute: Option<&[bool]>) -> (Named, Vec<(usize, Named)>) {
        let text = std::fs::read_to_string(fixture("tiny-llama").join("config.json")).unwrap().replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 4");
        let config = LlamaConfig::from_json(&text).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Llama::causal_lm(&vs.root(), &config, Weights::Random).unwrap();
        fill_deterministic(&vs);
        let ids = Tensor::from_slice(&[1i64, 5, 9, 200, 17, 3, 40, 41]).view([2, 4]);
        let positions = default_positions(2, 4, Device::Cpu);
        let inputs = Inputs { ids: &ids, positions: &positions, mask: &AttentionMask::Causal };
        let named = || {
            let copy = |g: Tensor| if g.defined() { g.copy() } else { g };
            let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, v)| (n, copy(v.grad()))).collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            named
        };
        let mut reported = vec![];
        match recompute {
            Some(recompute) => {
                let (hidden, saved) = model.forward_blockwise(&inputs, recompute);
                model.logits(&hidden).square().sum(Kind::Float).backward();
                model.backward_blockwise(saved, |block| {
                    reported.push((block, named()));
                    Ok(())
                }).unwrap();
            }
            None => model.forward(&inputs).square().sum(Kind::Float).backward(),
        }
        (named(), reported)
    }

    /// Kept blocks between recomputed ones, at the bottom (the embeddings' graph) and at the top
    /// (the loss's), and recomputed ones side by side.
    #[test]
    fn any_pattern_of_recomputed_blocks_gives_the_plain_backwards_gradients() {
        let (plain, _) = gradients(None);
        assert!(plain.iter().all(|(_, g)| g.defined()) && plain.len() > 30);
        let patterns = [[false; 4], [true, false, true, false], [false, true, false, true], [true, false, false, true], [false, false, true, false],
                        [true, true, false, true], [true; 4]];
        for pattern in patterns {
            for ((name, a), (_, b)) in plain.iter().zip(gradients(Some(&pattern)).0) {
                let diff = (a - &b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{pattern:?} {name}: {diff}");
            }
        }
    }

    /// What a sharded optimizer relies on to reduce a block's gradients early: blocks are
    /// reported top first, each once, and a reported block's gradients no longer change.
    #[test]
    fn a_block_is_reported_done_once_its_gradients_are_final_top_block_first() {
        for pattern in [[false; 4], [true, false, false, true]] {
            let (last, reported) = gradients(Some(&pattern));
            assert_eq!(reported.iter().map(|(block, _)| *block).collect::<Vec<_>>(), [3, 2, 1, 0], "{pattern:?}");
            for (block, then) in &reported {
                let prefix = format!("model.layers.{block}.");
                let mine: Vec<_> = then.iter().zip(&last).filter(|((name, _), _)| name.starts_with(&prefix)).collect();
                assert!(!mine.is_empty());
                for ((name, early), (_, last)) in mine {
                    assert!(early.defined() && early.equal(last), "{pattern:?} {name} changed after block {block} was reported");
                }
                // The block below it had no gradient yet.
                if *block > 0 {
                    let below = format!("model.layers.{}.", block - 1);
                    assert!(then.iter().filter(|(name, _)| name.starts_with(&below)).all(|(_, g)| !g.defined() || g.abs().max().double_value(&[]) == 0.0));
                }
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
