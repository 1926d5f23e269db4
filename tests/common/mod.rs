//! What the binary-driving tests share: running `magpie`, the committed fixtures, and the
//! embedded model converted to a Hugging Face directory.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub fn magpie(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_magpie")).args(args).output().expect("run magpie")
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fixtures").join(name)
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The embedded SmolLM2 converted by `magpie convert` into `dir/smollm2`.
pub fn converted_smollm2(dir: &Path) -> PathBuf {
    let out = dir.join("smollm2");
    let output = magpie(&["convert", "-o", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    out
}

/// The embedded SmolLM2 GGUF that scripts/setup.sh puts in $MAGPIE_HOME (default: models/).
pub fn embedded_model() -> PathBuf {
    let home = std::env::var_os("MAGPIE_HOME").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    home.join("smollm2-135m-instruct-q4_1.gguf")
}

/// Waits (at most `limit`) until `path` exists, then kills `child` with SIGKILL and reaps it: a
/// run killed right after it finished a part or a checkpoint.
pub fn kill_once_exists(child: &mut Child, path: &Path, limit: Duration) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < limit, "{} not written within {limit:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
