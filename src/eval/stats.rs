//! From judgements to numbers: the position-swap rule, win rates with a bootstrap interval, and
//! AlpacaEval 2's length control.

use crate::seed::{mix, unit};

/// What the judge preferred in one order of the two answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The answer shown first (`[[A]]`).
    First,
    /// The answer shown second (`[[B]]`).
    Second,
    /// `[[C]]`.
    Tie,
}

/// The model's result on one prompt against the baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

impl Outcome {
    /// 1 for a win, ½ for a tie, 0 for a loss: AlpacaEval's preference.
    pub fn preference(self) -> f64 {
        match self {
            Outcome::Win => 1.0,
            Outcome::Tie => 0.5,
            Outcome::Loss => 0.0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Win => "win",
            Outcome::Tie => "tie",
            Outcome::Loss => "loss",
        }
    }
}

/// The position-swap rule: `model_first` is the verdict with the model's answer shown first,
/// `baseline_first` with the baseline's first. A win or a loss only when both orders agree;
/// anything else is a tie. `None` when either verdict could not be read (never guessed).
pub fn outcome(model_first: Option<Verdict>, baseline_first: Option<Verdict>) -> Option<Outcome> {
    let prefers_model = |v: Verdict, model_is_first: bool| match v {
        Verdict::First => Some(model_is_first),
        Verdict::Second => Some(!model_is_first),
        Verdict::Tie => None,
    };
    let (a, b) = (prefers_model(model_first?, true), prefers_model(baseline_first?, false));
    Some(match (a, b) {
        (Some(true), Some(true)) => Outcome::Win,
        (Some(false), Some(false)) => Outcome::Loss,
        _ => Outcome::Tie,
    })
}

/// The mean preference (wins + ½ ties) / n.
pub fn win_rate(outcomes: &[Outcome]) -> f64 {
    outcomes.iter().map(|o| o.preference()).sum::<f64>() / outcomes.len().max(1) as f64
}

