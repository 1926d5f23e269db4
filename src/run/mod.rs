//! The floor every stage's output stands on, one life cycle for all of them:
//!
//! ```text
//!   check (guard)  ──►  claim (resumable stages)  ──►  write under temporaries  ──►  finish
//!   not an input,       .magpie-run.json: the          .NAME.magpie-tmp-PID,          .magpie-manifest.json
//!   not a link,         settings a rerun must          renamed into place             written last; a replaced
//!   nothing foreign     share                          as each piece is done          output is removed as planned
//! ```
//!
//! - [`dir`]: a resumable stage's folder ([`RunDir`]): the claim, the settings diff, resume or
//!   start over, and the manifest at the end (`data::chunks` writes such a folder chunk by
//!   chunk, for the shards of a job). One-shot outputs (filter, eval, models) are
//!   written whole under a temporary and committed ([`write_dir`], `data::DatasetWriter`).
//! - [`guard`]: what may already be at the output path, and [`require_finished`] for readers.
//! - [`lock`]: one writer at a time in a training run's folder.
//! - [`manifest`]: the markers (hidden, so parquet readers skip them), provenance, hashes.
//! - [`remove`]: what `--overwrite`, `save_total_limit` and a commit remove, planned whole first.
//! - [`temp`]: hidden temporaries and their sweeping.

mod dir;
mod guard;
mod lock;
mod manifest;
mod remove;
mod temp;

pub use dir::{Opened, Prepared, Resuming, RunDir};
pub use guard::{check, check_not_an_input, differing_keys, refuse_unfinished_empty, require_finished, Rules};
pub use manifest::{parquet_rows, provenance_of, tool, Manifest, Provenance, FOOTER_KEY, MANIFEST};
pub use temp::{remove_temporary, temporary_sibling, write_atomically, TMP_MARK};

use remove::Removal;
use temp::sweep_temporaries_of;

use anyhow::{Context, Result};
use std::path::Path;

/// Removes a finished output folder of ours whole (see [`Removal::of_finished`]).
pub fn remove_finished_dir(dir: &Path) -> Result<()> {
    Removal::of_finished(dir, true)?.execute()
}

/// Puts a finished temporary (file or folder) in place of `target`: a finished output of ours
/// there is replaced (planned whole first, see [`Removal`]); then the temporaries that
/// interrupted runs left for `target` are removed.
pub fn commit(tmp: &Path, target: &Path) -> Result<()> {
    match remove::lstat(target) {
        Ok(meta) if meta.file_type().is_symlink() => {
            anyhow::bail!("{}: is a symbolic link; magpie never writes or removes through a link", target.display())
        }
        // The old output moves aside, the new one takes its name, then the old one goes.
        Ok(meta) if meta.is_dir() => Removal::of_finished(target, true)?.execute_replacing(Some(tmp))?,
        _ => std::fs::rename(tmp, target).with_context(|| format!("{}: cannot rename into place", target.display()))?,
    }
    sweep_temporaries_of(target);
    Ok(())
}

