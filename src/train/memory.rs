//! `--dry-run`: what a training run will hold on each GPU, from the model's `config.json` alone,
//! before anything is loaded: weights, gradients, the optimizer's fp32 master weights and moments
//! (sharded over the ranks, `distributed::zero`), communication buckets, activations and the
//! vocabulary head.
//!
//! Activations are counted per token and layer from the tensors autograd keeps in our Llama block
//! (9 of hidden size, 4 of the key/value width, 4 of the MLP width, in the compute dtype); with
//! gradient checkpointing a recomputed layer keeps only its input, and one layer is recomputed at
//! a time.
//! Attention is assumed to keep no T×T matrix (the fused kernels on CUDA). The vocabulary head
//! holds one chunk of logits at a time and the head's gradient (`lm_head::peak_bytes`). The CUDA
//! context and allocator slack (a GB or two) come on top.
//!
//! The plan also sizes the run to its device ([`Fit`]): `--gradient-checkpointing auto` asks it
//! how few blocks the run can recompute and fit, and the vocabulary head takes chunks as large as
//! the room left allows.

use std::ffi::{c_char, c_int};

use crate::model::lora::LoraConfig;
use crate::model::LlamaConfig;
use super::lm_head::{self, DEFAULT_CHUNK_LOGITS, LARGEST_CHUNK_LOGITS};
use super::plan::Precision;
use super::distributed::zero::{reduction_window, BUCKET_ELEMENTS, IN_FLIGHT_BUCKETS};
use super::optim::SLICE_ELEMENTS;

/// What one micro-batch of the run holds besides the policy.
pub struct Workload {
    /// Tokens in one micro-batch on one rank (DPO: chosen and rejected sequences).
    pub tokens: i64,
    /// A frozen reference model held beside the policy (DPO without precomputed log-probs).
    pub reference_model: bool,
    /// Micro-batches per optimizer step (more than one with bf16 keeps f32 gradient sums).
    pub micro_batches: usize,
}

/// The trainable parameters of a Llama-family config.
pub fn parameters(c: &LlamaConfig) -> i64 {
    let h = c.hidden_size;
    let embeddings = c.vocab_size * h * if c.tie_word_embeddings { 1 } else { 2 };
    c.num_hidden_layers * block_parameters(c) + embeddings + h
}

/// Parameters of one decoder block.
fn block_parameters(c: &LlamaConfig) -> i64 {
    let (h, kv) = (c.hidden_size, c.kv_heads() * c.head_dim());
    let q = c.num_attention_heads * c.head_dim();
    let attention = h * q + 2 * h * kv + q * h + if c.attention_bias { q + 2 * kv } else { 0 };
    attention + 3 * h * c.intermediate_size + 2 * h
}

/// How a run fits its device: the blocks it runs again in the backward pass (gradient
/// checkpointing, spread over the depth: 0 none, past the block count all), and the logits one
/// chunk of the vocabulary head holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fit {
    pub recomputed_blocks: usize,
    pub head_chunk_logits: i64,
}

impl Fit {
    /// `blocks` recomputed, the head in chunks of the default size.
    pub fn recomputing(blocks: usize) -> Fit {
        Fit { recomputed_blocks: blocks, head_chunk_logits: DEFAULT_CHUNK_LOGITS }
    }
}

