//! Drives the real `magpie` binary: exit codes, error messages and recipe handling as a user
//! sees them.

use magpie::data::Dataset;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

mod common;
use common::{column_of, converted_smollm2, dataset_column, embedded_model, fixture, kill_once_exists, magpie, rows, stderr};

#[test]
fn inspect_shows_rows_schema_stats_and_samples() {
    let path = fixture("magpie-released.parquet");
    let output = magpie(&["inspect", path.to_str().unwrap(), "--samples", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("rows: 5"), "{text}");
    assert!(text.contains("messages"), "{text}");
    assert!(text.contains("source_notes"), "{text}");
    assert!(text.contains("turns min 2 mean 2.0 max 2"), "{text}");
    assert!(text.contains("[user] How do I reverse a list in Python?"), "{text}");
    assert_eq!(text.matches("--- sample").count(), 1, "{text}");
}

#[test]
fn inspect_of_a_truncated_file_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("magpie-released.parquet")).unwrap();
    let truncated = dir.path().join("cut.parquet");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let output = magpie(&["inspect", truncated.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("cut.parquet: not a readable parquet file"), "{}", stderr(&output));
    assert!(output.stdout.is_empty());
}

#[test]
fn unknown_recipe_key_is_an_error_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("bad.yaml");
    std::fs::write(&recipe, "num: 5\nnum_instructoins: 7\n").unwrap();
    let output = magpie(&["synth", "--recipe", recipe.to_str().unwrap()]);
    assert_ne!(output.status.code(), Some(0));
    let error = stderr(&output);
    assert!(error.contains("bad.yaml: unknown key `num_instructoins` for `magpie synth`"), "{error}");
}

#[test]
fn recipe_values_are_checked_by_the_flag_parser_and_overridden_by_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("r.yaml");
    std::fs::write(&recipe, "num: lots\n").unwrap();
    let output = magpie(&["synth", "--recipe", recipe.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("r.yaml: key `num`: invalid value 'lots'"), "{}", stderr(&output));
    // The command line wins, so the bad recipe value is never parsed (and synth goes on to ask
    // for the output it lacks).
    let output = magpie(&["synth", "--recipe", recipe.to_str().unwrap(), "--num", "3"]);
    assert!(stderr(&output).contains("--output is required"), "{}", stderr(&output));
}

// ---- training on tiny fixtures and the converted SmolLM2 ----

