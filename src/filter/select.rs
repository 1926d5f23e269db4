//! Declarative selection: rules on columns, `keep_dedup`, top-k by a column, a seeded shuffle and
//! a train/test `split` column. The released Magpie-Pro-300K cut is one such recipe
//! (recipes/magpie-pro-300k-filter.yaml).
//!
//! Rules compare a column with a value (`==`, `!=`, `>`, `>=`, `<`, `<=`, `in`, `not_in`,
//! `is_null`, `not_null`, `ends_with`, `not_ends_with`, `contains`, `not_contains`). Order
//! comparisons on `input_quality` and `difficulty` use Magpie's ordinal scales (very poor < poor
//! < average < good < excellent; very easy < ... < very hard). A null never passes a comparison.
//!
//! Top-k (`sort_by` + `limit`) needs the whole dataset: one sort key per passing row. A shuffle
//! holds the selected rows in memory, so use it after `limit` has made them few enough.

use super::step::{Rejected, Step};
use super::text::{hash64, uuids};
use crate::seed::{mix, shuffle, unit};
use anyhow::{bail, Result};
use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, UInt32Array};
use arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::{DataType, Float64Type};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, Deserialize, serde::Serialize, PartialEq)]
pub enum Op {
    #[serde(rename = "==")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = "in")]
    In,
    #[serde(rename = "not_in")]
    NotIn,
    #[serde(rename = "is_null")]
    IsNull,
    #[serde(rename = "not_null")]
    NotNull,
    #[serde(rename = "ends_with")]
    EndsWith,
    #[serde(rename = "not_ends_with")]
    NotEndsWith,
    #[serde(rename = "contains")]
    Contains,
    #[serde(rename = "not_contains")]
    NotContains,
}

#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub column: String,
    pub op: Op,
    #[serde(default)]
    pub value: Value,
}

#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Drop rows that a dedup step marked as another row's duplicate.
    #[serde(default)]
    pub keep_dedup: bool,
    pub sort_by: Option<String>,
    /// Sort descending (largest first); default true.
    pub descending: Option<bool>,
    pub limit: Option<usize>,
    pub shuffle_seed: Option<u64>,
    /// Share of rows whose `split` is `test` (the rest `train`), chosen by hashing the uuid.
    pub test_ratio: Option<f64>,
    #[serde(default)]
    pub split_seed: u64,
}

use super::judge::{DIFFICULTY_SCALE as DIFFICULTY, QUALITY_SCALE as QUALITY};

/// One value of a column, as rules compare it.
#[derive(Clone, Debug, PartialEq)]
enum Cell {
    Null,
    Number(f64),
    Text(String),
    Bool(bool),
}

fn cells(array: &ArrayRef, column: &str) -> Result<Vec<Cell>> {
    let dt = array.data_type();
    if dt.is_numeric() {
        let values = cast(array, &DataType::Float64)?;
        return Ok(values.as_primitive::<Float64Type>().iter().map(|v| v.map_or(Cell::Null, Cell::Number)).collect());
    }
    if let Some(text) = crate::data::messages::as_utf8(array) {
        return Ok(text.iter().map(|v| v.map_or(Cell::Null, |s| Cell::Text(s.to_string()))).collect());
    }
    if let Some(flags) = array.as_boolean_opt() {
        return Ok(flags.iter().map(|v| v.map_or(Cell::Null, Cell::Bool)).collect());
    }
    bail!("select: column `{column}` is {dt}, which rules cannot compare")
}

/// The rank of `text` on the ordinal scale of `column`, if it has one.
fn rank(column: &str, text: &str) -> Option<f64> {
    let scale = match column {
        "input_quality" => QUALITY,
        "difficulty" => DIFFICULTY,
        _ => return None,
    };
    scale.iter().position(|s| s.eq_ignore_ascii_case(text.trim())).map(|p| p as f64)
}

impl Rule {
    fn order_key(&self, cell: &Cell) -> Option<f64> {
        match cell {
            Cell::Number(x) => Some(*x),
            Cell::Text(t) => rank(&self.column, t),
            Cell::Bool(b) => Some(*b as u8 as f64),
            Cell::Null => None,
        }
    }

