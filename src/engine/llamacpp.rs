//! llama.cpp through `llama-cpp-2`: continuous batching over one context. A sequence's tokens do
//! not depend on what else is in the batch, so greedy output is the same alone or batched and
//! sampled output is reproducible per request. That takes, besides a sampler seeded per request:
//! - its own KV stream per sequence (`kv_unified = false`);
//! - flash attention off (the CPU kernel's summation order depends on the batch);
//! - llama.cpp built with `GGML_LLAMAFILE=OFF` and `GGML_CPU_REPACK=OFF` (.cargo/config.toml),
//!   whose batched matmuls sum in another order than single rows.
//!
//! On CUDA (the `cuda` feature with a GPU) every layer is offloaded, flash attention is left to
//! llama.cpp, and the KV cache is sized from the GPU's free memory and `--gpu-memory-utilization`.
//! Batched CUDA matmuls choose their kernels (and summation order) by batch size, so there
//! greedy output alone and batched can differ; scripts/gpu-check.sh counts how often.

use super::{Completion, Engine, EngineOptions, FinishReason, Request, Sampling, StopStrings};
use anyhow::{anyhow, bail, Context, Result};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// llama.cpp's backend may be initialised once per process.
/// Serialises what llama.cpp does not make thread-safe: initialising its backend (once per
/// process) and the system-info call, which fills one static buffer.
static LLAMA_GLOBALS: Mutex<()> = Mutex::new(());

fn backend() -> Result<&'static LlamaBackend> {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    let _guard = LLAMA_GLOBALS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(backend) = BACKEND.get() {
        return Ok(backend);
    }
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default().with_logs_enabled(false));
    let backend = LlamaBackend::init().map_err(|e| anyhow!("llama.cpp backend: {e}"))?;
    Ok(BACKEND.get_or_init(|| backend))
}

/// llama.cpp's system-info line: the CPU features its kernels were built with and use
/// (`SSE3 = 1 | AVX2 = 1 | ...`). AMX never appears: the build keeps ggml's AMX backend out.
pub fn system_info() -> Result<String> {
    backend()?;
    let _guard = LLAMA_GLOBALS.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: returns a pointer to a static, NUL-terminated buffer owned by llama.cpp, which the
    // lock keeps other threads from rewriting while it is copied.
    let info = unsafe { std::ffi::CStr::from_ptr(llama_cpp_sys_2::llama_print_system_info()) };
    Ok(info.to_string_lossy().trim().to_string())
}

/// A GGUF's vocabulary without its weights: tokenises prompts that another engine (a server)
/// runs, exactly as the in-process engine would.
pub struct Vocabulary {
    model: LlamaModel,
}

impl Vocabulary {
    pub fn load(path: &Path) -> Result<Self> {
        let params = LlamaModelParams::default().with_vocab_only(true);
        let model = LlamaModel::load_from_file(backend()?, path, &params)
            .map_err(|e| anyhow!("{}: llama.cpp could not read this model's vocabulary: {e}", path.display()))?;
        Ok(Vocabulary { model })
    }

    /// Special tokens parsed, no BOS added (as `LlamaCpp::tokenize`).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        tokenize(&self.model, text)
    }

    /// The text of `ids`, special tokens written out.
    pub fn detokenize(&self, ids: &[u32]) -> String {
        let tokens: Vec<LlamaToken> = ids.iter().map(|&id| LlamaToken(id as i32)).collect();
        String::from_utf8_lossy(&self.model.vocab().detokenize(&tokens, false, true)).into_owned()
    }
}

fn tokenize(model: &LlamaModel, text: &str) -> Vec<u32> {
    model.vocab().tokenize(text.as_bytes(), false, true).into_iter().map(|t| t.0 as u32).collect()
}

/// Bytes of a GPU as ggml reports them.
#[derive(Clone, Copy, Debug)]
struct GpuMemory {
    free: usize,
    total: usize,
}

