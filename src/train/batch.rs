//! What the model sees in one micro-batch: tokenised documents (`Document`), padded or packed
//! into `[rows, seq]` tensors (`Batch`), and the summed next-token cross-entropy over them.

use tch::{Device, Kind, Tensor};

use crate::model::{AttentionMask, Inputs};

/// One micro-batch ready for the model: `[rows, seq]` tensors and, per row, which examples it
/// holds. `targets[i]` is the token predicted at position i (`-100`: no loss).
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: AttentionMask,
    pub targets: Tensor,
    pub examples: Vec<usize>,
    pub tokens: usize,
}

/// One tokenised sequence: ids and, per position, the id it is trained to predict next
/// (`-100` where there is no loss).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Document {
    pub ids: Vec<i64>,
    pub targets: Vec<i64>,
}

impl Document {
    /// Shifts per-token labels (`Some(id)` where the token is a target) into next-token targets.
    pub fn from_labels(ids: Vec<i64>, is_target: impl Fn(usize) -> bool) -> Document {
        let targets = (0..ids.len()).map(|i| if i + 1 < ids.len() && is_target(i + 1) { ids[i + 1] } else { -100 }).collect();
        Document { ids, targets }
    }

    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != -100).count()
    }
}

impl Batch {
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs { ids: &self.ids, positions: &self.positions, mask: &self.mask }
    }

    /// Right-pads `rows` (each one document, or several packed) into `[rows, longest]` tensors.
    /// Packed rows restart positions per document and get a per-document attention mask.
    pub fn from_rows(rows: &[Vec<&Document>], pad_id: i64, packed: bool, examples: Vec<usize>, device: Device) -> Batch {
        let width = rows.iter().map(|r| r.iter().map(|d| d.ids.len()).sum::<usize>()).max().unwrap_or(1).max(1);
        let n = rows.len();
        let (mut ids, mut targets) = (vec![pad_id; n * width], vec![-100i64; n * width]);
        let (mut positions, mut docs) = (vec![0i64; n * width], vec![-1i64; n * width]);
        let mut tokens = 0;
        for (r, row) in rows.iter().enumerate() {
            let mut at = r * width;
            for (d, doc) in row.iter().enumerate() {
                let len = doc.ids.len();
                ids[at..at + len].copy_from_slice(&doc.ids);
                targets[at..at + len].copy_from_slice(&doc.targets);
                for i in 0..len {
                    positions[at + i] = i as i64;
                    docs[at + i] = d as i64;
                }
                at += len;
                tokens += len;
            }
        }
        let tensor = |v: Vec<i64>| Tensor::from_slice(&v).view([n as i64, width as i64]).to_device(device);
        let mask = if packed { AttentionMask::Documents(tensor(docs)) } else { AttentionMask::Causal };
        Batch { ids: tensor(ids), positions: tensor(positions), mask, targets: tensor(targets), examples, tokens }
    }
}

/// Summed next-token cross-entropy over targets that are not `-100`, computed in f32.
pub fn summed_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits.to_kind(Kind::Float).view([-1, vocab]).cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::Sum, -100, 0.0)
}