#[test]
fn sft_and_dpo_refuse_bad_input_naming_file_and_column_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let out = dir.path().join("run");
    let released = fixture("magpie-released.parquet");
    // No messages at all in a preference file: SFT names the file and the column.
    let output = magpie(&["sft", "--model", model.to_str().unwrap(), "-i", fixture("ultrafeedback-armorm.parquet").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("ultrafeedback-armorm.parquet: column `messages` is missing"), "{}", stderr(&output));
    // An SFT file has no preference columns.
    let output = magpie(&["dpo", "--model", model.to_str().unwrap(), "-i", released.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("column `prompt` is missing"), "{}", stderr(&output));
    // A missing model directory is named.
    let output = magpie(&["sft", "--model", "/nonexistent/model", "-i", released.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("/nonexistent/model"), "{}", stderr(&output));
    assert!(!out.exists(), "no partial output");
    // A misspelt recipe key.
    let recipe = dir.path().join("dpo.yaml");
    std::fs::write(&recipe, "beta: 0.1\nlearning_rat: 1.0e-6\n").unwrap();
    let output = magpie(&["dpo", "--recipe", recipe.to_str().unwrap()]);
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr(&output).contains("dpo.yaml: unknown key `learning_rat` for `magpie dpo`"), "{}", stderr(&output));
}

#[test]
fn dry_run_prints_the_memory_plan_from_the_config_alone_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    for stage in ["sft", "dpo"] {
        let output = magpie(&[stage, "--model", fixture("tiny-llama").to_str().unwrap(), "-i", "not-read", "-o", out.to_str().unwrap(), "--bf16", "--dry-run", "8"]);
        assert!(output.status.success(), "{}", stderr(&output));
        let plan = String::from_utf8_lossy(&output.stdout);
        for part in ["8 ranks (optimizer state sharded)", "fp32 master weights", "Adam moments", "activations", "total"] {
            assert!(plan.contains(part), "{stage}: {part} in {plan}");
        }
        assert_eq!(plan.contains("reference model"), stage == "dpo", "{plan}");
    }
    // Some of Llama-3.1-8B's 32 blocks recomputed (its config.json is all a dry run reads).
    let llama_8b = dir.path().join("llama-3.1-8b");
    std::fs::create_dir(&llama_8b).unwrap();
    std::fs::write(llama_8b.join("config.json"), r#"{"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0}"#).unwrap();
    let output = magpie(&["sft", "--model", llama_8b.to_str().unwrap(), "-i", "not-read", "-o", out.to_str().unwrap(), "--bf16",
                          "--gradient-checkpointing", "12", "--dry-run", "8"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains(", gradient checkpointing of 12 of 32 blocks\n"), "{}", stderr(&output));
    // The seed's recipe (`device: cuda`, `gradient_checkpointing: auto`) plans on a machine
    // without its GPU too, and says what auto decided.
    let recipe = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/llama3.1-8b-magpie-sft.yaml");
    let output = magpie(&["sft", "--recipe", recipe.to_str().unwrap(), "--model", fixture("tiny-llama").to_str().unwrap(), "-i", "not-read",
                          "-o", out.to_str().unwrap(), "--dry-run", "8"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let plan = String::from_utf8_lossy(&output.stdout);
    assert!(plan.starts_with("gradient checkpointing auto: "), "{plan}");
    assert!(!out.exists());
}

#[test]
fn sft_then_dpo_train_the_converted_model_and_synth_loads_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let sft = dir.path().join("sft");
    let released = fixture("magpie-released.parquet");
    let output = magpie(&["sft", "--model", model.to_str().unwrap(), "-i", released.to_str().unwrap(), "-o", sft.to_str().unwrap(),
        "--max-length", "128", "--packing", "--per-device-train-batch-size", "2", "--max-steps", "2", "--learning-rate", "1e-5",
        "--save-steps", "1", "--save-total-limit", "1", "--eval-ratio", "0.25", "--device", "cpu"]);
    assert!(output.status.success(), "{}", stderr(&output));
    for file in ["model/model.safetensors", "model/config.json", "model/tokenizer.json", "metrics.jsonl", "loss.png", "checkpoint-1/optimizer.safetensors"] {
        assert!(sft.join(file).is_file(), "{file}");
    }
    let metrics = std::fs::read_to_string(sft.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"eval_loss\""), "{metrics}");

    let dpo = dir.path().join("dpo");
    let pairs = fixture("ultrafeedback-armorm.parquet");
    let output = magpie(&["dpo", "--model", sft.join("model").to_str().unwrap(), "-i", pairs.to_str().unwrap(), "-o", dpo.to_str().unwrap(),
        "--max-length", "160", "--max-prompt-length", "64", "--per-device-train-batch-size", "2", "--max-steps", "1",
        "--learning-rate", "1e-6", "--save-steps", "0", "--device", "cpu", "--full-determinism", "--padding-free"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // Every op of the (padding-free) DPO step has a deterministic kernel (libtorch would refuse
    // it otherwise).
    assert!(stderr(&output).contains("deterministic algorithms on, CUBLAS_WORKSPACE_CONFIG=:4096:8"), "{}", stderr(&output));
    let metrics = std::fs::read_to_string(dpo.join("metrics.jsonl")).unwrap();
    for key in ["rewards/accuracies", "rewards/margins", "logps/chosen", "logits/rejected"] {
        assert!(metrics.contains(key), "{key}: {metrics}");
    }
    assert!(dpo.join("rewards.png").is_file());

    // The trained checkpoint loads in mistralrs through `magpie synth --model`.
    let synth = dir.path().join("synth");
    let output = magpie(&["synth", "--model", dpo.join("model").to_str().unwrap(), "--num", "1", "--max-tokens", "16",
        "--response-max-tokens", "16", "-o", synth.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(Dataset::open(&[synth.display().to_string()]).unwrap().num_rows, 1);
}

// ---- synth on the embedded SmolLM2 (scripts/setup.sh puts it in models/) ----

/// Small settings so a run takes seconds: 12 rows in chunks of 3.
fn synth_args(output: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "synth", "--num", "12", "--chunk-rows", "3", "--max-tokens", "40", "--response-max-tokens", "40",
        "--threads", "2", "--batch-size", "8", "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(output.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_synth(output: &Path, extra: &[&str]) -> Output {
    let args = synth_args(output, extra);
    let output = Command::new(env!("CARGO_BIN_EXE_magpie")).args(&args).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    output
}

#[test]
fn synth_multi_turn_with_preference_responses_writes_the_catalogue_columns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mt");
    let output = run_synth(&out, &["--num", "4", "--turns", "2", "--responses", "2", "--sanitize"]);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("instructions attempted  4"), "{summary}");
    let rows = rows(&out);
    assert!(!rows.is_empty(), "{summary}");
    for (_, messages) in &rows {
        assert_eq!(messages[0].role, "user");
        assert_eq!(messages[1].role, "assistant");
        assert!(!messages[0].content.is_empty());
        assert!(!messages[0].content.contains('\n'), "early stop at newline: {:?}", messages[0].content);
    }
    assert!(rows.iter().any(|(_, m)| m.len() == 4), "no second turn: {rows:#?}");
    let report = magpie(&["inspect", out.to_str().unwrap()]);
    let report = String::from_utf8_lossy(&report.stdout);
    for column in ["gen_input_configs", "gen_response_configs", "instruction_length", "response_length", "finish_reasons", "raw_instruction", "responses"] {
        assert!(report.contains(column), "{column} missing: {report}");
    }
    assert!(report.contains("responses") && report.contains("items min 2 mean 2.0 max 2"), "{report}");
}

/// `--ban-first-tokens`: no instruction starts with a banned token (SmolLM2 opens most with one
/// of these), the redraws are counted; a text of two tokens, and greedy harvesting, are refused.
#[test]
fn banned_first_tokens_never_open_an_instruction_and_bad_bans_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("banned");
    let output = run_synth(&out, &["--instructions-only", "--ban-first-tokens", "I,What,How,Can,Write"]);
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains("banned first tokens") && summary.contains("redrawn"), "{summary}");
    for instruction in dataset_column(&out, "instruction").into_iter().map(Option::unwrap_or_default) {
        let first_word = instruction.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("");
        assert!(!["I", "What", "How", "Can", "Write"].contains(&first_word), "{instruction:?}");
    }
    for (flags, message) in [(["--ban-first-tokens", "Hello world"], "is 2 tokens"), (["--temperature", "0"], "needs --temperature above 0")] {
        let args = synth_args(&dir.path().join("never"), &[&["--ban-first-tokens", "What"], &flags[..]].concat());
        let output = Command::new(env!("CARGO_BIN_EXE_magpie")).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(1));
        assert!(stderr(&output).contains(message), "{}", stderr(&output));
    }
    assert!(!dir.path().join("never").exists());
}

#[test]
fn synth_input_answers_another_models_instructions_keeps_their_columns_and_resumes_after_kill() {
    let dir = tempfile::tempdir().unwrap();
    // Instructions harvested from the GGUF by llama.cpp...
    let harvest = dir.path().join("harvest");
    run_synth(&harvest, &["--num", "4", "--chunk-rows", "1"]);
    // ...answered by another model and engine: the converted Hugging Face folder on mistralrs.
    let answerer = converted_smollm2(dir.path());
    let args = |out: &Path| -> Vec<String> {
        ["synth", "--input", harvest.to_str().unwrap(), "--model", answerer.to_str().unwrap(), "--chunk-rows", "1",
         "--response-max-tokens", "24", "--threads", "2", "-o", out.to_str().unwrap()].iter().map(|s| s.to_string()).collect()
    };
    let whole = dir.path().join("answered");
    let output = Command::new(env!("CARGO_BIN_EXE_magpie")).args(args(&whole)).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(dataset_column(&whole, "uuid"), dataset_column(&harvest, "uuid"));
    assert_eq!(dataset_column(&whole, "instruction"), dataset_column(&harvest, "instruction"), "the first model's instructions");
    assert_eq!(dataset_column(&whole, "gen_input_configs"), dataset_column(&harvest, "gen_input_configs"), "the harvest's settings are kept");
    for config in dataset_column(&whole, "gen_response_configs").into_iter().map(Option::unwrap_or_default) {
        assert!(config.contains("engine: mistralrs") && config.contains("response_generator: smollm2"), "{config}");
    }
    for config in dataset_column(&harvest, "gen_response_configs").into_iter().map(Option::unwrap_or_default) {
        assert!(config.contains("engine: llamacpp"), "{config}");
    }
    let answered = rows(&whole);
    assert!(answered.iter().all(|(_, m)| m.len() == 2 && m[1].role == "assistant" && !m[1].content.is_empty()), "{answered:#?}");

    // Killed (SIGKILL) after its first part, then rerun: the same rows, none lost or doubled.
    let killed = dir.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_magpie")).args(args(&killed)).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    kill_once_exists(&mut child, &killed.join("part-00000.parquet"), Duration::from_secs(600));
    assert!(!killed.join(".magpie-manifest.json").exists(), "the run finished before the kill");
    let output = Command::new(env!("CARGO_BIN_EXE_magpie")).args(args(&killed)).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(rows(&killed), answered);

    // Magpie's released file: its conversations answered anew, its own columns kept, with
    // preference responses.
    let released = dir.path().join("released");
    let output = magpie(&["synth", "--input", fixture("magpie-released.parquet").to_str().unwrap(), "--responses", "2", "--response-max-tokens", "16",
                          "--max-tokens", "16", "--threads", "2", "-o", released.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(dataset_column(&released, "source_notes"), dataset_column(&fixture("magpie-released.parquet"), "source_notes"));
    for batch in Dataset::open(&[released.display().to_string()]).unwrap().batches() {
        let batch = batch.unwrap();
        let responses = arrow::array::AsArray::as_list::<i32>(batch.column_by_name("responses").unwrap().as_ref());
        assert!((0..batch.num_rows()).all(|i| responses.value_length(i) == 2), "two responses a row");
    }
}

#[test]
fn synth_resumes_after_kill_without_losing_or_duplicating_rows() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference");
    run_synth(&reference, &[]);
    let expected = rows(&reference);
    assert!(expected.len() >= 10, "{expected:#?}");

    let resumed = dir.path().join("resumed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .args(synth_args(&resumed, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    kill_once_exists(&mut child, &resumed.join("part-00001.parquet"), Duration::from_secs(600));
    let finished: Vec<_> = std::fs::read_dir(&resumed).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).filter(|n| n.ends_with(".parquet") && !n.starts_with('.')).collect();
    assert!(finished.len() < 4, "the run finished before the kill: {finished:?}");

    // The rerun resumes: the parts finished before the kill are kept as they were, not redone.
    let kept: Vec<_> = finished.iter().map(|name| (name, std::fs::read(resumed.join(name)).unwrap(), std::fs::metadata(resumed.join(name)).unwrap().modified().unwrap())).collect();
    run_synth(&resumed, &[]);
    for (name, bytes, modified) in kept {
        assert_eq!(std::fs::metadata(resumed.join(name)).unwrap().modified().unwrap(), modified, "{name} was written again");
        assert_eq!(std::fs::read(resumed.join(name)).unwrap(), bytes, "{name} changed");
    }
    assert_eq!(rows(&resumed), expected);
}

#[test]
fn shards_write_disjoint_parts_that_concatenate_to_the_whole_run() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    run_synth(&whole, &[]);
    let sharded = dir.path().join("sharded");
    run_synth(&sharded, &["--shard", "0/2"]);
    // Half the chunks: not a finished dataset yet, so readers refuse it.
    let first = std::fs::read_dir(&sharded).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("part-")).count();
    assert!(Dataset::open(&[sharded.display().to_string()]).unwrap_err().to_string().contains("unfinished magpie synth output"));
    // Slurm's variables select the other shard.
    let output = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .args(synth_args(&sharded, &[]))
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let all = rows(&sharded);
    assert_eq!(first, 2, "shard 0 of 2 writes chunks 0 and 2 of 4");
    assert_eq!(all, rows(&whole));
}

