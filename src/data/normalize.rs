//! Turns the dataset shapes users already have into magpie's one format, batch by batch.
//!
//! - Catalogue columns of a close type (LargeUtf8, Int32, LargeList, ...) are cast to the canonical
//!   type; an incompatible type is an error naming the file and column.
//! - Magpie's released files: `conversations` [{from: human|gpt|system, value}] becomes `messages`;
//!   files with only `instruction` / `response` (and `instruction_2`, `response_2`, ...) get
//!   `messages` built from them.
//! - Preference data: `prompt` as a string or messages; `chosen` / `rejected` as strings, as
//!   completions, or as whole conversations (with or without `prompt`). The result is always
//!   `prompt` = the shared prefix and `chosen` / `rejected` = what each adds after it, as TRL does.
//! - A missing `uuid` is derived from the file name and row number, so it is stable across reads.
//! - `language` is lower-case ISO 639-1 (Magpie's released files write `EN`).
//!
//! Every other column passes through unchanged.

use super::messages::{as_utf8, build_messages, is_turn_list, read_turns, Conversations, Message};
use super::schema::{self, Kind};
use anyhow::{bail, Result};
use arrow::array::{new_null_array, Array, ArrayRef, RecordBatch, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use std::path::Path;
use std::sync::Arc;

/// Where a batch came from, for error messages and derived uuids.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    pub file: &'a Path,
    /// Row number of the batch's first row within the file.
    pub first_row: u64,
}

/// The columns of a batch under construction, in order.
struct Columns(Vec<(Field, ArrayRef)>);

impl Columns {
    fn position(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|(f, _)| f.name() == name)
    }
    fn get(&self, name: &str) -> Option<&ArrayRef> {
        self.position(name).map(|i| &self.0[i].1)
    }
    /// Replaces the column `name` in place, or appends it.
    fn set(&mut self, name: &str, array: ArrayRef) {
        // Catalogue columns arrive here already cast to their canonical types.
        let field = Field::new(name, array.data_type().clone(), name != "uuid");
        match self.position(name) {
            Some(i) => self.0[i] = (field, array),
            None => self.0.push((field, array)),
        }
    }
}

/// Normalises one batch read from `origin.file`.
pub fn normalize(batch: &RecordBatch, origin: Origin) -> Result<RecordBatch> {
    let schema = batch.schema();
    let mut columns = Columns(schema.fields().iter().map(|f| f.as_ref().clone()).zip(batch.columns().iter().cloned()).collect());
    let preference = columns.get("chosen").is_some() || columns.get("rejected").is_some();

    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let Some(column) = schema::lookup(field.name()) else { continue };
        let is_preference_text = matches!(column.name, "prompt" | "chosen" | "rejected");
        if is_preference_text && as_utf8(array).is_some() {
            continue; // strings become messages below
        }
        let coerced = coerce(array, column.kind).ok_or_else(|| {
            let also = if is_preference_text { ", or string" } else { "" };
            anyhow::anyhow!(
                "{}: column `{}`: found {}, expected {}{also}",
                origin.file.display(),
                column.name,
                field.data_type(),
                column.kind.describe()
            )
        })?;
        columns.set(column.name, coerced);
    }

    if let Some(language) = columns.get("language").and_then(|c| c.as_any().downcast_ref::<StringArray>()) {
        let lower: StringArray = language.iter().map(|code| code.map(str::to_lowercase)).collect();
        columns.set("language", Arc::new(lower));
    }

    if columns.get("messages").is_none() {
        if let Some(conversations) = columns.get("conversations") {
            if !is_turn_list(conversations.data_type(), "from", "value") {
                bail!(
                    "{}: column `conversations`: found {}, expected list<struct<from: string, value: string>>",
                    origin.file.display(),
                    conversations.data_type()
                );
            }
            let mut rows = read_turns(conversations.as_ref(), "from", "value");
            rows.iter_mut().flatten().flatten().for_each(|m| m.role = sharegpt_role(&m.role).to_string());
            let i = columns.position("conversations").unwrap();
            columns.0[i] = (schema::field(schema::lookup("messages").unwrap()), to_array(&rows));
        } else if columns.get("instruction").is_some() {
            let rows = messages_from_turn_columns(&columns, batch.num_rows());
            columns.set("messages", to_array(&rows));
        }
    }

    if preference {
        normalize_preference(&mut columns, batch.num_rows(), origin)?;
    } else if let Some(prompts) = preference_rows(&columns, "prompt", "user", batch.num_rows()) {
        columns.set("prompt", to_array(&prompts));
    }

    match columns.get("uuid") {
        Some(uuids) => {
            if let Some(row) = (0..uuids.len()).find(|&i| uuids.is_null(i)) {
                bail!(
                    "{}: column `uuid`: row {} is null, expected a unique non-null string",
                    origin.file.display(),
                    origin.first_row + row as u64
                );
            }
        }
        None => {
            let uuids = derived_uuids(origin, batch.num_rows());
            columns.0.insert(0, (schema::field(schema::lookup("uuid").unwrap()), uuids));
        }
    }

    let (fields, arrays): (Vec<_>, Vec<_>) = columns.0.into_iter().unzip();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// Casts `array` to the canonical type of `kind`, or `None` when the type is not a close relative.
