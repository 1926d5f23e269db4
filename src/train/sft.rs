//! `magpie sft`: supervised fine-tuning as TRL does it (docs/upstream.md §6). Conversations from the
//! `messages` column are rendered with the model's chat template; the loss is on assistant tokens
//! only, in every turn; `max_length` truncation keeps the start; with `packing`, documents are
//! packed best-fit-decreasing into rows of `max_length`, each restarting its positions and
//! attending only to itself.

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use tch::{Device, Tensor};

use crate::model::Llama;
use crate::model::tokenize::ChatTokenizer;
use super::args::TrainArgs;
use super::batch::{Batch, Document};
use super::lm_head::summed_cross_entropy;
use super::driver;
use super::memory::Workload;
use super::objective::{Metrics, Objective, Split};
use crate::data::Message;

#[derive(clap::Args, Debug, Clone)]
pub struct SftArgs {
    #[command(flatten)]
    pub train: TrainArgs,

    /// Longest sequence in tokens; longer conversations keep their start.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,

    /// Pack several conversations into each row of `max_length` tokens (best-fit decreasing).
    #[arg(long)]
    pub packing: bool,
}

/// Tokenises conversations (in parallel, order kept); returns the documents with at least one
/// target token and the number dropped because truncation left none.
pub fn tokenize(tokenizer: &ChatTokenizer, conversations: &[Vec<Message>], max_length: usize) -> Result<(Vec<Document>, usize)> {
    let documents: Vec<Option<Document>> = conversations
        .par_iter()
        .enumerate()
        .map(|(row, messages)| {
            let mut tokens = tokenizer.conversation(messages).with_context(|| format!("conversation {row}"))?;
            tokens.ids.truncate(max_length);
            let doc = Document::from_labels(tokens.ids, |i| tokens.assistant[i]);
            Ok((doc.target_count() > 0).then_some(doc))
        })
        .collect::<Result<_>>()?;
    let dropped = documents.iter().filter(|d| d.is_none()).count();
    Ok((documents.into_iter().flatten().collect(), dropped))
}

/// Best-fit decreasing: longest documents first, each into the open row with the least room that
/// still fits it. Returns rows of document indices.
pub fn pack(lengths: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut rows: Vec<Vec<usize>> = vec![];
    // Free room -> rows with that much room, for the best-fit lookup.
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lengths[i].min(capacity);
        let fit = by_room.range_mut(len..).next().map(|(&room, rows)| (room, rows.pop().expect("non-empty")));
        let (row, room) = match fit {
            Some((room, row)) => {
                if by_room[&room].is_empty() {
                    by_room.remove(&room);
                }
                (row, room)
            }
            None => {
                rows.push(vec![]);
                (rows.len() - 1, capacity)
            }
        };
        rows[row].push(i);
        by_room.entry(room - len).or_default().push(row);
    }
    rows
}

/// The SFT objective over training rows (one document each, or packed).
pub struct SftObjective {
    documents: [Vec<Document>; 2],
    rows: [Vec<Vec<usize>>; 2],
    packed: bool,
    pad_id: i64,
    /// Logits a chunk of the vocabulary head holds (`memory::Fit`).
    head_chunk_logits: i64,
}

impl SftObjective {
    pub fn new(train: Vec<Document>, eval: Vec<Document>, packing: bool, max_length: usize, pad_id: i64, head_chunk_logits: i64) -> Self {
        let rows = |docs: &[Document]| -> Vec<Vec<usize>> {
            if packing {
                pack(&docs.iter().map(|d| d.ids.len()).collect::<Vec<_>>(), max_length)
            } else {
                (0..docs.len()).map(|i| vec![i]).collect()
            }
        };
        let rows = [rows(&train), rows(&eval)];
        SftObjective { documents: [train, eval], rows, packed: packing, pad_id, head_chunk_logits }
    }

}

impl Objective for SftObjective {
    fn len(&self, split: Split) -> usize {
        self.rows[split.index()].len()
    }

