//! Eval prompts and answers. A prompt set is any dataset in our format (`messages` or
//! `instruction`), or MT-Bench's question files (`turns`, a list of user turns); the category
//! comes from `task_category` or `category`. The default set, `data/eval/magpie-eval-80.parquet`
//! (80 prompts in Magpie's 12 categories, written for this project), is embedded in the binary.
//!
//! Answers are generated turn by turn with a chat model, greedy, or read from a file of earlier
//! answers (`answers.parquet` of an earlier `magpie eval`, or any dataset whose `messages` hold
//! the assistant turns), matched by uuid.

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::data::messages::{as_utf8, build_messages, read_turns};
use crate::data::{Dataset, Message};
use crate::engine::chat::ChatModel;

static DEFAULT_SET: &[u8] = include_bytes!("../../data/eval/magpie-eval-80.parquet");
const DEFAULT_SET_NAME: &str = "magpie-eval-80.parquet";

/// One eval prompt: an optional system message, one or more user turns, and reference answers
/// to them when the set has them (MT-Bench's `reference`).
#[derive(Clone, Debug, PartialEq)]
pub struct EvalPrompt {
    pub uuid: String,
    pub category: String,
    pub system: Option<String>,
    pub questions: Vec<String>,
    pub reference: Vec<String>,
}

/// The embedded default set, written once into the cache (the reader takes files).
pub fn default_set() -> Result<PathBuf> {
    let path = crate::home::cache_dir().join("eval").join(DEFAULT_SET_NAME);
    if std::fs::read(&path).ok().as_deref() != Some(DEFAULT_SET) {
        std::fs::create_dir_all(path.parent().expect("has a parent")).with_context(|| format!("{}: cannot create", path.display()))?;
        crate::run::write_atomically(&path, DEFAULT_SET)?;
    }
    Ok(path)
}

/// Reads the prompts of `inputs`, the first `limit` when given.
pub fn read(inputs: &[String], limit: Option<usize>) -> Result<(Vec<EvalPrompt>, Vec<PathBuf>)> {
    let dataset = Dataset::open(inputs)?;
    let has = |name: &str| dataset.schema.column_with_name(name).is_some();
    if !has("messages") && !has("turns") {
        bail!("{}: an eval set needs a `messages`, `instruction` or `turns` column", dataset.files[0].display());
    }
    let mut prompts = vec![];
    for batch in dataset.batches() {
        let batch = batch?;
        let uuids = as_utf8(batch.column_by_name("uuid").expect("every read batch has a uuid")).context("uuid")?;
        let categories = ["task_category", "category"].iter().find_map(|c| batch.column_by_name(c).and_then(as_utf8));
        let conversations = match batch.column_by_name("messages") {
            Some(messages) => read_turns(messages.as_ref(), "role", "content"),
            None => texts(&batch, "turns")?.into_iter().map(|row| row.map(|t| t.into_iter().map(|q| Message::new("user", q)).collect())).collect(),
        };
        let references = match batch.column_by_name("reference") {
            Some(_) => texts(&batch, "reference")?,
            None => vec![None; batch.num_rows()],
        };
        for (row, conversation) in conversations.into_iter().enumerate() {
            let conversation = conversation.unwrap_or_default();
            let questions: Vec<String> = conversation.iter().filter(|m| m.role == "user").map(|m| m.content.clone()).collect();
            if questions.is_empty() {
                continue;
            }
            let category = categories.as_ref().filter(|c| c.is_valid(row)).map_or("all".to_string(), |c| c.value(row).to_string());
            let system = conversation.iter().find(|m| m.role == "system").map(|m| m.content.clone());
            let reference = references[row].clone().unwrap_or_default();
            prompts.push(EvalPrompt { uuid: uuids.value(row).to_string(), category, system, questions, reference });
        }
    }
    if let Some(limit) = limit {
        prompts.truncate(limit);
    }
    if prompts.is_empty() {
        bail!("{}: no prompt with a user turn", dataset.name);
    }
    Ok((prompts, dataset.files))
}

/// A list-of-strings column per row (MT-Bench's `turns`, the user turns, and `reference`, the
/// reference answers to them).
fn texts(batch: &RecordBatch, name: &str) -> Result<Vec<Option<Vec<String>>>> {
    let column = batch.column_by_name(name).expect("checked");
    let (DataType::List(_) | DataType::LargeList(_)) = column.data_type() else { bail!("column `{name}`: found {}, expected list<string>", column.data_type()) };
    let list = arrow::compute::cast(column, &DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))))
        .with_context(|| format!("column `{name}`: expected list<string>"))?;
    let list = list.as_list::<i32>();
    Ok((0..list.len())
        .map(|i| list.is_valid(i).then(|| list.value(i).as_string::<i32>().iter().flatten().map(str::to_string).collect()))
        .collect())
}

/// Each prompt answered by `model`, turn by turn (every prompt's turn k in one batch).
pub fn generate(model: &mut ChatModel, prompts: &[EvalPrompt]) -> Result<Vec<Vec<String>>> {
    let mut answers: Vec<Vec<String>> = vec![vec![]; prompts.len()];
    let turns = prompts.iter().map(|p| p.questions.len()).max().unwrap_or(0);
    for turn in 0..turns {
        let open: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].questions.len() > turn).collect();
        let conversations: Vec<Vec<Message>> = open.iter().map(|&i| conversation(&prompts[i], &answers[i], turn)).collect();
        for (i, answer) in open.into_iter().zip(model.answer(&conversations, "")?) {
            answers[i].push(answer.trim().to_string());
        }
    }
    Ok(answers)
}

