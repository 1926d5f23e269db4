//! Synth's resumable output: a folder of `part-NNNNN.parquet` files, one per finished chunk
//! (NNNNN is the chunk index, global across shards), plus the run claim (`.magpie-run.json`, the
//! settings that determine the rows; hidden, as the manifest is) and, once every chunk of every shard is there, the manifest
//! that marks the dataset finished (`crate::run`).
//!
//! A rerun with the same settings skips the chunks whose part exists; a rerun with different
//! settings is refused, naming what differs. A finished output is left as it is, unless
//! `--overwrite` asks for a new run in its place.

use crate::data::write::{part_name, write_batch};
use crate::run::{self, Provenance, Resuming, RunDir};
use anyhow::{Context, Result};
use arrow::array::RecordBatch;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    run: RunDir,
    provenance: Provenance,
}

/// The names a synth run writes into its folder besides the markers.
fn owns(name: &str) -> bool {
    name.strip_prefix("part-").and_then(|n| n.strip_suffix(".parquet")).is_some_and(|n| n.len() == 5 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// What opening the output found.
pub enum Opened {
    /// Chunks to write (some may be done already).
    Run(Checkpoint),
    /// A finished output with the same settings: nothing to do.
    AlreadyFinished,
}

impl Checkpoint {
    /// Opens (or creates) `dir` for a run whose row-determining settings are `settings`, after
    /// checking it against the inputs (`model`) and what is already there.
    pub fn open(dir: &Path, inputs: &[PathBuf], settings: &Value, overwrite: bool) -> Result<Opened> {
        let prepared = RunDir::prepare(dir, inputs, "synth", settings, owns, overwrite, Resuming::Always)?;
        if prepared.opened == run::Opened::Finished {
            return Ok(Opened::AlreadyFinished);
        }
        Ok(Opened::Run(Checkpoint { run: prepared.apply()?, provenance: Provenance::new("synth", settings) }))
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
        let tmp = run::temporary_sibling(&target)?;
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
        let rows = (0..chunks).map(|c| run::parquet_rows(&self.part_path(c))).sum::<Result<u64>>()?;
        self.run.finish(".part-", "dataset", Some(rows), &self.provenance)?;
        Ok(true)
    }
}

