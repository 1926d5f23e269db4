//! Outputs that never destroy a user's files and say when they are finished, for every stage.
//!
//! - Before a stage writes anything, [`check`] compares the output path with the inputs (an
//!   output may not be, contain or lie inside an input) and with what is already there: nothing,
//!   an empty folder, an unfinished run of ours (resumable stages), or a finished output of ours,
//!   which only `--overwrite` replaces. Anything else there is an error that names it.
//! - Work goes to hidden temporaries beside the target (`.NAME.magpie-tmp-PID`). A finished
//!   folder gets [`MANIFEST`], written last: the files with sizes and hashes, the rows, the
//!   command and its settings, the tool version. [`commit`] then swaps it into place, removing
//!   only the files the previous output's manifest lists.
//! - A successful run removes the temporaries that interrupted runs of the same output left.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The completion marker of a finished output folder.
pub const MANIFEST: &str = "magpie-manifest.json";

/// The claim a resumable stage (synth, training) writes first into its output folder: the
/// settings a rerun must share. A folder with a claim and no manifest is an unfinished run.
pub const RUN_CLAIM: &str = "magpie-run.json";

/// What marks a temporary name.
pub const TMP_MARK: &str = ".magpie-tmp-";

/// The tool that wrote an output.
pub fn tool() -> String {
    format!("magpie {}", env!("CARGO_PKG_VERSION"))
}

/// The command and the settings that made an output.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Provenance {
    pub stage: String,
    pub command: Vec<String>,
    pub settings: Value,
}