    fn weight(&self, split: Split, example: usize) -> f64 {
        let s = split.index();
        self.rows[s][example].iter().map(|&d| self.documents[s][d].target_count()).sum::<usize>() as f64
    }

    fn collate(&self, split: Split, examples: &[usize], device: Device) -> Result<Batch> {
        let s = split.index();
        let rows: Vec<Vec<&Document>> = examples.iter().map(|&e| self.rows[s][e].iter().map(|&d| &self.documents[s][d]).collect()).collect();
        Ok(Batch::from_rows(&rows, self.pad_id, self.packed, examples.to_vec(), device))
    }

    fn loss(&self, model: &Llama, hidden: &Tensor, batch: &Batch, _split: Split) -> Result<(Tensor, Metrics)> {
        let loss = summed_cross_entropy(model, hidden, batch, self.head_chunk_logits);
        let metrics = Metrics::from([("loss", loss.detach())]);
        Ok((loss, metrics))
    }
}

pub fn run(args: &SftArgs) -> Result<()> {
    let train_args = &args.train;
    let command = driver::Command {
        args: train_args,
        stage: "sft",
        columns: &["messages"],
        workload: Workload {
            tokens: (train_args.per_device_train_batch_size * args.max_length) as i64,
            reference_model: false,
            micro_batches: train_args.gradient_accumulation_steps,
        },
        also_reads: vec![],
        settings: json!({"max_length": args.max_length, "packing": args.packing}),
    };
    let summary = driver::run(command, |rows, plan| {
        let loaded = driver::load_policy(plan)?;
        let tokenizer = ChatTokenizer::load(&plan.model)?;
        let [train, eval] = rows.splits.map(|rows| rows.into_iter().map(|mut columns| columns.remove(0)).collect::<Vec<_>>());
        let (train_docs, train_dropped) = tokenize(&tokenizer, &train, args.max_length)?;
        let (eval_docs, eval_dropped) = tokenize(&tokenizer, &eval, args.max_length)?;
        let objective = SftObjective::new(train_docs, eval_docs, args.packing, args.max_length, tokenizer.pad_id, plan.fit.head_chunk_logits);
        eprintln!(
            "magpie sft: {} train / {} eval conversations ({} dropped: no assistant token within max_length; {} dropped: null messages), {} train rows{}",
            train.len() - train_dropped,
            eval.len() - eval_dropped,
            train_dropped + eval_dropped,
            rows.null_rows,
            objective.len(Split::Train),
            if args.packing { " packed" } else { "" }
        );
        Ok(driver::Built { objective, policy: loaded })
    })?;
    let Some(summary) = summary else { return Ok(()) };
    let final_loss = summary.last.get("loss").copied().unwrap_or(f64::NAN);
    let eval_loss = summary.eval.as_ref().and_then(|e| e.get("eval_loss").copied());
    eprintln!(
        "magpie sft: {} steps, final loss {final_loss:.4}{}; model in {}",
        summary.steps,
        eval_loss.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
        train_args.output.join("model").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::tiny_on;
    use crate::model::AttentionMask;
    use tch::Kind;

    #[test]
    fn best_fit_decreasing_packs_tightly_and_keeps_every_document() {
        let lengths = [7, 5, 4, 3, 3, 2, 1];
        let rows = pack(&lengths, 8);
        let mut all: Vec<usize> = rows.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        for row in &rows {
            assert!(row.iter().map(|&i| lengths[i]).sum::<usize>() <= 8);
        }
        // 25 tokens into rows of 8: BFD finds the optimum of 4 rows; the 3s go where they fit best.
        assert_eq!(rows.len(), 4);
        assert!(rows.contains(&vec![1, 3]), "{rows:?}");
    }

    fn per_token_loss(model: &Llama, batch: &Batch) -> Tensor {
        let logits = tch::no_grad(|| model.forward(&batch.inputs())).to_kind(Kind::Float);
        logits.view([-1, 256]).cross_entropy_loss::<Tensor>(&batch.targets.view([-1]), None, tch::Reduction::None, -100, 0.0)
    }

    /// tiny-llama on `device` in `kind`; three documents packed into one row, and alone. Returns
    /// the largest difference between a document's packed and unpacked summed loss, and the
    /// smallest such difference (over the later two documents) with the packed row attending
    /// across documents (plain causal), which a working document boundary must beat.
    fn packed_vs_alone(device: Device, kind: Kind) -> (f64, f64) {
        let (_dir, loaded) = tiny_on("tiny-llama", device, kind);
        let model = &loaded.model;
        let docs = [
            Document::from_labels(vec![1, 20, 30, 40, 50, 60, 70, 80, 90], |i| i >= 3),
            Document::from_labels(vec![1, 70, 80, 90, 100, 110], |i| i >= 2),
            Document::from_labels(vec![1, 11, 12, 13, 14, 15, 16], |i| i >= 1),
        ];
        let packed = Batch::from_rows(&[docs.iter().collect()], 0, true, vec![0], device);
        let leaky = Batch { mask: AttentionMask::Causal, ..Batch::from_rows(&[docs.iter().collect()], 0, true, vec![0], device) };
        let (packed_loss, leaky_loss) = (per_token_loss(model, &packed), per_token_loss(model, &leaky));
        let (mut worst, mut leak, mut at) = (0f64, f64::INFINITY, 0);
        for (d, doc) in docs.iter().enumerate() {
            let alone = per_token_loss(model, &Batch::from_rows(&[vec![doc]], 0, false, vec![0], device)).sum(Kind::Float).double_value(&[]);
            let sum = |loss: &Tensor| loss.narrow(0, at, doc.ids.len() as i64).sum(Kind::Float).double_value(&[]);
            worst = worst.max((sum(&packed_loss) - alone).abs());
            if d > 0 {
                leak = leak.min((sum(&leaky_loss) - alone).abs());
            }
            at += doc.ids.len() as i64;
        }
        (worst, leak)
    }

    #[test]
    fn a_packed_row_gives_each_document_its_unpacked_loss() {
        let (packed, leaky) = packed_vs_alone(Device::Cpu, Kind::Float);
        assert!(packed < 1e-5, "packed vs alone: {packed}");
        assert!(leaky > 1e-3, "without the document mask the later documents see the earlier ones: {leaky}");
    }

    #[test]
    fn on_cuda_in_bf16_varlen_flash_attention_gives_each_document_its_unpacked_loss() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device here (scripts/gpu-check.sh runs this test on the GPU machine)");
            return;
        }
        let device = Device::Cuda(0);
        let packed = Batch::from_rows(&[vec![&Document::from_labels(vec![1, 2, 3], |_| true)]], 0, true, vec![0], device);
        assert!(matches!(packed.mask.attend(device, Kind::BFloat16), crate::model::attention::Attend::Varlen { .. }), "packed bf16 rows on CUDA take varlen flash attention");
        let (packed, leaky) = packed_vs_alone(device, Kind::BFloat16);
        // bf16 rounding differs between the kernels; a leak across documents moves far more.
        assert!(packed < 0.05 && leaky > 4.0 * packed.max(0.01), "packed vs alone {packed}, leaky {leaky}");
    }

    #[test]
    fn truncation_keeps_the_start_and_drops_fully_masked_conversations() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::convert::convert(&crate::test_support::test_model(), &dir.path().join("m"), false).unwrap();
        let tok = ChatTokenizer::load(&dir.path().join("m")).unwrap();
        let short = vec![Message::new("user", "Hi"), Message::new("assistant", "Hello there, friend.")];
        let long_question = vec![Message::new("user", "word ".repeat(200)), Message::new("assistant", "ok")];
        let (docs, dropped) = tokenize(&tok, &[short.clone(), long_question], 64).unwrap();
        assert_eq!((docs.len(), dropped), (1, 1));
        let full = tok.conversation(&short).unwrap();
        assert_eq!(docs[0].ids, full.ids[..full.ids.len().min(64)]);
        let (cut, _) = tokenize(&tok, &[short], full.ids.len() - 2).unwrap();
        assert_eq!(cut[0].ids, full.ids[..full.ids.len() - 2], "the start is kept");
    }
}
