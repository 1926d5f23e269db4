//! The k-nearest-neighbour search behind semantic dedup, over L2-normalised embeddings kept as
//! one row-major `f32` buffer (4 x d bytes a row).
//! - `exact`: blocked matrix products with a top-k per block, on the encoder's device (CPU or
//!   CUDA). A block holds at most `BLOCK_ELEMENTS` similarities, so 1M x 1M runs in 1 GiB blocks.
//! - `approximate`: an HNSW graph (usearch) over copies of the rows in `quantization`'s scalar
//!   (int8: d bytes a row, f16: 2 x d) plus the graph, built in parallel. Candidates are
//!   re-ranked with exact `f32` distances, and the search widens (16, 64, 256, then k) only
//!   while every neighbour it found is a near duplicate, so rows without duplicates cost one
//!   small search. The near duplicates the graph misses, `lsh`'s buckets add.
//! - `recall`: the approximate result against the exact one on a sample of rows.
//!
//! Both searches give each row a `Neighbourhood`: what the step writes.

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

/// Magpie's near-duplicate distance, in squared L2 (`IndexFlatL2`'s scale).
pub const REPEAT_DISTANCE: f64 = 0.05;

/// Similarities per block of the exact product (1 GiB of `f32`).
const BLOCK_ELEMENTS: usize = 1 << 28;

/// The first width of an approximate search; it grows fourfold up to k.
const FIRST_WIDTH: usize = 16;

/// One row's neighbours, as the step writes them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbourhood {
    /// Squared L2 distance to the nearest other row (None when there is no other row).
    pub nearest: Option<f64>,
    /// Neighbours among the k nearest closer than `REPEAT_DISTANCE`.
    pub near: i64,
    /// The earliest row among the row and those neighbours (None when it has none).
    pub earliest: Option<usize>,
}

/// Unit-length embeddings, row after row.
pub struct Embeddings {
    values: Vec<f32>,
    dimensions: usize,
}

impl Embeddings {
    pub fn new(dimensions: usize) -> Embeddings {
        Embeddings { values: vec![], dimensions }
    }

    /// Appends a `[rows, d]` tensor's rows (any device).
    pub fn push(&mut self, rows: &Tensor) -> Result<()> {
        let size = rows.size();
        anyhow::ensure!(size.len() == 2 && size[1] as usize == self.dimensions, "embeddings of shape {size:?}, expected [_, {}]", self.dimensions);
        let rows = rows.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        self.values.extend(Vec::<f32>::try_from(rows.flatten(0, -1))?);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.values.len() / self.dimensions
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub(super) fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dimensions..(i + 1) * self.dimensions]
    }

    pub(super) fn squared_distance(&self, a: usize, b: usize) -> f64 {
        self.row(a).iter().zip(self.row(b)).map(|(x, y)| ((x - y) * (x - y)) as f64).sum()
    }

    /// Runs `f` on the rows as a `[n, d]` CPU tensor that borrows the buffer.
    pub(super) fn with_tensor<R>(&self, f: impl FnOnce(&Tensor) -> R) -> R {
        let size = [self.len() as i64, self.dimensions as i64];
        // SAFETY: the tensor views `self.values`, which outlives it (it is dropped inside this
        // call) and is not written while it lives.
        let view = unsafe { Tensor::from_blob(self.values.as_ptr() as *const u8, &size, &[size[1], 1], Kind::Float, Device::Cpu) };
        f(&view)
    }
}

/// Query rows per block of the exact product, against n rows.
fn block_rows(n: usize) -> usize {
    (BLOCK_ELEMENTS / n.max(1)).clamp(1, 4096)
}

/// Rows of `queries` and their k nearest other rows of `e`, nearest first, by blocked products
/// on `device`.
fn exact_lists(e: &Embeddings, queries: &[usize], k: usize, device: Device) -> Vec<Vec<(f64, usize)>> {
    let n = e.len();
    let k = k.min(n.saturating_sub(1));
    if k == 0 {
        return vec![vec![]; queries.len()];
    }
    let mut lists = Vec::with_capacity(queries.len());
    tch::no_grad(|| {
        e.with_tensor(|rows| {
            let all = rows.to_device(device);
            let all_t = all.transpose(0, 1);
            for part in queries.chunks(block_rows(n)) {
                let index: Vec<i64> = part.iter().map(|&q| q as i64).collect();
                let own = Tensor::from_slice(&index).to_device(device);
                let sims = all.index_select(0, &own).matmul(&all_t);
                // Never one's own neighbour.
                let sims = sims.scatter_value(1, &own.unsqueeze(1), f64::NEG_INFINITY);
                let (top, found) = sims.topk(k as i64, 1, true, true);
                let squared: Tensor = (top * -2.0) + 2.0;
                let distances = Vec::<f64>::try_from(squared.clamp_min(0.0).to_kind(Kind::Double).flatten(0, -1)).unwrap();
                let found = Vec::<i64>::try_from(found.flatten(0, -1)).unwrap();
                for r in 0..part.len() {
                    lists.push((0..k).map(|j| (distances[r * k + j], found[r * k + j] as usize)).collect());
                }
            }
        })
    });
    lists
}

