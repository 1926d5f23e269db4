//! Hugging Face chat templates rendered with minijinja, with the semantics of transformers'
//! `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, `raise_exception`, `strftime_now`,
//! Python string methods (`.strip()`, `.startswith()`, ...), and `bos_token` / `eos_token` in scope.
//! Shared by `synth` (prompts, pre-query derivation) and `train` (tokenising conversations).

use crate::data::Message;
use anyhow::{Context, Result};
use minijinja::{context, Environment, Error, ErrorKind};

/// How many steps one render may take (minijinja's fuel). A chat template renders a long
/// conversation in thousands; a template that loops for ever (nested `range(10000)` loops) stops
/// here with an error instead of hanging synth or training.
const RENDER_FUEL: u64 = 5_000_000;

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// Where the template came from (the model file or folder), for errors.
    origin: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

fn raise_exception(message: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    // Templates use it for "Today Date" lines; a fixed clock keeps prompts reproducible.
    let _ = format;
    "26 Jul 2024".to_string()
}

impl ChatTemplate {
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string()).context("chat template does not compile")?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token: bos_token.to_string(), eos_token: eos_token.to_string(), origin: "the model".into() })
    }

    /// Names the model file or folder the template came from in render errors.
    pub fn from_model(mut self, origin: &std::path::Path) -> Self {
        self.origin = origin.display().to_string();
        self
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// starts.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::OutOfFuel => anyhow::anyhow!(
                    "{}: the chat template took more than {RENDER_FUEL} steps to render one conversation (it loops too long); fix or replace the template",
                    self.origin
                ),
                _ => anyhow::Error::new(e).context(format!("{}: chat template failed to render", self.origin)),
            })
    }
}

/// A special token in tokenizer_config.json: a string, or `{"content": ...}`.
pub fn special_token(config: &serde_json::Value, key: &str) -> Option<String> {
    match &config[key] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_apply_chat_template() {
        // Llama-3-Instruct's template: bos, trim filter, header tokens.
        let source = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
        let template = ChatTemplate::new(source, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let text = template.render(&[Message::new("user", " hi ")], true).unwrap();
        assert_eq!(
            text,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let source = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ messages[0]['content'].strip().upper() }}";
        let template = ChatTemplate::new(source, "", "").unwrap();
        assert_eq!(template.render(&[Message::new("user", "  x ")], false).unwrap(), "X");
        let error = format!("{:#}", template.render(&[Message::new("system", "s")], false).unwrap_err());
        assert!(error.contains("no system"), "{error}");
    }

    #[test]
    fn a_template_that_loops_too_long_stops_with_an_error_naming_the_model() {
        let source = "{% for i in range(10000) %}{% for j in range(10000) %}{{ i }}{% endfor %}{% endfor %}";
        let template = ChatTemplate::new(source, "", "").unwrap().from_model(std::path::Path::new("/models/evil.gguf"));
        let error = format!("{:#}", template.render(&[Message::new("user", "x")], false).unwrap_err());
        assert!(error.contains("/models/evil.gguf: the chat template took more than"), "{error}");
    }
}