/// The first GPU llama.cpp sees.
fn gpu_memory() -> Result<GpuMemory> {
    backend()?;
    // SAFETY: ggml's device registry is initialised by the backend; the device handle is static.
    let device = unsafe { llama_cpp_sys_2::ggml_backend_dev_by_type(llama_cpp_sys_2::GGML_BACKEND_DEVICE_TYPE_GPU) };
    if device.is_null() {
        bail!("llama.cpp sees no GPU (built without CUDA, or no device visible)");
    }
    let (mut free, mut total) = (0usize, 0usize);
    unsafe { llama_cpp_sys_2::ggml_backend_dev_memory(device, &mut free, &mut total) };
    Ok(GpuMemory { free, total })
}

/// What sizes a model's KV cache.
struct KvShape {
    layers: usize,
    kv_heads: usize,
    hidden: usize,
    heads: usize,
}

impl KvShape {
    /// Bytes of f16 K and V one token takes over every layer. The head sizes are the GGUF's
    /// `{arch}.attention.key_length` and `value_length` where it has them (Gemma's and Qwen3's
    /// heads are not hidden / heads wide), else hidden / heads, as llama.cpp assumes.
    fn f16_bytes_per_token(&self, metadata: impl Fn(&str) -> Option<String>) -> usize {
        let arch = metadata("general.architecture").unwrap_or_default();
        let head = |length: &str| metadata(&format!("{arch}.attention.{length}")).and_then(|v| v.parse().ok()).unwrap_or(self.hidden / self.heads.max(1));
        self.layers * self.kv_heads * (head("key_length") + head("value_length")) * 2
    }
}

/// KV-cache tokens that fit on a GPU: what is left of `utilization × total` after what is in use
/// (the weights, other processes) and [`GPU_COMPUTE_RESERVE`], at `bytes_per_token`. Room for
/// fewer than one sequence of `per_sequence` tokens is an error naming both, not an
/// out-of-memory crash inside llama.cpp.
fn kv_tokens_on_gpu(memory: GpuMemory, utilization: f64, bytes_per_token: usize, per_sequence: usize) -> Result<usize> {
    let budget = (memory.total as f64 * utilization) as usize;
    let in_use = memory.total.saturating_sub(memory.free);
    let left = budget.saturating_sub(in_use).saturating_sub(GPU_COMPUTE_RESERVE);
    let tokens = left / bytes_per_token.max(1);
    if tokens < per_sequence {
        let gib = |bytes: usize| bytes as f64 / (1u64 << 30) as f64;
        bail!(
            "the KV cache does not fit: one sequence needs {per_sequence} tokens, and --gpu-memory-utilization {utilization} \
             of {:.1} GiB, with {:.1} GiB in use and {:.1} GiB kept for compute, leaves room for {tokens} \
             (raise --gpu-memory-utilization, or lower max_tokens)",
            gib(memory.total),
            gib(in_use),
            gib(GPU_COMPUTE_RESERVE),
        );
    }
    Ok(tokens)
}

pub struct LlamaCpp {
    model: LlamaModel,
    batch_size: usize,
    threads: i32,
    kv_tokens: usize,
    /// `Some(share)` with every layer on the GPU: the KV budget comes from its memory.
    gpu_memory_utilization: Option<f64>,
    widest_batch: usize,
}

/// Room left on the GPU for llama.cpp's compute buffers (activations, logits) beside the KV cache.
const GPU_COMPUTE_RESERVE: usize = 1 << 30;

/// A sequence being decoded in one slot of the batch.
struct Active {
    request: usize,
    sampler: LlamaSampler,
    /// Position of the next token in this sequence.
    position: i32,
    /// Index of this sequence's logits in the last decoded batch.
    logits_index: i32,
    bytes: Vec<u8>,
    generated: usize,
}

