//! `magpie filter`: the steps that turn raw synthesis into a training set (docs/upstream.md §3), each
//! usable alone and composed by a recipe's `steps` list:
//!
//! - `exact_dedup` (`exact`): normalised-instruction duplicates;
//! - `minhash_dedup` (`minhash`): MinHash-LSH near duplicates;
//! - `semantic_dedup`: Magpie's gen_dis on all-MiniLM-L6-v2 embeddings (`semantic`, `embed`), its
//!   kNN exact or HNSW (`knn`);
//! - `heuristics`: lengths, trailing ":", truncation, empty turns, refusals, repetition, language;
//! - `select`: rules, `keep_dedup`, top-k, shuffle and split (`select`).
//!
//! - `judge_tags`: Magpie's unitag quality, difficulty and category tags from a judge model;
//! - `safety_tag`: a Llama-Guard-style verdict into `llama_guard_2`.
//!
//! - `reward_scores`: `instruct_reward` from a sequence-classification reward model, and with
//!   `responses`, `rewards` and the `prompt`/`chosen`/`rejected` pair (`reward`).
//!
//! Every run writes a JSON report beside the output: rows in and out per step, why rows were
//! dropped, and the distributions of the tag columns in the output.

pub mod exact;
pub mod heuristics;
pub mod judge;
pub mod knn;
pub mod lsh;
pub mod minhash;
pub mod rejected;
pub mod reward;
pub mod safety;
pub mod select;
pub mod semantic;
pub mod sharded;
pub mod step;
pub mod text;

use crate::data::Dataset;
use crate::run::{self, Provenance, Rules};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use step::Step;

#[derive(clap::Args, Debug, Clone)]
pub struct FilterArgs {
    #[command(flatten)]
    pub run: crate::flags::OutputFlags,

    /// Input dataset(s): parquet files, directories of parts, or globs.
    #[arg(long, short, required = true)]
    pub input: Vec<String>,

    /// Output dataset: a `.parquet` file or a directory of parts.
    #[arg(long, short)]
    pub output: PathBuf,

    /// The steps, in order, as JSON (a recipe's `steps:` list), e.g.
    /// `[{"step": "exact_dedup"}, {"step": "minhash_dedup", "threshold": 0.7}]`.
    #[arg(long, value_parser = parse_steps)]
    pub steps: Option<Steps>,

    /// Where to write the JSON report (default: beside the output, `<output>.report.json`);
    /// --overwrite replaces an earlier report of ours there.
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// Also write every dropped row, with all its columns plus `drop_step` and `drop_reason`,
    /// as a dataset of its own: a `.parquet` file or a folder (datatrove's exclusion writer).
    /// Output rows plus rejected rows are the input rows. With `--shard`, a folder of the same
    /// chunks as the output's, resumed and finished with it.
    #[arg(long)]
    pub rejected: Option<PathBuf>,

    /// This process's share, `i/N` (default: Slurm's SLURM_ARRAY_TASK_ID/COUNT): row-local
    /// steps run on every N-th chunk of `--chunk-rows` rows, into a resumable folder that the
    /// last shard finishes. Steps that need every row (dedups, top-k, shuffle, split) are
    /// refused; run them in a second, unsharded pass over the output.
    #[arg(long, value_parser = crate::data::chunks::parse_shard)]
    pub shard: Option<crate::data::chunks::Shard>,

    /// Rows per chunk of a sharded run: the unit of resume and of sharding.
    #[arg(long, default_value_t = 8192, value_parser = crate::flags::at_least_one)]
    pub chunk_rows: usize,
}

/// One step of a recipe's `steps` list: its name under `step`, and its own config's fields.
/// Every field has a default (in the step's config); unknown fields are errors.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum StepConfig {
    ExactDedup(exact::ExactDedupConfig),
    MinhashDedup(minhash::MinhashDedupConfig),
    Heuristics(heuristics::HeuristicsConfig),
    Select(select::SelectConfig),
    SemanticDedup(semantic::SemanticDedupConfig),
    JudgeTags(judge::JudgeTagsConfig),
    RewardScores(reward::RewardScoresConfig),
    SafetyTag(safety::SafetyTagConfig),
}

