//! What marks a folder as a finished output of ours, and how it was made: the manifest (files
//! with sizes, row counts and hashes, the command and its settings), the run claim of a
//! resumable stage, and the provenance a single parquet file carries in its footer.
//!
//! Both markers are hidden files (`.magpie-manifest.json`, `.magpie-run.json`), so that every
//! parquet reader that skips hidden names (pandas, pyarrow, duckdb, HF `datasets`) opens a
//! dataset folder as it is. Folders written with the earlier visible names still read.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::temp::{is_temporary, write_atomically};

/// The completion marker of a finished output folder, written last and removed first.
pub const MANIFEST: &str = ".magpie-manifest.json";

/// The claim a resumable stage (synth, training) writes first into its output folder: the
/// settings a rerun must share. A folder with a claim and no manifest is an unfinished run.
pub const RUN_CLAIM: &str = ".magpie-run.json";

/// The names folders written before the markers were hidden use; read, never written.
const LEGACY_MANIFEST: &str = "magpie-manifest.json";
const LEGACY_RUN_CLAIM: &str = "magpie-run.json";

/// The parquet footer key that holds the provenance of a single file magpie wrote.
pub const FOOTER_KEY: &str = "magpie";

/// Whether `name` is one of the markers (current or legacy), which every stage's folder may hold.
pub fn is_marker(name: &str) -> bool {
    [MANIFEST, RUN_CLAIM, LEGACY_MANIFEST, LEGACY_RUN_CLAIM].contains(&name)
}

/// Whether `name` is a run claim (current or legacy name).
pub fn is_claim(name: &str) -> bool {
    name == RUN_CLAIM || name == LEGACY_RUN_CLAIM
}

/// The manifest file in `dir`, if there is one (the current name first).
pub fn manifest_path(dir: &Path) -> Option<PathBuf> {
    [MANIFEST, LEGACY_MANIFEST].iter().map(|name| dir.join(name)).find(|p| p.symlink_metadata().is_ok())
}

/// The run claim in `dir`, if there is one (the current name first).
pub fn claim_path(dir: &Path) -> Option<PathBuf> {
    [RUN_CLAIM, LEGACY_RUN_CLAIM].iter().map(|name| dir.join(name)).find(|p| p.symlink_metadata().is_ok())
}

/// The settings an unfinished run in `dir` was claimed with, or `None` when there is no claim. A
/// damaged claim is an error that says what to delete.
pub fn read_claim(dir: &Path) -> Result<Option<Value>> {
    let Some(path) = claim_path(dir) else { return Ok(None) };
    let damaged = |why: &str| {
        format!(
            "{}: {why}, so what ran in {} is unknown; if you do not need that run, delete the folder by hand (rm -r {}) or choose another output",
            path.display(),
            dir.display(),
            dir.display()
        )
    };
    let text = std::fs::read_to_string(&path).with_context(|| damaged("cannot be read"))?;
    let claim: Value = serde_json::from_str(&text).with_context(|| damaged("is damaged (not JSON)"))?;
    if !claim["stage"].is_string() {
        bail!(damaged("is damaged (no `stage`)"));
    }
    Ok(Some(claim))
}

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

    /// What a single parquet file carries in its footer under [`FOOTER_KEY`].
    pub fn footer_value(&self) -> String {
        serde_json::json!({ "tool": tool(), "provenance": self }).to_string()
    }
}

/// The tool and provenance magpie left in a parquet file's footer; `None` for other files.
pub fn provenance_of(path: &Path) -> Option<Value> {
    let file = std::fs::File::open(path).ok()?;
    let reader = parquet::file::reader::SerializedFileReader::new(file).ok()?;
    let metadata = parquet::file::reader::FileReader::metadata(&reader).file_metadata().key_value_metadata()?.clone();
    let value = metadata.iter().find(|kv| kv.key == FOOTER_KEY)?.value.clone()?;
    serde_json::from_str(&value).ok()
}

/// The row count a parquet file's footer states.
pub fn parquet_rows(path: &Path) -> Result<u64> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = parquet::file::reader::SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable parquet file (truncated, or not parquet at all)", path.display()))?;
    Ok(parquet::file::reader::FileReader::metadata(&reader).file_metadata().num_rows() as u64)
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Relative to the output folder, `/`-separated, normalised and inside it. A sub-folder with
    /// a manifest of its own (a model, a checkpoint) is one entry ending in `/`, hashed through
    /// its manifest.
    pub path: String,
    pub bytes: u64,
    pub xxh3: String,
    /// A parquet file's row count, from its footer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

