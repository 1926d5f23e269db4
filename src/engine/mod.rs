//! Generation engines behind one small trait: token-id prompts in, completions out (with finish
//! reason and token counts). Prompts are token ids that synth makes itself from the template, so
//! the pre-query prompt is exactly the template's tokens: special tokens parsed, no BOS added.
//!
//! - `chat`: a chat model on an engine, answering conversations greedily (judges, eval).
//! - `json_answer`: a JSON object an answer must be, as a JSON schema and as llama.cpp's grammar.
//! - `llamacpp`: llama.cpp through `llama-cpp-2`; continuous batching, per-request seeds. The
//!   default for GGUF files on CPU.
//! - `lookup`: which model (`--model` or the embedded default) and its chat template.
//! - `mistralrs`: mistralrs 0.8.1; the default for Hugging Face safetensors directories and CUDA.
//!   Its batched decoding is wrong on CPU (sequences come back with another prompt's answer), so
//!   on CPU it runs one sequence at a time.

pub mod chat;
pub mod json_answer;
pub mod llamacpp;
pub mod lookup;
pub mod mistralrs;
pub mod openai;

use anyhow::{bail, Result};
use json_answer::JsonAnswer;
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// How to sample one completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// Generation stops before the first occurrence of any of these (the stop text is dropped).
    pub stop_strings: Vec<String>,
    /// Generation stops at these tokens, besides the model's own end-of-generation tokens.
    pub stop_token_ids: Vec<u32>,
    /// The answer must be this JSON object (a grammar on llama.cpp, a JSON schema elsewhere).
    pub json: Option<Arc<JsonAnswer>>,
}

/// One prompt to complete.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string ended it.
    Stop,
    /// `max_tokens` ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A generation backend.
pub trait Engine {
    /// `llamacpp` or `mistralrs`.
    fn name(&self) -> &'static str;

    /// Token ids of `text` with special tokens parsed and no BOS added.
    fn tokenize(&self, text: &str) -> Result<Vec<u32>>;

    /// Completes every request; results are in request order. `on_tokens` is told how many
    /// tokens were generated as generation goes, for progress.
    fn generate(&mut self, requests: &[Request], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>>;

    /// The most sequences the last `generate` call decoded together: llama.cpp's widest decode
    /// batch, or the requests mistralrs had in flight at once. Tests use it to know which path ran.
    fn widest_batch(&self) -> usize;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineChoice {
    /// llama.cpp for GGUF files on CPU, mistralrs for safetensors directories and CUDA.
    Auto,
    Mistralrs,
    Llamacpp,
    /// An OpenAI-compatible server (`--base-url`): vLLM, SGLang, llama.cpp's server.
    Openai,
}

/// Sequences decoded together by default (`--max-num-seqs`): vLLM's 256 on a GPU; on CPU, where
/// each sequence costs compute rather than memory bandwidth, 32.
pub const DEFAULT_MAX_NUM_SEQS: usize = if cfg!(feature = "cuda") { 256 } else { 32 };

/// The share of a GPU's memory an engine fills by default (`--gpu-memory-utilization`, vLLM's 0.9).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// Engine settings from the command line.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub choice: EngineChoice,
    /// Sequences decoded together (`--max-num-seqs`; llama.cpp, and mistralrs on CUDA).
    pub batch_size: usize,
    pub threads: usize,
    /// Upper bound on KV-cache tokens across all sequences of a batch (CPU).
    pub kv_tokens: usize,
    /// On a GPU: the share of its memory the engine may fill, weights and KV cache together
    /// (vLLM's `--gpu-memory-utilization`); the KV cache gets what the weights leave.
    pub gpu_memory_utilization: f64,
    pub cuda: bool,
    /// The server of the `openai` engine.
    pub server: Option<openai::ServerOptions>,
}

impl EngineOptions {
    /// Options for this build: CUDA when it was built with the `cuda` feature and libtorch sees
    /// a GPU.
    pub fn new(choice: EngineChoice, batch_size: usize, threads: usize, kv_tokens: usize, gpu_memory_utilization: f64) -> Self {
        let cuda = cfg!(feature = "cuda") && tch::Cuda::is_available();
        EngineOptions { choice, batch_size, threads, kv_tokens, gpu_memory_utilization, cuda, server: None }
    }