pub type Steps = Vec<StepConfig>;

fn parse_steps(json: &str) -> Result<Steps, String> {
    let steps: Steps = serde_json::from_str(json).map_err(|e| format!("bad `steps`: {e}"))?;
    for step in &steps {
        if let StepConfig::RewardScores(config) = step
            && config.reward_model.is_none()
        {
            return Err("bad `steps`: reward_scores: missing field `reward_model` (a LlamaForSequenceClassification directory)".into());
        }
    }
    Ok(steps)
}

impl StepConfig {
    fn build(self) -> Result<Box<dyn Step>> {
        Ok(match self {
            StepConfig::ExactDedup(config) => Box::new(exact::ExactDedup::new(config)),
            StepConfig::MinhashDedup(config) => Box::new(minhash::MinhashDedup::new(config)?),
            StepConfig::Heuristics(_) => Box::new(heuristics::Heuristics::default()),
            StepConfig::Select(config) => Box::new(select::Select::new(config)?),
            StepConfig::JudgeTags(config) => Box::new(judge::JudgeTags::new(config)?),
            StepConfig::SafetyTag(config) => Box::new(safety::SafetyTag::new(config)?),
            StepConfig::SemanticDedup(config) => Box::new(semantic::SemanticDedup::new(config)?),
            StepConfig::RewardScores(config) => Box::new(reward::RewardScores::new(config)?),
        })
    }
}

/// Refuses an input without the text its steps read (an `instruction` column, else the user turn
/// of `messages`; only `select` reads neither), naming the file and the columns it has.
fn require_text(input: &Dataset, steps: &[StepConfig]) -> Result<()> {
    let reads_text = steps.iter().any(|step| !matches!(step, StepConfig::Select(_)));
    if reads_text && input.schema.column_with_name("instruction").is_none() {
        input.require(&["messages"])?;
    }
    Ok(())
}

/// Value counts of the tag columns in `output`, for the report.
fn distributions(output: &Path) -> Result<Value> {
    let dataset = Dataset::open(&[output.display().to_string()])?;
    let mut counts: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    for batch in dataset.batches() {
        let batch = batch?;
        for column in ["input_quality", "difficulty", "task_category", "language", "split"] {
            let Some(values) = batch.column_by_name(column).and_then(crate::data::messages::as_utf8) else { continue };
            let entry = counts.entry(column).or_default();
            for value in values.iter() {
                *entry.entry(value.unwrap_or("null").to_string()).or_default() += 1;
            }
        }
    }
    Ok(json!(counts))
}

/// What a filter run does, read once from its flags: the steps (at least one), where the
/// dataset and the report go.
pub struct FilterPlan<'a> {
    pub inputs: &'a [String],
    pub output: &'a Path,
    pub steps: Steps,
    /// The JSON report: `--report`, else `<output>.report.json` beside the output.
    pub report: PathBuf,
    /// `--rejected`: where the dropped rows go.
    pub rejected: Option<&'a Path>,
    pub overwrite: bool,
}

impl FilterArgs {
    pub fn plan(&self) -> Result<FilterPlan<'_>> {
        let Some(steps) = self.steps.clone().filter(|s| !s.is_empty()) else {
            bail!("no filter steps: give `steps` in a recipe (see recipes/*-filter.yaml) or --steps JSON");
        };
        let report = self.report.clone().unwrap_or_else(|| {
            let mut name = self.output.file_name().unwrap_or_default().to_os_string();
            name.push(".report.json");
            self.output.with_file_name(name)
        });
        if let Some(rejected) = &self.rejected {
            let same = |a: &Path, b: &Path| std::path::absolute(a).ok() == std::path::absolute(b).ok();
            if same(rejected, &self.output) || same(rejected, &report) {
                bail!("{}: --rejected must differ from the output and the report", rejected.display());
            }
        }
        Ok(FilterPlan { inputs: &self.input, output: &self.output, steps, report, rejected: self.rejected.as_deref(), overwrite: self.run.overwrite })
    }
}