impl FileEntry {
    /// Whether the entry is a nested output folder (with a manifest of its own).
    pub fn is_folder(&self) -> bool {
        self.path.ends_with('/')
    }

    /// The entry's path relative to its folder, without the trailing `/` of a nested folder.
    pub fn relative(&self) -> &Path {
        Path::new(self.path.trim_end_matches('/'))
    }
}

/// Whether a manifest's path stays inside its folder: relative, with no empty, `.` or `..`
/// component (a trailing `/` marks a nested folder).
fn is_inside(path: &str) -> bool {
    let body = path.strip_suffix('/').unwrap_or(path);
    !body.is_empty() && !body.starts_with('/') && !body.contains('\0') && body.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub tool: String,
    /// `dataset`, `model`, `checkpoint`, `training run` or `eval`.
    pub kind: String,
    pub rows: Option<u64>,
    pub files: Vec<FileEntry>,
    #[serde(flatten)]
    pub provenance: Provenance,
}

impl Manifest {
    /// The manifest of `dir`, or `None` when it has none. A manifest that names a path outside
    /// its folder is refused, naming the entry: nothing may act on it.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let Some(path) = manifest_path(dir) else { return Ok(None) };
        if dir.join(LEGACY_MANIFEST).symlink_metadata().is_ok() && path != dir.join(LEGACY_MANIFEST) {
            bail!("{}: holds two manifests ({MANIFEST} and {LEGACY_MANIFEST}); remove the stale one by hand", dir.display());
        }
        if path.symlink_metadata().is_ok_and(|m| !m.is_file()) {
            bail!("{}: not a regular file (a link or a folder), so not a manifest magpie wrote; remove it by hand", path.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{}: not a magpie manifest", path.display()))?;
        if let Some(bad) = manifest.files.iter().find(|f| !is_inside(&f.path)) {
            bail!(
                "{}: lists `{}`, which is not a relative path inside {}; the manifest was not written by magpie or was edited, so nothing it names is touched",
                path.display(),
                bad.path,
                dir.display()
            );
        }
        Ok(Some(manifest))
    }

    /// Lists and hashes every file under `dir` (temporaries excluded; row counts of parquet
    /// files from their footers), then writes the manifest, atomically and last.
    pub fn write(dir: &Path, kind: &str, rows: Option<u64>, provenance: &Provenance) -> Result<Manifest> {
        let mut files = vec![];
        list_files(dir, "", &mut files)?;
        let manifest = Manifest { tool: tool(), kind: kind.to_string(), rows, files, provenance: provenance.clone() };
        write_atomically(&dir.join(MANIFEST), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        Ok(manifest)
    }

    /// The names directly in the folder that the manifest accounts for (markers included).
    pub fn top_level_names(&self) -> std::collections::BTreeSet<String> {
        self.files.iter().map(|f| f.path.split('/').next().unwrap_or("").to_string()).collect()
    }

    /// For readers, and cheap: fails unless every listed file is in `dir` with its size, and
    /// every parquet file's footer states the listed row count (a part swapped for another of
    /// the same size is caught here).
    pub fn check_files(&self, dir: &Path) -> Result<()> {
        let changed = "the output was changed after magpie wrote it";
        let manifest = dir.join(MANIFEST);
        for file in &self.files {
            let path = dir.join(file.relative());
            let bytes = if file.is_folder() { Some(file.bytes) } else { std::fs::metadata(&path).ok().map(|m| m.len()) };
            match bytes {
                None => bail!("{}: missing, but {} lists it; {changed}", path.display(), manifest.display()),
                Some(b) if b != file.bytes => bail!("{}: {b} bytes, but {} says {}; {changed}", path.display(), manifest.display(), file.bytes),
                Some(_) => {}
            }
            if let Some(rows) = file.rows {
                let found = parquet_rows(&path)?;
                if found != rows {
                    bail!("{}: {found} rows, but {} says {rows}; {changed}", path.display(), manifest.display());
                }
            }
        }
        Ok(())
    }

    /// `magpie inspect --verify`: also every file's xxh3 hash, and nested outputs through their
    /// own manifests.
    pub fn verify(&self, dir: &Path) -> Result<()> {
        self.check_files(dir)?;
        for file in &self.files {
            let path = dir.join(file.relative());
            let hashed = if file.is_folder() { manifest_path(&path).with_context(|| format!("{}: has no manifest", path.display()))? } else { path.clone() };
            let found = hash_file(&hashed)?;
            if found != file.xxh3 {
                bail!("{}: its xxh3 hash is {found}, but {} says {}; the output was changed after magpie wrote it", hashed.display(), dir.join(MANIFEST).display(), file.xxh3);
            }
            if file.is_folder()
                && let Some(nested) = Manifest::read(&path)?
            {
                nested.verify(&path)?;
            }
        }
        Ok(())
    }
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<FileEntry>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().to_string();
        if is_temporary(&name) || (prefix.is_empty() && is_marker(&name)) {
            continue;
        }
        let path = entry.path();
        let relative = format!("{prefix}{name}");
        let file_type = entry.file_type().with_context(|| format!("{}: cannot stat", path.display()))?;
        if file_type.is_symlink() {
            bail!("{}: a symbolic link in an output magpie is finishing; outputs hold only files magpie wrote", path.display());
        }
        if file_type.is_dir() {
            if let Some(nested) = Manifest::read(&path)? {
                let bytes = nested.files.iter().map(|f| f.bytes).sum();
                let xxh3 = hash_file(&manifest_path(&path).expect("read above"))?;
                out.push(FileEntry { path: format!("{relative}/"), bytes, xxh3, rows: None });
            } else {
                list_files(&path, &format!("{relative}/"), out)?;
            }
        } else {
            let bytes = entry.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
            let rows = if name.ends_with(".parquet") { Some(parquet_rows(&path)?) } else { None };
            out.push(FileEntry { path: relative, bytes, xxh3: hash_file(&path)?, rows });
        }
    }
    Ok(())
}

pub fn hash_file(path: &Path) -> Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_paths_must_stay_inside_the_folder() {
        for good in ["part-00000.parquet", "model/", "checkpoint-2/", "a/b.json"] {
            assert!(is_inside(good), "{good}");
        }
        for bad in ["/abs/victim.txt", "../../victim.txt", "a/../../b", "./x", "a//b", "", "/", "model//"] {
            assert!(!is_inside(bad), "{bad}");
        }
    }

