//! Semantic dedup as Magpie's gen_dis does it. Needs the whole dataset: every instruction is
//! embedded (all-MiniLM-L6-v2, `embed`), then an exact kNN by blocked matrix products finds each
//! row's k nearest others (k default 500, capped by the row count). Writes:
//! - `min_neighbor_distance`: the squared L2 distance to the nearest other row (normalised
//!   vectors), the scale of faiss's `IndexFlatL2` that Magpie searches with, so the values match
//!   Magpie's released files;
//! - `repeat_count`: neighbours closer than 0.05 on that scale (cosine above 0.975);
//! - `min_similar_uuid`: the uuid of the earliest row among the row and those neighbours, or
//!   null when it has none. A row is kept when it is its own `min_similar_uuid` or has none.
//! Memory: the embeddings, 4 x 384 bytes per row.

use crate::model::embed::SentenceEncoder;
use super::step::Step;
use super::text::{instructions, uuids};
use anyhow::Result;
use super::step::Duplicates;
use arrow::array::{BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use serde_json::{json, Value};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;
use tch::{Kind, Tensor};

/// Magpie's near-duplicate distance, in squared L2 (`IndexFlatL2`'s scale).
pub const REPEAT_DISTANCE: f64 = 0.05;

/// Rows embedded per forward pass, and rows per block of the kNN product.
const EMBED_BATCH: usize = 64;
const KNN_BLOCK: i64 = 1024;

/// `semantic_dedup` in a recipe.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SemanticDedupConfig {
    /// Embedding model folder (default: `$MAGPIE_HOME/all-minilm-l6-v2`).
    pub model: Option<PathBuf>,
    /// Neighbours per row (Magpie: 500).
    pub k: usize,
    /// Drop the duplicates (false: keep them, marked).
    pub drop: bool,
    /// Where the encoder runs: cpu, cuda, cuda:N or auto (the kNN runs on the CPU).
    pub device: crate::flags::DeviceChoice,
}

impl Default for SemanticDedupConfig {
    fn default() -> Self {
        SemanticDedupConfig { model: None, k: 500, drop: true, device: crate::flags::DeviceChoice::Cpu }
    }
}

pub struct SemanticDedup {
    encoder: SentenceEncoder,
    k: usize,
    duplicates: Duplicates,
    embeddings: Vec<Tensor>,
    uuids: Vec<String>,
    /// Per row: (min_neighbor_distance, repeat_count, earliest similar row).
    results: Vec<(Option<f64>, i64, Option<usize>)>,
    applied: usize,
    embed_seconds: f64,
    knn_seconds: f64,
}

impl SemanticDedup {
    pub fn new(config: SemanticDedupConfig) -> Result<Self> {
        let model = config.model.unwrap_or_else(crate::home::default_embedding_model);
        let device = config.device.resolve(None)?;
        Ok(SemanticDedup { encoder: SentenceEncoder::load(&model, device)?, k: config.k, duplicates: Duplicates::new(config.drop, "near duplicate (semantic)", "min_similar_uuid"), embeddings: vec![], uuids: vec![], results: vec![], applied: 0, embed_seconds: 0.0, knn_seconds: 0.0 })
    }
}

/// For each row of normalised `embeddings` (`[n, d]`): the squared L2 distance to the nearest
/// other row (2 - 2 cos for unit vectors), how many of its `k` nearest are closer than
/// `REPEAT_DISTANCE`, and the earliest row among itself and those.
pub fn neighbours(embeddings: &Tensor, k: usize) -> Vec<(Option<f64>, i64, Option<usize>)> {
    let n = embeddings.size()[0];
    let k = (k as i64).min(n - 1);
    let mut out = Vec::with_capacity(n as usize);
    if k <= 0 {
        return (0..n).map(|_| (None, 0, None)).collect();
    }
    tch::no_grad(|| {
        for start in (0..n).step_by(KNN_BLOCK as usize) {
            let rows = KNN_BLOCK.min(n - start);
            let block = embeddings.narrow(0, start, rows);
            let sims = block.matmul(&embeddings.transpose(0, 1));
            // Never one's own neighbour.
            let own = Tensor::arange_start(start, start + rows, (Kind::Int64, sims.device())).unsqueeze(1);
            let sims = sims.scatter_value(1, &own, f64::NEG_INFINITY);
            let (top, index) = sims.topk(k, 1, true, true);
            let distances: Vec<f64> = {
                let squared: Tensor = (top * -2.0) + 2.0;
                Vec::try_from(squared.clamp_min(0.0).to_kind(Kind::Double).flatten(0, -1)).unwrap()
            };
            let index: Vec<i64> = Vec::try_from(index.flatten(0, -1)).unwrap();
            for r in 0..rows as usize {
                let row = start as usize + r;
                let d = &distances[r * k as usize..(r + 1) * k as usize];
                let near: Vec<usize> = (0..k as usize).filter(|&j| d[j] < REPEAT_DISTANCE).map(|j| index[r * k as usize + j] as usize).collect();
                let earliest = (!near.is_empty()).then(|| near.iter().copied().chain([row]).min().unwrap());
                out.push((Some(d[0]), near.len() as i64, earliest));
            }
        }
    });
    out
}

