//! Tree listings: every entry under a root with the metadata a sync compares.
//!
//! A listing may come from the peer, so its paths are a parsed type, [`RelPath`], that cannot hold
//! `..`, `.`, empty or absolute components: a hostile agent cannot name anything outside the root.
//! Walking never follows symlinks; they are listed as links with their target. Temporary files
//! (`crate::fs::temp`) are never listed, and stale ones are removed when the listing asks.

use crate::fs::{temp, Dir, FileTime, Kind, Meta, Root};
use std::ffi::OsStr;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::pattern::Excludes;

/// A `/`-separated path relative to an endpoint root; empty means the root itself.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelPath(String);

impl RelPath {
    /// Accept only plain relative paths: no empty, `.` or `..` components, no leading `/`, no NUL.
    pub fn parse(s: &str) -> Result<RelPath> {
        if s.is_empty() {
            return Ok(RelPath::default());
        }
        for comp in s.split('/') {
            if crate::fs::beneath::check_name(comp.as_bytes()).is_err() {
                bail!("refusing unsafe path {s:?} (component {comp:?})");
            }
        }
        Ok(RelPath(s.to_string()))
    }

    pub fn root() -> RelPath {
        RelPath::default()
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `self/name`; `name` must be one safe component.
    pub fn join(&self, name: &str) -> Result<RelPath> {
        if name.contains('/') {
            bail!("refusing unsafe name {name:?}");
        }
        RelPath::parse(&if self.0.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.0)
        })
    }

    /// The parent, or `None` for the root.
    pub fn parent(&self) -> Option<RelPath> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((p, _)) => RelPath(p.to_string()),
            None => RelPath::root(),
        })
    }

    /// The last component (empty for the root).
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    pub fn depth(&self) -> usize {
        self.components().count()
    }

    /// Is `self` equal to or below `other`?
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The directory holding `self` beneath `root`, reached without following any symlink, and
    /// `self`'s name in it. Refused for the root itself.
    pub fn open_parent(&self, root: &Root) -> Result<(Dir, &OsStr)> {
        let comps: Vec<&str> = self.components().collect();
        let Some((name, parents)) = comps.split_last() else {
            bail!("refusing to name the root itself");
        };
        let dir = root.open_dir(parents).map_err(|e| match e.raw_os_error() {
            Some(_) => {
                let shown = parents
                    .iter()
                    .fold(root.path().to_path_buf(), |p, c| p.join(c));
                anyhow::anyhow!("{}: {}", shown.display(), crate::fs::io_text(&e))
            }
            None => anyhow::anyhow!("{e}"),
        })?;
        Ok((dir, OsStr::new(*name)))
    }

    /// The local path under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        let mut p = root.to_path_buf();
        for c in self.components() {
            p.push(c);
        }
        p
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a listed entry is, with what a sync compares for it: a file's size, a link's target.
/// (The plain file type is [`crate::fs::Kind`].)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64 },
    Symlink { target: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub mtime: FileTime,
    /// BLAKE3 of a regular file's content, when asked for (`-c`).
    pub hash: Option<[u8; 32]>,
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, EntryKind::Dir)
    }

    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size } => *size,
            _ => 0,
        }
    }
}

/// What a listing request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListOpts {
    /// The subtree to list (it is listed itself, then its contents).
    pub start: RelPath,
    pub hashes: bool,
    pub excludes: Vec<String>,
    /// Remove temporary files left by an interrupted sync or copy (destination side, not dry
    /// run); those of a transfer still running are kept (see `crate::fs::temp`).
    pub clean_temps: bool,
}

/// A listing: whether the root exists, and the entries in pre-order (parents first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub root_exists: bool,
    pub entries: Vec<Entry>,
    /// Mtimes are whole seconds (an SFTP listing): compare times at second granularity.
    /// Never sent over the agent protocol, whose listings are to the nanosecond.
    pub mtime_seconds: bool,
}

/// Walk `root/start` without following symlinks.
pub fn walk(root: &Path, opts: &ListOpts) -> Result<Listing> {
    let excludes = Excludes::new(&opts.excludes)?;
    let root_exists = match std::fs::metadata(root) {
        Ok(m) => m.is_dir() || opts.start.is_root(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", root.display())),
    };
    let mut listing = Listing {
        root_exists,
        entries: Vec::new(),
        mtime_seconds: false,
    };
    if !root_exists {
        return Ok(listing);
    }
    let top = opts.start.under(root);
    let meta = match std::fs::symlink_metadata(&top) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(listing),
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", top.display())),
    };
    // The root itself may be a symlink the user named; its target is what they mean.
    let meta = if opts.start.is_root() && meta.file_type().is_symlink() {
        std::fs::metadata(&top).with_context(|| format!("cannot stat {}", top.display()))?
    } else {
        meta
    };
    visit(
        &top,
        opts.start.clone(),
        meta,
        &excludes,
        opts,
        &mut listing.entries,
    )?;
    Ok(listing)
}