/// Every row's neighbourhood among its k nearest, exactly (`device`: where the products run).
pub fn exact(e: &Embeddings, k: usize, device: Device) -> Vec<Neighbourhood> {
    let rows: Vec<usize> = (0..e.len()).collect();
    let mut out = Vec::with_capacity(rows.len());
    // Lists for a few blocks at a time: k pairs a row.
    for part in rows.chunks(block_rows(e.len()) * 4) {
        let lists = exact_lists(e, part, k, device);
        out.extend(part.iter().zip(lists).map(|(&row, list)| Found::from_sorted(list).neighbourhood(row)));
    }
    out
}

/// `hnsw` in `semantic_dedup`'s config: usearch's graph settings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HnswConfig {
    /// Edges per node (HNSW's M).
    pub connectivity: usize,
    /// Candidates kept while inserting (efConstruction).
    pub expansion_add: usize,
    /// Candidates kept while searching (ef; raised to the search's width when that is larger).
    pub expansion_search: usize,
    /// The scalar the graph keeps its copies of the rows in.
    pub quantization: Quantization,
    /// Rows whose approximate neighbours are checked against exact ones (0: no check).
    pub recall_sample: usize,
}

/// The graph's copy of a row: usearch scales a unit row by 127 into int8 (about 6 levels a
/// component for 384-d rows); f16 keeps 11 bits.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    I8,
    F16,
    F32,
}

impl Quantization {
    fn scalar(self) -> usearch::ScalarKind {
        match self {
            Quantization::I8 => usearch::ScalarKind::I8,
            Quantization::F16 => usearch::ScalarKind::F16,
            Quantization::F32 => usearch::ScalarKind::F32,
        }
    }
}

impl HnswConfig {
    /// Refuses settings that build no usable graph, naming the key.
    pub fn check(&self) -> Result<()> {
        let limits = [("connectivity", self.connectivity, 2), ("expansion_add", self.expansion_add, 1), ("expansion_search", self.expansion_search, 1)];
        match limits.iter().find(|(_, value, least)| value < least) {
            Some((key, value, least)) => bail!("semantic_dedup: hnsw.{key} is {value}; it must be at least {least}"),
            None => Ok(()),
        }
    }
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig { connectivity: 16, expansion_add: 128, expansion_search: 64, quantization: Quantization::I8, recall_sample: 1000 }
    }
}

/// An HNSW graph over the rows of `Embeddings`, keyed by row number.
pub struct Hnsw<'e> {
    index: usearch::Index,
    embeddings: &'e Embeddings,
}

