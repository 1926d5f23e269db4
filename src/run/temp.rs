//! Temporaries: every output is written under a hidden name beside its target
//! (`.NAME.magpie-tmp-PID`) and renamed into place, so a kill never leaves a half-written file
//! under a real name. A later run sweeps the temporaries of processes that are gone.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// What marks a temporary name.
pub const TMP_MARK: &str = ".magpie-tmp-";

/// Whether a file name is one of our temporaries.
pub fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.contains(TMP_MARK)
}

/// A hidden sibling of `target` to write into before the final rename.
pub fn temporary_sibling(target: &Path) -> Result<PathBuf> {
    let name = target.file_name().with_context(|| format!("{}: not a file name", target.display()))?;
    let parent = parent_of(target);
    if !parent.is_dir() {
        bail!("{}: parent directory does not exist", target.display());
    }
    Ok(parent.join(format!(".{}{TMP_MARK}{}", name.to_string_lossy(), std::process::id())))
}

/// The folder `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `target` through a temporary sibling and a rename.
pub fn write_atomically(target: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(target)?;
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", target.display()));
    }
    std::fs::rename(&tmp, target).with_context(|| format!("{}: cannot rename into place", target.display()))
}

/// Removes the temporaries in `dir` whose name starts with `prefix` and whose process is gone
/// (left by interrupted runs). A live process's temporaries, ours included, stay.
pub fn sweep_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !is_temporary(&name) || !name.starts_with(prefix) {
            continue;
        }
        let pid = name.rsplit(TMP_MARK).next().and_then(|p| p.split('.').next()).and_then(|p| p.parse::<u32>().ok());
        let alive = pid.is_some_and(|p| p == std::process::id() || Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            remove_temporary(&entry.path());
        }
    }
}

/// Removes the temporaries interrupted runs left for `target` beside it.
pub fn sweep_temporaries_of(target: &Path) {
    if let Some(name) = target.file_name() {
        sweep_temporaries(&parent_of(target), &format!(".{}.", name.to_string_lossy()));
    }
}

/// Removes a temporary file or folder of ours, ignoring failures (it is only in the way). A link
/// is removed itself, never what it points to.
pub fn remove_temporary(path: &Path) {
    let _ = match path.symlink_metadata() {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(_) => return,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let dead = dir.path().join(format!(".out{TMP_MARK}999999999"));
        let mine = dir.path().join(format!(".out{TMP_MARK}{}", std::process::id()));
        let other_output = dir.path().join(format!(".other{TMP_MARK}999999999"));
        for path in [&dead, &mine, &other_output] {
            std::fs::write(path, b"x").unwrap();
        }
        sweep_temporaries(dir.path(), ".out");
        assert!(!dead.exists() && mine.exists() && other_output.exists());
    }
}
