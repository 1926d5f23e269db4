//! One writer at a time in a training run's folder: an exclusive advisory lock (`flock`) on its
//! run claim, held until the run ends. A run that finds a claim locks it before it decides
//! anything; a run that writes a claim puts it in place only where there is none, then locks it.
//! So a second run on the folder (the same command started twice, a requeued job whose first
//! copy still runs, a `--resume` beside a run that goes on) is refused, naming the folder. The
//! kernel drops the lock when the process ends, `kill -9` included, so a dead run never blocks
//! its resume (on NFS, the server frees the lock of a crashed node when that node restarts; where
//! it never does, copying the claim over itself, `cp C C.new && mv C.new C`, frees the folder).
//! Stages that write one folder from many processes by design (synth's and filter's shards,
//! each its own chunks) take no lock.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::temp::temporary_sibling;

fn busy(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: another magpie run is writing this folder (the same command started twice, or a job still running); let it end or stop it, then rerun",
        dir.display()
    )
}

/// Opens the claim `path` for locking, never through a link: for writing too where it may be
/// (NFS locks a file exclusively only then), else for reading (enough for a local lock).
fn open(path: &Path) -> Result<File> {
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        bail!("{}: is not a plain file; magpie never locks or writes through a link", path.display());
    }
    match OpenOptions::new().read(true).write(true).open(path) {
        Err(e) if matches!(e.kind(), ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem) => File::open(path),
        opened => opened,
    }
    .with_context(|| format!("{}: cannot open to lock", path.display()))
}

/// Locks `file`; `false` where the filesystem has no locks (said in a warning).
fn try_lock(dir: &Path, file: &File) -> Result<bool> {
    match file.try_lock() {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Err(busy(dir)),
        Err(TryLockError::Error(e)) => {
            eprintln!("warning: {}: cannot lock the run claim ({e}); nothing stops a second run from writing this folder meanwhile", dir.display());
            Ok(false)
        }
    }
}

/// Locks the claim `claim` of the run folder `dir` (`None` where the filesystem has no locks).
/// `ours`: the inode of the claim this run put there, which the locked one must be.
fn lock(dir: &Path, claim: &Path, ours: Option<u64>) -> Result<Option<File>> {
    let file = open(claim)?;
    if !try_lock(dir, &file)? {
        return Ok(None);
    }
    // A claim replaced since it was opened, or not the one this run put there, is another
    // run's: that run holds the folder.
    let locked = file.metadata()?.ino();
    let now = std::fs::symlink_metadata(claim).with_context(|| format!("{}: cannot read", claim.display()))?.ino();
    if now != locked || ours.is_some_and(|ours| ours != locked) {
        return Err(busy(dir));
    }
    Ok(Some(file))
}

/// Locks the existing claim `claim` of the run folder `dir` (`None` where the filesystem has no
/// locks).
pub fn hold(dir: &Path, claim: &Path) -> Result<Option<File>> {
    lock(dir, claim, None)
}

/// Puts this run's claim `claim` of `dir`, with `bytes`, where there is none, then locks it
/// (`None` where the filesystem has no locks). The claim is written whole to a temporary and
/// linked to its name, so no run reads it half written. The lock is taken through the claim's
/// own name once the temporary is gone: NFS keeps a file removed while open as a `.nfs…` file in
/// the folder until it is closed. A run that locks the new claim first, in the moment between,
/// keeps the folder, and this one is refused.
pub fn write_locked(dir: &Path, claim: &Path, bytes: &[u8]) -> Result<Option<File>> {
    let tmp = temporary_sibling(claim)?;
    let placed = place(dir, &tmp, claim, bytes);
    let _ = std::fs::remove_file(&tmp); // linked or not, whichever step failed; nothing holds it open
    lock(dir, claim, Some(placed?))
}

/// Writes `bytes` to `tmp` and links it to `claim` where `claim` is not: the claim's inode.
fn place(dir: &Path, tmp: &Path, claim: &Path, bytes: &[u8]) -> Result<u64> {
    std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    let inode = std::fs::symlink_metadata(tmp).with_context(|| format!("{}: cannot read", tmp.display()))?.ino();
    let refused = |e: std::io::Error| match e.kind() {
        ErrorKind::AlreadyExists => busy(dir),
        _ => anyhow::Error::new(e).context(format!("{}: cannot put the run claim in place", claim.display())),
    };
    match std::fs::hard_link(tmp, claim) {
        Ok(()) => Ok(inode),
        // A filesystem without hard links (exFAT, object-store mounts): created only where
        // none is, then written.
        Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::PermissionDenied) => {
            let mut file = OpenOptions::new().write(true).create_new(true).open(claim).map_err(refused)?;
            file.write_all(bytes).and_then(|()| file.sync_all()).with_context(|| format!("{}: cannot write", claim.display()))?;
            Ok(file.metadata()?.ino())
        }
        Err(e) => Err(refused(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_new_claim_is_locked_through_its_own_name_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let claim = dir.path().join(".magpie-run.json");
        let file = write_locked(dir.path(), &claim, b"{}").unwrap().expect("a local filesystem locks");
        // What the lock holds open is the claim, not a removed temporary (NFS would keep that
        // as a `.nfs…` file beside the run's files until the run ends).
        assert_eq!(std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap(), claim);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [".magpie-run.json"]);
        for error in [write_locked(dir.path(), &claim, b"{}").unwrap_err(), hold(dir.path(), &claim).unwrap_err()] {
            assert!(error.to_string().contains("another magpie run is writing this folder"), "{error}");
        }
        drop(file);
        assert!(hold(dir.path(), &claim).unwrap().is_some());
    }

    #[test]
    fn a_claim_that_is_a_link_is_never_opened() {
        let dir = tempfile::tempdir().unwrap();
        let (target, claim) = (dir.path().join("elsewhere.json"), dir.path().join(".magpie-run.json"));
        std::fs::write(&target, b"{}").unwrap();
        std::os::unix::fs::symlink(&target, &claim).unwrap();
        let error = hold(dir.path(), &claim).unwrap_err().to_string();
        assert!(error.contains(".magpie-run.json: is not a plain file"), "{error}");
    }
}