impl Step for SemanticDedup {
    fn name(&self) -> &'static str {
        "semantic_dedup"
    }

    fn needs_scan(&self) -> bool {
        true
    }

    fn scan(&mut self, batch: &RecordBatch) -> Result<()> {
        let texts = instructions(batch);
        let texts: Vec<&str> = texts.iter().map(|t| t.as_deref().unwrap_or("")).collect();
        let start = std::time::Instant::now();
        // Batches of similar lengths pad little (sentence-transformers sorts the same way).
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| texts[i].len());
        let sorted: Vec<&str> = order.iter().map(|&i| texts[i]).collect();
        let chunks = sorted.chunks(EMBED_BATCH).map(|chunk| self.encoder.embed(chunk)).collect::<Result<Vec<_>>>()?;
        if !chunks.is_empty() {
            let mut inverse = vec![0i64; order.len()];
            for (position, &row) in order.iter().enumerate() {
                inverse[row] = position as i64;
            }
            self.embeddings.push(Tensor::cat(&chunks, 0).index_select(0, &Tensor::from_slice(&inverse)));
        }
        self.embed_seconds += start.elapsed().as_secs_f64();
        self.uuids.extend(uuids(batch));
        Ok(())
    }

    fn finish_scan(&mut self) -> Result<()> {
        let start = std::time::Instant::now();
        let embeddings = Tensor::cat(&std::mem::take(&mut self.embeddings), 0);
        self.results = neighbours(&embeddings, self.k);
        self.knn_seconds = start.elapsed().as_secs_f64();
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let rows = self.applied..self.applied + batch.num_rows();
        self.applied = rows.end;
        let results = &self.results[rows.clone()];
        let distance: Float64Array = results.iter().map(|r| r.0).collect();
        let repeats: Int64Array = results.iter().map(|r| Some(r.1)).collect();
        let similar: StringArray = results.iter().map(|r| r.2.map(|i| self.uuids[i].as_str())).collect();
        let keep: BooleanArray = rows.clone().zip(results).map(|(row, r)| Some(r.2.is_none_or(|e| e == row))).collect();
        let mut batch = super::step::with_column(batch, "min_neighbor_distance", Arc::new(distance))?;
        batch = super::step::with_column(batch, "repeat_count", Arc::new(repeats))?;
        batch = super::step::with_column(batch, "min_similar_uuid", Arc::new(similar))?;
        self.duplicates.settle(batch, &keep)
    }

    fn take_rejected(&mut self) -> Option<super::step::Rejected> {
        self.duplicates.take_rejected()
    }

    fn report(&self) -> Value {
        let mut report = self.duplicates.report();
        report.extend([
            ("k".into(), json!(self.k)),
            ("embed_seconds".into(), json!(self.embed_seconds)),
            ("knn_seconds".into(), json!(self.knn_seconds)),
        ]);
        Value::Object(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_follows_magpies_min_similar_uuid_rule() {
        // Rows 0 and 2 are the same direction; 1 is orthogonal; 3 is close to 1 (cosine 0.954,
        // squared L2 0.093) but not within 0.05.
        let e = Tensor::from_slice(&[1f32, 0.0, 0.0, 1.0, 1.0, 0.0, 0.3, 0.95]).view([4, 2]);
        let e = &e / e.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        let result = neighbours(&e, 500);
        assert_eq!(result[0].1, 1);
        assert_eq!(result[0].2, Some(0));
        assert_eq!(result[2].2, Some(0));
        assert!(result[0].0.unwrap() < 1e-3);
        assert_eq!((result[1].1, result[1].2), (0, None));
        assert!(result[1].0.unwrap() > REPEAT_DISTANCE);
    }

    #[test]
    fn distances_are_faiss_index_flat_l2_squared_distances_and_duplicates_are_under_0_05_on_them() {
        // Unit vectors at cosine 0.98 (squared L2 0.04: a near-duplicate for Magpie, though its
        // true L2 of 0.2 is not under 0.05) and 0.97 (0.06: not one) from row 0, and one far off.
        let angles = [0.0f64, 0.98f64.acos(), -(0.97f64.acos()), std::f64::consts::FRAC_PI_2];
        let values: Vec<f32> = angles.iter().flat_map(|a| [a.cos() as f32, a.sin() as f32]).collect();
        let e = Tensor::from_slice(&values).view([4, 2]);
        let result = neighbours(&e, 500);
        // What IndexFlatL2.search returns: the sum of squared differences, nearest first.
        let faiss = |i: usize| {
            (0..4).filter(|&j| j != i).map(|j| (0..2).map(|d| (values[2 * i + d] - values[2 * j + d]).powi(2) as f64).sum::<f64>()).fold(f64::INFINITY, f64::min)
        };
        for (row, (distance, _, _)) in result.iter().enumerate() {
            assert!((distance.unwrap() - faiss(row)).abs() < 1e-5, "row {row}: {distance:?} vs {}", faiss(row));
        }
        assert!((result[0].0.unwrap() - 0.04).abs() < 1e-5);
        assert_eq!(result.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(), [(1, Some(0)), (1, Some(0)), (0, None), (0, None)]);
    }
}

/// Times the kNN alone on random unit vectors: `scripts/bench/filter.sh` runs it for 100K rows.
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn knn_seconds_for_rows_in_env() {
        let rows: i64 = std::env::var("KNN_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(100_000);
        tch::manual_seed(0);
        let e = Tensor::randn([rows, 384], (Kind::Float, tch::Device::Cpu));
        let e = &e / e.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        let start = std::time::Instant::now();
        let result = neighbours(&e, 500);
        println!("knn rows={rows} k=500 seconds={:.1}", start.elapsed().as_secs_f64());
        assert_eq!(result.len(), rows as usize);
    }
}