/// Bytes on each rank, by part, for `fit`. With `lora`, the base weights are frozen and only the
/// f32 adapters have gradients and optimizer state.
pub fn plan(c: &LlamaConfig, precision: Precision, fit: Fit, world: i64, work: &Workload, lora: Option<&LoraConfig>) -> Vec<(&'static str, f64)> {
    let n = parameters(c) as f64;
    let bf16 = precision.dtype == tch::Kind::BFloat16;
    let element = if bf16 { 2.0 } else { 4.0 };
    let fp32_state = precision.fp32_state;
    let state_element = if fp32_state { 4.0 } else { element };
    let master = if (bf16 && fp32_state || world > 1) && lora.is_none() { n * state_element } else { 0.0 };
    let (h, kv, i) = (c.hidden_size as f64, (c.kv_heads() * c.head_dim()) as f64, c.intermediate_size as f64);
    // An adapter keeps its f32 input and its rank-r middle (and a dropout mask) per token.
    let adapter_per_layer_token = lora.map_or(0.0, |l| {
        let mask = if l.dropout > 0.0 { 1.0 } else { 0.0 };
        crate::model::lora::module_shapes(c).iter().filter(|(m, _, _)| l.targets(m)).map(|&(_, x, _)| (4.0 + mask) * x as f64 + 4.0 * l.r as f64).sum()
    });
    let per_layer_token = element * (9.0 * h + 4.0 * kv + 4.0 * i) + adapter_per_layer_token;
    let tokens = work.tokens as f64;
    let layers = c.num_hidden_layers as f64;
    let recomputed = fit.recomputed_blocks.min(c.num_hidden_layers as usize) as f64;
    let recomputing = if recomputed > 0.0 { per_layer_token } else { 0.0 };
    let activations = tokens * ((layers - recomputed) * per_layer_token + recomputed * element * h + recomputing);
    // What trains: every weight, or the f32 adapters.
    let (trained, trained_element, state_element) = match lora {
        Some(l) => (l.parameters(c) as f64, 4.0, 4.0),
        None => (n, element, state_element),
    };
    let mut rows = vec![("weights", n * element)];
    if lora.is_some() {
        rows.push(("LoRA adapters (f32)", trained * 4.0));
    }
    rows.extend([
        ("gradients", trained * trained_element),
        ("fp32 master weights", master / world as f64),
        ("Adam moments", 2.0 * trained * state_element / world as f64),
    ]);
    let f32_sums = precision.f32_gradient_sums(work.micro_batches);
    if f32_sums && world == 1 {
        rows.push(("f32 gradient sums", 4.0 * trained));
    }
    if world > 1 {
        // Sharded, micro-batches are reduced one at a time into these (ZeRO-2 style).
        rows.push(("f32 gradient shards", 4.0 * trained / world as f64));
        // The buckets in flight: their f32 gradients for the reduce-scatter (a block's worth when
        // it overlaps the backward pass), or their gather in the weights' dtype. A parameter
        // larger than the window (the embeddings) flies alone.
        let window = if f32_sums { reduction_window(block_parameters(c), BUCKET_ELEMENTS) } else { IN_FLIGHT_BUCKETS * BUCKET_ELEMENTS };
        let largest = match lora {
            Some(_) => window.min(trained as i64) as f64,
            None => window.min(n as i64).max(c.vocab_size * c.hidden_size) as f64,
        };
        rows.push(("communication buckets", largest * (4.0 + trained_element)));
    } else if bf16 && fp32_state && !f32_sums && lora.is_none() {
        // Gradients converted to f32 for the fused kernel, one slice at a time.
        rows.push(("optimizer step slices", SLICE_ELEMENTS.min(n as i64) as f64 * 4.0));
    }
    if work.reference_model {
        rows.push(("reference model", n * element));
    }
    rows.push(("activations", activations));
    let head = lm_head::peak_bytes(c.vocab_size, c.hidden_size, work.tokens, element, lora.is_none(), fit.head_chunk_logits);
    rows.push(("vocabulary head (chunked)", head));
    rows
}

/// When to recompute each block in the backward pass (`--gradient-checkpointing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    Off,
    On,
    /// The fewest blocks whose plan fits the device ([`AUTO_FILL`]).
    Auto,
    /// This many blocks, spread over the depth.
    Blocks(usize),
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "true" | "on" => Ok(Checkpointing::On),
            "false" | "off" => Ok(Checkpointing::Off),
            "auto" => Ok(Checkpointing::Auto),
            "1" => Err("1 block alone saves nothing (its recomputation holds a block's activations again): give 2 or more".to_string()),
            _ => text.parse().map(Checkpointing::Blocks).map_err(|_| format!("expected true, false, auto or a number of blocks, not `{text}`")),
        }
    }
}

