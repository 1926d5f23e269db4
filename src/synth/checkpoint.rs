//! Synth's resumable output: a folder of `part-NNNNN.parquet` files, one per finished chunk
//! (NNNNN is the chunk index, global across shards), plus the run claim (`.magpie-run.json`, the
//! settings that determine the rows; hidden, as the manifest is) and, once every chunk of every shard is there, the manifest
//! that marks the dataset finished (`crate::run`).
//!
//! A rerun with the same settings skips the chunks whose part exists; a rerun with different
//! settings is refused, naming what differs. A finished output is left as it is, unless
//! `--overwrite` asks for a new run in its place.

use crate::data::write::{part_name, write_batch};
use crate::run::{self, Existing, Manifest, Provenance, Rules, RUN_CLAIM};
use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub struct Checkpoint {
    dir: PathBuf,
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
        let rules = Rules { overwrite, resumable: Some(owns) };
        let existing = run::check(dir, inputs, &rules)?;
        let provenance = Provenance::new("synth", settings);
        if existing == Existing::Finished && run::claim_path(dir).is_none() {
            // A finished output of another stage (no synth claim): only --overwrite replaces it.
            if !overwrite {
                bail!("{}: holds a finished magpie output that is not a synth run; pass --overwrite to replace it, or use another --output", dir.display());
            }
            run::clear_finished(dir)?;
        } else if existing != Existing::Nothing {
            let earlier = run::read_claim(dir)?.with_context(|| format!("{}: holds no run claim", dir.display()))?;
            let mut differing = vec![];
            run::differing_keys("", &earlier["settings"], settings, &mut differing);
            match (existing, differing.is_empty(), overwrite) {
                (Existing::Finished, true, false) => return Ok(Opened::AlreadyFinished),
                (Existing::Finished, _, true) => run::clear_finished(dir)?,
                (Existing::Finished, false, false) => bail!(
                    "{}: holds a finished synth run with other settings ({}); pass --overwrite to replace it, or use another --output",
                    dir.display(),
                    differing.join(", ")
                ),
                (_, false, _) => bail!(
                    "{}: holds an unfinished synth run with other settings ({}); rerun it with the same ones, or use another --output",
                    dir.display(),
                    differing.join(", ")
                ),
                _ => {}
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create output directory", dir.display()))?;
        if run::claim_path(dir).is_none() {
            run::write_atomically(&dir.join(RUN_CLAIM), serde_json::to_string_pretty(&json!({ "stage": "synth", "settings": settings }))?.as_bytes())?;
        }
        Ok(Opened::Run(Checkpoint { dir: dir.to_path_buf(), provenance }))
    }

    pub fn part_path(&self, chunk: usize) -> PathBuf {
        self.dir.join(part_name(chunk))
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
        run::sweep_temporaries(&self.dir, ".part-");
        let rows = (0..chunks).map(|c| run::parquet_rows(&self.part_path(c))).sum::<Result<u64>>()?;
        Manifest::write(&self.dir, "dataset", Some(rows), &self.provenance)?;
        Ok(true)
    }
}

