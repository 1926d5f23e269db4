//! A resumable stage's output folder (synth's chunks, training's checkpoints): the guards, the
//! run claim and the settings diff in one place, so each stage only says how it resumes.
//!
//! [`RunDir::prepare`] checks the target, reads the claim an earlier run left, compares its
//! settings with this run's and plans what `--overwrite` replaces (see [`super::Removal`]):
//! everything is decided, nothing is touched. [`Prepared::apply`], once the stage has loaded
//! what it needs, carries out the removal and writes this run's claim. A run resumed on a flag
//! (training) holds its folder's [`super::lock`] to its end, from `prepare` where it finds a
//! claim and from `apply` where it writes the first. [`RunDir::finish`]
//! sweeps the temporaries interrupted runs left and writes the manifest, last.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use super::guard::{check, differing_keys, Existing, Rules};
use super::lock;
use super::manifest::{claim_path, is_marker, read_claim, Manifest, Provenance, RUN_CLAIM};
use super::remove::{lstat, Removal};
use super::temp::{is_temporary, sweep_temporaries, write_atomically};

/// How a rerun of the same command treats an unfinished run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resuming {
    /// A rerun continues it (synth: finished chunks are skipped).
    Always,
    /// Only with the stage's `--resume` flag, given or not (training).
    OnFlag(bool),
}

/// What a stage's run does in the folder [`RunDir::prepare`] decided on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Opened {
    /// Starts from nothing (the folder was empty, or `--overwrite` cleared it).
    Fresh,
    /// Continues an unfinished run with the same settings.
    Resume,
    /// A finished run with the same settings is there: nothing to do (`Resuming::Always` only).
    Finished,
}

/// A resumable stage's output folder, opened.
pub struct RunDir {
    pub dir: PathBuf,
    owns: fn(&str) -> bool,
    /// The lock on the claim, held while the run goes on (training runs).
    _lock: Option<std::fs::File>,
}

/// What `--overwrite` replaces in the folder.
#[derive(Clone, Copy, PartialEq)]
enum Replaces {
    Finished,
    Unfinished,
}

/// What [`RunDir::prepare`] decided, not yet carried out.
pub struct Prepared {
    dir: PathBuf,
    owns: fn(&str) -> bool,
    pub opened: Opened,
    removal: Option<(Replaces, Removal)>,
    claim: Value,
    /// Whether the run holds the folder's lock: taken at `prepare` on an earlier claim, and on
    /// this run's own once written.
    locks: bool,
    lock: Option<std::fs::File>,
}

/// Locks the run claim in `dir` (the folder itself, never through a link), if there is one:
/// whether there was one, and the lock (`None` where the filesystem has no locks).
fn lock_claim(dir: &Path) -> Result<(bool, Option<std::fs::File>)> {
    match claim_path(dir).filter(|_| lstat(dir).is_ok_and(|m| m.is_dir())) {
        Some(claim) => Ok((true, lock::hold(dir, &claim)?)),
        None => Ok((false, None)),
    }
}

fn plan(dir: &Path, replaces: Replaces, owns: fn(&str) -> bool) -> Result<Removal> {
    match replaces {
        Replaces::Finished => Removal::of_finished(dir, false),
        Replaces::Unfinished => Removal::of_unfinished(dir, owns),
    }
}

