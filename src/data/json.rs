//! JSON inputs through arrow-rs's JSON reader: JSON Lines (`.jsonl`, `.ndjson`: one object a
//! line, as HF datasets and MT-Bench's `question.jsonl` write them) and JSON arrays (`.json`: one
//! array of objects, as AlpacaEval ships). The schema is inferred from every row (a key a row
//! lacks is null there); a line that is not a JSON object is an error naming the file and line.
//! The batches then go through the same normalisation as parquet's.

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use std::io::{BufRead, BufReader, Cursor};
use std::path::Path;
use std::sync::Arc;

/// Whether `path` names a JSON input (by its extension).
pub fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| ["jsonl", "ndjson", "json"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// A JSON file read and checked: its rows as JSON Lines text, their schema and count.
pub struct JsonFile {
    lines: Vec<u8>,
    pub schema: SchemaRef,
    pub rows: u64,
}

impl JsonFile {
    /// Reads `path`: a JSON array of objects when its first non-blank byte is `[`, else one
    /// object a line (blank lines skipped).
    pub fn open(path: &Path) -> Result<JsonFile> {
        let text = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let mut rows = vec![];
        if text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
            let values: Vec<serde_json::Value> =
                serde_json::from_slice(&text).with_context(|| format!("{}: not a JSON array (truncated, or not JSON at all)", path.display()))?;
            for (i, value) in values.into_iter().enumerate() {
                if !value.is_object() {
                    bail!("{}: element {i} of the array is not a JSON object", path.display());
                }
                rows.push(value);
            }
        } else {
            for (i, line) in BufReader::new(Cursor::new(&text)).lines().enumerate() {
                let line = line.with_context(|| format!("{}: line {}: not UTF-8 text", path.display(), i + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let value: serde_json::Value =
                    serde_json::from_str(&line).with_context(|| format!("{}: line {}: not JSON (a JSON Lines file holds one object a line)", path.display(), i + 1))?;
                if !value.is_object() {
                    bail!("{}: line {}: not a JSON object", path.display(), i + 1);
                }
                rows.push(value);
            }
        }
        let schema = arrow::json::reader::infer_json_schema_from_iterator(rows.iter().map(Ok::<_, ArrowError>))
            .with_context(|| format!("{}: the rows have no common schema", path.display()))?;
        let mut lines = Vec::with_capacity(text.len());
        for row in &rows {
            serde_json::to_writer(&mut lines, row)?;
            lines.push(b'\n');
        }
        Ok(JsonFile { lines, schema: Arc::new(schema), rows: rows.len() as u64 })
    }

    /// The rows as record batches of `batch_rows`, in the file's order.
    pub fn batches(self, batch_rows: usize) -> Result<impl Iterator<Item = Result<RecordBatch, ArrowError>>> {
        let reader = arrow::json::ReaderBuilder::new(self.schema.clone()).with_batch_size(batch_rows).build(Cursor::new(self.lines))?;
        Ok(reader)
    }

    /// An empty batch of the file's schema (for the normalised schema).
    pub fn empty(&self) -> RecordBatch {
        RecordBatch::new_empty(self.schema.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Dataset;

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    #[test]
    fn json_lines_and_arrays_read_as_the_same_normalised_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let lines = write(dir.path(), "q.jsonl", concat!(
            r#"{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]}"#, "\n\n",
            r#"{"question_id": 111, "category": "math", "turns": ["1+1?", "Times 3?"], "reference": ["2", "6"]}"#, "\n"));
        let array = write(dir.path(), "q.json", concat!("[", r#"{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},"#,
            r#"{"question_id": 111, "category": "math", "turns": ["1+1?", "Times 3?"], "reference": ["2", "6"]}"#, "]"));
        let read = |spec: &str| {
            let dataset = Dataset::open(&[spec.to_string()]).unwrap();
            // Without the uuids, which are derived from the file's name and the row.
            let batches: Vec<RecordBatch> = dataset.batches().map(|b| b.map(|b| b.project(&[1, 2, 3, 4]).unwrap())).collect::<Result<_>>().unwrap();
            assert_eq!(dataset.schema.field(0).name(), "uuid");
            (dataset.num_rows, arrow::util::pretty::pretty_format_batches(&batches).unwrap().to_string())
        };
        let (rows, table) = read(&lines);
        assert_eq!(rows, 2);
        assert_eq!(read(&array), (rows, table.clone()), "the array reads as the lines do");
        assert!(table.contains("question_id") && table.contains("Times 3?") && table.contains("[2, 6]"), "{table}");
    }

    #[test]
    fn messages_in_json_lines_are_the_dataset_format_s_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "chat.jsonl", r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}"#);
        let dataset = Dataset::open(&[path]).unwrap();
        dataset.require(&["messages"]).unwrap();
        let batch = dataset.batches().next().unwrap().unwrap();
        let turns = crate::data::messages::read_turns(batch.column_by_name("messages").unwrap().as_ref(), "role", "content");
        assert_eq!(turns[0].as_ref().unwrap()[1].content, "Hello!");
    }

    #[test]
    fn a_bad_line_or_element_is_an_error_naming_the_file_and_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let error = |name: &str, text: &str| format!("{:#}", Dataset::open(&[write(dir.path(), name, text)]).unwrap_err());
        assert!(error("a.jsonl", "{\"a\": 1}\n{\"a\": 2\n").contains("a.jsonl: line 2: not JSON"));
        assert!(error("b.jsonl", "{\"a\": 1}\n[1, 2]\n").contains("b.jsonl: line 2: not a JSON object"));
        assert!(error("c.json", "[{\"a\": 1}, 3]").contains("c.json: element 1 of the array is not a JSON object"));
        assert!(error("d.json", "[{\"a\": 1},").contains("d.json: not a JSON array"));
        assert!(error("e.jsonl", "\n\n").contains("input is empty (0 rows)"));
    }
}