/// The share of the device's memory the plan may fill: for `auto` to leave checkpointing off, and
/// for the vocabulary head's chunks to grow; the rest is for the CUDA context, the allocator's
/// slack and what the plan leaves out.
pub const AUTO_FILL: f64 = 0.9;

/// How the run fits `device` (no device: a `--dry-run` on a machine without the run's GPU), whose
/// memory `capacity` gives (asked for by `auto` and on a GPU). Checkpointing: `auto` takes the
/// fewest blocks whose plan fits in [`AUTO_FILL`] of the capacity, none where the plan without
/// checkpointing fits, and all where even that does not fit or the capacity is unknown. The head,
/// on a GPU, once the blocks are chosen: the largest chunk, halving from
/// [`LARGEST_CHUNK_LOGITS`], whose plan fits in that share; the default where none does, and on
/// the CPU, whose available memory changes from run to run (the chunk sets the order of the
/// head's sums, which a resumed run must repeat). For `auto`, also the line that says why.
#[allow(clippy::too_many_arguments)]
pub fn resolve(choice: Checkpointing, c: &LlamaConfig, precision: Precision, world: i64, work: &Workload, lora: Option<&LoraConfig>,
               device: Option<tch::Device>, capacity: impl FnOnce() -> Option<f64>) -> (Fit, Option<String>) {
    let blocks = c.num_hidden_layers as usize;
    let on_gpu = device.is_some_and(|d| d.is_cuda());
    let capacity = if device.is_some() && (on_gpu || choice == Checkpointing::Auto) { capacity() } else { None };
    let total = |fit: Fit| plan(c, precision, fit, world, work, lora).iter().map(|r| r.1).sum::<f64>();
    let fits = |fit: Fit| capacity.is_some_and(|capacity| total(fit) <= AUTO_FILL * capacity);
    let (recomputed, why) = match choice {
        Checkpointing::On => (blocks, None),
        Checkpointing::Off => (0, None),
        Checkpointing::Blocks(count) => (count.min(blocks), None),
        Checkpointing::Auto => {
            let total = |k| total(Fit::recomputing(k));
            let device = device.map_or("the run's device (not on this machine)".to_string(), |d| format!("{d:?}"));
            let (recomputed, why) = match capacity {
                None => (blocks, format!("the memory of {device} is unknown; without it the plan is {:.1} GiB", gib(total(0)))),
                Some(capacity) => {
                    let room = format!("{:.0}% of {device}'s {:.1} GiB", AUTO_FILL * 100.0, gib(capacity));
                    match (0..=blocks).find(|&k| fits(Fit::recomputing(k))) {
                        Some(0) => (0, format!("the plan without it, {:.1} GiB, fits in {room}", gib(total(0)))),
                        Some(k) => (k, format!("the plan without it, {:.1} GiB, exceeds {room}; with {k} blocks recomputed, the fewest that fit, {:.1} GiB",
                                               gib(total(0)), gib(total(k)))),
                        None => (blocks, format!("even with every block recomputed the plan, {:.1} GiB, exceeds {room}", gib(total(blocks)))),
                    }
                }
            };
            let state = match recomputed {
                0 => "off".to_string(),
                k if k == blocks => "on".to_string(),
                k => format!("{k} of {blocks} blocks"),
            };
            (recomputed, Some(format!("gradient checkpointing auto: {state}: {why}")))
        }
    };
    let head_chunk_logits = std::iter::successors(Some(LARGEST_CHUNK_LOGITS), |&chunk| Some(chunk / 2))
        .take_while(|&chunk| on_gpu && chunk > DEFAULT_CHUNK_LOGITS)
        .find(|&chunk| fits(Fit { recomputed_blocks: recomputed, head_chunk_logits: chunk }))
        .unwrap_or(DEFAULT_CHUNK_LOGITS);
    (Fit { recomputed_blocks: recomputed, head_chunk_logits }, why)
}

