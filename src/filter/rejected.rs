//! `--rejected`: every row a step drops, with all the columns it had when it was dropped plus
//! `drop_step` and `drop_reason`, written as a dataset of its own (datatrove's exclusion
//! writer). Output rows plus rejected rows are the input rows.
//!
//! Rows dropped by a later step carry the columns earlier steps added, so the steps' rows come
//! with different schemas: each schema's rows are spooled to a scratch file as they come, and the
//! dataset is written at the end with the union of the columns (a column a row never had is
//! null). Memory holds one batch.

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

    /// Adds the rows `step` dropped.
    pub fn push(&mut self, step: &str, rejected: Rejected) -> Result<()> {
        let n = rejected.rows.num_rows();
        let mut fields: Vec<Field> = rejected.rows.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
        let mut columns = rejected.rows.columns().to_vec();
        fields.extend([Field::new("drop_step", DataType::Utf8, false), Field::new("drop_reason", DataType::Utf8, false)]);
        columns.push(Arc::new(StringArray::from(vec![step; n])) as ArrayRef);
        columns.push(Arc::new(StringArray::from(rejected.reasons)) as ArrayRef);
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
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
