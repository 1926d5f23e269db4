//! A training run's folder and its checkpoints.
//!
//! The folder (`--output`) holds the run claim (`.magpie-run.json`, written first), `checkpoint-N/`
//! folders, `metrics.jsonl`, the plots, the final `model/` and, written last, the manifest that
//! marks the run finished (`crate::run`). `--resume` continues an unfinished run from its
//! newest checkpoint; `--overwrite` starts over in place of a run of ours; anything else in the
//! way is an error, and nothing magpie did not write is ever removed.
//!
//! A checkpoint is a loadable HF model (with LoRA, a PEFT adapter folder) plus the optimizer
//! state (`optimizer.safetensors`, or one `optimizer-rank{R}-of-{N}.safetensors` per rank when
//! sharded: moments, and the fp32 master weights under mixed precision) and `trainer_state.json`
//! (step, seed, settings), with a manifest of its own. Resuming refuses other settings, naming them.
//!
//! With several ranks the folder must be on a filesystem they share. Each other rank writes its
//! shard into a staging folder beside the checkpoint; once all have (a barrier), rank 0 moves the
//! shards into its temporary checkpoint and commits it, so a checkpoint is whole or absent.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::plan::TrainPlan;
use super::optim::Optimizer;
use crate::model::Loaded;
use crate::run::{self, Manifest, Prepared, Provenance, Resuming, RunDir};

/// The names a training run writes into its folder besides the markers.
fn owns(name: &str) -> bool {
    ["metrics.jsonl", "loss.png", "rewards.png", "model"].contains(&name)
        || name.strip_prefix("checkpoint-").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The settings a checkpoint must agree with to be resumed.
pub fn settings(plan: &TrainPlan, extra: &Value) -> Value {
    json!({"train": plan.flags, "objective": extra})
}

/// Before anything is loaded: the output against the inputs, `--resume` and `--overwrite`, and
/// what is already there (its claim's settings against this run's `extra` objective settings).
/// What `--overwrite` replaces is planned now and removed when training starts.
pub fn prepare_output(plan: &TrainPlan, stage: &str, extra: &Value, inputs: &[PathBuf]) -> Result<Prepared> {
    RunDir::prepare(&plan.output, inputs, stage, &settings(plan, extra), owns, plan.overwrite, Resuming::OnFlag(plan.checkpoints.resume))
}

/// After the final model and plots: removes what interrupted runs left and writes the manifest.
pub fn finish_output(run: &RunDir, provenance: &Provenance) -> Result<()> {
    run.finish(".", "training run", None, provenance).map(drop)
}

/// The checkpoint folders in `output`, oldest first.
pub fn checkpoint_dirs(output: &Path) -> Vec<(usize, PathBuf)> {
    let mut dirs: Vec<(usize, PathBuf)> = std::fs::read_dir(output)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    dirs.sort();
    dirs
}

/// Where rank `rank` stages its optimizer shard for `checkpoint-{step}`: a temporary by name,
/// which rank 0 empties, and a later successful run sweeps if a crash left it.
fn shard_staging(output: &Path, step: usize, rank: usize) -> PathBuf {
    output.join(format!(".checkpoint-{step}.rank{rank}{}staged", run::TMP_MARK))
}

/// Writes `checkpoint-{step}` atomically (every rank's optimizer shard in it), then drops the
/// oldest past `save_total_limit`. Every rank calls it.
pub fn save(loaded: &Loaded, opt: &dyn Optimizer, step: usize, plan: &TrainPlan, provenance: &Provenance) -> Result<()> {
    let (world, output) = (&plan.world, &plan.output);
    if !world.is_main() {
        let staging = shard_staging(output, step, world.rank);
        run::remove_temporary(&staging);
        std::fs::create_dir_all(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
        opt.save(&staging)?;
        world.barrier()?; // shards written
        return world.barrier(); // checkpoint committed
    }
    world.barrier()?;
    let dir = output.join(format!("checkpoint-{step}"));
    run::write_dir(&dir, "checkpoint", provenance, |tmp| {
        loaded.write_files(tmp)?;
        opt.save(tmp)?;
        for rank in 1..world.size {
            let staging = shard_staging(output, step, rank);
            for entry in std::fs::read_dir(&staging).with_context(|| format!("{}: rank {rank}'s optimizer shard is missing", staging.display()))? {
                let entry = entry?;
                std::fs::rename(entry.path(), tmp.join(entry.file_name())).with_context(|| format!("{}: cannot move into the checkpoint", entry.path().display()))?;
            }
            run::remove_temporary(&staging);
        }
        let state = json!({"global_step": step, "optimizer_steps": opt.steps(), "world_size": world.size, "seed": plan.seed, "settings": provenance.settings});
        let path = tmp.join("trainer_state.json");
        std::fs::write(&path, serde_json::to_string_pretty(&state)?).with_context(|| format!("{}: cannot write", path.display()))
    })?;
    world.barrier()?;
    if let Some(keep) = plan.checkpoints.keep {
        let dirs = checkpoint_dirs(output);
        for (_, old) in dirs.iter().take(dirs.len().saturating_sub(keep)) {
            run::remove_finished_dir(old)?;
        }
    }
    Ok(())
}

/// Loads the newest checkpoint into the model and optimizer; returns its step.
pub fn resume(loaded: &Loaded, opt: &mut dyn Optimizer, output: &Path, want: &Value) -> Result<usize> {
    let Some((step, dir)) = checkpoint_dirs(output).pop() else {
        bail!("{}: --resume, but there is no checkpoint-* here", output.display());
    };
    // The checkpoint is what its manifest says, hash for hash: small against the run it resumes.
    match Manifest::read(&dir)? {
        Some(manifest) => manifest.verify(&dir)?,
        None => bail!("{}: has no {}, so it is not a whole checkpoint; remove it to resume from the one before", dir.display(), run::MANIFEST),
    }
    let state_file = dir.join("trainer_state.json");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(&state_file).with_context(|| format!("{}: cannot read", state_file.display()))?)
        .with_context(|| format!("{}: not JSON", state_file.display()))?;
    let mut differing = vec![];
    run::differing_keys("", &state["settings"], want, &mut differing);
    if !differing.is_empty() {
        let names: Vec<&str> = differing.iter().map(|k| k.rsplit('.').next().unwrap_or(k)).collect();
        bail!("{}: was made with other settings ({}); resume with the same ones or use a new --output", dir.display(), names.join(", "));
    }
    loaded.load_trained(&dir)?;
    opt.load(&dir, state["optimizer_steps"].as_i64().unwrap_or(step as i64))?;
    Ok(step)
}
