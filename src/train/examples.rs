//! Training rows from our dataset format: the conversation columns a command needs (`messages`
//! for SFT; `prompt`, `chosen`, `rejected` for DPO, which the data layer has already normalised
//! from every accepted preference shape), split into train and eval.

use anyhow::Result;
use arrow::array::Array;
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
}

/// Reads `columns` of every row. Rows whose `split` is test, eval or validation are eval rows;
/// without a `split` column a seeded `eval_ratio` share is. Rows with a null in any requested
/// column are skipped and counted.
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
    let (eval, train): (Vec<_>, Vec<_>) = all.into_iter().zip(is_eval).partition(|(_, e)| *e);
    let splits = [train.into_iter().map(|(m, _)| m).collect(), eval.into_iter().map(|(m, _)| m).collect()];
    Ok(TrainingRows { splits, null_rows, files: dataset.files })
}