    fn value_key(&self) -> Option<f64> {
        match &self.value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => rank(&self.column, s),
            Value::Bool(b) => Some(*b as u8 as f64),
            _ => None,
        }
    }

    fn equals(&self, cell: &Cell, value: &Value) -> bool {
        match (cell, value) {
            (Cell::Number(x), Value::Number(n)) => n.as_f64() == Some(*x),
            (Cell::Text(t), Value::String(s)) => t == s,
            (Cell::Bool(b), Value::Bool(v)) => b == v,
            _ => false,
        }
    }

    fn text_op(&self, cell: &Cell, f: impl Fn(&str, &str) -> bool) -> bool {
        match (cell, &self.value) {
            (Cell::Text(t), Value::String(s)) => f(t.trim_end(), s),
            _ => false,
        }
    }

    fn passes(&self, cell: &Cell) -> bool {
        let ordered = |f: fn(f64, f64) -> bool| match (self.order_key(cell), self.value_key()) {
            (Some(a), Some(b)) => f(a, b),
            _ => false,
        };
        let listed = || self.value.as_array().is_some_and(|values| values.iter().any(|v| self.equals(cell, v)));
        match self.op {
            Op::IsNull => *cell == Cell::Null,
            Op::NotNull => *cell != Cell::Null,
            _ if *cell == Cell::Null => false,
            Op::Eq => self.equals(cell, &self.value),
            Op::Ne => !self.equals(cell, &self.value),
            Op::Gt => ordered(|a, b| a > b),
            Op::Ge => ordered(|a, b| a >= b),
            Op::Lt => ordered(|a, b| a < b),
            Op::Le => ordered(|a, b| a <= b),
            Op::In => listed(),
            Op::NotIn => !listed(),
            Op::EndsWith => self.text_op(cell, |t, s| t.ends_with(s)),
            Op::NotEndsWith => !self.text_op(cell, |t, s| t.ends_with(s)),
            Op::Contains => self.text_op(cell, |t, s| t.contains(s)),
            Op::NotContains => !self.text_op(cell, |t, s| t.contains(s)),
        }
    }

    fn describe(&self) -> String {
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::In => "in",
            Op::NotIn => "not_in",
            Op::IsNull => "is_null",
            Op::NotNull => "not_null",
            Op::EndsWith => "ends_with",
            Op::NotEndsWith => "not_ends_with",
            Op::Contains => "contains",
            Op::NotContains => "not_contains",
        };
        format!("failed {} {op} {}", self.column, self.value)
    }
}

pub struct Select {
    config: SelectConfig,
    /// Ordinals kept by top-k, after the scan.
    top: Option<HashSet<u64>>,
    /// Sort key (`None`: null or NaN) and ordinal of every row that passed the rules.
    keys: Vec<(Option<f64>, u64)>,
    scanned: u64,
    applied: u64,
    held: Vec<RecordBatch>,
    dropped: BTreeMap<String, u64>,
    rejected: Option<Rejected>,
}

impl Select {
    pub fn new(config: SelectConfig) -> Result<Self> {
        if config.limit.is_some() != config.sort_by.is_some() {
            bail!("select: `sort_by` and `limit` go together");
        }
        if config.test_ratio.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
            bail!("select: test_ratio must be between 0 and 1");
        }
        Ok(Select { config, top: None, keys: vec![], scanned: 0, applied: 0, held: vec![], dropped: BTreeMap::new(), rejected: None })
    }

    /// Per row: `None` if kept by the rules and dedup marks, else why not.
    fn verdicts(&self, batch: &RecordBatch) -> Result<Vec<Option<String>>> {
        let mut verdicts = vec![None; batch.num_rows()];
        for rule in &self.config.rules {
            let Some(array) = batch.column_by_name(&rule.column) else {
                bail!("select: rule on column `{}`, which the data does not have (add the step that writes it, or drop the rule)", rule.column);
            };
            for (verdict, cell) in verdicts.iter_mut().zip(cells(array, &rule.column)?) {
                if verdict.is_none() && !rule.passes(&cell) {
                    *verdict = Some(rule.describe());
                }
            }
        }
        if self.config.keep_dedup {
            let uuids = uuids(batch);
            for (column, reason) in [("exact_duplicate_of", "exact duplicate"), ("minhash_cluster", "near duplicate (minhash)"), ("min_similar_uuid", "near duplicate (semantic)")] {
                let Some(marks) = batch.column_by_name(column).and_then(crate::data::messages::as_utf8) else { continue };
                for (i, verdict) in verdicts.iter_mut().enumerate() {
                    // A row is kept when it is its own representative or has none (null).
                    let duplicate = marks.is_valid(i) && marks.value(i) != uuids[i];
                    if verdict.is_none() && duplicate {
                        *verdict = Some(reason.into());
                    }
                }
            }
        }
        Ok(verdicts)
    }

    fn sort_keys(&self, batch: &RecordBatch) -> Result<Vec<Option<f64>>> {
        let column = self.config.sort_by.as_deref().expect("top-k configured");
        let Some(array) = batch.column_by_name(column) else {
            bail!("select: sort_by column `{column}` is missing");
        };
        if crate::data::messages::as_utf8(array).is_some() && !matches!(column, "input_quality" | "difficulty") {
            bail!("select: sort_by column `{column}` is text with no order (only input_quality and difficulty have scales); sort by a numeric column");
        }
        let rule = Rule { column: column.into(), op: Op::Gt, value: Value::Null };
        Ok(cells(array, column)?.iter().map(|c| rule.order_key(c).filter(|k| !k.is_nan())).collect())
    }
}

