//! Value parsers the stages' flags share, so a value out of range is refused when the command
//! line (or a recipe, which is spliced into it) is parsed, naming the flag, instead of running
//! and writing the bad value into an output's settings.

/// A finite number for which `ok` holds; otherwise an error saying what was `expected`.
fn finite_where<T: std::str::FromStr + Into<f64> + Copy>(text: &str, ok: impl Fn(f64) -> bool, expected: &str) -> Result<T, String> {
    let value: T = text.trim().parse().map_err(|_| format!("expected a number, got `{text}`"))?;
    match value.into() {
        v if !v.is_finite() => Err(format!("expected a finite number, got `{text}`")),
        v if !ok(v) => Err(format!("{expected}, got `{text}`")),
        _ => Ok(value),
    }
}

/// A sampling temperature: finite and at least 0 (0 is greedy).
pub fn temperature(text: &str) -> Result<f32, String> {
    finite_where(text, |t| t >= 0.0, "a temperature is at least 0 (0 is greedy)")
}

/// Nucleus sampling's share of probability mass, in (0, 1].
pub fn top_p(text: &str) -> Result<f32, String> {
    finite_where(text, |p| p > 0.0 && p <= 1.0, "top-p is a share of probability mass in (0, 1]")
}

/// A count of at least 1.
pub fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a whole number of at least 1, got `{text}`")),
    }
}

/// A finite number of at least 0.
pub fn non_negative(text: &str) -> Result<f64, String> {
    finite_where(text, |v| v >= 0.0, "must be at least 0")
}

/// A finite number above 0.
pub fn positive(text: &str) -> Result<f64, String> {
    finite_where(text, |v| v > 0.0, "must be above 0")
}

/// A fraction in [0, 1): a held-out share, which must leave something to train on.
pub fn fraction_below_one(text: &str) -> Result<f64, String> {
    finite_where(text, |v| (0.0..1.0).contains(&v), "a fraction in [0, 1)")
}

/// A fraction in [0, 1].
pub fn fraction(text: &str) -> Result<f64, String> {
    finite_where(text, |v| (0.0..=1.0).contains(&v), "a fraction in [0, 1]")
}

/// A share in (0, 1], such as the part of a GPU's memory an engine may fill.
pub fn share(text: &str) -> Result<f64, String> {
    finite_where(text, |v| v > 0.0 && v <= 1.0, "a share in (0, 1]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nan_infinity_and_values_out_of_range_are_refused() {
        for bad in ["nan", "-1", "inf", "x"] {
            assert!(temperature(bad).is_err(), "{bad}");
        }
        assert_eq!(temperature("0").unwrap(), 0.0);
        for bad in ["2", "-0.5", "0", "nan"] {
            assert!(top_p(bad).is_err(), "{bad}");
        }
        assert_eq!(top_p("1").unwrap(), 1.0);
        assert!(at_least_one("0").is_err() && at_least_one("-3").is_err());
        assert!(non_negative("nan").is_err() && non_negative("-1").is_err() && non_negative("0").is_ok());
        assert!(positive("nan").is_err() && positive("0").is_err() && positive("inf").is_err());
        assert!(fraction_below_one("2").is_err() && fraction_below_one("-0.5").is_err() && fraction_below_one("1").is_err());
        assert!(fraction_below_one("0").is_ok() && fraction("1").is_ok());
        assert_eq!(share("0.9"), Ok(0.9));
        for bad in ["0", "1.5", "-0.1", "ninety"] {
            assert!(share(bad).unwrap_err().contains(bad), "{bad}");
        }
    }
}
