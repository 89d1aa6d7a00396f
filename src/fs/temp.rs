//! Atomic temp-and-commit, for cp and sync alike: content is written under a temporary name
//! beside its final name and renamed over it only when complete. This is the one place that
//! builds temporary names, recognises them, and decides when a leftover one is stale.
//!
//! Names: `.vtun-tmp.<name>.<16 hex>`, or `.<name>.vtun.part` for cp's `--resume` partials
//! (fixed, so a later run finds them). `<name>` is shortened so the whole never passes NAME_MAX
//! (255 bytes), whatever the final name's length.
//!
//! The one non-obvious thing is staleness. Several syncs may write into one directory at once,
//! and each removes leftovers of interrupted runs, so "a temp name" cannot mean "garbage". A
//! writer holds an exclusive `flock` on its temporary file from creation until it is renamed or
//! removed (on this machine and in the agent, both our code); a leftover is removed only if that
//! lock can be taken without waiting. A temp that cannot be locked — a symlink's, one written
//! over SFTP (its name says so, see [`Hold::Age`]), or any temp a cleanup sees over SFTP — is
//! stale only when untouched for [`UNLOCKED_STALE_SECS`].

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::beneath::Dir;
use super::{FileTime, Kind};

const PREFIX: &[u8] = b".vtun-tmp.";
const RESUME_SUFFIX: &[u8] = b".vtun.part";
const NAME_MAX: usize = 255;

/// A temporary entry nobody can hold a lock on is stale after this long (six hours: far longer
/// than the gap between two writes of any live transfer).
pub const UNLOCKED_STALE_SECS: i64 = 6 * 3600;

/// At most `room` bytes of `name`, cut at a UTF-8 boundary so a valid name stays valid.
fn shortened(name: &[u8], room: usize) -> &[u8] {
    if name.len() <= room {
        return name;
    }
    let mut keep = room;
    while keep > 0 && (name[keep] & 0xc0) == 0x80 {
        keep -= 1;
    }
    &name[..keep]
}

/// What keeps a temporary file from being taken for a leftover while it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Its writer holds an `flock` on it (our code, on the machine that holds the file).
    Lock,
    /// Its writer cannot lock it (over SFTP): only its age tells it is stale. Such names end
    /// in [`UNLOCKED_MARK`], so a cleanup that could lock them knows not to trust that.
    Age,
    /// cp's `--resume` partial: a fixed name, kept on purpose and never cleaned up.
    Resume,
}

/// The end of the name of a temporary file whose writer cannot lock it.
pub const UNLOCKED_MARK: &str = ".u";

/// A fresh temporary name for `final_name`: `.vtun-tmp.<name>.<16 hex>` (plus
/// [`UNLOCKED_MARK`] for [`Hold::Age`]), at most 255 bytes.
pub fn name(final_name: &OsStr, hold: Hold) -> OsString {
    if hold == Hold::Resume {
        return resume_name(final_name);
    }
    let mark = if hold == Hold::Age { UNLOCKED_MARK } else { "" };
    let suffix = format!(".{:016x}{mark}", rand::random::<u64>());
    let room = NAME_MAX - PREFIX.len() - suffix.len();
    let mut t = PREFIX.to_vec();
    t.extend_from_slice(shortened(final_name.as_bytes(), room));
    t.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(t)
}

/// The fixed name of `final_name`'s resumable partial: `.<name>.vtun.part`, at most 255 bytes.
fn resume_name(final_name: &OsStr) -> OsString {
    let room = NAME_MAX - 1 - RESUME_SUFFIX.len();
    let mut t = vec![b'.'];
    t.extend_from_slice(shortened(final_name.as_bytes(), room));
    t.extend_from_slice(RESUME_SUFFIX);
    OsString::from_vec(t)
}

/// A temporary path beside `final_path` (fresh, or the fixed resumable one).
pub fn beside(final_path: &Path, hold: Hold) -> PathBuf {
    let base = final_path.file_name().unwrap_or(OsStr::new("file"));
    final_path.with_file_name(name(base, hold))
}

/// Is `name` one of our temporary names? Listings skip these, so they are never copied,
/// compared or deleted as content. (`--resume` partials are left visible on purpose: they are
/// the user's to keep or remove.)
pub fn is_temp(name: &[u8]) -> bool {
    name.starts_with(PREFIX)
}

