//! MinHash-LSH near-duplicate removal. Needs the whole dataset, kept small: one band-hash vector
//! per row (bands x 8 bytes), not the texts or the signatures.
//!
//! - Word n-grams (default 5) of the normalised instruction; a text shorter than n is one shingle.
//! - Sketches: minhash-rs `MinHash<u32, P>` with P = `num_perm` (64, 128 or 256).
//! - (bands, rows) minimise 0.5·FP + 0.5·FN of the S-curve integrals around the threshold, as
//!   datasketch chooses them (0.7 and 128 give 14 x 9).
//! - Rows sharing any band hash are joined with union-find; the earliest row of each cluster is
//!   kept. `minhash_cluster` holds the uuid of that earliest row on every row.
//!
//! Sketching is parallel over rows and grouping over bands (rayon).

use super::step::Step;
use super::text::{hash64, instructions, normalize, uuids};
use anyhow::{bail, Result};
use arrow::array::{BooleanArray, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use minhash_rs::lsh::band_hash;
use minhash_rs::prelude::{MinHash, MinHasher};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::sync::Arc;

/// ∫ f over [a, b] by Simpson's rule.
fn integrate(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let n = 1000;
    let h = (b - a) / n as f64;
    let sum: f64 = (0..=n)
        .map(|i| {
            let weight = if i == 0 || i == n { 1.0 } else if i % 2 == 1 { 4.0 } else { 2.0 };
            weight * f(a + i as f64 * h)
        })
        .sum();
    sum * h / 3.0
}

/// datasketch's `_optimal_param`: the (bands, rows) with the least weighted error.
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let mut best = (f64::INFINITY, (1, 1));
    for bands in 1..=num_perm {
        for rows in 1..=num_perm / bands {
            let p = |s: f64| 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
            let false_positive = integrate(p, 0.0, threshold);
            let false_negative = integrate(|s| 1.0 - p(s), threshold, 1.0);
            let error = 0.5 * false_positive + 0.5 * false_negative;
            if error < best.0 {
                best = (error, (bands, rows));
            }
        }
    }
    best.1
}

/// The word n-gram shingles of `text`'s normal form, hashed.
pub fn shingles(text: &str, ngram: usize) -> Vec<u64> {
    let normal = normalize(text);
    let words: Vec<&str> = normal.split(' ').filter(|w| !w.is_empty()).collect();
    if words.len() <= ngram {
        return vec![hash64(&words)];
    }
    words.windows(ngram).map(hash64).collect()
}

fn signature_of<const P: usize>(shingles: &[u64]) -> Vec<u32> {
    let mut sketch = MinHash::<u32, P>::new();
    for &s in shingles {
        sketch.insert(s);
    }
    sketch.into_words().to_vec()
}

/// The MinHash signature of a shingle set.
pub fn signature(shingles: &[u64], num_perm: usize) -> Vec<u32> {
    match num_perm {
        64 => signature_of::<64>(shingles),
        128 => signature_of::<128>(shingles),
        256 => signature_of::<256>(shingles),
        _ => unreachable!("checked in MinhashDedup::new"),
    }
}

/// Union-find with path halving; roots are the smallest index, so a cluster's root is its
/// earliest row.
pub struct Clusters(Vec<u32>);

impl Clusters {
    pub fn new(n: usize) -> Self {
        Clusters((0..n as u32).collect())
    }
    pub fn find(&mut self, mut i: u32) -> u32 {
        while self.0[i as usize] != i {
            let parent = self.0[i as usize];
            self.0[i as usize] = self.0[parent as usize];
            i = parent;
        }
        i
    }
    pub fn union(&mut self, a: u32, b: u32) {
        let (a, b) = (self.find(a), self.find(b));
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        self.0[high as usize] = low;
    }
}

/// Groups rows by band hash and joins each group: the LSH candidate pairs, clustered.
pub fn cluster(band_hashes: &[Vec<u64>], bands: usize) -> Clusters {
    let n = band_hashes.len();
    let groups: Vec<Vec<(u64, u32)>> = (0..bands)
        .into_par_iter()
        .map(|band| {
            let mut keyed: Vec<(u64, u32)> = band_hashes.iter().enumerate().map(|(row, h)| (h[band], row as u32)).collect();
            keyed.par_sort_unstable();
            keyed
        })
        .collect();
    let mut clusters = Clusters::new(n);
    for keyed in groups {
        for pair in keyed.windows(2) {
            if pair[0].0 == pair[1].0 {
                clusters.union(pair[0].1, pair[1].1);
            }
        }
    }
    clusters
}

