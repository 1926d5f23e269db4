//! Removing an output of ours, decided whole before anything is removed.
//!
//! [`Removal::of_finished`] and [`Removal::of_unfinished`] list everything a replacement would
//! remove, and refuse, with nothing removed, when anything there is not ours: a file the
//! manifest does not list, a link (never followed), a file whose size differs from the
//! manifest's, a listed folder without a manifest of its own. Only [`Removal::execute`] removes:
//! the manifests first (the outermost first, so an interruption never leaves a manifest over
//! missing files), then the files, then the folders, deepest first.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::manifest::{is_marker, manifest_path, Manifest};
use super::temp::is_temporary;

/// Everything one replacement removes, in the order it is removed.
#[derive(Debug, Default)]
pub struct Removal {
    manifests: Vec<PathBuf>,
    files: Vec<PathBuf>,
    folders: Vec<PathBuf>,
    /// Run claims, removed after the files: an interrupted removal then still looks like an
    /// unfinished run of ours, which a rerun can clear.
    claims: Vec<PathBuf>,
}

/// What `path` is, without following a link; a link is an error naming it.
fn kind_of(path: &Path) -> Result<Option<std::fs::FileType>> {
    match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_symlink() => {
            bail!("{}: is a symbolic link; magpie never removes through a link, so nothing was removed (remove the link by hand)", path.display())
        }
        Ok(meta) => Ok(Some(meta.file_type())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot stat", path.display())),
    }
}

fn foreign(path: &Path, why: &str) -> anyhow::Error {
    anyhow::anyhow!("{}: {why}; refusing to remove anything (move it out of the way, or choose another output)", path.display())
}

impl Removal {
    /// What replacing the finished output in `dir` removes: what its manifest lists, nested
    /// outputs through their own manifests, and the manifest; with `with_folder`, `dir` itself.
    /// A folder without a manifest may hold only temporaries of ours (it is then empty to us).
    pub fn of_finished(dir: &Path, with_folder: bool) -> Result<Removal> {
        let mut removal = Removal::default();
        removal.add_finished(dir, with_folder)?;
        Ok(removal)
    }