impl<'e> Hnsw<'e> {
    /// Builds the graph on rayon's threads.
    pub fn build(e: &'e Embeddings, config: &HnswConfig) -> Result<Hnsw<'e>> {
        let options = usearch::IndexOptions {
            dimensions: e.dimensions,
            metric: usearch::MetricKind::L2sq,
            quantization: config.quantization.scalar(),
            connectivity: config.connectivity,
            expansion_add: config.expansion_add,
            expansion_search: config.expansion_search,
            multi: false,
        };
        let index = usearch::Index::new(&options).context("usearch: creating the index")?;
        index.reserve_capacity_and_threads(e.len(), rayon::current_num_threads()).context("usearch: reserving the index")?;
        (0..e.len()).into_par_iter().try_for_each(|i| index.add(i as u64, e.row(i)).with_context(|| format!("usearch: adding row {i}")))?;
        Ok(Hnsw { index, embeddings: e })
    }

    /// Bytes the index holds (quantized rows and graph), beside the `f32` embeddings.
    pub fn memory_bytes(&self) -> usize {
        self.index.memory_usage()
    }

    /// `row`'s nearest other rows (at most k), nearest first, with exact distances: as many as
    /// the first width gives, widened while all of them are near duplicates.
    fn search(&self, row: usize, k: usize) -> Result<Vec<(f64, usize)>> {
        let k = k.min(self.embeddings.len().saturating_sub(1));
        let mut width = FIRST_WIDTH.min(k);
        loop {
            let found = self.index.search(self.embeddings.row(row), width + 1).with_context(|| format!("usearch: searching row {row}"))?;
            let mut list: Vec<(f64, usize)> = found.keys.iter().map(|&j| j as usize).filter(|&j| j != row).map(|j| (self.embeddings.squared_distance(row, j), j)).collect();
            list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            list.truncate(width);
            let all_near = list.len() == width && list.last().is_some_and(|p| p.0 < REPEAT_DISTANCE);
            if !all_near || width >= k {
                return Ok(list);
            }
            width = (width * 4).min(k);
        }
    }

    /// Every row's nearest other row and near duplicates (at most k), on rayon's threads, with
    /// the near duplicates `lsh` finds added. Distance is symmetric, so a pair found from either
    /// side counts for both.
    pub fn search_all(&self, k: usize) -> Result<Vec<Found>> {
        let mut found: Vec<Found> = (0..self.embeddings.len())
            .into_par_iter()
            .map(|row| {
                Ok(Found::from_sorted(self.search(row, k)?))
            })
            .collect::<Result<_>>()?;
        // The pairs in lsh's buckets, and every pair the graph found, from its other side.
        let mut more = super::lsh::near_lists(self.embeddings, k);
        for (row, f) in found.iter().enumerate() {
            for &(distance, other) in f.near.iter().chain(&f.nearest) {
                more[other].push((distance, row));
            }
        }
        found.par_iter_mut().zip(more).for_each(|(f, extra)| {
            for (distance, other) in extra {
                if distance < REPEAT_DISTANCE && !f.near.iter().any(|p| p.1 == other) {
                    f.near.push((distance, other));
                }
                if f.nearest.is_none_or(|n| distance < n.0) {
                    f.nearest = Some((distance, other));
                }
            }
            f.near.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            f.near.truncate(k);
        });
        Ok(found)
    }

    /// `found` against exact kNN on `sample` rows spread over the data: the share of the exact
    /// near duplicates among the k nearest that were found (the neighbours that decide the
    /// output), the share of rows whose nearest neighbour was found, and how much farther the
    /// nearest found is than the true nearest (mean relative excess of `min_neighbor_distance`).
    pub fn recall(&self, found: &[Found], k: usize, sample: usize, device: Device) -> Value {
        let n = self.embeddings.len();
        let sample = sample.min(n);
        if sample == 0 {
            return json!(null);
        }
        let rows = sample_rows(n, sample);
        let exact = exact_lists(self.embeddings, &rows, k, device);
        let (mut wanted, mut hits, mut nearest, mut excess) = (0usize, 0usize, 0usize, 0f64);
        for (&row, truth) in rows.iter().zip(&exact) {
            let truth_near: Vec<usize> = truth.iter().take_while(|p| p.0 < REPEAT_DISTANCE).map(|p| p.1).collect();
            wanted += truth_near.len();
            hits += truth_near.iter().filter(|&&j| found[row].near.iter().any(|p| p.1 == j)).count();
            nearest += match (truth.first(), found[row].nearest) {
                (Some(t), Some(a)) => {
                    excess += (a.0 - t.0) / t.0.max(1e-12);
                    (a.0 - t.0 <= 1e-6) as usize // a tie at the nearest distance counts as found
                }
                (None, None) => 1,
                _ => 0,
            };
        }
        json!({
            "sample": sample,
            "near_duplicates": if wanted == 0 { 1.0 } else { hits as f64 / wanted as f64 },
            "near_duplicates_exact": wanted,
            "nearest": nearest as f64 / sample as f64,
            "nearest_distance_excess": excess / sample as f64,
        })
    }
}

/// `sample` rows of `0..n`, one from each of `sample` equal stretches at a hashed offset: spread
/// over the data, and never in step with a period in it (evenly spaced rows of data where every
/// fifth row is a copy would all be copies).
fn sample_rows(n: usize, sample: usize) -> Vec<usize> {
    (0..sample).map(|s| {
        let (start, end) = (s * n / sample, (s + 1) * n / sample);
        start + (crate::seed::mix(s as u64) % (end - start) as u64) as usize
    }).collect()
}

/// What a search keeps of a row: its nearest other row and its near duplicates
/// (at most k, nearest first), with exact squared distances.
#[derive(Clone, Debug, Default)]
pub struct Found {
    nearest: Option<(f64, usize)>,
    near: Vec<(f64, usize)>,
}

impl Found {
    /// From a row's other rows, nearest first: (squared distance, row), at most k of them.
    fn from_sorted(sorted: Vec<(f64, usize)>) -> Found {
        Found { nearest: sorted.first().copied(), near: sorted.into_iter().take_while(|p| p.0 < REPEAT_DISTANCE).collect() }
    }

