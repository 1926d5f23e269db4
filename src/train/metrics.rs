//! The run's log: `metrics.jsonl` (one JSON object per logged step or evaluation) and the plots
//! drawn from it at the end (`loss.png`, and `rewards.png` for DPO), and the model FLOPs
//! utilisation each logged step reports on a GPU whose peak is known.

use anyhow::{Context, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::objective::Objective;
use crate::plot;

/// Dense bf16 peak FLOP/s of the GPUs this machine's NVIDIA driver lists (the first one named
/// in /proc/driver/nvidia/gpus/*/information), for MFU; `None` without one or for a model not
/// in the table.
pub fn gpu_peak_flops() -> Option<f64> {
    let gpus = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?;
    let model = gpus.flatten().find_map(|gpu| {
        let info = std::fs::read_to_string(gpu.path().join("information")).ok()?;
        info.lines().find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
    })?;
    peak_flops_of(&model)
}

/// Dense bf16 peak FLOP/s by GPU model name (the vendors' data sheets, without sparsity).
pub fn peak_flops_of(model: &str) -> Option<f64> {
    const PEAKS: [(&str, f64); 7] =
        [("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12), ("L40S", 362.0e12), ("A10G", 70.0e12), ("L4", 121.0e12)];
    PEAKS.iter().find(|(name, _)| model.contains(name)).map(|(_, peak)| *peak)
}

/// Model FLOPs utilisation as nanoGPT estimates it: 6 FLOPs per matrix parameter and token
/// (forward and backward) over `seconds`, against `world` GPUs of `peak` FLOP/s each.
pub fn mfu(matmul_parameters: i64, tokens: usize, seconds: f64, world: usize, peak: f64) -> f64 {
    6.0 * matmul_parameters as f64 * tokens as f64 / seconds / (peak * world as f64)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mfu_is_six_flops_a_parameter_and_token_over_the_gpus_peak() {
        assert_eq!(peak_flops_of("NVIDIA H200"), Some(989.4e12));
        assert_eq!(peak_flops_of("NVIDIA H100 PCIe"), Some(756.0e12));
        assert_eq!(peak_flops_of("NVIDIA H100 80GB HBM3"), Some(989.4e12));
        assert_eq!(peak_flops_of("NVIDIA GeForce GTX 1080"), None);
        // 1B matrix parameters at 100K tokens/s on one H200: 6e14 FLOP/s, 60.6% of its peak.
        let got = mfu(1_000_000_000, 100_000, 1.0, 1, 989.4e12);
        assert!((got - 6e14 / 989.4e12).abs() < 1e-12, "{got}");
        assert!((mfu(1_000_000_000, 800_000, 1.0, 8, 989.4e12) - got).abs() < 1e-12, "eight GPUs at eight times the tokens");
    }
}
