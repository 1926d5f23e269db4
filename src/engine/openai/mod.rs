//! The `openai` engine: generation on an OpenAI-compatible server that users already run (vLLM,
//! SGLang, llama.cpp's server), through `/v1/completions`.
//!
//! - **Prompts as token ids.** The template is rendered and tokenised here, from the local model
//!   files (`--model`: a GGUF, whose vocabulary alone is loaded, or a Hugging Face folder's
//!   `tokenizer.json`), and the ids are sent as the prompt. So the pre-query prompt reaches the
//!   model exactly as the template's tokens: no second BOS, no re-tokenised special tokens. A
//!   server that refuses token ids gets the detokenised text with `add_special_tokens: false`,
//!   and the log says so.
//! - **Sampling as the in-process engines sample**: temperature and top-p only; the samplers a
//!   server would add by default (top-k, min-p, repetition penalties, a model's
//!   generation_config) are switched off in each request. Every request carries its row's seed,
//!   so a rerun reproduces where the server honours seeds. Several responses per instruction are
//!   separate requests with their own seeds (not `n`), so each is the same as on the other
//!   engines and survives a resume.
//! - **Constrained answers** (a judge's JSON): `response_format` with the JSON schema, which
//!   vLLM and SGLang apply, and `grammar`, the GBNF that llama.cpp makes of the same schema, which
//!   llama.cpp's server applies (it reads `response_format` only on chat completions). Each
//!   server ignores the other's field.
//! - **Throughput.** Up to `--max-num-seqs` requests are in flight at once; that is what lets
//!   the server batch.
//! - **Faults**: see `client`.

pub mod client;

use super::{Completion, Engine, FinishReason, Request};
use crate::engine::llamacpp::Vocabulary;
use anyhow::{anyhow, bail, Context, Result};
use client::{Client, Refusal};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// Where and how to reach a server: from `--base-url` and its companions, or a recipe step's
/// `server:` block (the same keys).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerOptions {
    /// The API root, e.g. `http://localhost:8000/v1` (`/v1` is added when missing).
    pub base_url: String,
    /// The model name to request; default: the first model the server lists at `/v1/models`.
    #[serde(default)]
    pub model: Option<String>,
    /// The environment variable that holds the API key (the key itself is never a flag, a recipe
    /// value, or written anywhere).
    #[serde(default = "default_api_key_env")]
    pub api_key_env: String,
    /// Seconds one request may take, answer included.
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    /// Retries of a request after a 429, a 5xx, a timeout or a dropped connection.
    #[serde(default = "default_request_retries")]
    pub request_retries: u32,
}

fn default_api_key_env() -> String {
    "OPENAI_API_KEY".into()
}

fn default_request_timeout() -> f64 {
    600.0
}

fn default_request_retries() -> u32 {
    8
}

/// The server flags of a command that generates (`synth`; `eval` has one set for the answers
/// and one for the judge).
#[derive(clap::Args, Debug, Clone)]
pub struct ServerFlags {
    /// Generate on this OpenAI-compatible server (vLLM, SGLang, llama.cpp's server), e.g.
    /// `http://localhost:8000/v1` (for synth, it implies `--engine openai`). `--model` then names
    /// the local tokenizer and chat template (a GGUF or a Hugging Face folder) of the model it
    /// serves.
    #[arg(long)]
    pub base_url: Option<String>,

    /// The model name to request from the server (default: the first at `/v1/models`).
    #[arg(long, requires = "base_url")]
    pub server_model: Option<String>,

    /// The environment variable holding the server's API key, sent as a bearer token.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,

    /// Seconds a request may take before it is retried.
    #[arg(long, default_value_t = 600.0, value_parser = crate::flags::positive)]
    pub request_timeout: f64,

    /// Retries of a request after a 429, a 5xx, a timeout or a dropped connection (exponential
    /// backoff with jitter); then the run stops, keeping every finished chunk.
    #[arg(long, default_value_t = 8)]
    pub request_retries: u32,
}

impl ServerFlags {
    /// The server to generate on, when `--base-url` is given.
    pub fn options(&self) -> Option<ServerOptions> {
        self.server(self.base_url.as_deref(), self.server_model.as_deref())
    }

    /// Another server (eval's judge) with these flags' key, timeout and retries.
    pub fn server(&self, base_url: Option<&str>, model: Option<&str>) -> Option<ServerOptions> {
        base_url.map(|base_url| ServerOptions {
            base_url: base_url.to_string(),
            model: model.map(str::to_string),
            api_key_env: self.api_key_env.clone(),
            request_timeout: self.request_timeout,
            request_retries: self.request_retries,
        })
    }
}