impl Prepared {
    /// Removes what `--overwrite` replaces, creates the folder and writes the claim. The removal
    /// is planned again first and must be the one planned at [`RunDir::prepare`]: what changed in
    /// the folder since then is refused, with nothing removed.
    pub fn apply(self) -> Result<RunDir> {
        if let Some((replaces, planned)) = self.removal {
            let now = plan(&self.dir, replaces, self.owns)?;
            if !now.same_as(&planned) {
                bail!("{}: changed while this run was starting; nothing was removed (rerun the command)", self.dir.display());
            }
            now.execute()?;
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("{}: cannot create the output folder", self.dir.display()))?;
        let mut lock = self.lock;
        if self.opened == Opened::Fresh {
            let claim = self.dir.join(RUN_CLAIM);
            if self.locks {
                // The removal took any earlier claim: a claim there now is another run's. The run
                // id tells this run's claim from one that another run put in its place.
                let mut value = self.claim;
                value["run"] = json!(lock::run_id());
                lock = lock::write_locked(&self.dir, &claim, serde_json::to_string_pretty(&value)?.as_bytes())?;
            } else {
                write_atomically(&claim, serde_json::to_string_pretty(&self.claim)?.as_bytes())?;
            }
        }
        Ok(RunDir { dir: self.dir, owns: self.owns, _lock: lock })
    }
}

impl RunDir {
    /// Decides how `stage`'s run with `settings` (what a resumed run must share) goes in `dir`;
    /// `owns` names what the stage writes into the folder besides the markers. Refusals and the
    /// removal plan come now, before the stage loads anything; nothing is changed yet.
    pub fn prepare(
        dir: &Path,
        inputs: &[PathBuf],
        stage: &str,
        settings: &Value,
        owns: fn(&str) -> bool,
        overwrite: bool,
        resuming: Resuming,
    ) -> Result<Prepared> {
        if resuming == Resuming::OnFlag(true) && overwrite {
            bail!("--resume and --overwrite contradict each other");
        }
        // Before the folder is looked at: a run still writing it refuses this one (a run that
        // ends meanwhile changes what is there).
        let locks = matches!(resuming, Resuming::OnFlag(_));
        let look = || check(dir, inputs, &Rules { overwrite, resumable: Some(owns) });
        let (held, mut lock) = if locks { lock_claim(dir)? } else { (false, None) };
        let mut existing = look()?;
        // A claim that appeared meanwhile (a run starting): locked, and the folder looked at again.
        if locks && !held && claim_path(dir).is_some() {
            (_, lock) = lock_claim(dir)?;
            existing = look()?;
        }
        let shown = dir.display();
        // A damaged claim cannot block replacing a finished output: it is not read then.
        let replacing_finished = existing == Existing::Finished && overwrite;
        let earlier = if existing == Existing::Nothing || replacing_finished { None } else { read_claim(dir)? };
        let differing = earlier.as_ref().map(|claim| {
            let mut keys = vec![];
            differing_keys("", &claim["settings"], settings, &mut keys);
            keys
        });
        let ours = earlier.as_ref().is_some_and(|claim| claim["stage"] == stage);
        let mut removal = None;
        let opened = match existing {
            Existing::Nothing if resuming == Resuming::OnFlag(true) => bail!("{shown}: --resume, but there is nothing to resume here (no run claim, no checkpoint)"),
            Existing::Nothing => Opened::Fresh,
            Existing::Finished if resuming == Resuming::OnFlag(true) => {
                bail!("{shown}: holds a finished {stage} run; nothing to resume (--overwrite runs it again in its place)")
            }
            Existing::Finished if overwrite => {
                removal = Some((Replaces::Finished, plan(dir, Replaces::Finished, owns)?));
                Opened::Fresh
            }
            Existing::Finished if !ours => {
                bail!("{shown}: holds a finished magpie output that is not a {stage} run; pass --overwrite to replace it, or use another --output")
            }
            Existing::Finished => match (resuming, differing.as_deref()) {
                (Resuming::Always, Some([])) => Opened::Finished,
                (Resuming::Always, Some(keys)) => bail!(
                    "{shown}: holds a finished {stage} run with other settings ({}); pass --overwrite to replace it, or use another --output",
                    keys.join(", ")
                ),
                _ => bail!("{shown}: holds a finished {stage} run; pass --overwrite to replace it"),
            },
            Existing::Unfinished if overwrite && resuming != Resuming::Always => {
                removal = Some((Replaces::Unfinished, plan(dir, Replaces::Unfinished, owns)?));
                Opened::Fresh
            }
            Existing::Unfinished if resuming == Resuming::OnFlag(false) => {
                bail!("{shown}: holds an unfinished {stage} run; pass --resume to continue it or --overwrite to start over")
            }
            Existing::Unfinished if !ours => bail!("{shown}: holds an unfinished magpie run that is not a {stage} run; choose another output"),
            Existing::Unfinished => match differing.as_deref() {
                Some([]) => Opened::Resume,
                keys => bail!(
                    "{shown}: holds an unfinished {stage} run with other settings ({}); rerun it with the same ones, or use another --output",
                    keys.unwrap_or_default().join(", ")
                ),
            },
        };
        Ok(Prepared { dir: dir.to_path_buf(), owns, opened, removal, claim: json!({ "stage": stage, "settings": settings }), locks, lock })
    }

