//! `magpie filter` through the binary: the demo recipe, rejected rows, sharded runs, semantic
//! dedup's indexes and the model-judged tags, as a user runs them.

use magpie::data::Dataset;
use std::path::Path;

mod common;
use common::{column_of, fixture, magpie, stderr};

#[test]
fn filter_demo_recipe_dedups_tags_selects_and_reports_on_magpie_released_data() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("filtered.parquet");
    // The demo recipe's reward model is the judge `magpie convert --judge-reward-head` builds.
    let judge = dir.path().join("judge-rm");
    let output = magpie(&["convert", "--judge-reward-head", "-o", judge.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let demo = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/smollm2-demo-filter.yaml")).unwrap();
    assert!(demo.contains("reward_model: out/demo/judge-rm"));
    let recipe = dir.path().join("demo-filter.yaml");
    std::fs::write(&recipe, demo.replace("out/demo/judge-rm", judge.to_str().unwrap())).unwrap();
    let input = fixture("magpie-released.parquet");
    let output = magpie(&["filter", "--recipe", recipe.to_str().unwrap(), "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("filtered.parquet.report.json")).unwrap()).unwrap();
    assert_eq!(report["rows_in"], 5);
    assert_eq!(report["steps"].as_array().unwrap().len(), 6);
    assert!(report["distributions"]["language"]["en"].as_u64().unwrap() > 0, "{report}");
    let text = String::from_utf8(magpie(&["inspect", out.to_str().unwrap()]).stdout).unwrap();
    for column in ["source_notes", "gen_input_configs", "exact_duplicate_of", "minhash_cluster", "min_neighbor_distance", "repeat_count", "min_similar_uuid", "refusal", "instruct_reward", "reward_model", "split"] {
        assert!(text.contains(column), "{column}: {text}");
    }
}

#[test]
fn filter_rejected_rows_are_a_dataset_that_other_commands_open_and_the_report_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (out, rejected) = (dir.path().join("kept.parquet"), dir.path().join("rejected"));
    let input = fixture("magpie-released.parquet");
    let steps = r#"[{"step": "select", "rules": [{"column": "instruction", "op": "contains", "value": "Python"}]}]"#;
    let args = ["filter", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", steps, "--rejected"];
    let refused = magpie(&[&args[..], &[out.to_str().unwrap()]].concat());
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--rejected must differ from the output"), "{}", stderr(&refused));
    let output = magpie(&[&args[..], &[rejected.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("kept.parquet.report.json")).unwrap()).unwrap();
    let (kept, dropped) = (report["rows_out"].as_u64().unwrap(), report["rejected"]["rows"].as_u64().unwrap());
    assert!(kept > 0 && dropped > 0, "{report}");
    assert_eq!(kept + dropped, 5);
    let text = String::from_utf8(magpie(&["inspect", rejected.to_str().unwrap()]).stdout).unwrap();
    assert!(text.contains(&format!("rows: {dropped}")) && text.contains("drop_reason") && text.contains("source_notes"), "{text}");
}

/// Every row of a dataset as (uuid, the named columns as text), sorted by uuid.
fn table(path: &Path, columns: &[&str]) -> Vec<(String, Vec<Option<String>>)> {
    use arrow::array::{Array, AsArray};
    let dataset = Dataset::open(&[path.display().to_string()]).unwrap();
    let mut rows = vec![];
    for batch in dataset.batches() {
        let batch = batch.unwrap();
        let text = |name: &str| arrow::compute::cast(batch.column_by_name(name).unwrap(), &arrow::datatypes::DataType::Utf8).unwrap();
        let uuids = text("uuid");
        let values: Vec<_> = columns.iter().map(|c| text(c)).collect();
        for i in 0..batch.num_rows() {
            let row = values.iter().map(|v| v.is_valid(i).then(|| v.as_string::<i32>().value(i).to_string())).collect();
            rows.push((uuids.as_string::<i32>().value(i).to_string(), row));
        }
    }
    rows.sort();
    rows
}

/// Reward scores depend on the rows padded into one batch (float rounding, about 1e-5), so the
/// reward model scores one row at a time here and the two runs agree exactly.
#[test]
fn filter_shards_of_row_local_steps_resume_and_equal_one_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let judge = dir.path().join("judge-rm");
    let output = magpie(&["convert", "--judge-reward-head", "-o", judge.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let steps = format!(r#"[{{"step": "heuristics"}}, {{"step": "reward_scores", "reward_model": "{}", "batch_size": 1}}, {{"step": "select", "rules": [{{"column": "refusal", "op": "==", "value": false}}]}}]"#, judge.display());
    let input = fixture("magpie-released.parquet");
    let filter = |out: &Path, extra: &[&str]| magpie(&[&["filter", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", &steps], extra].concat());
    let whole = dir.path().join("whole");
    assert!(filter(&whole, &[]).status.success());
    let sharded = dir.path().join("sharded");
    let foreign = dir.path().join("sharded.report.shard-1-of-3.json");
    std::fs::write(&foreign, "notes of mine").unwrap();
    let output = filter(&sharded, &["--shard", "1/3", "--chunk-rows", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("exists and is not a magpie report"), "{}", stderr(&output));
    assert_eq!(std::fs::read_to_string(&foreign).unwrap(), "notes of mine");
    std::fs::remove_file(&foreign).unwrap();
    for shard in ["0/3", "2/3"] {
        let output = filter(&sharded, &["--shard", shard, "--chunk-rows", "1"]);
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(String::from_utf8_lossy(&output.stdout).contains("other shards' chunks are still missing"));
    }
    let unfinished = magpie(&["inspect", sharded.to_str().unwrap()]);
    assert_eq!(unfinished.status.code(), Some(1), "readers refuse the folder until the last shard is done");
    // Shard 0 was killed before its second chunk: its part is gone, and the rerun writes it again.
    std::fs::remove_file(sharded.join("part-00003.parquet")).unwrap();
    for shard in ["1/3", "0/3"] {
        let output = filter(&sharded, &["--shard", shard, "--chunk-rows", "1"]);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    assert!(sharded.join(".magpie-manifest.json").is_file());
    assert!(dir.path().join("sharded.report.shard-0-of-3.json").is_file());
    let columns = ["instruction", "refusal", "truncated", "language", "instruct_reward", "reward_model"];
    assert_eq!(table(&sharded, &columns), table(&whole, &columns));

    let output = magpie(&["filter", "-i", input.to_str().unwrap(), "-o", dir.path().join("dedup").to_str().unwrap(), "--steps", r#"[{"step": "exact_dedup"}]"#, "--shard", "0/2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--shard: exact_dedup compares every row with every other, so it cannot run on a shard of the rows; run it in a second, unsharded `magpie filter`"), "{}", stderr(&output));
    assert!(!dir.path().join("dedup").exists());
    let missing = r#"[{"step": "reward_scores", "reward_model": "/nonexistent/rm"}]"#;
    let output = magpie(&["filter", "-i", input.to_str().unwrap(), "-o", dir.path().join("missing").to_str().unwrap(), "--steps", missing, "--shard", "0/2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("/nonexistent/rm"), "{}", stderr(&output));
    assert!(!dir.path().join("missing").exists(), "a missing model leaves no claimed folder");
}

#[test]
fn filter_recipe_with_a_misspelt_step_key_fails_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("bad.yaml");
    std::fs::write(&recipe, "steps:\n  - step: minhash_dedup\n    treshold: 0.7\n").unwrap();
    let out = dir.path().join("out.parquet");
    let input = fixture("magpie-released.parquet");
    let output = magpie(&["filter", "--recipe", recipe.to_str().unwrap(), "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("bad.yaml: key `steps`: invalid value '"), "{}", stderr(&output));
    assert!(stderr(&output).contains("unknown field `treshold`"), "{}", stderr(&output));
    assert!(!out.exists());
}

#[test]
fn semantic_dedup_without_its_model_fails_naming_the_folder_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let input = fixture("magpie-released.parquet");
    let steps = r#"[{"step": "semantic_dedup", "model": "/nonexistent/minilm"}]"#;
    let output = magpie(&["filter", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", steps]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("/nonexistent/minilm: embedding model incomplete"), "{}", stderr(&output));
    assert!(!out.exists());
}

#[test]
fn semantic_dedup_with_hnsw_marks_the_rows_exact_knn_marks_and_reports_its_recall() {
    // The released fixture and a copy under other uuids: every row has one copy, at distance 0.
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("magpie-released.parquet");
    let copy = dir.path().join("copy.parquet");
    {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&input).unwrap()).unwrap().build().unwrap();
        let mut writer = None;
        for batch in reader {
            let batch = batch.unwrap();
            let uuids: arrow::array::LargeStringArray = (0..batch.num_rows()).map(|i| Some(format!("copy-{i}"))).collect();
            let column = batch.schema().index_of("uuid").unwrap();
            let mut columns = batch.columns().to_vec();
            columns[column] = std::sync::Arc::new(uuids);
            let batch = arrow::array::RecordBatch::try_new(batch.schema(), columns).unwrap();
            let writer = writer.get_or_insert_with(|| parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&copy).unwrap(), batch.schema(), None).unwrap());
            writer.write(&batch).unwrap();
        }
        writer.unwrap().close().unwrap();
    }
    let run = |index: &str| {
        let out = dir.path().join(format!("{index}.parquet"));
        let steps = format!(r#"[{{"step": "semantic_dedup", "drop": false, "index": "{index}", "hnsw": {{"recall_sample": 10}}}}]"#);
        let output = magpie(&["filter", "-i", input.to_str().unwrap(), "-i", copy.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", &steps]);
        assert!(output.status.success(), "{}", stderr(&output));
        let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("{index}.parquet.report.json"))).unwrap()).unwrap();
        (out, report["steps"][0].clone())
    };
    let ((exact, _), (hnsw, report)) = (run("exact"), run("hnsw"));
    for name in ["min_similar_uuid", "repeat_count"] {
        assert_eq!(column_of(&hnsw, name), column_of(&exact, name), "{name}");
    }
    assert_eq!(column_of(&hnsw, "repeat_count"), ["1"; 10]);
    assert_eq!(report["index"], "hnsw");
    assert_eq!(report["recall"]["sample"], 10);
    assert_eq!(report["recall"]["near_duplicates_exact"], 10);
    assert_eq!(report["recall"]["near_duplicates"], 1.0);
    assert!(report["index_bytes"].as_u64().unwrap() > 0, "{report}");
}

#[test]
fn judge_and_safety_tags_run_the_embedded_model_and_every_constrained_judge_scale_parses() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("judged.parquet");
    let input = fixture("magpie-released.parquet");
    let steps = r#"[{"step": "judge_tags", "max_tokens": 48}, {"step": "safety_tag"}]"#;
    let output = magpie(&["filter", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", steps]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("judged.parquet.report.json")).unwrap()).unwrap();
    let step = &report["steps"][0];
    assert_eq!(step["rows_out"], 5);
    assert_eq!(step["structured_output"], true, "{step}");
    // The grammar holds each scale to its values, so even SmolLM2's answers name one.
    for scale in ["input_quality", "difficulty", "task_category"] {
        assert!(step["parse_failures"].get(scale).is_none(), "{scale}: {step}");
    }
    assert!(report["steps"][1]["parse_failures"].is_u64(), "{report}");
    let text = String::from_utf8(magpie(&["inspect", out.to_str().unwrap()]).stdout).unwrap();
    for column in ["input_quality", "quality_explanation", "difficulty", "intent", "knowledge", "task_category", "other_task_category", "llama_guard_2", "source_notes"] {
        assert!(text.contains(column), "{column}: {text}");
    }
}

/// `--rejected` with `--shard`: a second chunked folder, finished with the output, whose rows
/// are those an unsharded run rejects (with the later steps' columns null for rows an early step
/// dropped), and kept plus rejected rows are the input rows, through a killed and resumed shard.
#[test]
fn sharded_rejected_rows_resume_with_the_output_and_equal_an_unsharded_runs() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("magpie-released.parquet");
    let steps = r#"[{"step": "select", "rules": [{"column": "instruction", "op": "not_contains", "value": "haiku"}]}, {"step": "heuristics"}, {"step": "select", "rules": [{"column": "instruction", "op": "contains", "value": "Python"}]}]"#;
    let filter = |out: &Path, rejected: &Path, extra: &[&str]| {
        magpie(&[&["filter", "-i", input.to_str().unwrap(), "-o", out.to_str().unwrap(), "--steps", steps, "--rejected", rejected.to_str().unwrap()], extra].concat())
    };
    let (whole, whole_rejected) = (dir.path().join("whole.parquet"), dir.path().join("whole-rejected"));
    assert!(filter(&whole, &whole_rejected, &[]).status.success());
    let (sharded, rejected) = (dir.path().join("sharded"), dir.path().join("rejected"));
    let shard = |index: &str| {
        let output = filter(&sharded, &rejected, &["--shard", index, "--chunk-rows", "1"]);
        assert!(output.status.success(), "{}", stderr(&output));
    };
    shard("0/2");
    assert_eq!(magpie(&["inspect", rejected.to_str().unwrap()]).status.code(), Some(1), "unfinished until the last shard");
    // Shard 1 was killed after chunk 1's rejected part and before its output part.
    shard("1/2");
    std::fs::remove_file(sharded.join("part-00001.parquet")).unwrap();
    std::fs::remove_file(sharded.join(".magpie-manifest.json")).unwrap();
    std::fs::remove_file(rejected.join(".magpie-manifest.json")).unwrap();
    shard("1/2");
    assert!(sharded.join(".magpie-manifest.json").is_file() && rejected.join(".magpie-manifest.json").is_file());

    let reasons = ["drop_step", "drop_reason", "refusal"];
    let (kept, dropped) = (table(&sharded, &[]), table(&rejected, &reasons));
    assert_eq!(dropped, table(&whole_rejected, &reasons));
    assert!(dropped.iter().any(|(_, row)| row[0].as_deref() == Some("select") && row[2].is_none()), "a row the first select dropped has no heuristics columns: {dropped:?}");
    assert!(dropped.iter().all(|(_, row)| row[1].as_ref().is_some_and(|r| !r.is_empty())), "{dropped:?}");
    let mut all: Vec<String> = kept.iter().chain(&dropped).map(|(uuid, _)| uuid.clone()).collect();
    all.sort();
    let mut input_uuids: Vec<String> = table(&input, &[]).into_iter().map(|(uuid, _)| uuid).collect();
    input_uuids.sort();
    assert_eq!(all, input_uuids, "kept plus rejected rows are the input rows, none twice");

    let file = dir.path().join("rejected.parquet");
    let output = filter(&dir.path().join("other"), &file, &["--shard", "0/2"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("rejected.parquet: a sharded filter writes --rejected as a folder of parts"), "{}", stderr(&output));
    assert!(!dir.path().join("other").exists() && !file.exists());
}
