//! Pre-query templates: the chat template up to where the user's text would start. Given only
//! this prefix, an aligned model writes a user instruction (docs/upstream.md §1).
//!
//! Built-in families carry Magpie's own configs (pre-query template, stop strings, multi-turn
//! user-append template). `auto` derives all three from the model's chat template by rendering
//! conversations with sentinel texts and cutting around them, so any model that ships a chat
//! template works. A raw string is used as the pre-query template as it is.

use crate::model::chat_template::ChatTemplate;
use crate::data::Message;
use anyhow::{bail, Context, Result};

/// Magpie's settings for one model family.
pub struct Family {
    pub names: &'static [&'static str],
    pub pre_query: &'static str,
    /// Stop strings for instruction generation (special tokens included), besides the word
    /// `assistant` that is always added.
    pub stops: &'static [&'static str],
    /// What follows an assistant turn's end to open the next user turn.
    pub user_append: &'static str,
}

/// The first tokens Magpie bans by default for a template (`--ban-first-tokens auto`): its
/// Llama-3.1 scripts mask `#` to `####` at the first step (`de_md_logits_processor_for_llama3_1`),
/// so that instructions do not open with a markdown heading.
pub fn default_banned_first_tokens(source: &str) -> &'static [&'static str] {
    match source {
        "llama3.1" => &["#", "##", "###", "####"],
        _ => &[],
    }
}

/// docs/upstream.md §1, one row per family.
pub const FAMILIES: &[Family] = &[
    Family {
        names: &["llama3", "llama3.1", "llama3.3"],
        pre_query: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        stops: &["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"],
        user_append: "<|start_header_id|>user<|end_header_id|>\n\n",
    },
    Family {
        names: &["qwen2", "qwen1.5"],
        pre_query: "<|im_start|>user\n",
        stops: &["<|im_start|>", "<|im_end|>", "<|endoftext|>", "Assistant"],
        user_append: "<|im_start|>user\n",
    },
    Family {
        names: &["qwen2.5"],
        pre_query: "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        stops: &["<|im_start|>", "<|im_end|>", "<|endoftext|>", "Assistant"],
        user_append: "<|im_start|>user\n",
    },
    Family {
        names: &["smollm2", "chatml"],
        pre_query: "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n",
        stops: &["<|im_end|>", "<|im_start|>"],
        user_append: "<|im_start|>user\n",
    },
    Family {
        names: &["gemma"],
        pre_query: "<bos><start_of_turn>user\n",
        stops: &["<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        user_append: "<start_of_turn>user\n",
    },
    Family {
        names: &["gemma2"],
        pre_query: "<bos><start_of_turn>user\n\n",
        stops: &["<eos>", "<bos>", "<end_of_turn>"],
        user_append: "<start_of_turn>user\n",
    },
    Family {
        names: &["phi3", "phi3.5"],
        pre_query: "<s> <|user|>\n",
        stops: &["</s>", "<s>", "<unk>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"],
        user_append: "<|user|>\n",
    },
    Family {
        names: &["mistral", "llama2"],
        pre_query: "<s> [INST] ",
        stops: &["</s>", "[INST]", "[/INST]"],
        user_append: "[INST] ",
    },
];

/// A resolved template: everything synthesis needs to prompt for user turns.
#[derive(Clone, Debug, PartialEq)]
pub struct PreQuery {
    /// Where it came from: a family name, `auto`, or `raw`.
    pub source: String,
    pub pre_query: String,
    /// Stop strings for instruction generation (without `\n` and `assistant`; the caller adds
    /// those by its options).
    pub stops: Vec<String>,
    pub user_append: String,
}

pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.names.contains(&name))
}

/// Sentinels that no real template contains.
const USER_SENTINEL: &str = "\u{1}MAGPIE-USER-SENTINEL\u{1}";
const ASSISTANT_SENTINEL: &str = "\u{1}MAGPIE-ASSISTANT-SENTINEL\u{1}";
const NEXT_SENTINEL: &str = "\u{1}MAGPIE-NEXT-SENTINEL\u{1}";