/// The prompt's conversation up to its user turn `turn`, with `answers` to the earlier ones.
fn conversation(prompt: &EvalPrompt, answers: &[String], turn: usize) -> Vec<Message> {
    let mut messages: Vec<Message> = prompt.system.iter().map(|s| Message::new("system", s.as_str())).collect();
    for (k, question) in prompt.questions.iter().enumerate().take(turn + 1) {
        messages.push(Message::new("user", question.as_str()));
        if k < turn {
            messages.push(Message::new("assistant", answers[k].as_str()));
        }
    }
    messages
}

/// Answers from a file, by uuid: the assistant turns of each row's `messages`.
pub fn read_answers(inputs: &[String], prompts: &[EvalPrompt]) -> Result<Vec<Vec<String>>> {
    let dataset = Dataset::open(inputs)?;
    dataset.require(&["messages"])?;
    let mut by_uuid: HashMap<String, Vec<String>> = HashMap::new();
    for batch in dataset.batches() {
        let batch = batch?;
        let uuids = as_utf8(batch.column_by_name("uuid").expect("every read batch has a uuid")).context("uuid")?;
        for (row, messages) in read_turns(batch.column_by_name("messages").expect("required").as_ref(), "role", "content").into_iter().enumerate() {
            let answers = messages.unwrap_or_default().into_iter().filter(|m| m.role == "assistant").map(|m| m.content).collect();
            by_uuid.insert(uuids.value(row).to_string(), answers);
        }
    }
    prompts
        .iter()
        .map(|p| match by_uuid.remove(&p.uuid) {
            Some(answers) if answers.len() >= p.questions.len() => Ok(answers),
            Some(answers) => bail!("{}: row `{}` has {} assistant turns, the prompt has {} user turns", dataset.name, p.uuid, answers.len(), p.questions.len()),
            None => bail!("{}: no answer for prompt `{}` (answers are matched by uuid)", dataset.name, p.uuid),
        })
        .collect()
}

/// `answers.parquet`: the prompts' conversations with `model`'s answers, in our format.
pub fn answers_batch(prompts: &[EvalPrompt], answers: &[Vec<String>], model: &str) -> Result<RecordBatch> {
    let conversations: Vec<Vec<Message>> = prompts.iter().zip(answers).map(|(p, a)| {
        let mut messages = conversation(p, a, p.questions.len() - 1);
        messages.push(Message::new("assistant", a[p.questions.len() - 1].as_str()));
        messages
    }).collect();
    let text = |values: Vec<&str>| Arc::new(StringArray::from(values)) as Arc<dyn Array>;
    batch(vec![
        ("uuid", text(prompts.iter().map(|p| p.uuid.as_str()).collect())),
        ("messages", build_messages(conversations.iter().map(|c| Some(c.as_slice())))),
        ("task_category", text(prompts.iter().map(|p| p.category.as_str()).collect())),
        ("model", text(vec![model; prompts.len()])),
    ])
}

/// A batch of named columns, every one nullable but `uuid`.
pub fn batch(columns: Vec<(&str, ArrayRef)>) -> Result<RecordBatch> {
    let schema = Schema::new(columns.iter().map(|(name, a)| Field::new(*name, a.data_type().clone(), *name != "uuid")).collect::<Vec<_>>());
    Ok(RecordBatch::try_new(Arc::new(schema), columns.into_iter().map(|(_, a)| a).collect())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{batch, text, write};

    fn path(p: PathBuf) -> String {
        p.display().to_string()
    }

    /// Two prompts, `a` and `b`, in Magpie's flat shape.
    fn two_prompts(dir: &std::path::Path) -> Vec<EvalPrompt> {
        let set = write(dir, "set.parquet", &batch(vec![("uuid", text(&["a", "b"])), ("instruction", text(&["Name a prime.", "Say hi."]))]));
        read(&[path(set)], None).unwrap().0
    }

    /// An answers file: for each (uuid, answer), the conversation user → assistant.
    fn answers_file(dir: &std::path::Path, rows: &[(&str, &str)]) -> String {
        let conversations: Vec<Vec<Message>> = rows.iter().map(|&(_, a)| vec![Message::new("user", "q"), Message::new("assistant", a)]).collect();
        let uuids: Vec<&str> = rows.iter().map(|(u, _)| *u).collect();
        let messages = build_messages(conversations.iter().map(|c| Some(c.as_slice())));
        path(write(dir, "answers.parquet", &batch(vec![("uuid", text(&uuids)), ("messages", messages)])))
    }

    #[test]
    fn an_eval_set_without_messages_instruction_or_turns_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let notes = write(dir.path(), "notes.parquet", &batch(vec![("uuid", text(&["a"])), ("text", text(&["Name a prime."]))]));
        let error = read(&[path(notes)], None).unwrap_err().to_string();
        assert!(error.contains("notes.parquet") && error.contains("needs a `messages`, `instruction` or `turns` column"), "{error}");
    }

    #[test]
    fn answers_are_matched_by_uuid_and_a_prompt_without_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let prompts = two_prompts(dir.path());
        // Another order than the prompts', and a row no prompt has.
        let answers = read_answers(&[answers_file(dir.path(), &[("z", "?"), ("b", "Hi."), ("a", "7")])], &prompts).unwrap();
        assert_eq!(answers, vec![vec!["7".to_string()], vec!["Hi.".to_string()]]);

        let error = read_answers(&[answers_file(dir.path(), &[("a", "7")])], &prompts).unwrap_err().to_string();
        assert!(error.contains("answers.parquet") && error.contains("no answer for prompt `b`"), "{error}");
    }
}
