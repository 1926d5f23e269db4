//! `magpie inspect`: how a user looks at any file in the pipeline. For each input it prints the
//! row count, the schema with per-column null counts, length statistics (characters for text,
//! items for lists, turns for conversations, values for numbers) and a few sample conversations.
//! It reads through the same normaliser as every stage, so it shows what the stages will see.
//! For a magpie output it shows how it was made (the manifest, or a single file's footer). Text
//! from the data is printed with control characters escaped, so no file can drive the terminal.

use super::messages::{read_turns, Message};
use super::read::Dataset;
use anyhow::Result;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use std::fmt::Write as _;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// Datasets to inspect: parquet files, directories of parts, or globs. Each is shown alone.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<String>,

    /// How many sample rows to print per input.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,

    /// Also hash every file of a magpie output folder (datasets, models, checkpoints, training
    /// runs) and compare with its manifest; a folder that is not a dataset is only verified.
    /// Without it, only sizes and parquet row counts are checked.
    #[arg(long)]
    pub verify: bool,
}

/// Running min / mean / max of one column's measure.
#[derive(Default, Clone)]
struct Summary {
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Summary {
    fn add(&mut self, value: f64) {
        if self.count == 0 || value < self.min {
            self.min = value;
        }
        if self.count == 0 || value > self.max {
            self.max = value;
        }
        self.count += 1;
        self.sum += value;
    }
}

/// What is measured for a column, by its type.
fn measure_name(data_type: &DataType) -> Option<&'static str> {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Some("chars"),
        DataType::List(f) | DataType::LargeList(f) if matches!(f.data_type(), DataType::Struct(_)) => Some("turns"),
        DataType::List(_) | DataType::LargeList(_) => Some("items"),
        t if t.is_numeric() => Some("value"),
        _ => None,
    }
}

fn measure(array: &dyn Array, summary: &mut Summary) {
    let data_type = array.data_type();
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let text = cast(array as &dyn Array as &_, &DataType::Utf8).ok();
            let text = text.as_ref().map(|a| a.as_string::<i32>());
            for value in text.into_iter().flatten().flatten() {
                summary.add(value.chars().count() as f64);
            }
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            (0..list.len()).filter(|&i| list.is_valid(i)).for_each(|i| summary.add(list.value_length(i) as f64));
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            (0..list.len()).filter(|&i| list.is_valid(i)).for_each(|i| summary.add(list.value_length(i) as f64));
        }
        t if t.is_numeric() => {
            if let Ok(values) = cast(&arrow::array::make_array(array.to_data()), &DataType::Float64) {
                values.as_primitive::<arrow::datatypes::Float64Type>().iter().flatten().for_each(|v| summary.add(v));
            }
        }
        _ => {}
    }
}

pub fn run(args: &InspectArgs) -> Result<()> {
    for input in &args.inputs {
        if args.verify {
            let dir = std::path::Path::new(input);
            let Some(manifest) = crate::run::Manifest::read(dir)? else {
                anyhow::bail!("{input}: --verify needs a magpie output folder (one with {})", crate::run::MANIFEST);
            };
            manifest.verify(dir)?;
            let files = manifest.files.len();
            println!("verified: {files} file{} of {} match {}", if files == 1 { "" } else { "s" }, printable(input), crate::run::MANIFEST);
            if manifest.kind != "dataset" {
                continue;
            }
        }
        print!("{}", report(input, args.samples)?);
    }
    Ok(())
}

