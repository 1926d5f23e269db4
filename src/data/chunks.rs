//! A resumable output written chunk by chunk, shared by the stages that can be split over
//! processes (synth, and filter's row-local steps): a folder of `part-NNNNN.parquet` files, one
//! per finished chunk (NNNNN is the chunk index, global across shards), the run claim
//! (`.magpie-run.json`, the settings that determine the rows) and, once every chunk of every
//! shard is there, the manifest that marks the dataset finished.
//!
//! A rerun with the same settings skips the chunks whose part exists; a rerun with different
//! settings is refused, naming what differs. A finished output is left as it is, unless
//! `--overwrite` asks for a new run in its place.
//!
//! [`Shard`] says which chunks a process takes: every N-th, so the tasks of a Slurm array write
//! disjoint parts of one folder.

use super::write::{part_name, write_batch};
use crate::run::{Opened, Prepared, Provenance, Resuming, RunDir};
use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `i/N`: this process takes every N-th chunk, starting at chunk i.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// `--shard`'s parser.
pub fn parse_shard(text: &str) -> Result<Shard, String> {
    let (i, n) = text.split_once('/').ok_or("expected i/N, e.g. 0/4")?;
    let shard = Shard {
        index: i.trim().parse().map_err(|_| format!("`{i}` is not a shard index"))?,
        count: n.trim().parse().map_err(|_| format!("`{n}` is not a shard count"))?,
    };
    if shard.count == 0 || shard.index >= shard.count {
        return Err(format!("shard {}/{} is out of range", shard.index, shard.count));
    }
    Ok(shard)
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// From `--shard`, else Slurm's array variables, else the whole job.
    pub fn resolve(explicit: Option<Shard>) -> Result<Shard> {
        if let Some(shard) = explicit {
            return Ok(shard);
        }
        match (std::env::var("SLURM_ARRAY_TASK_ID"), std::env::var("SLURM_ARRAY_TASK_COUNT")) {
            (Ok(id), Ok(count)) => parse_shard(&format!("{id}/{count}"))
                .map_err(|e| anyhow::anyhow!("SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT: {e}")),
            _ => Ok(Shard::WHOLE),
        }
    }

    /// Whether `chunk` is this shard's.
    pub fn takes(self, chunk: usize) -> bool {
        chunk % self.count == self.index
    }

    /// This shard's chunks of `chunks`.
    pub fn chunks(self, chunks: usize) -> impl Iterator<Item = usize> {
        (0..chunks).filter(move |&c| self.takes(c))
    }
}

/// The names a chunked run writes into its folder besides the markers.
fn owns(name: &str) -> bool {
    name.strip_prefix("part-").and_then(|n| n.strip_suffix(".parquet")).is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

pub struct ChunkedOutput {
    run: RunDir,
    provenance: Provenance,
}

/// A chunked output checked against the inputs and what is already there, nothing touched yet:
/// a run that writes two decides both before it removes or claims anything.
pub struct PreparedChunks {
    prepared: Prepared,
    provenance: Provenance,
}

impl PreparedChunks {
    /// A finished output with the same settings is there: nothing to do.
    pub fn is_finished(&self) -> bool {
        self.prepared.opened == Opened::Finished
    }

    /// Removes what `--overwrite` replaces and claims the folder (or resumes it).
    pub fn apply(self) -> Result<ChunkedOutput> {
        Ok(ChunkedOutput { run: self.prepared.apply()?, provenance: self.provenance })
    }
}

impl ChunkedOutput {
    /// Checks `dir` for `command`'s run whose row-determining settings are `settings` against
    /// the inputs and what is already there.
    pub fn prepare(dir: &Path, inputs: &[PathBuf], command: &str, settings: &Value, overwrite: bool) -> Result<PreparedChunks> {
        let prepared = RunDir::prepare(dir, inputs, command, settings, owns, overwrite, Resuming::Always)?;
        Ok(PreparedChunks { prepared, provenance: Provenance::new(command, settings) })
    }

    /// Opens (or creates) `dir` as [`ChunkedOutput::prepare`] checks it. `None`: a finished
    /// output with the same settings, nothing to do.
    pub fn open(dir: &Path, inputs: &[PathBuf], command: &str, settings: &Value, overwrite: bool) -> Result<Option<Self>> {
        let prepared = Self::prepare(dir, inputs, command, settings, overwrite)?;
        if prepared.is_finished() {
            return Ok(None);
        }
        prepared.apply().map(Some)
    }

    pub fn part_path(&self, chunk: usize) -> PathBuf {
        self.run.dir.join(part_name(chunk))
    }

    pub fn is_done(&self, chunk: usize) -> bool {
        self.part_path(chunk).is_file()
    }

    /// Writes a finished chunk: to a hidden temporary file, then renamed into place.
    pub fn write(&self, chunk: usize, batch: &RecordBatch) -> Result<()> {
        let target = self.part_path(chunk);
        let tmp = crate::run::temporary_sibling(&target)?;
        if let Err(e) = write_batch(&tmp, batch, None) {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &target).with_context(|| format!("{}: cannot rename into place", target.display()))
    }

    /// Once all `chunks` parts are there (every shard done), writes the manifest that marks the
    /// dataset finished and removes what interrupted runs left. Returns whether it did.
    pub fn finish_if_complete(&self, chunks: usize) -> Result<bool> {
        if !(0..chunks).all(|c| self.is_done(c)) {
            return Ok(false);
        }
        let rows = (0..chunks).map(|c| crate::run::parquet_rows(&self.part_path(c))).sum::<Result<u64>>()?;
        self.run.finish(".part-", "dataset", Some(rows), &self.provenance)?;
        Ok(true)
    }
}