/// The sampler of one request: greedy or temperature then top-p, as in transformers and vLLM,
/// behind the answer's grammar when it has one.
fn sampler(model: &LlamaModel, sampling: &Sampling) -> Result<LlamaSampler> {
    let mut chain = vec![];
    if let Some(answer) = &sampling.json {
        let grammar = LlamaSampler::grammar(model, answer.grammar(), "root").map_err(|e| anyhow!("{}: llama.cpp refused the answer's grammar: {e}", answer.name))?;
        chain.push(grammar);
    }
    if sampling.temperature <= 0.0 {
        chain.push(LlamaSampler::greedy());
    } else {
        chain.extend([LlamaSampler::temp(sampling.temperature), LlamaSampler::top_p(sampling.top_p, 1), LlamaSampler::dist(sampling.seed as u32)]);
    }
    Ok(if chain.len() == 1 { chain.remove(0) } else { LlamaSampler::chain_simple(chain) })
}

impl LlamaCpp {
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Self> {
        let params = if options.cuda { LlamaModelParams::default().with_n_gpu_layers(u32::MAX) } else { LlamaModelParams::default() };
        let model = LlamaModel::load_from_file(backend()?, path, &params)
            .map_err(|e| anyhow!("{}: llama.cpp could not load this model: {e}", path.display()))?;
        Ok(LlamaCpp {
            model,
            batch_size: options.batch_size.max(1),
            threads: options.threads.max(1) as i32,
            kv_tokens: options.kv_tokens.max(256),
            gpu_memory_utilization: options.cuda.then_some(options.gpu_memory_utilization),
            widest_batch: 0,
        })
    }

    /// KV-cache tokens the budget holds: `--kv-tokens` on CPU; on a GPU, what its memory leaves
    /// (see [`kv_tokens_on_gpu`]).
    fn kv_budget(&self, per_sequence: usize) -> Result<usize> {
        let Some(utilization) = self.gpu_memory_utilization else { return Ok(self.kv_tokens) };
        let m = &self.model;
        let shape = KvShape { layers: m.n_layer() as usize, kv_heads: m.n_head_kv() as usize, hidden: m.n_embd() as usize, heads: m.n_head() as usize };
        let bytes_per_token = shape.f16_bytes_per_token(|key| m.meta_val_str(key).ok());
        kv_tokens_on_gpu(gpu_memory()?, utilization, bytes_per_token, per_sequence)
    }

    fn piece(&self, token: LlamaToken) -> Vec<u8> {
        self.model.vocab().token_to_piece(token, true, None)
    }
}