/// The local tokenizer of the served model.
enum Tokenizer {
    Gguf(Vocabulary),
    HuggingFace(tokenizers::Tokenizer),
}

impl Tokenizer {
    fn load(model: &Path) -> Result<Self> {
        if model.is_file() {
            return Ok(Tokenizer::Gguf(Vocabulary::load(model)?));
        }
        let file = model.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", file.display()))?;
        Ok(Tokenizer::HuggingFace(tokenizer))
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Gguf(vocabulary) => Ok(vocabulary.tokenize(text)),
            Tokenizer::HuggingFace(tokenizer) => {
                Ok(tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec())
            }
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Gguf(vocabulary) => Ok(vocabulary.detokenize(ids)),
            Tokenizer::HuggingFace(tokenizer) => tokenizer.decode(ids, false).map_err(|e| anyhow!("tokenizer: {e}")),
        }
    }
}

/// How prompts are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromptForm {
    TokenIds,
    /// The server refused token ids: detokenised text, `add_special_tokens: false`.
    Text,
}

pub struct OpenAi {
    client: Client,
    runtime: tokio::runtime::Runtime,
    tokenizer: Tokenizer,
    model: String,
    form: PromptForm,
    /// The value that means "all tokens" to this server.
    top_k: i32,
    max_in_flight: usize,
    widest_batch: usize,
}

impl OpenAi {
    /// Loads the local tokenizer of `model`, asks the server for its models and checks with a
    /// one-token completion that it takes token-id prompts (else falls back to text, saying so).
    pub fn connect(model: &Path, server: &ServerOptions, max_in_flight: usize) -> Result<Self> {
        let tokenizer = Tokenizer::load(model)?;
        let key = std::env::var(&server.api_key_env).ok().filter(|k| !k.is_empty());
        let timeout = Duration::from_secs_f64(server.request_timeout);
        let client = Client::new(&server.base_url, key, server.request_retries, timeout)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
        let listed = runtime.block_on(client.get("/models"))?;
        let ids: Vec<String> = listed["data"].as_array().into_iter().flatten().filter_map(|m| m["id"].as_str().map(str::to_string)).collect();
        let model_name = match &server.model {
            Some(name) if ids.contains(name) => name.clone(),
            Some(name) => bail!("{}/models lists {ids:?}; the model `{name}` (--server-model) is not one of them", client.base),
            None => ids.first().cloned().with_context(|| format!("{}/models lists no model; name one with --server-model", client.base))?,
        };
        let mut engine = OpenAi { client, runtime, tokenizer, model: model_name, form: PromptForm::TokenIds, top_k: -1, max_in_flight: max_in_flight.max(1), widest_batch: 0 };
        engine.probe()?;
        Ok(engine)
    }

    /// The model name requested.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether prompts go as token ids (else as text, the server tokenising them).
    pub fn takes_token_ids(&self) -> bool {
        self.form == PromptForm::TokenIds
    }

    /// One-token greedy completions that settle how to talk to this server. Servers refuse in
    /// different ways (llama-cpp-python answers 500 to a request it cannot validate), so each
    /// alternative is tried twice, whatever the failure:
    /// - "all tokens" for top-k: -1 for vLLM, SGLang and llama.cpp's server, else 0
    ///   (llama-cpp-python), with a text prompt;
    /// - then token-id prompts; when the server answers text but not token ids, prompts go as
    ///   text, and the log says so.
    fn probe(&mut self) -> Result<()> {
        let prompt = self.tokenizer.encode("Hello")?;
        let greedy_token = super::Sampling { temperature: 0.0, top_p: 1.0, max_tokens: 1, seed: 0, stop_strings: vec![], stop_token_ids: vec![], json: None };
        let probe = |engine: &Self, retries| {
            let body = engine.body(&prompt, &greedy_token)?;
            engine.runtime.block_on(engine.client.post_with_retries("/completions", &body, retries))
        };
        self.form = PromptForm::Text;
        if let Err(first) = probe(self, 1) {
            self.top_k = 0;
            probe(self, self.client.retries).with_context(|| format!("top_k -1 was refused too: {}", first_line(&first)))?;
        }
        self.form = PromptForm::TokenIds;
        if let Err(refused) = probe(self, 1) {
            self.form = PromptForm::Text;
            eprintln!(
                "magpie: {} does not take token-id prompts ({}); sending text prompts with add_special_tokens: false, so the server tokenises them",
                self.client.base,
                first_line(&refused)
            );
        }
        Ok(())
    }

