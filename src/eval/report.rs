//! What `magpie eval` writes: every judgement as a parquet row (prompt, both answers, the verdict
//! in each order, the raw judge texts, the parsed outcome or grade), `summary.json` (win rate with
//! its bootstrap interval, the length-controlled win rate, grades, per category, and the count of
//! unparsable judgements) and charts (win / tie / loss by category, or mean grade by category).

use anyhow::Result;
use arrow::array::{ArrayRef, Float64Array, ListArray, RecordBatch, StringArray};
use arrow::datatypes::Float64Type;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::judge::{parse_grade, parse_verdict};
use super::prompts::{batch, EvalPrompt};
use super::stats::{self, Outcome, Verdict};
use super::EvalArgs;
use crate::run::Provenance;
use crate::plot::{self, Bars};

/// One prompt judged in both orders.
pub struct Pair {
    pub model_first: String,
    pub baseline_first: String,
    pub outcome: Option<Outcome>,
}

impl Pair {
    pub fn new(model_first: String, baseline_first: String) -> Pair {
        let outcome = stats::outcome(parse_verdict(&model_first), parse_verdict(&baseline_first));
        Pair { model_first, baseline_first, outcome }
    }
}

/// One prompt's answers graded, turn by turn (MT-Bench grades every turn on its own).
pub struct Grade {
    /// Each turn's judge text and parsed grade.
    pub turns: Vec<(String, Option<f64>)>,
}

impl Grade {
    pub fn new(texts: Vec<String>) -> Grade {
        Grade { turns: texts.into_iter().map(|t| { let grade = parse_grade(&t); (t, grade) }).collect() }
    }

    /// The parsed grades of the turns.
    pub fn scores(&self) -> impl Iterator<Item = f64> + '_ {
        self.turns.iter().filter_map(|t| t.1)
    }

    /// The prompt's grade: the mean over its parsed turns.
    pub fn score(&self) -> Option<f64> {
        mean(self.scores())
    }

    /// The judge texts, a turn's under a `--- turn N ---` line when there are several.
    fn text(&self) -> String {
        match &self.turns[..] {
            [(only, _)] => only.clone(),
            turns => turns.iter().enumerate().map(|(i, t)| format!("--- turn {} ---\n{}", i + 1, t.0)).collect::<Vec<_>>().join("\n\n"),
        }
    }
}

pub struct Names {
    pub model: String,
    pub baseline: Option<String>,
    pub judge: String,
}

fn joined(turns: &[String]) -> String {
    turns.join("\n\n")
}

fn letter(verdict: Option<Verdict>) -> Option<&'static str> {
    verdict.map(|v| match v {
        Verdict::First => "A",
        Verdict::Second => "B",
        Verdict::Tie => "C",
    })
}

/// The judgement rows.
pub fn judgements(prompts: &[EvalPrompt], answers: &[Vec<String>], baseline: Option<&Vec<Vec<String>>>, pairs: Option<&[Pair]>, grades: Option<&[Grade]>) -> Result<RecordBatch> {
    let text = |values: Vec<Option<String>>| Arc::new(StringArray::from(values)) as ArrayRef;
    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("uuid", text(prompts.iter().map(|p| Some(p.uuid.clone())).collect())),
        ("category", text(prompts.iter().map(|p| Some(p.category.clone())).collect())),
        ("prompt", text(prompts.iter().map(|p| Some(joined(&p.questions))).collect())),
        ("answer", text(answers.iter().map(|a| Some(joined(a))).collect())),
    ];
    if let Some(baseline) = baseline {
        columns.push(("baseline_answer", text(baseline.iter().map(|a| Some(joined(a))).collect())));
    }
    if let Some(pairs) = pairs {
        columns.push(("verdict_model_first", text(pairs.iter().map(|p| letter(parse_verdict(&p.model_first)).map(str::to_string)).collect())));
        columns.push(("verdict_baseline_first", text(pairs.iter().map(|p| letter(parse_verdict(&p.baseline_first)).map(str::to_string)).collect())));
        columns.push(("judge_model_first", text(pairs.iter().map(|p| Some(p.model_first.clone())).collect())));
        columns.push(("judge_baseline_first", text(pairs.iter().map(|p| Some(p.baseline_first.clone())).collect())));
        columns.push(("outcome", text(pairs.iter().map(|p| p.outcome.map(|o| o.as_str().to_string())).collect())));
    }
    if let Some(grades) = grades {
        columns.push(("grade", Arc::new(grades.iter().map(|g| g.score()).collect::<Float64Array>())));
        let turns = grades.iter().map(|g| Some(g.turns.iter().map(|t| t.1).collect::<Vec<_>>()));
        columns.push(("turn_grades", Arc::new(ListArray::from_iter_primitive::<Float64Type, _, _>(turns))));
        columns.push(("judge_grade", text(grades.iter().map(|g| Some(g.text())).collect())));
    }
    batch(columns)
}


