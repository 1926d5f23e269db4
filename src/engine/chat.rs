//! A chat model on a generation engine: a model file or folder, its chat template and greedy
//! sampling, answering conversations in one batch. The filter's judge and safety tags and
//! `magpie eval`'s answers and judge use it.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;

use super::json_answer::JsonAnswer;
use super::lookup as model;
use super::openai::ServerOptions;
use super::{Engine, EngineChoice, EngineOptions, Request, Sampling};
use crate::data::Message;
use crate::model::chat_template::ChatTemplate;
use crate::model::pre_query as template;

/// A model loaded in a generation engine, with its chat template and greedy sampling.
pub struct ChatModel {
    pub engine: Box<dyn Engine>,
    pub chat: ChatTemplate,
    pub sampling: Sampling,
    pub name: String,
}

impl ChatModel {
    /// Loads `model` (default: the embedded SmolLM2) for greedy answers of at most `max_tokens`;
    /// with a `server`, only its tokenizer and chat template, and the answers come from the server.
    /// A model that ships no chat template takes that of `family` (see `families`).
    pub fn load(model: Option<PathBuf>, family: Option<&str>, max_tokens: usize, batch_size: usize, server: Option<ServerOptions>) -> Result<Self> {
        let info = model::resolve(model.as_deref())?.or_family_template(family, "chat")?;
        let chat = info.chat_template.with_context(|| {
            format!("{}: the model ships no chat template; name its family (eval's --template or --judge-template, a filter step's `template`: llama3, qwen2.5, gemma, ...)", info.path.display())
        })?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let options = EngineOptions::new(EngineChoice::Auto, batch_size, threads, 65536, super::DEFAULT_GPU_MEMORY_UTILIZATION).with_server(server);
        let engine = super::open(&info.path, &options)?;
        let stops = template::derive(&chat, None)?.stops;
        let sampling = Sampling { temperature: 0.0, top_p: 1.0, max_tokens, seed: 0, stop_strings: stops, stop_token_ids: vec![], json: None };
        Ok(ChatModel { engine, chat, sampling, name: info.name })
    }

    /// Greedy answers to `conversations`, each rendered with a generation prompt and then
    /// `prefill`; the answers exclude the prefill.
    pub fn answer(&mut self, conversations: &[Vec<Message>], prefill: &str) -> Result<Vec<String>> {
        let sampling = self.sampling.clone();
        self.complete(conversations, prefill, sampling)
    }

    /// Greedy answers to `conversations`, each constrained to be the JSON object `answer`.
    pub fn answer_json(&mut self, conversations: &[Vec<Message>], answer: &Arc<JsonAnswer>) -> Result<Vec<String>> {
        let sampling = Sampling { json: Some(answer.clone()), ..self.sampling.clone() };
        self.complete(conversations, "", sampling)
    }

    fn complete(&mut self, conversations: &[Vec<Message>], prefill: &str, sampling: Sampling) -> Result<Vec<String>> {
        let mut requests = vec![];
        for messages in conversations {
            let prompt = self.chat.render(messages, true)? + prefill;
            requests.push(Request { prompt: self.engine.tokenize(&prompt)?, sampling: sampling.clone() });
        }
        Ok(self.engine.generate(&requests, &mut |_| {})?.into_iter().map(|c| c.text).collect())
    }
}
