//! What the stages' flags share: the flags every command that writes an output takes
//! ([`OutputFlags`], flattened into each command), the device choice, and value parsers, so a value
//! out of range is refused when the command line (or a recipe, which is spliced into it) is
//! parsed, naming the flag, instead of running and writing the bad value into an output's settings.

use std::path::PathBuf;

/// The flags of every command that writes an output, declared once and flattened into each.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputFlags {
    /// YAML recipe whose keys are these flags' names; flags on the command line override it.
    #[arg(long, value_name = "FILE.yaml")]
    pub recipe: Option<PathBuf>,

    /// Replace a finished magpie output at --output (or start an unfinished run over); only the
    /// files magpie wrote there are removed, never a file it did not write.
    #[arg(long)]
    pub overwrite: bool,
}

/// `--device` (and a step's `device`): parsed once, resolved against what libtorch sees when
/// the run starts. Written back as it was given (`auto`, `cpu`, `cuda`, `cuda:N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The first CUDA device (a rank's own GPU under a launcher) when libtorch sees one, else
    /// the CPU.
    Auto,
    Cpu,
    /// `cuda` (`None`: the first, or a rank's own) or `cuda:N`.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(None)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(index)) => Ok(DeviceChoice::Cuda(Some(index))),
                _ => Err(format!("`{other}`: expected cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(index)) => write!(f, "cuda:{index}"),
        }
    }
}

impl serde::Serialize for DeviceChoice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceChoice {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceChoice {
    /// The device. `own_gpu` is the GPU a launcher's local rank takes (`auto` and bare `cuda`
    /// use it; the first GPU without one). A GPU libtorch does not see is an error naming the
    /// count.
    pub fn resolve(self, own_gpu: Option<usize>) -> anyhow::Result<tch::Device> {
        let cuda = |index: usize| {
            let count = tch::Cuda::device_count().max(0) as usize;
            anyhow::ensure!(index < count, "--device {self}: libtorch sees {count} CUDA device(s)");
            Ok(tch::Device::Cuda(index))
        };
        match self {
            DeviceChoice::Cpu => Ok(tch::Device::Cpu),
            DeviceChoice::Auto if !tch::Cuda::is_available() => Ok(tch::Device::Cpu),
            DeviceChoice::Auto | DeviceChoice::Cuda(None) => cuda(own_gpu.unwrap_or(0)),
            DeviceChoice::Cuda(Some(index)) => cuda(index),
        }
    }
}

/// `--device`'s value parser.
pub fn device(text: &str) -> Result<DeviceChoice, String> {
    text.parse()
}

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

    #[test]
    fn a_device_is_parsed_once_and_written_back_as_given() {
        for text in ["auto", "cpu", "cuda", "cuda:3"] {
            assert_eq!(device(text).unwrap().to_string(), text);
            assert_eq!(serde_json::to_value(device(text).unwrap()).unwrap(), text);
        }
        for bad in ["tpu", "cuda:x", "cuda:-1", ""] {
            assert!(device(bad).unwrap_err().contains("expected cpu, cuda, cuda:N or auto"), "{bad}");
        }
        assert!(serde_json::from_str::<DeviceChoice>("\"gpu\"").unwrap_err().to_string().contains("expected cpu"));
        assert_eq!(DeviceChoice::Cpu.resolve(Some(3)).unwrap(), tch::Device::Cpu);
        if !tch::Cuda::is_available() {
            assert_eq!(DeviceChoice::Auto.resolve(Some(3)).unwrap(), tch::Device::Cpu);
            let err = DeviceChoice::Cuda(Some(2)).resolve(None).unwrap_err().to_string();
            assert!(err.contains("--device cuda:2: libtorch sees 0 CUDA device(s)"), "{err}");
        }
    }
}
