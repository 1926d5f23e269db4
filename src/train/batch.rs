//! What the model sees in one micro-batch: tokenised documents (`Document`), padded or packed
//! into `[rows, seq]` tensors (`Batch`). The loss over them is `lm_head`'s.

use tch::{Device, Tensor};

use crate::model::{AttentionMask, Inputs};

/// One micro-batch ready for the model: `[rows, seq]` tensors and, per row, which examples it
/// holds. `targets[i]` is the token predicted at position i (`-100`: no loss).
pub struct Batch {
    pub ids: Tensor,
    pub positions: Tensor,
    pub mask: AttentionMask,
    pub targets: Tensor,
    /// Where the targets are, as indices into the flattened `[rows * seq]` batch (made on the
    /// host, so that selecting them costs the device no sync).
    pub target_positions: Tensor,
    /// Which document each target belongs to, numbered in order over the rows (a row of one
    /// document is its row), for sums per sequence.
    pub target_documents: Tensor,
    /// Documents in the batch.
    pub documents: i64,
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
        // Segment bounds over the flattened rows: each document, and each row's padding tail.
        let mut cu_seqlens = vec![0i32];
        let mut tokens = 0;
        // Documents are laid out in flat order, so their targets come in target_positions' order.
        let (mut target_documents, mut documents) = (vec![], 0);
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
                target_documents.extend(doc.targets.iter().filter(|&&t| t != -100).map(|_| documents));
                documents += 1;
                at += len;
                tokens += len;
                cu_seqlens.push(at as i32);
            }
            if at < (r + 1) * width {
                cu_seqlens.push(((r + 1) * width) as i32);
            }
        }
        let target_positions: Vec<i64> = (0..targets.len() as i64).filter(|&i| targets[i as usize] != -100).collect();
        let tensor = |v: Vec<i64>| upload(Tensor::from_slice(&v).view([n as i64, width as i64]), device);
        let max_len = cu_seqlens.windows(2).map(|w| (w[1] - w[0]) as i64).max().unwrap_or(1);
        let mask = if packed {
            AttentionMask::Documents { ids: tensor(docs), cu_seqlens: upload(Tensor::from_slice(&cu_seqlens), device), max_len }
        } else {
            AttentionMask::Causal
        };
        let target_positions = upload(Tensor::from_slice(&target_positions), device);
        let target_documents = upload(Tensor::from_slice(&target_documents), device);
        Batch { ids: tensor(ids), positions: tensor(positions), mask, targets: tensor(targets), target_positions, target_documents, documents, examples, tokens }
    }
}

/// `host` on `device`. To a GPU through pinned memory, without waiting: the copy queues on the
/// stream the model's kernels run on, so a micro-batch's upload costs the host no sync (libtorch's
/// pinned-memory cache keeps the host buffer until the copy is done).
pub fn upload(host: Tensor, device: Device) -> Tensor {
    match device {
        Device::Cuda(_) => host.pin_memory(device).to_device_(device, host.kind(), true, false),
        _ => host.to_device(device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::Attend;
    use tch::Kind;

    /// The `[batch, 1, seq, seq]` mask the segments of `cu_seqlens` give over `width`-token rows.
    fn mask_of_segments(cu_seqlens: &[i32], rows: i64, width: i64) -> Tensor {
        let mut segment = vec![0i64; (rows * width) as usize];
        for (s, bounds) in cu_seqlens.windows(2).enumerate() {
            segment[bounds[0] as usize..bounds[1] as usize].fill(s as i64);
        }
        let ids = Tensor::from_slice(&segment).view([rows, width]);
        let causal = Tensor::ones([width, width], (Kind::Bool, Device::Cpu)).tril(0);
        ids.unsqueeze(2).eq_tensor(&ids.unsqueeze(1)).logical_and(&causal).unsqueeze(1)
    }

    #[test]
    fn varlen_segments_allow_exactly_what_the_document_mask_allows() {
        let doc = |n: usize| Document::from_labels((1..=n as i64).collect(), |_| true);
        let (a, b, c, d) = (doc(3), doc(2), doc(4), doc(1));
        // Row 0: 3 + 2 tokens and 1 of padding; row 1: 4 + 1 + 1 (no padding); width 6.
        let batch = Batch::from_rows(&[vec![&a, &b], vec![&c, &d, &d]], 0, true, vec![0, 1], Device::Cpu);
        let AttentionMask::Documents { cu_seqlens, max_len, .. } = &batch.mask else { panic!("packed rows get documents") };
        let bounds: Vec<i32> = cu_seqlens.try_into().unwrap();
        assert_eq!(bounds, [0, 3, 5, 6, 10, 11, 12]);
        assert_eq!(*max_len, 4);
        assert_eq!(batch.documents, 5);
        let documents: Vec<i64> = (&batch.target_documents).try_into().unwrap();
        assert_eq!(documents, [0, 0, 1, 2, 2, 2], "each target (all but a document's last token) names its document");
        let Attend::Mask(mask) = batch.mask.attend(Device::Cpu, Kind::BFloat16) else { panic!("CPU packed rows use a mask") };
        assert!(mask.equal(&mask_of_segments(&bounds, 2, 6)));
    }
}
