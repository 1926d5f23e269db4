//! LLM-judge tags as Magpie's unitag computes them: the judge model reads a rating prompt about
//! the instruction and answers in JSON, greedily. By default each answer is constrained to the
//! tag's JSON object (`structured_output`): its keys in the prompt's order, each scale as an
//! enum, free text bounded to half the tokens that the answer's keys, scales and layout leave of
//! the budget (at about 4 characters a token), so the answer closes inside `max_tokens`, even in
//! the pretty layout a server's schema allows; a grammar on llama.cpp, a JSON schema on mistralrs and
//! servers. Without it, the answer is prefilled with `{`. Parsing is tolerant either way (the
//! whole answer as JSON, else its first object, else each expected key by pattern); a field that
//! cannot be read, or holds a value outside its scale, stays null and is counted.
//!
//! - `quality`: `input_quality` (very poor .. excellent) and `quality_explanation`;
//! - `difficulty`: `difficulty` (very easy .. very hard), `intent`, `knowledge`;
//! - `category`: `task_category` (one of Magpie's 12 tags) and `other_task_category`.
//!
//! The judge runs through the synth engines; the default is the embedded SmolLM2.

use super::step::Step;
use super::text::instructions;
use crate::data::Message;
use crate::engine::chat::ChatModel as JudgeModel;
use crate::engine::json_answer::{JsonAnswer, JsonValue};
use crate::engine::openai::ServerOptions;
use anyhow::Result;
use arrow::array::{ArrayRef, ListBuilder, RecordBatch, StringArray, StringBuilder};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub const QUALITY_SCALE: &[&str] = &["very poor", "poor", "average", "good", "excellent"];
pub const DIFFICULTY_SCALE: &[&str] = &["very easy", "easy", "medium", "hard", "very hard"];
pub const TASK_TAGS: &[&str] = &[
    "Information seeking", "Reasoning", "Planning", "Editing", "Coding & Debugging", "Math", "Role playing",
    "Data analysis", "Creative writing", "Advice seeking", "Brainstorming", "Others",
];

const QUALITY_PROMPT: &str = "# Instruction\n\nYou need to rate the quality of the user query based on its clarity, specificity, and coherence.\n\nThe rating scale is as follows:\n\n- very poor: The query is unclear, vague, or incoherent. It lacks essential information and context.\n- poor: The query is somewhat unclear or lacks important details. It requires significant clarification.\n- average: The query is moderately clear and specific. It may require some additional information for a complete understanding.\n- good: The query is clear, specific, and mostly well-formed. It provides sufficient context for understanding the user's intent.\n- excellent: The query is very clear, specific, and well-articulated. It contains all the necessary information and context for providing a comprehensive response.\n\n## User Query\n```\n{input}\n```\n\n## Output Format\nGiven the user query, you first need to give an assessment, highlighting the strengths and/or weaknesses of the user query.\nThen, you need to output a rating from very poor to excellent by filling in the placeholders in [...]:\n```\n{\n    \"explanation\": \"[...]\",\n    \"input_quality\": \"[very poor/poor/average/good/excellent]\"\n}\n```\n";
const DIFFICULTY_PROMPT: &str = "# Instruction\n\nYou first need to identify the given user intent and then label the difficulty level of the user query based on the content of the user query.\n\n## User Query\n```\n{input}\n```\n\n## Output Format\nGiven the user query, in your output, you first need to identify the user intent and the knowledge needed to solve the task in the user query.\nThen, rate the difficulty level of the user query as `very easy`, `easy`, `medium`, `hard`, or `very hard`.\n\nNow, please output the user intent and difficulty level below in a json format by filling in the placeholders in []:\n```\n{\n    \"intent\": \"The user wants to [....]\",\n    \"knowledge\": \"To solve this problem, the models need to know [....]\",\n    \"difficulty\": \"[very easy/easy/medium/hard/very hard]\"\n}\n```\n";
const CATEGORY_PROMPT: &str = "# Instruction\n\nPlease label the task tags for the user query.\n\n## User Query\n```\n{input}\n```\n\n## Tagging the user input\nPlease label the task tags for the user query. You will need to analyze the user query and select the most relevant task tag from the list below.\n\nall_task_tags = [\n    \"Information seeking\",  # Users ask for specific information or facts about various topics.\n    \"Reasoning\",  # Queries require logical thinking, problem-solving, or processing of complex ideas.\n    \"Planning\",  # Users need assistance in creating plans or strategies for activities and projects.\n    \"Editing\",  # Involves editing, rephrasing, proofreading, or other tasks related to the composition of general written content.\n    \"Coding & Debugging\",  # Users seek help with writing, reviewing, or fixing code in programming.\n    \"Math\",  # Queries related to mathematical concepts, problems, and calculations.\n    \"Role playing\",  # Users engage in scenarios requiring ChatGPT to adopt a character or persona.\n    \"Data analysis\",  # Requests involve interpreting data, statistics, or performing analytical tasks.\n    \"Creative writing\",  # Users seek assistance with crafting stories, poems, or other creative texts.\n    \"Advice seeking\",  # Users ask for recommendations or guidance on various personal or professional issues.\n    \"Brainstorming\",  # Involves generating ideas, creative thinking, or exploring possibilities.\n    \"Others\"  # Any queries that do not fit into the above categories or are of a miscellaneous nature.\n]\n\n## Output Format:\nNote that you can only select a single primary tag. Other applicable tags can be added to the list of other tags.\nNow, please output your tags below in a json format by filling in the placeholders in <...>:\n```\n{\n    \"primary_tag\": \"<primary tag>\",\n    \"other_tags\": [\"<tag 1>\", \"<tag 2>\", ... ]\n}\n```\n";

