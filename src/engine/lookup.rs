//! Finding the model to generate with, and what a stage needs to know about it before an engine
//! loads it: its chat template and special tokens (from GGUF metadata or the Hugging Face
//! tokenizer_config.json) and a name for the `model` column. Missing or corrupt files fail here
//! with the path in the message. A LoRA adapter folder stands for its base with the adapter
//! merged (`model::merge::for_inference`).

use crate::model::chat_template::{special_token, ChatTemplate};
use crate::model::gguf;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct ModelInfo {
    /// Absolute path of the GGUF file or safetensors directory.
    pub path: PathBuf,
    /// For the `model` column: the GGUF's `general.name`, or the directory name.
    pub name: String,
    pub chat_template: Option<ChatTemplate>,
}

impl ModelInfo {
    /// The model's own chat template, else that of `family` (a `--template` family name, or a
    /// step's `template`) when one is named and known; `command` says so in the log.
    pub fn or_family_template(mut self, family: Option<&str>, command: &str) -> Result<Self> {
        if self.chat_template.is_none()
            && let Some(name) = family
            && let Some(template) = crate::model::families::chat_template(name)
        {
            eprintln!("magpie {command}: {} ships no chat template; using the {name} family's", self.path.display());
            self.chat_template = Some(template?.from_model(&self.path));
        }
        Ok(self)
    }
}

/// Resolves `--model` (or the embedded default) and reads its metadata.
pub fn resolve(model: Option<&Path>) -> Result<ModelInfo> {
    let path = match model {
        Some(p) => p.to_path_buf(),
        None => {
            let default = crate::home::default_model();
            if !default.exists() {
                bail!(
                    "{}: the embedded default model is missing; run scripts/setup.sh (or set MAGPIE_HOME), or pass --model",
                    default.display()
                );
            }
            default
        }
    };
    let path = std::fs::canonicalize(&path).with_context(|| format!("{}: model not found", path.display()))?;
    if !path.is_dir() {
        return read_gguf(path);
    }
    // A PEFT adapter folder generates as its base with the adapter merged (made once, cached).
    let merged = crate::model::merge::for_inference(&path)?;
    let mut info = read_hf_dir(merged)?;
    info.name = stem(&path);
    Ok(info)
}

fn read_gguf(path: PathBuf) -> Result<ModelInfo> {
    let metadata = gguf::Metadata::read(&path)?;
    let name = metadata.text("general.name").map(str::to_string).unwrap_or_else(|| stem(&path));
    let chat_template = match metadata.text("tokenizer.chat_template") {
        Some(source) => Some(
            ChatTemplate::new(
                source,
                metadata.token_text("tokenizer.ggml.bos_token_id").unwrap_or_default(),
                metadata.token_text("tokenizer.ggml.eos_token_id").unwrap_or_default(),
            )
            .with_context(|| format!("{}: tokenizer.chat_template", path.display()))?
            .from_model(&path),
        ),
        None => None,
    };
    Ok(ModelInfo { path, name, chat_template })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

fn read_hf_dir(path: PathBuf) -> Result<ModelInfo> {
    for required in ["config.json", "tokenizer.json"] {
        if !path.join(required).is_file() {
            bail!("{}: not a Hugging Face model directory ({required} is missing)", path.display());
        }
    }
    read_json(&path.join("config.json"))?;
    let config_path = path.join("tokenizer_config.json");
    let config = if config_path.is_file() { read_json(&config_path)? } else { Value::Null };
    let jinja = path.join("chat_template.jinja");
    let source = if jinja.is_file() {
        Some(std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?)
    } else {
        config["chat_template"].as_str().map(str::to_string)
    };
    let chat_template = source
        .map(|s| {
            ChatTemplate::new(&s, &special_token(&config, "bos_token").unwrap_or_default(), &special_token(&config, "eos_token").unwrap_or_default())
                .map(|t| t.from_model(&path))
        })
        .transpose()
        .with_context(|| format!("{}: chat template", path.display()))?;
    Ok(ModelInfo { name: stem(&path), path, chat_template })
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap_or_default().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::test_model;

    #[test]
    fn smollm2_auto_template_is_derived_from_its_gguf() {
        let info = resolve(Some(&test_model())).unwrap();
        assert_eq!(info.name, "Smollm2 135M 8k Lc100K Mix1 Ep2");
        let derived = crate::model::pre_query::resolve("auto", info.chat_template.as_ref(), None).unwrap();
        assert_eq!(
            derived.pre_query,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
        );
    }

    #[test]
    fn missing_and_corrupt_models_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.gguf");
        let error = format!("{:#}", resolve(Some(&missing)).unwrap_err());
        assert!(error.contains("absent.gguf: model not found"), "{error}");
        let corrupt = dir.path().join("corrupt.gguf");
        let bytes = std::fs::read(test_model()).unwrap();
        std::fs::write(&corrupt, &bytes[..1000]).unwrap();
        let error = format!("{:#}", resolve(Some(&corrupt)).unwrap_err());
        assert!(error.contains("corrupt.gguf: not a readable GGUF file"), "{error}");
        let not_hf = dir.path().join("empty-dir");
        std::fs::create_dir(&not_hf).unwrap();
        let error = format!("{:#}", resolve(Some(&not_hf)).unwrap_err());
        assert!(error.contains("not a Hugging Face model directory (config.json is missing)"), "{error}");
    }
}