    /// The `/v1/completions` request for one prompt.
    fn body(&self, prompt: &[u32], sampling: &super::Sampling) -> Result<Value> {
        let mut body = json!({
            "model": self.model,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            // 31 bits: llama.cpp takes a uint32, and every server an int.
            "seed": sampling.seed & 0x7fff_ffff,
            "n": 1,
            "stream": false,
            // Off, as the in-process samplers have them: vLLM and SGLang names, then llama.cpp's.
            "top_k": self.top_k,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "repeat_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
        });
        if !sampling.stop_strings.is_empty() {
            body["stop"] = json!(sampling.stop_strings);
        }
        if !sampling.stop_token_ids.is_empty() {
            body["stop_token_ids"] = json!(sampling.stop_token_ids);
        }
        if let Some(answer) = &sampling.json {
            // The schema for vLLM and SGLang; llama.cpp's server reads `response_format` only on
            // chat completions, and takes the grammar instead.
            body["response_format"] = answer.response_format();
            body["grammar"] = json!(answer.grammar());
        }
        match self.form {
            PromptForm::TokenIds => body["prompt"] = json!(prompt),
            PromptForm::Text => {
                body["prompt"] = json!(self.tokenizer.decode(prompt)?);
                body["add_special_tokens"] = json!(false);
            }
        }
        Ok(body)
    }
}

/// An error's message on one line, at most 300 characters (a server's message can carry a
/// traceback); the server's own message when it refused.
fn first_line(error: &anyhow::Error) -> String {
    let text = match error.downcast_ref::<Refusal>() {
        Some(refusal) => refusal.message.clone(),
        None => format!("{error:#}"),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(300).collect()
}

/// Our completion from the server's answer: the first choice's text and finish reason, the
/// token counts from `usage`.
fn completion(answer: &Value, prompt_len: usize, url: &str) -> Result<Completion> {
    let choice = &answer["choices"][0];
    let text = choice["text"].as_str().with_context(|| format!("{url}: the answer has no choices[0].text: {answer}"))?.to_string();
    let finish_reason = match choice["finish_reason"].as_str() {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let usage = &answer["usage"];
    Ok(Completion {
        prompt_tokens: usage["prompt_tokens"].as_u64().map_or(prompt_len, |n| n as usize),
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0) as usize,
        text,
        finish_reason,
    })
}

impl Engine for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text)
    }

    fn widest_batch(&self) -> usize {
        self.widest_batch
    }

    fn generate(&mut self, requests: &[Request], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>> {
        let bodies = requests.iter().map(|r| self.body(&r.prompt, &r.sampling)).collect::<Result<Vec<_>>>()?;
        let in_flight = self.max_in_flight.min(requests.len()).max(1);
        let url = format!("{}/completions", self.client.base);
        let client = &self.client;
        let answers = self.runtime.block_on(async {
            let mut pending = futures::stream::iter(bodies.iter().enumerate())
                .map(|(i, body)| async move { (i, client.post("/completions", body).await) })
                .buffer_unordered(in_flight);
            let mut answers: Vec<Option<Completion>> = vec![None; requests.len()];
            while let Some((i, answer)) = pending.next().await {
                let completion = completion(&answer?, requests[i].prompt.len(), &url)?;
                on_tokens(completion.completion_tokens);
                answers[i] = Some(completion);
            }
            anyhow::Ok(answers)
        })?;
        self.widest_batch = in_flight;
        Ok(answers.into_iter().map(|c| c.expect("every request answered")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_takes_its_text_finish_reason_and_counts_from_the_answer() {
        let answer = json!({"choices": [{"text": "Hi", "finish_reason": "length"}], "usage": {"prompt_tokens": 7, "completion_tokens": 3}});
        let c = completion(&answer, 99, "u").unwrap();
        assert_eq!((c.text.as_str(), c.finish_reason, c.prompt_tokens, c.completion_tokens), ("Hi", FinishReason::Length, 7, 3));
        let bare = json!({"choices": [{"text": "", "finish_reason": "stop"}]});
        assert_eq!(completion(&bare, 5, "u").unwrap().prompt_tokens, 5);
        let error = completion(&json!({"object": "error"}), 5, "http://x/v1/completions").unwrap_err().to_string();
        assert!(error.contains("http://x/v1/completions: the answer has no choices[0].text"), "{error}");
    }
}