impl Engine for LlamaCpp {
    fn name(&self) -> &'static str {
        "llamacpp"
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        Ok(tokenize(&self.model, text))
    }

    fn widest_batch(&self) -> usize {
        self.widest_batch
    }

    fn generate(&mut self, requests: &[Request], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>> {
        self.widest_batch = 0;
        if requests.is_empty() {
            return Ok(vec![]);
        }
        let train_ctx = self.model.n_ctx_train() as usize;
        let longest_prompt = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        if longest_prompt + 1 >= train_ctx {
            anyhow::bail!("a prompt of {longest_prompt} tokens does not fit the model's context of {train_ctx}");
        }
        let per_sequence = requests.iter().map(|r| r.prompt.len() + r.sampling.max_tokens + 1).max().unwrap().min(train_ctx);
        let per_sequence = per_sequence.next_multiple_of(256);
        let slots = self.batch_size.min(requests.len()).min((self.kv_budget(per_sequence)? / per_sequence).max(1));
        let batch_tokens = (longest_prompt + slots).max(512);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new((per_sequence * slots) as u32))
            .with_n_batch(batch_tokens as u32)
            .with_n_ubatch(batch_tokens.min(512) as u32)
            .with_n_seq_max(slots as u32)
            .with_kv_unified(false)
            // CPU flash attention sums in an order that depends on the batch; off, greedy output
            // is the same alone or batched (src/engine/mod.rs tests it). 0 = disabled, -1 = auto
            // (on a GPU, where batching changes the matmul kernels anyway).
            .with_flash_attention_policy(if self.gpu_memory_utilization.is_some() { -1 } else { 0 })
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let mut ctx = self.model.new_context(backend()?, params).map_err(|e| anyhow!("llama.cpp context: {e}"))?;
        let mut batch = LlamaBatch::new(batch_tokens, slots as i32);
        let stop_strings: Vec<StopStrings> = requests.iter().map(|r| StopStrings::new(&r.sampling.stop_strings)).collect();

        let mut results: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut next_request = 0;
        let mut active: Vec<Option<Active>> = (0..slots).map(|_| None).collect();
        let mut last_token: Vec<LlamaToken> = vec![LlamaToken(0); slots];
        loop {
            batch.clear();
            // The running sequences' next tokens first, then new prompts in the room they leave
            // (prompts admitted first could leave the running sequences none).
            for (slot, state) in active.iter_mut().enumerate() {
                if let Some(a) = state {
                    batch.add(last_token[slot], a.position, &[slot as i32], true)?;
                    a.position += 1;
                    a.logits_index = batch.n_tokens() - 1;
                }
            }
            for (slot, state) in active.iter_mut().enumerate() {
                if state.is_some() || next_request == requests.len() {
                    continue;
                }
                let request = &requests[next_request];
                if batch.n_tokens() as usize + request.prompt.len() > batch_tokens {
                    continue; // no room in this step; the slot is filled next step
                }
                ctx.clear_kv_cache_seq(Some(slot as u32), None, None)?;
                let last = request.prompt.len().saturating_sub(1);
                for (position, &token) in request.prompt.iter().enumerate() {
                    batch.add(LlamaToken(token as i32), position as i32, &[slot as i32], position == last)?;
                }
                *state = Some(Active {
                    request: next_request,
                    sampler: sampler(&self.model, &request.sampling)?,
                    position: request.prompt.len() as i32,
                    logits_index: batch.n_tokens() - 1,
                    bytes: vec![],
                    generated: 0,
                });
                next_request += 1;
            }
            if batch.n_tokens() == 0 {
                break;
            }
            self.widest_batch = self.widest_batch.max(active.iter().flatten().count());
            ctx.decode(&mut batch).map_err(|e| anyhow!("llama.cpp decode: {e}"))?;

            let mut new_tokens = 0;
            for (slot, state) in active.iter_mut().enumerate() {
                let Some(a) = state else { continue };
                let request = &requests[a.request];
                let token = a.sampler.sample(&ctx, a.logits_index);
                a.generated += 1;
                new_tokens += 1;
                let is_stop_token = self.model.vocab().is_eog(token) || request.sampling.stop_token_ids.contains(&(token.0 as u32));
                let mut finish = is_stop_token.then_some(FinishReason::Stop);
                if finish.is_none() {
                    let before = a.bytes.len();
                    a.bytes.extend(self.piece(token));
                    if let Some(at) = stop_strings[a.request].find(&a.bytes, before) {
                        a.bytes.truncate(at);
                        finish = Some(FinishReason::Stop);
                    } else if a.generated >= request.sampling.max_tokens
                        || a.position as usize + 1 >= per_sequence
                    {
                        finish = Some(FinishReason::Length);
                    }
                }
                match finish {
                    Some(finish_reason) => {
                        let a = state.take().unwrap();
                        results[a.request] = Some(Completion {
                            text: String::from_utf8_lossy(&a.bytes).into_owned(),
                            finish_reason,
                            prompt_tokens: request.prompt.len(),
                            completion_tokens: a.generated,
                        });
                    }
                    None => last_token[slot] = token,
                }
            }
            on_tokens(new_tokens);
        }
        results.into_iter().enumerate().map(|(i, r)| r.with_context(|| format!("request {i} never finished"))).collect()
    }
}

