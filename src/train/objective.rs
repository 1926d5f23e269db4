//! What a training command optimises: SFT and DPO are [`Objective`]s over the shared loop, which
//! differ only in how examples become batches and how final hidden states become a loss.

use anyhow::Result;
use std::collections::BTreeMap;
use tch::{Device, Tensor};

use super::batch::Batch;
use crate::model::Llama;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    /// 0 for train, 1 for eval: where a split's data sits in a `[train, eval]` pair.
    pub fn index(self) -> usize {
        match self {
            Split::Train => 0,
            Split::Eval => 1,
        }
    }
}

/// Summed metrics of some examples, as detached 0-dim tensors on the model's device, so that a
/// micro-batch costs no host sync; [`read`] brings them over once, when they are logged, and they
/// are divided by the summed example weight then.
pub type Metrics = BTreeMap<&'static str, Tensor>;

/// Adds `more` into `sums`, on the device.
pub fn accumulate(sums: &mut Metrics, more: Metrics) {
    for (key, value) in more {
        let total = match sums.remove(key) {
            Some(sum) => sum + value,
            None => value,
        };
        sums.insert(key, total);
    }
}

/// Every metric divided by `weight`, read from the device in one copy.
pub fn read(sums: &Metrics, weight: f64) -> Result<BTreeMap<String, f64>> {
    if sums.is_empty() {
        return Ok(BTreeMap::new());
    }
    let values: Vec<Tensor> = sums.values().map(|v| v.to_kind(tch::Kind::Double).view([1])).collect();
    let host: Vec<f64> = Tensor::cat(&values, 0).to_device(Device::Cpu).try_into()?;
    Ok(sums.keys().zip(host).map(|(k, v)| (k.to_string(), v / weight)).collect())
}

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
    /// Whether LoRA's dropout is on while training (DPO turns dropout off, as TRL's
    /// `disable_dropout` does by default).
    fn dropout(&self) -> bool {
        true
    }

    fn reward_plot(&self) -> Option<(&'static str, &'static [&'static str])> {
        None
    }
}