/// Fills a fresh temporary folder with `fill`, writes its manifest, and commits it to `target`,
/// so a kill never leaves a half-written folder there.
pub fn write_dir(target: &Path, kind: &str, provenance: &Provenance, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(target)?;
    remove_temporary(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    let result = fill(&tmp).and_then(|()| Manifest::write(&tmp, kind, None, provenance)).and_then(|_| commit(&tmp, target));
    if result.is_err() {
        remove_temporary(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::guard::Existing;
    use super::*;
    use std::path::PathBuf;

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
        let check_to = |out: &Path| check(out, std::slice::from_ref(&input), &rules(true)).unwrap_err().to_string();
        assert!(check_to(&input).contains("the output is the input"));
        assert!(check_to(&dir.path().join("d")).contains("would contain the input"));
        assert!(check_to(&dir.path().join("./d/../d")).contains("would contain the input"));
        let folder_input: [PathBuf; 1] = [dir.path().join("d")];
        let error = check(&dir.path().join("d/out"), &folder_input, &rules(true)).unwrap_err().to_string();
        assert!(error.contains("lies inside the input folder"), "{error}");
        assert_eq!(check(&dir.path().join("d/out.parquet"), std::slice::from_ref(&input), &rules(false)).unwrap(), Existing::Nothing);
    }

    #[test]
    fn a_folder_with_foreign_files_is_refused_even_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("thesis.docx"), b"important").unwrap();
        let error = check(dir.path(), &[], &rules(true)).unwrap_err().to_string();
        assert!(error.contains("holds files magpie did not write (thesis.docx)"), "{error}");
    }

    #[test]
    fn an_output_path_that_is_a_link_is_refused_and_its_target_kept() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        write_dir(&real, "model", &provenance(), |tmp| Ok(std::fs::write(tmp.join("a.bin"), b"old")?)).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // With a trailing slash, the system follows the link even for `lstat`.
        for output in [link.clone(), PathBuf::from(format!("{}/", link.display()))] {
            let error = check(&output, &[], &rules(true)).unwrap_err().to_string();
            assert!(error.contains("is a symbolic link"), "{error}");
            assert!(commit(&dir.path().join("new"), &output).unwrap_err().to_string().contains("is a symbolic link"));
        }
        assert!(write_dir(&link, "model", &provenance(), |_| Ok(())).is_err());
        assert!(real.join("a.bin").is_file() && real.join(MANIFEST).is_file());
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
        manifest.check_files(&out).unwrap();
        // A file the user put in later is never deleted: the replacement stops instead, before
        // removing anything.
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(write_dir(&out, "model", &provenance(), |_| Ok(())).is_err());
        assert_eq!(std::fs::read(out.join("notes.txt")).unwrap(), b"mine");
        assert!(out.join("b.bin").is_file() && out.join(MANIFEST).is_file());
    }

    #[test]
    fn overwrite_refuses_a_user_file_deep_inside_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_dir(&out, "eval", &provenance(), |tmp| write_dir(&tmp.join("model"), "model", &provenance(), |m| Ok(std::fs::write(m.join("w.bin"), b"w")?))).unwrap();
        std::fs::write(out.join("model/notes.txt"), b"mine").unwrap();
        let error = check(&out, &[], &rules(true)).unwrap_err().to_string();
        assert!(error.contains("model/notes.txt"), "{error}");
    }

    #[test]
    fn a_manifest_naming_outside_paths_removes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_dir(&out, "model", &provenance(), |tmp| Ok(std::fs::write(tmp.join("a.bin"), b"old")?)).unwrap();
        let victim = dir.path().join("victim.txt");
        std::fs::write(&victim, b"precious").unwrap();
        let path = out.join(MANIFEST);
        for named in [victim.display().to_string(), "../victim.txt".to_string()] {
            let mut manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            manifest["files"].as_array_mut().unwrap().push(serde_json::json!({"path": named, "bytes": 8, "xxh3": "0"}));
            std::fs::write(out.join("edited.json"), manifest.to_string()).unwrap();
            std::fs::copy(out.join("edited.json"), &path).unwrap();
            std::fs::remove_file(out.join("edited.json")).unwrap();
            assert!(check(&out, &[], &rules(true)).is_err());
            assert!(write_dir(&out, "model", &provenance(), |_| Ok(())).is_err());
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "{named}");
            assert!(out.join("a.bin").is_file());
        }
    }

    #[test]
    fn a_part_swapped_for_another_of_the_same_size_is_caught_by_its_row_count() {
        use arrow::array::{Int64Array, RecordBatch};
        let dir = tempfile::tempdir().unwrap();
        let batch = |values: Vec<i64>| RecordBatch::try_from_iter([("x", std::sync::Arc::new(Int64Array::from(values)) as _)]).unwrap();
        let write = |path: &Path, values: Vec<i64>| {
            let mut writer = parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch(vec![0]).schema(), None).unwrap();
            writer.write(&batch(values)).unwrap();
            writer.close().unwrap();
        };
        let out = dir.path().join("out");
        write_dir(&out, "dataset", &provenance(), |tmp| {
            write(&tmp.join("part-00000.parquet"), vec![1, 2, 3, 4]);
            Ok(())
        })
        .unwrap();
        let mut manifest = Manifest::read(&out).unwrap().unwrap();
        assert_eq!(manifest.files[0].rows, Some(4));
        manifest.check_files(&out).unwrap();
        // A same-size part with other rows: what the footer says is compared, not only the size.
        manifest.files[0].rows = Some(5);
        write_atomically(&out.join(MANIFEST), serde_json::to_string(&manifest).unwrap().as_bytes()).unwrap();
        let error = require_finished(&out).unwrap_err().to_string();
        assert!(error.contains("4 rows, but") && error.contains("says 5"), "{error}");
    }

    #[test]
    fn a_folder_of_only_temporaries_is_unfinished_to_a_reader_of_the_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!(".part-00000.parquet{TMP_MARK}1")), b"half").unwrap();
        let error = refuse_unfinished_empty(dir.path()).unwrap_err().to_string();
        assert!(error.contains("holds only magpie temporaries"), "{error}");
        // A file read from the same folder (a stage's scratch file beside its temporaries) is fine.
        assert!(require_finished(dir.path()).unwrap().is_none());
    }

    #[test]
    fn hashes_are_checked_by_verify() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        write_dir(&out, "model", &provenance(), |tmp| Ok(std::fs::write(tmp.join("a.bin"), b"old")?)).unwrap();
        let manifest = Manifest::read(&out).unwrap().unwrap();
        manifest.verify(&out).unwrap();
        std::fs::write(out.join("a.bin"), b"new").unwrap();
        manifest.check_files(&out).unwrap();
        assert!(manifest.verify(&out).unwrap_err().to_string().contains("xxh3 hash"));
    }
}
