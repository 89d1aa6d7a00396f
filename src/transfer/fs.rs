//! One file-system interface over both ends of a copy: the local disk, or a remote host reached
//! through a pool of SFTP streams. The copy engine is written once against [`Fs`], so upload,
//! download and VM→VM are the same code.
//!
//! A remote host keeps up to N SFTP streams (each a separate SSH channel), opened lazily; callers
//! pick a stream by slot so parallel ranges and concurrent small files spread over channels.
//! Directory listings are validated here, before any caller sees a name: a name with `/`, or
//! `.`/`..`, or an empty one is refused (scp's CVE-2019-6111 class). A local tree destination is
//! [`Fs::Beneath`] its root, so its writes descend by directory descriptor like sync's; a remote
//! one can only be checked with `lstat` over SFTP, which has no descriptor-relative calls.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::OnceCell;

use super::handle::attrs_for;
pub use super::handle::{Reader, Writer};
use crate::fs::{io_text, temp, Dir, FileTime, Kind, LocalReader, LocalWriter, Meta, Root};
use crate::link::Link;
use crate::sftp::proto::{self, Attrs};
use crate::sftp::{self, Sftp};

/// The metadata of an SFTP entry, in the types every engine uses.
fn meta_of_attrs(a: &Attrs) -> Meta {
    let kind = match a.file_type() {
        proto::S_IFREG => Kind::File,
        proto::S_IFDIR => Kind::Dir,
        proto::S_IFLNK => Kind::Symlink,
        _ => Kind::Other,
    };
    let (atime, mtime) = a.times.unwrap_or((0, 0));
    Meta {
        kind,
        size: a.size.unwrap_or(0),
        mode: a.perm.unwrap_or(0o644) & 0o7777,
        atime: FileTime::from_secs(atime.into()),
        mtime: FileTime::from_secs(mtime.into()),
    }
}

/// Accept a directory-listing name only if it names exactly one entry inside the directory.
pub fn checked_name(name: &[u8], dir: &str) -> Result<OsString> {
    if crate::fs::beneath::check_name(name).is_err() {
        bail!(
            "refusing unsafe name {:?} in the listing of {dir} (it would escape the destination)",
            String::from_utf8_lossy(name)
        );
    }
    Ok(OsString::from_vec(name.to_vec()))
}

fn io_err(e: std::io::Error, what: &str) -> anyhow::Error {
    anyhow!("{what}: {}", io_text(&e))
}

/// A remote host: its opener and a lazily opened pool of SFTP streams.
pub struct RemoteFs {
    opener: Arc<dyn Link>,
    slots: Vec<OnceCell<Sftp>>,
}

impl RemoteFs {
    pub fn new(opener: Arc<dyn Link>, streams: usize) -> RemoteFs {
        let slots = (0..streams.max(1)).map(|_| OnceCell::new()).collect();
        RemoteFs { opener, slots }
    }

    pub fn name(&self) -> &str {
        self.opener.name()
    }

    pub fn streams(&self) -> usize {
        self.slots.len()
    }