pub fn run(args: &FilterArgs) -> Result<()> {
    let plan = args.plan()?;
    let shard = crate::data::chunks::Shard::resolve(args.shard)?;
    if args.shard.is_some() || shard != crate::data::chunks::Shard::WHOLE {
        return sharded::run(&plan, shard, args.chunk_rows);
    }
    let steps = plan.steps.iter().cloned().map(StepConfig::build).collect::<Result<Vec<_>>>()?;
    let input = Dataset::open(plan.inputs)?;
    require_text(&input, &plan.steps)?;
    let rows_in = input.num_rows;
    let report_path = &plan.report;
    let inputs = input_paths(&input, plan.inputs);
    let rules = Rules { overwrite: plan.overwrite, resumable: None };
    run::check(plan.output, &inputs, &rules)?;
    check_report_path(report_path, &inputs, plan.overwrite)?;
    if let Some(rejected) = plan.rejected {
        run::check(rejected, &[inputs.clone(), vec![plan.output.to_path_buf()]].concat(), &rules)?;
    }
    let provenance = Provenance::new("filter", json!({ "input": plan.inputs, "steps": plan.steps }));
    let finished = step::run(input, steps, plan.output, plan.rejected, &provenance)?;
    let step_reports = finished.reports;
    let rows_out = step_reports.last().and_then(|r| r["rows_out"].as_u64()).unwrap_or(rows_in);
    let mut report = json!({
        "tool": run::tool(), "input": plan.inputs, "output": plan.output, "rows_in": rows_in, "rows_out": rows_out,
        "steps": step_reports, "distributions": distributions(finished.output.path())?,
    });
    if let (Some(path), Some(rejected)) = (plan.rejected, &finished.rejected) {
        report["rejected"] = json!({ "path": path, "rows": rejected.rows });
    }
    // The report first, then the rejected rows, then the dataset: a failure at any step leaves
    // no finished-looking output.
    let text = serde_json::to_string_pretty(&report)?;
    run::write_atomically(report_path, text.as_bytes()).with_context(|| format!("{}: cannot write the report", report_path.display()))?;
    let committed = match finished.rejected {
        Some(rejected) => rejected.commit().map(|_| ()),
        None => Ok(()),
    }
    .and_then(|()| finished.output.commit().map(|_| ()));
    if let Err(e) = committed {
        let _ = std::fs::remove_file(report_path);
        return Err(e);
    }
    println!("filter: {rows_in} rows in, {rows_out} rows out -> {}", plan.output.display());
    for step in report["steps"].as_array().into_iter().flatten() {
        println!("  {:<14} {:>8} -> {:<8} {}", step["step"].as_str().unwrap_or(""), step["rows_in"], step["rows_out"], compact(step));
    }
    println!("report: {}", report_path.display());
    Ok(())
}

/// The input's files and the folders named as inputs: what no output may be or lie in.
fn input_paths(input: &Dataset, specs: &[String]) -> Vec<PathBuf> {
    let mut paths = input.files.clone();
    paths.extend(specs.iter().map(PathBuf::from).filter(|p| p.is_dir()));
    paths
}

/// The report may replace only an earlier report of ours, and only with --overwrite.
fn check_report_path(path: &Path, inputs: &[PathBuf], overwrite: bool) -> Result<()> {
    run::check_not_an_input(path, inputs)?;
    if !path.exists() {
        return Ok(());
    }
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["tool"].as_str().is_some_and(|t| t.starts_with("magpie ")));
    match (ours, overwrite) {
        (false, _) => bail!("{}: exists and is not a magpie report; refusing to overwrite it (give --report elsewhere)", path.display()),
        (true, false) => bail!("{}: an earlier report exists; pass --overwrite to replace it", path.display()),
        (true, true) => Ok(()),
    }
}

