//! `magpie convert`: a llama-architecture GGUF into a Hugging Face safetensors directory, so the
//! embedded SmolLM2 (or any llama.cpp model) becomes a trainable base.
//!
//! Weights are dequantised to f32 and llama.cpp's Q/K row permutation is undone. `config.json`,
//! `tokenizer.json` (byte-level BPE from the GGUF vocabulary and merges), `tokenizer_config.json`
//! with the chat template, and `generation_config.json` are built from the GGUF metadata.
//! SentencePiece (`tokenizer.ggml.model = llama`) vocabularies and Llama-3.1 rope-factor tensors are
//! refused rather than converted approximately.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

use crate::model::gguf;

#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub run: crate::flags::OutputFlags,

    /// GGUF file to convert (llama architecture). Defaults to the embedded SmolLM2.
    #[arg(long)]
    pub gguf: Option<PathBuf>,

    /// Output Hugging Face model directory: new or empty, or an earlier `magpie convert`
    /// output with --overwrite.
    #[arg(long, short)]
    pub output: PathBuf,

    /// Make a judge reward model instead (LlamaForSequenceClassification): a chat template that
    /// asks whether the answer is helpful and correct, and a score head equal to the embedding
    /// rows of "Yes" minus "No", so the score is the model's logit(Yes) - logit(No).
    #[arg(long)]
    pub judge_reward_head: bool,
}

/// The judge reward model's chat template: one user turn holding the question and answer, then
/// the assistant header, where the next token would be the verdict.
const JUDGE_TEMPLATE: &str = "{% set q = messages | selectattr('role', 'equalto', 'user') | list %}{% set a = messages | selectattr('role', 'equalto', 'assistant') | list %}<|im_start|>user\nHere is a question and an answer.\n\nQuestion: {{ q[-1]['content'] if q else '' }}\n\nAnswer: {{ a[-1]['content'] if a else '' }}\n\nIs the answer helpful, correct and on topic? Reply Yes or No.<|im_end|>\n{{ '<|im_start|>assistant\\n' }}";

pub fn run(args: &ConvertArgs) -> Result<()> {
    let gguf = match &args.gguf {
        Some(path) => path.clone(),
        None => crate::home::default_model(),
    };
    crate::run::check(&args.output, std::slice::from_ref(&gguf), &crate::run::Rules { overwrite: args.run.overwrite, resumable: None })?;
    convert(&gguf, &args.output, args.judge_reward_head)?;
    eprintln!("magpie convert: {} -> {}", gguf.display(), args.output.display());
    Ok(())
}

/// Turns a converted causal LM directory into the judge reward model `--judge-reward-head`
/// describes. Needs "Yes" and "No" to be single tokens.
pub fn add_judge_reward_head(dir: &Path) -> Result<()> {
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let token = |word: &str| -> Result<i64> {
        let ids = tokenizer.encode(word, false).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
        match ids[..] {
            [id] => Ok(id as i64),
            _ => bail!("{}: \"{word}\" is not a single token, so no Yes/No reward head can be built", dir.display()),
        }
    };
    let (yes, no) = (token("Yes")?, token("No")?);
    let file = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&file).with_context(|| format!("{}: unreadable", file.display()))?;
    let rows = {
        let head = tensors.iter().find(|(n, _)| n == "lm_head.weight").or_else(|| tensors.iter().find(|(n, _)| n == "model.embed_tokens.weight"));
        let (_, head) = head.with_context(|| format!("{}: no output head", file.display()))?;
        (head.get(yes) - head.get(no)).unsqueeze(0)
    };
    tensors.retain(|(n, _)| n != "lm_head.weight");
    tensors.push(("score.weight".to_string(), rows));
    super::hf::write_safetensors(&tensors, &file)?;
    let config_file = dir.join("config.json");
    let mut config = read_json(&config_file)?;
    config["architectures"] = json!(["LlamaForSequenceClassification"]);
    config["num_labels"] = json!(1);
    config["tie_word_embeddings"] = json!(false);
    write_json(&config_file, &config)?;
    let tokenizer_file = dir.join("tokenizer_config.json");
    let mut tokenizer_config = read_json(&tokenizer_file)?;
    tokenizer_config["chat_template"] = json!(JUDGE_TEMPLATE);
    write_json(&tokenizer_file, &tokenizer_config)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?).with_context(|| format!("{}: cannot write", path.display()))
}