impl Provenance {
    /// This process's command line with the stage's settings.
    pub fn new(stage: &str, settings: impl Serialize) -> Provenance {
        Provenance { stage: stage.to_string(), command: std::env::args().collect(), settings: serde_json::to_value(settings).unwrap_or(Value::Null) }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Relative to the output folder, `/`-separated. A sub-folder with a manifest of its own (a
    /// model, a checkpoint) is one entry ending in `/`, hashed through its manifest.
    pub path: String,
    pub bytes: u64,
    pub xxh3: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub tool: String,
    /// `dataset`, `model`, `checkpoint` or `training run`.
    pub kind: String,
    pub rows: Option<u64>,
    pub files: Vec<FileEntry>,
    #[serde(flatten)]
    pub provenance: Provenance,
}

impl Manifest {
    /// The manifest of `dir`, or `None` when it has none.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a magpie manifest", path.display()))?))
    }

    /// Lists and hashes every file under `dir` (temporaries excluded), then writes the manifest,
    /// atomically and last.
    pub fn write(dir: &Path, kind: &str, rows: Option<u64>, provenance: &Provenance) -> Result<Manifest> {
        let mut files = vec![];
        list_files(dir, "", &mut files)?;
        let manifest = Manifest { tool: tool(), kind: kind.to_string(), rows, files, provenance: provenance.clone() };
        write_atomically(&dir.join(MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        Ok(manifest)
    }

    /// The names directly in the folder that the manifest accounts for.
    fn top_level_names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.files.iter().map(|f| f.path.split('/').next().unwrap_or("").to_string()).collect();
        names.insert(MANIFEST.to_string());
        names
    }

    /// Fails unless every listed file is in `dir` with its size (a cheap check for readers).
    pub fn check_sizes(&self, dir: &Path) -> Result<()> {
        for file in &self.files {
            let path = dir.join(file.path.trim_end_matches('/'));
            let bytes = if file.path.ends_with('/') { Some(file.bytes) } else { std::fs::metadata(&path).ok().map(|m| m.len()) };
            match bytes {
                None => bail!("{}: missing, but {} lists it; the output was changed after magpie wrote it", path.display(), dir.join(MANIFEST).display()),
                Some(b) if b != file.bytes => bail!(
                    "{}: {b} bytes, but {} says {}; the output was changed after magpie wrote it",
                    path.display(),
                    dir.join(MANIFEST).display(),
                    file.bytes
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<FileEntry>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().to_string();
        if is_temporary(&name) || (prefix.is_empty() && name == MANIFEST) {
            continue;
        }
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        if path.is_dir() {
            if path.join(MANIFEST).is_file() {
                let nested = Manifest::read(&path)?.expect("checked above");
                let bytes = nested.files.iter().map(|f| f.bytes).sum();
                out.push(FileEntry { path: format!("{relative}/"), bytes, xxh3: hash_file(&path.join(MANIFEST))? });
            } else {
                list_files(&path, &format!("{relative}/"), out)?;
            }
        } else {
            let bytes = entry.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
            out.push(FileEntry { path: relative, bytes, xxh3: hash_file(&path)? });
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = twox_hash::XxHash3_64::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        std::hash::Hasher::write(&mut hasher, &buffer[..n]);
    }
    Ok(format!("{:016x}", std::hash::Hasher::finish(&hasher)))
}

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

fn parent_of(path: &Path) -> PathBuf {
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
    /// For outputs a rerun continues (synth, training): the file that claims an unfinished run,
    /// and which names in the folder such a run writes.
    pub resumable: Option<Resumable>,
}

pub struct Resumable {
    pub claim: &'static str,
    pub owns: fn(&str) -> bool,
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
    let Ok(meta) = std::fs::metadata(target) else { return Ok(Existing::Nothing) };
    if !meta.is_dir() {
        let single_parquet = rules.resumable.is_none() && target.extension().is_some_and(|e| e == "parquet");
        if !single_parquet {
            bail!("{}: exists and is a file; give a new or empty folder", target.display());
        }
        if crate::data::write::provenance_of(target).is_none() {
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
        let mut others: Vec<&String> = names.iter().filter(|n| !owned(n)).collect();
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
        if rules.overwrite || rules.resumable.is_some() {
            return Ok(Existing::Finished);
        }
        bail!("{}: holds a finished magpie {} ({}); pass --overwrite to replace it", target.display(), manifest.kind, manifest.provenance.stage);
    }
    match &rules.resumable {
        Some(resumable) if names.iter().any(|n| n == resumable.claim) => {
            foreign(&|n| (resumable.owns)(n))?;
            Ok(Existing::Unfinished)
        }
        // No manifest and no claim of ours: everything there is someone else's.
        _ => foreign(&|_| false).map(|()| Existing::Nothing),
    }
}

/// For readers: fails on an unfinished run's folder (a claim, no manifest), and on a finished
/// one whose files no longer match its manifest; returns the manifest of a finished one. Folders
/// magpie did not write pass as they are (`None`).
pub fn require_finished(dir: &Path) -> Result<Option<Manifest>> {
    match Manifest::read(dir)? {
        Some(manifest) => manifest.check_sizes(dir).map(|()| Some(manifest)),
        None if dir.join(RUN_CLAIM).is_file() => {
            let stage = std::fs::read_to_string(dir.join(RUN_CLAIM))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["stage"].as_str().map(str::to_string))
                .unwrap_or_else(|| "run".into());
            bail!(
                "{}: an unfinished magpie {stage} output (no {MANIFEST}: the run was interrupted or is still going); \
                 rerun the same `magpie {stage}` command to finish it",
                dir.display()
            )
        }
        None => Ok(None),
    }
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

/// Removes what a finished output's manifest lists (and the manifest), never anything else.
pub fn clear_finished(dir: &Path) -> Result<()> {
    let Some(manifest) = Manifest::read(dir)? else { return Ok(()) };
    for file in &manifest.files {
        let path = dir.join(file.path.trim_end_matches('/'));
        if file.path.ends_with('/') {
            remove_finished_dir(&path)?;
        } else if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    std::fs::remove_file(dir.join(MANIFEST)).with_context(|| format!("{}: cannot remove", dir.join(MANIFEST).display()))?;
    // Folders the listed files were in, deepest first, when nothing else is left in them.
    let mut folders: Vec<PathBuf> =
        manifest.files.iter().filter_map(|f| Path::new(f.path.trim_end_matches('/')).parent().map(|p| dir.join(p))).filter(|p| p != dir).collect();
    folders.sort();
    folders.dedup();
    for folder in folders.iter().rev() {
        let _ = std::fs::remove_dir(folder);
    }
    Ok(())
}

/// Removes what an unfinished run of ours left in `dir`: the files `owns` names, and the owned
/// folders through their manifests. Anything else stays.
pub fn clear_unfinished(dir: &Path, owns: fn(&str) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = entry.path();
        if is_temporary(&name) || !owns(&name) {
            continue;
        }
        if path.is_dir() {
            remove_finished_dir(&path)?;
        } else {
            std::fs::remove_file(&path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
    }
    Ok(())
}

/// Removes a finished output folder of ours: what its manifest lists, then the folder, which
/// must be empty by then (anything else in it stays, and is an error naming the folder).
pub fn remove_finished_dir(dir: &Path) -> Result<()> {
    clear_finished(dir)?;
    if dir.is_dir() {
        std::fs::remove_dir(dir).with_context(|| format!("{}: still holds files magpie did not write; left in place", dir.display()))?;
    }
    Ok(())
}

/// Removes a temporary file or folder, ignoring failures (it is ours, and only in the way).
pub fn remove_temporary(path: &Path) {
    let _ = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
}

/// Puts a finished temporary (file or folder) in place of `target`: a finished output of ours
/// there is replaced (only the files its manifest lists are removed); then the temporaries that
/// interrupted runs left for `target` are removed.
pub fn commit(tmp: &Path, target: &Path) -> Result<()> {
    if target.is_dir() {
        remove_finished_dir(target)?;
    }
    std::fs::rename(tmp, target).with_context(|| format!("{}: cannot rename into place", target.display()))?;
    sweep_temporaries_of(target);
    Ok(())
}

/// Fills a fresh temporary folder with `fill`, writes its manifest, and commits it to `target`,
/// so a kill never leaves a half-written folder there.
pub fn write_dir(target: &Path, kind: &str, provenance: &Provenance, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(target)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let result = fill(&tmp).and_then(|()| Manifest::write(&tmp, kind, None, provenance)).and_then(|_| commit(&tmp, target));
    if result.is_err() {
        remove_temporary(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provenance() -> Provenance {
        Provenance::new("test", serde_json::json!({"seed": 1}))
    }

    fn rules(overwrite: bool) -> Rules {
        Rules { overwrite, resumable: None }
    }

    #[test]
    fn outputs_that_are_inside_or_around_an_input_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("d/in.parquet");
        std::fs::create_dir_all(input.parent().unwrap()).unwrap();
        std::fs::write(&input, b"x").unwrap();
        let check_to = |out: &Path| check(out, &[input.clone()], &rules(true)).unwrap_err().to_string();
        assert!(check_to(&input).contains("the output is the input"));
        assert!(check_to(&dir.path().join("d")).contains("would contain the input"));
        assert!(check_to(&dir.path().join("./d/../d")).contains("would contain the input"));
        let folder_input = [dir.path().join("d")];
        let error = check(&dir.path().join("d/out"), &folder_input, &rules(true)).unwrap_err().to_string();
        assert!(error.contains("lies inside the input folder"), "{error}");
        assert_eq!(check(&dir.path().join("d/out.parquet"), &[input.clone()], &rules(false)).unwrap(), Existing::Nothing);
    }

    #[test]
    fn a_folder_with_foreign_files_is_refused_even_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("thesis.docx"), b"important").unwrap();
        let error = check(dir.path(), &[], &rules(true)).unwrap_err().to_string();
        assert!(error.contains("holds files magpie did not write (thesis.docx)"), "{error}");
    }

    #[test]
    fn a_finished_output_is_replaced_only_with_overwrite_and_only_what_it_lists() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_dir(&out, "model", &provenance(), |tmp| Ok(std::fs::write(tmp.join("a.bin"), b"old")?)).unwrap();
        assert!(check(&out, &[], &rules(false)).unwrap_err().to_string().contains("pass --overwrite"));
        assert_eq!(check(&out, &[], &rules(true)).unwrap(), Existing::Finished);
        write_dir(&out, "model", &provenance(), |tmp| Ok(std::fs::write(tmp.join("b.bin"), b"new")?)).unwrap();
        assert!(!out.join("a.bin").exists());
        assert_eq!(std::fs::read(out.join("b.bin")).unwrap(), b"new");
        let manifest = Manifest::read(&out).unwrap().unwrap();
        assert_eq!(manifest.files.len(), 1);
        assert_eq!(manifest.files[0].path, "b.bin");
        manifest.check_sizes(&out).unwrap();
        // A file the user put in later is never deleted: the replacement stops instead.
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(write_dir(&out, "model", &provenance(), |_| Ok(())).is_err());
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
    }

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