fn cut<'a>(text: &'a str, sentinel: &str, what: &str) -> Result<(&'a str, &'a str)> {
    text.split_once(sentinel)
        .with_context(|| format!("the chat template drops the {what} text, so no pre-query template can be derived from it"))
}

/// Derives the pre-query template, end-of-turn stops and user-append template from a chat
/// template. `system` is put first when given (task control).
pub fn derive(template: &ChatTemplate, system: Option<&str>) -> Result<PreQuery> {
    let mut messages: Vec<Message> = system.map(|s| Message::new("system", s)).into_iter().collect();
    messages.push(Message::new("user", USER_SENTINEL));
    let one_turn = template.render(&messages, false)?;
    let (pre_query, _) = cut(&one_turn, USER_SENTINEL, "user")?;

    messages.push(Message::new("assistant", ASSISTANT_SENTINEL));
    let two_turns = template.render(&messages, false)?;
    let (_, after_assistant) = cut(&two_turns, ASSISTANT_SENTINEL, "assistant")?;
    messages.push(Message::new("user", NEXT_SENTINEL));
    let three_turns = template.render(&messages, false)?;
    let (_, after_assistant_next) = cut(&three_turns, ASSISTANT_SENTINEL, "assistant")?;
    let (between, _) = cut(after_assistant_next, NEXT_SENTINEL, "second user")?;

    // `between` is the end of the assistant turn followed by the opening of the next user turn.
    let end_of_turn = common_prefix(after_assistant, between);
    let user_append = between[end_of_turn.len()..].to_string();
    let eot = end_of_turn.trim();
    let mut stops = vec![];
    if !eot.is_empty() {
        stops.push(eot.to_string());
    }
    let opener = user_append.trim();
    if let Some(tag) = special_tag(opener) {
        stops.push(tag.to_string());
    }
    Ok(PreQuery { source: "auto".into(), pre_query: pre_query.to_string(), stops, user_append })
}

/// The common prefix of `a` and `b`, cut back so that it does not end inside a `<...>` or `[...]`
/// tag (`<|end|>\n<|endoftext|>` and `<|end|>\n<|user|>` share `<|end|>\n`, not `<|end|>\n<|`).
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let len = a.char_indices().zip(b.chars()).take_while(|((_, x), y)| x == y).last().map_or(0, |((i, c), _)| i + c.len_utf8());
    let prefix = &a[..len];
    match prefix.rfind(['<', '[']) {
        Some(open) if !prefix[open..].contains(['>', ']']) => &prefix[..open],
        _ => prefix,
    }
}

/// The first `<...>` or `[...]` tag in `text` (e.g. `<|im_start|>`), the turn opener that must
/// never appear inside an instruction.
fn special_tag(text: &str) -> Option<&str> {
    let start = text.find(['<', '['])?;
    let close = if text[start..].starts_with('<') { '>' } else { ']' };
    let end = text[start..].find(close)? + start + 1;
    Some(&text[start..end])
}

/// Resolves `--template`: `auto`, a family name, or a raw pre-query string.
pub fn resolve(spec: &str, chat_template: Option<&ChatTemplate>, system: Option<&str>) -> Result<PreQuery> {
    if spec == "auto" {
        let Some(template) = chat_template else {
            bail!("--template auto needs a chat template, and this model ships none: pass a family name ({}) or a raw template", family_names());
        };
        return derive(template, system);
    }
    if let Some(f) = family(spec) {
        if system.is_some() {
            // A family's fixed prefix has no room for a system prompt; derive it from the model.
            if let Some(template) = chat_template {
                let mut derived = derive(template, system)?;
                derived.source = spec.to_string();
                return Ok(derived);
            }
        }
        return Ok(PreQuery {
            source: spec.to_string(),
            pre_query: f.pre_query.to_string(),
            stops: f.stops.iter().map(|s| s.to_string()).collect(),
            user_append: f.user_append.to_string(),
        });
    }
    if !spec.contains(['<', '[', '\n']) {
        bail!("--template `{spec}` is neither `auto`, a known family ({}), nor a raw template string", family_names());
    }
    // A raw template: stops come from the model's chat template when it has one.
    let derived = chat_template.map(|t| derive(t, None)).transpose()?;
    Ok(PreQuery {
        source: "raw".into(),
        pre_query: spec.replace("\\n", "\n"),
        stops: derived.as_ref().map(|d| d.stops.clone()).unwrap_or_default(),
        user_append: derived.map(|d| d.user_append).unwrap_or_default(),
    })
}

