//! `magpie synth --input`: responses from `--model` for an existing dataset (Magpie's released
//! files included), as Magpie-Reasoning and every "regenerate the responses with a stronger model"
//! workflow do. Each row's conversation, cut after its last user turn, is answered; `--turns`
//! continues it and `--responses` samples preference answers, as when harvesting. Every other
//! column is kept; the new `messages`, `response`, `response_length`, `finish_reasons`,
//! `gen_response_configs` (with the answering model as `response_generator`) and `responses`
//! replace the old ones. Rows with no user turn are skipped and counted.
//!
//! Chunks, resume and shards are harvesting's: chunk c holds input rows [c·rows, (c+1)·rows).
//! The input is validated whole before anything is written (a bad row or a repeated uuid late
//! in it fails the run up front), then read chunk by chunk: memory holds one chunk, not the input.

use anyhow::{Context, Result};
use arrow::array::{BooleanArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{Field, Schema};
use serde_json::{json, Value};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use super::pipeline::{Prompt, Synthesizer};
use super::rows::{self, RunInfo};
use crate::data::messages::read_turns;
use crate::data::read::RowRanges;
use crate::data::Dataset;

/// The columns an answered chunk takes from the generation; the rest come from the input.
const GENERATED: [&str; 6] = ["messages", "response", "response_length", "finish_reasons", "gen_response_configs", "responses"];
/// Generated columns added only when the input lacks them.
const IF_MISSING: [&str; 2] = ["instruction", "instruction_length"];

/// The dataset being answered.
pub struct InputRows {
    dataset: Dataset,
}

impl InputRows {
    /// Opens and validates the input: its schema has `messages`, and every row reads (one pass,
    /// keeping only the uuids, which must be unique).
    pub fn read(inputs: &[String]) -> Result<InputRows> {
        let dataset = Dataset::open(inputs)?;
        dataset.require(&["messages"])?;
        for batch in dataset.batches() {
            batch?;
        }
        Ok(InputRows { dataset })
    }

    pub fn rows(&self) -> usize {
        self.dataset.num_rows as usize
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.dataset.files
    }

    /// The input files with their sizes, for the run's settings: another input is another run.
    pub fn identity(&self) -> Value {
        json!(self.files().iter().map(|f| json!({"file": f, "bytes": std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)})).collect::<Vec<_>>())
    }

    /// A reader of the input's chunks, in increasing order.
    pub fn chunks(&self) -> RowRanges<'_> {
        self.dataset.row_ranges()
    }
}

/// Answers input rows `range`, read from `chunks`, and returns their output batch; `skipped`
/// counts rows without a user turn.
pub fn answer(
    chunks: &mut RowRanges,
    synth: &mut Synthesizer,
    range: Range<u64>,
    info: &RunInfo,
    on_tokens: &mut dyn FnMut(usize),
    skipped: &mut u64,
) -> Result<RecordBatch> {
    let input = chunks.read(range.clone())?;
    let conversations = read_turns(input.column_by_name("messages").expect("required").as_ref(), "role", "content");
    let uuids = crate::data::messages::as_utf8(input.column_by_name("uuid").expect("every read batch has a uuid")).context("uuid is a string column")?;
    let mut keep = vec![];
    let mut prompts = vec![];
    for (i, (row, messages)) in range.zip(conversations).enumerate() {
        let messages = messages.unwrap_or_default();
        let Some(last_user) = messages.iter().rposition(|m| m.role == "user") else {
            keep.push(false);
            *skipped += 1;
            continue;
        };
        keep.push(true);
        prompts.push(Prompt { row, uuid: uuids.value(i).to_string(), messages: messages[..=last_user].to_vec() });
    }
    let answered = synth.answer(prompts, on_tokens)?;
    let kept = filter_record_batch(&input, &BooleanArray::from(keep))?;
    merge(&kept, &rows::to_batch(&answered, info))
}

/// The input rows' columns with the generated ones put in.
fn merge(input: &RecordBatch, generated: &RecordBatch) -> Result<RecordBatch> {
    let mut fields: Vec<Field> = vec![];
    let mut columns = vec![];
    let mut take = |name: &str, from: &RecordBatch| {
        if let Ok(index) = from.schema().index_of(name) {
            fields.push(from.schema().field(index).clone());
            columns.push(from.column(index).clone());
        }
    };
    for field in input.schema().fields() {
        let name = field.name();
        if GENERATED.contains(&name.as_str()) && generated.column_by_name(name).is_some() {
            take(name, generated);
        } else {
            take(name, input);
        }
    }
    for name in GENERATED.iter().chain(&IF_MISSING) {
        if input.column_by_name(name).is_none() {
            take(name, generated);
        }
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{batch, text, write};

    #[test]
    fn the_input_is_validated_whole_before_any_chunk_is_answered() {
        // A repeated uuid in the last file: found when the input is opened, before a first chunk
        // could be written, though chunks are read one at a time.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "part-0.parquet", &batch(vec![("uuid", text(&["a", "b"])), ("instruction", text(&["Hi.", "Name a prime."]))]));
        write(dir.path(), "part-1.parquet", &batch(vec![("uuid", text(&["c", "a"])), ("instruction", text(&["Say hi.", "Count to 3."]))]));
        let error = InputRows::read(&[dir.path().display().to_string()]).err().unwrap().to_string();
        assert!(error.contains("part-1.parquet") && error.contains("repeats `a`"), "{error}");
    }
}
