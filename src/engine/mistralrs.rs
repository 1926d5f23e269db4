//! mistralrs 0.8.1: loads a Hugging Face safetensors directory or a GGUF file, on CPU or (with the
//! `cuda` cargo feature) on CUDA with PagedAttention, its KV cache sized by
//! `--gpu-memory-utilization` (mistralrs's default is a 4,096-token cache). Requests are raw token ids
//! (`RequestMessage::CompletionTokens`).
//!
//! mistralrs 0.8.1 mixes up sequences when it batches on CPU (concurrent greedy requests with
//! different prompts come back with one prompt's answer), so on CPU requests go one at a time.
//! On CUDA they are sent together and the scheduler batches them. mistralrs has no per-request
//! seed, so sampled output is reproducible only run-to-run in the same order.

use super::{Completion, Engine, EngineOptions, FinishReason, Request, StopStrings};
use anyhow::{anyhow, bail, Context, Result};
use either::Either;
use mistralrs::{
    Constraint, GgufModelBuilder, Model, NormalRequest, Request as MistralRequest, RequestMessage, Response,
    SamplingParams, StopTokens, TextModelBuilder, TokenSource,
};
use std::path::Path;
use tokio::runtime::Runtime;

/// PagedAttention on CUDA, its KV cache taking what the weights leave of `gpu_memory_utilization`
/// of the GPU. mistralrs refuses to load when that is nothing ("Num GPU blocks is 0"), and drops a
/// sequence longer than the whole cache (see `complete`).
fn paged_attention(options: &EngineOptions) -> Result<mistralrs::PagedAttentionConfig> {
    let memory = mistralrs::MemoryGpuConfig::Utilization(options.gpu_memory_utilization as f32);
    mistralrs::PagedAttentionMetaBuilder::default().with_gpu_memory(memory).build()
}

pub struct MistralRs {
    runtime: Runtime,
    model: Model,
    /// One request at a time (CPU); see the module docs.
    serial: bool,
    widest_batch: usize,
}

impl MistralRs {
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.threads.max(1))
            .enable_all()
            .build()?;
        let local = |p: &Path| p.to_str().map(str::to_string).with_context(|| format!("{}: path is not UTF-8", p.display()));
        let paged_attention = options.cuda.then(|| paged_attention(options)).transpose()?;
        // The same settings on either builder: two types with the same methods.
        macro_rules! build {
            ($builder:expr) => {{
                let builder = $builder.with_token_source(TokenSource::None).with_max_num_seqs(options.batch_size.max(1));
                match paged_attention {
                    Some(config) => builder.with_paged_attn(config),
                    None => builder.with_force_cpu(),
                }
                .build()
                .await
            }};
        }
        let model = runtime.block_on(async {
            if path.is_file() {
                let dir = path.parent().context("GGUF file has no parent directory")?;
                let file = path.file_name().context("GGUF path has no file name")?.to_string_lossy().into_owned();
                build!(GgufModelBuilder::new(local(dir)?, vec![file]))
            } else {
                build!(TextModelBuilder::new(local(path)?))
            }
        });
        let model = model.map_err(|e| anyhow!("{}: mistralrs could not load this model: {e:#}", path.display()))?;
        Ok(MistralRs { runtime, model, serial: !options.cuda, widest_batch: 0 })
    }

    async fn complete(model: &Model, request: &Request) -> Result<Completion> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let sampling = &request.sampling;
        let mut params = SamplingParams::neutral();
        if sampling.temperature > 0.0 {
            params.temperature = Some(sampling.temperature as f64);
            params.top_p = Some(sampling.top_p as f64);
        } else {
            params.top_k = Some(1);
        }
        params.max_len = Some(sampling.max_tokens);
        if !sampling.stop_strings.is_empty() {
            params.stop_toks = Some(StopTokens::Seqs(sampling.stop_strings.clone()));
        }
        let runner = model.inner();
        let normal = NormalRequest {
            messages: RequestMessage::CompletionTokens(request.prompt.clone()),
            sampling_params: params,
            response: tx,
            return_logprobs: false,
            is_streaming: false,
            id: runner.next_request_id(),
            constraint: sampling.json.as_ref().map_or(Constraint::None, |answer| Constraint::JsonSchema(answer.schema().clone())),
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: None,
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        };
        runner.get_sender(None)?.send(MistralRequest::Normal(Box::new(normal))).await?;
        // With PagedAttention, mistralrs drops a sequence that does not fit its whole KV cache
        // (it logs a warning) and closes the channel without an answer.
        let response = rx.recv().await.context(
            "mistralrs closed the response channel without an answer (on CUDA: the sequence does not fit its KV cache; \
             raise --gpu-memory-utilization, or lower max_tokens)",
        )?;
        let done = match response {
            Response::CompletionDone(done) => done,
            Response::CompletionModelError(e, _) | Response::ModelError(e, _) => bail!("mistralrs: {e}"),
            Response::InternalError(e) | Response::ValidationError(e) => bail!("mistralrs: {e}"),
            _ => bail!("mistralrs: unexpected response to a completion request"),
        };
        let choice = done.choices.into_iter().next().context("mistralrs returned no choice")?;
        let mut text = choice.text;
        // mistralrs may keep the stop text; cut at the first stop string as llama.cpp does.
        if let Some(at) = StopStrings::new(&sampling.stop_strings).find(text.as_bytes(), 0) {
            text.truncate(at);
        }
        Ok(Completion {
            text,
            finish_reason: if choice.finish_reason == "length" { FinishReason::Length } else { FinishReason::Stop },
            prompt_tokens: done.usage.prompt_tokens,
            completion_tokens: done.usage.completion_tokens,
        })
    }
}

impl Engine for MistralRs {
    fn name(&self) -> &'static str {
        "mistralrs"
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.runtime
            .block_on(self.model.tokenize(Either::Right(text.to_string()), None, false, false, None))
            .map_err(|e| anyhow!("mistralrs tokenizer: {e}"))
    }

    fn widest_batch(&self) -> usize {
        self.widest_batch
    }

    fn generate(&mut self, requests: &[Request], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>> {
        self.widest_batch = if self.serial { requests.len().min(1) } else { requests.len() };
        let model = &self.model;
        if self.serial {
            return requests
                .iter()
                .map(|request| {
                    let completion = self.runtime.block_on(Self::complete(model, request))?;
                    on_tokens(completion.completion_tokens);
                    Ok(completion)
                })
                .collect();
        }
        let completions = self.runtime.block_on(async {
            let pending: Vec<_> = requests.iter().map(|r| Self::complete(model, r)).collect();
            futures::future::join_all(pending).await
        });
        let completions: Vec<Completion> = completions.into_iter().collect::<Result<_>>()?;
        on_tokens(completions.iter().map(|c| c.completion_tokens).sum());
        Ok(completions)
    }
}
