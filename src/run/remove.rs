//! Removing an output of ours, decided whole before anything is removed.
//!
//! [`Removal::of_finished`] and [`Removal::of_unfinished`] list everything a replacement would
//! remove, and refuse, with nothing removed, when anything there is not ours: a file the
//! manifest does not list, a link (never followed), a file whose size differs from the
//! manifest's, a listed folder without a manifest of its own. Only [`Removal::execute`] removes.
//! A folder that goes whole (a checkpoint, a nested `model/`, a replaced output) is first renamed
//! to a hidden temporary beside it, in one step, so an interruption leaves a temporary, never a
//! half-removed folder under its real name; a folder cleared in place loses its manifest first, so
//! it never shows a manifest over missing files, and its run claim last, so it still reads as an
//! unfinished run of ours that a rerun can clear.

use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::manifest::{is_claim, is_marker, manifest_path, Manifest};
use super::temp::{is_temporary, temporary_sibling};

/// Everything one replacement removes.
#[derive(Debug, Default)]
pub struct Removal {
    /// The folder itself, when it goes whole (renamed aside first).
    whole: Option<PathBuf>,
    /// The folder's manifest, removed first.
    manifest: Option<PathBuf>,
    /// Nested outputs (with manifests of their own), each removed whole.
    nested: Vec<Removal>,
    files: Vec<PathBuf>,
    /// Plain folders the listed files are in, removed deepest first once empty.
    folders: Vec<PathBuf>,
    /// Run claims, removed after the files.
    claims: Vec<PathBuf>,
}

/// `path`'s own metadata, never a link's target's: a link named with a trailing slash (`out/`)
/// is followed by the system even where it is asked not to, so the slashes are dropped first.
pub(super) fn lstat(path: &Path) -> std::io::Result<std::fs::Metadata> {
    std::fs::symlink_metadata(path.components().collect::<PathBuf>())
}