pub struct MinhashDedup {
    ngram: usize,
    num_perm: usize,
    bands: usize,
    rows: usize,
    drop: bool,
    band_hashes: Vec<Vec<u64>>,
    uuids: Vec<String>,
    /// Root row of each row, after `finish_scan`.
    roots: Vec<u32>,
    applied: usize,
    duplicates: u64,
    clusters: u64,
}

impl MinhashDedup {
    pub fn new(ngram: usize, num_perm: usize, threshold: f64, drop: bool) -> Result<Self> {
        if ![64, 128, 256].contains(&num_perm) {
            bail!("minhash_dedup: num_perm must be 64, 128 or 256, got {num_perm}");
        }
        if !(0.0 < threshold && threshold < 1.0) || ngram == 0 {
            bail!("minhash_dedup: threshold must be in (0, 1) and ngram at least 1");
        }
        let (bands, rows) = optimal_bands(threshold, num_perm);
        Ok(MinhashDedup { ngram, num_perm, bands, rows, drop, band_hashes: vec![], uuids: vec![], roots: vec![], applied: 0, duplicates: 0, clusters: 0 })
    }

    /// Band hashes of one text.
    fn bands_of(&self, text: &str) -> Vec<u64> {
        let signature = signature(&shingles(text, self.ngram), self.num_perm);
        signature.chunks(self.rows).take(self.bands).map(band_hash).collect()
    }
}

impl Step for MinhashDedup {
    fn name(&self) -> &'static str {
        "minhash_dedup"
    }

    fn needs_scan(&self) -> bool {
        true
    }

    fn scan(&mut self, batch: &RecordBatch) -> Result<()> {
        let texts = instructions(batch);
        let hashed: Vec<Vec<u64>> = texts.par_iter().map(|t| self.bands_of(t.as_deref().unwrap_or(""))).collect();
        self.band_hashes.extend(hashed);
        self.uuids.extend(uuids(batch));
        Ok(())
    }

    fn finish_scan(&mut self) -> Result<()> {
        let mut clusters = cluster(&self.band_hashes, self.bands);
        self.band_hashes = vec![];
        self.roots = (0..self.uuids.len() as u32).map(|i| clusters.find(i)).collect();
        self.clusters = self.roots.iter().enumerate().filter(|(i, r)| *i as u32 == **r).count() as u64;
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let rows = self.applied..self.applied + batch.num_rows();
        self.applied = rows.end;
        let cluster: StringArray = rows.clone().map(|i| Some(self.uuids[self.roots[i] as usize].as_str())).collect();
        let keep: BooleanArray = rows.map(|i| Some(self.roots[i] as usize == i)).collect();
        self.duplicates += keep.false_count() as u64;
        let batch = super::with_column(batch, "minhash_cluster", Arc::new(cluster))?;
        Ok(if self.drop { filter_record_batch(&batch, &keep)? } else { batch })
    }

    fn report(&self) -> Value {
        json!({
            "bands": self.bands, "rows_per_band": self.rows, "clusters": self.clusters,
            "duplicates": self.duplicates, "dropped": if self.drop { self.duplicates } else { 0 },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_choice_matches_datasketch() {
        assert_eq!(optimal_bands(0.7, 128), (14, 9));
        assert_eq!(optimal_bands(0.8, 128), (9, 13));
    }

    #[test]
    fn planted_near_duplicates_cluster_and_distinct_texts_do_not() {
        let dedup = MinhashDedup::new(5, 128, 0.7, true).unwrap();
        let base = "please write a detailed step by step guide explaining how to bake sourdough bread at home for complete beginners who only have simple kitchen tools and a small oven and want to understand why each step of the process matters for the final loaf";
        let texts = [
            base.to_string(),
            base.trim_end_matches(" loaf").to_string(), // last word dropped
            base.to_uppercase(),                        // case
            "explain the difference between a list and a tuple in python with examples of when to use each one in real code".to_string(),
        ];
        let hashes: Vec<Vec<u64>> = texts.iter().map(|t| dedup.bands_of(t)).collect();
        let mut clusters = cluster(&hashes, dedup.bands);
        let roots: Vec<u32> = (0..4).map(|i| clusters.find(i)).collect();
        assert_eq!(roots, [0, 0, 0, 3]);
    }
}