/// One kind of judgement: its prompt and how its answer maps onto columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tag {
    Quality,
    Difficulty,
    Category,
}

impl Tag {
    fn prompt(self) -> &'static str {
        match self {
            Tag::Quality => QUALITY_PROMPT,
            Tag::Difficulty => DIFFICULTY_PROMPT,
            Tag::Category => CATEGORY_PROMPT,
        }
    }

    /// (answer key, column, allowed values or none for free text).
    fn fields(self) -> &'static [(&'static str, &'static str, Option<&'static [&'static str]>)] {
        match self {
            Tag::Quality => &[("input_quality", "input_quality", Some(QUALITY_SCALE)), ("explanation", "quality_explanation", None)],
            Tag::Difficulty => &[("difficulty", "difficulty", Some(DIFFICULTY_SCALE)), ("intent", "intent", None), ("knowledge", "knowledge", None)],
            Tag::Category => &[("primary_tag", "task_category", Some(TASK_TAGS))],
        }
    }

    /// The JSON object the answer must be: the keys of the prompt's output format, in its order.
    fn answer(self, max_tokens: usize) -> Result<JsonAnswer> {
        let scale = |values: &[&str]| JsonValue::OneOf(values.iter().map(|v| v.to_string()).collect());
        let text = JsonValue::Text { max_chars: 0 };
        let mut keys = match self {
            Tag::Quality => vec![("explanation", text.clone()), ("input_quality", scale(QUALITY_SCALE))],
            Tag::Difficulty => vec![("intent", text.clone()), ("knowledge", text), ("difficulty", scale(DIFFICULTY_SCALE))],
            Tag::Category => {
                let others = JsonValue::ListOf { values: TASK_TAGS.iter().map(|t| t.to_string()).collect(), max_items: TASK_TAGS.len() - 1 };
                vec![("primary_tag", scale(TASK_TAGS)), ("other_tags", others)]
            }
        };
        // The fixed part of the answer in tokens, counted generously (a token for every two
        // characters of a key or scale value, four for each key's quotes, colon, comma and
        // indentation, two for the braces): the free text shares half of what it leaves.
        let value_tokens = |value: &JsonValue| match value {
            JsonValue::OneOf(values) => values.iter().map(String::len).max().unwrap_or(0) / 2 + 2,
            _ => 0,
        };
        let fixed: usize = 2 + keys.iter().map(|(key, value)| key.len() / 2 + 4 + value_tokens(value)).sum::<usize>();
        let texts = keys.iter().filter(|(_, v)| matches!(v, JsonValue::Text { .. })).count().max(1);
        let max_chars = (max_tokens.saturating_sub(fixed) * 2 / texts).max(1);
        for (_, value) in &mut keys {
            if let JsonValue::Text { max_chars: chars } = value {
                *chars = max_chars;
            }
        }
        let name = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        JsonAnswer::new(&name, keys.into_iter().map(|(key, value)| (key.to_string(), value)).collect())
    }
}