impl Step for Select {
    fn name(&self) -> &'static str {
        "select"
    }

    fn needs_scan(&self) -> bool {
        self.config.limit.is_some()
    }

    fn scan(&mut self, batch: &RecordBatch) -> Result<()> {
        let verdicts = self.verdicts(batch)?;
        for (verdict, key) in verdicts.iter().zip(self.sort_keys(batch)?) {
            if verdict.is_none() {
                self.keys.push((key, self.scanned));
            }
            self.scanned += 1;
        }
        Ok(())
    }

    fn finish_scan(&mut self) -> Result<()> {
        let descending = self.config.descending.unwrap_or(true);
        let mut keys = std::mem::take(&mut self.keys);
        // Rows without a key (null or NaN) go last in either order; ties keep the data's order.
        keys.sort_by(|a, b| {
            let order = match (a.0, b.0) {
                (Some(x), Some(y)) if descending => y.total_cmp(&x),
                (Some(x), Some(y)) => x.total_cmp(&y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            order.then(a.1.cmp(&b.1))
        });
        keys.truncate(self.config.limit.expect("top-k configured"));
        self.top = Some(keys.into_iter().map(|(_, ordinal)| ordinal).collect());
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let mut verdicts = self.verdicts(&batch)?;
        let mut keep = Vec::with_capacity(batch.num_rows());
        for verdict in verdicts.iter_mut() {
            let ordinal = self.applied;
            self.applied += 1;
            if verdict.is_none()
                && let Some(top) = &self.top
                && !top.contains(&ordinal)
            {
                *verdict = Some(format!("not in the top {} by {}", top.len(), self.config.sort_by.as_deref().unwrap_or("")));
            }
            if let Some(reason) = verdict.as_ref() {
                *self.dropped.entry(reason.clone()).or_default() += 1;
            }
            keep.push(verdict.is_none());
        }
        let keep = BooleanArray::from(keep);
        self.rejected = Rejected::of(&batch, &keep, |i| verdicts[i].clone().unwrap_or_default())?;
        let mut batch = filter_record_batch(&batch, &keep)?;
        if let Some(ratio) = self.config.test_ratio {
            let seed = self.config.split_seed;
            let split: StringArray = uuids(&batch)
                .iter()
                .map(|u| Some(if unit(mix(seed ^ hash64(u))) < ratio { "test" } else { "train" }))
                .collect();
            batch = super::step::with_column(batch, "split", Arc::new(split))?;
        }
        if self.config.shuffle_seed.is_some() {
            self.held.push(batch.clone());
            return Ok(batch.slice(0, 0));
        }
        Ok(batch)
    }

    fn flush(&mut self) -> Result<Option<RecordBatch>> {
        let (Some(seed), Some(first)) = (self.config.shuffle_seed, self.held.first()) else { return Ok(None) };
        let all = concat_batches(&first.schema(), &self.held)?;
        self.held.clear();
        let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
        let mut state = seed;
        shuffle(&mut order, || {
            state = mix(state);
            state
        });
        Ok(Some(take_record_batch(&all, &UInt32Array::from(order))?))
    }

    fn report(&self) -> Value {
        json!({ "dropped": self.dropped })
    }

    fn take_rejected(&mut self) -> Option<Rejected> {
        self.rejected.take()
    }
}