    /// What starting over in place of the unfinished run in `dir` removes: the top-level names
    /// `owns` claims for the stage (nested outputs through their manifests) and the run claim.
    pub fn of_unfinished(dir: &Path, owns: fn(&str) -> bool) -> Result<Removal> {
        let mut removal = Removal::default();
        if kind_of(dir)?.is_none() {
            return Ok(removal);
        }
        for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
            let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
            let name = entry.file_name().to_string_lossy().to_string();
            let path = entry.path();
            if is_temporary(&name) {
                continue;
            }
            if !is_marker(&name) && !owns(&name) {
                return Err(foreign(&path, "was not written by magpie"));
            }
            match kind_of(&path)? {
                Some(t) if t.is_dir() => removal.add_finished(&path, true)?,
                Some(t) if t.is_file() && name.contains("magpie-run") => removal.claims.push(path),
                Some(t) if t.is_file() && is_marker(&name) => removal.manifests.push(path),
                Some(t) if t.is_file() => removal.files.push(path),
                Some(_) => return Err(foreign(&path, "is not a regular file or folder")),
                None => {}
            }
        }
        Ok(removal)
    }

    fn add_finished(&mut self, dir: &Path, with_folder: bool) -> Result<()> {
        match kind_of(dir)? {
            None => return Ok(()),
            Some(t) if !t.is_dir() => return Err(foreign(dir, "is not a folder")),
            Some(_) => {}
        }
        let Some(manifest) = Manifest::read(dir)? else {
            // Only an empty folder (to us) can go.
            for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.flatten() {
                if !is_temporary(&entry.file_name().to_string_lossy()) {
                    return Err(foreign(&entry.path(), "is in a folder that has no magpie manifest"));
                }
            }
            if with_folder {
                self.folders.push(dir.to_path_buf());
            }
            return Ok(());
        };
        self.manifests.push(manifest_path(dir).expect("read above"));
        // Every folder this removal empties, and the names each may hold.
        let mut expected: BTreeSet<PathBuf> = BTreeSet::new();
        let mut folders: BTreeSet<PathBuf> = BTreeSet::from([dir.to_path_buf()]);
        for file in &manifest.files {
            let path = dir.join(file.relative());
            let mut walked = dir.to_path_buf();
            for component in file.relative().parent().into_iter().flat_map(Path::components) {
                walked.push(component);
                match kind_of(&walked)? {
                    Some(t) if t.is_dir() => {
                        folders.insert(walked.clone());
                    }
                    Some(_) => return Err(foreign(&walked, "is listed as a folder by the manifest, but is not one")),
                    None => {}
                }
            }
            expected.insert(path.clone());
            match kind_of(&path)? {
                None => {}
                Some(t) if file.is_folder() && t.is_dir() => self.add_finished(&path, true)?,
                Some(t) if !file.is_folder() && t.is_file() => {
                    let bytes = path.symlink_metadata().map(|m| m.len()).unwrap_or(0);
                    if bytes != file.bytes {
                        return Err(foreign(&path, &format!("holds {bytes} bytes where the manifest says {} (changed since magpie wrote it)", file.bytes)));
                    }
                    self.files.push(path);
                }
                Some(_) => return Err(foreign(&path, "is not what the manifest lists (a file where it lists a folder, or the other way)")),
            }
        }
        for folder in &folders {
            for entry in std::fs::read_dir(folder).with_context(|| format!("{}: cannot list", folder.display()))?.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                let path = entry.path();
                let ours = expected.contains(&path) || folders.contains(&path) || is_temporary(&name) || (folder == dir && is_marker(&name));
                if !ours {
                    return Err(foreign(&path, "was not written by magpie (the manifest does not list it)"));
                }
                // A claim is never listed by a current manifest; a legacy one listed it as a file.
                if folder == dir && name.contains("magpie-run") && !expected.contains(&path) && kind_of(&path)?.is_some_and(|t| t.is_file()) {
                    self.claims.push(path);
                }
            }
        }
        folders.remove(dir);
        self.folders.extend(folders);
        if with_folder {
            self.folders.push(dir.to_path_buf());
        }
        Ok(())
    }

    /// Removes what was planned. Folders go deepest first; one that still holds something
    /// (a temporary of a live run) is an error naming it.
    pub fn execute(mut self) -> Result<()> {
        for path in self.manifests.iter().chain(&self.files).chain(&self.claims) {
            std::fs::remove_file(path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
        self.folders.sort_by_key(|f| std::cmp::Reverse(f.components().count()));
        for folder in &self.folders {
            super::temp::sweep_temporaries(folder, ".");
            std::fs::remove_dir(folder).with_context(|| format!("{}: cannot remove (it still holds something)", folder.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::{write_dir, Provenance};

    fn finished(dir: &Path) {
        write_dir(dir, "training run", &Provenance::new("test", ()), |tmp| {
            std::fs::create_dir_all(tmp.join("logs"))?;
            std::fs::write(tmp.join("logs/metrics.jsonl"), b"{}")?;
            write_dir(&tmp.join("model"), "model", &Provenance::new("test", ()), |m| Ok(std::fs::write(m.join("w.bin"), b"weights")?))
        })
        .unwrap();
    }

    #[test]
    fn a_folder_of_ours_is_removed_whole_manifest_first() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        let removal = Removal::of_finished(&out, true).unwrap();
        assert_eq!(removal.manifests[0], out.join(crate::run::MANIFEST), "the outer manifest goes first");
        removal.execute().unwrap();
        assert!(!out.exists());
    }

    #[test]
    fn a_user_file_deep_inside_stops_the_removal_before_anything_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        std::fs::write(out.join("model/notes.txt"), b"mine").unwrap();
        let error = Removal::of_finished(&out, true).unwrap_err().to_string();
        assert!(error.contains("model/notes.txt") && error.contains("refusing to remove anything"), "{error}");
        assert!(out.join(crate::run::MANIFEST).is_file() && out.join("model/w.bin").is_file() && out.join("logs/metrics.jsonl").is_file());
    }

    #[test]
    fn a_link_inside_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        std::fs::write(victim.join("w.bin"), b"weights").unwrap();
        std::fs::copy(out.join("model").join(crate::run::MANIFEST), victim.join(crate::run::MANIFEST)).unwrap();
        std::fs::remove_dir_all(out.join("model")).unwrap();
        std::os::unix::fs::symlink(&victim, out.join("model")).unwrap();
        let error = Removal::of_finished(&out, true).unwrap_err().to_string();
        assert!(error.contains("is a symbolic link"), "{error}");
        assert!(victim.join("w.bin").is_file() && victim.join(crate::run::MANIFEST).is_file());
    }

    #[test]
    fn a_swapped_file_of_another_size_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        std::fs::write(out.join("logs/metrics.jsonl"), b"the user's own notes").unwrap();
        let error = Removal::of_finished(&out, true).unwrap_err().to_string();
        assert!(error.contains("holds 20 bytes where the manifest says 2"), "{error}");
    }

    #[test]
    fn an_unfinished_run_is_cleared_of_what_the_stage_owns_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(crate::run::RUN_CLAIM), b"{}").unwrap();
        std::fs::write(out.join("metrics.jsonl"), b"{}").unwrap();
        finished(&out.join("checkpoint-1"));
        let owns = |n: &str| n == "metrics.jsonl" || n.starts_with("checkpoint-");
        Removal::of_unfinished(&out, owns).unwrap().execute().unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(Removal::of_unfinished(&out, owns).unwrap_err().to_string().contains("notes.txt"));
    }
}
