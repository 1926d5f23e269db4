//! MinHash-LSH near-duplicate removal. Needs the whole dataset, kept small: per row its band
//! hashes (bands x 8 bytes) and, to verify candidates, its signature's low 16 bits per
//! permutation (2 x num_perm bytes), not the texts.
//!
//! - Word n-grams (default 5) of the normalised instruction; a text shorter than n is one shingle.
//! - Sketches: minhash-rs `MinHash<u32, P>` with P = `num_perm` (64, 128 or 256).
//! - (bands, rows) minimise the weighted FP and FN integrals of the S-curve around the threshold,
//!   as datasketch chooses them. Plain LSH weighs both 0.5 (0.7 and 128 give 14 x 9) and then
//!   finds fewer than half of the pairs right at the threshold. So by default (`verify: true`)
//!   the bands favour recall (weights 0.1 / 0.9: 20 x 6) and every candidate pair is checked on
//!   its signatures: joined only if the estimated Jaccard is at least the threshold minus one
//!   standard error of the estimate. `verify: false` is plain datasketch-style LSH.
//! - Rows sharing a band hash are joined with union-find; the earliest row of each cluster is
//!   kept. `minhash_cluster` holds the uuid of that earliest row on every row.
//!
//! Sketching is parallel over rows and grouping over bands (rayon).

use super::step::Step;
use super::text::{hash64, instructions, normalize, uuids};
use anyhow::{bail, Result};
use super::step::Duplicates;
use arrow::array::{BooleanArray, RecordBatch, StringArray};
use minhash_rs::lsh::band_hash;
use minhash_rs::prelude::{MinHash, MinHasher};
use rayon::prelude::*;
use serde::Deserialize;
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

/// datasketch's `_optimal_param` with equal weights.
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    optimal_bands_weighted(threshold, num_perm, 0.5, 0.5)
}

