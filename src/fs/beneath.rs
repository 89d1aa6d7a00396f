//! Safe descent beneath a destination root: every create, open, rename, unlink and metadata
//! change is made relative to a directory file descriptor reached from the root one component
//! at a time with `O_NOFOLLOW | O_DIRECTORY` (or in one `openat2` call with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` where the kernel has it), the way rsync 3.4 answered
//! CVE-2024-12086.
//!
//! The one non-obvious thing: checking a path with `lstat` and then using it by name is not
//! enough, because a directory can be swapped for a symlink between the check and the use. Here
//! there is no separate check: the descent *is* the check, and what it yields is an open
//! directory that later renames cannot redirect. Symlinks inside the root are never followed,
//! so a write can only land beneath the root the user named (which itself may be a symlink).

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{FileTime, Kind, Meta};

/// Refuse a name that is not exactly one entry of a directory: empty, `.`, `..`, or holding `/`
/// or NUL. Listings from a peer and paths from a peer are both checked with this.
pub fn check_name(name: &[u8]) -> Result<(), &'static str> {
    match name {
        b"" => Err("empty name"),
        b"." | b".." => Err("a dot name"),
        n if n.contains(&b'/') => Err("a name with '/'"),
        n if n.contains(&0) => Err("a name with NUL"),
        _ => Ok(()),
    }
}

fn cstr(name: &OsStr) -> std::io::Result<CString> {
    check_name(name.as_bytes()).map_err(|why| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("refusing {why}: {:?}", name),
        )
    })?;
    CString::new(name.as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn check(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_at(dir: RawFd, name: &CStr, flags: libc::c_int, mode: u32) -> std::io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated; the returned descriptor is ours alone.
        let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) };
        match check(fd) {
            // SAFETY: a fresh descriptor nobody else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

/// A symlink or a non-directory where a directory was expected.
fn not_a_dir(e: std::io::Error, shown: &Path) -> std::io::Error {
    match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV) => std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!(
                "{} is not a directory (symlinks inside the destination are not followed)",
                shown.display()
            ),
        ),
        _ => e,
    }
}

/// Whether `openat2` works here (kernels before 5.6, or seccomp filters, say ENOSYS/EPERM).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// `rel` (several components) beneath `dir` in one call, or `None` when openat2 is missing.
fn openat2_beneath(dir: RawFd, rel: &CStr) -> Option<std::io::Result<OwnedFd>> {
    if NO_OPENAT2.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: open_how is plain data (non_exhaustive, so it is zeroed and filled, not built).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (DIR_FLAGS | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: valid pointers to a NUL-terminated path and an open_how of the given size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                rel.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a fresh descriptor nobody else owns.
            return Some(Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            Some(libc::ENOSYS) | Some(libc::EPERM) | Some(libc::E2BIG) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                return None;
            }
            _ => return Some(Err(e)),
        }
    }
}

/// An open directory at or beneath a root. Every operation names one entry in it and never
/// follows a symlink in that entry.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// For messages only; never used to reach the directory.
    shown: PathBuf,
}

/// The destination root: the directory everything is written beneath.
#[derive(Debug)]
pub struct Root(Dir);

