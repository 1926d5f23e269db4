//! Filter steps and the runner that chains them, datatrove style: every step turns record
//! batches into record batches and carries through the columns it does not know.
//!
//! A step that needs the whole dataset before it can decide (dedup, top-k) says so with
//! `needs_scan`: the runner first streams every batch through its `scan`, keeping only what the
//! step stores per row (hashes, sort keys), then streams the batches again through `apply`.
//! Consecutive steps that need no scan share one pass. Between passes the data is written to a
//! hidden temporary dataset beside the output.

use crate::data::write::Staged;
use crate::data::{Dataset, DatasetWriter};
use crate::run::Provenance;
use super::rejected::{KeepRejected, RejectedRows};
use anyhow::{Context, Result};
use arrow::array::{ArrayRef, BooleanArray, RecordBatch};
use arrow::datatypes::{Field, Schema};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

pub trait Step {
    fn name(&self) -> &'static str;

    /// Whether `scan` must see every row before `apply` runs.
    fn needs_scan(&self) -> bool {
        false
    }

    /// Sees every batch, in the order `apply` will see them.
    fn scan(&mut self, _batch: &RecordBatch) -> Result<()> {
        Ok(())
    }

    /// Called once after the last `scan`.
    fn finish_scan(&mut self) -> Result<()> {
        Ok(())
    }

    /// Transforms one batch: drops rows, adds columns.
    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch>;

    /// Rows held back by `apply` (a shuffle), emitted after the last batch.
    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        Ok(None)
    }

    /// Why rows were dropped, and anything else worth reporting.
    fn report(&self) -> Value {
        json!({})
    }

    /// The rows the last `apply` dropped, with why (for `--rejected`); steps that drop rows
    /// keep them until asked.
    fn take_rejected(&mut self) -> Option<Rejected> {
        None
    }
}

/// Rows a step dropped from one batch, each with its reason.
pub struct Rejected {
    pub rows: RecordBatch,
    pub reasons: Vec<String>,
}

impl Rejected {
    /// The rows of `batch` that `keep` marks false, row i with `reason(i)`; `None` when `keep`
    /// drops none.
    pub fn of(batch: &RecordBatch, keep: &BooleanArray, reason: impl Fn(usize) -> String) -> Result<Option<Rejected>> {
        if keep.false_count() == 0 {
            return Ok(None);
        }
        let reasons = (0..batch.num_rows()).filter(|&i| !keep.value(i)).map(reason).collect();
        let rows = arrow::compute::filter_record_batch(batch, &arrow::compute::not(keep)?)?;
        Ok(Some(Rejected { rows, reasons }))
    }
}

/// What the dedup steps share: counting the rows they mark as duplicates, and dropping them or
/// keeping them (for `select`'s `keep_dedup`) as the step's `drop` option says. A dropped row's
/// reason names the row it duplicates, from the step's marker column.
pub struct Duplicates {
    drop: bool,
    found: u64,
    /// `exact duplicate`, `near duplicate (minhash)`, ...
    kind: &'static str,
    /// The column holding the uuid of the row kept in a duplicate's place.
    marker: &'static str,
    rejected: Option<Rejected>,
}

impl Duplicates {
    pub fn new(drop: bool, kind: &'static str, marker: &'static str) -> Self {
        Duplicates { drop, found: 0, kind, marker, rejected: None }
    }

    /// Counts the rows `keep` marks false and drops them when `drop` is set; `batch` already
    /// holds the marker column.
    pub fn settle(&mut self, batch: RecordBatch, keep: &BooleanArray) -> Result<RecordBatch> {
        self.found += keep.false_count() as u64;
        if !self.drop {
            return Ok(batch);
        }
        let marks = batch.column_by_name(self.marker).and_then(crate::data::messages::as_utf8).context("internal: dedup marker column missing")?;
        self.rejected = Rejected::of(&batch, keep, |i| format!("{} of {}", self.kind, marks.value(i)))?;
        Ok(arrow::compute::filter_record_batch(&batch, keep)?)
    }

    pub fn take_rejected(&mut self) -> Option<Rejected> {
        self.rejected.take()
    }

    /// `duplicates` and `dropped` for the step's report.
    pub fn report(&self) -> serde_json::Map<String, Value> {
        let dropped = if self.drop { self.found } else { 0 };
        [("duplicates".to_string(), json!(self.found)), ("dropped".to_string(), json!(dropped))].into_iter().collect()
    }
}

