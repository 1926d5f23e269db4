//! Cheap per-row tags (no dataset-wide state): lengths, an instruction ending with ":",
//! truncation (a `length` finish reason), empty turns, refusals, excessive repetition and the
//! instruction's language (whatlang, as an ISO 639-1 code where one exists). Drops nothing;
//! `select` rules use the columns.

use super::step::Step;
use super::text::{instructions, responses};
use anyhow::Result;
use rayon::prelude::*;
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch, StringArray};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Openings of a response that declines the task.
const REFUSALS: &[&str] = &[
    "i'm sorry", "i am sorry", "i apologize", "as an ai", "i cannot", "i can't", "i can not", "i'm not able to",
    "i am not able to", "i'm unable to", "i am unable to", "sorry, but",
];

pub fn is_refusal(response: &str) -> bool {
    let start: String = response.trim_start().chars().take(120).collect::<String>().to_lowercase();
    REFUSALS.iter().any(|r| start.contains(r))
}

/// More than half of a long text's word 3-grams are repeats, or one line occurs 3+ times.
pub fn is_repetitive(text: &str) -> bool {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() >= 30 {
        let grams: Vec<&[&str]> = words.windows(3).collect();
        let distinct: HashSet<&[&str]> = grams.iter().copied().collect();
        if (distinct.len() as f64) < 0.5 * grams.len() as f64 {
            return true;
        }
    }
    let mut lines: BTreeMap<&str, usize> = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| l.len() > 10) {
        *lines.entry(line).or_default() += 1;
    }
    lines.values().any(|&n| n >= 3)
}

/// ISO 639-1 for whatlang's ISO 639-3 codes, for the languages it detects.
fn iso_639_1(code: &str) -> &str {
    const TABLE: &[(&str, &str)] = &[
        ("eng", "en"), ("cmn", "zh"), ("spa", "es"), ("fra", "fr"), ("deu", "de"), ("rus", "ru"), ("por", "pt"),
        ("ita", "it"), ("jpn", "ja"), ("kor", "ko"), ("ara", "ar"), ("hin", "hi"), ("nld", "nl"), ("pol", "pl"),
        ("tur", "tr"), ("ukr", "uk"), ("vie", "vi"), ("ind", "id"), ("swe", "sv"), ("dan", "da"), ("nob", "nb"),
        ("fin", "fi"), ("ces", "cs"), ("ell", "el"), ("heb", "he"), ("hun", "hu"), ("ron", "ro"), ("tha", "th"),
        ("ben", "bn"), ("pes", "fa"), ("urd", "ur"), ("tam", "ta"), ("tel", "te"), ("mar", "mr"), ("bul", "bg"),
        ("hrv", "hr"), ("srp", "sr"), ("slk", "sk"), ("slv", "sl"), ("lit", "lt"), ("lav", "lv"), ("est", "et"),
        ("cat", "ca"), ("epo", "eo"), ("afr", "af"), ("kat", "ka"), ("bel", "be"), ("mkd", "mk"), ("aze", "az"),
        ("zul", "zu"), ("lat", "la"), ("tgl", "tl"), ("jav", "jv"), ("amh", "am"), ("yid", "yi"), ("mal", "ml"),
        ("kan", "kn"), ("guj", "gu"), ("pan", "pa"), ("ori", "or"), ("sin", "si"), ("nep", "ne"), ("khm", "km"),
        ("mya", "my"), ("sna", "sn"), ("aka", "ak"), ("uzb", "uz"), ("tuk", "tk"), ("hye", "hy"),
    ];
    TABLE.iter().find(|(three, _)| *three == code).map_or(code, |(_, two)| two)
}

fn text(t: &Option<String>) -> &str {
    t.as_deref().unwrap_or("")
}

pub fn language(text: &str) -> Option<String> {
    whatlang::detect(text).map(|info| iso_639_1(info.lang().code()).to_string())
}

/// `heuristics` in a recipe: no settings; the rules are fixed (docs/upstream.md §3's).
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeuristicsConfig {}

#[derive(Default)]
pub struct Heuristics {
    flagged: BTreeMap<&'static str, u64>,
}

impl Step for Heuristics {
    fn name(&self) -> &'static str {
        "heuristics"
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let instructions = instructions(&batch);
        let responses = responses(&batch);
        let length = |texts: &[Option<String>]| -> ArrayRef {
            Arc::new(texts.iter().map(|t| t.as_ref().map(|t| t.chars().count() as i64)).collect::<Int64Array>())
        };
        let flag = |values: Vec<bool>| -> ArrayRef { Arc::new(BooleanArray::from(values)) };
        let truncated: Vec<bool> = match batch.column_by_name("finish_reasons") {
            Some(reasons) if reasons.as_list_opt::<i32>().is_some() => {
                let list = reasons.as_list::<i32>();
                (0..batch.num_rows())
                    .map(|i| list.is_valid(i) && list.value(i).as_string_opt::<i32>().is_some_and(|r| r.iter().flatten().any(|r| r == "length")))
                    .collect()
            }
            _ => vec![false; batch.num_rows()],
        };
        let columns: Vec<(&'static str, ArrayRef)> = vec![
            ("instruction_length", length(&instructions)),
            ("response_length", length(&responses)),
            ("ends_with_colon", flag(instructions.iter().map(|t| text(t).trim_end().ends_with(':')).collect())),
            ("truncated", flag(truncated)),
            ("empty", flag(instructions.iter().zip(&responses).map(|(i, r)| text(i).trim().is_empty() || r.as_deref().is_some_and(|r| r.trim().is_empty())).collect())),
            // The costly tags (language detection above all) on rayon's threads, in row order.
            ("refusal", flag(responses.par_iter().map(|r| is_refusal(text(r))).collect())),
            ("repetitive", flag(responses.par_iter().map(|r| is_repetitive(text(r))).collect())),
            ("language", Arc::new(StringArray::from(instructions.par_iter().map(|t| t.as_deref().and_then(language)).collect::<Vec<_>>()))),
        ];
        let mut batch = batch;
        for (name, array) in columns {
            if let Some(flags) = array.as_boolean_opt() {
                *self.flagged.entry(name).or_default() += flags.true_count() as u64;
            }
            batch = super::step::with_column(batch, name, array)?;
        }
        Ok(batch)
    }

    fn report(&self) -> Value {
        json!({ "flagged": self.flagged })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_repetition_and_language_are_recognised() {
        assert!(is_refusal("I'm sorry, but I can't help with that."));
        assert!(!is_refusal("Sure! Here is a plan."));
        assert!(is_repetitive(&"the cat sat on the mat ".repeat(20)));
        assert!(!is_repetitive("A short and varied answer that says one thing once and then stops."));
        assert_eq!(language("How do I reverse a list in Python without copying it?").as_deref(), Some("en"));
        assert_eq!(language("¿Cómo puedo invertir una lista en Python sin copiarla?").as_deref(), Some("es"));
    }
}