/// What `path` is, without following a link; a link is an error naming it.
fn kind_of(path: &Path) -> Result<Option<std::fs::FileType>> {
    match lstat(path) {
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
    /// outputs through their own manifests, and the manifest; with `whole`, `dir` itself.
    /// A folder without a manifest may hold only temporaries of ours (it is then empty to us).
    pub fn of_finished(dir: &Path, whole: bool) -> Result<Removal> {
        let mut removal = Removal::default();
        match kind_of(dir)? {
            None => return Ok(removal),
            Some(t) if !t.is_dir() => return Err(foreign(dir, "is not a folder")),
            Some(_) => {}
        }
        if whole {
            removal.whole = Some(dir.to_path_buf());
        }
        let Some(manifest) = Manifest::read(dir)? else {
            for entry in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.flatten() {
                if !is_temporary(&entry.file_name().to_string_lossy()) {
                    return Err(foreign(&entry.path(), "is in a folder that has no magpie manifest"));
                }
            }
            return Ok(removal);
        };
        removal.manifest = manifest_path(dir);
        // Every folder this removal empties, and the paths each may hold.
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
                Some(t) if file.is_folder() && t.is_dir() => removal.nested.push(Removal::of_finished(&path, true)?),
                Some(t) if !file.is_folder() && t.is_file() => {
                    let bytes = path.symlink_metadata().map(|m| m.len()).unwrap_or(0);
                    if bytes != file.bytes {
                        return Err(foreign(&path, &format!("holds {bytes} bytes where the manifest says {} (changed since magpie wrote it)", file.bytes)));
                    }
                    removal.files.push(path);
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
                if folder == dir && is_claim(&name) && !expected.contains(&path) && kind_of(&path)?.is_some_and(|t| t.is_file()) {
                    removal.claims.push(path);
                }
            }
        }
        folders.remove(dir);
        removal.folders.extend(folders);
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
            if !is_claim(&name) && !owns(&name) {
                return Err(foreign(&path, "was not written by magpie"));
            }
            match kind_of(&path)? {
                Some(t) if t.is_dir() => removal.nested.push(Removal::of_finished(&path, true)?),
                Some(t) if t.is_file() && is_claim(&name) => removal.claims.push(path),
                Some(t) if t.is_file() => removal.files.push(path),
                Some(_) => return Err(foreign(&path, "is not a regular file or folder")),
                None => {}
            }
        }
        Ok(removal)
    }

    /// Every path the removal touches, to compare a plan made earlier with one made now.
    fn paths(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = self.whole.iter().chain(&self.manifest).chain(&self.files).chain(&self.folders).chain(&self.claims).cloned().collect();
        out.extend(self.nested.iter().flat_map(Removal::paths));
        out.sort();
        out
    }

    /// Whether `other` (the same removal planned again) would remove exactly the same paths.
    pub fn same_as(&self, other: &Removal) -> bool {
        self.paths() == other.paths()
    }

    /// The plan with every path under `from` moved under `to` (the folder renamed aside).
    fn rebased(self, from: &Path, to: &Path) -> Removal {
        let move_path = |p: PathBuf| p.strip_prefix(from).map(|rest| to.join(rest)).unwrap_or(p);
        let move_all = |v: Vec<PathBuf>| v.into_iter().map(move_path).collect();
        Removal {
            whole: self.whole.map(move_path),
            manifest: self.manifest.map(move_path),
            nested: self.nested.into_iter().map(|n| n.rebased(from, to)).collect(),
            files: move_all(self.files),
            folders: move_all(self.folders),
            claims: move_all(self.claims),
        }
    }

    /// Removes what was planned. A folder that goes whole is renamed aside first; folders go
    /// deepest first, and one that still holds something (a temporary of a live run) is an error
    /// naming it.
    pub fn execute(self) -> Result<()> {
        self.execute_replacing(None)
    }

    /// As [`Removal::execute`]; with `replacement`, that folder is renamed into the place of the
    /// folder going whole as soon as the old one is aside, before the old one's files go.
    pub fn execute_replacing(self, replacement: Option<&Path>) -> Result<()> {
        let mut plan = self;
        if let Some(root) = plan.whole.take() {
            let aside = PathBuf::from(format!("{}.removing", temporary_sibling(&root)?.display()));
            std::fs::rename(&root, &aside).with_context(|| format!("{}: cannot move aside to remove", root.display()))?;
            if let Some(new) = replacement {
                std::fs::rename(new, &root).with_context(|| format!("{}: cannot rename into place", root.display()))?;
            }
            plan = plan.rebased(&root, &aside);
            plan.folders.push(aside);
        }
        if let Some(manifest) = &plan.manifest {
            std::fs::remove_file(manifest).with_context(|| format!("{}: cannot remove", manifest.display()))?;
        }
        for nested in std::mem::take(&mut plan.nested) {
            nested.execute()?;
        }
        for path in plan.files.iter().chain(&plan.claims) {
            std::fs::remove_file(path).with_context(|| format!("{}: cannot remove", path.display()))?;
        }
        plan.folders.sort_by_key(|f| std::cmp::Reverse(f.components().count()));
        for folder in &plan.folders {
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
    fn a_folder_of_ours_is_removed_whole_and_a_cleared_one_loses_its_manifest_first() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        Removal::of_finished(&out, true).unwrap().execute().unwrap();
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the folder moved aside is gone too");
        finished(&out);
        let removal = Removal::of_finished(&out, false).unwrap();
        assert_eq!(removal.manifest.as_deref(), Some(out.join(crate::run::MANIFEST).as_path()), "the outer manifest goes first");
        removal.execute().unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
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
    fn an_interrupted_whole_removal_leaves_only_a_temporary() {
        // Killed right after the rename aside: the real name is free, and what is left is a
        // temporary of a dead process, which the next sweep removes.
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("checkpoint-2");
        finished(&out);
        let aside = dir.path().join(format!(".checkpoint-2{}999999999.removing", crate::run::TMP_MARK));
        std::fs::rename(&out, &aside).unwrap();
        super::super::temp::sweep_temporaries(dir.path(), ".checkpoint-2.");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn an_unfinished_run_is_cleared_of_what_the_stage_owns_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join(super::super::manifest::RUN_CLAIM), b"{}").unwrap();
        std::fs::write(out.join("metrics.jsonl"), b"{}").unwrap();
        finished(&out.join("checkpoint-1"));
        let owns = |n: &str| n == "metrics.jsonl" || n.starts_with("checkpoint-");
        Removal::of_unfinished(&out, owns).unwrap().execute().unwrap();
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(Removal::of_unfinished(&out, owns).unwrap_err().to_string().contains("notes.txt"));
    }

    #[test]
    fn two_manifests_in_one_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        finished(&out);
        std::fs::copy(out.join(crate::run::MANIFEST), out.join("magpie-manifest.json")).unwrap();
        assert!(Removal::of_finished(&out, false).unwrap_err().to_string().contains("holds two manifests"));
    }
}