    pub fn neighbourhood(&self, row: usize) -> Neighbourhood {
        let earliest = (!self.near.is_empty()).then(|| self.near.iter().map(|p| p.1).chain([row]).min().unwrap());
        Neighbourhood { nearest: self.nearest.map(|p| p.0), near: self.near.len() as i64, earliest }
    }
}

/// Rows' neighbourhoods from what the approximate search found.
pub fn neighbourhoods(found: &[Found]) -> Vec<Neighbourhood> {
    found.iter().enumerate().map(|(row, f)| f.neighbourhood(row)).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    impl Embeddings {
        pub(crate) fn set_row(&mut self, i: usize, values: &[f32]) {
            self.values[i * self.dimensions..(i + 1) * self.dimensions].copy_from_slice(values);
        }
    }

    fn embeddings(values: &[f32], d: usize) -> Embeddings {
        let mut e = Embeddings::new(d);
        let t = Tensor::from_slice(values).view([-1, d as i64]);
        e.push(&(&t / t.norm_scalaropt_dim(2, [1i64].as_slice(), true))).unwrap();
        e
    }

    /// n random unit vectors in d dimensions, every fifth one a near copy of an earlier row.
    pub(crate) fn planted(n: usize, d: usize, seed: i64) -> (Embeddings, Vec<(usize, usize)>) {
        tch::manual_seed(seed);
        let mut rows = Tensor::randn([n as i64, d as i64], (Kind::Float, Device::Cpu));
        let mut pairs = vec![];
        for i in (5..n).step_by(5) {
            let j = ((i as u64).wrapping_mul(2_654_435_761) >> 8) as usize % i;
            let copy = rows.get(j as i64) + Tensor::randn([d as i64], (Kind::Float, Device::Cpu)) * 0.01;
            rows.get(i as i64).copy_(&copy);
            pairs.push((j, i));
        }
        rows = &rows / rows.norm_scalaropt_dim(2, [1i64].as_slice(), true);
        let mut e = Embeddings::new(d);
        e.push(&rows).unwrap();
        (e, pairs)
    }

    #[test]
    fn hnsw_settings_that_build_no_graph_are_refused_naming_the_key() {
        assert!(HnswConfig::default().check().is_ok());
        for (key, config) in [("connectivity", HnswConfig { connectivity: 1, ..Default::default() }),
                              ("expansion_add", HnswConfig { expansion_add: 0, ..Default::default() }),
                              ("expansion_search", HnswConfig { expansion_search: 0, ..Default::default() })] {
            let err = config.check().unwrap_err().to_string();
            assert!(err.contains(&format!("hnsw.{key} is")), "{err}");
        }
    }

    #[test]
    fn knn_follows_magpies_min_similar_uuid_rule() {
        // Rows 0 and 2 are the same direction; 1 is orthogonal; 3 is close to 1 (cosine 0.954,
        // squared L2 0.093) but not within 0.05.
        let e = embeddings(&[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.3, 0.95], 2);
        let result = exact(&e, 500, Device::Cpu);
        assert_eq!((result[0].near, result[0].earliest), (1, Some(0)));
        assert_eq!(result[2].earliest, Some(0));
        assert!(result[0].nearest.unwrap() < 1e-3);
        assert_eq!((result[1].near, result[1].earliest), (0, None));
        assert!(result[1].nearest.unwrap() > REPEAT_DISTANCE);
    }

    #[test]
    fn distances_are_faiss_index_flat_l2_squared_distances_and_duplicates_are_under_0_05_on_them() {
        // Unit vectors at cosine 0.98 (squared L2 0.04: a near-duplicate for Magpie, though its
        // true L2 of 0.2 is not under 0.05) and 0.97 (0.06: not one) from row 0, and one far off.
        let angles = [0.0f64, 0.98f64.acos(), -(0.97f64.acos()), std::f64::consts::FRAC_PI_2];
        let values: Vec<f32> = angles.iter().flat_map(|a| [a.cos() as f32, a.sin() as f32]).collect();
        let e = embeddings(&values, 2);
        let result = exact(&e, 500, Device::Cpu);
        // What IndexFlatL2.search returns: the sum of squared differences, nearest first.
        let faiss = |i: usize| {
            (0..4).filter(|&j| j != i).map(|j| (0..2).map(|d| (values[2 * i + d] - values[2 * j + d]).powi(2) as f64).sum::<f64>()).fold(f64::INFINITY, f64::min)
        };
        for (row, found) in result.iter().enumerate() {
            assert!((found.nearest.unwrap() - faiss(row)).abs() < 1e-5, "row {row}: {:?} vs {}", found.nearest, faiss(row));
        }
        assert!((result[0].nearest.unwrap() - 0.04).abs() < 1e-5);
        assert_eq!(result.iter().map(|r| (r.near, r.earliest)).collect::<Vec<_>>(), [(1, Some(0)), (1, Some(0)), (0, None), (0, None)]);
    }

    #[test]
    fn recall_samples_one_row_a_stretch_out_of_step_with_a_period_in_the_data() {
        let rows = sample_rows(1000, 100);
        assert!(rows.iter().enumerate().all(|(s, &r)| (s * 10..s * 10 + 10).contains(&r)), "{rows:?}");
        let fifths = rows.iter().filter(|&&r| r % 5 == 0).count();
        assert!((5..=40).contains(&fifths), "{fifths} of 100 sampled rows are multiples of 5");
        assert_eq!(sample_rows(7, 7), (0..7).collect::<Vec<_>>());
        assert_eq!(sample_rows(1000, 100), rows);
    }

    #[test]
    fn a_single_row_has_no_neighbours() {
        let e = embeddings(&[1.0, 0.0], 2);
        let alone = [Neighbourhood { nearest: None, near: 0, earliest: None }];
        assert_eq!(exact(&e, 500, Device::Cpu), alone);
        let index = Hnsw::build(&e, &HnswConfig::default()).unwrap();
        assert_eq!(neighbourhoods(&index.search_all(500).unwrap()), alone);
    }

    #[test]
    fn hnsw_finds_every_planted_near_duplicate_and_has_high_recall_on_5000_random_unit_vectors() {
        let (e, pairs) = planted(5000, 384, 0);
        let index = Hnsw::build(&e, &HnswConfig::default()).unwrap();
        let lists = index.search_all(500).unwrap();
        let found = neighbourhoods(&lists);
        for &(original, copy) in &pairs {
            assert_eq!(found[copy].earliest, Some(found[original].earliest.unwrap()), "pair ({original}, {copy}) not joined");
        }
        let recall = index.recall(&lists, 500, 5000, Device::Cpu);
        assert_eq!(recall["sample"], 5000);
        assert!(recall["near_duplicates"].as_f64().unwrap() >= 0.99, "{recall}");
        assert!(recall["nearest"].as_f64().unwrap() >= 0.9, "{recall}");
        // Where the index finds the exact neighbours, it gives exactly the exact step's values.
        let truth = exact(&e, 500, Device::Cpu);
        let same = found.iter().zip(&truth).filter(|(a, b)| (a.near, a.earliest) == (b.near, b.earliest) && (a.nearest.unwrap() - b.nearest.unwrap()).abs() < 1e-5).count();
        assert!(same as f64 >= 0.9 * 5000.0, "{same} of 5000 rows as exact");
    }

    #[test]
    fn an_f16_graph_keeps_its_rows_in_f16_and_joins_every_planted_pair() {
        let (e, pairs) = planted(2000, 384, 3);
        let int8 = Hnsw::build(&e, &HnswConfig::default()).unwrap();
        let config: HnswConfig = serde_json::from_str(r#"{"quantization": "f16"}"#).unwrap();
        let f16 = Hnsw::build(&e, &config).unwrap();
        let found = neighbourhoods(&f16.search_all(500).unwrap());
        assert!(pairs.iter().all(|&(a, b)| found[b].earliest.is_some() && found[b].earliest == found[a].earliest));
        assert!(f16.index.scalar_kind() == usearch::ScalarKind::F16 && int8.index.scalar_kind() == usearch::ScalarKind::I8);
        assert!(serde_json::from_str::<HnswConfig>(r#"{"quantization": "int4"}"#).unwrap_err().to_string().contains("unknown variant `int4`"));
    }

    #[test]
    fn a_search_widens_past_its_first_width_when_a_row_has_more_near_duplicates() {
        // 40 copies of one direction (more than the first width of 16) and 60 others.
        let (mut rows, _) = planted(100, 16, 1);
        let first = rows.row(0).to_vec();
        for i in 0..40 {
            let start = i * 16;
            rows.values[start..start + 16].copy_from_slice(&first);
        }
        // Inserted from several threads, the graph may leave a copy or two unreachable (HNSW
        // prunes edges between equal rows), so the widening is checked on a graph built on one.
        let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let sequential = one_thread.install(|| Hnsw::build(&rows, &HnswConfig::default())).unwrap();
        let near = sequential.search(0, 500).unwrap().iter().filter(|p| p.0 < REPEAT_DISTANCE).count();
        assert!(near > FIRST_WIDTH, "{near} near duplicates found from row 0");
        // With lsh's buckets and both sides of each pair, every copy finds all the others.
        let index = Hnsw::build(&rows, &HnswConfig::default()).unwrap();
        let found = neighbourhoods(&index.search_all(500).unwrap());
        assert!(found[..40].iter().all(|r| r.near == 39 && r.earliest == Some(0)), "{:?}", &found[..3]);
        let truth = exact(&rows, 500, Device::Cpu);
        assert!(found[..40].iter().zip(&truth).all(|(a, b)| (a.near, a.earliest) == (b.near, b.earliest)));
    }

    #[test]
    fn on_cuda_the_exact_knn_finds_the_neighbours_of_the_cpu() {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device");
            return;
        }
        let (e, _) = planted(3000, 384, 2);
        let (cpu, cuda) = (exact(&e, 500, Device::Cpu), exact(&e, 500, Device::Cuda(0)));
        for (row, (a, b)) in cpu.iter().zip(&cuda).enumerate() {
            assert_eq!((a.near, a.earliest), (b.near, b.earliest), "row {row}");
            assert!((a.nearest.unwrap() - b.nearest.unwrap()).abs() < 1e-4, "row {row}");
        }
    }
}

/// Times the kNN on random unit vectors with planted near duplicates:
/// `scripts/bench/filter-1m.sh` runs it (KNN_ROWS, KNN_INDEX=exact|hnsw, KNN_HNSW: the `hnsw`
/// config as JSON, over the defaults), and `scripts/gpu-check.sh` with KNN_DEVICE=cuda (where
/// the exact products and the recall check run; cpu by default).
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore]
    fn knn_seconds_for_rows_in_env() {
        let rows: usize = std::env::var("KNN_ROWS").ok().and_then(|r| r.parse().ok()).unwrap_or(100_000);
        let index = std::env::var("KNN_INDEX").unwrap_or_else(|_| "exact".into());
        let device = std::env::var("KNN_DEVICE").unwrap_or_else(|_| "cpu".into()).parse::<crate::flags::DeviceChoice>().expect("KNN_DEVICE").resolve(None).unwrap();
        let (e, pairs) = tests::planted(rows, 384, 0);
        let start = std::time::Instant::now();
        let (found, detail) = if index == "hnsw" {
            let config: HnswConfig = serde_json::from_str(&std::env::var("KNN_HNSW").unwrap_or_else(|_| "{}".into())).expect("KNN_HNSW");
            let hnsw = Hnsw::build(&e, &config).unwrap();
            let built = start.elapsed().as_secs_f64();
            let lists = hnsw.search_all(500).unwrap();
            let searched = start.elapsed().as_secs_f64() - built;
            let recall_start = std::time::Instant::now();
            let recall = hnsw.recall(&lists, 500, config.recall_sample, device);
            let found = neighbourhoods(&lists);
            let recall_seconds = recall_start.elapsed().as_secs_f64();
            let lsh_start = std::time::Instant::now(); // the search's lsh part, again on its own
            let _ = crate::filter::lsh::near_lists(&e, 500);
            let detail = format!("hnsw={} build_seconds={built:.1} search_seconds={searched:.1} (of which lsh_seconds={:.1}) index_bytes={} recall={recall} recall_seconds={recall_seconds:.1}", serde_json::to_string(&config).unwrap(),
                                 lsh_start.elapsed().as_secs_f64(), hnsw.memory_bytes());
            (found, detail)
        } else {
            (exact(&e, 500, device), format!("device={device:?}"))
        };
        let joined = pairs.iter().filter(|&&(a, b)| found[b].earliest.is_some() && found[b].earliest == found[a].earliest).count();
        println!("knn index={index} rows={rows} k=500 planted_pairs_joined={joined}/{} {detail} total_seconds={:.1}", pairs.len(), start.elapsed().as_secs_f64());
    }
}