/// Bytes of memory `device` has: on a GPU its total as the CUDA runtime reports it (a MIG slice's
/// own; `device_memory.cpp`), the same on every run, so a resumed run picks the same head chunks;
/// on CPU the memory available now (/proc/meminfo).
pub fn device_memory(device: tch::Device) -> Option<f64> {
    match device {
        tch::Device::Cuda(index) => {
            let mut total = 0usize;
            let asked = crate::torch_ffi::checked("asking the GPU's memory", |err, len| unsafe {
                magpie_device_total_memory(index as c_int, &mut total, err, len)
            });
            match asked {
                Ok(()) => Some(total as f64),
                Err(e) => {
                    eprintln!("warning: {e:#}; the memory plan assumes nothing about the GPU");
                    None
                }
            }
        }
        _ => available_memory(&std::fs::read_to_string("/proc/meminfo").ok()?),
    }
}

unsafe extern "C" {
    fn magpie_device_total_memory(device: c_int, total: *mut usize, err: *mut c_char, len: usize) -> c_int;
}

/// /proc/meminfo's `MemAvailable:  N kB`.
fn available_memory(meminfo: &str) -> Option<f64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    Some(line.trim().trim_end_matches("kB").trim().parse::<f64>().ok()? * 1024.0)
}

fn gib(bytes: f64) -> f64 {
    bytes / (1u64 << 30) as f64
}