/// datasketch's `_optimal_param`: the (bands, rows) with the least weighted error.
pub fn optimal_bands_weighted(threshold: f64, num_perm: usize, fp_weight: f64, fn_weight: f64) -> (usize, usize) {
    let mut best = (f64::INFINITY, (1, 1));
    for bands in 1..=num_perm {
        for rows in 1..=num_perm / bands {
            let p = |s: f64| 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
            let false_positive = integrate(p, 0.0, threshold);
            let false_negative = integrate(|s| 1.0 - p(s), threshold, 1.0);
            let error = fp_weight * false_positive + fn_weight * false_negative;
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

/// Decides whether two candidate rows are near duplicates.
pub type Verify<'a> = &'a (dyn Fn(u32, u32) -> bool + Sync);

/// Groups rows by band hash and joins the rows of each group that `verify` accepts (each row is
/// compared with the group's members up to 64 back): the LSH candidate pairs, clustered.
pub fn cluster(band_hashes: &[Vec<u64>], bands: usize, verify: Verify) -> Clusters {
    let n = band_hashes.len();
    let edges: Vec<Vec<(u32, u32)>> = (0..bands)
        .into_par_iter()
        .map(|band| {
            let mut keyed: Vec<(u64, u32)> = band_hashes.iter().enumerate().map(|(row, h)| (h[band], row as u32)).collect();
            keyed.par_sort_unstable();
            let mut edges = vec![];
            let mut start = 0;
            for end in 1..=keyed.len() {
                if end < keyed.len() && keyed[end].0 == keyed[start].0 {
                    continue;
                }
                let group = &keyed[start..end];
                for (i, &(_, b)) in group.iter().enumerate().skip(1) {
                    if let Some(&(_, a)) = group[i.saturating_sub(64)..i].iter().find(|&&(_, a)| verify(a, b)) {
                        edges.push((a, b));
                    }
                }
                start = end;
            }
            edges
        })
        .collect();
    let mut clusters = Clusters::new(n);
    for (a, b) in edges.into_iter().flatten() {
        clusters.union(a, b);
    }
    clusters
}

/// `minhash_dedup` in a recipe; the defaults are datatrove's and Magpie's.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinhashDedupConfig {
    /// Word n-gram size of the shingles.
    pub ngram: usize,
    /// Hash functions per signature: 64, 128 or 256.
    pub num_perm: usize,
    /// Jaccard similarity above which two rows are near duplicates.
    pub threshold: f64,
    /// Drop the duplicates (false: keep them, marked).
    pub drop: bool,
    /// Check LSH candidates on their signatures (see the module docs); false is plain LSH.
    pub verify: bool,
}

impl Default for MinhashDedupConfig {
    fn default() -> Self {
        MinhashDedupConfig { ngram: 5, num_perm: 128, threshold: 0.7, drop: true, verify: true }
    }
}

pub struct MinhashDedup {
    ngram: usize,
    num_perm: usize,
    bands: usize,
    rows: usize,
    duplicates: Duplicates,
    threshold: f64,
    verify: bool,
    band_hashes: Vec<Vec<u64>>,
    /// Low 16 bits of each signature register, `num_perm` per row (only with `verify`).
    registers: Vec<u16>,
    uuids: Vec<String>,
    /// Root row of each row, after `finish_scan`.
    roots: Vec<u32>,
    applied: usize,
    clusters: u64,
}

impl MinhashDedup {
    pub fn new(config: MinhashDedupConfig) -> Result<Self> {
        let MinhashDedupConfig { ngram, num_perm, threshold, drop, verify } = config;
        if ![64, 128, 256].contains(&num_perm) {
            bail!("minhash_dedup: num_perm must be 64, 128 or 256, got {num_perm}");
        }
        if !(0.0 < threshold && threshold < 1.0) || ngram == 0 {
            bail!("minhash_dedup: threshold must be in (0, 1) and ngram at least 1");
        }
        let (bands, rows) = if verify { optimal_bands_weighted(threshold, num_perm, 0.1, 0.9) } else { optimal_bands(threshold, num_perm) };
        Ok(MinhashDedup {
            ngram, num_perm, bands, rows, threshold, verify, duplicates: Duplicates::new(drop, "near duplicate (minhash)", "minhash_cluster"),
            band_hashes: vec![], registers: vec![], uuids: vec![], roots: vec![], applied: 0, clusters: 0,
        })
    }

    /// The signature and band hashes of one text.
    fn sketch(&self, text: &str) -> (Vec<u32>, Vec<u64>) {
        let signature = signature(&shingles(text, self.ngram), self.num_perm);
        let bands = signature.chunks(self.rows).take(self.bands).map(band_hash).collect();
        (signature, bands)
    }

    /// Estimated Jaccard of rows `a` and `b` from their stored registers.
    fn estimate(&self, a: u32, b: u32) -> f64 {
        let p = self.num_perm;
        let (ra, rb) = (&self.registers[a as usize * p..][..p], &self.registers[b as usize * p..][..p]);
        ra.iter().zip(rb).filter(|(x, y)| x == y).count() as f64 / p as f64
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
        let sketches: Vec<(Vec<u32>, Vec<u64>)> = texts.par_iter().map(|t| self.sketch(t.as_deref().unwrap_or(""))).collect();
        for (signature, bands) in sketches {
            if self.verify {
                self.registers.extend(signature.iter().map(|&r| r as u16));
            }
            self.band_hashes.push(bands);
        }
        self.uuids.extend(uuids(batch));
        Ok(())
    }

    fn finish_scan(&mut self) -> Result<()> {
        // One standard error below the threshold, so pairs right at it are mostly kept.
        let cutoff = self.threshold - (self.threshold * (1.0 - self.threshold) / self.num_perm as f64).sqrt();
        let verify = |a: u32, b: u32| !self.verify || self.estimate(a, b) >= cutoff;
        let mut clusters = cluster(&self.band_hashes, self.bands, &verify);
        self.band_hashes = vec![];
        self.registers = vec![];
        self.roots = (0..self.uuids.len() as u32).map(|i| clusters.find(i)).collect();
        self.clusters = self.roots.iter().enumerate().filter(|(i, r)| *i as u32 == **r).count() as u64;
        Ok(())
    }

    fn apply(&mut self, batch: RecordBatch) -> Result<RecordBatch> {
        let rows = self.applied..self.applied + batch.num_rows();
        self.applied = rows.end;
        let cluster: StringArray = rows.clone().map(|i| Some(self.uuids[self.roots[i] as usize].as_str())).collect();
        let keep: BooleanArray = rows.map(|i| Some(self.roots[i] as usize == i)).collect();
        let batch = super::step::with_column(batch, "minhash_cluster", Arc::new(cluster))?;
        self.duplicates.settle(batch, &keep)
    }

    fn take_rejected(&mut self) -> Option<super::step::Rejected> {
        self.duplicates.take_rejected()
    }

    fn report(&self) -> Value {
        let mut report = self.duplicates.report();
        report.extend([
            ("bands".into(), json!(self.bands)),
            ("rows_per_band".into(), json!(self.rows)),
            ("verified".into(), json!(self.verify)),
            ("clusters".into(), json!(self.clusters)),
        ]);
        Value::Object(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_choice_matches_datasketch() {
        assert_eq!(optimal_bands(0.7, 128), (14, 9));
        assert_eq!(optimal_bands(0.8, 128), (9, 13));
        // datasketch's _optimal_param(0.7, 128, 0.1, 0.9)
        assert_eq!(optimal_bands_weighted(0.7, 128, 0.1, 0.9), (20, 6));
    }

    #[test]
    fn planted_near_duplicates_cluster_and_distinct_texts_do_not() {
        let dedup = MinhashDedup::new(MinhashDedupConfig { verify: false, ..Default::default() }).unwrap();
        let base = "please write a detailed step by step guide explaining how to bake sourdough bread at home for complete beginners who only have simple kitchen tools and a small oven and want to understand why each step of the process matters for the final loaf";
        let texts = [
            base.to_string(),
            base.trim_end_matches(" loaf").to_string(), // last word dropped
            base.to_uppercase(),                        // case
            "explain the difference between a list and a tuple in python with examples of when to use each one in real code".to_string(),
        ];
        let hashes: Vec<Vec<u64>> = texts.iter().map(|t| dedup.sketch(t).1).collect();
        let mut clusters = cluster(&hashes, dedup.bands, &|_, _| true);
        let roots: Vec<u32> = (0..4).map(|i| clusters.find(i)).collect();
        assert_eq!(roots, [0, 0, 0, 3]);
    }
}
