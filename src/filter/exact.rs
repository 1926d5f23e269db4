//! Exact dedup on the normalised instruction (case, whitespace, punctuation): the first row of
//! each group is kept. Needs the whole dataset (one hash and the first uuid per distinct text).
//! Writes `exact_duplicate_of` (the kept row's uuid, null on kept rows); `drop: false` keeps the
//! duplicates so that `select`'s `keep_dedup` can drop them later.

use super::step::Step;
use super::text::{hash64, instructions, normalize, uuids};
use anyhow::Result;
use super::step::Duplicates;
use arrow::array::{BooleanArray, RecordBatch, StringArray};
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;

/// `exact_dedup` in a recipe.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExactDedupConfig {
    /// Drop the duplicates (false: keep them, marked, for `select`'s `keep_dedup`).
    pub drop: bool,
}

impl Default for ExactDedupConfig {
    fn default() -> Self {
        ExactDedupConfig { drop: true }
    }
}

pub struct ExactDedup {
    duplicates: Duplicates,
    /// Normalised-text hash -> (ordinal, uuid) of its first row.
    first: HashMap<u64, (u64, String)>,
    scanned: u64,
    applied: u64,
}

impl ExactDedup {
    pub fn new(config: ExactDedupConfig) -> Self {
        ExactDedup { duplicates: Duplicates::new(config.drop, "exact duplicate", "exact_duplicate_of"), first: HashMap::new(), scanned: 0, applied: 0 }
    }
}

fn key(text: &Option<String>) -> u64 {
    hash64(text.as_deref().map(normalize))
}

impl Step for ExactDedup {
    fn name(&self) -> &'static str {
        "exact_dedup"
    }

    fn needs_scan(&self) -> bool {
        true
    }

    fn scan(&mut self, batch: &RecordBatch) -> Result<()> {
        for (text, uuid) in instructions(batch).iter().zip(uuids(batch)) {
            self.first.entry(key(text)).or_insert((self.scanned, uuid));
            self.scanned += 1;
        }
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut duplicate_of = Vec::with_capacity(batch.num_rows());
        for text in instructions(&batch) {
            let (ordinal, uuid) = &self.first[&key(&text)];
            duplicate_of.push((*ordinal != self.applied).then(|| uuid.clone()));
            self.applied += 1;
        }
        let keep: BooleanArray = duplicate_of.iter().map(|d| Some(d.is_none())).collect();
        let batch = super::step::with_column(batch, "exact_duplicate_of", Arc::new(StringArray::from(duplicate_of)))?;
        self.duplicates.settle(batch, &keep)
    }

    fn take_rejected(&mut self) -> Option<super::step::Rejected> {
        self.duplicates.take_rejected()
    }

    fn report(&self) -> Value {
        Value::Object(self.duplicates.report())
    }
}
