//! Synth's resumable output: a directory of `part-NNNNN.parquet` files, one per finished chunk
//! (NNNNN is the chunk index, global across shards), plus `synth.json`, the settings that
//! determine the rows. A rerun with the same settings skips the chunks whose part exists; a rerun
//! with different settings is refused, naming what differs.

use crate::data::write::{parquet_writer, part_name, temporary_sibling};
use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "synth.json";

pub struct Checkpoint {
    dir: PathBuf,
}

impl Checkpoint {
    /// Opens (or creates) `dir` for a run whose row-determining settings are `settings`.
    pub fn open(dir: &Path, settings: &Value) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create output directory", dir.display()))?;
        let manifest = dir.join(MANIFEST);
        if manifest.exists() {
            let text = std::fs::read_to_string(&manifest).with_context(|| format!("{}: cannot read", manifest.display()))?;
            let earlier: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", manifest.display()))?;
            let mut differing = vec![];
            differing_keys("", &earlier, settings, &mut differing);
            if !differing.is_empty() {
                bail!(
                    "{}: holds a run with other settings ({}); use another --output to start a new run",
                    dir.display(),
                    differing.join(", ")
                );
            }
        } else {
            let has_parts = std::fs::read_dir(dir)?.flatten().any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
            if has_parts {
                bail!("{}: holds parquet files but no {MANIFEST}; use an empty or new --output", dir.display());
            }
            crate::data::write::write_atomically(&manifest, serde_json::to_string_pretty(settings)?.as_bytes())?;
        }
        Ok(Checkpoint { dir: dir.to_path_buf() })
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
        let tmp = temporary_sibling(&target)?;
        let mut writer = parquet_writer(&tmp, batch.schema())?;
        writer.write(batch)?;
        writer.close()?;
        std::fs::rename(&tmp, &target).with_context(|| format!("{}: cannot rename into place", target.display()))
    }
}

/// Dotted paths (`args.seed`) of the settings that differ between two runs.
fn differing_keys(path: &str, earlier: &Value, now: &Value, out: &mut Vec<String>) {
    match (earlier, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let (x, y) = (a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null));
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                differing_keys(&child, x, y, out);
            }
        }
        (a, b) if a != b => out.push(path.to_string()),
        _ => {}
    }
}
