//! Lock files that keep a second process out: an exclusive `flock` held as
//! long as the returned file is open, released by the kernel however the
//! process ends (so a crash never leaves a stale lock behind). The holder
//! writes who it is into the file, for the error a second process reports.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// The outcome of [`claim`].
#[derive(Debug)]
pub enum Claim {
    /// Held until this file is dropped.
    Held(File),
    /// Another open file holds it; `holder` is what it wrote (may be empty).
    Busy { holder: String },
}

/// Takes the lock file at `path` (created if missing, with its directory)
/// and writes `holder` into it, unless another process holds it.
pub fn claim(path: &Path, holder: &str) -> std::io::Result<Claim> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(Claim::Busy {
                holder: text.trim().to_owned(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(e),
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{holder}")?;
    Ok(Claim::Held(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_frees_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("x.lock");
        let Claim::Held(first) = claim(&path, "process 1").unwrap() else {
            panic!("a free lock is taken");
        };
        match claim(&path, "process 2").unwrap() {
            Claim::Busy { holder } => assert_eq!(holder, "process 1"),
            Claim::Held(_) => panic!("taken twice"),
        }
        drop(first);
        assert!(matches!(claim(&path, "process 2").unwrap(), Claim::Held(_)));
    }
}
