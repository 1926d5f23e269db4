//! Conversations to token ids with the model's own chat template, as TRL tokenises them:
//! `apply_chat_template` semantics (minijinja), no extra special tokens, and for each token whether
//! it belongs to an assistant turn (every turn, including its end-of-turn token).
//!
//! Assistant spans are found by rendering prefixes: the text up to turn k with a generation prompt
//! must be a prefix of the full render, and turn k's span runs from there to the end of the render
//! through turn k, less trailing whitespace. Templates that rewrite earlier turns (some "thinking"
//! templates) break that rule and are refused with a message.

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

use crate::model::chat_template::{special_token, ChatTemplate};
use crate::data::Message;

/// A model directory's tokenizer and chat template.
pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// Id used to pad batches (never a training target).
    pub pad_id: i64,
}

/// One tokenised conversation: ids and which of them are assistant tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Tokens {
    pub ids: Vec<i64>,
    pub assistant: Vec<bool>,
}

impl ChatTokenizer {
    pub fn load(dir: &Path) -> Result<Self> {
        let tokenizer_file = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tokenizer_file)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tokenizer_file.display()))?;
        let config_file = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&config_file) {
            Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}: not JSON", config_file.display()))?,
            Err(_) => serde_json::Value::Null,
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(text) => text,
            Err(_) => config["chat_template"].as_str().map(str::to_string).with_context(|| {
                format!("{}: the model has no chat template (tokenizer_config.json `chat_template` or chat_template.jinja)", dir.display())
            })?,
        };
        let bos = special_token(&config, "bos_token").unwrap_or_default();
        let eos = special_token(&config, "eos_token").unwrap_or_default();
        let pad = special_token(&config, "pad_token").unwrap_or_else(|| eos.clone());
        let pad_id = tokenizer.token_to_id(&pad).or_else(|| tokenizer.token_to_id(&eos)).unwrap_or(0) as i64;
        let template = ChatTemplate::new(&source, &bos, &eos).with_context(|| format!("{}: chat template", dir.display()))?.from_model(dir);
        Ok(ChatTokenizer { tokenizer, template, pad_id })
    }

    fn encode(&self, text: &str) -> Result<tokenizers::Encoding> {
        self.tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    /// The whole conversation, with assistant tokens marked.
    pub fn conversation(&self, messages: &[Message]) -> Result<Tokens> {
        let full = self.template.render(messages, false)?;
        let mut spans = vec![];
        for (k, message) in messages.iter().enumerate() {
            if message.role != "assistant" {
                continue;
            }
            let before = self.template.render(&messages[..k], true)?;
            let through = self.template.render(&messages[..=k], false)?;
            if !full.starts_with(&before) || !full.starts_with(&through) {
                bail!("the chat template renders earlier turns differently once later turns exist; assistant tokens cannot be located");
            }
            spans.push(before.len()..through.trim_end().len());
        }
        let encoding = self.encode(&full)?;
        let assistant = encoding.get_offsets().iter().map(|(start, _)| spans.iter().any(|s| s.contains(start))).collect();
        Ok(Tokens { ids: encoding.get_ids().iter().map(|&i| i as i64).collect(), assistant })
    }

    /// A preference example's prompt (rendered with a generation prompt) and its completion,
    /// token for token as TRL 1.16's DPOTrainer makes them for conversational data: the text
    /// the full conversation adds after the prompt, trailing newline included (`<|im_end|>\n`),
    /// tokenised without special tokens. No EOS is appended: the template's end-of-turn token
    /// ends the completion (TRL appends EOS only to plain-text completions, which magpie never
    /// builds: every preference column is a conversation).
    pub fn prompt_and_completion(&self, prompt: &[Message], completion: &[Message]) -> Result<(Vec<i64>, Vec<i64>)> {
        let prompt_text = self.template.render(prompt, true)?;
        let full: Vec<Message> = prompt.iter().chain(completion).cloned().collect();
        let full_text = self.template.render(&full, false)?;
        let Some(rest) = full_text.strip_prefix(&prompt_text) else {
            bail!("the chat template does not render the prompt as a prefix of the full conversation");
        };
        let ids = |text: &str| -> Result<Vec<i64>> { Ok(self.encode(text)?.get_ids().iter().map(|&i| i as i64).collect()) };
        Ok((ids(&prompt_text)?, ids(rest)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2_tokenizer() -> (tempfile::TempDir, ChatTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        crate::model::convert::convert(&crate::test_support::test_model(), &dir.path().join("m"), false).unwrap();
        let tokenizer = ChatTokenizer::load(&dir.path().join("m")).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn only_assistant_turns_and_their_end_of_turn_tokens_are_marked() {
        let (_dir, tok) = smollm2_tokenizer();
        let messages = vec![
            Message::new("user", "Hi there"),
            Message::new("assistant", "Hello! How can I help?"),
            Message::new("user", "Add 2 and 3."),
            Message::new("assistant", "5"),
        ];
        let tokens = tok.conversation(&messages).unwrap();
        let marked: Vec<String> = tokens
            .ids
            .iter()
            .zip(&tokens.assistant)
            .filter(|(_, a)| **a)
            .map(|(&id, _)| tok.tokenizer.id_to_token(id as u32).unwrap())
            .collect();
        let text = tok.tokenizer.decode(&tokens.ids.iter().zip(&tokens.assistant).filter(|(_, a)| **a).map(|(&i, _)| i as u32).collect::<Vec<_>>(), false).unwrap();
        assert_eq!(text, "Hello! How can I help?<|im_end|>5<|im_end|>");
        assert_eq!(marked.iter().filter(|t| *t == "<|im_end|>").count(), 2, "each turn's end-of-turn token is a target");
        // Every other token (system, user turns, role headers) is not.
        let total_im_end = tokens.ids.iter().filter(|&&i| tok.tokenizer.id_to_token(i as u32).unwrap() == "<|im_end|>").count();
        assert_eq!(total_im_end, 5, "system + 2 user + 2 assistant turns");
    }

    #[test]
    fn completion_is_what_the_conversation_adds_after_the_generation_prompt() {
        let (_dir, tok) = smollm2_tokenizer();
        let prompt = [Message::new("user", "Capital of France?")];
        let (p, c) = tok.prompt_and_completion(&prompt, &[Message::new("assistant", "Paris.")]).unwrap();
        // TRL 1.16's tokens: the rendered completion with its newline and no second EOS.
        assert_eq!(tok.tokenizer.decode(&c.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap(), "Paris.<|im_end|>\n");
        assert!(tok.tokenizer.decode(&p.iter().map(|&i| i as u32).collect::<Vec<_>>(), false).unwrap().ends_with("<|im_start|>assistant\n"));
    }
}
