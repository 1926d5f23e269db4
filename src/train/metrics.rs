//! The run's log: `metrics.jsonl` (one JSON object per logged step or evaluation) and the plots
//! drawn from it at the end (`loss.png`, and `rewards.png` for DPO).

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::objective::Objective;
use crate::plot;

/// Appends JSON lines to `metrics.jsonl`, dropping lines past `keep_until` first (a resumed run
/// rewrites what the interrupted one logged after its checkpoint).
pub struct MetricsLog {
    path: PathBuf,
    rows: Vec<Value>,
}

impl MetricsLog {
    pub fn open(output: &Path, keep_until: usize) -> Result<Self> {
        let path = output.join("metrics.jsonl");
        let rows: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| (s as usize) <= keep_until))
            .collect();
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        crate::run::write_atomically(&path, text.as_bytes())?;
        Ok(MetricsLog { path, rows })
    }

    pub fn push(&mut self, row: Value) -> Result<()> {
        let mut file = std::fs::OpenOptions::new().append(true).open(&self.path).with_context(|| format!("{}: cannot open", self.path.display()))?;
        writeln!(file, "{row}").with_context(|| format!("{}: cannot write", self.path.display()))?;
        self.rows.push(row);
        Ok(())
    }

    fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.rows.iter().filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?))).collect()
    }
}

pub fn write_plots(log: &MetricsLog, objective: &dyn Objective, output: &Path) -> Result<()> {
    let line = |key: &str| plot::Series { name: key.to_string(), points: log.series(key) };
    plot::lines(&output.join("loss.png"), "loss", "loss", &[line("loss"), line("eval_loss")])?;
    if let Some((file, keys)) = objective.reward_plot() {
        let series: Vec<plot::Series> = keys.iter().flat_map(|k| [line(k), line(&format!("eval_{k}"))]).collect();
        plot::lines(&output.join(file), "rewards", "value", &series)?;
    }
    Ok(())
}