impl Root {
    /// Open the root itself. It is the one path that is followed if it is a symlink: the user
    /// named it.
    pub fn open(path: &Path) -> std::io::Result<Root> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        let fd = open_at(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        Ok(Root(Dir {
            fd,
            shown: path.to_path_buf(),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.0.shown
    }

    /// The root directory itself.
    pub fn dir(&self) -> &Dir {
        &self.0
    }

    pub fn into_dir(self) -> Dir {
        self.0
    }

    /// The directory `comps` names beneath the root (the root for none), each component a real
    /// directory: a symlink anywhere on the way is refused, whatever happens concurrently.
    pub fn open_dir<I, S>(&self, comps: I) -> std::io::Result<Dir>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut names = Vec::new();
        let mut shown = self.0.shown.clone();
        for c in comps {
            let c = c.as_ref();
            names.push(cstr(c)?);
            shown.push(c);
        }
        match names.len() {
            0 => return self.0.try_clone(),
            1 => return self.0.open_dir(OsStr::from_bytes(names[0].as_bytes())),
            _ => {}
        }
        let joined = names
            .iter()
            .map(|n| n.as_bytes())
            .collect::<Vec<_>>()
            .join(&b'/');
        // Each component was checked by `cstr`, so the joined path has no NUL.
        if let Ok(rel) = CString::new(joined) {
            if let Some(r) = openat2_beneath(self.0.fd.as_raw_fd(), &rel) {
                let fd = r.map_err(|e| not_a_dir(e, &shown))?;
                return Ok(Dir { fd, shown });
            }
        }
        let mut dir = self.0.open_dir(OsStr::from_bytes(names[0].as_bytes()))?;
        for n in &names[1..] {
            dir = dir.open_dir(OsStr::from_bytes(n.as_bytes()))?;
        }
        Ok(dir)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// `name` in this directory, for messages.
    pub fn show(&self, name: &OsStr) -> PathBuf {
        self.shown.join(name)
    }

    pub fn try_clone(&self) -> std::io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
            shown: self.shown.clone(),
        })
    }

    /// The subdirectory `name`, refused if it is a symlink or not a directory.
    pub fn open_dir(&self, name: &OsStr) -> std::io::Result<Dir> {
        let shown = self.show(name);
        let fd =
            open_at(self.raw(), &cstr(name)?, DIR_FLAGS, 0).map_err(|e| not_a_dir(e, &shown))?;
        Ok(Dir { fd, shown })
    }

    /// Open `name` for reading, refusing a symlink.
    pub fn open_file(&self, name: &OsStr) -> std::io::Result<File> {
        let fd = open_at(
            self.raw(),
            &cstr(name)?,
            libc::O_RDONLY | libc::O_NOFOLLOW,
            0,
        )?;
        Ok(File::from(fd))
    }

