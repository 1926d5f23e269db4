//! Training rows from our dataset format: the conversation columns a command needs (`messages`
//! for SFT; `prompt`, `chosen`, `rejected` for DPO, which the data layer has already normalised
//! from every accepted preference shape), split into train and eval.

use anyhow::Result;
use arrow::array::Array;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::data::{messages::read_turns, Dataset, Message};

/// The rows a training command reads.
pub struct TrainingRows {
    /// Per row, one conversation per requested column, as `[train, eval]`.
    pub splits: [Vec<Vec<Vec<Message>>>; 2],
    /// Rows skipped because a requested column was null.
    pub null_rows: usize,
    /// The files read (the output may not touch them).
    pub files: Vec<PathBuf>,
    /// Messages whose role is none of system, user, assistant, tool: how many of each role.
    pub unknown_roles: BTreeMap<String, usize>,
}

/// The roles chat templates define.
const KNOWN_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Reads `columns` of every row. Rows whose `split` is test, eval or validation are eval rows;
/// without a `split` column a seeded `eval_ratio` share is. Rows with a null in any requested
/// column are skipped and counted. Messages with other roles than [`KNOWN_ROLES`] are counted
/// and warned about: the chat template renders them as it does (or fails, naming the row).
pub fn read_rows(inputs: &[String], columns: &[&str], eval_ratio: f64, seed: u64) -> Result<TrainingRows> {
    let dataset = Dataset::open(inputs)?;
    dataset.require(columns)?;
    let has_split = dataset.schema.column_with_name("split").is_some();
    let (mut all, mut is_eval, mut null_rows) = (vec![], vec![], 0);
    for batch in dataset.batches() {
        let batch = batch?;
        let mut per_column: Vec<_> = columns
            .iter()
            .map(|c| read_turns(batch.column_by_name(c).expect("required").as_ref(), "role", "content").into_iter())
            .collect();
        let split = batch.column_by_name("split").and_then(crate::data::messages::as_utf8);
        for row in 0..batch.num_rows() {
            let conversations: Option<Vec<Vec<Message>>> = per_column.iter_mut().map(|c| c.next().flatten()).collect();
            let Some(conversations) = conversations else {
                null_rows += 1;
                continue;
            };
            is_eval.push(split.as_ref().is_some_and(|s| s.is_valid(row) && matches!(s.value(row), "test" | "eval" | "validation")));
            all.push(conversations);
        }
    }
    if !has_split && eval_ratio > 0.0 {
        let held_out = ((all.len() as f64) * eval_ratio).round() as usize;
        for &i in crate::seed::permutation(all.len(), seed ^ 0xE7A1).iter().take(held_out) {
            is_eval[i] = true;
        }
    }
    let mut unknown_roles = BTreeMap::new();
    for message in all.iter().flatten().flatten().filter(|m| !KNOWN_ROLES.contains(&m.role.as_str())) {
        *unknown_roles.entry(message.role.clone()).or_insert(0) += 1;
    }
    if !unknown_roles.is_empty() {
        let counts: Vec<String> = unknown_roles.iter().map(|(role, n)| format!("`{role}` ({n})")).collect();
        eprintln!(
            "warning: {}: messages with roles other than {}: {}; they are trained on as the chat template renders them",
            dataset.name,
            KNOWN_ROLES.join(", "),
            counts.join(", ")
        );
    }
    let (eval, train): (Vec<_>, Vec<_>) = all.into_iter().zip(is_eval).partition(|(_, e)| *e);
    let splits = [train.into_iter().map(|(m, _)| m).collect(), eval.into_iter().map(|(m, _)| m).collect()];
    Ok(TrainingRows { splits, null_rows, files: dataset.files, unknown_roles })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::messages::build_messages;
    use crate::test_support::{batch, write};

    #[test]
    fn messages_with_unknown_roles_are_counted_by_role() {
        let dir = tempfile::tempdir().unwrap();
        let rows = [
            vec![Message::new("user", "hi"), Message::new("robot", "beep"), Message::new("assistant", "hello")],
            vec![Message::new("system", "be brief"), Message::new("robot", "boop"), Message::new("narrator", "meanwhile")],
        ];
        let path = write(dir.path(), "roles.parquet", &batch(vec![("messages", build_messages(rows.iter().map(|r| Some(r.as_slice()))))]));
        let read = read_rows(&[path.display().to_string()], &["messages"], 0.0, 0).unwrap();
        assert_eq!(read.unknown_roles, BTreeMap::from([("narrator".to_string(), 1), ("robot".to_string(), 2)]));
        assert_eq!(read.splits[0].len(), 2);
    }
}
