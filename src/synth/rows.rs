//! Synthesised rows and their Arrow form, in the column catalogue's names (`data::schema`).

use crate::engine::FinishReason;
use crate::data::messages::build_messages;
use crate::data::schema;
use crate::data::Message;
use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder, StructArray};
use arrow::datatypes::{DataType, Field, Schema};
use std::sync::Arc;

/// One finished conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub uuid: String,
    /// Optional system prompt, then user / assistant turns.
    pub messages: Vec<Message>,
    /// One per generated message, in order.
    pub finish_reasons: Vec<FinishReason>,
    pub pre_query_template: String,
    pub seed: u64,
    pub raw_instruction: Option<String>,
    pub system_prompt_key: Option<String>,
    pub responses: Option<Vec<String>>,
}

impl Row {
    fn turn(&self, role: &str) -> Option<&str> {
        self.messages.iter().find(|m| m.role == role).map(|m| m.content.as_str())
    }
}

/// Settings shared by every row of a run, for the `model` and `gen_*_configs` columns.
pub struct RunInfo {
    pub model: String,
    pub engine: String,
    pub temperature: f32,
    pub top_p: f32,
    pub max_tokens: usize,
    pub early_stop_newline: bool,
    pub sanitize: bool,
    pub response_temperature: f32,
    pub response_top_p: f32,
    pub response_max_tokens: usize,
    /// Which optional columns the run writes.
    pub with_raw_instruction: bool,
    pub with_system_prompt_key: bool,
    pub with_responses: bool,
}

fn text_list<'a>(rows: impl Iterator<Item = Option<Vec<&'a str>>>) -> ArrayRef {
    let mut builder = ListBuilder::new(StringBuilder::new());
    for row in rows {
        match row {
            Some(items) => builder.append_value(items.into_iter().map(Some)),
            None => builder.append_null(),
        }
    }
    Arc::new(builder.finish())
}

fn constant<T: Clone>(value: T, n: usize) -> Vec<T> {
    vec![value; n]
}

/// The output batch for `rows`.
pub fn to_batch(rows: &[Row], info: &RunInfo) -> RecordBatch {
    let n = rows.len();
    let text = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef { Arc::new(rows.iter().map(f).collect::<StringArray>()) };
    let chars = |f: &dyn Fn(&Row) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(|r| f(r).map(|t| t.chars().count() as i64)).collect::<Int64Array>())
    };
    let field = |name: &str, array: &ArrayRef| Field::new(name, array.data_type().clone(), true);

    let input_configs: Vec<(&str, ArrayRef)> = vec![
        ("temperature", Arc::new(Float64Array::from(constant(info.temperature as f64, n)))),
        ("top_p", Arc::new(Float64Array::from(constant(info.top_p as f64, n)))),
        ("max_tokens", Arc::new(Int64Array::from(constant(info.max_tokens as i64, n)))),
        ("input_generator", Arc::new(StringArray::from(constant(info.model.as_str(), n)))),
        ("pre_query_template", text(&|r| Some(r.pre_query_template.as_str()))),
        ("seed", Arc::new(rows.iter().map(|r| Some(r.seed as i64)).collect::<Int64Array>())),
        ("early_stop_newline", Arc::new(BooleanArray::from(constant(info.early_stop_newline, n)))),
        ("sanitize", Arc::new(BooleanArray::from(constant(info.sanitize, n)))),
        ("engine", Arc::new(StringArray::from(constant(info.engine.as_str(), n)))),
    ];
    let response_configs: Vec<(&str, ArrayRef)> = vec![
        ("temperature", Arc::new(Float64Array::from(constant(info.response_temperature as f64, n)))),
        ("top_p", Arc::new(Float64Array::from(constant(info.response_top_p as f64, n)))),
        ("max_tokens", Arc::new(Int64Array::from(constant(info.response_max_tokens as i64, n)))),
        ("engine", Arc::new(StringArray::from(constant(info.engine.as_str(), n)))),
        ("response_generator", Arc::new(StringArray::from(constant(info.model.as_str(), n)))),
    ];
    let to_struct = |fields: Vec<(&str, ArrayRef)>| -> ArrayRef {
        Arc::new(StructArray::from(fields.into_iter().map(|(name, a)| (Arc::new(field(name, &a)), a)).collect::<Vec<_>>()))
    };

    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("uuid", text(&|r| Some(r.uuid.as_str()))),
        ("messages", build_messages(rows.iter().map(|r| Some(r.messages.as_slice())))),
        ("instruction", text(&|r| r.turn("user"))),
        ("response", text(&|r| r.turn("assistant"))),
        ("model", Arc::new(StringArray::from(constant(info.model.as_str(), n)))),
        ("gen_input_configs", to_struct(input_configs)),
        ("gen_response_configs", to_struct(response_configs)),
        ("instruction_length", chars(&|r| r.turn("user"))),
        ("response_length", chars(&|r| r.turn("assistant"))),
        ("finish_reasons", text_list(rows.iter().map(|r| Some(r.finish_reasons.iter().map(|f| f.as_str()).collect())))),
    ];
    if info.with_raw_instruction {
        columns.push(("raw_instruction", text(&|r| r.raw_instruction.as_deref())));
    }
    if info.with_system_prompt_key {
        columns.push(("system_prompt_key", text(&|r| r.system_prompt_key.as_deref())));
    }
    if info.with_responses {
        columns.push(("responses", text_list(rows.iter().map(|r| r.responses.as_ref().map(|v| v.iter().map(String::as_str).collect())))));
    }
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, array)| match schema::lookup(name) {
            Some(column) if column.kind != schema::Kind::Struct => schema::field(column),
            _ => field(name, array),
        })
        .collect();
    debug_assert!(fields.iter().all(|f| f.name() != "uuid" || f.data_type() == &DataType::Utf8));
    let arrays = columns.into_iter().map(|(_, a)| a).collect();
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("columns built to the catalogue's types")
}
