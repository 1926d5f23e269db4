//! LoRA through the binary on the converted SmolLM2: `sft --use-peft`, `dpo --adapter` on the SFT
//! adapter, `merge`, and synth on the merged model and on the adapter folder itself; the usage
//! errors. (Parity with PEFT and TRL is `tests/parity.rs`; the two-rank run `tests/distributed.rs`.)

use std::path::Path;

mod common;
use common::{converted_smollm2, fixture, magpie, rows, s, stderr};

#[test]
fn lora_sft_then_dpo_on_its_adapter_then_merge_make_a_model_synth_loads() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let (sft, dpo, merged) = (dir.path().join("sft"), dir.path().join("dpo"), dir.path().join("merged"));
    let released = fixture("magpie-released.parquet");
    let common = ["--per-device-train-batch-size", "2", "--save-steps", "1", "--device", "cpu", "--learning-rate", "1e-3"];
    let mut args = vec!["sft", "--model", s(&model), "-i", s(&released), "-o", s(&sft), "--max-length", "96", "--max-steps", "2",
                        "--use-peft", "--lora-r", "4", "--lora-target-modules", "all-linear", "--gradient-checkpointing"];
    args.extend(common);
    let output = magpie(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    for file in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json"] {
        assert!(sft.join("model").join(file).is_file(), "{file}");
    }
    assert!(!sft.join("model/model.safetensors").exists(), "an adapter folder");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(sft.join("model/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_i64(), config["target_modules"].as_array().map(|t| t.len())), (Some("LORA"), Some(4), Some(7)));

    // DPO further trains the SFT adapter; its reference is the adapter it starts from.
    let (pairs, sft_adapter) = (fixture("ultrafeedback-armorm.parquet"), sft.join("model"));
    let mut args = vec!["dpo", "--model", s(&model), "--adapter", s(&sft_adapter), "-i", s(&pairs), "-o", s(&dpo),
                        "--max-length", "160", "--max-prompt-length", "64", "--max-steps", "1"];
    args.extend(common);
    let output = magpie(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(dpo.join("metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["rewards/margins"].as_f64(), Some(0.0), "policy = reference at the first step: {first}");

    let output = magpie(&["merge", "--base", s(&model), "--adapter", s(&dpo.join("model")), "-o", s(&merged)]);
    assert!(output.status.success(), "{}", stderr(&output));
    // synth on the merged model, and on the adapter folder itself (merged once into the cache):
    // the same weights, so the same rows.
    let synth = |model: &Path, out: &str| {
        let out = dir.path().join(out);
        let output = magpie(&["synth", "--model", s(model), "--num", "2", "--max-tokens", "16", "--response-max-tokens", "16", "-o", s(&out)]);
        assert!(output.status.success(), "{}", stderr(&output));
        let mut conversations: Vec<String> = rows(&out).into_iter().map(|(_, messages)| format!("{messages:?}")).collect();
        conversations.sort();
        conversations
    };
    let from_merged = synth(&merged, "synth-merged");
    assert_eq!(from_merged.len(), 2);
    assert_eq!(synth(&dpo.join("model"), "synth-adapter"), from_merged);

    // Usage errors name the flag; a folder without an adapter names the file; nothing is written.
    let out = dir.path().join("never");
    let output = magpie(&["sft", "--model", s(&model), "-i", s(&released), "-o", s(&out), "--lora-r", "8"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--use-peft"), "{}", stderr(&output));
    let output = magpie(&["sft", "--model", s(&model), "-i", s(&released), "-o", s(&out), "--adapter", s(&sft_adapter), "--lora-r", "8"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("--lora-r"), "{}", stderr(&output));
    let output = magpie(&["merge", "--base", s(&model), "--adapter", s(&model), "-o", s(&out)]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("adapter_config.json"), "{}", stderr(&output));
    assert!(!out.exists(), "no partial output");
}