    /// Generate on `server` (the `openai` engine) when one is given.
    pub fn with_server(mut self, server: Option<openai::ServerOptions>) -> Self {
        if server.is_some() {
            self.choice = EngineChoice::Openai;
        }
        self.server = server;
        self
    }
}

/// Loads `model` (a GGUF file or a safetensors directory) in the chosen engine; for the `openai`
/// engine, only its tokenizer, and connects to the server.
pub fn open(model: &Path, options: &EngineOptions) -> Result<Box<dyn Engine>> {
    match (&options.server, options.choice) {
        (Some(server), _) => return Ok(Box::new(openai::OpenAi::connect(model, server, options.batch_size)?)),
        (None, EngineChoice::Openai) => bail!("--engine openai needs --base-url, the server to generate on"),
        (None, _) => {}
    }
    let is_gguf = model.is_file();
    let choice = match options.choice {
        EngineChoice::Auto if is_gguf && !options.cuda => EngineChoice::Llamacpp,
        EngineChoice::Auto => EngineChoice::Mistralrs,
        other => other,
    };
    Ok(match choice {
        EngineChoice::Llamacpp => {
            if !is_gguf {
                bail!("{}: the llamacpp engine needs a GGUF file, not a directory", model.display());
            }
            Box::new(llamacpp::LlamaCpp::load(model, options)?)
        }
        _ => Box::new(mistralrs::MistralRs::load(model, options)?),
    })
}

/// Watches generated bytes for stop strings. Only the tail that a new piece can complete is
/// searched, so checking stays linear in the output length.
pub struct StopStrings {
    stops: Vec<Vec<u8>>,
    longest: usize,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        let stops: Vec<Vec<u8>> = stops.iter().filter(|s| !s.is_empty()).map(|s| s.as_bytes().to_vec()).collect();
        let longest = stops.iter().map(Vec::len).max().unwrap_or(0);
        StopStrings { stops, longest }
    }

    /// Where the earliest stop string starts in `text`, given that only bytes from `new_from` on
    /// are new since the last call.
    pub fn find(&self, text: &[u8], new_from: usize) -> Option<usize> {
        let start = new_from.saturating_sub(self.longest.saturating_sub(1));
        self.stops
            .iter()
            .filter_map(|stop| text[start..].windows(stop.len()).position(|w| w == stop.as_slice()).map(|p| p + start))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_are_found_across_piece_boundaries() {
        let stops = StopStrings::new(&["\n".into(), "assistant".into()]);
        let mut text = b"Write a poem assi".to_vec();
        assert_eq!(stops.find(&text, 0), None);
        let before = text.len();
        text.extend_from_slice(b"stant: no");
        assert_eq!(stops.find(&text, before), Some(13));
        assert_eq!(stops.find(b"a\nb assistant", 0), Some(1));
    }
}

/// Batch invariance, the property synth relies on: the same greedy output alone or in a batch.
#[cfg(test)]
mod batch_invariance {
    use super::*;
    use crate::test_support::test_model;

    /// Instructions SmolLM2 wrote itself; 16 prompts x 96 greedy tokens, long enough that a
    /// batch-dependent summation order shows up as a flipped token (it did in 10 of 32 such
    /// answers before the settings in `llamacpp`).
    const INSTRUCTIONS: [&str; 16] = [
        "What is the capital of France?",
        "I'm looking for a new exercise routine on fitness apps. Can you recommend any apps that offer guided maps of national parks?",
        "I'd like to contact a veterinarian about my cat's suspected rabies. Could you assist me?",
        "How many rows does the BerengariaLegacres game have?",
        "Can you explain to me the principle of the Quantum Leap 101?",
        "I'm considering a new job opportunity, but I've heard rumors of a million-pound position. What should I do?",
        "I'm considering a move to a new city and I want to make sure I have everything I need ready for my family. How do I start?",
        "I'm getting ready to travel to an alien world and I want to create a mission that will allow me to adapt to it.",
        "How does a yarn fabric hold its fibers together?",
        "I am going to make a sign that says CAT with numbers. How should I lay it out?",
        "I'm currently working on a Unicode sheet with code written in Spanish. Can you help me improve it?",
        "What can I do to become a professional trucker?",
        "Write a haiku about rain.",
        "How do I sort a list in Python?",
        "Name three prime numbers.",
        "I've been tasked with planning an event at a non-profit site with a budget of $500. Where do I start?",
    ];