/// The answer `full` (prefill included) as a JSON object, else its first JSON object, else the
/// expected keys picked out one by one.
pub fn parse_answer(full: &str, keys: &[&str]) -> Map<String, Value> {
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(full.trim()) {
        return map;
    }
    if let Some(end) = full.find('}')
        && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&full[..=end])
    {
        return map;
    }
    let mut map = Map::new();
    for key in keys {
        let pattern = format!("\"{key}\"");
        let Some(at) = full.find(&pattern) else { continue };
        let rest = full[at + pattern.len()..].trim_start().trim_start_matches(':').trim_start();
        if let Some(body) = rest.strip_prefix('"') {
            let value: String = body.split('"').next().unwrap_or_default().to_string();
            map.insert(key.to_string(), Value::String(value));
        } else if rest.starts_with('[') {
            let list = &rest[..rest.find(']').map_or(rest.len(), |e| e + 1)];
            if let Ok(value) = serde_json::from_str::<Value>(list) {
                map.insert(key.to_string(), value);
            }
        }
    }
    map
}

/// `value` as one of `allowed` (case and brackets ignored), or `None`.
pub fn on_scale(value: &str, allowed: &[&str]) -> Option<String> {
    let cleaned = value.trim().trim_matches(|c| c == '[' || c == ']' || c == '<' || c == '>').trim();
    allowed.iter().find(|a| a.eq_ignore_ascii_case(cleaned)).map(|a| a.to_string())
}

/// `judge_tags` in a recipe.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeTagsConfig {
    /// Judge model (GGUF or safetensors directory); default: the embedded SmolLM2.
    pub judge_model: Option<PathBuf>,
    /// The chat template's family (llama3, qwen2.5, gemma, ...) for a judge model that ships
    /// none.
    pub template: Option<String>,
    /// Which tags to ask for.
    pub tags: Vec<Tag>,
    /// Most tokens per judge answer.
    pub max_tokens: usize,
    /// Prompts decoded together (requests in flight on a server).
    pub batch_size: usize,
    /// Constrain each answer to the tag's JSON object (llama.cpp's grammar in-process and on its
    /// server, `response_format` with a JSON schema on vLLM and SGLang). `false`: free text with
    /// `{` prefilled, for a server that refuses structured output.
    pub structured_output: bool,
    /// Judge on an OpenAI-compatible server (`base_url`, `model`, `api_key_env`,
    /// `request_timeout`, `request_retries`); `judge_model` is then its local tokenizer and
    /// chat template.
    pub server: Option<ServerOptions>,
}

impl Default for JudgeTagsConfig {
    fn default() -> Self {
        JudgeTagsConfig { judge_model: None, template: None, tags: vec![Tag::Quality, Tag::Difficulty, Tag::Category], max_tokens: 256, batch_size: 32, structured_output: true, server: None }
    }
}

pub struct JudgeTags {
    judge: JudgeModel,
    /// Each tag, with the JSON object its answer must be when `structured_output` is on.
    tags: Vec<(Tag, Option<Arc<JsonAnswer>>)>,
    structured_output: bool,
    failures: BTreeMap<&'static str, u64>,
}