fn visit(
    path: &Path,
    rel: RelPath,
    meta: Metadata,
    excludes: &Excludes,
    opts: &ListOpts,
    out: &mut Vec<Entry>,
) -> Result<()> {
    let Some(entry) = entry_for(path, rel.clone(), &meta, opts.hashes)? else {
        return Ok(());
    };
    let is_dir = entry.is_dir();
    out.push(entry);
    if !is_dir {
        return Ok(());
    }
    let mut children = Vec::new();
    // Opened on the first temporary file found: most directories hold none.
    let mut here: Option<std::io::Result<crate::fs::Root>> = None;
    for item in
        std::fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?
    {
        let item = item.with_context(|| format!("cannot list {}", path.display()))?;
        let name = item.file_name();
        if temp::is_temp(name.as_bytes()) {
            if opts.clean_temps {
                let dir = here.get_or_insert_with(|| crate::fs::Root::open(path));
                let p = path.join(&name);
                match dir
                    .as_ref()
                    .map_err(|e| e.kind().into())
                    .and_then(|d| temp::remove_if_stale(d.dir(), &name))
                {
                    Ok(true) => tracing::debug!("removed stale {}", p.display()),
                    Ok(false) => {}
                    Err(e) => tracing::warn!("cannot remove stale {}: {e}", p.display()),
                }
            }
            continue;
        }
        let Some(name) = name.to_str() else {
            tracing::warn!(
                "skipping non-UTF-8 name {:?} in {}",
                String::from_utf8_lossy(name.as_bytes()),
                path.display()
            );
            continue;
        };
        children.push(name.to_string());
    }
    children.sort();
    for name in children {
        let child_rel = rel.join(&name)?;
        let child = path.join(&name);
        let m = match std::fs::symlink_metadata(&child) {
            Ok(m) => m,
            // Vanished while we walked: nothing to sync.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", child.display())),
        };
        if excludes.is_excluded(child_rel.as_str(), m.is_dir()) {
            continue;
        }
        visit(&child, child_rel, m, excludes, opts, out)?;
    }
    Ok(())
}

fn entry_for(path: &Path, rel: RelPath, m: &Metadata, hashes: bool) -> Result<Option<Entry>> {
    let meta = Meta::of(m);
    let kind = match meta.kind {
        Kind::Dir => EntryKind::Dir,
        Kind::File => EntryKind::File { size: meta.size },
        Kind::Symlink => {
            let t = std::fs::read_link(path)
                .with_context(|| format!("cannot read link {}", path.display()))?;
            let Some(target) = t.to_str() else {
                tracing::warn!(
                    "skipping symlink {} with a non-UTF-8 target",
                    path.display()
                );
                return Ok(None);
            };
            EntryKind::Symlink {
                target: target.to_string(),
            }
        }
        Kind::Other => {
            tracing::warn!("skipping special file {}", path.display());
            return Ok(None);
        }
    };
    let hash = match (&kind, hashes) {
        (EntryKind::File { .. }, true) => Some(hash_file(path)?),
        _ => None,
    };
    Ok(Some(Entry {
        path: rel,
        kind,
        mode: meta.mode,
        mtime: meta.mtime,
        hash,
    }))
}

/// BLAKE3 of a file's content, read without following a symlink.
pub fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let f = open_nofollow(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}

/// Open a regular file for reading, refusing a symlink in the last component.
pub fn open_nofollow(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn relpath_refuses_escapes() {
        for bad in ["..", "a/../b", "/etc", "a//b", "a/", "./a", "a/.", "a\0b"] {
            assert!(RelPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::parse("a/b.c/..d").is_ok());
        assert!(RelPath::parse("").unwrap().is_root());
        assert!(RelPath::root().join("..").is_err());
        assert!(RelPath::root().join("a/b").is_err());
    }

    #[test]
    fn relpath_parts() {
        let p = RelPath::parse("a/b/c").unwrap();
        assert_eq!(p.name(), "c");
        assert_eq!(p.parent().unwrap().as_str(), "a/b");
        assert_eq!(RelPath::parse("a").unwrap().parent(), Some(RelPath::root()));
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(!RelPath::parse("a/bc")
            .unwrap()
            .starts_with(&RelPath::parse("a/b").unwrap()));
        assert!(p.starts_with(&RelPath::root()));
    }

    #[test]
    fn walk_lists_preorder_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/sub")).unwrap();
        std::fs::write(d.path().join("a/f"), b"hi").unwrap();
        std::fs::write(d.path().join("a/sub/g.o"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", d.path().join("a/l")).unwrap();
        std::fs::write(d.path().join("a/.vtun-tmp.f.123"), b"junk").unwrap();
        let live = crate::fs::temp::TempFile::create(
            crate::fs::Root::open(&d.path().join("a"))
                .unwrap()
                .dir()
                .try_clone()
                .unwrap(),
            std::ffi::OsStr::new("g"),
        )
        .unwrap();
        let l = walk(
            d.path(),
            &ListOpts {
                start: RelPath::parse("a").unwrap(),
                hashes: true,
                excludes: vec!["*.o".into()],
                clean_temps: true,
            },
        )
        .unwrap();
        let names: Vec<_> = l.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["a", "a/f", "a/l", "a/sub"]);
        assert!(
            !d.path().join("a/.vtun-tmp.f.123").exists(),
            "a dead writer's is removed"
        );
        assert!(live.shown().exists(), "a live writer's is kept");
        assert_eq!(l.entries[1].kind, EntryKind::File { size: 2 });
        assert_eq!(l.entries[1].hash, Some(*blake3::hash(b"hi").as_bytes()));
        assert_eq!(
            l.entries[2].kind,
            EntryKind::Symlink {
                target: "/etc".into()
            }
        );
    }
}
