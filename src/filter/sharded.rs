//! `magpie filter --shard i/N`: row-local steps over every N-th chunk of `--chunk-rows` input
//! rows, so the tasks of a Slurm array (or any N processes) tag, score and filter one dataset
//! together. The output is the chunked, resumable folder synth writes (`data::chunks`): a task
//! that is killed resumes at its first unfinished chunk, and the task that finishes last writes
//! the manifest. Steps that need the whole dataset (the dedups; `select` with `limit`,
//! `sort_by`, `shuffle_seed` or `test_ratio`) are refused: they run in a second, unsharded
//! pass over the sharded output.
//!
//! With `--rejected DIR`, the dropped rows go to a second chunked folder of the same chunks:
//! each chunk writes its rejected part first, then its output part, so a chunk whose output part
//! is there has both, and the two folders are finished together.

use super::rejected::ChunkRejected;
use super::step::{self, Counts, Step};
use super::{FilterPlan, StepConfig};
use crate::data::Dataset;
use crate::data::chunks::{ChunkedOutput, Shard};
use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

impl StepConfig {
    /// Why the step cannot run on a shard of the rows, if it cannot.
    pub fn needs_all_rows(&self) -> Option<&'static str> {
        match self {
            StepConfig::ExactDedup(_) => Some("exact_dedup compares every row with every other"),
            StepConfig::MinhashDedup(_) => Some("minhash_dedup compares every row with every other"),
            StepConfig::SemanticDedup(_) => Some("semantic_dedup compares every row with every other"),
            StepConfig::Select(c) if c.limit.is_some() || c.sort_by.is_some() => Some("select with limit/sort_by ranks every row"),
            StepConfig::Select(c) if c.shuffle_seed.is_some() => Some("select with shuffle_seed shuffles every row"),
            StepConfig::Select(c) if c.test_ratio.is_some() => Some("select with test_ratio splits the whole dataset"),
            _ => None,
        }
    }
}

/// The report of shard i of N: `<report>` with `.shard-i-of-N` before its extension.
fn shard_report(report: &Path, shard: Shard) -> PathBuf {
    let name = report.file_name().unwrap_or_default().to_string_lossy();
    let stem = name.strip_suffix(".json").unwrap_or(&name);
    report.with_file_name(format!("{stem}.shard-{}-of-{}.json", shard.index, shard.count))
}

