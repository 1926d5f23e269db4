//! Through the real binary: output paths never destroy a user's files, a killed run's output is
//! refused by the next stage and a resumed run's is accepted, and temporaries do not outlive
//! their runs. Each test lays out the exact folder, runs the command, and checks the exit code,
//! the message, and that every file that was there before is still there byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::{converted_smollm2 as converted, fixture, kill_once_exists, magpie, refused, s, snapshot, stderr, venv_python};

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_magpie")).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// Names under `dir` (recursively) that are magpie temporaries.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    snapshot(dir).into_keys().filter(|p| p.components().any(|c| c.as_os_str().to_string_lossy().contains(".magpie-tmp-"))).collect()
}

const EXACT: &str = r#"[{"step": "exact_dedup"}]"#;

#[test]
fn filter_refuses_a_folder_with_foreign_files_even_with_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ud = dir.path().join("ud");
    std::fs::create_dir_all(ud.join("sub")).unwrap();
    std::fs::write(ud.join("thesis.docx"), b"important").unwrap();
    std::fs::write(ud.join("sub/data.csv"), b"x").unwrap();
    let input = fixture("magpie-released.parquet");
    for extra in [&[][..], &["--overwrite"][..]] {
        let mut args = vec!["filter", "-i", s(&input), "-o", s(&ud), "--steps", EXACT];
        args.extend(extra);
        refused(dir.path(), &args, "holds files magpie did not write (sub, thesis.docx)");
    }
}

#[test]
fn an_output_that_is_or_contains_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d");
    std::fs::create_dir(&d).unwrap();
    let input = d.join("in.parquet");
    std::fs::copy(fixture("magpie-released.parquet"), &input).unwrap();
    refused(dir.path(), &["filter", "-i", s(&input), "-o", s(&d), "--steps", EXACT, "--overwrite"], "the output would contain the input");
    refused(dir.path(), &["filter", "-i", s(&input), "-o", s(&input), "--steps", EXACT, "--overwrite"], "the output is the input");
    refused(dir.path(), &["filter", "-i", s(&d), "-o", s(&d.join("inside")), "--steps", EXACT], "lies inside the input folder");
}

#[test]
fn convert_never_deletes_the_gguf_beside_its_output() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    let gguf = models.join("model.gguf");
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("smollm2-135m-instruct-q4_1.gguf"), &gguf)
        .or_else(|_| std::fs::copy(std::env::var("MAGPIE_HOME").map(PathBuf::from).unwrap().join("smollm2-135m-instruct-q4_1.gguf"), &gguf))
        .unwrap();
    refused(dir.path(), &["convert", "--gguf", s(&gguf), "-o", s(&models), "--overwrite"], "the output would contain the input");
    std::fs::write(models.join("notes.txt"), b"mine").unwrap();
    let out = dir.path().join("hf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    refused(dir.path(), &["convert", "--gguf", s(&gguf), "-o", s(&out), "--overwrite"], "holds files magpie did not write (notes.txt)");
}

#[test]
fn a_finished_output_is_replaced_only_with_overwrite_and_a_foreign_file_single_parquet_never() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("magpie-released.parquet");
    for out in [dir.path().join("out"), dir.path().join("out.parquet")] {
        let args = ["filter", "-i", s(&input), "-o", s(&out), "--steps", EXACT];
        assert!(magpie(&args).status.success());
        refused(dir.path(), &args, "pass --overwrite to replace it");
        let output = magpie(&[&args[..], &["--overwrite"]].concat());
        assert!(output.status.success(), "{}", stderr(&output));
    }
    let foreign = dir.path().join("theirs.parquet");
    std::fs::copy(&input, &foreign).unwrap();
    refused(dir.path(), &["filter", "-i", s(&input), "-o", s(&foreign), "--steps", EXACT, "--overwrite"], "was not written by magpie");
    let text = String::from_utf8(magpie(&["inspect", s(&dir.path().join("out"))]).stdout).unwrap();
    assert!(text.contains("made by: magpie") && text.contains("filter (dataset"), "{text}");
}