/// A 95% percentile bootstrap interval of the win rate: `resamples` resamples with replacement,
/// seeded.
pub fn bootstrap_interval(outcomes: &[Outcome], resamples: usize, seed: u64) -> (f64, f64) {
    if outcomes.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = outcomes.len();
    let mut rates: Vec<f64> = (0..resamples.max(1))
        .map(|r| {
            let draw = |i: usize| outcomes[(unit(mix(seed ^ mix((r * n + i) as u64))) * n as f64) as usize % n].preference();
            (0..n).map(draw).sum::<f64>() / n as f64
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let at = |q: f64| rates[((q * (rates.len() - 1) as f64).round() as usize).min(rates.len() - 1)];
    (at(0.025), at(0.975))
}

/// AlpacaEval 2's length-controlled win rate for one model against one baseline: a logistic
/// regression of the preference on tanh(length difference / its standard deviation), fitted by
/// Newton's method; the length-controlled rate is the prediction with the length term at 0, σ(b₀).
/// `lengths` are (model, baseline) answer lengths in characters.
pub fn length_controlled_win_rate(outcomes: &[Outcome], lengths: &[(usize, usize)]) -> f64 {
    let diffs: Vec<f64> = lengths.iter().map(|&(m, b)| m as f64 - b as f64).collect();
    let n = diffs.len().max(1) as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
    let x: Vec<f64> = diffs.iter().map(|d| if sd > 0.0 { (d / sd).tanh() } else { 0.0 }).collect();
    let y: Vec<f64> = outcomes.iter().map(|o| o.preference()).collect();
    let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
    // A small ridge keeps the fit finite when the outcomes separate perfectly.
    let ridge = 1e-3;
    let (mut b0, mut b1) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (-ridge * b0, -ridge * b1, ridge, 0.0, ridge);
        for (&xi, &yi) in x.iter().zip(&y) {
            let p = sigmoid(b0 + b1 * xi);
            let w = p * (1.0 - p);
            g0 += yi - p;
            g1 += (yi - p) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        let det = h00 * h11 - h01 * h01;
        let (d0, d1) = ((h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det);
        b0 += d0;
        b1 += d1;
        if d0.abs() + d1.abs() < 1e-10 {
            break;
        }
    }
    sigmoid(b0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{First, Second, Tie};

    #[test]
    fn a_pair_is_won_or_lost_only_when_both_orders_agree() {
        assert_eq!(outcome(Some(First), Some(Second)), Some(Outcome::Win), "model preferred in both orders");
        assert_eq!(outcome(Some(Second), Some(First)), Some(Outcome::Loss));
        assert_eq!(outcome(Some(First), Some(First)), Some(Outcome::Tie), "the judge always picks the first answer: position bias");
        assert_eq!(outcome(Some(Second), Some(Second)), Some(Outcome::Tie));
        assert_eq!(outcome(Some(First), Some(Tie)), Some(Outcome::Tie));
        assert_eq!(outcome(Some(Tie), Some(Tie)), Some(Outcome::Tie));
        assert_eq!(outcome(None, Some(Second)), None, "an unreadable verdict is never guessed");
        assert_eq!(outcome(Some(First), None), None);
    }

    #[test]
    fn win_rate_counts_ties_half_and_the_bootstrap_interval_covers_it() {
        let outcomes: Vec<Outcome> = [Outcome::Win; 6].into_iter().chain([Outcome::Tie; 2]).chain([Outcome::Loss; 2]).collect();
        assert!((win_rate(&outcomes) - 0.7).abs() < 1e-12);
        let (lo, hi) = bootstrap_interval(&outcomes, 2000, 1);
        assert!(lo < 0.7 && 0.7 < hi && lo > 0.3 && hi <= 1.0, "({lo}, {hi})");
        // The same seed, the same interval; all wins leave no spread.
        assert_eq!(bootstrap_interval(&outcomes, 2000, 1), (lo, hi));
        assert_eq!(bootstrap_interval(&[Outcome::Win; 5], 100, 1), (1.0, 1.0));
        // Wider with fewer judgements.
        let (lo4, hi4) = bootstrap_interval(&outcomes[..5].iter().chain(&outcomes[8..]).copied().collect::<Vec<_>>(), 2000, 1);
        let (lo40, hi40) = bootstrap_interval(&outcomes.iter().cycle().take(100).copied().collect::<Vec<_>>(), 2000, 1);
        assert!(hi4 - lo4 > hi40 - lo40);
    }

    #[test]
    fn length_control_discounts_wins_that_come_with_longer_answers() {
        /// `long` prompts where the model's answer is 600 characters longer, `wins_long` of them
        /// won; `short` where it is 600 shorter, `wins_short` won.
        fn judged(long: usize, wins_long: usize, short: usize, wins_short: usize) -> (Vec<Outcome>, Vec<(usize, usize)>) {
            let mut outcomes = vec![];
            let mut lengths = vec![];
            for i in 0..long {
                outcomes.push(if i < wins_long { Outcome::Win } else { Outcome::Loss });
                lengths.push((900, 300));
            }
            for i in 0..short {
                outcomes.push(if i < wins_short { Outcome::Win } else { Outcome::Loss });
                lengths.push((300, 900));
            }
            (outcomes, lengths)
        }
        // Mostly longer, and winning mostly when longer: the raw rate rewards length.
        let (outcomes, lengths) = judged(30, 24, 10, 3);
        let raw = win_rate(&outcomes);
        let lc = length_controlled_win_rate(&outcomes, &lengths);
        assert!((raw - 0.675).abs() < 1e-12);
        assert!(lc < raw - 0.05, "lc {lc} vs raw {raw}");
        // Equal lengths: nothing to control, the rate is the raw one.
        assert!((length_controlled_win_rate(&outcomes, &vec![(500, 500); 40]) - raw).abs() < 1e-3);
        // Longer answers that win no more often than shorter ones are not discounted.
        let (outcomes, lengths) = judged(30, 21, 10, 7);
        assert!((length_controlled_win_rate(&outcomes, &lengths) - win_rate(&outcomes)).abs() < 1e-3);
    }
}