/// A step's extra report fields on one line.
fn compact(step: &Value) -> String {
    let Value::Object(map) = step else { return String::new() };
    map.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "rows_in" | "rows_out"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{batch, read_all, text, write};
    use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch};
    use std::sync::Arc;

    fn steps(json: &str) -> Vec<Box<dyn Step>> {
        parse_steps(json).unwrap().into_iter().map(|s| s.build().unwrap()).collect()
    }

    fn column(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
        batch.column_by_name(name).unwrap().as_string::<i32>().iter().map(|v| v.map(str::to_string)).collect()
    }

    fn run_on(input: RecordBatch, json: &str) -> (RecordBatch, Vec<Value>) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.parquet", &input);
        let output = dir.path().join("out.parquet");
        let finished = step::run(Dataset::open(&[path.display().to_string()]).unwrap(), steps(json), &output, None, &Provenance::new("test", ())).unwrap();
        finished.output.commit().unwrap();
        (read_all(&[&output]).unwrap(), finished.reports)
    }

    #[test]
    fn an_input_without_instructions_is_refused_by_the_steps_that_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "notes.parquet", &batch(vec![("uuid", text(&["a"])), ("text", text(&["hi"]))]));
        let input = Dataset::open(&[path.display().to_string()]).unwrap();
        let error = require_text(&input, &parse_steps(r#"[{"step": "exact_dedup"}]"#).unwrap()).unwrap_err().to_string();
        assert!(error.contains("notes.parquet: column `messages` is missing") && error.contains("found columns: uuid, text"), "{error}");
        assert!(require_text(&input, &parse_steps(r#"[{"step": "select", "limit": 1}]"#).unwrap()).is_ok());
        let instructions = write(dir.path(), "released.parquet", &batch(vec![("uuid", text(&["a"])), ("instruction", text(&["hi"]))]));
        let released = Dataset::open(&[instructions.display().to_string()]).unwrap();
        assert!(require_text(&released, &parse_steps(r#"[{"step": "exact_dedup"}]"#).unwrap()).is_ok());
    }

    const LONG: &str = "please write a detailed step by step guide explaining how to bake sourdough bread at home for complete beginners who only have simple kitchen tools and a small oven";

    #[test]
    fn dedup_steps_keep_the_first_of_planted_duplicates_and_carry_other_columns() {
        let input = batch(vec![
            ("uuid", text(&["a", "b", "c", "d", "e"])),
            ("instruction", text(&[LONG, "Hello,   WORLD!", "hello world", &LONG.to_uppercase(), "something else entirely"])),
            ("notes", text(&["1", "2", "3", "4", "5"])),
        ]);
        let (out, report) = run_on(input, r#"[{"step": "exact_dedup"}, {"step": "minhash_dedup"}]"#);
        assert_eq!(column(&out, "uuid"), ["a", "b", "e"].map(|s| Some(s.to_string())));
        assert_eq!(column(&out, "notes"), ["1", "2", "5"].map(|s| Some(s.to_string())));
        assert_eq!(report[0]["duplicates"], 2); // "hello world" and the upper-cased LONG
        assert_eq!(report[1]["rows_in"], 3);
    }

    #[test]
    fn minhash_without_drop_writes_clusters_for_keep_dedup() {
        let input = batch(vec![("uuid", text(&["a", "b", "c"])), ("instruction", text(&[LONG, &format!("{LONG} please"), "unrelated"]))]);
        let (out, _) = run_on(input.clone(), r#"[{"step": "minhash_dedup", "drop": false}]"#);
        assert_eq!(column(&out, "minhash_cluster"), ["a", "a", "c"].map(|s| Some(s.to_string())));
        let (out, report) = run_on(input, r#"[{"step": "minhash_dedup", "drop": false}, {"step": "select", "keep_dedup": true}]"#);
        assert_eq!(column(&out, "uuid"), ["a", "c"].map(|s| Some(s.to_string())));
        assert_eq!(report[1]["dropped"]["near duplicate (minhash)"], 1);
    }

    #[test]
    fn select_applies_magpie_rules_ordinal_scales_and_the_min_similar_uuid_rule() {
        let input = batch(vec![
            ("uuid", text(&["a", "b", "c", "d", "e", "f"])),
            ("instruction", text(&["q1", "q2 ends with:", "q3", "q4", "q5", "q6"])),
            ("input_quality", text(&["good", "excellent", "poor", "average", "good", "excellent"])),
            ("instruct_reward", Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0, -11.0, 0.5, 0.0])) as ArrayRef),
            // e is a semantic near-duplicate of a; f is its own group's earliest row.
            ("min_similar_uuid", Arc::new(arrow::array::StringArray::from(vec![None, None, None, None, Some("a"), Some("f")])) as ArrayRef),
            ("response_length", Arc::new(arrow::array::Int64Array::from(vec![10, 50, 40, 30, 20, 5])) as ArrayRef),
        ]);
        let recipe = r#"[{"step": "select", "rules": [
            {"column": "input_quality", "op": ">=", "value": "average"},
            {"column": "instruct_reward", "op": ">", "value": -10},
            {"column": "instruction", "op": "not_ends_with", "value": ":"}],
            "keep_dedup": true, "sort_by": "response_length", "limit": 2}]"#;
        let (out, report) = run_on(input, recipe);
        // Passing: a (10) and f (5); top 2 by response length, largest first.
        assert_eq!(column(&out, "uuid"), ["a", "f"].map(|s| Some(s.to_string())));
        let dropped = &report[0]["dropped"];
        assert_eq!(dropped["near duplicate (semantic)"], 1);
        assert_eq!(dropped.as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 4);
    }

    #[test]
    fn top_k_puts_nan_and_null_last_in_both_orders_and_refuses_a_text_key() {
        let input = batch(vec![
            ("uuid", text(&["a", "b", "c", "d"])),
            ("instruction", text(&["q1", "q2", "q3", "q4"])),
            ("score", Arc::new(Float64Array::from(vec![Some(f64::NAN), None, Some(1.0), Some(2.0)])) as ArrayRef),
        ]);
        // The top 2 of either order are the two real scores (kept rows stay in the data's order);
        // NaN ranked first descending and null first ascending before.
        for (descending, want) in [(true, ["c", "d"]), (false, ["c", "d"])] {
            let recipe = format!(r#"[{{"step": "select", "sort_by": "score", "limit": 2, "descending": {descending}}}]"#);
            let (out, _) = run_on(input.clone(), &recipe);
            assert_eq!(column(&out, "uuid"), want.map(|s| Some(s.to_string())), "descending {descending}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.parquet", &input);
        let recipe = r#"[{"step": "select", "sort_by": "instruction", "limit": 2}]"#;
        let error = step::run(Dataset::open(&[path.display().to_string()]).unwrap(), steps(recipe), &dir.path().join("out.parquet"), None, &Provenance::new("test", ()))
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("sort_by column `instruction` is text with no order"), "{error}");
    }

    #[test]
    fn shuffle_and_split_are_seeded() {
        let uuids: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = uuids.iter().map(String::as_str).collect();
        let input = batch(vec![("uuid", text(&refs)), ("instruction", text(&refs))]);
        let recipe = r#"[{"step": "select", "shuffle_seed": 42, "test_ratio": 0.2}]"#;
        let (first, _) = run_on(input.clone(), recipe);
        let (second, _) = run_on(input, recipe);
        assert_eq!(first, second);
        assert_ne!(column(&first, "uuid")[..5], uuids[..5].iter().map(|u| Some(u.clone())).collect::<Vec<_>>()[..]);
        let tests = column(&first, "split").iter().filter(|s| s.as_deref() == Some("test")).count();
        assert!((3..=18).contains(&tests), "{tests} of 50 in test");
    }

    #[test]
    fn rejected_rows_keep_their_columns_step_and_reason_and_add_up_to_the_input() {
        let input = batch(vec![
            ("uuid", text(&["a", "b", "c", "d", "e", "f"])),
            ("instruction", text(&[LONG, "hello world", "Hello,   WORLD!", &format!("{LONG} please"), "short one", "q6"])),
            ("response_length", Arc::new(arrow::array::Int64Array::from(vec![10, 50, 40, 30, 20, 5])) as ArrayRef),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "in.parquet", &input);
        let (output, rejected) = (dir.path().join("out"), dir.path().join("rejected"));
        let recipe = r#"[{"step": "exact_dedup"}, {"step": "minhash_dedup"},
            {"step": "select", "rules": [{"column": "instruction", "op": "!=", "value": "q6"}], "sort_by": "response_length", "limit": 2}]"#;
        let finished = step::run(Dataset::open(&[path.display().to_string()]).unwrap(), steps(recipe), &output, Some(&rejected), &Provenance::new("test", ())).unwrap();
        finished.rejected.unwrap().commit().unwrap();
        finished.output.commit().unwrap();
        let (kept, dropped) = (read_all(&[&output]).unwrap(), read_all(&[&rejected]).unwrap());
        assert!(rejected.join(crate::run::MANIFEST).is_file(), "the rejected rows are a dataset of their own");
        assert_eq!(kept.num_rows() + dropped.num_rows(), 6);
        let mut all: Vec<_> = column(&kept, "uuid").into_iter().chain(column(&dropped, "uuid")).flatten().collect();
        all.sort();
        assert_eq!(all, ["a", "b", "c", "d", "e", "f"]);
        let why: Vec<(String, String, String)> = column(&dropped, "uuid")
            .into_iter()
            .zip(column(&dropped, "drop_step"))
            .zip(column(&dropped, "drop_reason"))
            .map(|((u, s), r)| (u.unwrap(), s.unwrap(), r.unwrap()))
            .collect();
        assert_eq!(
            why,
            [
                ("c".into(), "exact_dedup".into(), "exact duplicate of b".into()),
                ("d".into(), "minhash_dedup".into(), "near duplicate (minhash) of a".into()),
                ("a".into(), "select".into(), "not in the top 2 by response_length".into()),
                ("f".into(), "select".into(), r#"failed instruction != "q6""#.into()),
            ]
        );
        // Columns a row had when it was dropped are kept; ones it never had are null.
        assert_eq!(column(&dropped, "exact_duplicate_of"), [Some("b".to_string()), None, None, None]);
        assert_eq!(column(&dropped, "minhash_cluster"), [None, Some("a".to_string()), Some("a".to_string()), Some("f".to_string())]);
    }

    #[test]
    fn unknown_step_keys_and_missing_reward_models_are_errors() {
        let error = parse_steps(r#"[{"step": "minhash_dedup", "treshold": 0.7}]"#).unwrap_err();
        assert!(error.contains("unknown field `treshold`"), "{error}");
        let error = parse_steps(r#"[{"step": "reward_scores"}]"#).unwrap_err();
        assert!(error.contains("missing field `reward_model`"), "{error}");
        let steps = parse_steps(r#"[{"step": "reward_scores", "reward_model": "/nonexistent/rm"}]"#).unwrap();
        let error = format!("{:#}", steps.into_iter().next().unwrap().build().err().unwrap());
        assert!(error.contains("/nonexistent/rm"), "{error}");
    }
}