    #[test]
    fn a_manifest_naming_a_path_outside_its_folder_is_refused_naming_the_entry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"x").unwrap();
        Manifest::write(dir.path(), "model", None, &Provenance::new("test", ())).unwrap();
        let path = dir.path().join(MANIFEST);
        let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        manifest["files"].as_array_mut().unwrap().push(serde_json::json!({"path": "../victim.txt", "bytes": 9, "xxh3": "0"}));
        std::fs::write(&path, manifest.to_string()).unwrap();
        let error = Manifest::read(dir.path()).unwrap_err().to_string();
        assert!(error.contains("lists `../victim.txt`, which is not a relative path inside"), "{error}");
    }

    #[test]
    fn legacy_marker_names_still_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.bin"), b"x").unwrap();
        Manifest::write(dir.path(), "model", None, &Provenance::new("test", ())).unwrap();
        std::fs::rename(dir.path().join(MANIFEST), dir.path().join(LEGACY_MANIFEST)).unwrap();
        let manifest = Manifest::read(dir.path()).unwrap().unwrap();
        assert_eq!(manifest.files.len(), 1);
        std::fs::write(dir.path().join(LEGACY_RUN_CLAIM), br#"{"stage": "synth", "settings": {}}"#).unwrap();
        assert_eq!(read_claim(dir.path()).unwrap().unwrap()["stage"], "synth");
    }

    #[test]
    fn a_damaged_claim_says_what_to_delete() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUN_CLAIM), b"{not json").unwrap();
        let error = format!("{:#}", read_claim(dir.path()).unwrap_err());
        assert!(error.contains("is damaged (not JSON)") && error.contains(&format!("rm -r {}", dir.path().display())), "{error}");
    }
}
