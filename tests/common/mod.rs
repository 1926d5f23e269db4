//! What the binary-driving tests share: running `magpie`, the committed fixtures, and the
//! embedded model converted to a Hugging Face directory.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::collections::BTreeMap;
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

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Every file under `dir` with its size, modification time and (up to 1 MiB) its bytes; a link
/// with its target, not followed.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime, Vec<u8>)> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let link = std::fs::symlink_metadata(&path).unwrap();
        if link.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap().display().to_string().into_bytes();
            files.insert(path.clone(), (0, link.modified().unwrap(), target));
        } else if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).unwrap().flatten().map(|e| e.path()));
        } else {
            let meta = std::fs::metadata(&path).unwrap();
            let bytes = if meta.len() <= 1 << 20 { std::fs::read(&path).unwrap() } else { vec![] };
            files.insert(path.clone(), (meta.len(), meta.modified().unwrap(), bytes));
        }
    }
    files
}

/// Runs `args`, expects exit 1 with `message` in stderr and `dir` unchanged byte for byte.
pub fn refused(dir: &Path, args: &[&str], message: &str) {
    let before = snapshot(dir);
    let output = magpie(args);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {}", stderr(&output));
    assert!(stderr(&output).contains(message), "{args:?}: expected `{message}` in: {}", stderr(&output));
    assert_eq!(snapshot(dir), before, "{args:?} changed files");
}

/// The project venv's python (scripts/env.sh's $VIRTUAL_ENV, else the checkout's `.venv` link),
/// where scripts/setup.sh --test installs the test-only packages.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    let python = venv.join("bin/python");
    assert!(python.is_file(), "{}: no python; source scripts/env.sh and run scripts/setup.sh --test", python.display());
    python
}
