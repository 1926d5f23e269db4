//! The column catalogue: the one place in code that names magpie's canonical columns, their Arrow
//! types and what they hold (the README's column table repeats these words; keep them in step).
//!
//! Every stage reads and writes these names. A column that is not in the catalogue is carried
//! through every stage unchanged. Every column is nullable except `uuid`.

use arrow::datatypes::{DataType, Field, Fields};
use std::sync::Arc;

/// How a catalogue column is stored. Readers accept close relatives (LargeUtf8, Int32, LargeList,
/// ...) and cast them to the canonical type; see `data::normalize`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
    Float,
    /// `list<struct<role: string, content: string>>`, the HF/TRL chat convention.
    Messages,
    TextList,
    FloatList,
    /// Any struct; the generation configs grow fields over time.
    Struct,
}

impl Kind {
    /// The canonical Arrow type. `Struct` has no single one; callers build their own fields.
    pub fn data_type(self) -> DataType {
        match self {
            Kind::Text => DataType::Utf8,
            Kind::Int => DataType::Int64,
            Kind::Float => DataType::Float64,
            Kind::Messages => messages_type(),
            Kind::TextList => list_of(DataType::Utf8),
            Kind::FloatList => list_of(DataType::Float64),
            Kind::Struct => DataType::Struct(Fields::empty()),
        }
    }

    /// The type as a user reads it in errors and in `magpie inspect`.
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Text => "string",
            Kind::Int => "int64",
            Kind::Float => "float64",
            Kind::Messages => "list<struct<role: string, content: string>>",
            Kind::TextList => "list<string>",
            Kind::FloatList => "list<float64>",
            Kind::Struct => "struct",
        }
    }
}

/// One entry of the catalogue.
pub struct Column {
    pub name: &'static str,
    pub kind: Kind,
    pub doc: &'static str,
}

const fn col(name: &'static str, kind: Kind, doc: &'static str) -> Column {
    Column { name, kind, doc }
}

/// The canonical columns (docs/upstream.md §4), in the order stages write them.
pub const CATALOGUE: &[Column] = &[
    col("uuid", Kind::Text, "unique row id; the only non-nullable column"),
    col("messages", Kind::Messages, "the conversation, [{role, content}] (HF/TRL convention)"),
    col("instruction", Kind::Text, "first user turn"),
    col("response", Kind::Text, "first assistant turn"),
    col("model", Kind::Text, "model that generated the row"),
    col("gen_input_configs", Kind::Struct, "instruction sampling: temperature, top_p, input_generator, pre_query_template, seed"),
    col("gen_response_configs", Kind::Struct, "response sampling settings"),
    col("task_category", Kind::Text, "judge tag: primary task category (12 Magpie tags)"),
    col("other_task_category", Kind::TextList, "judge tag: secondary task categories"),
    col("difficulty", Kind::Text, "judge tag: very easy .. very hard"),
    col("intent", Kind::Text, "judge tag: what the user wants"),
    col("knowledge", Kind::Text, "judge tag: knowledge needed to answer"),
    col("input_quality", Kind::Text, "judge tag: very poor .. excellent"),
    col("quality_explanation", Kind::Text, "judge tag: why that quality"),
    col("llama_guard_2", Kind::Text, "safety tag: `safe` or `unsafe\\nS6`"),
    col("reward_model", Kind::Text, "reward model that scored the row"),
    col("instruct_reward", Kind::Float, "reward of (instruction, response)"),
    col("min_neighbor_distance", Kind::Float, "semantic dedup: distance to the nearest other row"),
    col("repeat_count", Kind::Int, "semantic dedup: neighbours closer than 0.05"),
    col("min_similar_uuid", Kind::Text, "semantic dedup: earliest row of the near-duplicate group"),
    col("instruction_length", Kind::Int, "characters in the instruction"),
    col("response_length", Kind::Int, "characters in the response"),
    col("language", Kind::Text, "ISO 639-1 code of the instruction"),
    col("raw_instruction", Kind::Text, "synth: the instruction as generated, before --sanitize"),
    col("system_prompt_key", Kind::Text, "synth: which weighted system prompt steered the row"),
    col("finish_reasons", Kind::TextList, "synth: `stop` or `length` for each generated message, in order"),
    col("responses", Kind::TextList, "preference data: sampled responses to the instruction"),
    col("rewards", Kind::FloatList, "preference data: reward of each of `responses`"),
    col("prompt", Kind::Messages, "preference data: the shared conversation prefix"),
    col("chosen", Kind::Messages, "preference data: preferred completion (messages after `prompt`)"),
    col("rejected", Kind::Messages, "preference data: dispreferred completion"),
    col("score_chosen", Kind::Float, "preference data: reward of `chosen`"),
    col("score_rejected", Kind::Float, "preference data: reward of `rejected`"),
];

/// The catalogue entry for `name`, if it is a canonical column.
pub fn lookup(name: &str) -> Option<&'static Column> {
    CATALOGUE.iter().find(|c| c.name == name)
}

/// The canonical field for a catalogue column (nullable except `uuid`).
pub fn field(column: &Column) -> Field {
    Field::new(column.name, column.kind.data_type(), column.name != "uuid")
}

/// `list<item: T>` with a nullable item, as arrow-rs and pyarrow write it.
pub fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

/// The fields of one message struct.
pub fn message_fields() -> Fields {
    Fields::from(vec![
        Field::new("role", DataType::Utf8, true),
        Field::new("content", DataType::Utf8, true),
    ])
}

pub fn messages_type() -> DataType {
    list_of(DataType::Struct(message_fields()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_names_are_unique_and_only_uuid_is_required() {
        let mut names: Vec<_> = CATALOGUE.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CATALOGUE.len());
        let required: Vec<_> = CATALOGUE.iter().filter(|c| !field(c).is_nullable()).map(|c| c.name).collect();
        assert_eq!(required, ["uuid"]);
    }
}