/// The whole sharded run of this process.
pub fn run(plan: &FilterPlan, shard: Shard, chunk_rows: usize) -> Result<()> {
    for step in &plan.steps {
        if let Some(why) = step.needs_all_rows() {
            bail!("--shard: {why}, so it cannot run on a shard of the rows; run it in a second, unsharded `magpie filter` over the sharded output");
        }
    }
    for (path, flag) in [(Some(plan.output), "the output"), (plan.rejected, "--rejected")] {
        if let Some(path) = path.filter(|p| p.extension().is_some_and(|e| e == "parquet")) {
            bail!("{}: a sharded filter writes {flag} as a folder of parts (so its shards can share it and resume); give a folder", path.display());
        }
    }
    let input = Dataset::open(plan.inputs)?;
    super::require_text(&input, &plan.steps)?;
    let inputs = super::input_paths(&input, plan.inputs);
    // A shard's report of ours is replaced when the shard runs again (it resumes); any other
    // file there is refused.
    let report_path = shard_report(&plan.report, shard);
    super::check_report_path(&report_path, &inputs, true)?;
    let files: Vec<Value> = input.files.iter().map(|f| json!({ "path": f, "bytes": std::fs::metadata(f).map(|m| m.len()).unwrap_or(0) })).collect();
    let settings = json!({ "input": plan.inputs, "files": files, "steps": plan.steps, "chunk_rows": chunk_rows });
    // The models load before the output is claimed: a missing one leaves nothing behind.
    let mut steps = plan.steps.iter().cloned().map(StepConfig::build).collect::<Result<Vec<_>>>()?;
    // Both folders are checked before either is touched.
    let kept = ChunkedOutput::prepare(plan.output, &inputs, "filter", &settings, plan.overwrite)?;
    let rejected = match plan.rejected {
        Some(path) => {
            let not_in = [inputs.clone(), vec![plan.output.to_path_buf()]].concat();
            let settings = json!({ "rejected_rows_of": settings, "output": plan.output });
            Some(ChunkedOutput::prepare(path, &not_in, "filter", &settings, plan.overwrite)?)
        }
        None => None,
    };
    if kept.is_finished() {
        if let (Some(path), Some(false)) = (plan.rejected, rejected.as_ref().map(|r| r.is_finished())) {
            bail!("{}: finished without its rejected rows, which --rejected {} asks for; rerun with --overwrite", plan.output.display(), path.display());
        }
        println!("filter: {} is already finished with these settings; nothing to do", plan.output.display());
        return Ok(());
    }
    // Finished rejected rows (a run killed between the two manifests) need no more parts.
    let rejected = rejected.filter(|r| !r.is_finished()).map(|r| r.apply()).transpose()?;
    let outputs = Outputs { kept: kept.apply()?, rejected };
    let mut counts = vec![Counts::default(); steps.len()];
    let chunks = input.num_rows.div_ceil(chunk_rows as u64) as usize;
    let todo = |chunk: usize| shard.takes(chunk) && !outputs.is_done(chunk);

    let mut ran = 0;
    let mut pending: Vec<RecordBatch> = vec![];
    let (mut chunk, mut filled) = (0, 0);
    for batch in input.batches() {
        let mut batch = batch?;
        while batch.num_rows() > 0 {
            let take = (chunk_rows - filled).min(batch.num_rows());
            if todo(chunk) {
                pending.push(batch.slice(0, take));
            }
            filled += take;
            batch = batch.slice(take, batch.num_rows() - take);
            if filled == chunk_rows {
                ran += run_chunk(&outputs, chunk, std::mem::take(&mut pending), &mut steps, &mut counts)?;
                (chunk, filled) = (chunk + 1, 0);
            }
        }
    }
    if filled > 0 {
        ran += run_chunk(&outputs, chunk, pending, &mut steps, &mut counts)?;
    }

    let step_reports = step::reports(&steps, &counts);
    let report = json!({
        "tool": crate::run::tool(), "input": plan.inputs, "output": plan.output, "shard": shard,
        "rejected": plan.rejected, "chunks": chunks, "chunks_run": ran, "steps": step_reports,
    });
    crate::run::write_atomically(&report_path, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("{}: cannot write the report", report_path.display()))?;
    println!("filter: shard {}/{}: {ran} chunk(s) of {chunk_rows} rows run -> {}", shard.index, shard.count, plan.output.display());
    println!("report: {}", report_path.display());
    if !outputs.finish_if_complete(chunks)? {
        println!("  other shards' chunks are still missing; the dataset is finished when the last shard is done");
    }
    Ok(())
}

/// The chunked folders a sharded run writes: the kept rows, and the dropped ones when asked.
struct Outputs {
    kept: ChunkedOutput,
    rejected: Option<ChunkedOutput>,
}

impl Outputs {
    fn is_done(&self, chunk: usize) -> bool {
        self.kept.is_done(chunk) && self.rejected.as_ref().is_none_or(|r| r.is_done(chunk))
    }

    /// Once both folders have every part: the rejected manifest first, as the output's marks
    /// the run finished.
    fn finish_if_complete(&self, chunks: usize) -> Result<bool> {
        if !(0..chunks).all(|c| self.is_done(c)) {
            return Ok(false);
        }
        if let Some(rejected) = &self.rejected {
            rejected.finish_if_complete(chunks)?;
        }
        self.kept.finish_if_complete(chunks)
    }
}

/// Runs the steps over one chunk's rows and writes its parts (the rejected one first); 0 when
/// the chunk is not this process's to run (no rows were kept for it).
fn run_chunk(outputs: &Outputs, chunk: usize, batches: Vec<RecordBatch>, steps: &mut [Box<dyn Step>], counts: &mut [Counts]) -> Result<usize> {
    let Some(first) = batches.first() else { return Ok(0) };
    let mut batch = arrow::compute::concat_batches(&first.schema(), &batches)?;
    let mut dropped = outputs.rejected.as_ref().map(|_| ChunkRejected::default());
    for (step, count) in steps.iter_mut().zip(counts.iter_mut()) {
        batch = step::apply(step, count, batch, &mut dropped)?;
    }
    if let (Some(rejected), Some(dropped)) = (&outputs.rejected, dropped) {
        rejected.write(chunk, &dropped.part(&batch.schema())?)?;
    }
    outputs.kept.write(chunk, &batch)?;
    Ok(1)
}