    /// The SFTP stream for `slot` (modulo the pool size), opening it on first use.
    ///
    /// Servers cap the channels per connection (OpenSSH: `MaxSessions`, 10 by default). When an
    /// extra stream cannot be opened, its slot shares the first stream instead of failing the
    /// copy: fewer channels, same result.
    pub async fn client(&self, slot: usize) -> Result<Sftp> {
        let i = slot % self.slots.len();
        let s = self.slots[i]
            .get_or_try_init(|| async {
                match self.connect().await {
                    Ok(s) => Ok(s),
                    Err(e) if i > 0 => {
                        tracing::info!("{e:#}; sharing the first channel instead");
                        Box::pin(self.client(0)).await
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(s.clone())
    }

    /// Every entry under `root` that `keep` accepts, as (relative path, metadata), sorted so
    /// each directory comes before its contents: [`sftp::walk`] on the first stream, many
    /// directories listed at once and every cap on what the server may send applied.
    pub async fn walk<F>(&self, root: &Path, mut keep: F) -> Result<Vec<(PathBuf, Meta)>>
    where
        F: FnMut(&Path, &Meta) -> bool,
    {
        let c = self.client(0).await?;
        let entries = sftp::walk(&c, self.name(), root, |rel, e| {
            keep(rel, &meta_of_attrs(&e.attrs))
        })
        .await?;
        Ok(entries
            .into_iter()
            .map(|(rel, a)| (rel, meta_of_attrs(&a)))
            .collect())
    }

    async fn connect(&self) -> Result<Sftp> {
        let io = self
            .opener
            .sftp()
            .await
            .with_context(|| format!("cannot open SFTP to {}", self.name()))?;
        Sftp::connect(io)
            .await
            .with_context(|| format!("SFTP to {}", self.name()))
    }
}

/// One side of a copy.
#[derive(Clone)]
pub enum Fs {
    /// The local disk, by the paths the user named: a write happens in its path's parent
    /// directory and never follows a symlink in the last component.
    Local,
    /// The local disk beneath a destination root: every write descends from the root by
    /// directory descriptor and never follows a symlink (see `crate::fs::beneath`). Paths are
    /// still full paths (they start with the root's), so the engine is the same code.
    Beneath(Arc<Root>),
    Remote(Arc<RemoteFs>),
}

/// `path` beneath `root` as its directory and its name there (`None`: the root itself).
fn split_beneath(root: &Root, path: &Path) -> std::io::Result<(Dir, Option<OsString>)> {
    let outside = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not beneath the destination",
        )
    };
    let rel = path.strip_prefix(root.path()).map_err(|_| outside())?;
    let mut comps = Vec::new();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(n) => comps.push(n),
            _ => return Err(outside()),
        }
    }
    let Some(name) = comps.pop() else {
        return Ok((root.dir().try_clone()?, None));
    };
    Ok((root.open_dir(comps)?, Some(name.to_os_string())))
}

impl Fs {
    /// Where a local write to `path` happens, as a directory and a name in it (`None`: that
    /// directory itself). Beneath a root, reached from the root by descriptor; on the plain
    /// local side (a path the user named), in its parent directory as the path names it.
    fn local_node(&self, path: &Path) -> std::io::Result<(Dir, Option<OsString>)> {
        if let Fs::Beneath(root) = self {
            return split_beneath(root, path);
        }
        match (path.parent(), path.file_name()) {
            (Some(parent), Some(name)) => {
                let parent = match parent.as_os_str().is_empty() {
                    true => Path::new("."),
                    false => parent,
                };
                Ok((Root::open(parent)?.into_dir(), Some(name.to_os_string())))
            }
            _ => Ok((Root::open(path)?.into_dir(), None)),
        }
    }

