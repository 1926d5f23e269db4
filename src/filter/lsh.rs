//! Near-duplicate pairs by random-hyperplane LSH (SimHash, Charikar 2002; faiss's `IndexLSH`),
//! beside `knn`'s HNSW graph: a graph's greedy search can miss a row's copy where the rows have
//! little structure (at 1M random vectors it misses a third), and the near duplicates are what
//! decide semantic dedup's output.
//!
//! Each row gets the sign bits of `BANDS × BITS` fixed random projections; rows that agree on
//! every bit of a band share that band's bucket, and the pairs in a bucket are checked with exact
//! distances. Two rows at angle θ share a band with probability (1 − θ/π)^BITS, so a pair is
//! missed by every band with probability (1 − (1 − θ/π)^BITS)^BANDS: 2.5e-4 at Magpie's
//! threshold (squared L2 0.05, cosine 0.975), under 1e-30 at cosine 0.9999. Unrelated rows share
//! a bucket about once per row and band (2^BITS buckets for 1M rows).
//!
//! State: the band keys, 4 × `BANDS` bytes a row, and each row's near list (at most k pairs).

use rayon::prelude::*;
use tch::{Kind, Tensor};

use super::knn::{Embeddings, REPEAT_DISTANCE};
use crate::seed::{unit, SplitMix64};

/// Bands of hyperplanes, and hyperplanes a band.
const BANDS: usize = 32;
const BITS: usize = 20;

/// Rows projected at a time (a `[rows, BANDS × BITS]` f32 block: 160 MiB).
const BLOCK_ROWS: usize = 1 << 16;

