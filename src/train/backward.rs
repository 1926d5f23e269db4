//! One micro-batch's forward and backward pass: in one piece, or block by block, top block
//! first, when blocks are recomputed (gradient checkpointing) or when the optimizer reduces each
//! block's gradients as soon as they are final (a sharded run summing micro-batches in f32), so
//! that the reduce-scatters of the blocks above run while the blocks below still compute.

use anyhow::Result;

use super::batch::Batch;
use super::objective::{Metrics, Objective, Split};
use crate::model::Llama;

/// Forward and backward of one micro-batch, the loss times `scale`; returns the summed metrics.
/// `recomputed_blocks` blocks (spread over the depth) keep only their inputs and run again in
/// the backward pass. With `block_done`, the backward pass goes block by block and calls it with
/// each block's index once that block's weights have their final gradients.
pub fn forward_backward(objective: &dyn Objective, model: &Llama, batch: &Batch, scale: f64, recomputed_blocks: usize,
                        block_done: Option<&mut dyn FnMut(usize) -> Result<()>>) -> Result<Metrics> {
    let inputs = batch.inputs();
    if recomputed_blocks == 0 && block_done.is_none() {
        let hidden = model.hidden_states(&inputs);
        let (loss, metrics) = objective.loss(model, &hidden, batch, Split::Train)?;
        (loss * scale).backward();
        return Ok(metrics);
    }
    let recompute = crate::model::llama::spread(model.config.num_hidden_layers as usize, recomputed_blocks);
    let (hidden, saved) = model.forward_blockwise(&inputs, &recompute);
    let (loss, metrics) = objective.loss(model, &hidden, batch, Split::Train)?;
    (loss * scale).backward();
    match block_done {
        Some(done) => model.backward_blockwise(saved, done)?,
        None => model.backward_blockwise(saved, |_| Ok(()))?,
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny;
    use crate::train::trainer::tests::objective;
    use tch::{Device, Tensor};

    /// Some or all blocks recomputed, and block by block without recomputation, give the plain
    /// backward pass's gradients; block by block, every block is reported, top first.
    #[test]
    fn gradient_checkpointing_and_the_blockwise_backward_give_the_plain_gradients() {
        let objective = objective();
        let batch = objective.collate(Split::Train, &[0, 1, 2], Device::Cpu).unwrap();
        let grads = |recomputed_blocks: usize, blockwise: bool| {
            let loaded = tiny("tiny-llama");
            let mut reported = vec![];
            let mut report = |block: usize| -> Result<()> {
                reported.push(block);
                Ok(())
            };
            let report = blockwise.then_some(&mut report as &mut dyn FnMut(usize) -> Result<()>);
            forward_backward(&objective, &loaded.model, &batch, 0.1, recomputed_blocks, report).unwrap();
            let mut vars: Vec<(String, Tensor)> = loaded.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            (vars.into_iter().map(|(n, t)| (n, t.grad().copy())).collect::<Vec<_>>(), reported)
        };
        let (plain, _) = grads(0, false);
        // One of tiny Llama's two blocks, both, past the count (all); none, block by block.
        for (recomputed, blockwise) in [(1, false), (2, false), (9, false), (0, true), (1, true)] {
            let (got, reported) = grads(recomputed, blockwise);
            assert_eq!(reported, if blockwise { vec![1, 0] } else { vec![] });
            for ((name, a), (_, b)) in plain.iter().zip(got) {
                let diff = (a - &b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{recomputed} blocks, blockwise {blockwise}, {name}: {diff}");
            }
        }
    }
}
