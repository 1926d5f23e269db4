//! Live parity with TRL: scripts/parity/trl_parity.py trains a tiny random Llama (SmolLM2's
//! tokenizer and chat template) for two steps with TRL 1.16's DPOTrainer and SFTTrainer and with
//! this binary, and compares every metric both log at every step to a relative 1e-5; then the same
//! with a PEFT LoRA adapter (`--adapter`), magpie's saved adapters loaded back in PEFT and
//! `magpie merge`'s model in transformers against the unmerged adapter. Needs the venv's test
//! packages (scripts/test-requirements.txt; scripts/test.sh installs them).

use std::path::Path;
use std::process::Command;

mod common;
use common::{converted_smollm2, venv_python};


#[test]
fn dpo_and_sft_full_and_lora_match_trl_1_16_and_peft_for_two_steps() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = converted_smollm2(dir.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/parity/trl_parity.py");
    let output = Command::new(venv_python())
        .arg(&script)
        .args(["--magpie", env!("CARGO_BIN_EXE_magpie"), "--tokenizer-dir", tokenizer.to_str().unwrap()])
        .args(["--work", dir.path().join("work").to_str().unwrap()])
        .output()
        .expect("run scripts/parity/trl_parity.py");
    let text = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "magpie differs from TRL ({}):\n{text}", output.status);
}