    /// Marks the run finished: removes the temporaries (names starting with `prefix`) that
    /// interrupted runs left, then writes the manifest (`kind`, `rows`), last.
    /// Anything else in the folder (a file a user put there while the run went on) is refused,
    /// naming it, so the manifest never claims a file magpie did not write.
    pub fn finish(&self, prefix: &str, kind: &str, rows: Option<u64>, provenance: &Provenance) -> Result<Manifest> {
        sweep_temporaries(&self.dir, prefix);
        let entries = std::fs::read_dir(&self.dir).with_context(|| format!("{}: cannot list", self.dir.display()))?;
        let mut foreign: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !is_marker(n) && !is_temporary(n) && !(self.owns)(n))
            .collect();
        if !foreign.is_empty() {
            foreign.sort();
            bail!(
                "{}: holds files magpie did not write ({}), put there while the run went on; move them out and rerun the same command to finish",
                self.dir.display(),
                foreign.join(", ")
            );
        }
        Manifest::write(&self.dir, kind, rows, provenance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owns(name: &str) -> bool {
        name.starts_with("part-")
    }

    fn open(dir: &Path, settings: Value, overwrite: bool, resuming: Resuming) -> Result<Opened> {
        let prepared = RunDir::prepare(dir, &[], "synth", &settings, owns, overwrite, resuming)?;
        let opened = prepared.opened;
        prepared.apply().map(|_| opened)
    }

    #[test]
    fn the_claim_decides_resume_finished_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let same = json!({"seed": 1});
        assert_eq!(open(&out, same.clone(), false, Resuming::Always).unwrap(), Opened::Fresh);
        std::fs::write(out.join("part-00000.bin"), b"x").unwrap();
        assert_eq!(open(&out, same.clone(), false, Resuming::Always).unwrap(), Opened::Resume);
        let error = open(&out, json!({"seed": 2}), true, Resuming::Always).unwrap_err().to_string();
        assert!(error.contains("unfinished synth run with other settings (seed)"), "{error}");
        let run = RunDir::prepare(&out, &[], "synth", &same, owns, false, Resuming::Always).unwrap().apply().unwrap();
        run.finish(".part-", "dataset", Some(1), &Provenance::new("synth", &same)).unwrap();
        assert_eq!(open(&out, same.clone(), false, Resuming::Always).unwrap(), Opened::Finished);
        assert!(open(&out, json!({"seed": 2}), false, Resuming::Always).unwrap_err().to_string().contains("finished synth run with other settings (seed)"));
        assert_eq!(open(&out, json!({"seed": 2}), true, Resuming::Always).unwrap(), Opened::Fresh);
        assert!(!out.join("part-00000.bin").exists() && out.join(RUN_CLAIM).is_file());
    }