fn coerce(array: &ArrayRef, kind: Kind) -> Option<ArrayRef> {
    let dt = array.data_type();
    if dt == &DataType::Null {
        return Some(match kind {
            Kind::Struct => array.clone(),
            _ => new_null_array(&kind.data_type(), array.len()),
        });
    }
    let accepted = match kind {
        Kind::Text => matches!(dt, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View),
        Kind::Int => dt.is_integer(),
        Kind::Float => dt.is_floating() || dt.is_integer(),
        Kind::Struct => return matches!(dt, DataType::Struct(_)).then(|| array.clone()),
        Kind::Messages => {
            if dt == &kind.data_type() {
                return Some(array.clone());
            }
            return is_turn_list(dt, "role", "content")
                .then(|| to_array(&read_turns(array.as_ref(), "role", "content")));
        }
        Kind::TextList | Kind::FloatList => match dt {
            DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
                let item = item.data_type();
                if kind == Kind::TextList {
                    matches!(item, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null)
                } else {
                    item.is_floating() || item.is_integer() || item == &DataType::Null
                }
            }
            _ => false,
        },
    };
    if !accepted {
        return None;
    }
    if dt == &kind.data_type() {
        return Some(array.clone());
    }
    cast(array, &kind.data_type()).ok()
}

fn to_array(rows: &Conversations) -> ArrayRef {
    build_messages(rows.iter().map(|r| r.as_deref()))
}

fn sharegpt_role(from: &str) -> &str {
    match from {
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        other => other,
    }
}

/// `messages` from `instruction`, `response`, `instruction_2`, `response_2`, ... (Magpie's flat
/// files). A row with a null instruction gets null messages; the conversation ends at the first
/// missing turn.
fn messages_from_turn_columns(columns: &Columns, num_rows: usize) -> Conversations {
    let text = |name: &str| columns.get(name).and_then(as_utf8);
    let mut turns = vec![];
    for t in 1.. {
        let suffix = if t == 1 { String::new() } else { format!("_{t}") };
        let Some(instruction) = text(&format!("instruction{suffix}")) else { break };
        turns.push((instruction, text(&format!("response{suffix}"))));
    }
    (0..num_rows)
        .map(|row| {
            let mut messages = vec![];
            for (instruction, response) in &turns {
                if instruction.is_null(row) {
                    break;
                }
                messages.push(Message::new("user", instruction.value(row)));
                match response {
                    Some(r) if r.is_valid(row) => messages.push(Message::new("assistant", r.value(row))),
                    _ => break,
                }
            }
            (!messages.is_empty()).then_some(messages)
        })
        .collect()
}

/// Reads a preference column that may hold strings (wrapped as one message of `role`) or messages.
fn preference_rows(columns: &Columns, name: &str, role: &str, num_rows: usize) -> Option<Conversations> {
    let array = columns.get(name)?;
    if let Some(text) = as_utf8(array) {
        return Some(
            (0..num_rows).map(|i| text.is_valid(i).then(|| vec![Message::new(role, text.value(i))])).collect(),
        );
    }
    Some(read_turns(array.as_ref(), "role", "content"))
}