#[cfg(test)]
impl LlamaCpp {
    /// The prompt's token ids and llama.cpp's logits after its last token, for checks against
    /// other implementations of the same model (`magpie convert`).
    pub fn last_logits(&self, prompt: &str) -> (Vec<u32>, Vec<f32>) {
        let tokens = self.tokenize(prompt).unwrap();
        let params = LlamaContextParams::default().with_n_ctx(NonZeroU32::new(512)).with_n_threads(self.threads);
        let mut ctx = self.model.new_context(backend().unwrap(), params).unwrap();
        let mut batch = LlamaBatch::new(512, 1);
        for (i, &t) in tokens.iter().enumerate() {
            batch.add(LlamaToken(t as i32), i as i32, &[0], i + 1 == tokens.len()).unwrap();
        }
        ctx.decode(&mut batch).unwrap();
        (tokens.clone(), ctx.get_logits_ith(tokens.len() as i32 - 1).to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;
    /// Llama-3.2-1B's KV: 16 layers × K and V × 8 heads × 64 dims × 2 bytes.
    const LLAMA_1B_BYTES_PER_TOKEN: usize = 16 * 2 * 8 * 64 * 2;

    #[test]
    fn kv_bytes_per_token_take_the_head_size_from_the_gguf_where_it_differs_from_hidden_over_heads() {
        let llama_1b = KvShape { layers: 16, kv_heads: 8, hidden: 2048, heads: 32 };
        assert_eq!(llama_1b.f16_bytes_per_token(|_| None), LLAMA_1B_BYTES_PER_TOKEN);
        // Gemma-2-9B: 256-wide heads, not 3584 / 16 = 224.
        let gemma_2_9b = KvShape { layers: 42, kv_heads: 8, hidden: 3584, heads: 16 };
        let metadata = |key: &str| match key {
            "general.architecture" => Some("gemma2".to_string()),
            "gemma2.attention.key_length" | "gemma2.attention.value_length" => Some("256".to_string()),
            _ => None,
        };
        assert_eq!(gemma_2_9b.f16_bytes_per_token(metadata), 42 * 8 * (256 + 256) * 2);
    }

    #[test]
    fn kv_cache_on_a_gpu_takes_the_share_left_after_the_weights_and_the_reserve() {
        // An 80 GiB GPU with 3 GiB of weights loaded: 0.9 × 80 = 72, less 3 in use, less 1 reserve.
        let memory = GpuMemory { free: 77 * GIB, total: 80 * GIB };
        let tokens = kv_tokens_on_gpu(memory, 0.9, LLAMA_1B_BYTES_PER_TOKEN, 4096).unwrap();
        assert_eq!(tokens, 68 * GIB / LLAMA_1B_BYTES_PER_TOKEN);
    }

    #[test]
    fn kv_cache_that_cannot_hold_one_sequence_is_an_error_naming_both_sizes() {
        // 0.05 × 80 GiB = 4 GiB: the 3 GiB in use and the 1 GiB reserve leave nothing.
        let memory = GpuMemory { free: 77 * GIB, total: 80 * GIB };
        let error = kv_tokens_on_gpu(memory, 0.05, LLAMA_1B_BYTES_PER_TOKEN, 4096).unwrap_err().to_string();
        assert!(error.contains("does not fit"), "{error}");
        assert!(error.contains("needs 4096 tokens"), "{error}");
        assert!(error.contains("--gpu-memory-utilization 0.05"), "{error}");
        assert!(error.contains("room for 0"), "{error}");
        // Another process holding most of the GPU is the same error, not a crash.
        let crowded = GpuMemory { free: 2 * GIB, total: 80 * GIB };
        assert!(kv_tokens_on_gpu(crowded, 0.9, LLAMA_1B_BYTES_PER_TOKEN, 4096).is_err());
        // Exactly one sequence fits.
        let one = GpuMemory { free: 80 * GIB, total: 80 * GIB };
        let need = GIB + 4096 * LLAMA_1B_BYTES_PER_TOKEN + LLAMA_1B_BYTES_PER_TOKEN / 2;
        let utilization = need as f64 / (80 * GIB) as f64;
        assert_eq!(kv_tokens_on_gpu(one, utilization, LLAMA_1B_BYTES_PER_TOKEN, 4096).unwrap(), 4096);
    }
}
