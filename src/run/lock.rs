//! One writer at a time in a training run's folder: an exclusive advisory lock (`flock`) on its
//! run claim, held until the run ends. A run that finds a claim locks it before it decides
//! anything; a run that writes a claim locks it before the claim takes its name, and gives it
//! that name only where no other claim appeared meanwhile. So a second run on the folder (the
//! same command started twice, a requeued job whose first copy still runs, a `--resume` beside a
//! run that goes on) is refused, naming the folder. The kernel drops the lock when the process
//! ends, `kill -9` included, so a dead run never blocks its resume (on NFS, the server frees the
//! lock of a crashed node when it recovers it). Stages that write one folder from many processes
//! by design (synth's and filter's shards, each its own chunks) take no lock.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::temp::temporary_sibling;

fn busy(dir: &Path) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: another magpie run is writing this folder (the same command started twice, or a job still running); let it end or stop it, then rerun",
        dir.display()
    )
}

/// Opens `path` for locking (for writing too: NFS locks a file exclusively only then).
fn open(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).open(path).with_context(|| format!("{}: cannot open to lock", path.display()))
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

/// Locks the existing claim file `claim` of the run folder `dir`: `None` where the filesystem
/// has no locks.
pub fn hold(dir: &Path, claim: &Path) -> Result<Option<File>> {
    let file = open(claim)?;
    if !try_lock(dir, &file)? {
        return Ok(None);
    }
    // A claim replaced since it was opened is another run's: that run holds the folder.
    let now = std::fs::metadata(claim).with_context(|| format!("{}: cannot read", claim.display()))?;
    if now.ino() != file.metadata()?.ino() {
        return Err(busy(dir));
    }
    Ok(Some(file))
}

/// Writes this run's claim `claim` of `dir` with `bytes`, locked before it takes its name: in
/// place of a claim this run holds (`replacing`), else only where there is none. The lock is
/// returned (`None` where the filesystem has no locks).
pub fn write_locked(dir: &Path, claim: &Path, bytes: &[u8], replacing: bool) -> Result<Option<File>> {
    let tmp = temporary_sibling(claim)?;
    let placed = (|| {
        std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
        let file = open(&tmp)?;
        let locked = try_lock(dir, &file)?;
        match if replacing { std::fs::rename(&tmp, claim) } else { std::fs::hard_link(&tmp, claim) } {
            Ok(()) => Ok(locked.then_some(file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(busy(dir)),
            Err(e) => Err(e).with_context(|| format!("{}: cannot put the run claim in place", claim.display())),
        }
    })();
    let _ = std::fs::remove_file(&tmp); // after a hard link, or a failure at any point
    placed
}
