//! `magpie eval`: did training make the model better? The model under test answers an eval set;
//! a local judge model then compares its answers with a baseline's (AlpacaEval / Arena-Hard
//! style, in both orders: a win only when both agree) and/or grades each turn 1–10 (MT-Bench's
//! single-answer grading, with reference answers for math, reasoning and coding; the score is
//! the mean over turns, reported by turn and category). Prompt files may be parquet, JSON Lines
//! (MT-Bench's `question.jsonl`) or JSON.
//!
//! - `prompts`: eval sets, the embedded default set, answers generated or read from a file.
//! - `judge`: the judge's prompts and parsers.
//! - `stats`: the position-swap rule, win rate with a bootstrap interval, length control.
//! - `report`: `judgements.parquet`, `summary.json` and the charts.
//!
//! The output folder holds `answers.parquet` (and `baseline_answers.parquet`), the judgements,
//! the summary and a chart, with a manifest. A small judge is a mechanism check, not a verdict.

pub mod judge;
pub mod prompts;
pub mod report;
pub mod stats;

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

use crate::engine::chat::ChatModel;
use crate::engine::openai::ServerOptions;
use crate::run::{self, Provenance, Rules};
use prompts::EvalPrompt;
use report::{Grade, Pair};

#[derive(clap::Args, Debug, Clone, serde::Serialize)]
pub struct EvalArgs {
    #[command(flatten)]
    #[serde(skip)]
    pub run: crate::flags::OutputFlags,

    /// The model under test: a GGUF file or a Hugging Face folder (a `magpie sft`/`dpo` model).
    #[arg(long)]
    pub model: PathBuf,

    /// A baseline model to compare against (its answers are generated too).
    #[arg(long, conflicts_with = "baseline_answers")]
    pub baseline: Option<PathBuf>,

    /// Baseline answers instead of a baseline model: a dataset whose `messages` hold them,
    /// matched by uuid (e.g. the `answers.parquet` of an earlier `magpie eval`).
    #[arg(long)]
    pub baseline_answers: Vec<String>,

    /// The judge model (default: the embedded SmolLM2, a mechanism check only). With
    /// `--judge-base-url`, the judge's local tokenizer and chat template.
    #[arg(long)]
    pub judge: Option<PathBuf>,

    /// The chat template's family (llama3, qwen2.5, gemma, ...) for a `--model` or
    /// `--baseline` that ships none.
    #[arg(long)]
    pub template: Option<String>,

    /// The chat template's family for a `--judge` that ships none.
    #[arg(long)]
    pub judge_template: Option<String>,

    /// Judge on this OpenAI-compatible server (vLLM, SGLang, llama.cpp's server); the key,
    /// timeout and retries are those of `--api-key-env`, `--request-timeout`, `--request-retries`.
    #[arg(long)]
    #[serde(skip)]
    pub judge_base_url: Option<String>,

    /// The judge's model name on its server (default: the first at `/v1/models`).
    #[arg(long, requires = "judge_base_url")]
    #[serde(skip)]
    pub judge_server_model: Option<String>,

    /// The model under test answers on a server (`--base-url`); `--model` is then its local
    /// tokenizer and chat template. A baseline model answers in-process.
    #[command(flatten)]
    #[serde(skip)]
    pub server: crate::engine::openai::ServerFlags,

    /// Eval prompts: datasets with `messages`, `instruction` or MT-Bench's `turns` (default: the
    /// embedded magpie-eval-80 set).
    #[arg(long)]
    pub prompts: Vec<String>,

    /// Only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,

    /// `pairwise` (needs a baseline), `grade`, or `both`. Default: pairwise with a baseline,
    /// grade without.
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,

    /// Most tokens per answer.
    #[arg(long, default_value_t = 512, value_parser = crate::flags::at_least_one)]
    pub max_tokens: usize,

    /// Most tokens per judgement.
    #[arg(long, default_value_t = 512, value_parser = crate::flags::at_least_one)]
    pub judge_max_tokens: usize,