/// The plan as a table, with its total, in GiB.
pub fn render(c: &LlamaConfig, precision: Precision, fit: Fit, world: i64, work: &Workload, lora: Option<&LoraConfig>) -> String {
    let rows = plan(c, precision, fit, world, work, lora);
    let blocks = c.num_hidden_layers as usize;
    let mut text = format!(
        "memory plan per rank: {:.2}B parameters{}, {}, {} tokens a micro-batch ({} a vocabulary-head chunk), {}{}\n",
        parameters(c) as f64 / 1e9,
        lora.map_or(String::new(), |l| format!(" (frozen; LoRA r {} on {}: {:.1}M trained)", l.r, l.targets.join(","), l.parameters(c) as f64 / 1e6)),
        if world > 1 { format!("{world} ranks (optimizer state sharded)") } else { "1 process".to_string() },
        work.tokens,
        lm_head::chunk_tokens(fit.head_chunk_logits, c.vocab_size).min(work.tokens.max(1)),
        if precision.dtype == tch::Kind::BFloat16 { "bf16" } else { "f32" },
        match fit.recomputed_blocks.min(blocks) {
            0 => String::new(),
            k if k == blocks => ", gradient checkpointing".to_string(),
            k => format!(", gradient checkpointing of {k} of {blocks} blocks"),
        }
    );
    for (part, bytes) in &rows {
        text += &format!("  {part:<32} {:>8.2} GiB\n", gib(*bytes));
    }
    text += &format!("  {:<32} {:>8.2} GiB (plus the CUDA context and allocator slack)\n", "total", gib(rows.iter().map(|r| r.1).sum()));
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::args::parse_for_test;

    fn llama_8b() -> LlamaConfig {
        LlamaConfig::from_json(r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0}"#).unwrap()
    }

    #[test]
    fn llama_3_1_8b_has_its_published_parameter_count_and_fits_eight_80gb_gpus_only_sharded() {
        assert_eq!(parameters(&llama_8b()), 8_030_261_248);
        let precision = parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--bf16"]).precision();
        let rows = |world, micro_batches| plan(&llama_8b(), precision, Fit::recomputing(32), world, &Workload { tokens: 8192, reference_model: false, micro_batches }, None);
        let gb = |rows: &[(&str, f64)], part: &str| rows.iter().filter(|r| part.is_empty() || r.0 == part).map(|r| r.1).sum::<f64>() / 1e9;
        let (one, eight) = (rows(1, 1), rows(8, 1));
        // 16 GB weights + 16 GB gradients + 96 GB fp32 state on one GPU; 12 GB of state each on eight.
        assert!(gb(&one, "") > 80.0 && gb(&eight, "") < 75.0, "one GPU {:.1} GB, eight {:.1} GB", gb(&one, ""), gb(&eight, ""));
        let state = |rows: &[(&str, f64)]| gb(rows, "fp32 master weights") + gb(rows, "Adam moments");
        assert!((state(&one) - state(&eight) - 84.0).abs() < 1.0, "sharding saves 7/8 of 96 GB: {:.1} vs {:.1}", state(&one), state(&eight));
        // Sharded: f32 gradient shards (32 GB / 8), and the embedding matrix as a bucket of its own.
        assert!((gb(&eight, "f32 gradient shards") - 4.0).abs() < 0.1);
        assert!(gb(&eight, "communication buckets") >= 128_256.0 * 4096.0 * 6.0 / 1e9);
        // One process converts gradients a slice at a time; with accumulation it keeps f32 sums.
        assert!((gb(&one, "optimizer step slices") - 1.07).abs() < 0.01);
        let accumulating = rows(1, 16);
        assert!((gb(&accumulating, "f32 gradient sums") - 32.1).abs() < 0.1 && gb(&accumulating, "optimizer step slices") == 0.0);
        assert_eq!(gb(&rows(8, 16), "f32 gradient sums"), 0.0, "sharded runs reduce each micro-batch into the shards instead");
    }

    /// The seed's SFT micro-batch (8192 tokens) fits eight 141 GB H200s without recomputation;
    /// on eight 80 GB H100s 22 of the 32 blocks are recomputed, the fewest that fit; one H200
    /// recomputes all (and still does not fit).
    #[test]
    fn auto_checkpointing_recomputes_the_fewest_blocks_that_fit_the_device() {
        let args = parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--bf16", "--gradient-checkpointing=auto"]);
        assert_eq!(args.gradient_checkpointing, Checkpointing::Auto);
        let work = Workload { tokens: 8192, reference_model: false, micro_batches: 32 };
        let mib = |mib: f64| Some(mib * (1u64 << 20) as f64);
        let (h200, h100) = (mib(143771.0), mib(81559.0));
        let cuda = Some(tch::Device::Cuda(0));
        let decide = |world, capacity| resolve(args.gradient_checkpointing, &llama_8b(), args.precision(), world, &work, None, cuda, || capacity);
        let (fit, why) = decide(8, h200);
        assert_eq!(fit.recomputed_blocks, 0, "{why:?}");
        assert!(why.unwrap().contains("fits in 90% of Cuda(0)'s 140.4 GiB"));
        let (fit, why) = decide(8, h100);
        let recomputed = fit.recomputed_blocks;
        assert_eq!(recomputed, 22, "docs/guide/training.md's figure: {why:?}");
        let total = |k| plan(&llama_8b(), args.precision(), Fit::recomputing(k), 8, &work, None).iter().map(|r| r.1).sum::<f64>();
        let room = AUTO_FILL * h100.unwrap();
        assert!(total(recomputed) <= room && total(recomputed - 1) > room, "the fewest that fit: {why:?}");
        let why = why.unwrap();
        assert!(why.contains(&format!("auto: {recomputed} of 32 blocks:")) && why.contains(&format!("with {recomputed} blocks recomputed, the fewest that fit")), "{why}");
        assert_eq!(decide(1, h200).0.recomputed_blocks, 32);
        assert_eq!(decide(8, None).0, Fit::recomputing(32), "an unknown capacity recomputes every block, the head in default chunks");
        let off = resolve(Checkpointing::Off, &llama_8b(), args.precision(), 1, &work, None, None, || panic!("asked the memory of no device"));
        assert_eq!(off, (Fit::recomputing(0), None));
        assert_eq!(available_memory("MemTotal: 100 kB\nMemAvailable:   2048 kB\n"), Some(2048.0 * 1024.0));
    }

    /// On a GPU the plan's room is the GPU's memory as the CUDA runtime reports it; without one,
    /// the question fails cleanly (no capacity: the plan assumes nothing).
    #[test]
    fn on_cuda_the_plan_reads_the_gpus_memory_from_the_cuda_runtime() {
        let total = device_memory(tch::Device::Cuda(0));
        if tch::Cuda::is_available() {
            let total = total.expect("the CUDA runtime's figure");
            assert!(total > (8u64 << 30) as f64, "{total} bytes");
        } else {
            assert_eq!(total, None);
        }
        assert!(device_memory(tch::Device::Cpu).is_some_and(|bytes| bytes > 0.0));
    }

    /// With room left once the blocks are chosen, the head's chunks grow (up to the seed's whole
    /// micro-batch in one chunk on eight H200s), never to the cost of a recomputed block.
    #[test]
    fn the_vocabulary_head_takes_the_largest_chunk_the_room_allows() {
        let precision = parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--bf16"]).precision();
        let work = Workload { tokens: 8192, reference_model: false, micro_batches: 32 };
        let cuda = Some(tch::Device::Cuda(0));
        let total = |fit| plan(&llama_8b(), precision, fit, 8, &work, None).iter().map(|r| r.1).sum::<f64>();
        for (gpu, mib) in [("H200", 143771.0), ("H100", 81559.0), ("24 GB", 24564.0)] {
            let capacity = mib * (1u64 << 20) as f64;
            let (fit, _) = resolve(Checkpointing::Auto, &llama_8b(), precision, 8, &work, None, cuda, || Some(capacity));
            let (recomputed, chunk) = (fit.recomputed_blocks, fit.head_chunk_logits);
            assert!((DEFAULT_CHUNK_LOGITS..=LARGEST_CHUNK_LOGITS).contains(&chunk) && (chunk & (chunk - 1)) == 0, "{gpu}: {chunk}");
            let room = AUTO_FILL * capacity;
            if total(fit) <= room {
                let larger = Fit { recomputed_blocks: recomputed, head_chunk_logits: chunk * 2 };
                assert!(chunk == LARGEST_CHUNK_LOGITS || total(larger) > room, "{gpu}: a larger chunk fits too");
            } else {
                assert_eq!(chunk, DEFAULT_CHUNK_LOGITS, "{gpu}: nothing fits, the default chunk");
            }
            match gpu {
                "H200" => assert_eq!((recomputed, chunk), (0, LARGEST_CHUNK_LOGITS), "the micro-batch's 8,192 targets in one chunk"),
                "H100" => assert!(recomputed == 22 && chunk < LARGEST_CHUNK_LOGITS, "{fit:?}"),
                _ => assert_eq!(fit, Fit::recomputing(32), "does not fit at all"),
            }
        }
        let unknown = resolve(Checkpointing::Auto, &llama_8b(), precision, 8, &work, None, None, || None).0;
        assert_eq!(unknown.head_chunk_logits, DEFAULT_CHUNK_LOGITS, "no device, no capacity: the default");
        // On the CPU the chunk stays the default whatever the room, and only `auto` asks for it.
        let cpu = Some(tch::Device::Cpu);
        let roomy = resolve(Checkpointing::Auto, &llama_8b(), precision, 8, &work, None, cpu, || Some(1e15)).0;
        assert_eq!(roomy, Fit::recomputing(0));
        let off = resolve(Checkpointing::Off, &llama_8b(), precision, 8, &work, None, cpu, || panic!("asked the CPU's memory for `false`")).0;
        assert_eq!(off, Fit::recomputing(0));
        // The plan counts the chunk: one of 8,192 targets holds 8× the logits of the default's 1,046.
        let head = |chunk| plan(&llama_8b(), precision, Fit { recomputed_blocks: 0, head_chunk_logits: chunk }, 8, &work, None)
            .iter().find(|r| r.0 == "vocabulary head (chunked)").unwrap().1;
        let logits_bytes = |tokens: f64| tokens * 128_256.0 * 8.0; // f32 logits and a temporary
        assert!((head(LARGEST_CHUNK_LOGITS) - head(DEFAULT_CHUNK_LOGITS) - (logits_bytes(8192.0) - logits_bytes(1046.0))).abs() < 1.0);
    }

    /// Each recomputed block trades its activations for its input: the plan falls block by block
    /// from none to all.
    #[test]
    fn the_plan_falls_with_each_recomputed_block() {
        let precision = parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--bf16"]).precision();
        let work = Workload { tokens: 8192, reference_model: false, micro_batches: 1 };
        let activations = |k| plan(&llama_8b(), precision, Fit::recomputing(k), 8, &work, None).iter().find(|r| r.0 == "activations").unwrap().1;
        // One block alone saves nothing: its recomputation holds a block's activations again.
        assert!(activations(1) > activations(0));
        for k in 2..=32 {
            assert!(activations(k) < activations(k - 1), "{k}");
        }
        assert_eq!(activations(32), activations(99));
        // One block's share: its activations less the input it keeps instead.
        let per_block = activations(2) - activations(3);
        assert!((per_block - (activations(0) / 32.0 - 8192.0 * 2.0 * 4096.0)).abs() < 1.0, "{per_block}");
    }

    #[test]
    fn the_checkpointing_flag_alone_is_true_and_takes_false_auto_or_a_number_of_blocks() {
        let parse = |extra: &[&str]| parse_for_test(["--model", "m", "-i", "x", "-o", "y"].into_iter().chain(extra.iter().copied())).gradient_checkpointing;
        assert_eq!(parse(&[]), Checkpointing::Off);
        assert_eq!(parse(&["--gradient-checkpointing"]), Checkpointing::On);
        assert_eq!(parse(&["--gradient-checkpointing", "--bf16"]), Checkpointing::On);
        assert_eq!(parse(&["--gradient-checkpointing=false"]), Checkpointing::Off);
        assert_eq!(parse(&["--gradient-checkpointing", "auto"]), Checkpointing::Auto);
        assert_eq!(parse(&["--gradient-checkpointing", "12"]), Checkpointing::Blocks(12));
        assert_eq!("maybe".parse::<Checkpointing>().unwrap_err(), "expected true, false, auto or a number of blocks, not `maybe`");
        assert!("1".parse::<Checkpointing>().unwrap_err().contains("saves nothing"));
        let precision = parse_for_test(["--model", "m", "-i", "x", "-o", "y"]).precision();
        let work = Workload { tokens: 1, reference_model: false, micro_batches: 1 };
        let blocks = |choice| resolve(choice, &llama_8b(), precision, 1, &work, None, None, || panic!("asked the device's memory")).0.recomputed_blocks;
        assert_eq!((blocks(Checkpointing::Blocks(12)), blocks(Checkpointing::Blocks(99)), blocks(Checkpointing::On)), (12, 32, 32));
    }

    #[test]
    fn lora_on_llama_3_1_8b_trains_peft_s_parameter_count_and_fits_one_80gb_gpu() {
        let lora = LoraConfig::new(16, 32.0, 0.05, &["all-linear".to_string()], false).unwrap();
        assert_eq!(lora.parameters(&llama_8b()), 41_943_040, "PEFT's print_trainable_parameters for r 16 on all linear layers");
        let precision = parse_for_test(["--model", "m", "-i", "x", "-o", "y", "--bf16"]).precision();
        let rows = plan(&llama_8b(), precision, Fit::recomputing(32), 1, &Workload { tokens: 8192, reference_model: false, micro_batches: 16 }, Some(&lora));
        let gb = |part: &str| rows.iter().filter(|r| part.is_empty() || r.0 == part).map(|r| r.1).sum::<f64>() / 1e9;
        assert!(gb("") < 30.0, "{:.1} GB", gb(""));
        assert_eq!(gb("fp32 master weights"), 0.0, "frozen base weights have no master copy");
        assert!((gb("Adam moments") - 41_943_040.0 * 8.0 / 1e9).abs() < 1e-6, "moments only for the adapters");
    }
}
