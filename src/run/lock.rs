//! One writer at a time in a training run's folder: an exclusive advisory lock (`flock`) on its
//! run claim, held until the run ends. A run that finds a claim locks it before it decides
//! anything; a run that writes a claim puts it in place only where there is none, then locks it.
//! So a second run on the folder (the same command started twice, a requeued job whose first
//! copy still runs, a `--resume` beside a run that goes on) is refused, naming the folder. The
//! kernel drops the lock when the process ends, `kill -9` included, so a dead run never blocks
//! its resume (on NFS, the server frees a crashed node's lock when its lease runs out, NFSv4, or
//! when the node restarts, NFSv3; once it is known to be down for good, copying the claim over
//! itself, `cp C C.new && mv C.new C`, frees the folder).
//! Stages that write one folder from many processes by design (synth's and filter's shards,
//! each its own chunks) take no lock.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read, Write};
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
/// `ours`: the bytes of the claim this run put there, which the locked one must hold; another
/// run may hold that claim for a moment to look at it, so its lock is waited for a little.
fn lock(dir: &Path, claim: &Path, ours: Option<&[u8]>) -> Result<Option<File>> {
    let file = open(claim)?;
    let mut waited = 0;
    let locked = loop {
        match try_lock(dir, &file) {
            Err(_) if ours.is_some() && waited < 40 => {
                std::thread::sleep(std::time::Duration::from_millis(50));
                waited += 1;
            }
            locked => break locked?,
        }
    };
    if !locked {
        return Ok(None);
    }
    // A claim replaced since it was opened, or not the one this run put there, is another
    // run's: that run holds the folder.
    let now = std::fs::symlink_metadata(claim).with_context(|| format!("{}: cannot read", claim.display()))?.ino();
    if now != file.metadata()?.ino() || ours.is_some_and(|ours| !holds(&file, ours)) {
        return Err(busy(dir));
    }
    Ok(Some(file))
}

/// Whether `file` holds exactly `bytes` (a claim is small; its run id makes it this run's).
fn holds(mut file: &File, bytes: &[u8]) -> bool {
    let mut read = vec![];
    file.read_to_end(&mut read).is_ok() && read == bytes
}

/// Locks the existing claim `claim` of the run folder `dir` (`None` where the filesystem has no
/// locks).
pub fn hold(dir: &Path, claim: &Path) -> Result<Option<File>> {
    lock(dir, claim, None)
}

/// What makes a claim this run's: the host, the process and the time it started.
pub fn run_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}:{}:{}", host.trim(), std::process::id(), since.as_nanos())
}

/// Puts this run's claim `claim` of `dir`, with `bytes` (which hold its [`run_id`]), where there
/// is none, then locks it (`None` where the filesystem has no locks). The claim is written whole
/// to a temporary and linked to its name, so no run reads it half written. The lock is taken
/// through the claim's own name once the temporary is gone: NFS keeps a file removed while open
/// as a `.nfs…` file in the folder until it is closed. A run that holds the new claim longer
/// than a moment keeps the folder, and this one is refused.
pub fn write_locked(dir: &Path, claim: &Path, bytes: &[u8]) -> Result<Option<File>> {
    let tmp = temporary_sibling(claim)?;
    let linked = link(dir, &tmp, claim, bytes);
    let _ = std::fs::remove_file(&tmp); // linked or not, whichever step failed; nothing holds it open
    if linked? {
        lock(dir, claim, Some(bytes))
    } else {
        create_locked(dir, claim, bytes)
    }
}

/// Writes `bytes` to `tmp` and links it to `claim` where `claim` is not; `false` where the
/// filesystem has no hard links.
fn link(dir: &Path, tmp: &Path, claim: &Path, bytes: &[u8]) -> Result<bool> {
    std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    match std::fs::hard_link(tmp, claim) {
        Ok(()) => Ok(true),
        // NFS may answer a retried link that went through with EEXIST.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => match File::open(claim) {
            Ok(file) if holds(&file, bytes) => Ok(true),
            _ => Err(busy(dir)),
        },
        // exFAT, object-store mounts (EPERM, ENOSYS, and EOPNOTSUPP: 95 on Linux).
        Err(e) if matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::PermissionDenied) || e.raw_os_error() == Some(95) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("{}: cannot put the run claim in place", claim.display())),
    }
}

/// Creates `claim` where there is none, locks it and then writes `bytes` into it: for a
/// filesystem without hard links. A claim this run created and could not write is removed.
fn create_locked(dir: &Path, claim: &Path, bytes: &[u8]) -> Result<Option<File>> {
    let mut file = match OpenOptions::new().read(true).write(true).create_new(true).open(claim) {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(busy(dir)),
        opened => opened.with_context(|| format!("{}: cannot create the run claim", claim.display()))?,
    };
    let locked = try_lock(dir, &file)?;
    if let Err(e) = file.write_all(bytes).and_then(|()| file.sync_all()) {
        let _ = std::fs::remove_file(claim);
        return Err(e).with_context(|| format!("{}: cannot write", claim.display()));
    }
    Ok(locked.then_some(file))
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
    fn a_claim_is_this_runs_by_its_bytes_and_a_run_looking_at_it_for_a_moment_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let claim = dir.path().join(".magpie-run.json");
        std::fs::write(&claim, b"another run's").unwrap();
        assert!(lock(dir.path(), &claim, Some(b"this run's")).unwrap_err().to_string().contains("another magpie run"));
        // NFS may answer a link that went through with EEXIST: the claim's bytes say it is ours.
        assert!(link(dir.path(), &dir.path().join(".tmp"), &claim, b"another run's").unwrap());
        let looking = hold(dir.path(), &claim).unwrap();
        let looked = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(looking);
        });
        assert!(lock(dir.path(), &claim, Some(b"another run's")).unwrap().is_some());
        looked.join().unwrap();
    }

    #[test]
    fn without_hard_links_the_claim_is_created_in_place_locked_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let claim = dir.path().join(".magpie-run.json");
        let file = create_locked(dir.path(), &claim, b"{}").unwrap().expect("a local filesystem locks");
        assert_eq!(std::fs::read(&claim).unwrap(), b"{}");
        assert!(hold(dir.path(), &claim).unwrap_err().to_string().contains("another magpie run"));
        assert!(create_locked(dir.path(), &claim, b"{}").unwrap_err().to_string().contains("another magpie run"));
        drop(file);
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