pub fn write_parquet(path: &Path, batch: &RecordBatch, provenance: &Provenance) -> Result<()> {
    crate::data::write::write_batch(path, batch, Some(provenance))
}

/// The parsed turn grades of each category.
fn grades_by_category(prompts: &[EvalPrompt], grades: &[Grade]) -> BTreeMap<String, Vec<f64>> {
    let mut by_category: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (prompt, grade) in prompts.iter().zip(grades) {
        by_category.entry(prompt.category.clone()).or_default().extend(grade.scores());
    }
    by_category
}

/// Win / tie / loss counts by category, "all" first.
fn outcome_counts(prompts: &[EvalPrompt], pairs: &[Pair]) -> BTreeMap<String, [usize; 4]> {
    let mut counts: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    for (prompt, pair) in prompts.iter().zip(pairs) {
        let slot = match pair.outcome {
            Some(Outcome::Win) => 0,
            Some(Outcome::Tie) => 1,
            Some(Outcome::Loss) => 2,
            None => 3,
        };
        counts.entry(prompt.category.clone()).or_default()[slot] += 1;
    }
    counts
}

pub fn summary(names: &Names, prompts: &[EvalPrompt], answers: &[Vec<String>], baseline: Option<&Vec<Vec<String>>>, pairs: Option<&[Pair]>, grades: Option<&[Grade]>, args: &EvalArgs) -> Result<Value> {
    let mut summary = json!({
        "model": names.model, "baseline": names.baseline, "judge": names.judge, "prompts": prompts.len(),
        "note": "a small judge model is a mechanism check, not a verdict on quality",
    });
    if let (Some(pairs), Some(baseline)) = (pairs, baseline) {
        let judged: Vec<(Outcome, (usize, usize))> = pairs
            .iter()
            .zip(answers.iter().zip(baseline))
            .filter_map(|(p, (a, b))| p.outcome.map(|o| (o, (joined(a).chars().count(), joined(b).chars().count()))))
            .collect();
        let outcomes: Vec<Outcome> = judged.iter().map(|j| j.0).collect();
        let lengths: Vec<(usize, usize)> = judged.iter().map(|j| j.1).collect();
        let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
        let (lo, hi) = stats::bootstrap_interval(&outcomes, args.bootstrap, args.seed);
        let by_category: BTreeMap<String, Value> = outcome_counts(prompts, pairs)
            .into_iter()
            .map(|(c, [w, t, l, u])| (c, json!({"wins": w, "ties": t, "losses": l, "unparsable": u})))
            .collect();
        summary["pairwise"] = json!({
            "wins": count(Outcome::Win), "ties": count(Outcome::Tie), "losses": count(Outcome::Loss),
            "unparsable": pairs.len() - outcomes.len(),
            "win_rate": (!outcomes.is_empty()).then(|| stats::win_rate(&outcomes)),
            "win_rate_95ci": (!outcomes.is_empty()).then_some([lo, hi]),
            "length_controlled_win_rate": (!outcomes.is_empty()).then(|| stats::length_controlled_win_rate(&outcomes, &lengths)),
            "mean_answer_chars": [mean(lengths.iter().map(|l| l.0 as f64)), mean(lengths.iter().map(|l| l.1 as f64))],
            "by_category": by_category,
        });
    }
    if let Some(grades) = grades {
        let by_category = grades_by_category(prompts, grades);
        // MT-Bench's score: the mean over every graded turn; also by turn and by category.
        let scores: Vec<f64> = grades.iter().flat_map(|g| g.scores()).collect();
        let judged: usize = grades.iter().map(|g| g.turns.len()).sum();
        let turns = grades.iter().map(|g| g.turns.len()).max().unwrap_or(0);
        let by_turn: Vec<Option<f64>> = (0..turns).map(|t| mean(grades.iter().filter_map(|g| g.turns.get(t).and_then(|x| x.1)))).collect();
        summary["grade"] = json!({
            "mean": mean(scores.iter().copied()), "graded": scores.len(), "unparsable": judged - scores.len(), "by_turn": by_turn,
            "by_category": by_category.into_iter().map(|(c, s)| (c, json!({"mean": mean(s.iter().copied()), "graded": s.len()}))).collect::<BTreeMap<_, _>>(),
        });
    }
    Ok(summary)
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// One line for the terminal.
pub fn headline(summary: &Value) -> String {
    let mut parts = vec![];
    if let Some(p) = summary.get("pairwise") {
        parts.push(format!(
            "{} vs {}: {} wins, {} ties, {} losses, {} unparsable; win rate {} (95% CI {}), length-controlled {}",
            summary["model"].as_str().unwrap_or(""),
            summary["baseline"].as_str().unwrap_or(""),
            p["wins"], p["ties"], p["losses"], p["unparsable"],
            number(&p["win_rate"]),
            p["win_rate_95ci"].as_array().map_or("n/a".into(), |ci| format!("{}–{}", number(&ci[0]), number(&ci[1]))),
            number(&p["length_controlled_win_rate"])
        ));
    }
    if let Some(g) = summary.get("grade") {
        parts.push(format!("mean grade {} over {} graded turns ({} unparsable)", number(&g["mean"]), g["graded"], g["unparsable"]));
    }
    format!("magpie eval: {}", parts.join("; "))
}

fn number(value: &Value) -> String {
    value.as_f64().map_or("n/a".into(), |v| format!("{v:.3}"))
}

/// `pairwise.png` (win / tie / loss shares by category) and `grades.png` (mean grade by category).
pub fn charts(dir: &Path, prompts: &[EvalPrompt], pairs: Option<&[Pair]>, grades: Option<&[Grade]>) -> Result<()> {
    if let Some(pairs) = pairs {
        let counts = outcome_counts(prompts, pairs);
        let mut categories = vec!["all".to_string()];
        categories.extend(counts.keys().filter(|c| *c != "all").cloned());
        let total = |c: &str| -> [f64; 3] {
            let [w, t, l, _] = if c == "all" { counts.values().fold([0; 4], |acc, x| std::array::from_fn(|i| acc[i] + x[i])) } else { counts[c] };
            let n = (w + t + l).max(1) as f64;
            [w as f64 / n, t as f64 / n, l as f64 / n]
        };
        let shares: Vec<[f64; 3]> = categories.iter().map(|c| total(c)).collect();
        let series = ["win", "tie", "loss"].iter().enumerate().map(|(k, name)| Bars { name: name.to_string(), values: shares.iter().map(|s| s[k]).collect() }).collect::<Vec<_>>();
        plot::stacked_bars(&dir.join("pairwise.png"), "model vs baseline, by category", "share of judged prompts", &categories, &series)?;
    }
    if let Some(grades) = grades {
        let by_category = grades_by_category(prompts, grades);
        let categories: Vec<String> = by_category.keys().cloned().collect();
        let values = by_category.values().map(|s| mean(s.iter().copied()).unwrap_or(0.0)).collect();
        plot::stacked_bars(&dir.join("grades.png"), "mean grade (1-10) by category", "grade", &categories, &[Bars { name: "mean grade".into(), values }])?;
    }
    Ok(())
}