/// `batch` with `name` replaced in place, or appended.
pub fn with_column(batch: RecordBatch, name: &str, array: ArrayRef) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = batch.columns().to_vec();
    let field = Field::new(name, array.data_type().clone(), true);
    match schema.index_of(name) {
        Ok(i) => {
            fields[i] = field;
            columns[i] = array;
        }
        Err(_) => {
            fields.push(field);
            columns.push(array);
        }
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

/// Rows in and out of one step, and the time spent in its own calls (reading and writing the
/// data is not counted).
#[derive(Default, Clone, Copy)]
pub struct Counts {
    rows_in: u64,
    rows_out: u64,
    seconds: f64,
}

/// Runs `f`, adding its wall time to `seconds`.
fn timed<T>(seconds: &mut f64, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let result = f();
    *seconds += start.elapsed().as_secs_f64();
    result
}

/// The finished outputs of a run, not yet in place (see [`Staged`]), and the per-step report.
pub struct Finished {
    pub output: Staged,
    /// With `--rejected`: every dropped row, with `drop_step` and `drop_reason`.
    pub rejected: Option<Staged>,
    pub reports: Vec<Value>,
}

/// Runs `steps` over `input` into `output`, and the rows they drop into `rejected` when given.
pub fn run(input: Dataset, mut steps: Vec<Box<dyn Step>>, output: &Path, rejected: Option<&Path>, provenance: &Provenance) -> Result<Finished> {
    let scratch = crate::run::temporary_sibling(&output.with_extension("filter-scratch"))?;
    std::fs::create_dir_all(&scratch).with_context(|| format!("{}: cannot create", scratch.display()))?;
    let _cleanup = RemoveOnDrop(scratch.clone());
    let mut counts = vec![Counts::default(); steps.len()];
    let input_schema = input.schema.clone();
    let mut dropped = rejected.map(|_| RejectedRows::new(&scratch));

    let mut current = Some(input);
    let mut pass_start = 0;
    for i in 0..steps.len() {
        if !steps[i].needs_scan() {
            continue;
        }
        if i > pass_start {
            let target = scratch.join(format!("pass-{i}"));
            let staged = stream(current.as_ref(), &mut steps[pass_start..i], &mut counts[pass_start..i], &mut dropped, &target, provenance)?;
            current = match staged.map(Staged::commit).transpose()? {
                Some(rows) if rows > 0 => Some(Dataset::open(&[target.display().to_string()])?),
                _ => None,
            };
        }
        let step = &mut steps[i];
        let seconds = &mut counts[i].seconds;
        if let Some(dataset) = &current {
            for batch in dataset.batches() {
                let batch = batch?;
                timed(seconds, || step.scan(&batch))?;
            }
        }
        timed(seconds, || step.finish_scan())?;
        pass_start = i;
    }
    let staged = stream(current.as_ref(), &mut steps[pass_start..], &mut counts[pass_start..], &mut dropped, output, provenance)?
        .with_context(|| format!("the input has no rows; nothing to write to {}", output.display()))?;
    let rejected = match (dropped, rejected) {
        (Some(rows), Some(target)) => Some(rows.finish(target, &input_schema, provenance)?),
        _ => None,
    };

    Ok(Finished { output: staged, rejected, reports: reports(&steps, &counts) })
}

/// Each step's report entry: its name, rows in and out, seconds, and its own fields.
pub fn reports(steps: &[Box<dyn Step>], counts: &[Counts]) -> Vec<Value> {
    steps
        .iter()
        .zip(counts)
        .map(|(step, c)| {
            let mut entry = json!({ "step": step.name(), "rows_in": c.rows_in, "rows_out": c.rows_out, "seconds": c.seconds });
            if let (Value::Object(entry), Value::Object(extra)) = (&mut entry, step.report()) {
                entry.extend(extra);
            }
            entry
        })
        .collect()
}

/// Runs one step on `batch`, counting rows in and out, and keeps what it dropped when asked.
pub fn apply(step: &mut Box<dyn Step>, count: &mut Counts, batch: RecordBatch, dropped: &mut dyn KeepRejected) -> Result<RecordBatch> {
    count.rows_in += batch.num_rows() as u64;
    let batch = timed(&mut count.seconds, || step.apply(batch))?;
    count.rows_out += batch.num_rows() as u64;
    if let Some(rejected) = step.take_rejected() {
        dropped.keep(step.name(), rejected)?;
    }
    Ok(batch)
}

/// Streams `input` through `steps` into a new dataset for `target`, finished but not yet in
/// place; `None` when not one batch came through.
fn stream(input: Option<&Dataset>, steps: &mut [Box<dyn Step>], counts: &mut [Counts], dropped: &mut Option<RejectedRows>, target: &Path, provenance: &Provenance) -> Result<Option<Staged>> {
    let Some(input) = input else {
        anyhow::bail!("every row was filtered out before the last step; nothing to write to {}", target.display());
    };
    let mut writer: Option<DatasetWriter> = None;
    let write = |batch: RecordBatch, writer: &mut Option<DatasetWriter>| -> Result<()> {
        if writer.is_none() {
            *writer = Some(DatasetWriter::create(target, batch.schema(), provenance)?);
        }
        writer.as_mut().unwrap().write(&batch)
    };
    for batch in input.batches() {
        let mut batch = batch?;
        for (step, count) in steps.iter_mut().zip(counts.iter_mut()) {
            batch = apply(step, count, batch, dropped)?;
        }
        write(batch, &mut writer)?;
    }
    // Held-back rows go through the steps after the one that held them.
    for i in 0..steps.len() {
        if let Some(mut batch) = timed(&mut counts[i].seconds, || steps[i].flush())? {
            counts[i].rows_out += batch.num_rows() as u64;
            for (step, count) in steps[i + 1..].iter_mut().zip(counts[i + 1..].iter_mut()) {
                batch = apply(step, count, batch, dropped)?;
            }
            write(batch, &mut writer)?;
        }
    }
    writer.map(DatasetWriter::finish).transpose()
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