    fn requests(engine: &dyn Engine) -> Vec<Request> {
        INSTRUCTIONS
            .iter()
            .map(|q| {
                let prompt = format!("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n");
                Request {
                    prompt: engine.tokenize(&prompt).unwrap(),
                    sampling: Sampling {
                        temperature: 0.0,
                        top_p: 1.0,
                        max_tokens: 96,
                        seed: 0,
                        stop_strings: vec!["<|im_end|>".into()],
                        stop_token_ids: vec![2],
                        json: None,
                    },
                }
            })
            .collect()
    }

    /// Runs the requests as one batch and one at a time; returns both outputs and the widest
    /// batch each path decoded.
    fn batched_and_alone(choice: EngineChoice) -> (Vec<Completion>, usize, Vec<Completion>, usize) {
        let options = EngineOptions { choice, batch_size: 16, threads: 2, kv_tokens: 16384, gpu_memory_utilization: 0.9, cuda: false, server: None };
        let mut engine = open(&test_model(), &options).unwrap();
        let requests = requests(engine.as_ref());
        let batched = engine.generate(&requests, &mut |_| {}).unwrap();
        let widest_batched = engine.widest_batch();
        let mut widest_alone = 0;
        let alone: Vec<Completion> = requests
            .iter()
            .map(|r| {
                let completion = engine.generate(std::slice::from_ref(r), &mut |_| {}).unwrap().remove(0);
                widest_alone = widest_alone.max(engine.widest_batch());
                completion
            })
            .collect();
        let distinct: std::collections::HashSet<_> = batched.iter().map(|c| c.text.clone()).collect();
        assert_eq!(distinct.len(), requests.len(), "prompts got each other's answers: {batched:#?}");
        (batched, widest_batched, alone, widest_alone)
    }

    /// Runs with this build's CPU kernels (the ones `magpie doctor` lists), the same flags as
    /// the binary: .cargo/config.toml applies to both.
    #[test]
    fn llamacpp_greedy_output_is_the_same_alone_or_batched() {
        let (batched, widest_batched, alone, widest_alone) = batched_and_alone(EngineChoice::Llamacpp);
        assert_eq!(widest_batched, INSTRUCTIONS.len(), "the batched run did not decode all sequences together");
        assert_eq!(widest_alone, 1);
        let kernels = llamacpp::system_info().unwrap();
        assert_eq!(batched, alone, "llama.cpp kernels: {kernels}");
    }

    /// Sequences that finish together leave slots that new prompts fill while the others keep
    /// running: the step's batch must hold both (it once admitted two long prompts first and
    /// overflowed with the running sequences' tokens). 18 prompts of 253 tokens on 16 slots of a
    /// 512-token step: in step 9 slots 0 and 1 have finished together, and the two next prompts
    /// (506 tokens) would leave no room for the 10 running sequences' tokens.
    #[test]
    fn llamacpp_refills_finished_slots_beside_running_sequences_without_overflowing_the_batch() {
        let options = EngineOptions { choice: EngineChoice::Llamacpp, batch_size: 16, threads: 2, kv_tokens: 16 * 512, gpu_memory_utilization: 0.9, cuda: false, server: None };
        let mut engine = open(&test_model(), &options).unwrap();
        let text = "The history of the river town is long, and its people tell it often. ".repeat(16);
        let requests: Vec<Request> = (0..18)
            .map(|i| {
                let mut prompt = engine.tokenize(&format!("{i}. {text}")).unwrap();
                prompt.truncate(253); // two fill a 512-token step alone, not beside running sequences
                let sampling = Sampling { temperature: 0.0, top_p: 1.0, max_tokens: 8, seed: 0, stop_strings: vec![], stop_token_ids: vec![], json: None };
                Request { prompt, sampling }
            })
            .collect();
        assert!(requests.iter().all(|r| r.prompt.len() == 253), "{}", requests[0].prompt.len());
        let completions = engine.generate(&requests, &mut |_| {}).unwrap();
        assert_eq!(completions.len(), 18);
        assert!(engine.widest_batch() > 8, "the slots were refilled while others ran: {}", engine.widest_batch());
    }

    /// mistralrs 0.8.1 batches wrongly on CPU, so its CPU engine sends one request at a time: the
    /// batched path is not exercised here (scripts/gpu-check.sh checks it on CUDA, through the
    /// binary). This pins the workaround: a batch call goes one sequence at a time and keeps
    /// every answer.
    #[test]
    fn mistralrs_on_cpu_answers_a_batch_one_sequence_at_a_time() {
        let (batched, widest_batched, alone, widest_alone) = batched_and_alone(EngineChoice::Mistralrs);
        assert_eq!((widest_batched, widest_alone), (1, 1));
        assert_eq!(batched, alone);
    }
}