    /// Create `name` for writing; it must not exist (so no symlink there is followed).
    pub fn create_new(&self, name: &OsStr, mode: u32) -> std::io::Result<File> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        let fd = open_at(self.raw(), &cstr(name)?, flags, mode)?;
        Ok(File::from(fd))
    }

    /// The metadata of `name` itself; `None` when nothing is there.
    pub fn lstat(&self, name: &OsStr) -> std::io::Result<Option<Meta>> {
        let c = cstr(name)?;
        // SAFETY: stat is plain data, filled in by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid NUL-terminated name and a stat buffer we own.
        let r =
            unsafe { libc::fstatat(self.raw(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
        match check(r) {
            Ok(_) => Ok(Some(meta_of_stat(&st))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn mkdir(&self, name: &OsStr, mode: u32) -> std::io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid NUL-terminated name.
        check(unsafe { libc::mkdirat(self.raw(), c.as_ptr(), mode as libc::mode_t) }).map(drop)
    }

    /// Make a symlink `name` pointing at `target` (which is stored, never resolved here).
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> std::io::Result<()> {
        let c = cstr(name)?;
        let t = CString::new(target.as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: valid NUL-terminated strings.
        check(unsafe { libc::symlinkat(t.as_ptr(), self.raw(), c.as_ptr()) }).map(drop)
    }

    /// Rename `from` over `to`, both in this directory; replaces what `to` was (a symlink there
    /// is replaced, not followed).
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> std::io::Result<()> {
        let (f, t) = (cstr(from)?, cstr(to)?);
        // SAFETY: valid NUL-terminated names.
        check(unsafe { libc::renameat(self.raw(), f.as_ptr(), self.raw(), t.as_ptr()) }).map(drop)
    }

    /// Remove the non-directory `name` (a symlink itself, never its target).
    pub fn unlink(&self, name: &OsStr) -> std::io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid NUL-terminated name.
        check(unsafe { libc::unlinkat(self.raw(), c.as_ptr(), 0) }).map(drop)
    }

    pub fn rmdir(&self, name: &OsStr) -> std::io::Result<()> {
        let c = cstr(name)?;
        // SAFETY: valid NUL-terminated name.
        check(unsafe { libc::unlinkat(self.raw(), c.as_ptr(), libc::AT_REMOVEDIR) }).map(drop)
    }

    /// Remove directory `name` and everything in it, descending by descriptor (a symlink in
    /// it is removed as a link).
    pub fn remove_tree(&self, name: &OsStr) -> std::io::Result<()> {
        let sub = self.open_dir(name)?;
        for n in sub.names()? {
            match sub.lstat(&n)? {
                Some(m) if m.kind == Kind::Dir => sub.remove_tree(&n)?,
                Some(_) => sub.unlink(&n)?,
                None => {}
            }
        }
        self.rmdir(name)
    }

    /// Set the permission bits of `name`; a symlink there is left alone (Linux links have no
    /// mode of their own, and following one could change a file outside the root).
    pub fn chmod(&self, name: &OsStr, mode: u32) -> std::io::Result<()> {
        let c = cstr(name)?;
        // O_PATH opens the entry itself without following it or needing read access.
        let fd = open_at(self.raw(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        // SAFETY: stat is plain data, filled in by the kernel.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: a descriptor we own and a stat buffer we own.
        check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Ok(());
        }
        // fchmod refuses O_PATH descriptors; the /proc link names exactly the inode we opened.
        let proc = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: valid NUL-terminated path.
        match check(unsafe { libc::chmod(proc.as_ptr(), mode as libc::mode_t) }) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // No /proc: the entry was checked just above; name it relative to its directory.
                // SAFETY: valid NUL-terminated name.
                check(unsafe { libc::fchmodat(self.raw(), c.as_ptr(), mode as libc::mode_t, 0) })
                    .map(drop)
            }
            r => r.map(drop),
        }
    }

    /// Open `name` for writing, refusing a symlink; `create` makes it (with `mode`), `truncate`
    /// empties it.
    pub fn open_write(
        &self,
        name: &OsStr,
        create: bool,
        truncate: bool,
        mode: u32,
    ) -> std::io::Result<File> {
        let mut flags = libc::O_WRONLY | libc::O_NOFOLLOW;
        if create {
            flags |= libc::O_CREAT;
        }
        if truncate {
            flags |= libc::O_TRUNC;
        }
        let fd = open_at(self.raw(), &cstr(name)?, flags, mode)?;
        Ok(File::from(fd))
    }

    /// Set the mtime (and the atime, when given) of `name` itself: a symlink's own times, never
    /// its target's.
    pub fn set_times(
        &self,
        name: &OsStr,
        atime: Option<FileTime>,
        mtime: FileTime,
    ) -> std::io::Result<()> {
        let c = cstr(name)?;
        let times = [
            atime.map_or_else(omit_atime, FileTime::timespec),
            mtime.timespec(),
        ];
        // SAFETY: valid NUL-terminated name and two timespecs.
        let r = unsafe {
            libc::utimensat(
                self.raw(),
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        check(r).map(drop)
    }

    /// Set the mtime of `name` itself (a symlink's own time, never its target's).
    pub fn set_mtime(&self, name: &OsStr, mtime: FileTime) -> std::io::Result<()> {
        self.set_times(name, None, mtime)
    }

    /// Set this directory's own mtime (and atime, when given).
    pub fn set_own_times(&self, atime: Option<FileTime>, mtime: FileTime) -> std::io::Result<()> {
        let times = [
            atime.map_or_else(omit_atime, FileTime::timespec),
            mtime.timespec(),
        ];
        // SAFETY: a descriptor we own and two timespecs.
        check(unsafe { libc::futimens(self.raw(), times.as_ptr()) }).map(drop)
    }

    /// Set this directory's own permission bits.
    pub fn set_own_mode(&self, mode: u32) -> std::io::Result<()> {
        // SAFETY: a descriptor we own.
        check(unsafe { libc::fchmod(self.raw(), mode as libc::mode_t) }).map(drop)
    }

    /// The names in this directory, without `.` and `..`.
    pub fn names(&self) -> std::io::Result<Vec<OsString>> {
        // fdopendir takes over the descriptor it is given, so give it a duplicate.
        // SAFETY: duplicating a descriptor we own.
        let dup = check(unsafe { libc::fcntl(self.raw(), libc::F_DUPFD_CLOEXEC, 0) })?;
        // SAFETY: `dup` is a fresh directory descriptor; on success the DIR owns it.
        let d = unsafe { libc::fdopendir(dup) };
        if d.is_null() {
            let e = std::io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `dup` is still ours to close.
            unsafe { libc::close(dup) };
            return Err(e);
        }
        // SAFETY: rewinding a DIR we own (the duplicate shares the original's offset).
        unsafe { libc::rewinddir(d) };
        let mut out = Vec::new();
        loop {
            // SAFETY: `d` is a valid DIR; the entry is valid until the next readdir call.
            let ent = unsafe { libc::readdir(d) };
            if ent.is_null() {
                break;
            }
            // SAFETY: d_name is NUL-terminated within the entry.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                out.push(OsString::from_vec(name.to_vec()));
            }
        }
        // SAFETY: closing the DIR we opened (and with it `dup`).
        unsafe { libc::closedir(d) };
        Ok(out)
    }
}

fn omit_atime() -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::UTIME_OMIT,
    }
}

fn meta_of_stat(st: &libc::stat) -> Meta {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    let t = |s: i64, ns: i64| FileTime::new(s, ns.clamp(0, 999_999_999) as u32);
    Meta {
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        atime: t(st.st_atime, st.st_atime_nsec),
        mtime: t(st.st_mtime, st.st_mtime_nsec),
    }
}

// Tests only: unwrap on local temp files.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn os(s: &str) -> &OsStr {
        OsStr::new(s)
    }

    #[test]
    fn a_symlinked_parent_inside_the_root_is_never_followed() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("real/link")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("top")).unwrap();
        let r = Root::open(root.path()).unwrap();
        for via_openat2 in [true, false] {
            NO_OPENAT2.store(!via_openat2, Ordering::Relaxed);
            for comps in [
                &["top"][..],
                &["real", "link"],
                &["top", "x"],
                &["real", "link", "x"],
            ] {
                let e = r.open_dir(comps).unwrap_err();
                assert!(
                    e.to_string().contains("is not a directory"),
                    "{comps:?} openat2 {via_openat2}: {e}"
                );
            }
            assert!(r.open_dir(["real"]).is_ok());
            assert!(r.open_dir(["..", "x"]).is_err() && r.open_dir(["a/b"]).is_err());
        }
        NO_OPENAT2.store(false, Ordering::Relaxed);
        let d = r.open_dir(["real"]).unwrap();
        // A file cannot be created through the link, nor a mode or time set through it.
        assert!(d.create_new(os("link"), 0o600).is_err());
        d.chmod(os("link"), 0o777).unwrap();
        d.set_mtime(os("link"), FileTime::from_secs(5)).unwrap();
        let out = std::fs::metadata(outside.path()).unwrap();
        assert_ne!(FileTime::mtime_of(&out), FileTime::from_secs(5));
        assert_ne!(
            std::os::unix::fs::PermissionsExt::mode(&out.permissions()) & 0o777,
            0o777
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_after_opening_cannot_redirect_writes() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        let r = Root::open(root.path()).unwrap();
        // The check-then-use race, made deterministic: open the directory, then swap it.
        let d = r.open_dir(["d"]).unwrap();
        std::fs::rename(root.path().join("d"), root.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("d")).unwrap();
        d.create_new(os("f"), 0o600).unwrap();
        d.symlink(os("/etc/passwd"), os("l")).unwrap();
        d.rename(os("f"), os("g")).unwrap();
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(root.path().join("moved/g").is_file());
        // And a descent made after the swap refuses the link.
        assert!(r.open_dir(["d"]).is_err());
    }

    #[test]
    fn remove_tree_removes_links_not_their_targets() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"k").unwrap();
        std::fs::create_dir_all(root.path().join("t/sub")).unwrap();
        std::fs::write(root.path().join("t/sub/f"), b"f").unwrap();
        std::os::unix::fs::symlink(outside.path(), root.path().join("t/link")).unwrap();
        let r = Root::open(root.path()).unwrap();
        r.dir().remove_tree(os("t")).unwrap();
        assert!(!root.path().join("t").exists());
        assert!(outside.path().join("keep").exists());
        let mut names = r.dir().names().unwrap();
        names.sort();
        assert!(names.is_empty(), "{names:?}");
    }
}
