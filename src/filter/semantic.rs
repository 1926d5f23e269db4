//! Semantic dedup as Magpie's gen_dis does it. Needs the whole dataset: every instruction is
//! embedded (all-MiniLM-L6-v2, `embed`, in length-sorted batches of each record batch), then a
//! kNN (`knn`) finds each row's k nearest others (k default 500, capped by the row count):
//! exact on the encoder's device (`index: exact`, the default), or an HNSW graph on the CPU
//! (`index: hnsw`, with its recall against exact on a sample in the report). Writes:
//! - `min_neighbor_distance`: the squared L2 distance to the nearest other row (normalised
//!   vectors), the scale of faiss's `IndexFlatL2` that Magpie searches with, so the values match
//!   Magpie's released files;
//! - `repeat_count`: neighbours closer than 0.05 on that scale (cosine above 0.975);
//! - `min_similar_uuid`: the uuid of the earliest row among the row and those neighbours, or
//!   null when it has none. A row is kept when it is its own `min_similar_uuid` or has none.
//!
//! Memory kept for the whole dataset: the embeddings (4 x 384 bytes a row) and the uuids; with
//! `hnsw` also the index (384 bytes a row of int8 copies plus the graph, about 150 bytes a row
//! at connectivity 16: `index_bytes` in the report).

use super::knn::{Embeddings, Hnsw, HnswConfig, Neighbourhood};
use super::step::{Duplicates, Step};
use super::text::{instructions, uuids};
use crate::model::embed::SentenceEncoder;
use anyhow::{bail, Result};
use arrow::array::{BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// Rows embedded per forward pass.
const EMBED_BATCH: usize = 64;

/// Which kNN `semantic_dedup` runs.
#[derive(Clone, Copy, Debug, Default, Deserialize, serde::Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum KnnIndex {
    /// Blocked matrix products on the encoder's device: Magpie's faiss `IndexFlatL2`.
    #[default]
    Exact,
    /// usearch's HNSW graph on the CPU, for datasets where n² is too slow.
    Hnsw,
}

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
    /// Where the encoder runs, and the exact kNN with it: cpu, cuda, cuda:N or auto.
    pub device: crate::flags::DeviceChoice,
    /// The kNN: exact (default) or hnsw.
    pub index: KnnIndex,
    /// The HNSW graph's settings and recall sample (with `index: hnsw`).
    pub hnsw: HnswConfig,
}

impl Default for SemanticDedupConfig {
    fn default() -> Self {
        SemanticDedupConfig { model: None, k: 500, drop: true, device: crate::flags::DeviceChoice::Cpu, index: KnnIndex::Exact, hnsw: HnswConfig::default() }
    }
}

pub struct SemanticDedup {
    encoder: SentenceEncoder,
    device: tch::Device,
    config: SemanticDedupConfig,
    duplicates: Duplicates,
    embeddings: Embeddings,
    uuids: Vec<String>,
    results: Vec<Neighbourhood>,
    applied: usize,
    /// Step timings and the HNSW figures, for the report.
    figures: serde_json::Map<String, Value>,
    embed_seconds: f64,
}

impl SemanticDedup {
    pub fn new(config: SemanticDedupConfig) -> Result<Self> {
        if config.k == 0 {
            bail!("semantic_dedup: k is 0; it must be at least 1");
        }
        config.hnsw.check()?;
        let model = config.model.clone().unwrap_or_else(crate::home::default_embedding_model);
        let device = config.device.resolve(None)?;
        let encoder = SentenceEncoder::load(&model, device)?;
        let embeddings = Embeddings::new(encoder.dimensions());
        let duplicates = Duplicates::new(config.drop, "near duplicate (semantic)", "min_similar_uuid");
        Ok(SemanticDedup { encoder, device, config, duplicates, embeddings, uuids: vec![], results: vec![], applied: 0, figures: Default::default(), embed_seconds: 0.0 })
    }
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
            self.embeddings.push(&tch::Tensor::cat(&chunks, 0).index_select(0, &tch::Tensor::from_slice(&inverse)))?;
        }
        self.embed_seconds += start.elapsed().as_secs_f64();
        self.uuids.extend(uuids(batch));
        Ok(())
    }

    fn finish_scan(&mut self) -> Result<()> {
        let start = std::time::Instant::now();
        let k = self.config.k;
        let hnsw = match self.config.index {
            KnnIndex::Exact => {
                self.results = super::knn::exact(&self.embeddings, k, self.device);
                None
            }
            KnnIndex::Hnsw => {
                let index = Hnsw::build(&self.embeddings, &self.config.hnsw)?;
                self.figures.insert("build_seconds".into(), json!(start.elapsed().as_secs_f64()));
                let found = index.search_all(k)?;
                self.results = super::knn::neighbourhoods(&found);
                Some((index, found))
            }
        };
        self.figures.insert("knn_seconds".into(), json!(start.elapsed().as_secs_f64()));
        if let Some((index, found)) = hnsw {
            self.figures.insert("index_bytes".into(), json!(index.memory_bytes()));
            let recall_start = std::time::Instant::now();
            self.figures.insert("recall".into(), index.recall(&found, k, self.config.hnsw.recall_sample, self.device));
            self.figures.insert("recall_seconds".into(), json!(recall_start.elapsed().as_secs_f64()));
        }
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let rows = self.applied..self.applied + batch.num_rows();
        self.applied = rows.end;
        let results = &self.results[rows.clone()];
        let distance: Float64Array = results.iter().map(|r| r.nearest).collect();
        let repeats: Int64Array = results.iter().map(|r| Some(r.near)).collect();
        let similar: StringArray = results.iter().map(|r| r.earliest.map(|i| self.uuids[i].as_str())).collect();
        let keep: BooleanArray = rows.clone().zip(results).map(|(row, r)| Some(r.earliest.is_none_or(|e| e == row))).collect();
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
            ("k".into(), json!(self.config.k)),
            ("index".into(), json!(self.config.index)),
            ("embed_seconds".into(), json!(self.embed_seconds)),
        ]);
        report.extend(self.figures.clone());
        Value::Object(report)
    }
}

/// Times semantic dedup's embedding and exact kNN, the step's own code, on a corpus:
/// `scripts/gpu-check.sh` runs it on the GPU (EMBED_MODEL: an encoder folder, EMBED_CORPUS: a
/// parquet file with `uuid` and `instruction`, EMBED_DEVICE: cpu or cuda).
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn semantic_dedup_seconds_on_the_corpus_in_env() {
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        let device = var("EMBED_DEVICE").parse().expect("EMBED_DEVICE");
        let mut step = SemanticDedup::new(SemanticDedupConfig { model: Some(var("EMBED_MODEL").into()), device, ..Default::default() }).unwrap();
        let corpus = crate::data::Dataset::open(&[var("EMBED_CORPUS")]).expect("EMBED_CORPUS");
        let mut rows = 0;
        for batch in corpus.batches() {
            let batch = batch.unwrap();
            rows += batch.num_rows();
            step.scan(&batch).unwrap();
        }
        step.finish_scan().unwrap();
        let knn = step.figures["knn_seconds"].as_f64().unwrap();
        println!("semantic_dedup device={device} rows={rows} embed_seconds={:.1} rows_per_second={:.0} knn_seconds={knn:.1}", step.embed_seconds, rows as f64 / step.embed_seconds);
    }
}