fn normalize_preference(columns: &mut Columns, num_rows: usize, origin: Origin) -> Result<()> {
    let mut prompts = preference_rows(columns, "prompt", "user", num_rows);
    let mut completions = ["chosen", "rejected"].map(|name| preference_rows(columns, name, "assistant", num_rows));
    let [Some(chosen), Some(rejected)] = &mut completions else {
        let missing = if completions[0].is_none() { "chosen" } else { "rejected" };
        bail!("{}: preference data needs both `chosen` and `rejected`; column `{missing}` is missing", origin.file.display());
    };
    match &mut prompts {
        // An explicit prompt: strip it from completions that repeat it (UltraFeedback's shape).
        Some(prompts) => {
            for ((prompt, c), r) in prompts.iter().zip(chosen.iter_mut()).zip(rejected.iter_mut()) {
                let Some(prompt) = prompt else { continue };
                for completion in [c, r].into_iter().flatten() {
                    if completion.len() > prompt.len() && completion.starts_with(prompt) {
                        completion.drain(..prompt.len());
                    }
                }
            }
        }
        // No prompt: it is the shared prefix of the two conversations (TRL's implicit prompt).
        None => {
            let mut extracted = Vec::with_capacity(num_rows);
            for (row, (c, r)) in chosen.iter_mut().zip(rejected.iter_mut()).enumerate() {
                let (Some(c), Some(r)) = (c.as_mut(), r.as_mut()) else {
                    extracted.push(None);
                    continue;
                };
                let shared = c.iter().zip(r.iter()).take_while(|(a, b)| a == b).count();
                if shared == 0 {
                    bail!(
                        "{}: row {}: there is no `prompt` column, and `chosen` and `rejected` share no leading turns to take the prompt from; \
                         add a `prompt` column, or give both as whole conversations",
                        origin.file.display(),
                        origin.first_row + row as u64
                    );
                }
                let prompt: Vec<Message> = c.drain(..shared).collect();
                r.drain(..shared);
                extracted.push(Some(prompt));
            }
            prompts = Some(extracted);
        }
    }
    columns.set("prompt", to_array(prompts.as_ref().unwrap()));
    let [chosen, rejected] = completions.map(Option::unwrap);
    columns.set("chosen", to_array(&chosen));
    columns.set("rejected", to_array(&rejected));
    Ok(())
}

/// Stable uuids for files that have none: UUIDv5 of "file name:row".
fn derived_uuids(origin: Origin, num_rows: usize) -> ArrayRef {
    let name = origin.file.file_name().unwrap_or_default().to_string_lossy();
    let uuids: StringArray = (0..num_rows as u64)
        .map(|i| {
            let key = format!("{name}:{}", origin.first_row + i);
            Some(uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, key.as_bytes()).to_string())
        })
        .collect();
    Arc::new(uuids)
}

#[cfg(test)]
mod tests {
    use super::super::messages::read_turns;
    use crate::test_support::{batch, fixture, read_all, text, write};
    use super::*;
    use arrow::array::{AsArray, Int64Array};

    fn turns(batch: &RecordBatch, column: &str) -> Conversations {
        read_turns(batch.column_by_name(column).unwrap().as_ref(), "role", "content")
    }

    fn conversation(turns: &[(&str, &str)]) -> Option<Vec<Message>> {
        Some(turns.iter().map(|(r, c)| Message::new(*r, *c)).collect())
    }

    #[test]
    fn magpie_released_conversations_become_messages_and_types_are_canonical() {
        let batch = read_all(&[&fixture("magpie-released.parquet")]).unwrap();
        let schema = batch.schema();
        assert!(schema.column_with_name("conversations").is_none());
        assert_eq!(schema.field_with_name("messages").unwrap().data_type(), &schema::messages_type());
        assert_eq!(schema.field_with_name("uuid").unwrap().data_type(), &DataType::Utf8);
        assert_eq!(schema.field_with_name("instruct_reward").unwrap().data_type(), &DataType::Float64);
        assert_eq!(schema.field_with_name("repeat_count").unwrap().data_type(), &DataType::Int64);
        let first = turns(&batch, "messages").remove(0).unwrap();
        assert_eq!(first[0].role, "user");
        assert_eq!(first[0].content, "How do I reverse a list in Python?");
        assert_eq!(first[1].role, "assistant");
        // Carried through unchanged.
        let notes = batch.column_by_name("source_notes").unwrap().as_string::<i32>();
        assert_eq!(notes.value(4), "carried through unchanged");
        let language = batch.column_by_name("language").unwrap().as_string::<i32>();
        assert_eq!(language.value(0), "en", "the file's EN, as ISO 639-1 writes it");
        assert!(matches!(schema.field_with_name("gen_input_configs").unwrap().data_type(), DataType::Struct(_)));
    }