impl JudgeTags {
    pub fn new(config: JudgeTagsConfig) -> Result<Self> {
        let judge = JudgeModel::load(config.judge_model, config.template.as_deref(), config.max_tokens, config.batch_size, config.server)?;
        let answer = |tag: Tag| config.structured_output.then(|| tag.answer(config.max_tokens).map(Arc::new)).transpose();
        let tags = config.tags.iter().map(|&tag| Ok((tag, answer(tag)?))).collect::<Result<_>>()?;
        Ok(JudgeTags { judge, tags, structured_output: config.structured_output, failures: BTreeMap::new() })
    }
}

impl Step for JudgeTags {
    fn name(&self) -> &'static str {
        "judge_tags"
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let texts = instructions(&batch);
        let mut batch = batch;
        for (tag, answer) in self.tags.clone() {
            let questions: Vec<Vec<Message>> = texts
                .iter()
                .map(|text| vec![Message::new("user", tag.prompt().replace("{input}", text.as_deref().unwrap_or("")))])
                .collect();
            let answers = match &answer {
                Some(answer) => self.judge.answer_json(&questions, answer)?,
                None => self.judge.answer(&questions, "{")?.into_iter().map(|a| format!("{{{a}")).collect(),
            };
            let keys: Vec<&str> = tag.fields().iter().map(|f| f.0).chain((tag == Tag::Category).then_some("other_tags")).collect();
            let parsed: Vec<Map<String, Value>> = answers.iter().map(|a| parse_answer(a, &keys)).collect();
            for &(key, column, allowed) in tag.fields() {
                let values: StringArray = parsed
                    .iter()
                    .map(|answer| {
                        let raw = answer.get(key).and_then(Value::as_str);
                        let value = match (raw, allowed) {
                            (Some(v), Some(scale)) => on_scale(v, scale),
                            (Some(v), None) => Some(v.trim().to_string()).filter(|v| !v.is_empty()),
                            (None, _) => None,
                        };
                        if value.is_none() {
                            *self.failures.entry(column).or_default() += 1;
                        }
                        value
                    })
                    .collect();
                batch = super::step::with_column(batch, column, Arc::new(values))?;
            }
            if tag == Tag::Category {
                let mut others = ListBuilder::new(StringBuilder::new());
                for answer in &parsed {
                    let tags = answer.get("other_tags").and_then(Value::as_array);
                    others.append_value(tags.into_iter().flatten().filter_map(|t| t.as_str().and_then(|t| on_scale(t, TASK_TAGS))).map(Some));
                }
                batch = super::step::with_column(batch, "other_task_category", Arc::new(others.finish()) as ArrayRef)?;
            }
        }
        Ok(batch)
    }

    fn report(&self) -> Value {
        json!({ "judge": self.judge.name, "structured_output": self.structured_output, "parse_failures": self.failures })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_judge_server_is_a_block_of_the_flags_keys_and_a_misspelt_key_is_named() {
        let config: JudgeTagsConfig = serde_yaml::from_str("server: {base_url: 'http://gpu:8000/v1', model: m, request_retries: 2}").unwrap();
        let server = config.server.unwrap();
        assert_eq!((server.base_url.as_str(), server.model.as_deref(), server.request_retries), ("http://gpu:8000/v1", Some("m"), 2));
        assert_eq!((server.api_key_env.as_str(), server.request_timeout), ("OPENAI_API_KEY", 600.0));
        let error = serde_yaml::from_str::<JudgeTagsConfig>("server: {base_url: x, api_key: secret}").unwrap_err().to_string();
        assert!(error.contains("unknown field `api_key`"), "{error}");
    }

    #[test]
    fn good_answers_parse_as_json() {
        let answer = "{\n    \"explanation\": \"Clear and specific.\",\n    \"input_quality\": \"good\"\n}\nextra text";
        let map = parse_answer(answer, &["explanation", "input_quality"]);
        assert_eq!(map["input_quality"], "good");
        assert_eq!(map["explanation"], "Clear and specific.");
    }

    #[test]
    fn a_constrained_answer_is_read_whole_even_with_a_brace_in_its_text() {
        let map = parse_answer("{\"explanation\": \"It asks for {x}.\", \"input_quality\": \"poor\"}", &["explanation", "input_quality"]);
        assert_eq!((map["explanation"].as_str(), map["input_quality"].as_str()), (Some("It asks for {x}."), Some("poor")));
    }

    #[test]
    fn each_tag_answers_the_keys_of_its_prompt_in_order_with_its_scale_and_a_bounded_text() {
        for tag in [Tag::Quality, Tag::Difficulty, Tag::Category] {
            let answer = tag.answer(256).unwrap();
            let keys: Vec<&str> = answer.keys.iter().map(|(k, _)| k.as_str()).collect();
            let mut at = 0;
            for key in &keys {
                let found = tag.prompt()[at..].find(&format!("\"{key}\"")).unwrap_or_else(|| panic!("{tag:?}: {key} not in order"));
                at += found;
            }
            for &(key, _, allowed) in tag.fields() {
                let value = &answer.keys.iter().find(|(k, _)| k == key).unwrap().1;
                match (allowed, value) {
                    (Some(scale), JsonValue::OneOf(values)) => assert_eq!(values, scale),
                    (None, JsonValue::Text { max_chars }) => assert!(*max_chars <= 512, "{key}: {max_chars}"),
                    other => panic!("{key}: {other:?}"),
                }
            }
        }
        assert_eq!(Tag::Difficulty.answer(256).unwrap().name, "difficulty");
    }

    /// The longest answer a tag with free text allows, in the pretty layout that vLLM's
    /// structured output produced (two-space indents, a line a key), each text field repeating
    /// "This is why. " (the answer of a 135M judge that once ran past 48 tokens: about 3
    /// characters a token in SmolLM2's vocabulary), closes inside the budget.
    #[test]
    fn the_longest_constrained_answer_in_a_pretty_layout_closes_inside_the_token_budget() {
        let dir = tempfile::tempdir().unwrap();
        crate::model::convert::convert(&crate::test_support::test_model(), &dir.path().join("m"), false).unwrap();
        let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("m/tokenizer.json")).unwrap();
        for max_tokens in [48, 64, 128, 256] {
            for tag in [Tag::Quality, Tag::Difficulty] {
                let mut longest = Map::new();
                for (key, value) in tag.answer(max_tokens).unwrap().keys {
                    let filled = match value {
                        JsonValue::Text { max_chars } => "This is why. ".repeat(max_chars).chars().take(max_chars).collect(),
                        JsonValue::OneOf(values) => values.into_iter().max_by_key(String::len).unwrap(),
                        JsonValue::ListOf { .. } => unreachable!("no lists beside free text"),
                    };
                    longest.insert(key, Value::String(filled));
                }
                let text = serde_json::to_string_pretty(&Value::Object(longest)).unwrap();
                let tokens = tokenizer.encode(text.as_str(), false).unwrap().len();
                assert!(tokens <= max_tokens, "{tag:?} at {max_tokens}: {tokens} tokens\n{text}");
            }
        }
    }

    #[test]
    fn broken_answers_are_read_key_by_key_or_left_null() {
        // Unclosed object, a trailing comma: not JSON, but the keys are there.
        let answer = "{\"intent\": \"The user wants to sort a list\", \"difficulty\": \"Easy\",";
        let map = parse_answer(answer, &["intent", "difficulty", "knowledge"]);
        assert_eq!(on_scale(map["difficulty"].as_str().unwrap(), DIFFICULTY_SCALE).as_deref(), Some("easy"));
        assert!(!map.contains_key("knowledge"));
        let map = parse_answer("{\"primary_tag\": \"<Math>\", \"other_tags\": [\"Reasoning\", \"Nonsense\"]", &["primary_tag", "other_tags"]);
        assert_eq!(on_scale(map["primary_tag"].as_str().unwrap(), TASK_TAGS).as_deref(), Some("Math"));
        assert_eq!(map["other_tags"].as_array().unwrap().len(), 2);
        assert!(parse_answer("I think it is fine.", &["input_quality"]).is_empty());
        assert_eq!(on_scale("superb", QUALITY_SCALE), None);
    }
}