fn family_names() -> String {
    FAMILIES.iter().flat_map(|f| f.names.iter().copied()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::families::{GEMMA, LLAMA3, MISTRAL, PHI3, QWEN2, QWEN25, SMOLLM2};

    fn auto(source: &str, bos: &str, eos: &str) -> PreQuery {
        derive(&ChatTemplate::new(source, bos, eos).unwrap(), None).unwrap()
    }

    #[test]
    fn smollm2_auto_matches_the_documented_prefix() {
        let derived = auto(SMOLLM2, "<|im_start|>", "<|im_end|>");
        assert_eq!(
            derived.pre_query,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"
        );
        assert_eq!(derived.stops, ["<|im_end|>", "<|im_start|>"]);
        assert_eq!(derived.user_append, "<|im_start|>user\n");
        assert_eq!(derived.pre_query, family("smollm2").unwrap().pre_query);
    }

    #[test]
    fn magpie_bans_markdown_heading_first_tokens_for_llama_3_1_only() {
        assert_eq!(default_banned_first_tokens("llama3.1"), ["#", "##", "###", "####"]);
        for other in ["llama3", "qwen2.5", "auto", "raw"] {
            assert!(default_banned_first_tokens(other).is_empty(), "{other}");
        }
    }

    #[test]
    fn each_family_derives_its_prefix_stops_and_append_template() {
        let cases = [
            (QWEN25, "", "<|im_end|>", "qwen2.5"),
            (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
        ];
        for (source, bos, eos, name) in cases {
            let derived = auto(source, bos, eos);
            let f = family(name).unwrap();
            assert_eq!(derived.pre_query, f.pre_query, "{name}");
            assert_eq!(derived.user_append, f.user_append, "{name}");
            assert!(f.stops.contains(&derived.stops[0].as_str()), "{name}: {:?}", derived.stops);
        }
        // Qwen2's template adds a default system block that Magpie's qwen2 config leaves out.
        let qwen2 = auto(QWEN2, "", "<|im_end|>");
        assert_eq!(qwen2.pre_query, "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n");
        assert!(qwen2.pre_query.ends_with(family("qwen2").unwrap().pre_query));
        let gemma = auto(GEMMA, "<bos>", "<eos>");
        assert_eq!(gemma.pre_query, family("gemma").unwrap().pre_query);
        assert_eq!(gemma.stops, ["<end_of_turn>", "<start_of_turn>"]);
        assert_eq!(gemma.user_append, "<start_of_turn>user\n");
        let phi3 = auto(PHI3, "<s>", "<|endoftext|>");
        assert_eq!(phi3.pre_query, "<|user|>\n");
        assert_eq!(phi3.stops, ["<|end|>", "<|user|>"]);
        let mistral = auto(MISTRAL, "<s>", "</s>");
        assert_eq!(mistral.pre_query, "<s>[INST] ");
        assert_eq!(mistral.stops, ["</s>", "[INST]"]);
        assert_eq!(mistral.user_append, "[INST] ");
    }

    #[test]
    fn system_prompts_go_ahead_of_the_user_header() {
        let template = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let derived = resolve("auto", Some(&template), Some("You write Rust code.")).unwrap();
        assert_eq!(derived.pre_query, "<|im_start|>system\nYou write Rust code.<|im_end|>\n<|im_start|>user\n");
    }

    #[test]
    fn families_and_raw_strings_resolve_and_nonsense_is_refused() {
        let llama = resolve("llama3.1", None, None).unwrap();
        assert_eq!(llama.pre_query, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n");
        let raw = resolve("<|im_start|>user\\n", None, None).unwrap();
        assert_eq!(raw.pre_query, "<|im_start|>user\n");
        let error = resolve("llama9", None, None).unwrap_err().to_string();
        assert!(error.contains("neither `auto`, a known family"), "{error}");
        assert!(resolve("auto", None, None).unwrap_err().to_string().contains("ships none"));
    }
}
