//! Reading datasets: a file, a directory of `*.parquet` parts, or a glob, streamed in record
//! batches and normalised (see `normalize`). Opening checks every file's footer and schema first,
//! so a bad file fails the stage before it writes anything. A `.jsonl`, `.ndjson` or `.json` file
//! is read through arrow-rs's JSON reader (`json`) and normalised the same way.

use super::normalize::{normalize, Origin};
use anyhow::{bail, Context, Result};
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::SchemaRef;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Rows per record batch while streaming.
pub const BATCH_ROWS: usize = 1024;

/// An opened, validated input: its files, their shared normalised schema and row count.
#[derive(Debug)]
pub struct Dataset {
    pub files: Vec<PathBuf>,
    pub schema: SchemaRef,
    pub num_rows: u64,
    /// How the user named the input, for messages.
    pub name: String,
}

/// The files an input spec names: a file; every `*.parquet` directly in a directory (hidden
/// files, such as magpie's temporary outputs, are skipped); or the matches of a glob. Sorted.
/// An unfinished magpie output is refused, and so is a finished one whose parts differ from
/// its manifest.
pub fn resolve(spec: &str) -> Result<Vec<PathBuf>> {
    let files = resolve_files(spec)?;
    // A bare file name's folder is `.`.
    let folder_of = |f: &Path| f.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let mut folders: Vec<PathBuf> = files.iter().map(|f| folder_of(f)).collect();
    folders.dedup();
    for folder in &folders {
        if let Some(manifest) = crate::run::require_finished(folder)? {
            let listed: std::collections::HashSet<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
            for file in files.iter().filter(|f| &folder_of(f) == folder) {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                if !listed.contains(name.as_ref()) {
                    bail!("{}: not listed in {}; the output was changed after magpie wrote it", file.display(), folder.join(crate::run::MANIFEST).display());
                }
            }
        }
    }
    Ok(files)
}

fn resolve_files(spec: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(spec);
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{spec}: cannot list directory"))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "parquet") && !is_hidden(p) && p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            // An unfinished run of ours says so, rather than that the folder is empty.
            crate::run::refuse_unfinished_empty(path)?;
            bail!("{spec}: directory holds no .parquet files");
        }
        return Ok(files);
    }
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if spec.contains(['*', '?', '[']) {
        let mut files: Vec<PathBuf> = glob::glob(spec)
            .with_context(|| format!("{spec}: bad glob pattern"))?
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file() && !is_hidden(p))
            .collect();
        files.sort();
        if files.is_empty() {
            bail!("{spec}: no file matches this pattern");
        }
        return Ok(files);
    }
    bail!("{spec}: no such file or directory")
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// One input file's batches, before normalisation.
type FileBatches = Box<dyn Iterator<Item = Result<RecordBatch, arrow::error::ArrowError>>>;

/// Opens `file` for streaming: parquet, or JSON by its extension.
fn file_batches(file: &Path) -> Result<FileBatches> {
    if super::json::is_json(file) {
        return Ok(Box::new(super::json::JsonFile::open(file)?.batches(BATCH_ROWS)?));
    }
    Ok(Box::new(open_file(file)?.with_batch_size(BATCH_ROWS).build()?))
}

/// A file's rows and an empty batch of its schema, from its footer (parquet) or its rows (JSON).
fn file_shape(file: &Path) -> Result<(u64, RecordBatch)> {
    if super::json::is_json(file) {
        let json = super::json::JsonFile::open(file)?;
        return Ok((json.rows, json.empty()));
    }
    let builder = open_file(file)?;
    Ok((builder.metadata().file_metadata().num_rows() as u64, RecordBatch::new_empty(builder.schema().clone())))
}

