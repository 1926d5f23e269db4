//! DPO's reference log-probs computed once, before training (`precompute_ref_log_probs`): one
//! pass of the reference model over every pair, split over the ranks, whose results are cached in
//! `$MAGPIE_CACHE/dpo-reference-logps/`, keyed by the tokenised pairs, the reference weights,
//! and the compute dtype and device, so that no reference model is held while training.

use anyhow::{bail, Context, Result};
use arrow::array::{Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

use super::plan::TrainPlan;
use super::distributed::World;
use super::batch::Batch;
use super::lm_head::target_log_probs;
use super::objective::{Objective, Split};
use crate::model::{load_causal_lm, Llama};

/// Each row's summed completion log-prob under `model`, outside the graph (reference models).
pub fn reference_logps(model: &Llama, batch: &Batch) -> Tensor {
    tch::no_grad(|| {
        let values = target_log_probs(model, &model.hidden_states(&batch.inputs()), batch);
        values.per_document(&values.logps)
    })
}

/// Runs `reference` over every pair of both splits, under no grad. The ranks take the batches
/// in turn and sum their results (each pair's values come from one rank, zeros from the others).
pub fn compute_reference(objective: &dyn Objective, reference: &Llama, batch_size: usize, device: Device, world: &World) -> Result<[Vec<[f64; 2]>; 2]> {
    let mut out = [vec![], vec![]];
    for split in [Split::Train, Split::Eval] {
        let indices: Vec<usize> = (0..objective.len(split)).collect();
        let values = Tensor::zeros([indices.len() as i64, 2], (Kind::Double, device));
        for (i, chunk) in indices.chunks(batch_size.max(1)).enumerate().skip(world.rank).step_by(world.size) {
            let batch = objective.collate(split, chunk, device)?;
            let logps = reference_logps(reference, &batch);
            // logps holds the chosen completions, then the rejected ones.
            let pairs = logps.to_kind(Kind::Double).view([2, -1]).transpose(0, 1);
            values.narrow(0, (i * batch_size.max(1)) as i64, chunk.len() as i64).copy_(&pairs);
        }
        if let Some(group) = world.group() {
            group.all_reduce_sum(&values)?;
        }
        let host: Vec<f64> = values.to_device(Device::Cpu).view([-1]).try_into()?;
        out[split.index()] = host.chunks(2).map(|p| [p[0], p[1]]).collect();
    }
    Ok(out)
}

/// A key for the cache: the tokenised pairs of both splits, the reference weights' bytes, and
/// the compute dtype and device type they were computed in (f32 CPU log-probs are not a bf16 GPU
/// policy's reference: its margins at step 0 would not be 0).
/// Bumped when the log-probs' computation changes in its rounding (2: the chunked vocabulary head),
/// so that a cache from older code is not mixed with the policy's new values.
const REFERENCE_CACHE_VERSION: u32 = 2;

pub fn cache_key(pairs: &impl std::hash::Hash, reference_dir: &crate::model::ModelDir, kind: Kind, device: Device) -> Result<String> {
    use std::hash::Hash;
    let mut hasher = twox_hash::XxHash64::with_seed(0);
    REFERENCE_CACHE_VERSION.hash(&mut hasher);
    format!("{kind:?} {}", if device.is_cuda() { "cuda" } else { "cpu" }).hash(&mut hasher);
    pairs.hash(&mut hasher);
    for file in reference_dir.weight_files()? {
        let handle = std::fs::File::open(&file).with_context(|| format!("{}: cannot open", file.display()))?;
        // SAFETY: read-only mapping, hashed and dropped.
        let bytes = unsafe { memmap2::Mmap::map(&handle) }?;
        hasher.write(&bytes);
    }
    Ok(format!("{:016x}", hasher.finish()))
}

/// The cache file: `$MAGPIE_CACHE/dpo-reference-logps/<key>.parquet`, never beside the data.
fn cache_path(key: &str) -> Result<PathBuf> {
    let dir = crate::home::cache_dir().join("dpo-reference-logps");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the cache folder", dir.display()))?;
    Ok(dir.join(format!("{key}.parquet")))
}

pub fn write_cache(path: &Path, values: &[Vec<[f64; 2]>; 2]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("split", DataType::Int64, false),
        Field::new("ref_chosen_logps", DataType::Float64, false),
        Field::new("ref_rejected_logps", DataType::Float64, false),
    ]));
    let rows: Vec<(i64, [f64; 2])> = values.iter().enumerate().flat_map(|(s, v)| v.iter().map(move |r| (s as i64, *r))).collect();
    let logps = |k: usize| Arc::new(Float64Array::from(rows.iter().map(|r| r.1[k]).collect::<Vec<_>>())) as _;
    let split = Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())) as _;
    let batch = RecordBatch::try_new(schema.clone(), vec![split, logps(0), logps(1)])?;
    let mut writer = crate::data::DatasetWriter::create(path, schema, &crate::run::Provenance::new("dpo", "reference log-probs cache"))?;
    writer.write(&batch)?;
    writer.finish()?.commit()?;
    Ok(())
}

pub fn read_cache(path: &Path) -> Result<[Vec<[f64; 2]>; 2]> {
    // A private file of ours, read as plain parquet (not through the dataset normaliser).
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?
        .build()?;
    let mut out = [vec![], vec![]];
    for batch in reader {
        let batch = batch?;
        let column = |name: &str| batch.column_by_name(name).with_context(|| format!("{}: column `{name}` is missing", path.display()));
        let split = column("split")?.as_any().downcast_ref::<Int64Array>().cloned();
        let logps = |name: &str| -> Result<Float64Array> {
            column(name)?.as_any().downcast_ref::<Float64Array>().cloned().with_context(|| format!("{}: column `{name}` is not float64", path.display()))
        };
        let Some(split) = split else { bail!("{}: column `split` is not int64", path.display()) };
        let (c, r) = (logps("ref_chosen_logps")?, logps("ref_rejected_logps")?);
        for i in 0..batch.num_rows() {
            out[usize::from(split.value(i) != 0)].push([c.value(i), r.value(i)]);
        }
    }
    Ok(out)
}

/// Reference log-probs from the cache, or computed now and cached; `pairs` (the tokenised
/// data) go into the cache key.
/// With several ranks the cache is used only when every rank finds it, and rank 0 writes it.
pub fn precomputed_reference(objective: &dyn Objective, pairs: &impl std::hash::Hash, plan: &TrainPlan, reference_dir: &Path) -> Result<[Vec<[f64; 2]>; 2]> {
    let (device, dtype, world) = (plan.device, plan.precision.dtype, &plan.world);
    let dir = crate::model::ModelDir::open(reference_dir)?;
    let path = cache_path(&cache_key(pairs, &dir, dtype, device)?)?;
    let cached = match path.is_file() {
        true => Some(read_cache(&path)?).filter(|c| c[0].len() == objective.len(Split::Train) && c[1].len() == objective.len(Split::Eval)),
        false => None,
    };
    let found = world.sum_scalars(&[Tensor::from(cached.is_some() as i64 as f64).to_device(device)])?[0].double_value(&[]);
    if let Some(cached) = cached.filter(|_| found as usize == world.size) {
        eprintln!("magpie dpo: reference log-probs from {}", path.display());
        return Ok(cached);
    }
    let reference = load_causal_lm(reference_dir, device, dtype)?;
    let values = compute_reference(objective, &reference.model, plan.schedule.per_device_batch, device, world)?;
    if world.is_main() {
        write_cache(&path, &values)?;
        eprintln!("magpie dpo: reference log-probs computed and cached in {}", path.display());
    }
    Ok(values)
}