/// The fixed hyperplanes, `[d, BANDS × BITS]`: standard normal components from splitmix64, the
/// same on every run.
fn hyperplanes(d: usize) -> Tensor {
    let mut rng = SplitMix64::new(0x5EED_15A5);
    let values: Vec<f32> = (0..d * BANDS * BITS)
        .map(|_| {
            // Box-Muller; 1 - u keeps the logarithm finite.
            let (u, v) = (1.0 - unit(rng.next_u64()), unit(rng.next_u64()));
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    Tensor::from_slice(&values).view([d as i64, (BANDS * BITS) as i64])
}

/// Every row's band keys, band after band: `keys[band * n + row]`.
fn band_keys(e: &Embeddings) -> Vec<u32> {
    let n = e.len();
    let planes = hyperplanes(e.dimensions());
    let weights = Tensor::from_slice(&(0..BITS).map(|b| 1i64 << b).collect::<Vec<_>>());
    let mut keys = vec![0u32; BANDS * n];
    tch::no_grad(|| {
        e.with_tensor(|rows| {
            for start in (0..n).step_by(BLOCK_ROWS) {
                let len = BLOCK_ROWS.min(n - start);
                let bits = rows.narrow(0, start as i64, len as i64).matmul(&planes).gt(0.0).to_kind(Kind::Int64);
                let block = (bits.view([len as i64, BANDS as i64, BITS as i64]) * &weights).sum_dim_intlist(2, false, Kind::Int64);
                let block = Vec::<i64>::try_from(block.transpose(0, 1).contiguous().flatten(0, -1)).expect("int64 keys");
                for band in 0..BANDS {
                    for (r, &key) in block[band * len..(band + 1) * len].iter().enumerate() {
                        keys[band * n + start + r] = key as u32;
                    }
                }
            }
        })
    });
    keys
}

/// Each row's other rows closer than `REPEAT_DISTANCE` that share a bucket with it in some band,
/// with exact squared distances, nearest first, at most k of them.
pub fn near_lists(e: &Embeddings, k: usize) -> Vec<Vec<(f64, usize)>> {
    let n = e.len();
    let mut lists: Vec<Vec<(f64, usize)>> = vec![vec![]; n];
    if n < 2 || k == 0 {
        return lists;
    }
    let keys = band_keys(e);
    for band in 0..BANDS {
        let mut order: Vec<(u32, u32)> = (0..n).map(|row| (keys[band * n + row], row as u32)).collect();
        order.par_sort_unstable();
        let buckets: Vec<&[(u32, u32)]> = order.chunk_by(|a, b| a.0 == b.0).filter(|bucket| bucket.len() > 1).collect();
        // Each row of a bucket against the bucket's other rows.
        let found: Vec<(usize, Vec<(f64, usize)>)> = buckets
            .par_iter()
            .flat_map_iter(|bucket| {
                bucket.iter().filter_map(move |&(_, row)| {
                    let row = row as usize;
                    let near: Vec<(f64, usize)> = bucket
                        .iter()
                        .map(|&(_, other)| other as usize)
                        .filter(|&other| other != row)
                        .map(|other| (e.squared_distance(row, other), other))
                        .filter(|p| p.0 < REPEAT_DISTANCE)
                        .collect();
                    (!near.is_empty()).then_some((row, near))
                })
            })
            .collect();
        for (row, near) in found {
            let list = &mut lists[row];
            list.extend(near);
            list.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            list.dedup_by_key(|p| p.1);
            list.truncate(k);
        }
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::knn::tests::planted;
    use tch::Device;

    /// Every planted copy (squared distance about 1e-4) and every pair at Magpie's threshold
    /// found, as many as the exact search finds; unrelated rows never listed.
    #[test]
    fn lsh_finds_every_planted_near_duplicate_and_pairs_just_inside_the_threshold() {
        let (mut e, pairs) = planted(20_000, 384, 3);
        // Rows 1..=3: at squared distance 0.045 from row 0 (cosine 0.9775), inside 0.05.
        let base = e.row(0).to_vec();
        for (r, seed) in [(1usize, 11i64), (2, 12), (3, 13)] {
            tch::manual_seed(seed);
            let noise = Tensor::randn([384], (Kind::Float, Device::Cpu));
            let base_t = Tensor::from_slice(&base);
            let orthogonal = &noise - &base_t * noise.dot(&base_t);
            let orthogonal = &orthogonal / orthogonal.norm();
            let cos = 1.0 - 0.045 / 2.0;
            let row = base_t * cos + orthogonal * (1.0 - cos * cos).sqrt();
            e.set_row(r, &Vec::<f32>::try_from(row).unwrap());
        }
        let lists = near_lists(&e, 500);
        for &(original, copy) in pairs.iter().filter(|(a, b)| *a > 3 && *b > 3) {
            assert!(lists[copy].iter().any(|p| p.1 == original) && lists[original].iter().any(|p| p.1 == copy), "({original}, {copy})");
        }
        for r in 1..=3 {
            let to_base = lists[r].iter().find(|p| p.1 == 0).unwrap_or_else(|| panic!("row {r} not paired with row 0: {:?}", lists[r]));
            assert!((to_base.0 - 0.045).abs() < 1e-4, "{to_base:?}");
        }
        // Exactly the exact search's near duplicates (copies of copies among them), nothing else.
        let truth = crate::filter::knn::exact(&e, 500, Device::Cpu);
        for (row, (list, exact)) in lists.iter().zip(&truth).enumerate() {
            assert_eq!(list.len() as i64, exact.near, "row {row}: {list:?}");
        }
        assert!(lists.iter().flatten().all(|p| p.0 < REPEAT_DISTANCE));
    }

    #[test]
    fn the_hyperplanes_are_the_same_every_run_and_standard_normal() {
        let (a, b) = (hyperplanes(8), hyperplanes(8));
        assert!(a.equal(&b));
        let planes = hyperplanes(384);
        let (mean, std) = (planes.mean(Kind::Float).double_value(&[]), planes.std(true).double_value(&[]));
        assert!(mean.abs() < 0.01 && (std - 1.0).abs() < 0.01, "mean {mean}, std {std}");
    }
}