fn open_file(file: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>> {
    let handle = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(handle)
        .with_context(|| format!("{}: not a readable parquet file (truncated, or not parquet at all)", file.display()))
}

impl Dataset {
    /// Resolves and validates `inputs`: every footer readable, one normalised schema across
    /// files, and at least one row.
    pub fn open(inputs: &[String]) -> Result<Dataset> {
        if inputs.is_empty() {
            bail!("no input given");
        }
        let mut files = vec![];
        for spec in inputs {
            files.extend(resolve(spec)?);
        }
        let mut schema: Option<SchemaRef> = None;
        let mut num_rows = 0;
        for file in &files {
            let (rows, empty) = file_shape(file)?;
            num_rows += rows;
            let normalized = normalize(&empty, Origin { file, first_row: 0 })?.schema();
            match &schema {
                None => schema = Some(normalized),
                Some(first) => check_same_schema(first, &normalized, &files[0], file)?,
            }
        }
        let name = inputs.join(", ");
        if num_rows == 0 {
            bail!("{name}: input is empty (0 rows)");
        }
        Ok(Dataset { files, schema: schema.expect("at least one file"), num_rows, name })
    }

    /// Fails unless every column in `columns` is present, naming the first file and what it has.
    pub fn require(&self, columns: &[&str]) -> Result<()> {
        for &column in columns {
            if self.schema.column_with_name(column).is_none() {
                let expected = super::schema::lookup(column).map(|c| c.kind.describe()).unwrap_or("present");
                let found: Vec<_> = self.schema.fields().iter().map(|f| f.name().as_str()).collect();
                bail!(
                    "{}: column `{column}` is missing, expected {expected} (found columns: {})",
                    self.files[0].display(),
                    found.join(", ")
                );
            }
        }
        Ok(())
    }

    /// Streams the normalised batches of every file in order. A `uuid` that an earlier row
    /// already had is an error naming both rows: resume, shards and `min_similar_uuid` rely on
    /// uuids being unique (the check keeps every uuid read, about 100 bytes a row).
    pub fn batches(&self) -> Batches<'_> {
        Batches { dataset: self, next_file: 0, current: None, seen: HashMap::new() }
    }

    /// Reads the rows of increasing, non-overlapping ranges (a run's chunks, a shard's share of
    /// them), holding one range and one read batch at a time instead of the whole input.
    pub fn row_ranges(&self) -> RowRanges<'_> {
        RowRanges { batches: self.batches(), pending: None, next_row: 0 }
    }
}

fn check_same_schema(first: &SchemaRef, other: &SchemaRef, first_file: &Path, file: &Path) -> Result<()> {
    for field in first.fields() {
        match other.field_with_name(field.name()) {
            Err(_) => bail!(
                "{}: column `{}` is missing, but {} has it (all input files must share one schema)",
                file.display(),
                field.name(),
                first_file.display()
            ),
            Ok(f) if f.data_type() != field.data_type() => bail!(
                "{}: column `{}`: found {}, expected {} as in {}",
                file.display(),
                field.name(),
                f.data_type(),
                field.data_type(),
                first_file.display()
            ),
            Ok(_) => {}
        }
    }
    if let Some(extra) = other.fields().iter().find(|f| first.column_with_name(f.name()).is_none()) {
        bail!(
            "{}: column `{}` is not in {} (all input files must share one schema)",
            file.display(),
            extra.name(),
            first_file.display()
        );
    }
    Ok(())
}

/// Iterator over a dataset's normalised batches, in the column order of the dataset schema.
pub struct Batches<'a> {
    dataset: &'a Dataset,
    next_file: usize,
    current: Option<(usize, FileBatches, u64)>,
    /// Every uuid read so far: the file index and row where it was.
    seen: HashMap<String, (usize, u64)>,
}

