//! The one dataset format every stage shares: parquet through arrow-rs, with the column catalogue
//! in `schema`, tolerant reading of the shapes users already have (`read`, `normalize`), atomic
//! writing (`write`) and `magpie inspect`.

pub mod inspect;
pub mod messages;
pub mod normalize;
pub mod read;
pub mod schema;
pub mod write;

pub use messages::Message;
pub use read::Dataset;
pub use write::DatasetWriter;

/// Small helpers for tests that write parquet inputs.
#[cfg(test)]
pub(crate) mod test_support {
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
        let mut writer = super::write::parquet_writer(&path, batch.schema()).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        path
    }

    /// Reads every normalised batch of `inputs` into one.
    pub fn read_all(inputs: &[&Path]) -> anyhow::Result<RecordBatch> {
        let specs: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        let dataset = super::Dataset::open(&specs)?;
        let batches: Vec<RecordBatch> = dataset.batches().collect::<anyhow::Result<_>>()?;
        Ok(arrow::compute::concat_batches(&dataset.schema, &batches)?)
    }

    /// The repository's committed fixture `name`.
    pub fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fixtures").join(name)
    }
}