/// The architecture numbers llama.cpp stores under `llama.*`.
struct Shape {
    hidden: i64,
    heads: i64,
    kv_heads: i64,
    layers: i64,
    vocab: i64,
}

/// Converts `gguf_path` into the Hugging Face directory `out` (written atomically, with a
/// manifest); with `judge_reward_head`, into the judge reward model `--judge-reward-head` describes.
pub fn convert(gguf_path: &Path, out: &Path, judge_reward_head: bool) -> Result<()> {
    if !gguf_path.is_file() {
        bail!("{}: GGUF file not found (run scripts/setup.sh for the embedded model)", gguf_path.display());
    }
    let file = gguf::File::open(gguf_path)?;
    let meta = &file.metadata;
    let name = gguf_path.display();
    let arch = meta.text("general.architecture").unwrap_or("?");
    if arch != "llama" {
        bail!("{name}: architecture `{arch}`; convert handles llama only");
    }
    if meta.tensor("rope_freqs.weight").is_some() {
        bail!("{name}: Llama-3.1 rope-factor tensors are not converted; use the original HF checkpoint");
    }
    let need = |key: &str| meta.int(key).with_context(|| format!("{name}: metadata `{key}` is missing"));
    let tokens = meta.texts("tokenizer.ggml.tokens").with_context(|| format!("{name}: no tokenizer.ggml.tokens"))?;
    let shape = Shape {
        hidden: need("llama.embedding_length")?,
        heads: need("llama.attention.head_count")?,
        kv_heads: meta.int("llama.attention.head_count_kv").unwrap_or(need("llama.attention.head_count")?),
        layers: need("llama.block_count")?,
        vocab: tokens.len() as i64,
    };
    let tied = meta.tensor("output.weight").is_none();

    let provenance = crate::run::Provenance::new("convert", json!({ "gguf": gguf_path, "judge_reward_head": judge_reward_head }));
    crate::run::write_dir(out, "model", &provenance, |tmp| {
        write_hf_dir(&file, &shape, tied, tmp)?;
        if judge_reward_head { add_judge_reward_head(tmp) } else { Ok(()) }
    })
}

/// Writes the converted weights, config and tokenizer files into `tmp`.
fn write_hf_dir(file: &gguf::File, shape: &Shape, tied: bool, tmp: &Path) -> Result<()> {
    let meta = &file.metadata;
    let name = file.path.display();
    let need = |key: &str| meta.int(key).with_context(|| format!("{name}: metadata `{key}` is missing"));
    let tokens = meta.texts("tokenizer.ggml.tokens").unwrap_or_default();
    let tensors = weights(file, shape, tied)?;
    super::hf::write_safetensors(&tensors, &tmp.join("model.safetensors"))?;
    drop(tensors);

    let bos = meta.int("tokenizer.ggml.bos_token_id");
    let eos = meta.int("tokenizer.ggml.eos_token_id");
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "intermediate_size": need("llama.feed_forward_length")?,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden / shape.heads,
        "max_position_embeddings": meta.int("llama.context_length").unwrap_or(2048),
        "rms_norm_eps": meta.float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        "rope_theta": meta.float("llama.rope.freq_base").unwrap_or(10000.0),
        "vocab_size": shape.vocab,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": meta.int("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    });
    let write_json = |file: &str, value: &Value| -> Result<()> {
        std::fs::write(tmp.join(file), serde_json::to_string_pretty(value)?).with_context(|| format!("{}: cannot write", tmp.join(file).display()))
    };
    write_json("config.json", &config)?;
    write_json("tokenizer.json", &tokenizer_json(meta, &name.to_string())?)?;
    let token = |id: Option<i64>| id.and_then(|i| tokens.get(i as usize)).map(|t| t.to_string());
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(bos),
        "eos_token": token(eos),
        "pad_token": token(meta.int("tokenizer.ggml.padding_token_id")),
        "unk_token": token(meta.int("tokenizer.ggml.unknown_token_id")),
        "add_bos_token": meta.values.get("tokenizer.ggml.add_bos_token") == Some(&gguf::Value::Bool(true)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": false,
    });
    if let Some(template) = meta.text("tokenizer.chat_template") {
        tokenizer_config["chat_template"] = json!(template);
    }
    write_json("tokenizer_config.json", &tokenizer_config)?;
    write_json("generation_config.json", &json!({"bos_token_id": bos, "eos_token_id": eos}))
}