impl Batches<'_> {
    fn check_unique_uuids(&mut self, batch: &RecordBatch, file: usize, first_row: u64) -> Result<()> {
        let Some(uuids) = batch.column_by_name("uuid").and_then(|c| c.as_any().downcast_ref::<StringArray>()) else { return Ok(()) };
        for (i, uuid) in uuids.iter().enumerate() {
            let Some(uuid) = uuid else { continue };
            let row = first_row + i as u64;
            if let Some(&(earlier_file, earlier_row)) = self.seen.get(uuid) {
                let files = &self.dataset.files;
                bail!(
                    "{}: column `uuid`: row {row} repeats `{uuid}`, the uuid of row {earlier_row} of {} (uuids must be unique)",
                    files[file].display(),
                    files[earlier_file].display()
                );
            }
            self.seen.insert(uuid.to_string(), (file, row));
        }
        Ok(())
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((index, reader, first_row)) = &mut self.current {
                let file = &self.dataset.files[*index];
                match reader.next() {
                    Some(Ok(batch)) => {
                        let (index, start) = (*index, *first_row);
                        let origin = Origin { file, first_row: start };
                        *first_row += batch.num_rows() as u64;
                        let result = normalize(&batch, origin).and_then(|b| {
                            Ok(b.project(
                                &self.dataset.schema.fields().iter().map(|f| b.schema().index_of(f.name())).collect::<Result<Vec<_>, _>>()?,
                            )?)
                        });
                        return Some(result.and_then(|b| self.check_unique_uuids(&b, index, start).map(|()| b)));
                    }
                    Some(Err(e)) => {
                        return Some(Err(anyhow::Error::new(e)
                            .context(format!("{}: cannot read its rows (file corrupt or truncated)", file.display()))));
                    }
                    None => self.current = None,
                }
            }
            let index = self.next_file;
            let file = self.dataset.files.get(index)?;
            self.next_file += 1;
            match file_batches(file) {
                Ok(reader) => self.current = Some((index, reader, 0)),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// A dataset's rows by increasing ranges: see [`Dataset::row_ranges`].
pub struct RowRanges<'a> {
    batches: Batches<'a>,
    /// Rows read but not yet reached by a range; they start at input row `next_row`.
    pending: Option<RecordBatch>,
    next_row: u64,
}

impl RowRanges<'_> {
    /// Rows `range` of the input as one batch. Rows before it are read and passed over; a range
    /// that starts before the end of the previous one is a bug in the caller.
    pub fn read(&mut self, range: std::ops::Range<u64>) -> Result<RecordBatch> {
        assert!(range.start >= self.next_row, "row ranges must increase: {range:?} after row {}", self.next_row);
        let mut parts = vec![];
        while self.next_row < range.end {
            let batch = match self.pending.take() {
                Some(batch) => batch,
                None => self.batches.next().with_context(|| format!("{}: ended before row {}", self.batches.dataset.name, range.end))??,
            };
            let (start, end) = (self.next_row, self.next_row + batch.num_rows() as u64);
            let (from, to) = (range.start.max(start), range.end.min(end));
            if from < to {
                parts.push(batch.slice((from - start) as usize, (to - from) as usize));
            }
            if end > range.end {
                self.pending = Some(batch.slice((range.end - start) as usize, (end - range.end) as usize));
            }
            self.next_row = end.min(range.end);
        }
        Ok(arrow::compute::concat_batches(&self.batches.dataset.schema, &parts)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::test_support::{batch, read_all, text, write};
    use super::*;
    use arrow::array::{ArrayRef, Int64Array};
    use std::sync::Arc;

    fn error_of(inputs: &[&Path]) -> String {
        format!("{:#}", read_all(inputs).unwrap_err())
    }

    #[test]
    fn row_ranges_cross_batch_and_file_bounds_and_pass_over_skipped_rows() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..15).map(|i| format!("row {i}")).collect();
        for file in 0..3 {
            let rows: Vec<&str> = names[file * 5..file * 5 + 5].iter().map(String::as_str).collect();
            write(dir.path(), &format!("part-{file}.parquet"), &batch(vec![("instruction", text(&rows))]));
        }
        let dataset = Dataset::open(&[dir.path().display().to_string()]).unwrap();
        let mut ranges = dataset.row_ranges();
        let mut read = |range: std::ops::Range<u64>| -> Vec<String> {
            let rows = ranges.read(range).unwrap();
            let instructions = rows.column_by_name("instruction").unwrap().as_any().downcast_ref::<StringArray>().unwrap().clone();
            instructions.iter().map(|v| v.unwrap().to_string()).collect()
        };
        // Four-row chunks 0, 1 and 3 (chunk 2 read and passed over, as another shard's).
        assert_eq!(read(0..4), names[0..4]);
        assert_eq!(read(4..8), names[4..8]);
        assert_eq!(read(12..15), names[12..15]);
        let past_the_end = dataset.row_ranges().read(10..16).unwrap_err().to_string();
        assert!(past_the_end.contains("ended before row 16"), "{past_the_end}");
    }

    #[test]
    fn directory_and_glob_read_parts_in_order_and_skip_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "part-00001.parquet", &batch(vec![("instruction", text(&["b"]))]));
        write(dir.path(), "part-00000.parquet", &batch(vec![("instruction", text(&["a"]))]));
        // What a killed writer leaves behind: hidden, so never read as finished output.
        write(dir.path(), ".part-00002.parquet.magpie-tmp-1", &batch(vec![("instruction", text(&["x"]))]));
        for spec in [dir.path().to_path_buf(), dir.path().join("part-*.parquet")] {
            let out = read_all(&[&spec]).unwrap();
            let instructions = out.column_by_name("instruction").unwrap();
            assert_eq!(instructions.as_ref(), text(&["a", "b"]).as_ref());
        }
    }

    #[test]
    fn truncated_and_non_parquet_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(dir.path(), "good.parquet", &batch(vec![("instruction", text(&["a"]))]));
        let bytes = std::fs::read(&good).unwrap();
        let truncated = dir.path().join("truncated.parquet");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let error = error_of(&[&truncated]);
        assert!(error.contains("truncated.parquet: not a readable parquet file"), "{error}");
        let text_file = dir.path().join("notes.parquet");
        std::fs::write(&text_file, "just text, not parquet").unwrap();
        assert!(error_of(&[&text_file]).contains("notes.parquet: not a readable parquet file"));
    }

    #[test]
    fn empty_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let zero_rows = write(dir.path(), "zero.parquet", &batch(vec![("instruction", text(&[]))]));
        assert!(error_of(&[&zero_rows]).contains("input is empty (0 rows)"));
        let empty_dir = dir.path().join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        assert!(error_of(&[&empty_dir]).contains("directory holds no .parquet files"));
        assert!(error_of(&[&dir.path().join("absent.parquet")]).contains("absent.parquet: no such file or directory"));
        assert!(error_of(&[&dir.path().join("nothing-*.parquet")]).contains("no file matches"));
    }

    #[test]
    fn files_with_different_schemas_are_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.parquet", &batch(vec![("instruction", text(&["a"])), ("extra", text(&["x"]))]));
        let b = write(
            dir.path(),
            "b.parquet",
            &batch(vec![("instruction", text(&["b"])), ("extra", Arc::new(Int64Array::from(vec![1])) as ArrayRef)]),
        );
        let error = error_of(&[&a, &b]);
        assert!(error.contains("b.parquet: column `extra`: found Int64, expected Utf8"), "{error}");
    }

    #[test]
    fn a_repeated_uuid_is_an_error_naming_both_rows_in_one_file_or_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.parquet", &batch(vec![("uuid", text(&["u1", "u2", "u1"])), ("instruction", text(&["x", "y", "z"]))]));
        let error = error_of(&[&a]);
        assert!(error.contains("a.parquet: column `uuid`: row 2 repeats `u1`, the uuid of row 0 of") && error.contains("must be unique"), "{error}");
        let b = write(dir.path(), "b.parquet", &batch(vec![("uuid", text(&["u3"])), ("instruction", text(&["w"]))]));
        let c = write(dir.path(), "c.parquet", &batch(vec![("uuid", text(&["u4", "u3"])), ("instruction", text(&["v", "w"]))]));
        let error = error_of(&[&b, &c]);
        assert!(error.contains("c.parquet: column `uuid`: row 1 repeats `u3`, the uuid of row 0 of") && error.contains("b.parquet"), "{error}");
        // The same file given twice repeats its derived uuids too.
        let plain = write(dir.path(), "plain.parquet", &batch(vec![("instruction", text(&["p"]))]));
        assert!(error_of(&[&plain, &plain]).contains("repeats"));
        read_all(&[&b]).unwrap();
    }

    #[test]
    fn require_names_the_missing_column_and_what_was_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "prompts.parquet", &batch(vec![("text", text(&["a"]))]));
        let dataset = Dataset::open(&[path.display().to_string()]).unwrap();
        let error = format!("{:#}", dataset.require(&["messages"]).unwrap_err());
        assert!(error.contains("prompts.parquet: column `messages` is missing, expected list<struct<role: string, content: string>> (found columns: uuid, text)"), "{error}");
    }
}
