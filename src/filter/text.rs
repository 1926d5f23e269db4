//! Text helpers shared by the filter steps: which text a step looks at, and its normal form.

use crate::data::messages::{as_utf8, read_turns};
use arrow::array::{Array, RecordBatch};
use std::hash::{Hash, Hasher};

/// The instruction of each row: the `instruction` column, else the first user turn of `messages`.
pub fn instructions(batch: &RecordBatch) -> Vec<Option<String>> {
    first_turn(batch, "instruction", "user")
}

/// The response of each row: the `response` column, else the first assistant turn.
pub fn responses(batch: &RecordBatch) -> Vec<Option<String>> {
    first_turn(batch, "response", "assistant")
}

fn first_turn(batch: &RecordBatch, column: &str, role: &str) -> Vec<Option<String>> {
    if let Some(text) = batch.column_by_name(column).and_then(as_utf8) {
        return text.iter().map(|t| t.map(str::to_string)).collect();
    }
    match batch.column_by_name("messages") {
        Some(messages) => read_turns(messages.as_ref(), "role", "content")
            .into_iter()
            .map(|m| m.and_then(|m| m.into_iter().find(|t| t.role == role)).map(|t| t.content))
            .collect(),
        None => vec![None; batch.num_rows()],
    }
}

/// Lowercase, punctuation dropped, whitespace collapsed: the form dedup compares.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(|c: char| c.is_whitespace() || (c.is_ascii_punctuation() && c != '\'')).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.extend(word.chars().filter(|c| !c.is_ascii_punctuation()).flat_map(char::to_lowercase));
    }
    out
}

/// A 64-bit hash that is the same in every run of one build (std's `DefaultHasher::new()` has
/// fixed keys).
pub fn hash64(value: impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// The `uuid` column as strings.
pub fn uuids(batch: &RecordBatch) -> Vec<String> {
    let column = batch.column_by_name("uuid").and_then(as_utf8).expect("the reader guarantees uuid");
    (0..column.len()).map(|i| column.value(i).to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_form_ignores_case_space_and_punctuation() {
        assert_eq!(normalize("  Hello,   WORLD!!  How's it going?"), "hello world hows it going");
        assert_eq!(normalize("hello world. how's it going"), normalize("Hello World how's it going!"));
    }
}