#[test]
fn synth_refuses_missing_or_corrupt_models_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.gguf");
    std::fs::write(&corrupt, b"GGUF\x03\x00\x00\x00 not really").unwrap();
    for (model, expected) in [(dir.path().join("absent.gguf"), "absent.gguf: model not found"), (corrupt, "corrupt.gguf: not a readable GGUF file")] {
        let out = dir.path().join("out");
        let output = magpie(&["synth", "--model", model.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
        assert!(!out.exists(), "output written for a bad model");
    }
}

#[test]
fn rerunning_into_an_output_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run_synth(&out, &["--num", "3"]);
    let args = synth_args(&out, &["--num", "3", "--seed", "7"]);
    let output = Command::new(env!("CARGO_BIN_EXE_magpie")).args(&args).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("holds a finished synth run with other settings (args.seed)"), "{}", stderr(&output));
}

// ---- eval on the embedded SmolLM2 ----

#[test]
fn eval_judges_against_a_baseline_in_both_orders_grades_and_reuses_its_answers_as_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let model = embedded_model();
    let first = dir.path().join("eval");
    let small = ["--limit", "4", "--max-tokens", "24", "--judge-max-tokens", "40", "--bootstrap", "200"];
    let output = magpie(&[&["eval", "--model", model.to_str().unwrap(), "--baseline", model.to_str().unwrap(), "--mode", "both", "-o", first.to_str().unwrap()], &small[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("magpie eval:") && stderr(&output).contains("win rate"), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(first.join("summary.json")).unwrap()).unwrap();
    let pairwise = &summary["pairwise"];
    let counted: u64 = ["wins", "ties", "losses", "unparsable"].iter().map(|k| pairwise[k].as_u64().unwrap()).sum();
    assert_eq!(counted, 4, "{summary}");
    assert_eq!(summary["grade"]["graded"].as_u64().unwrap() + summary["grade"]["unparsable"].as_u64().unwrap(), 4);
    assert_eq!(summary["prompts"], 4);
    for file in ["answers.parquet", "baseline_answers.parquet", "judgements.parquet", "pairwise.png", "grades.png", ".magpie-manifest.json"] {
        assert!(first.join(file).is_file(), "{file}");
    }
    for column in ["prompt", "answer", "baseline_answer", "verdict_model_first", "verdict_baseline_first", "judge_model_first", "outcome", "grade", "judge_grade"] {
        assert_eq!(column_of(&first.join("judgements.parquet"), column).len(), 4, "{column}");
    }
    // The first run's answers, as a baseline file matched by uuid; pairwise is the default then.
    let second = dir.path().join("again");
    let answers = first.join("answers.parquet");
    let output = magpie(&[&["eval", "--model", model.to_str().unwrap(), "--baseline-answers", answers.to_str().unwrap(), "-o", second.to_str().unwrap()], &small[..]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(column_of(&second.join("judgements.parquet"), "baseline_answer"), column_of(&first.join("judgements.parquet"), "answer"));
    // Pairwise judging without a baseline is refused before anything runs.
    let output = magpie(&["eval", "--model", model.to_str().unwrap(), "--mode", "pairwise", "-o", dir.path().join("none").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("needs --baseline"), "{}", stderr(&output));
}