/// The full text report for one input.
pub fn report(input: &str, samples: usize) -> Result<String> {
    let dataset = Dataset::open(std::slice::from_ref(&input.to_string()))?;
    let fields = dataset.schema.fields().clone();
    let mut nulls = vec![0u64; fields.len()];
    let mut summaries = vec![Summary::default(); fields.len()];
    let mut sample_rows: Vec<RecordBatch> = vec![];
    let mut sampled = 0;
    for batch in dataset.batches() {
        let batch = batch?;
        for (i, column) in batch.columns().iter().enumerate() {
            nulls[i] += column.null_count() as u64;
            measure(column.as_ref(), &mut summaries[i]);
        }
        if sampled < samples {
            let take = (samples - sampled).min(batch.num_rows());
            sample_rows.push(batch.slice(0, take));
            sampled += take;
        }
    }

    let mut out = String::new();
    let files = dataset.files.len();
    writeln!(out, "== {} ({files} file{})", printable(&dataset.name), if files == 1 { "" } else { "s" })?;
    if let Some(made) = provenance(input)? {
        writeln!(out, "made by: {made}")?;
    }
    writeln!(out, "rows: {}", dataset.num_rows)?;
    writeln!(out, "columns:")?;
    let width = fields.iter().map(|f| printable(f.name()).chars().count()).max().unwrap_or(0);
    for (i, field) in fields.iter().enumerate() {
        let mut line = format!("  {:width$}  nulls {:>7}", printable(field.name()), nulls[i]);
        if let Some(name) = measure_name(field.data_type())
            && summaries[i].count > 0
        {
            let s = &summaries[i];
            write!(line, "  {name} min {} mean {:.1} max {}", s.min, s.sum / s.count as f64, s.max)?;
        }
        writeln!(out, "{line}  [{}]", field.data_type())?;
    }
    for batch in &sample_rows {
        for row in 0..batch.num_rows() {
            write_sample(&mut out, batch, row)?;
        }
    }
    Ok(out)
}

fn write_sample(out: &mut String, batch: &RecordBatch, row: usize) -> Result<()> {
    let uuid = batch.column_by_name("uuid").map(|a| a.as_string::<i32>().value(row).to_string()).unwrap_or_default();
    writeln!(out, "--- sample uuid={}", printable(&uuid))?;
    let turns = |name: &str| -> Option<Vec<Message>> {
        let array = batch.column_by_name(name)?;
        read_turns(array.slice(row, 1).as_ref(), "role", "content").pop().flatten()
    };
    for name in ["messages", "prompt", "chosen", "rejected"] {
        let Some(messages) = turns(name) else { continue };
        if name != "messages" {
            writeln!(out, "  ({name})")?;
        }
        for message in messages {
            writeln!(out, "  [{}] {}", printable(&message.role), preview(&message.content))?;
        }
    }
    Ok(())
}

/// One line on how a magpie output was made: its manifest, or a single file's parquet footer.
fn provenance(input: &str) -> Result<Option<String>> {
    let path = std::path::Path::new(input);
    let (tool, stage, command, kind) = if path.is_dir() {
        let Some(m) = crate::run::Manifest::read(path)? else { return Ok(None) };
        (m.tool, m.provenance.stage, m.provenance.command, format!("{}, {} files", m.kind, m.files.len()))
    } else {
        let Some(footer) = crate::run::provenance_of(path) else { return Ok(None) };
        let Ok(p) = serde_json::from_value::<crate::run::Provenance>(footer["provenance"].clone()) else { return Ok(None) };
        (footer["tool"].as_str().unwrap_or("magpie").to_string(), p.stage, p.command, "dataset, 1 file".to_string())
    };
    Ok(Some(printable(&format!("{tool} {stage} ({kind}): {}", command.join(" ")))))
}

/// `text` on one line with every control character escaped: a newline shows as ⏎, others as
/// `\u{1b}` and the like (ESC, BEL and NUL would otherwise reach the terminal).
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('⏎'),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// The first 300 characters of `text`, on one line, control characters escaped.
fn preview(text: &str) -> String {
    let head: String = text.chars().take(300).collect();
    let flat = printable(&head);
    if text.chars().count() > 300 { format!("{flat}…") } else { flat }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_before_they_reach_a_terminal() {
        let shown = preview("red\u{1b}[31m alert\u{7}\u{0}\nnext\ttab");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
        assert_eq!(shown, "red\\u{1b}[31m alert\\u{7}\\u{0}⏎next\\u{9}tab");
    }
}