/// Whether an unlockable temp last modified at `mtime` is stale now.
pub fn unlocked_is_stale(mtime: FileTime) -> bool {
    now_secs().saturating_sub(mtime.secs()) >= UNLOCKED_STALE_SECS
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Take `f`'s exclusive lock without waiting; `false` if someone holds it.
fn try_lock(f: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// Mark an open temporary file as live for as long as it stays open. Best effort: where the file
/// system has no locks, cleanup cannot take one either, and so leaves the file alone.
pub fn lock(f: &File) {
    let _ = try_lock(f);
}

/// Remove temp `name` in `dir` if it is stale (see the module docs); returns whether it was.
/// Directories are never touched.
pub fn remove_if_stale(dir: &Dir, name: &OsStr) -> std::io::Result<bool> {
    let Some(m) = dir.lstat(name)? else {
        return Ok(false);
    };
    let locked = !name.as_bytes().ends_with(UNLOCKED_MARK.as_bytes());
    match m.kind {
        Kind::Dir => return Ok(false),
        Kind::File if locked => {
            let f = match dir.open_file(name) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            };
            // Held until we have unlinked it: a writer that loses the race for its own new
            // file sees the lock (or the unlinked file) and picks another name.
            if !try_lock(&f)? {
                return Ok(false);
            }
        }
        _ if !unlocked_is_stale(m.mtime) => return Ok(false),
        _ => {}
    }
    match dir.unlink(name) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Runs its undo on drop unless disarmed: removes a temporary file when its copy is abandoned
/// mid-way (a future dropped on Ctrl-C, an early return).
pub struct Guard<F: FnOnce()> {
    undo: Option<F>,
}

impl<F: FnOnce()> Guard<F> {
    pub fn new(undo: F) -> Guard<F> {
        Guard { undo: Some(undo) }
    }

    /// The temporary file was committed or cleaned up some other way.
    pub fn disarm(mut self) {
        self.undo = None;
    }
}

impl<F: FnOnce()> Drop for Guard<F> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo();
        }
    }
}

/// A locked temporary file in a directory beneath a root; removed on drop unless committed.
pub struct TempFile {
    dir: Dir,
    name: OsString,
    file: File,
    committed: bool,
}

impl TempFile {
    /// Create a fresh temporary file (mode 0600) for `final_name` in `dir`, locked.
    pub fn create(dir: Dir, final_name: &OsStr) -> std::io::Result<TempFile> {
        loop {
            let name = name(final_name, Hold::Lock);
            let file = dir.create_new(&name, 0o600)?;
            // A cleaner may have found the file between its creation and our lock: then it
            // holds the lock or has unlinked the file, and it owns that name now.
            let linked = try_lock(&file)? && file.metadata()?.nlink() > 0;
            if linked {
                return Ok(TempFile {
                    dir,
                    name,
                    file,
                    committed: false,
                });
            }
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The temporary file's path, for messages.
    pub fn shown(&self) -> PathBuf {
        self.dir.show(&self.name)
    }

    /// Set the mode and mtime, then rename over `final_name` in the same directory. The lock
    /// is released only after the rename, when the file closes.
    pub fn commit(mut self, final_name: &OsStr, mode: u32, mtime: FileTime) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        self.dir.set_mtime(&self.name, mtime)?;
        self.dir.rename(&self.name, final_name)?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.dir.unlink(&self.name);
        }
    }
}

// Tests only: unwrap on local temp files.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::fs::beneath::Root;

    #[test]
    fn names_never_pass_name_max_and_are_recognised() {
        for len in [1, 100, 228, 229, 240, 255] {
            let n = OsString::from("x".repeat(len));
            for hold in [Hold::Lock, Hold::Age, Hold::Resume] {
                let t = name(&n, hold);
                assert!(t.len() <= NAME_MAX, "{len} {hold:?}: {}", t.len());
                assert_eq!(is_temp(t.as_bytes()), hold != Hold::Resume, "{hold:?}");
            }
            assert!(!is_temp(n.as_bytes()));
        }
        assert_eq!(name(OsStr::new("f.txt"), Hold::Resume), ".f.txt.vtun.part");
        // Cut at a character boundary: é is two bytes.
        let t = name(&OsString::from("é".repeat(127)), Hold::Lock);
        assert!(std::str::from_utf8(t.as_bytes()).is_ok());
        let p = beside(Path::new("/d/file"), Hold::Resume);
        assert_eq!(p, Path::new("/d/.file.vtun.part"));
    }

    #[test]
    fn a_locked_temp_is_kept_and_an_abandoned_one_removed() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::open(d.path()).unwrap();
        let live = TempFile::create(root.dir().try_clone().unwrap(), OsStr::new("f")).unwrap();
        let live_name = live.name.clone();
        assert!(!remove_if_stale(root.dir(), &live_name).unwrap(), "in use");
        // Left by a writer that died: nobody holds its lock.
        let dead = name(OsStr::new("g"), Hold::Lock);
        std::fs::write(d.path().join(&dead), b"junk").unwrap();
        assert!(remove_if_stale(root.dir(), &dead).unwrap());
        assert!(!d.path().join(&dead).exists());
        // A symlink temp cannot be locked: only an old one goes.
        let link = name(OsStr::new("l"), Hold::Age);
        root.dir().symlink(OsStr::new("t"), &link).unwrap();
        assert!(!remove_if_stale(root.dir(), &link).unwrap());
        root.dir().set_mtime(&link, FileTime::from_secs(1)).unwrap();
        assert!(remove_if_stale(root.dir(), &link).unwrap());
        live.commit(OsStr::new("f"), 0o640, FileTime::from_secs(7))
            .unwrap();
        assert!(d.path().join("f").is_file() && !d.path().join(&live_name).exists());
    }

    #[test]
    fn guard_undoes_unless_disarmed() {
        let hits = std::cell::Cell::new(0);
        drop(Guard::new(|| hits.set(hits.get() + 1)));
        Guard::new(|| hits.set(hits.get() + 10)).disarm();
        assert_eq!(hits.get(), 1);
    }
}