/// GGUF tensor name -> HF name, and how many heads to un-permute by (q and k only).
fn hf_name(gguf_name: &str, shape: &Shape) -> Option<(String, Option<i64>)> {
    let plain = |s: &str| Some((s.to_string(), None));
    match gguf_name {
        "token_embd.weight" => return plain("model.embed_tokens.weight"),
        "output_norm.weight" => return plain("model.norm.weight"),
        "output.weight" => return plain("lm_head.weight"),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let prefix = format!("model.layers.{layer}");
    let (hf, heads) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(shape.heads)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(shape.kv_heads)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("{prefix}.{hf}"), heads))
}

/// Undoes llama.cpp's `permute(w, n_head)`, which interleaves the two rotary halves of each head.
fn unpermute(w: Tensor, heads: i64) -> Tensor {
    let shape = w.size();
    let rows_per_half = shape[0] / heads / 2;
    w.reshape([heads, rows_per_half, 2, shape[1]]).transpose(1, 2).reshape(shape.as_slice())
}

fn weights(file: &gguf::File, shape: &Shape, tied: bool) -> Result<Vec<(String, Tensor)>> {
    let mut out = vec![];
    for info in &file.metadata.tensors {
        let Some((name, heads)) = hf_name(&info.name, shape) else {
            bail!("{}: tensor `{}` has no Hugging Face Llama counterpart", file.path.display(), info.name);
        };
        let values = file.read_f32(info)?;
        let mut tensor = Tensor::from_slice(&values).reshape(info.shape().as_slice()).to_kind(Kind::Float);
        if let Some(heads) = heads {
            tensor = unpermute(tensor, heads);
        }
        out.push((name, tensor));
    }
    let expected = 3 + 9 * shape.layers as usize - usize::from(tied);
    if out.len() != expected {
        bail!("{}: found {} tensors, a {}-layer llama has {expected}", file.path.display(), out.len(), shape.layers);
    }
    Ok(out)
}

/// The pre-tokenizer each llama.cpp `tokenizer.ggml.pre` stands for.
fn pre_tokenizer(pre: &str) -> Option<Value> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    Some(match pre {
        "gpt2" | "default" => byte_level(true),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
             "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        _ => return None,
    })
}

