//! The synthesis stages for one chunk of rows, in order: instructions from the pre-query
//! template; responses through the chat template; more turns (docs/upstream.md §1, multi-turn); sampled
//! preference responses. Every stage sends all of the chunk's prompts to the engine at once, so
//! the engine can batch them.

use crate::engine::{Completion, Engine, FinishReason, Request, Sampling};
use crate::engine::lookup::ModelInfo;
use super::rows::{Row, RunInfo};
use super::sanitize::sanitize;
use crate::model::pre_query::{self as template, PreQuery};
use super::SynthArgs;
use crate::model::chat_template::ChatTemplate;
use crate::data::Message;
use crate::seed::{mix, unit};
use anyhow::{bail, Result};

/// Magpie's system prompt for asking follow-up questions (turn 2 and later).
pub const MULTI_TURN_SYSTEM_PROMPT: &str = "You are a helpful AI assistant. The user will engage in a multi-round conversation with you, asking initial questions and following up with additional related questions. Your goal is to provide thorough, relevant and insightful responses to help the user with their queries.";

/// The seed of global row `row` under base seed `seed`.
pub fn row_seed(seed: u64, row: u64) -> u64 {
    mix(seed ^ mix(row))
}

/// One way of prompting for instructions: an optional task system prompt and its pre-query.
struct Task {
    key: Option<String>,
    system: Option<String>,
    weight: f64,
    pre_query: PreQuery,
    pre_query_tokens: Vec<u32>,
    stop_strings: Vec<String>,
    stop_token_ids: Vec<u32>,
    /// Token ids an instruction may not start with (`--ban-first-tokens`).
    banned_first: Vec<u32>,
}

/// How often an instruction that starts with a banned token is drawn again.
pub const BAN_REDRAWS: u64 = 16;

/// `--ban-first-tokens` as token ids, for a template resolved from `source`: `auto` (the
/// template's default), `none`, or token texts, each one token of the model's vocabulary.
fn banned_first_tokens(engine: &dyn Engine, spec: &str, source: &str) -> Result<Vec<u32>> {
    let texts: Vec<String> = match spec {
        "auto" => template::default_banned_first_tokens(source).iter().map(|s| s.to_string()).collect(),
        "none" | "" => vec![],
        list => list.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect(),
    };
    texts
        .iter()
        .map(|text| match engine.tokenize(text)?[..] {
            [id] => Ok(id),
            ref ids => bail!("--ban-first-tokens: `{text}` is {} tokens of this model ({ids:?}), not one", ids.len()),
        })
        .collect()
}

/// Counts for the final summary.
#[derive(Default, Debug)]
pub struct Stats {
    pub attempted: u64,
    pub rows_written: u64,
    pub dropped_empty: u64,
    pub truncated_instructions: u64,
    /// Instructions drawn again because they started with a banned token (`--ban-first-tokens`),
    /// and those still starting with one after the last draw.
    pub redrawn_banned_starts: u64,
    pub kept_banned_starts: u64,
    pub truncated_responses: u64,
    pub empty_responses: u64,
    pub short_conversations: u64,
    /// `--input` rows with no user turn to answer.
    pub no_user_turn: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
}

impl Stats {
    fn count(&mut self, completions: &[Completion]) {
        for c in completions {
            self.prompt_tokens += c.prompt_tokens as u64;
            self.generated_tokens += c.completion_tokens as u64;
        }
    }
}

/// An existing conversation to answer (`synth --input`): its messages end with a user turn.
pub struct Prompt {
    /// The row's index in the input, which seeds its sampling.
    pub row: u64,
    pub uuid: String,
    pub messages: Vec<Message>,
}

/// A conversation being built.
struct Draft {
    row: u64,
    seed: u64,
    task: usize,
    messages: Vec<Message>,
    finish_reasons: Vec<FinishReason>,
    raw_instruction: Option<String>,
    responses: Option<Vec<String>>,
    /// No further turns (the follow-up question came back empty).
    closed: bool,
}

