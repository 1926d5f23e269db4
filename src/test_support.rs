//! Helpers the unit tests share: parquet inputs, the committed fixtures, and the models set-up
//! installed (scripts/test.sh runs set-up first).

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn text(values: &[&str]) -> ArrayRef {
    Arc::new(StringArray::from(values.to_vec()))
}

/// A batch from named columns, every field nullable.
pub fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
    RecordBatch::try_from_iter_with_nullable(columns.into_iter().map(|(n, a)| (n, a, true))).unwrap()
}

/// Writes `batch` to `dir/name` with a plain parquet writer.
pub fn write(dir: &Path, name: &str, batch: &RecordBatch) -> PathBuf {
    let path = dir.join(name);
    crate::data::write::write_batch(&path, batch, None).unwrap();
    path
}

/// Reads every normalised batch of `inputs` into one.
pub fn read_all(inputs: &[&Path]) -> anyhow::Result<RecordBatch> {
    let specs: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    let dataset = crate::data::Dataset::open(&specs)?;
    let batches: Vec<RecordBatch> = dataset.batches().collect::<anyhow::Result<_>>()?;
    Ok(arrow::compute::concat_batches(&dataset.schema, &batches)?)
}

/// The repository's committed fixture `name` (data/fixtures).
pub fn fixture(name: &str) -> PathBuf {
    // At run time first: a test binary carried to another machine (scripts/gpu-check.sh) is
    // pointed at that machine's checkout.
    let root = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("data/fixtures").join(name)
}

/// Where set-up put the models: `$MAGPIE_HOME` if set, else the checkout's `models/`.
pub fn magpie_home() -> PathBuf {
    std::env::var_os("MAGPIE_HOME").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// The embedded generation model.
pub fn test_model() -> PathBuf {
    let path = magpie_home().join(crate::home::DEFAULT_MODEL_FILE);
    assert!(path.exists(), "{}: run scripts/setup.sh first", path.display());
    path
}