    #[test]
    fn instruction_response_columns_build_multi_turn_messages() {
        let dir = tempfile::tempdir().unwrap();
        let input = batch(vec![
            ("instruction", text(&["q1", "only"])),
            ("response", text(&["a1", "r"])),
            ("instruction_2", Arc::new(StringArray::from(vec![Some("q2"), None]))),
            ("response_2", Arc::new(StringArray::from(vec![Some("a2"), None]))),
        ]);
        let out = read_all(&[&write(dir.path(), "flat.parquet", &input)]).unwrap();
        let rows = turns(&out, "messages");
        assert_eq!(rows[0], conversation(&[("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]));
        assert_eq!(rows[1], conversation(&[("user", "only"), ("assistant", "r")]));
        assert_eq!(out.column_by_name("instruction").unwrap().as_string::<i32>().value(0), "q1");
    }

    #[test]
    fn trl_messages_pass_through_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let rows = vec![conversation(&[("system", "be brief"), ("user", "hi"), ("assistant", "hello")])];
        let input = batch(vec![("messages", to_array(&rows))]);
        let out = read_all(&[&write(dir.path(), "trl.parquet", &input)]).unwrap();
        assert_eq!(turns(&out, "messages"), rows);
        assert_eq!(out.schema().field(0).name(), "uuid");
    }

    #[test]
    fn ultrafeedback_string_prompt_strips_the_prompt_from_whole_conversations() {
        let out = read_all(&[&fixture("ultrafeedback-armorm.parquet")]).unwrap();
        assert_eq!(turns(&out, "prompt")[0], conversation(&[("user", "Name a prime number greater than 10.")]));
        assert_eq!(turns(&out, "chosen")[0], conversation(&[("assistant", "11 is a prime number greater than 10.")]));
        assert_eq!(turns(&out, "rejected")[1], conversation(&[("assistant", "Buenos días.")]));
        assert!(out.column_by_name("all_rm_scores").is_some());
    }

    #[test]
    fn preference_without_prompt_takes_the_shared_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let chosen = vec![conversation(&[("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "good")])];
        let rejected = vec![conversation(&[("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "bad")])];
        let input = batch(vec![("chosen", to_array(&chosen)), ("rejected", to_array(&rejected))]);
        let out = read_all(&[&write(dir.path(), "implicit.parquet", &input)]).unwrap();
        assert_eq!(turns(&out, "prompt")[0], conversation(&[("user", "q"), ("assistant", "a"), ("user", "q2")]));
        assert_eq!(turns(&out, "chosen")[0], conversation(&[("assistant", "good")]));
        assert_eq!(turns(&out, "rejected")[0], conversation(&[("assistant", "bad")]));
    }

    #[test]
    fn preference_without_prompt_or_a_shared_prefix_names_the_missing_column() {
        let dir = tempfile::tempdir().unwrap();
        let input = batch(vec![("chosen", text(&["good"])), ("rejected", text(&["bad"]))]);
        let path = write(dir.path(), "no-prompt.parquet", &input);
        let error = format!("{:#}", read_all(&[&path]).unwrap_err());
        assert!(error.contains("no-prompt.parquet: row 0: there is no `prompt` column"), "{error}");
    }

    #[test]
    fn preference_strings_become_messages() {
        let dir = tempfile::tempdir().unwrap();
        let input = batch(vec![("prompt", text(&["p"])), ("chosen", text(&["c"])), ("rejected", text(&["r"]))]);
        let out = read_all(&[&write(dir.path(), "strings.parquet", &input)]).unwrap();
        assert_eq!(turns(&out, "prompt")[0], conversation(&[("user", "p")]));
        assert_eq!(turns(&out, "chosen")[0], conversation(&[("assistant", "c")]));
        assert_eq!(turns(&out, "rejected")[0], conversation(&[("assistant", "r")]));
    }

    #[test]
    fn ill_typed_catalogue_column_names_file_column_found_and_expected() {
        let dir = tempfile::tempdir().unwrap();
        let input = batch(vec![("messages", Arc::new(Int64Array::from(vec![1])) as ArrayRef)]);
        let path = write(dir.path(), "bad.parquet", &input);
        let error = format!("{:#}", read_all(&[&path]).unwrap_err());
        assert!(error.contains("bad.parquet"), "{error}");
        assert!(error.contains("column `messages`: found Int64, expected list<struct<role: string, content: string>>"), "{error}");
    }

    #[test]
    fn null_uuid_is_an_error_naming_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let input = batch(vec![("uuid", Arc::new(StringArray::from(vec![Some("a"), None])) as ArrayRef)]);
        let path = write(dir.path(), "nulls.parquet", &input);
        let error = format!("{:#}", read_all(&[&path]).unwrap_err());
        assert!(error.contains("nulls.parquet: column `uuid`: row 1 is null"), "{error}");
    }

    #[test]
    fn missing_uuids_are_derived_stably() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "no-uuid.parquet", &batch(vec![("instruction", text(&["a", "b"]))]));
        let uuids = |b: RecordBatch| -> Vec<String> {
            b.column_by_name("uuid").unwrap().as_string::<i32>().iter().map(|u| u.unwrap().to_string()).collect()
        };
        let first = uuids(read_all(&[&path]).unwrap());
        assert_eq!(first, uuids(read_all(&[&path]).unwrap()));
        assert_ne!(first[0], first[1]);
    }
}