    #[test]
    fn a_file_put_into_the_folder_during_the_run_is_never_listed_as_ours() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let settings = json!({"seed": 1});
        let run = RunDir::prepare(&out, &[], "synth", &settings, owns, false, Resuming::Always).unwrap().apply().unwrap();
        std::fs::write(out.join("part-00000.bin"), b"x").unwrap();
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        let error = run.finish(".part-", "dataset", None, &Provenance::new("synth", &settings)).unwrap_err().to_string();
        assert!(error.contains("holds files magpie did not write (notes.txt)"), "{error}");
        assert!(!out.join(crate::run::MANIFEST).exists());
    }

    #[test]
    fn a_folder_changed_between_prepare_and_apply_is_refused_with_nothing_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let settings = json!({"seed": 1});
        open(&out, settings.clone(), false, Resuming::OnFlag(false)).unwrap();
        std::fs::write(out.join("part-00000.bin"), b"x").unwrap();
        let prepared = RunDir::prepare(&out, &[], "synth", &settings, owns, true, Resuming::OnFlag(false)).unwrap();
        std::fs::write(out.join("part-00001.bin"), b"y").unwrap();
        assert!(prepared.apply().err().unwrap().to_string().contains("changed while this run was starting"));
        assert!(out.join("part-00000.bin").is_file() && out.join("part-00001.bin").is_file());
    }

    /// While a training run goes on, a second one on its folder is refused, resuming or starting
    /// over, with nothing removed; once the first has ended (its lock dropped), it resumes.
    #[test]
    fn a_second_run_on_a_training_folder_in_use_is_refused_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let settings = json!({"lr": 1});
        let prepare = |overwrite, resume| RunDir::prepare(&out, &[], "sft", &settings, owns, overwrite, Resuming::OnFlag(resume));
        let running = prepare(false, false).unwrap().apply().unwrap();
        std::fs::write(out.join("part-00000.bin"), b"x").unwrap();
        for (overwrite, resume) in [(false, true), (true, false)] {
            let error = prepare(overwrite, resume).err().unwrap().to_string();
            assert!(error.contains("another magpie run is writing this folder"), "{error}");
        }
        assert!(out.join("part-00000.bin").is_file());
        drop(running);
        prepare(false, true).unwrap().apply().unwrap();
        // Two runs started at once on a new folder: the one that puts its claim in place second
        // is refused.
        let fresh = dir.path().join("fresh");
        let start = || RunDir::prepare(&fresh, &[], "sft", &settings, owns, false, Resuming::OnFlag(false)).unwrap();
        let (first, second) = (start(), start());
        let _first = first.apply().unwrap();
        assert!(second.apply().err().unwrap().to_string().contains("another magpie run is writing this folder"));
        // Sharded stages (resumed always) write one folder from many processes: no lock.
        let _shard = RunDir::prepare(&out, &[], "sft", &settings, owns, false, Resuming::Always).unwrap().apply().unwrap();
        assert!(RunDir::prepare(&out, &[], "sft", &settings, owns, false, Resuming::Always).is_ok());
    }

    #[test]
    fn a_flag_resumed_run_needs_the_flag_and_overwrite_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let settings = json!({"lr": 1});
        assert!(open(&out, settings.clone(), false, Resuming::OnFlag(true)).unwrap_err().to_string().contains("nothing to resume"));
        assert_eq!(open(&out, settings.clone(), false, Resuming::OnFlag(false)).unwrap(), Opened::Fresh);
        std::fs::write(out.join("part-00000.bin"), b"x").unwrap();
        assert!(open(&out, settings.clone(), false, Resuming::OnFlag(false)).unwrap_err().to_string().contains("pass --resume"));
        assert_eq!(open(&out, settings.clone(), false, Resuming::OnFlag(true)).unwrap(), Opened::Resume);
        assert_eq!(open(&out, settings.clone(), true, Resuming::OnFlag(false)).unwrap(), Opened::Fresh);
        assert!(!out.join("part-00000.bin").exists());
        assert!(open(&out, settings, true, Resuming::OnFlag(true)).unwrap_err().to_string().contains("contradict"));
    }
}
