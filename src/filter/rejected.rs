//! `--rejected`: every row a step drops, with all the columns it had when it was dropped plus
//! `drop_step` and `drop_reason`, written as a dataset of its own (datatrove's exclusion
//! writer). Output rows plus rejected rows are the input rows.
//!
//! Rows dropped by a later step carry the columns earlier steps added, so the steps' rows come
//! with different schemas: each schema's rows are spooled to a scratch file as they come, and the
//! dataset is written at the end with the union of the columns (a column a row never had is
//! null). Memory holds one batch. A sharded run keeps each chunk's dropped rows in memory and
//! writes them as that chunk's part of a chunked folder beside the output (`ChunkRejected`).

use super::step::Rejected;
use crate::data::write::{parquet_writer, Staged};
use crate::data::DatasetWriter;
use crate::run::Provenance;
use anyhow::{bail, Context, Result};
use arrow::array::{new_null_array, ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One scratch file per schema seen.
struct Spool {
    schema: SchemaRef,
    path: PathBuf,
    writer: ArrowWriter<File>,
}

/// The rejected rows of a run, spooled until the run is done.
pub struct RejectedRows {
    scratch: PathBuf,
    spools: Vec<Spool>,
    pub rows: u64,
}

impl RejectedRows {
    /// Spools into files under `scratch` (a folder the caller removes).
    pub fn new(scratch: &Path) -> Self {
        RejectedRows { scratch: scratch.to_path_buf(), spools: vec![], rows: 0 }
    }

    /// Writes the rejected dataset for `target` (finished, not yet in place). With no rejected
    /// row it is an empty dataset with the input's columns and the two reasons.
    pub fn finish(self, target: &Path, input_schema: &Schema, provenance: &Provenance) -> Result<Staged> {
        let mut files = vec![];
        let mut union: Vec<Field> = vec![];
        for spool in self.spools {
            spool.writer.close().with_context(|| format!("{}: cannot write", spool.path.display()))?;
            for field in spool.schema.fields() {
                match union.iter().find(|f| f.name() == field.name()) {
                    Some(seen) if seen.data_type() != field.data_type() => bail!(
                        "--rejected: column `{}` is {} in some dropped rows and {} in others",
                        field.name(),
                        seen.data_type(),
                        field.data_type()
                    ),
                    Some(_) => {}
                    None => union.push(field.as_ref().clone().with_nullable(true)),
                }
            }
            files.push(spool.path);
        }
        if union.is_empty() {
            union = input_schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            union.extend([Field::new("drop_step", DataType::Utf8, true), Field::new("drop_reason", DataType::Utf8, true)]);
        }
        let schema = Arc::new(Schema::new(union));
        let mut writer = DatasetWriter::create(target, schema.clone(), provenance)?;
        for file in files {
            let opened = File::open(&file).with_context(|| format!("{}: cannot read", file.display()))?;
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(opened)?.build()?;
            for batch in reader {
                writer.write(&widen(&batch?, &schema)?)?;
            }
        }
        writer.finish()
    }
}

/// Where a run keeps the rows its steps drop.
pub trait KeepRejected {
    /// Adds the rows `step` dropped.
    fn keep(&mut self, step: &str, rejected: Rejected) -> Result<()>;
}

/// No `--rejected`: dropped rows are let go.
impl<T: KeepRejected> KeepRejected for Option<T> {
    fn keep(&mut self, step: &str, rejected: Rejected) -> Result<()> {
        match self {
            Some(rows) => rows.keep(step, rejected),
            None => Ok(()),
        }
    }
}

/// The dropped rows with their `drop_step` and `drop_reason`.
fn labelled(step: &str, rejected: Rejected) -> Result<RecordBatch> {
    let n = rejected.rows.num_rows();
    let mut fields: Vec<Field> = rejected.rows.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = rejected.rows.columns().to_vec();
    fields.extend([Field::new("drop_step", DataType::Utf8, false), Field::new("drop_reason", DataType::Utf8, false)]);
    columns.push(Arc::new(StringArray::from(vec![step; n])) as ArrayRef);
    columns.push(Arc::new(StringArray::from(rejected.reasons)) as ArrayRef);
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?)
}

impl KeepRejected for RejectedRows {
    fn keep(&mut self, step: &str, rejected: Rejected) -> Result<()> {
        let batch = labelled(step, rejected)?;
        let n = batch.num_rows();
        let index = match self.spools.iter().position(|s| s.schema.fields() == batch.schema().fields()) {
            Some(index) => index,
            None => {
                let path = self.scratch.join(format!("rejected-{}.parquet", self.spools.len()));
                let writer = parquet_writer(&path, batch.schema(), None)?;
                self.spools.push(Spool { schema: batch.schema(), path, writer });
                self.spools.len() - 1
            }
        };
        self.spools[index].writer.write(&batch).with_context(|| format!("{}: cannot write", self.spools[index].path.display()))?;
        self.rows += n as u64;
        Ok(())
    }
}

/// The rows dropped from one chunk of a sharded run (`--shard` with `--rejected`), held in
/// memory (a chunk's worth at most) and written as the chunk's part of the rejected folder.
#[derive(Default)]
pub struct ChunkRejected {
    batches: Vec<RecordBatch>,
}

impl KeepRejected for ChunkRejected {
    fn keep(&mut self, step: &str, rejected: Rejected) -> Result<()> {
        self.batches.push(labelled(step, rejected)?);
        Ok(())
    }
}

impl ChunkRejected {
    /// The chunk's rejected part: every chunk's part has the same columns, those of the chunk's
    /// output (all nullable: a row dropped by an early step lacks the later steps' columns) and
    /// the two reasons, so the parts make one dataset.
    pub fn part(self, output: &Schema) -> Result<RecordBatch> {
        let mut fields: Vec<Field> = output.fields().iter().map(|f| f.as_ref().clone().with_nullable(true)).collect();
        fields.extend([Field::new("drop_step", DataType::Utf8, true), Field::new("drop_reason", DataType::Utf8, true)]);
        let schema = Arc::new(Schema::new(fields));
        let widened = self.batches.iter().map(|batch| widen(batch, &schema)).collect::<Result<Vec<_>>>()?;
        Ok(arrow::compute::concat_batches(&schema, &widened)?)
    }
}

/// `batch` with the columns of `schema`, in its order; a column it lacks is null.
fn widen(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) => column.clone(),
            None => new_null_array(field.data_type(), batch.num_rows()),
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
