//! What cp and sync know about an entry on disk: its [`Kind`] and the [`Meta`] they copy. Both
//! engines read local entries through [`Meta::of`], so a file type or a mode is classified the
//! same way everywhere; remote sides convert their wire attributes into the same types.

use std::os::unix::fs::MetadataExt;

use super::FileTime;

/// What kind of entry a path is, never following a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// A device, socket or FIFO: neither engine copies these.
    Other,
}

impl Kind {
    pub fn of(ft: std::fs::FileType) -> Kind {
        if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other
        }
    }
}

/// The metadata the engines copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub atime: FileTime,
    pub mtime: FileTime,
}

impl Meta {
    /// From `lstat` (or `stat`, when the caller followed a link on purpose).
    pub fn of(m: &std::fs::Metadata) -> Meta {
        Meta {
            kind: Kind::of(m.file_type()),
            size: m.len(),
            mode: m.mode() & 0o7777,
            atime: FileTime::new(m.atime(), m.atime_nsec().clamp(0, 999_999_999) as u32),
            mtime: FileTime::mtime_of(m),
        }
    }
}

// Tests only: unwrap on local temp files.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_lstat_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"abc").unwrap();
        std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
        for (name, want) in [("f", Kind::File), ("l", Kind::Symlink), ("", Kind::Dir)] {
            let m = std::fs::symlink_metadata(d.path().join(name)).unwrap();
            assert_eq!(Meta::of(&m).kind, want, "{name:?}");
        }
        let f = Meta::of(&std::fs::metadata(d.path().join("f")).unwrap());
        assert_eq!((f.size, f.mode & !0o7777), (3, 0));
    }
}
