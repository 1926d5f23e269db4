//! Writing datasets atomically: a single `.parquet` file, or a directory of
//! `part-NNNNN.parquet` parts. Everything goes to a hidden temporary name beside the target and is
//! renamed into place by `finish`; an error, a drop without `finish` or a kill leaves no file that
//! looks finished (readers skip hidden names).

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Rows per part file when writing a directory.
pub const PART_ROWS: usize = 100_000;

/// The name of part `index` in a directory output.
pub fn part_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder().set_compression(Compression::SNAPPY).build()
}

/// Opens a parquet writer on `path` with magpie's writer settings.
pub fn parquet_writer(path: &Path, schema: SchemaRef) -> Result<ArrowWriter<File>> {
    let file = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    Ok(ArrowWriter::try_new(file, schema, Some(writer_properties()))?)
}

/// A hidden sibling of `target` to write into before the final rename.
pub fn temporary_sibling(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().with_context(|| format!("{}: not a file name", target.display()))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("{}: parent directory does not exist", target.display());
    }
    Ok(parent.join(format!(".{}.magpie-tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// Writes `bytes` to `target` through a temporary sibling and a rename.
pub fn write_atomically(target: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(target)?;
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, target).with_context(|| format!("{}: cannot rename into place", target.display()))
}

/// Fills a fresh temporary sibling directory with `fill`, then renames it over `target`, so a
/// kill never leaves a half-written directory there.
pub fn write_dir_atomically(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(target)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if target.exists() {
        std::fs::remove_dir_all(target).with_context(|| format!("{}: cannot replace", target.display()))?;
    }
    std::fs::rename(&tmp, target).with_context(|| format!("{}: cannot rename into place", target.display()))
}

/// Streams record batches into `target`; nothing is visible there until [`DatasetWriter::finish`].
pub struct DatasetWriter {
    target: PathBuf,
    tmp: PathBuf,
    schema: SchemaRef,
    /// `None` for a single-file output.
    part_rows: Option<usize>,
    current: Option<ArrowWriter<File>>,
    parts: usize,
    rows_in_part: usize,
    rows: u64,
    finished: bool,
}

impl DatasetWriter {
    /// A target ending in `.parquet` is one file; anything else is a directory of parts.
    pub fn create(target: &Path, schema: SchemaRef) -> Result<Self> {
        let single = target.extension().is_some_and(|e| e == "parquet");
        let tmp = temporary_sibling(target)?;
        if !single {
            std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        }
        Ok(DatasetWriter {
            target: target.to_path_buf(),
            tmp,
            schema,
            part_rows: (!single).then_some(PART_ROWS),
            current: None,
            parts: 0,
            rows_in_part: 0,
            rows: 0,
            finished: false,
        })
    }

    /// Rolls over to a new part every `rows` rows (directory outputs only).
    pub fn with_part_rows(mut self, rows: usize) -> Self {
        if self.part_rows.is_some() {
            self.part_rows = Some(rows.max(1));
        }
        self
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.schema().fields() != self.schema.fields() {
            bail!("internal: batch schema differs from the output schema of {}", self.target.display());
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            if let Some(limit) = self.part_rows
                && self.rows_in_part >= limit
            {
                self.close_part()?;
            }
            if self.current.is_none() {
                let path = match self.part_rows {
                    Some(_) => self.tmp.join(part_name(self.parts)),
                    None => self.tmp.clone(),
                };
                self.current = Some(parquet_writer(&path, self.schema.clone())?);
            }
            let room = self.part_rows.map_or(usize::MAX, |limit| limit - self.rows_in_part);
            let take = room.min(batch.num_rows() - offset);
            self.current.as_mut().unwrap().write(&batch.slice(offset, take))?;
            self.rows_in_part += take;
            self.rows += take as u64;
            offset += take;
        }
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            writer.close()?;
            self.parts += 1;
            self.rows_in_part = 0;
        }
        Ok(())
    }

    /// Closes the output and renames it into place, replacing an earlier output. Returns the rows
    /// written.
    pub fn finish(mut self) -> Result<u64> {
        if self.current.is_none() && (self.part_rows.is_none() || self.parts == 0) {
            // Write the schema even for zero rows, so the output is a valid empty dataset.
            let path = match self.part_rows {
                Some(_) => self.tmp.join(part_name(0)),
                None => self.tmp.clone(),
            };
            self.current = Some(parquet_writer(&path, self.schema.clone())?);
        }
        self.close_part()?;
        if self.target.is_dir() {
            std::fs::remove_dir_all(&self.target)
                .with_context(|| format!("{}: cannot replace the earlier output", self.target.display()))?;
        }
        std::fs::rename(&self.tmp, &self.target)
            .with_context(|| format!("{}: cannot rename into place", self.target.display()))?;
        self.finished = true;
        Ok(self.rows)
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if !self.finished {
            drop(self.current.take());
            let _ = std::fs::remove_dir_all(&self.tmp).or_else(|_| std::fs::remove_file(&self.tmp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::build_messages;
    use super::super::schema::{self, Kind, CATALOGUE};
    use super::super::test_support::read_all;
    use super::super::Message;
    use super::*;
    use arrow::array::{
        new_null_array, ArrayRef, Float64Array, Int64Array, ListBuilder, PrimitiveBuilder, StringArray, StringBuilder,
        StructArray,
    };
    use arrow::datatypes::{DataType, Field, Float64Type, Schema};
    use std::sync::Arc;

    /// Two rows with a value in every catalogue column (and nulls in the second where allowed).
    fn every_column() -> RecordBatch {
        let mut fields = vec![];
        let mut arrays: Vec<ArrayRef> = vec![];
        for column in CATALOGUE {
            let array: ArrayRef = match column.kind {
                Kind::Text if column.name == "uuid" => Arc::new(StringArray::from(vec!["u0", "u1"])),
                Kind::Text => Arc::new(StringArray::from(vec![Some("text ü"), None])),
                Kind::Int => Arc::new(Int64Array::from(vec![Some(7), None])),
                Kind::Float => Arc::new(Float64Array::from(vec![Some(-1.5), None])),
                Kind::Messages => {
                    let conversation = vec![Message::new("user", "q"), Message::new("assistant", "a")];
                    build_messages([Some(conversation.as_slice()), None])
                }
                Kind::TextList => {
                    let mut b = ListBuilder::new(StringBuilder::new());
                    b.append_value([Some("x"), Some("y")]);
                    b.append_null();
                    Arc::new(b.finish())
                }
                Kind::FloatList => {
                    let mut b = ListBuilder::new(PrimitiveBuilder::<Float64Type>::new());
                    b.append_value([Some(0.5), None]);
                    b.append(true);
                    Arc::new(b.finish())
                }
                Kind::Struct => Arc::new(StructArray::from(vec![
                    (Arc::new(Field::new("temperature", DataType::Float64, true)), Arc::new(Float64Array::from(vec![1.0, 0.8])) as ArrayRef),
                    (Arc::new(Field::new("seed", DataType::Int64, true)), new_null_array(&DataType::Int64, 2)),
                ])),
            };
            fields.push(Field::new(column.name, array.data_type().clone(), column.name != "uuid"));
            arrays.push(array);
        }
        fields.push(Field::new("user_column", DataType::Utf8, true));
        arrays.push(Arc::new(StringArray::from(vec![Some("kept"), None])));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
    }

    #[test]
    fn every_column_type_round_trips_through_a_file_and_parts() {
        let dir = tempfile::tempdir().unwrap();
        let batch = every_column();
        for target in [dir.path().join("all.parquet"), dir.path().join("all-parts")] {
            let mut writer = DatasetWriter::create(&target, batch.schema()).unwrap().with_part_rows(1);
            writer.write(&batch).unwrap();
            assert_eq!(writer.finish().unwrap(), 2);
            let back = read_all(&[&target]).unwrap();
            assert_eq!(back, batch, "{}", target.display());
            assert!(schema::field(schema::lookup("uuid").unwrap()) == *back.schema().field(0));
        }
        assert_eq!(std::fs::read_dir(dir.path().join("all-parts")).unwrap().count(), 2);
    }

    #[test]
    fn unfinished_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let batch = every_column();
        for target in [dir.path().join("out.parquet"), dir.path().join("out-dir")] {
            let mut writer = DatasetWriter::create(&target, batch.schema()).unwrap();
            writer.write(&batch).unwrap();
            drop(writer); // an error path: no finish
            assert!(!target.exists());
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "temporary files left behind");
    }

    #[test]
    fn finishing_replaces_an_earlier_output() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let batch = every_column();
        for rows in [2, 1] {
            let mut writer = DatasetWriter::create(&target, batch.schema()).unwrap();
            writer.write(&batch.slice(0, rows)).unwrap();
            writer.finish().unwrap();
        }
        assert_eq!(read_all(&[&target]).unwrap().num_rows(), 1);
    }
}