pub struct Synthesizer<'a> {
    args: &'a SynthArgs,
    pub engine: Box<dyn Engine>,
    /// The chat template; `None` only for `--instructions-only` runs of one turn, which need none.
    chat: Option<&'a ChatTemplate>,
    model_name: String,
    tasks: Vec<Task>,
    response_stops: (Vec<String>, Vec<u32>),
    user_append: String,
    pub stats: Stats,
}

impl<'a> Synthesizer<'a> {
    pub fn new(args: &'a SynthArgs, info: &'a ModelInfo, engine: Box<dyn Engine>) -> Result<Self> {
        let chat = info.chat_template.as_ref();
        let needs_chat = !args.instructions_only || args.turns > 1 || !args.input.is_empty();
        if chat.is_none() && needs_chat {
            bail!("{}: the model ships no chat template, which responses and later turns need: name its family with --template, or pass --instructions-only", info.path.display());
        }
        let choices: Vec<(Option<String>, Option<String>, f64)> = match (&args.system_prompt, &args.system_prompts) {
            (Some(text), _) => vec![(None, Some(text.clone()), 1.0)],
            (None, Some(list)) => list.iter().map(|p| (Some(p.key.clone()), Some(p.prompt.clone()), p.weight)).collect(),
            (None, None) => vec![(None, None, 1.0)],
        };
        let derived = chat.map(|c| template::derive(c, None)).transpose()?;
        let mut tasks = vec![];
        for (key, system, weight) in choices {
            let pre_query = template::resolve(&args.template, chat, system.as_deref())?;
            let mut stops = pre_query.stops.clone();
            stops.push("assistant".into());
            if args.early_stop_newline {
                stops.push("\n".into());
            }
            let stop_token_ids = single_token_ids(engine.as_ref(), &pre_query.stops)?;
            let pre_query_tokens = engine.tokenize(&pre_query.pre_query)?;
            let banned_first = banned_first_tokens(engine.as_ref(), &args.ban_first_tokens, &pre_query.source)?;
            if !banned_first.is_empty() && args.temperature == 0.0 {
                bail!("--ban-first-tokens needs --temperature above 0: a greedy instruction is drawn the same every time (pass --ban-first-tokens none)");
            }
            tasks.push(Task { key, system, weight, pre_query, pre_query_tokens, stop_strings: stops, stop_token_ids, banned_first });
        }
        let response_stops = derived.as_ref().map(|d| d.stops.clone()).unwrap_or_default();
        let response_stop_ids = single_token_ids(engine.as_ref(), &response_stops)?;
        let user_append = match (&tasks[0].pre_query.user_append, &derived) {
            (own, Some(d)) if own.is_empty() => d.user_append.clone(),
            (own, _) => own.clone(),
        };
        Ok(Synthesizer {
            args,
            engine,
            chat,
            model_name: info.name.clone(),
            tasks,
            response_stops: (response_stops, response_stop_ids),
            user_append,
            stats: Stats::default(),
        })
    }

