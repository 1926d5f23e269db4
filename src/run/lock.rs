//! One writer at a time in a training run's folder: an exclusive advisory lock (`flock`) on its
//! run claim, taken before anything in the folder is removed or written and held until the run
//! ends. A second run on the folder (the same command started twice, a requeued job whose first
//! copy still runs, a `--resume` beside a run that goes on) is refused, naming the folder, with
//! nothing touched. The kernel drops the lock when the process ends, `kill -9` included, so a
//! dead run never blocks its resume. Stages that write one folder from many processes by design
//! (synth's and filter's shards, each its own chunks) take no lock.

use anyhow::{bail, Context, Result};
use std::fs::{File, TryLockError};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Locks the claim file `claim` of the run folder `dir`. `None` where the filesystem has no locks
/// (said in a warning: nothing then stops a second run).
pub fn hold(dir: &Path, claim: &Path) -> Result<Option<File>> {
    let file = File::open(claim).with_context(|| format!("{}: cannot open to lock", claim.display()))?;
    let busy = || format!("{}: another magpie run is writing this folder (the same command started twice, or a job still running); let it end or stop it, then rerun", dir.display());
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => bail!(busy()),
        Err(TryLockError::Error(e)) => {
            eprintln!("warning: {}: cannot lock the run claim ({e}); nothing stops a second run from writing this folder meanwhile", dir.display());
            return Ok(None);
        }
    }
    // A claim replaced since it was opened is another run's: that run holds the folder.
    let now = std::fs::metadata(claim).with_context(|| format!("{}: cannot read", claim.display()))?;
    if now.ino() != file.metadata()?.ino() {
        bail!(busy());
    }
    Ok(Some(file))
}