    /// Start the judge's reply with the verdict's opening brackets (`[[` for pairs, `Rating: [[`
    /// for grades), so that a small judge answers with a verdict instead of answering the
    /// question itself; the stored judge text includes the prefill.
    #[arg(long)]
    pub verdict_first: bool,

    /// Bootstrap resamples for the win rate's 95% interval.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,

    /// Seed of the bootstrap resamples (judging and answers are greedy).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Sequences generated together.
    #[arg(long, default_value_t = 16)]
    #[serde(skip)]
    pub batch_size: usize,

    /// Output folder.
    #[arg(long, short)]
    pub output: PathBuf,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Pairwise,
    Grade,
    Both,
}

/// What an eval run does, read once from its flags: the mode (resolved from the baseline when
/// not given), where the baseline comes from, and the prompt files (the embedded set by default).
pub struct EvalPlan<'a> {
    pub flags: &'a EvalArgs,
    pub mode: Mode,
    pub baseline: Baseline<'a>,
    pub prompt_files: Vec<String>,
}

/// Where the baseline's answers come from.
pub enum Baseline<'a> {
    None,
    /// Generated by this model.
    Model(&'a Path),
    /// Read from datasets whose `messages` hold them.
    Answers(&'a [String]),
}

impl EvalArgs {
    pub fn plan(&self) -> Result<EvalPlan<'_>> {
        let baseline = match (&self.baseline, self.baseline_answers.is_empty()) {
            (Some(model), _) => Baseline::Model(model),
            (None, false) => Baseline::Answers(&self.baseline_answers),
            (None, true) => Baseline::None,
        };
        let has_baseline = !matches!(baseline, Baseline::None);
        let mode = self.mode.unwrap_or(if has_baseline { Mode::Pairwise } else { Mode::Grade });
        if mode != Mode::Grade && !has_baseline {
            bail!("--mode {mode:?}: pairwise judging needs --baseline MODEL or --baseline-answers FILE");
        }
        let prompt_files = if self.prompts.is_empty() { vec![prompts::default_set()?.display().to_string()] } else { self.prompts.clone() };
        Ok(EvalPlan { flags: self, mode, baseline, prompt_files })
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let plan = args.plan()?;
    let mode = plan.mode;
    let (prompts, files) = prompts::read(&plan.prompt_files, args.limit)?;
    let mut inputs: Vec<PathBuf> = files;
    inputs.extend([Some(args.model.clone()), args.baseline.clone(), args.judge.clone()].into_iter().flatten());
    run::check(&args.output, &inputs, &Rules { overwrite: args.run.overwrite, resumable: None })?;

    let (model_name, answers) = answer_with(&args.model, &prompts, args, args.server.options())?;
    let baseline = match plan.baseline {
        Baseline::Model(path) => Some(answer_with(path, &prompts, args, None)?),
        Baseline::Answers(files) => Some(("baseline answers".to_string(), prompts::read_answers(files, &prompts)?)),
        Baseline::None => None,
    };
    let judge_server = args.server.server(args.judge_base_url.as_deref(), args.judge_server_model.as_deref());
    let mut judge = ChatModel::load(args.judge.clone(), args.judge_template.as_deref(), args.judge_max_tokens, args.batch_size, judge_server)?;
    eprintln!("magpie eval: judging {} prompts with {}", prompts.len(), judge.name);
    let pairs = match (&baseline, mode) {
        (Some((_, baseline)), Mode::Pairwise | Mode::Both) => Some(judge_pairs(&mut judge, &prompts, &answers, baseline, args.verdict_first)?),
        _ => None,
    };
    let grades = match mode {
        Mode::Grade | Mode::Both => Some(judge_grades(&mut judge, &prompts, &answers, args.verdict_first)?),
        Mode::Pairwise => None,
    };

    let names = report::Names { model: model_name, baseline: baseline.as_ref().map(|b| b.0.clone()), judge: judge.name.clone() };
    let provenance = Provenance::new("eval", args);
    let summary = report::summary(&names, &prompts, &answers, baseline.as_ref().map(|b| &b.1), pairs.as_deref(), grades.as_deref(), args)?;
    run::write_dir(&args.output, "eval", &provenance, |tmp| {
        report::write_parquet(&tmp.join("answers.parquet"), &prompts::answers_batch(&prompts, &answers, &names.model)?, &provenance)?;
        if let Some((name, baseline)) = &baseline {
            report::write_parquet(&tmp.join("baseline_answers.parquet"), &prompts::answers_batch(&prompts, baseline, name)?, &provenance)?;
        }
        let judgements = report::judgements(&prompts, &answers, baseline.as_ref().map(|b| &b.1), pairs.as_deref(), grades.as_deref())?;
        report::write_parquet(&tmp.join("judgements.parquet"), &judgements, &provenance)?;
        std::fs::write(tmp.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
        report::charts(tmp, &prompts, pairs.as_deref(), grades.as_deref())
    })?;
    eprintln!("{}", report::headline(&summary));
    eprintln!("magpie eval: judgements, summary and charts in {}", args.output.display());
    Ok(())
}

/// The name and answers of `model` for every prompt. The name is the path as given: a trained
/// model's folder is called `model` inside its run.
fn answer_with(model: &Path, prompts: &[EvalPrompt], args: &EvalArgs, server: Option<ServerOptions>) -> Result<(String, Vec<Vec<String>>)> {
    let mut chat = ChatModel::load(Some(model.to_path_buf()), args.template.as_deref(), args.max_tokens, args.batch_size, server)?;
    eprintln!("magpie eval: {} ({}) answers {} prompts", model.display(), chat.engine.name(), prompts.len());
    let answers = prompts::generate(&mut chat, prompts)?;
    Ok((model.display().to_string(), answers))
}

/// Each prompt judged twice, the model's answers first and then the baseline's first.
fn judge_pairs(judge: &mut ChatModel, prompts: &[EvalPrompt], answers: &[Vec<String>], baseline: &[Vec<String>], verdict_first: bool) -> Result<Vec<Pair>> {
    let model_first: Vec<_> = prompts.iter().zip(answers.iter().zip(baseline)).map(|(p, (a, b))| judge::pairwise(&p.questions, a, b)).collect();
    let baseline_first: Vec<_> = prompts.iter().zip(answers.iter().zip(baseline)).map(|(p, (a, b))| judge::pairwise(&p.questions, b, a)).collect();
    let prefill = if verdict_first { judge::PAIR_PREFILL } else { "" };
    let texts: Vec<String> = judge.answer(&[model_first, baseline_first].concat(), prefill)?.into_iter().map(|t| format!("{prefill}{t}")).collect();
    let (first, second) = texts.split_at(prompts.len());
    Ok(first.iter().zip(second).map(|(m, b)| Pair::new(m.clone(), b.clone())).collect())
}

/// Every turn of every prompt graded on its own, as MT-Bench does: math, reasoning and coding
/// questions against their reference answers when the set has them.
fn judge_grades(judge: &mut ChatModel, prompts: &[EvalPrompt], answers: &[Vec<String>], verdict_first: bool) -> Result<Vec<Grade>> {
    let mut conversations = vec![];
    for (p, a) in prompts.iter().zip(answers) {
        let reference: &[String] = if judge::REFERENCE_CATEGORIES.contains(&p.category.as_str()) { &p.reference } else { &[] };
        conversations.extend((0..p.questions.len().min(a.len())).map(|turn| judge::grading(&p.questions, a, reference, turn)));
    }
    let prefill = if verdict_first { judge::GRADE_PREFILL } else { "" };
    let mut texts = judge.answer(&conversations, prefill)?.into_iter().map(|t| format!("{prefill}{t}"));
    Ok(prompts.iter().zip(answers).map(|(p, a)| Grade::new(texts.by_ref().take(p.questions.len().min(a.len())).collect())).collect())
}