    fn chat(&self) -> &'a ChatTemplate {
        self.chat.expect("Synthesizer::new refuses a run that needs a chat template without one")
    }

    pub fn run_info(&self) -> RunInfo {
        let a = self.args;
        RunInfo {
            model: self.model_name.clone(),
            engine: self.engine.name().to_string(),
            temperature: a.temperature,
            top_p: a.top_p,
            max_tokens: a.max_tokens,
            early_stop_newline: a.early_stop_newline,
            sanitize: a.sanitize,
            response_temperature: a.response_temperature,
            response_top_p: a.response_top_p,
            response_max_tokens: a.response_max_tokens,
            with_raw_instruction: a.sanitize,
            with_system_prompt_key: a.system_prompts.is_some(),
            with_responses: a.responses > 0,
        }
    }

    /// Picks a task for a row by its weights, from the row's own seed.
    fn pick_task(&self, seed: u64) -> usize {
        let total: f64 = self.tasks.iter().map(|t| t.weight).sum();
        let mut point = unit(mix(seed ^ 0x7461_736b)) * total;
        for (i, task) in self.tasks.iter().enumerate() {
            if point < task.weight {
                return i;
            }
            point -= task.weight;
        }
        self.tasks.len() - 1
    }

    fn uuid(&self, row: u64) -> String {
        let key = format!("magpie-synth:{}:{}:{}:{row}", self.model_name, self.tasks[0].pre_query.pre_query, self.args.seed);
        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, key.as_bytes()).to_string()
    }

    fn instruction_sampling(&self, task: &Task, seed: u64) -> Sampling {
        Sampling {
            temperature: self.args.temperature,
            top_p: self.args.top_p,
            max_tokens: self.args.max_tokens,
            seed,
            stop_strings: task.stop_strings.clone(),
            stop_token_ids: task.stop_token_ids.clone(),
            json: None,
        }
    }

    fn response_sampling(&self, temperature: f32, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_p: self.args.response_top_p,
            max_tokens: self.args.response_max_tokens,
            seed,
            stop_strings: self.response_stops.0.clone(),
            stop_token_ids: self.response_stops.1.clone(),
            json: None,
        }
    }

    fn generate(&mut self, requests: &[Request], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>> {
        let completions = self.engine.generate(requests, on_tokens)?;
        self.stats.count(&completions);
        Ok(completions)
    }

    /// Draws again, from a new seed each time, every instruction whose first token is one of its
    /// request's `banned` ones, up to [`BAN_REDRAWS`] times. Drawing until the first token is
    /// allowed samples what masking those tokens at the first step (Magpie's logits processor)
    /// samples at top-p 1, and it works alike on every engine and server, since it needs only
    /// the completion's text (tokenised again: its first token).
    fn redraw_banned_starts(&mut self, requests: &[Request], mut completions: Vec<Completion>, banned: &[Vec<u32>], on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Completion>> {
        let starts_banned = |engine: &dyn Engine, i: usize, c: &Completion| -> Result<bool> {
            Ok(!banned[i].is_empty() && engine.tokenize(&c.text)?.first().is_some_and(|t| banned[i].contains(t)))
        };
        let mut pending = vec![];
        for (i, c) in completions.iter().enumerate() {
            if starts_banned(self.engine.as_ref(), i, c)? {
                pending.push(i);
            }
        }
        for attempt in 1..=BAN_REDRAWS {
            if pending.is_empty() {
                break;
            }
            self.stats.redrawn_banned_starts += pending.len() as u64;
            let redraws: Vec<Request> = pending.iter().map(|&i| {
                let mut request = requests[i].clone();
                request.sampling.seed = mix(request.sampling.seed ^ mix(attempt));
                request
            }).collect();
            let mut still = vec![];
            for (i, completion) in pending.into_iter().zip(self.generate(&redraws, on_tokens)?) {
                if starts_banned(self.engine.as_ref(), i, &completion)? {
                    still.push(i);
                }
                completions[i] = completion;
            }
            pending = still;
        }
        self.stats.kept_banned_starts += pending.len() as u64;
        Ok(completions)
    }

    /// Generates the rows `rows` (global row indices). Rows whose first instruction is empty are
    /// dropped and counted.
    pub fn chunk(&mut self, rows: std::ops::Range<u64>, on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Row>> {
        let mut drafts: Vec<Draft> = rows
            .map(|row| {
                let seed = row_seed(self.args.seed, row);
                let task = self.pick_task(seed);
                let messages = self.tasks[task].system.iter().map(|s| Message::new("system", s.as_str())).collect();
                Draft { row, seed, task, messages, finish_reasons: vec![], raw_instruction: None, responses: None, closed: false }
            })
            .collect();
        self.stats.attempted += drafts.len() as u64;

        let requests: Vec<Request> = drafts
            .iter()
            .map(|d| {
                let task = &self.tasks[d.task];
                Request { prompt: task.pre_query_tokens.clone(), sampling: self.instruction_sampling(task, mix(d.seed ^ 1)) }
            })
            .collect();
        let completions = self.generate(&requests, on_tokens)?;
        let banned: Vec<Vec<u32>> = drafts.iter().map(|d| self.tasks[d.task].banned_first.clone()).collect();
        let completions = self.redraw_banned_starts(&requests, completions, &banned, on_tokens)?;
        let mut kept = Vec::with_capacity(drafts.len());
        for (mut draft, completion) in drafts.drain(..).zip(completions) {
            let instruction = if self.args.sanitize { sanitize(&completion.text) } else { completion.text.trim().to_string() };
            if instruction.is_empty() {
                self.stats.dropped_empty += 1;
                continue;
            }
            if completion.finish_reason == FinishReason::Length {
                self.stats.truncated_instructions += 1;
            }
            draft.raw_instruction = Some(completion.text);
            draft.messages.push(Message::new("user", instruction));
            draft.finish_reasons.push(completion.finish_reason);
            kept.push(draft);
        }
        let mut drafts = kept;
        if !self.args.instructions_only {
            self.complete(&mut drafts, 1, on_tokens)?;
        }
        Ok(drafts
            .into_iter()
            .map(|d| {
                let task = &self.tasks[d.task];
                Row {
                    uuid: self.uuid(d.row),
                    messages: d.messages,
                    finish_reasons: d.finish_reasons,
                    pre_query_template: task.pre_query.pre_query.clone(),
                    seed: d.seed,
                    raw_instruction: self.args.sanitize.then_some(d.raw_instruction).flatten(),
                    system_prompt_key: task.key.clone(),
                    responses: d.responses,
                }
            })
            .collect())
    }

    /// Answers existing conversations (`synth --input`): each prompt's messages end with the
    /// user turn to answer. Returns one row per prompt, under its own uuid; `finish_reasons` and
    /// `responses` cover only what was generated here.
    pub fn answer(&mut self, prompts: Vec<Prompt>, on_tokens: &mut dyn FnMut(usize)) -> Result<Vec<Row>> {
        self.stats.attempted += prompts.len() as u64;
        let mut drafts: Vec<Draft> = prompts
            .iter()
            .map(|p| Draft { row: p.row, seed: row_seed(self.args.seed, p.row), task: 0, messages: p.messages.clone(), finish_reasons: vec![],
                             raw_instruction: None, responses: None, closed: false })
            .collect();
        // Each conversation is answered at its own turn number (which seeds its sampling).
        drafts.sort_by_key(|d| (user_turns(&d.messages), d.row));
        for group in drafts.chunk_by_mut(|a, b| user_turns(&a.messages) == user_turns(&b.messages)) {
            let turn = user_turns(&group[0].messages);
            self.respond(group, turn, on_tokens)?;
        }
        drafts.sort_by_key(|d| d.row);
        self.more_turns_and_preferences(&mut drafts, 1, on_tokens)?;
        Ok(drafts
            .into_iter()
            .zip(prompts)
            .map(|(d, p)| Row { uuid: p.uuid, messages: d.messages, finish_reasons: d.finish_reasons, pre_query_template: String::new(), seed: d.seed,
                                raw_instruction: None, system_prompt_key: None, responses: d.responses })
            .collect())
    }

    /// Answers turn `turn` of the drafts, then asks and answers more turns up to `--turns`, then
    /// samples the `--responses` preference answers.
    fn complete(&mut self, drafts: &mut [Draft], turn: usize, on_tokens: &mut dyn FnMut(usize)) -> Result<()> {
        self.respond(drafts, turn, on_tokens)?;
        self.more_turns_and_preferences(drafts, turn, on_tokens)
    }

    /// Turns after `answered` up to `--turns`, each for the conversations that have fewer.
    fn more_turns_and_preferences(&mut self, drafts: &mut [Draft], answered: usize, on_tokens: &mut dyn FnMut(usize)) -> Result<()> {
        for turn in answered + 1..=self.args.turns {
            self.follow_up(drafts, turn, on_tokens)?;
            self.respond(drafts, turn, on_tokens)?;
        }
        if self.args.responses > 0 {
            self.preference_responses(drafts, on_tokens)?;
        }
        Ok(())
    }

    /// Answers the last user turn of every open draft that has one unanswered (turn `turn`).
    fn respond(&mut self, drafts: &mut [Draft], turn: usize, on_tokens: &mut dyn FnMut(usize)) -> Result<()> {
        let open: Vec<usize> = (0..drafts.len())
            .filter(|&i| !drafts[i].closed && drafts[i].messages.last().is_some_and(|m| m.role == "user"))
            .collect();
        let mut requests = vec![];
        for &i in &open {
            let prompt = self.chat().render(&drafts[i].messages, true)?;
            let seed = mix(drafts[i].seed ^ (turn as u64) << 8 ^ 2);
            requests.push(Request { prompt: self.engine.tokenize(&prompt)?, sampling: self.response_sampling(self.args.response_temperature, seed) });
        }
        let completions = self.generate(&requests, on_tokens)?;
        for (i, completion) in open.into_iter().zip(completions) {
            if completion.finish_reason == FinishReason::Length {
                self.stats.truncated_responses += 1;
            }
            let text = completion.text.trim().to_string();
            if text.is_empty() {
                self.stats.empty_responses += 1;
            }
            drafts[i].messages.push(Message::new("assistant", text));
            drafts[i].finish_reasons.push(completion.finish_reason);
        }
        Ok(())
    }

    /// Asks each open draft for its next user turn: the multi-turn system prompt and the history
    /// through the chat template, then the user-append template.
    fn follow_up(&mut self, drafts: &mut [Draft], turn: usize, on_tokens: &mut dyn FnMut(usize)) -> Result<()> {
        let open: Vec<usize> = (0..drafts.len()).filter(|&i| !drafts[i].closed && user_turns(&drafts[i].messages) < turn).collect();
        let mut requests = vec![];
        for &i in &open {
            let mut history = vec![Message::new("system", MULTI_TURN_SYSTEM_PROMPT)];
            history.extend(drafts[i].messages.iter().filter(|m| m.role != "system").cloned());
            let prompt = self.chat().render(&history, false)? + &self.user_append;
            let task = &self.tasks[drafts[i].task];
            let seed = mix(drafts[i].seed ^ (turn as u64) << 8 ^ 1);
            requests.push(Request { prompt: self.engine.tokenize(&prompt)?, sampling: self.instruction_sampling(task, seed) });
        }
        let completions = self.generate(&requests, on_tokens)?;
        for (i, completion) in open.into_iter().zip(completions) {
            let question = if self.args.sanitize { sanitize(&completion.text) } else { completion.text.trim().to_string() };
            if question.is_empty() {
                drafts[i].closed = true;
                self.stats.short_conversations += 1;
                continue;
            }
            if completion.finish_reason == FinishReason::Length {
                self.stats.truncated_instructions += 1;
            }
            drafts[i].messages.push(Message::new("user", question));
            drafts[i].finish_reasons.push(completion.finish_reason);
        }
        Ok(())
    }

    /// `--responses N` sampled answers to each first instruction, for preference data.
    fn preference_responses(&mut self, drafts: &mut [Draft], on_tokens: &mut dyn FnMut(usize)) -> Result<()> {
        let n = self.args.responses;
        let mut requests = vec![];
        for draft in drafts.iter() {
            let first_user = draft.messages.iter().position(|m| m.role == "user").expect("every draft has an instruction");
            let prompt = self.engine.tokenize(&self.chat().render(&draft.messages[..=first_user], true)?)?;
            for k in 0..n {
                let seed = mix(draft.seed ^ ((k as u64 + 1) << 32) ^ 3);
                requests.push(Request { prompt: prompt.clone(), sampling: self.response_sampling(self.args.preference_temperature, seed) });
            }
        }
        let completions = self.generate(&requests, on_tokens)?;
        for (draft, samples) in drafts.iter_mut().zip(completions.chunks(n)) {
            draft.responses = Some(samples.iter().map(|c| c.text.trim().to_string()).collect());
        }
        Ok(())
    }
}

fn user_turns(messages: &[Message]) -> usize {
    messages.iter().filter(|m| m.role == "user").count()
}

/// Ids of the stop strings that are one token each (special tokens such as `<|im_end|>`).
fn single_token_ids(engine: &dyn Engine, stops: &[String]) -> Result<Vec<u32>> {
    let mut ids = vec![];
    for stop in stops {
        if let [id] = engine.tokenize(stop)?.as_slice() {
            ids.push(*id);
        }
    }
    Ok(ids)
}

