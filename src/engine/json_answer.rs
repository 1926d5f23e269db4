//! Constrained answers: a JSON object of fixed keys that a judge's answer must be, in the two
//! forms the engines take. Servers (vLLM, SGLang) and mistralrs get its JSON schema
//! (`response_format: json_schema`); llama.cpp, in-process and as a server (`grammar`), gets the
//! GBNF grammar that llama.cpp's converter makes of that schema. Keys come in the order given,
//! every key is required, nothing else is allowed, and free text is bounded so that an answer
//! closes inside its token budget.

use anyhow::{anyhow, Result};
use serde_json::{json, Map, Value};

/// The value one key holds.
#[derive(Clone, Debug, PartialEq)]
pub enum JsonValue {
    /// A string of at most this many characters.
    Text { max_chars: usize },
    /// One of these strings.
    OneOf(Vec<String>),
    /// A list of at most `max_items` of these strings.
    ListOf { values: Vec<String>, max_items: usize },
}

/// A JSON object of these keys, in this order, with its schema and grammar made once (not per
/// request).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonAnswer {
    /// A name for the schema (`response_format.json_schema.name`).
    pub name: String,
    pub keys: Vec<(String, JsonValue)>,
    schema: Value,
    grammar: String,
}

impl JsonAnswer {
    /// The object of `keys`; its GBNF grammar comes from llama.cpp's own converter (the one its
    /// server applies to a `json_schema`).
    pub fn new(name: &str, keys: Vec<(String, JsonValue)>) -> Result<Self> {
        let schema = schema(&keys);
        let grammar = llama_cpp_2::json_schema_to_grammar(&schema.to_string())
            .map_err(|e| anyhow!("{name}: llama.cpp cannot convert the answer's JSON schema to a grammar: {e}"))?;
        Ok(JsonAnswer { name: name.to_string(), keys, schema, grammar })
    }

    /// The JSON schema: an object of exactly these keys, in order.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The GBNF grammar of the same schema.
    pub fn grammar(&self) -> &str {
        &self.grammar
    }

    /// The `response_format` of an OpenAI-compatible request.
    pub fn response_format(&self) -> Value {
        json!({"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema, "strict": true}})
    }
}

fn schema(keys: &[(String, JsonValue)]) -> Value {
    let mut properties = Map::new();
    for (key, value) in keys {
        let property = match value {
            JsonValue::Text { max_chars } => json!({"type": "string", "maxLength": max_chars}),
            JsonValue::OneOf(values) => json!({"type": "string", "enum": values}),
            JsonValue::ListOf { values, max_items } => {
                json!({"type": "array", "items": {"type": "string", "enum": values}, "maxItems": max_items})
            }
        };
        properties.insert(key.clone(), property);
    }
    let required: Vec<&str> = keys.iter().map(|(key, _)| key.as_str()).collect();
    json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> JsonAnswer {
        JsonAnswer::new(
            "quality",
            vec![
                ("explanation".into(), JsonValue::Text { max_chars: 40 }),
                ("input_quality".into(), JsonValue::OneOf(vec!["poor".into(), "very good".into()])),
                ("other_tags".into(), JsonValue::ListOf { values: vec!["Math".into(), "Coding & Debugging".into()], max_items: 3 }),
            ],
        )
        .unwrap()
    }

    #[test]
    fn the_schema_requires_every_key_in_order_and_nothing_else() {
        let answer = answer();
        let schema = answer.schema();
        let keys: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["explanation", "input_quality", "other_tags"]);
        assert_eq!(schema["required"], json!(["explanation", "input_quality", "other_tags"]));
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["explanation"]["maxLength"], 40);
        assert_eq!(schema["properties"]["other_tags"]["items"]["enum"][1], "Coding & Debugging");
        assert_eq!(answer.response_format()["json_schema"]["name"], "quality");
    }

    #[test]
    fn llama_cpp_converts_the_schema_to_a_grammar_of_the_keys_and_values() {
        let answer = answer();
        let grammar = answer.grammar();
        assert!(grammar.contains("root ::="), "{grammar}");
        for text in ["explanation", "input_quality", "other_tags", "Coding & Debugging", "very good"] {
            assert!(grammar.contains(text), "{text} is not in {grammar}");
        }
    }
}
