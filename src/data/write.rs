//! Writing datasets atomically: a single `.parquet` file, or a folder of `part-NNNNN.parquet`
//! parts with a manifest (`crate::run`). Everything goes to a hidden temporary beside the
//! target; [`DatasetWriter::finish`] closes it and [`Staged::commit`] puts it in place. An error,
//! a drop before the commit or a kill leaves nothing that looks finished (readers skip hidden
//! names, and a folder without its manifest is not a finished output).

use crate::run::{self, Manifest, Provenance};
use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Rows per part file when writing a directory.
pub const PART_ROWS: usize = 100_000;

/// The name of part `index` in a directory output.
pub fn part_name(index: usize) -> String {
    format!("part-{index:05}.parquet")
}

/// Opens a parquet writer on `path` with magpie's writer settings and, when given, the
/// provenance in the footer (how `--overwrite` knows a single file is ours).
pub fn parquet_writer(path: &Path, schema: SchemaRef, provenance: Option<&Provenance>) -> Result<ArrowWriter<File>> {
    let file = File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut properties = WriterProperties::builder().set_compression(Compression::SNAPPY);
    if let Some(provenance) = provenance {
        properties = properties.set_key_value_metadata(Some(vec![KeyValue::new(run::FOOTER_KEY.to_string(), provenance.footer_value())]));
    }
    ArrowWriter::try_new(file, schema, Some(properties.build())).with_context(|| format!("{}: cannot write parquet", path.display()))
}

/// Writes `batch` as the one row group of a new parquet file at `path` (no temporary: callers
/// write into a temporary of their own).
pub fn write_batch(path: &Path, batch: &RecordBatch, provenance: Option<&Provenance>) -> Result<()> {
    let mut writer = parquet_writer(path, batch.schema(), provenance)?;
    writer.write(batch).with_context(|| format!("{}: cannot write", path.display()))?;
    writer.close().with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// Streams record batches into `target`; nothing is visible there until the commit.
pub struct DatasetWriter {
    target: PathBuf,
    tmp: PathBuf,
    schema: SchemaRef,
    provenance: Provenance,
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
    pub fn create(target: &Path, schema: SchemaRef, provenance: &Provenance) -> Result<Self> {
        let single = target.extension().is_some_and(|e| e == "parquet");
        let tmp = run::temporary_sibling(target)?;
        if !single {
            std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        }
        Ok(DatasetWriter {
            target: target.to_path_buf(),
            tmp,
            schema,
            provenance: provenance.clone(),
            part_rows: (!single).then_some(PART_ROWS),
            current: None,
            parts: 0,
            rows_in_part: 0,
            rows: 0,
            finished: false,
        })
    }

    /// Rolls over to a new part every `rows` rows (directory outputs only).
    #[cfg(test)]
    pub fn with_part_rows(mut self, rows: usize) -> Self {
        if self.part_rows.is_some() {
            self.part_rows = Some(rows.max(1));
        }
        self
    }

    fn open_part(&mut self) -> Result<()> {
        let (path, provenance) = match self.part_rows {
            Some(_) => (self.tmp.join(part_name(self.parts)), None),
            None => (self.tmp.clone(), Some(&self.provenance)),
        };
        self.current = Some(parquet_writer(&path, self.schema.clone(), provenance)?);
        Ok(())
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
                self.open_part()?;
            }
            let room = self.part_rows.map_or(usize::MAX, |limit| limit - self.rows_in_part);
            let take = room.min(batch.num_rows() - offset);
            self.current.as_mut().unwrap().write(&batch.slice(offset, take)).with_context(|| format!("{}: cannot write", self.target.display()))?;
            self.rows_in_part += take;
            self.rows += take as u64;
            offset += take;
        }
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            writer.close().with_context(|| format!("{}: cannot write", self.target.display()))?;
            self.parts += 1;
            self.rows_in_part = 0;
        }
        Ok(())
    }

    /// Closes the output (a folder gets its manifest) without putting it in place yet: the
    /// caller may read it (`Staged::path`) and write companions before [`Staged::commit`].
    pub fn finish(mut self) -> Result<Staged> {
        if self.current.is_none() && (self.part_rows.is_none() || self.parts == 0) {
            // Write the schema even for zero rows, so the output is a valid empty dataset.
            self.open_part()?;
        }
        self.close_part()?;
        if self.part_rows.is_some() {
            Manifest::write(&self.tmp, "dataset", Some(self.rows), &self.provenance)?;
        }
        self.finished = true;
        Ok(Staged { tmp: self.tmp.clone(), target: self.target.clone(), rows: self.rows, committed: false })
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if !self.finished {
            drop(self.current.take());
            run::remove_temporary(&self.tmp);
        }
    }
}

/// A finished output still under its temporary name; removed unless committed.
pub struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    pub rows: u64,
    committed: bool,
}

impl Staged {
    /// Where the finished output is now, to read it before the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Puts the output in place, replacing a finished output of ours there; returns the rows.
    pub fn commit(mut self) -> Result<u64> {
        run::commit(&self.tmp, &self.target)?;
        self.committed = true;
        Ok(self.rows)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            run::remove_temporary(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::messages::build_messages;
    use super::super::schema::{self, Kind, CATALOGUE};
    use crate::test_support::read_all;
    use super::super::Message;
    use super::*;
    use arrow::array::{
        new_null_array, ArrayRef, Float64Array, Int64Array, ListBuilder, PrimitiveBuilder, StringArray, StringBuilder,
        StructArray,
    };
    use arrow::datatypes::{DataType, Field, Float64Type, Schema};
    use std::sync::Arc;

    fn provenance() -> Provenance {
        Provenance::new("test", serde_json::json!({}))
    }

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
            let mut writer = DatasetWriter::create(&target, batch.schema(), &provenance()).unwrap().with_part_rows(1);
            writer.write(&batch).unwrap();
            assert_eq!(writer.finish().unwrap().commit().unwrap(), 2);
            let back = read_all(&[&target]).unwrap();
            assert_eq!(back, batch, "{}", target.display());
            assert!(schema::field(schema::lookup("uuid").unwrap()) == *back.schema().field(0));
        }
        assert_eq!(std::fs::read_dir(dir.path().join("all-parts")).unwrap().count(), 3, "two parts and the manifest");
        assert!(run::provenance_of(&dir.path().join("all.parquet")).is_some());
    }

    #[test]
    fn unfinished_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let batch = every_column();
        for target in [dir.path().join("out.parquet"), dir.path().join("out-dir")] {
            let mut writer = DatasetWriter::create(&target, batch.schema(), &provenance()).unwrap();
            writer.write(&batch).unwrap();
            drop(writer); // an error path: no finish
            assert!(!target.exists());
            let mut writer = DatasetWriter::create(&target, batch.schema(), &provenance()).unwrap();
            writer.write(&batch).unwrap();
            drop(writer.finish().unwrap()); // finished, but a later step failed: no commit
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
            let mut writer = DatasetWriter::create(&target, batch.schema(), &provenance()).unwrap();
            writer.write(&batch.slice(0, rows)).unwrap();
            writer.finish().unwrap().commit().unwrap();
        }
        assert_eq!(read_all(&[&target]).unwrap().num_rows(), 1);
    }
}