    /// As [`Fs::local_node`], for an operation on an entry (not a directory's own metadata).
    fn local_entry(&self, path: &Path) -> std::io::Result<(Dir, OsString)> {
        match self.local_node(path)? {
            (dir, Some(name)) => Ok((dir, name)),
            (_, None) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "names a directory, not an entry in one",
            )),
        }
    }

    /// `path` as the user would write it (`host:path` for remote ones).
    pub fn show(&self, path: &Path) -> String {
        match self {
            Fs::Local | Fs::Beneath(_) => path.display().to_string(),
            Fs::Remote(r) => format!("{}:{}", r.name(), path.display()),
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self, Fs::Remote(_))
    }

    fn remote_err(&self, e: anyhow::Error, path: &Path) -> anyhow::Error {
        e.context(self.show(path))
    }

    /// Largest request size both this side's protocol and memory use favour.
    pub async fn chunk(&self) -> Result<u32> {
        match self {
            Fs::Local | Fs::Beneath(_) => Ok(256 * 1024),
            Fs::Remote(r) => {
                let (read, write) = r.client(0).await?.limits().await?;
                Ok(read.min(write))
            }
        }
    }

    /// Metadata following symlinks; `None` when nothing is there.
    pub async fn stat(&self, path: &Path) -> Result<Option<Meta>> {
        self.stat_inner(path, true).await
    }

    /// Metadata of the entry itself (a symlink is reported as one).
    pub async fn lstat(&self, path: &Path) -> Result<Option<Meta>> {
        self.stat_inner(path, false).await
    }

    async fn stat_inner(&self, path: &Path, follow: bool) -> Result<Option<Meta>> {
        match self {
            Fs::Beneath(_) if !follow => {
                let r = self
                    .local_entry(path)
                    .and_then(|(dir, name)| dir.lstat(&name));
                match r {
                    Ok(m) => Ok(m),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(e, &self.show(path))),
                }
            }
            Fs::Local | Fs::Beneath(_) => {
                let p = path.to_path_buf();
                let r = tokio::task::spawn_blocking(move || {
                    if follow {
                        std::fs::metadata(&p)
                    } else {
                        std::fs::symlink_metadata(&p)
                    }
                })
                .await?;
                match r {
                    Ok(m) => Ok(Some(Meta::of(&m))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_err(e, &self.show(path))),
                }
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                let res = if follow {
                    c.stat(path).await
                } else {
                    c.lstat(path).await
                };
                match res {
                    Ok(a) => Ok(Some(meta_of_attrs(&a))),
                    Err(e) if sftp::status_of(&e) == Some(proto::FX_NO_SUCH_FILE) => Ok(None),
                    Err(e) => Err(self.remote_err(e, path)),
                }
            }
        }
    }

    /// Entries of directory `path` (not following symlinks), names validated.
    pub async fn read_dir(&self, path: &Path) -> Result<Vec<(OsString, Meta)>> {
        let shown = self.show(path);
        match self {
            Fs::Local | Fs::Beneath(_) => {
                let p = path.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    for e in std::fs::read_dir(&p).map_err(|e| io_err(e, &shown))? {
                        let e = e.map_err(|e| io_err(e, &shown))?;
                        let name = checked_name(e.file_name().as_bytes(), &shown)?;
                        let m = std::fs::symlink_metadata(e.path())
                            .map_err(|err| io_err(err, &e.path().display().to_string()))?;
                        out.push((name, Meta::of(&m)));
                    }
                    Ok(out)
                })
                .await?
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                let entries = c
                    .read_dir(path)
                    .await
                    .map_err(|e| self.remote_err(e, path))?;
                entries
                    .iter()
                    .map(|e| Ok((checked_name(&e.name, &shown)?, meta_of_attrs(&e.attrs))))
                    .collect()
            }
        }
    }

    pub async fn read_link(&self, path: &Path) -> Result<PathBuf> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                std::fs::read_link(path).map_err(|e| io_err(e, &self.show(path)))
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                let t = c
                    .readlink(path)
                    .await
                    .map_err(|e| self.remote_err(e, path))?;
                Ok(PathBuf::from(OsStr::from_bytes(&t)))
            }
        }
    }

    /// Create directory `path`; an existing directory (or a symlink to one: this is for roots
    /// the user named) is fine.
    pub async fn mkdir(&self, path: &Path, mode: u32) -> Result<()> {
        if let Err(e) = self.mkdir_once(path, mode).await {
            match self.stat(path).await {
                Ok(Some(m)) if m.kind == Kind::Dir => return Ok(()),
                Ok(Some(_)) => bail!("{}: exists and is not a directory", self.show(path)),
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Create directory `path` inside a destination; an existing directory is fine, and a
    /// symlink there is replaced by the directory, never followed (rsync's rule: what is
    /// written beneath the destination stays beneath it).
    pub async fn mkdir_inside(&self, path: &Path, mode: u32) -> Result<()> {
        if let Err(e) = self.mkdir_once(path, mode).await {
            match self.lstat(path).await {
                Ok(Some(m)) if m.kind == Kind::Dir => return Ok(()),
                Ok(Some(m)) if m.kind == Kind::Symlink => {
                    tracing::info!("replacing symlink {} by a directory", self.show(path));
                    self.remove(path).await?;
                    return self.mkdir_once(path, mode).await;
                }
                Ok(Some(_)) => bail!("{}: exists and is not a directory", self.show(path)),
                _ => return Err(e),
            }
        }
        Ok(())
    }

    async fn mkdir_once(&self, path: &Path, mode: u32) -> Result<()> {
        match self {
            Fs::Local | Fs::Beneath(_) => self
                .local_entry(path)
                .and_then(|(dir, name)| dir.mkdir(&name, mode))
                .map_err(|e| io_err(e, &self.show(path))),
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                let attrs = Attrs {
                    perm: Some(mode),
                    ..Attrs::default()
                };
                c.mkdir(path, &attrs)
                    .await
                    .map_err(|e| self.remote_err(e, path))
            }
        }
    }

    pub async fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        match self {
            Fs::Local | Fs::Beneath(_) => self
                .local_entry(link)
                .and_then(|(dir, name)| dir.symlink(target.as_os_str(), &name))
                .map_err(|e| io_err(e, &self.show(link))),
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.symlink(target, link)
                    .await
                    .map_err(|e| self.remote_err(e, link))
            }
        }
    }

    /// Rename `from` over `to`, replacing it atomically (beneath a root: both in one directory,
    /// as a temporary file and its final name are).
    pub async fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                if from.parent() != to.parent() {
                    bail!("{}: not beside {}", self.show(from), self.show(to));
                }
                let to_name = to.file_name().unwrap_or_default();
                self.local_entry(from)
                    .and_then(|(dir, name)| dir.rename(&name, to_name))
                    .map_err(|e| io_err(e, &self.show(to)))
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.rename(from, to).await.map_err(|e| self.remote_err(e, to))
            }
        }
    }

    pub async fn remove(&self, path: &Path) -> Result<()> {
        match self {
            Fs::Local | Fs::Beneath(_) => self
                .local_entry(path)
                .and_then(|(dir, name)| dir.unlink(&name))
                .map_err(|e| io_err(e, &self.show(path))),
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.remove(path).await.map_err(|e| self.remote_err(e, path))
            }
        }
    }

    /// Set permission bits and, when given, (atime, mtime) on `path`. Locally a symlink there is
    /// left alone (never followed); SFTP v3 follows it.
    pub async fn set_meta(
        &self,
        path: &Path,
        mode: u32,
        times: Option<(FileTime, FileTime)>,
    ) -> Result<()> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                let set = |(dir, name): (Dir, Option<OsString>)| match name {
                    Some(name) => {
                        dir.chmod(&name, mode)?;
                        match times {
                            Some((a, m)) => dir.set_times(&name, Some(a), m),
                            None => Ok(()),
                        }
                    }
                    None => {
                        dir.set_own_mode(mode)?;
                        match times {
                            Some((a, m)) => dir.set_own_times(Some(a), m),
                            None => Ok(()),
                        }
                    }
                };
                self.local_node(path)
                    .and_then(set)
                    .map_err(|e| io_err(e, &self.show(path)))
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.setstat(path, &attrs_for(mode, times))
                    .await
                    .map_err(|e| self.remote_err(e, path))
            }
        }
    }

    /// The canonical absolute path (used to name `.`, `..` or `/` operands).
    pub async fn canonical(&self, path: &Path) -> Result<PathBuf> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                std::fs::canonicalize(path).map_err(|e| io_err(e, &self.show(path)))
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                let p = c
                    .realpath(path)
                    .await
                    .map_err(|e| self.remote_err(e, path))?;
                Ok(PathBuf::from(OsStr::from_bytes(&p)))
            }
        }
    }

    /// Open `path` for reading through stream `slot`.
    pub async fn open_read(&self, path: &Path, slot: usize) -> Result<Reader> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                let f = std::fs::File::open(path).map_err(|e| io_err(e, &self.show(path)))?;
                Ok(Reader::Local(LocalReader::new(f)))
            }
            Fs::Remote(r) => {
                let c = r.client(slot).await?;
                let h = c
                    .open(path, proto::OPEN_READ, &Attrs::default())
                    .await
                    .map_err(|e| self.remote_err(e, path))?;
                Ok(Reader::Remote(c, h))
            }
        }
    }

    /// Open `path` for writing through stream `slot`; `create` makes it (mode 0600, truncated
    /// unless `keep`), otherwise it must exist. Errors name `named` (the final name of a
    /// temporary file: what the user asked for).
    pub async fn open_write(
        &self,
        (path, named): (&Path, &Path),
        slot: usize,
        create: bool,
        keep: bool,
    ) -> Result<Writer> {
        match self {
            Fs::Local | Fs::Beneath(_) => {
                let f = self
                    .local_entry(path)
                    .and_then(|(dir, name)| dir.open_write(&name, create, create && !keep, 0o600))
                    .map_err(|e| io_err(e, &self.show(named)))?;
                if create && !keep {
                    // Held while the copy runs, so a sync's cleanup knows the file is live.
                    temp::lock(&f);
                }
                Ok(Writer::Local(LocalWriter::new(f)))
            }
            Fs::Remote(r) => {
                let c = r.client(slot).await?;
                let mut flags = proto::OPEN_WRITE;
                if create {
                    flags |= proto::OPEN_CREAT;
                    if !keep {
                        flags |= proto::OPEN_TRUNC;
                    }
                }
                let attrs = Attrs {
                    perm: Some(0o600),
                    ..Attrs::default()
                };
                let h = c
                    .open(path, flags, &attrs)
                    .await
                    .map_err(|e| self.remote_err(e, named))?;
                Ok(Writer::Remote(c, h))
            }
        }
    }

    /// Free bytes on the filesystem holding `path`, when the far side can tell.
    pub async fn free_space(&self, path: &Path) -> Option<u64> {
        match self {
            Fs::Local | Fs::Beneath(_) => None,
            Fs::Remote(r) => {
                let c = r.client(0).await.ok()?;
                c.free_space(path).await.ok().flatten()
            }
        }
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn beneath_a_root_no_write_follows_a_symlinked_directory() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = d.path().join("dst");
        std::fs::create_dir(&root).unwrap();
        let fs = Fs::Beneath(Arc::new(Root::open(&root).unwrap()));
        // Planted before the copy: replaced by the directory, not followed.
        std::os::unix::fs::symlink(outside.path(), root.join("sub")).unwrap();
        fs.mkdir_inside(&root.join("sub"), 0o755).await.unwrap();
        assert!(std::fs::symlink_metadata(root.join("sub"))
            .unwrap()
            .is_dir());
        // Swapped in after the directory was made: every write through it is refused.
        std::fs::rename(root.join("sub"), root.join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("sub")).unwrap();
        let f = root.join("sub/f");
        assert!(fs.open_write((&f, &f), 0, true, false).await.is_err());
        assert!(fs.symlink(Path::new("x"), &f).await.is_err());
        assert!(fs.mkdir(&root.join("sub/d"), 0o755).await.is_err());
        assert!(fs.set_meta(&root.join("sub/x"), 0o777, None).await.is_err());
        assert!(fs
            .open_write((&root.join("../esc"), &f), 0, true, false)
            .await
            .is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn listing_names_must_stay_inside_the_directory() {
        assert_eq!(
            checked_name(b"ok name \xff", "d").unwrap(),
            OsString::from_vec(b"ok name \xff".to_vec())
        );
        for bad in [&b""[..], b".", b"..", b"../x", b"/abs", b"a/b", b"nul\0"] {
            let err = checked_name(bad, "host:/d").unwrap_err();
            assert!(err.to_string().contains("refusing unsafe name"), "{err}");
        }
    }
}
