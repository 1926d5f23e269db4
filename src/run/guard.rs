//! The guards every stage's output passes before anything is written: it is not an input, it is
//! not a link, and what is already there is nothing, an unfinished run of ours (resumable
//! stages), or a finished output of ours, which only `--overwrite` replaces. Anything else is an
//! error that names it. Readers use [`require_finished`].

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Component, Path, PathBuf};

use super::manifest::{claim_path, is_marker, provenance_of, Manifest};
use super::remove::{lstat, Removal};
use super::temp::{is_temporary, parent_of};

/// An absolute path with `.` and `..` resolved and links followed as far as it exists.
pub fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir().unwrap_or_default().join(path) };
    let mut existing = joined.clone();
    let mut rest = vec![];
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    for part in rest.iter().rev() {
        out.push(part);
    }
    let mut clean = PathBuf::new();
    for component in out.components() {
        match component {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// How a stage's output may already exist.
pub struct Rules {
    /// `--overwrite`: replace a finished output of ours.
    pub overwrite: bool,
    /// For outputs a rerun continues (synth, training): which names besides the markers such a
    /// run writes into its folder.
    pub resumable: Option<fn(&str) -> bool>,
}

/// What [`check`] found at the output path.
#[derive(Debug, PartialEq)]
pub enum Existing {
    /// Nothing, or an empty folder.
    Nothing,
    /// An unfinished run of ours (resumable outputs only).
    Unfinished,
    /// A finished output of ours: replaced with `--overwrite`; a resumable stage may also find
    /// it complete.
    Finished,
}

/// Fails when `target` is, contains or lies inside one of `inputs`.
pub fn check_not_an_input(target: &Path, inputs: &[PathBuf]) -> Result<()> {
    let out = absolute(target);
    for input in inputs {
        let input_abs = absolute(input);
        if out == input_abs {
            bail!("{}: the output is the input {}; choose another output", target.display(), input.display());
        }
        if input_abs.starts_with(&out) {
            bail!("{}: the output would contain the input {}; choose another output", target.display(), input.display());
        }
        if out.starts_with(&input_abs) {
            bail!("{}: the output lies inside the input folder {}; choose another output", target.display(), input.display());
        }
    }
    Ok(())
}

/// Checks an output path before anything is written (see the module docs), and creates the
/// folder it goes in, so that a path that cannot be written is named now rather than after the
/// work.
pub fn check(target: &Path, inputs: &[PathBuf], rules: &Rules) -> Result<Existing> {
    check_not_an_input(target, inputs)?;
    let parent = parent_of(target);
    if parent.exists() && !parent.is_dir() {
        bail!("{}: cannot be written, {} is not a folder", target.display(), parent.display());
    }
    std::fs::create_dir_all(&parent).with_context(|| format!("{}: cannot create its folder {}", target.display(), parent.display()))?;
    let Ok(meta) = lstat(target) else { return Ok(Existing::Nothing) };
    if meta.file_type().is_symlink() {
        bail!("{}: is a symbolic link; give the folder (or file) itself as the output, magpie never writes or removes through a link", target.display());
    }
    if !meta.is_dir() {
        let single_parquet = rules.resumable.is_none() && target.extension().is_some_and(|e| e == "parquet");
        if !single_parquet {
            bail!("{}: exists and is a file; give a new or empty folder", target.display());
        }
        if provenance_of(target).is_none() {
            bail!("{}: exists and was not written by magpie; refusing to overwrite it (choose another output)", target.display());
        }
        if !rules.overwrite {
            bail!("{}: exists (a magpie output); pass --overwrite to replace it", target.display());
        }
        return Ok(Existing::Finished);
    }
    let names: Vec<String> = std::fs::read_dir(target)
        .with_context(|| format!("{}: cannot list", target.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !is_temporary(n))
        .collect();
    if names.is_empty() {
        return Ok(Existing::Nothing);
    }
    // Fails naming the entries that `owned` does not account for.
    let foreign = |owned: &dyn Fn(&str) -> bool| -> Result<()> {
        let mut others: Vec<&String> = names.iter().filter(|n| !is_marker(n) && !owned(n)).collect();
        others.sort();
        if others.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = others.iter().take(5).map(|s| s.as_str()).collect();
        let more = if others.len() > 5 { format!(" and {} more", others.len() - 5) } else { String::new() };
        bail!("{}: holds files magpie did not write ({}{more}); refusing to write into it. Choose a new or empty folder", target.display(), shown.join(", "))
    };
    if let Some(manifest) = Manifest::read(target)? {
        let listed = manifest.top_level_names();
        foreign(&|n| listed.contains(n))?;
        if rules.overwrite && rules.resumable.is_none() {
            // What the replacement would remove is planned now, so a refusal (a link, a user's
            // file deep inside) comes before the work, not after it. Resumable stages plan their
            // own removal (`RunDir::prepare`).
            Removal::of_finished(target, true)?;
        }
        if rules.overwrite || rules.resumable.is_some() {
            return Ok(Existing::Finished);
        }
        bail!("{}: holds a finished magpie {} ({}); pass --overwrite to replace it", target.display(), manifest.kind, manifest.provenance.stage);
    }
    match rules.resumable {
        Some(owns) if claim_path(target).is_some() => {
            foreign(&owns)?;
            Ok(Existing::Unfinished)
        }
        // No manifest and no claim of ours: everything there is someone else's.
        _ => foreign(&|_| false).map(|()| Existing::Nothing),
    }
}

/// For readers: fails on an unfinished run's folder (a claim, no manifest), and on a finished one whose files no longer match its manifest (sizes, and the
/// row counts in the parquet footers); returns the manifest of a finished one. Folders magpie
/// did not write pass as they are (`None`).
pub fn require_finished(dir: &Path) -> Result<Option<Manifest>> {
    if let Some(manifest) = Manifest::read(dir)? {
        manifest.check_files(dir)?;
        return Ok(Some(manifest));
    }
    if claim_path(dir).is_some() {
        let claim = super::manifest::read_claim(dir)?.expect("a claim is there");
        let stage = claim["stage"].as_str().unwrap_or("run");
        bail!(
            "{}: an unfinished magpie {stage} output (no {}: the run was interrupted or is still going); \
             rerun the same `magpie {stage}` command to finish it",
            dir.display(),
            super::manifest::MANIFEST
        )
    }
    Ok(None)
}

/// For a reader given a folder with no parquet files: fails saying so when what is there is an
/// unfinished run of ours (a claim, or only our temporaries: a run killed or out of disk space
/// before its first part), rather than calling the folder empty.
pub fn refuse_unfinished_empty(dir: &Path) -> Result<()> {
    require_finished(dir)?;
    let names: Vec<String> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    if !names.is_empty() && names.iter().all(|n| is_temporary(n)) {
        bail!("{}: holds only magpie temporaries: a run stopped before it finished (killed, or out of disk space); rerun it", dir.display());
    }
    Ok(())
}

/// Dotted paths (`args.seed`) of the settings that differ between two runs: what the resume
/// guards of synth and training name.
pub fn differing_keys(path: &str, earlier: &Value, now: &Value, out: &mut Vec<String>) {
    match (earlier, now) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let (x, y) = (a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null));
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                differing_keys(&child, x, y, out);
            }
        }
        (a, b) if a != b => out.push(path.to_string()),
        _ => {}
    }
}