/// A `tokenizer.json` for a byte-level BPE vocabulary (`tokenizer.ggml.model = gpt2`).
fn tokenizer_json(meta: &gguf::Metadata, name: &str) -> Result<Value> {
    let model = meta.text("tokenizer.ggml.model").unwrap_or("?");
    if model != "gpt2" {
        bail!("{name}: tokenizer model `{model}`; convert builds byte-level BPE (gpt2) tokenizers only");
    }
    let pre = meta.text("tokenizer.ggml.pre").unwrap_or("default");
    let Some(pre_tokenizer) = pre_tokenizer(pre) else {
        bail!("{name}: pre-tokenizer `{pre}` is not known to convert (gpt2, default, smollm, llama-bpe are)");
    };
    let tokens = meta.texts("tokenizer.ggml.tokens").unwrap_or_default();
    let merges = meta.texts("tokenizer.ggml.merges").with_context(|| format!("{name}: no tokenizer.ggml.merges"))?;
    let types = meta.ints("tokenizer.ggml.token_type").unwrap_or_default();
    let vocab: serde_json::Map<String, Value> = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    // llama.cpp token types: 3 control (special), 4 user-defined (added, not special).
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == 3 || **t == 4)
        .map(|(i, t)| json!({"id": i, "content": tokens[i], "single_word": false, "lstrip": false, "rstrip": false,
                             "normalized": *t == 4, "special": *t == 3}))
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{fixture, max_abs_diff, reference};
    use crate::model::{llama, load_causal_lm, AttentionMask, Inputs};
    use crate::engine::{llamacpp::LlamaCpp, Engine, EngineChoice, EngineOptions};
    use tch::Device;

    fn converted_smollm2() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("smollm2");
        convert(&crate::test_support::test_model(), &out, false).unwrap();
        (dir, out)
    }

    fn llama_cpp() -> LlamaCpp {
        LlamaCpp::load(&crate::test_support::test_model(), &EngineOptions { choice: EngineChoice::Llamacpp, batch_size: 1, threads: 2, kv_tokens: 4096, gpu_memory_utilization: 0.9, cuda: false, server: None }).unwrap()
    }

    fn last_logits(dir: &Path, ids: &Tensor) -> Tensor {
        last_logits_of(&load_causal_lm(dir, Device::Cpu, Kind::Float).unwrap(), ids)
    }

    fn last_logits_of(loaded: &crate::model::Loaded, ids: &Tensor) -> Tensor {
        let positions = llama::default_positions(1, ids.size()[1], Device::Cpu);
        let logits = tch::no_grad(|| loaded.model.forward(&Inputs { ids, positions: &positions, mask: &AttentionMask::Causal }));
        logits.get(0)
    }

    #[test]
    fn converted_smollm2_matches_transformers_gguf_loading() {
        let (_tmp, out) = converted_smollm2();
        let want = reference(&fixture("smollm2-logits.json"));
        let logits = last_logits(&out, &want["input_ids"]);
        assert!(max_abs_diff(&logits.narrow(1, 0, 1024), &want["logits_head"]) <= 1e-4);
        assert!(max_abs_diff(&logits.get(-1), &want["logits_last"]) <= 1e-4);
    }

    #[test]
    fn converted_tokenizer_and_template_agree_with_llama_cpp() {
        let (_tmp, out) = converted_smollm2();
        let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let texts = ["<|im_start|>user\nHello, world! 12345 naïve café<|im_end|>\n", "  indented\tcode() {}\n\nx = 3.14159"];
        let engine = llama_cpp();
        for text in texts {
            let got = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(got, engine.tokenize(text).unwrap(), "{text:?}");
        }
        let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
        assert!(config["chat_template"].as_str().unwrap().contains("<|im_start|>"));
        assert_eq!(config["eos_token"], "<|im_end|>");
    }

    #[test]
    fn converted_logits_agree_with_llama_cpp_up_to_quantisation_noise() {
        let (_tmp, out) = converted_smollm2();
        let prompt = "<|im_start|>user\nName three primary colours.<|im_end|>\n<|im_start|>assistant\n";
        let (ids, want) = llama_cpp().last_logits(prompt);
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let got = last_logits(&out, &Tensor::from_slice(&ids).view([1, -1])).get(-1);
        let want = Tensor::from_slice(&want);
        assert_eq!(got.argmax(0, false).int64_value(&[]), want.argmax(0, false).int64_value(&[]));
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1.5, "max abs diff {diff} is more than quantisation noise");
    }

    #[test]
    fn the_judge_reward_head_scores_logit_yes_minus_logit_no() {
        let (_tmp, out) = converted_smollm2();
        let causal = load_causal_lm(&out, Device::Cpu, Kind::Float).unwrap();
        let judge = out.with_file_name("judge");
        convert(&crate::test_support::test_model(), &judge, true).unwrap();
        let rm = crate::model::reward::RewardModel::load(&judge, 512, 2, Device::Cpu).unwrap();
        let conversation = vec![crate::data::Message::new("user", "What is 2 + 2?"), crate::data::Message::new("assistant", "4")];
        let score = rm.score(std::slice::from_ref(&conversation)).unwrap()[0];
        let tok = crate::model::tokenize::ChatTokenizer::load(&judge).unwrap();
        let text = tok.template.render(&conversation, false).unwrap();
        assert!(text.contains("Question: What is 2 + 2?") && text.ends_with("<|im_start|>assistant\n"), "{text}");
        let ids: Vec<i64> = tok.tokenizer.encode(text, false).unwrap().get_ids().iter().map(|&i| i as i64).collect();
        let logits = last_logits_of(&causal, &Tensor::from_slice(&ids).view([1, -1])).get(-1);
        let want = logits.double_value(&[10539]) - logits.double_value(&[5230]);
        assert!((score - want).abs() < 1e-3, "{score} vs logit(Yes) - logit(No) = {want}");
    }

    #[test]
    fn missing_and_foreign_files_are_refused_without_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let err = convert(Path::new("/nonexistent.gguf"), &out, false).unwrap_err();
        assert!(err.to_string().contains("/nonexistent.gguf: GGUF file not found"), "{err}");
        let bad = dir.path().join("bad.gguf");
        std::fs::write(&bad, b"GGUF\x03\x00\x00\x00").unwrap();
        assert!(format!("{:#}", convert(&bad, &out, false).unwrap_err()).contains("bad.gguf"));
        assert!(!out.exists());
    }
}
