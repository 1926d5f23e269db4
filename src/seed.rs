//! Deterministic randomness shared by every stage: splitmix64 (`mix`, `SplitMix64`), uniform
//! floats from a hash (`unit`), and a seeded Fisher-Yates shuffle. Everything that must come out
//! the same on a rerun or a resume (row seeds, data order, splits) is derived from these.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function applied to `x + golden ratio`: a 64-bit hash of `x`.
pub fn mix(x: u64) -> u64 {
    finalize(x.wrapping_add(GOLDEN))
}

fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform float in [0, 1) from the top 53 bits of `x`.
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// The splitmix64 generator: a stream of 64-bit values from one seed.
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        finalize(self.state)
    }
}

/// Fisher-Yates from the last position down, drawing each swap partner from `random`.
pub fn shuffle<T>(items: &mut [T], mut random: impl FnMut() -> u64) {
    for i in (1..items.len()).rev() {
        items.swap(i, (random() % (i as u64 + 1)) as usize);
    }
}

/// `0..n` in the order of a splitmix64 shuffle seeded with `seed`.
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = SplitMix64::new(seed);
    shuffle(&mut order, || rng.next_u64());
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_stream() {
        // The first outputs of the reference C implementation for seed 1234567.
        let mut rng = SplitMix64::new(1234567);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(first, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
        assert_eq!(mix(1234567), 6457827717110365317);
    }

    #[test]
    fn permutation_is_a_seeded_permutation() {
        let a = permutation(100, 42);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, permutation(100, 42));
        assert_ne!(a, permutation(100, 7));
    }
}
