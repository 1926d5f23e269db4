//! Conversations in Arrow: reading `list<struct<..>>` columns of any string and list width into
//! `Vec<Message>`, and building the canonical `messages` array back from them.

use super::schema::message_fields;
use arrow::array::{Array, ArrayRef, AsArray, ListBuilder, StringArray, StringBuilder, StructBuilder};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One chat turn in the HF/TRL convention.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
}

/// A conversation per row; `None` where the row is null.
pub type Conversations = Vec<Option<Vec<Message>>>;

/// The offsets and child values of a List or LargeList array.
fn list_parts(array: &dyn Array) -> Option<(Vec<usize>, ArrayRef)> {
    if let Some(list) = array.as_list_opt::<i32>() {
        let offsets = list.offsets().iter().map(|&o| o as usize).collect();
        return Some((offsets, list.values().clone()));
    }
    if let Some(list) = array.as_list_opt::<i64>() {
        let offsets = list.offsets().iter().map(|&o| o as usize).collect();
        return Some((offsets, list.values().clone()));
    }
    None
}

/// Casts any string-like array to Utf8; `None` if it is not string-like.
pub fn as_utf8(array: &ArrayRef) -> Option<StringArray> {
    match array.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Null => {
            cast(array, &DataType::Utf8).ok().map(|a| a.as_string::<i32>().clone())
        }
        _ => None,
    }
}

/// Whether `data_type` is a list of structs holding string fields `role_field` and `content_field`.
pub fn is_turn_list(data_type: &DataType, role_field: &str, content_field: &str) -> bool {
    let item = match data_type {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => return false,
    };
    let DataType::Struct(fields) = item else { return false };
    let is_text = |name: &str| {
        fields.iter().any(|f| {
            f.name() == name && matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
        })
    };
    is_text(role_field) && is_text(content_field)
}

/// Reads a list-of-structs column into conversations, taking the role from `role_field` and the
/// text from `content_field` (`role`/`content` for TRL, `from`/`value` for ShareGPT). The caller has
/// checked the type with [`is_turn_list`]. Null fields read as empty strings.
pub fn read_turns(array: &dyn Array, role_field: &str, content_field: &str) -> Conversations {
    let (offsets, values) = list_parts(array).expect("caller checked is_turn_list");
    let turns = values.as_struct();
    let text = |name: &str| as_utf8(turns.column_by_name(name).expect("checked field")).expect("checked type");
    let (roles, contents) = (text(role_field), text(content_field));
    let value = |a: &StringArray, i: usize| if a.is_null(i) { String::new() } else { a.value(i).to_string() };
    (0..array.len())
        .map(|row| {
            array.is_valid(row).then(|| {
                (offsets[row]..offsets[row + 1])
                    .filter(|&i| turns.is_valid(i))
                    .map(|i| Message { role: value(&roles, i), content: value(&contents, i) })
                    .collect()
            })
        })
        .collect()
}

/// Builds a canonical `messages` column.
pub fn build_messages<'a>(rows: impl IntoIterator<Item = Option<&'a [Message]>>) -> ArrayRef {
    let mut builder = ListBuilder::new(StructBuilder::from_fields(message_fields(), 0));
    for row in rows {
        match row {
            Some(messages) => {
                let turns = builder.values();
                for message in messages {
                    turns.field_builder::<StringBuilder>(0).unwrap().append_value(&message.role);
                    turns.field_builder::<StringBuilder>(1).unwrap().append_value(&message.content);
                    turns.append(true);
                }
                builder.append(true);
            }
            None => builder.append(false),
        }
    }
    Arc::new(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_arrow() {
        let rows: Conversations = vec![
            Some(vec![Message::new("user", "hi"), Message::new("assistant", "hello")]),
            None,
            Some(vec![]),
        ];
        let array = build_messages(rows.iter().map(|r| r.as_deref()));
        assert!(is_turn_list(array.data_type(), "role", "content"));
        assert_eq!(read_turns(array.as_ref(), "role", "content"), rows);
    }
}
