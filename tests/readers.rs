//! Users open our output folders with pandas, pyarrow, polars, duckdb and Hugging Face datasets,
//! not with magpie. The real binary makes a synth, a filter and a DPO-pairs output from the
//! committed fixture, and scripts/check_readers.py opens each folder in every library as the docs
//! say, checking the rows and columns against the part files. The test-only Python packages are
//! in scripts/test-requirements.txt (`scripts/setup.sh --test`).

use std::path::Path;
use std::process::Command;

mod common;
use common::{fixture, magpie, s, stderr, venv_python};


#[test]
fn synth_filter_and_pair_outputs_open_in_pandas_pyarrow_polars_duckdb_and_datasets() {
    let dir = tempfile::tempdir().unwrap();
    // Synth: the released fixture's 5 conversations answered anew by the embedded SmolLM2, with
    // two sampled responses each, in parts of 3 rows (a run claim and a manifest beside them).
    let synth = dir.path().join("synth");
    let output = magpie(&["synth", "--input", s(&fixture("magpie-released.parquet")), "--responses", "2", "--max-tokens", "16",
        "--response-max-tokens", "16", "--chunk-rows", "3", "--threads", "2", "-o", s(&synth)]);
    assert!(output.status.success(), "{}", stderr(&output));

    // Filter: dedup and heuristic tags, no model.
    let filtered = dir.path().join("filtered");
    let steps = r#"[{"step": "exact_dedup"}, {"step": "heuristics"}]"#;
    let output = magpie(&["filter", "-i", s(&synth), "-o", s(&filtered), "--steps", steps]);
    assert!(output.status.success(), "{}", stderr(&output));

    // DPO pairs, as the demo's filter makes them: the demo judge scores the sampled responses into
    // prompt/chosen/rejected, and a train/test `split` (what `magpie dpo` reads).
    let judge = dir.path().join("judge-rm");
    let output = magpie(&["convert", "--judge-reward-head", "-o", s(&judge)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let pairs = dir.path().join("pairs");
    let steps = serde_json::json!([
        {"step": "reward_scores", "reward_model": judge, "max_length": 256},
        {"step": "select", "test_ratio": 0.2},
    ])
    .to_string();
    let output = magpie(&["filter", "-i", s(&synth), "-o", s(&pairs), "--steps", &steps]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("pairs.report.json")).unwrap()).unwrap();
    assert!(report["steps"][0]["pairs"].as_u64() > Some(0), "no pairs: {report}");

    // A temporary a killed run leaves mid-part, as a real one is named, is skipped by every reader.
    std::fs::write(synth.join(".part-00002.parquet.magpie-tmp-999999999"), b"half a part").unwrap();

    let output = Command::new(venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_readers.py"))
        .args([&synth, &filtered, &pairs])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh --test)", venv_python().display()));
    assert!(output.status.success(), "{}{}", String::from_utf8_lossy(&output.stdout), stderr(&output));
}