#[test]
fn a_failed_report_write_leaves_no_finished_looking_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let report = dir.path().join("no-such-folder/report.json");
    let input = fixture("magpie-released.parquet");
    let output = magpie(&["filter", "-i", s(&input), "-o", s(&out), "--steps", EXACT, "--report", s(&report)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("report.json"), "{}", stderr(&output));
    assert!(!out.exists(), "a dataset without its report");
    assert!(temporaries(dir.path()).is_empty(), "{:?}", temporaries(dir.path()));
    // A report path that holds someone else's file is refused before any work.
    let theirs = dir.path().join("theirs.json");
    std::fs::write(&theirs, b"{}").unwrap();
    refused(dir.path(), &["filter", "-i", s(&input), "-o", s(&out), "--steps", EXACT, "--report", s(&theirs), "--overwrite"], "is not a magpie report");
}

#[test]
fn a_killed_filter_leaves_nothing_finished_and_a_rerun_sweeps_its_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // 50,000 rows (the filter benchmark's corpus), so the run is seconds long.
    let input = dir.path().join("corpus.parquet");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/filter_corpus.py");
    assert!(Command::new(venv_python()).arg(script).args([s(&input), "50000"]).status().unwrap().success());
    // A stale temporary from a run that died (its process id is long gone).
    let stale = dir.path().join(".out.magpie-tmp-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("part-00000.parquet"), b"half").unwrap();
    let steps = r#"[{"step": "exact_dedup"}, {"step": "minhash_dedup"}, {"step": "heuristics"}]"#;
    let mut child = spawn(&["filter", "-i", s(&input), "-o", s(&out), "--steps", steps]);
    // Killed mid-run: the steps' scratch folder is made before the first step and removed once
    // the output is staged, so while it exists nothing is finished.
    let scratch = dir.path().join(format!(".out.filter-scratch.magpie-tmp-{}", child.id()));
    kill_once_exists(&mut child, &scratch, Duration::from_secs(600));
    assert!(!out.exists(), "a killed filter left an output");
    assert!(scratch.is_dir(), "the kill came after the steps");
    assert_eq!(magpie(&["inspect", s(&out)]).status.code(), Some(1), "the next stage refuses what is not there");
    let output = magpie(&["filter", "-i", s(&input), "-o", s(&out), "--steps", steps, "--overwrite"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(magpie(&["inspect", s(&out)]).status.success());
    assert!(temporaries(dir.path()).is_empty(), "{:?}", temporaries(dir.path()));
}

/// Small synth settings: 12 rows in chunks of 3.
fn synth_args(out: &Path) -> Vec<String> {
    ["synth", "--num", "12", "--chunk-rows", "3", "--max-tokens", "24", "--response-max-tokens", "24", "--threads", "2", "-o", s(out)]
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[test]
fn a_killed_synth_is_refused_by_filter_and_accepted_once_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let args = synth_args(&out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = spawn(&args);
    kill_once_exists(&mut child, &out.join("part-00000.parquet"), Duration::from_secs(600));
    assert!(!out.join(".magpie-manifest.json").exists(), "the run finished before the kill");
    let filtered = dir.path().join("filtered");
    let output = magpie(&["filter", "-i", s(&out), "-o", s(&filtered), "--steps", EXACT]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("an unfinished magpie synth output"), "{}", stderr(&output));
    assert!(stderr(&output).contains("rerun the same `magpie synth` command"), "{}", stderr(&output));
    assert!(!filtered.exists());
    // A temporary the killed run may have left mid-chunk, as a real one would be named.
    std::fs::write(out.join(".part-00001.parquet.magpie-tmp-999999999"), b"half").unwrap();
    let output = magpie(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(out.join(".magpie-manifest.json").is_file());
    assert!(temporaries(&out).is_empty(), "{:?}", temporaries(&out));
    let output = magpie(&["filter", "-i", s(&out), "-o", s(&filtered), "--steps", EXACT]);
    assert!(output.status.success(), "{}", stderr(&output));
    // The same command again has nothing to do.
    let output = magpie(&args);
    assert!(String::from_utf8_lossy(&output.stdout).contains("already finished"), "{}", String::from_utf8_lossy(&output.stdout));
}

#[test]
fn training_flags_of_zero_are_usage_errors() {
    let input = fixture("magpie-released.parquet");
    for flag in ["--per-device-train-batch-size", "--max-steps", "--gradient-accumulation-steps"] {
        let output = magpie(&["sft", "--model", "m", "-i", s(&input), "-o", "out", flag, "0"]);
        assert_eq!(output.status.code(), Some(2), "{flag}");
        assert!(stderr(&output).contains("must be at least 1"), "{flag}: {}", stderr(&output));
    }
}

#[test]
fn a_killed_sft_is_refused_downstream_and_resumes_and_dpo_caches_outside_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted(dir.path());
    // SFT data with a null conversation, which is counted, not silently skipped.
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::copy(fixture("magpie-released.parquet"), data.join("sft.parquet")).unwrap();
    let sft = dir.path().join("sft");
    let args = ["sft", "--model", s(&model), "-i", s(&data), "-o", s(&sft), "--max-length", "96", "--per-device-train-batch-size", "1",
        "--max-steps", "3", "--save-steps", "1", "--save-total-limit", "1", "--device", "cpu"];
    let mut child = spawn(&args);
    kill_once_exists(&mut child, &sft.join("checkpoint-1"), Duration::from_secs(600));
    assert!(!sft.join("model").exists() && !sft.join(".magpie-manifest.json").exists(), "the run finished before the kill");
    // The next stage finds no model; a plain rerun is told to --resume; --resume finishes.
    refused(dir.path(), &["dpo", "--model", s(&sft.join("model")), "-i", s(&fixture("ultrafeedback-armorm.parquet")), "-o", s(&dir.path().join("dpo"))], "model directory not found");
    refused(dir.path(), &args, "pass --resume to continue it or --overwrite to start over");
    let output = magpie(&[&args[..], &["--resume"]].concat());
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(sft.join("model/.magpie-manifest.json").is_file() && sft.join(".magpie-manifest.json").is_file());
    assert!(temporaries(&sft).is_empty(), "{:?}", temporaries(&sft));

    // DPO with precomputed reference log-probs: the cache goes to $MAGPIE_CACHE, the data
    // folder is left as it was.
    let pairs = dir.path().join("pairs");
    std::fs::create_dir(&pairs).unwrap();
    std::fs::copy(fixture("ultrafeedback-armorm.parquet"), pairs.join("pairs.parquet")).unwrap();
    let before = snapshot(&pairs);
    let cache = dir.path().join("cache");
    let output = Command::new(env!("CARGO_BIN_EXE_magpie"))
        .args(["dpo", "--model", s(&sft.join("model")), "-i", s(&pairs), "-o", s(&dir.path().join("dpo")), "--max-length", "128",
            "--max-prompt-length", "64", "--per-device-train-batch-size", "2", "--max-steps", "1", "--save-steps", "0",
            "--precompute-ref-log-probs", "--device", "cpu"])
        .env("MAGPIE_CACHE", &cache)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(snapshot(&pairs), before, "the data folder changed");
    assert_eq!(std::fs::read_dir(cache.join("dpo-reference-logps")).unwrap().count(), 1);
}

/// While an sft run goes on, a second one on its folder, `--resume` or `--overwrite`, is refused
/// naming the folder, and the running one's checkpoints stay.
#[test]
fn a_second_training_run_on_a_folder_in_use_is_refused_and_removes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted(dir.path());
    let (sft, data) = (dir.path().join("sft"), fixture("magpie-released.parquet"));
    let args = ["sft", "--model", s(&model), "-i", s(&data), "-o", s(&sft), "--max-length", "96",
        "--per-device-train-batch-size", "1", "--max-steps", "1000", "--save-steps", "1", "--save-total-limit", "1", "--device", "cpu"];
    let mut child = spawn(&args);
    let started = std::time::Instant::now();
    let checkpoints = || std::fs::read_dir(&sft).map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")).count()).unwrap_or(0);
    while checkpoints() == 0 {
        assert!(child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(600), "no checkpoint while the run went on");
        std::thread::sleep(Duration::from_millis(50));
    }
    for extra in ["--resume", "--overwrite"] {
        let output = magpie(&[&args[..], &[extra]].concat());
        assert_eq!(output.status.code(), Some(1), "{extra}: {}", stderr(&output));
        assert!(stderr(&output).contains("another magpie run is writing this folder"), "{extra}: {}", stderr(&output));
    }
    assert!(child.try_wait().unwrap().is_none(), "the first run ended before the second started");
    assert!(checkpoints() > 0 && sft.join(".magpie-run.json").is_file(), "the refused runs removed the running one's files");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn rows_with_null_conversations_are_counted_as_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted(dir.path());
    // The fixture plus one row whose `messages` is null (a copy of row 0 under its own uuid),
    // written with the library.
    let with_null = dir.path().join("with-null.parquet");
    let source = magpie::data::Dataset::open(&[fixture("magpie-released.parquet").display().to_string()]).unwrap();
    let batch = source.batches().next().unwrap().unwrap();
    let null_row = arrow::array::new_null_array(batch.column_by_name("messages").unwrap().data_type(), 1);
    let mut columns = vec![];
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let extra = match field.name().as_str() {
            "messages" => null_row.clone(),
            "uuid" => std::sync::Arc::new(arrow::array::StringArray::from(vec!["row-with-null-messages"])) as arrow::array::ArrayRef, // uuids are unique
            _ => column.slice(0, 1),
        };
        columns.push(arrow::compute::concat(&[column.as_ref(), extra.as_ref()]).unwrap());
    }
    let batch = arrow::array::RecordBatch::try_new(batch.schema(), columns).unwrap();
    magpie::data::write::write_batch(&with_null, &batch, None).unwrap();
    let output = magpie(&["sft", "--model", s(&model), "-i", s(&with_null), "-o", s(&dir.path().join("sft")), "--max-length", "64",
        "--max-steps", "1", "--save-steps", "0", "--device", "cpu"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("1 dropped: null messages"), "{}", stderr(&output));
}

#[test]
fn errors_on_paths_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("out.parquet");
    let output = magpie(&["filter", "-i", s(&fixture("magpie-released.parquet")), "-o", s(&out), "--steps", EXACT]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains(s(&out)), "{}", stderr(&output));
}

#[test]
fn inspect_escapes_control_characters_from_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.parquet");
    let messages = magpie::data::messages::build_messages([Some(&[magpie::data::Message::new("user", "hi\u{1b}[2J\u{7}there")][..])]);
    let batch = arrow::array::RecordBatch::try_from_iter([("messages", messages)]).unwrap();
    magpie::data::write::write_batch(&path, &batch, None).unwrap();
    let output = magpie(&["inspect", s(&path)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'), "{text:?}");
    assert!(text.contains("hi\\u{1b}[2J\\u{7}there"), "{text}");
}

#[test]
fn doctor_reports_each_check_and_fails_without_the_models() {
    let output = magpie(&["doctor"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", stderr(&output));
    for name in ["cpu", "binary", "llama.cpp", "libtorch", "cuda", "model", "encoder", "cache"] {
        assert!(text.lines().any(|l| (l.starts_with('✓') || l.starts_with('✗')) && l.contains(name)), "{name}: {text}");
    }
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_magpie")).arg("doctor").env("MAGPIE_HOME", empty.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("✗ model") && text.contains("fix: scripts/setup.sh"), "{text}");
}
