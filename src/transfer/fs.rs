//! One file-system interface over both ends of a copy: the local disk, or a remote host reached
//! through a pool of SFTP streams. The copy engine is written once against [`Fs`], so upload,
//! download and VM→VM are the same code.
//!
//! A remote host keeps up to N SFTP streams (each a separate SSH channel), opened lazily; callers
//! pick a stream by slot so parallel ranges and concurrent small files spread over channels.
//! Directory listings are validated here, before any caller sees a name: a name with `/`, or
//! `.`/`..`, or an empty one is refused (scp's CVE-2019-6111 class).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::OnceCell;

use super::handle::{attrs_for, file_times};
pub use super::handle::{Reader, Writer};
use super::proto::{self, Attrs};
use super::sftp::{self, Sftp};
use crate::link::Link as Opener;

/// What kind of entry a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// The metadata the engine copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub size: u64,
    /// Permission bits only (`0o7777`).
    pub mode: u32,
    pub atime: i64,
    pub mtime: i64,
}

impl Meta {
    fn from_attrs(a: &Attrs) -> Meta {
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
            atime: atime as i64,
            mtime: mtime as i64,
        }
    }

    fn from_std(m: &std::fs::Metadata) -> Meta {
        let ft = m.file_type();
        let kind = if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else {
            Kind::Other
        };
        Meta {
            kind,
            size: m.len(),
            mode: m.mode() & 0o7777,
            atime: m.atime(),
            mtime: m.mtime(),
        }
    }
}

/// Accept a directory-listing name only if it names exactly one entry inside the directory.
pub fn checked_name(name: &[u8], dir: &str) -> Result<OsString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        bail!(
            "refusing unsafe name {:?} in the listing of {dir} (it would escape the destination)",
            String::from_utf8_lossy(name)
        );
    }
    Ok(OsString::from_vec(name.to_vec()))
}

/// Local errors in the same words as remote ones, so messages read alike.
pub fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::ENOSPC) => "no space left on device".into(),
        Some(libc::EDQUOT) => "disk quota exceeded".into(),
        Some(libc::ENOTDIR) => "not a directory".into(),
        _ => e.to_string().to_lowercase(),
    }
}

fn io_err(e: std::io::Error, what: &str) -> anyhow::Error {
    anyhow!("{what}: {}", io_text(&e))
}

/// A remote host: its opener and a lazily opened pool of SFTP streams.
pub struct RemoteFs {
    opener: Arc<dyn Opener>,
    slots: Vec<OnceCell<Sftp>>,
}

impl RemoteFs {
    pub fn new(opener: Arc<dyn Opener>, streams: usize) -> RemoteFs {
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
    Local,
    Remote(Arc<RemoteFs>),
}

impl Fs {
    /// `path` as the user would write it (`host:path` for remote ones).
    pub fn show(&self, path: &Path) -> String {
        match self {
            Fs::Local => path.display().to_string(),
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
            Fs::Local => Ok(256 * 1024),
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
            Fs::Local => {
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
                    Ok(m) => Ok(Some(Meta::from_std(&m))),
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
                    Ok(a) => Ok(Some(Meta::from_attrs(&a))),
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
            Fs::Local => {
                let p = path.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    for e in std::fs::read_dir(&p).map_err(|e| io_err(e, &shown))? {
                        let e = e.map_err(|e| io_err(e, &shown))?;
                        let name = checked_name(e.file_name().as_bytes(), &shown)?;
                        let m = std::fs::symlink_metadata(e.path())
                            .map_err(|err| io_err(err, &e.path().display().to_string()))?;
                        out.push((name, Meta::from_std(&m)));
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
                    .map(|e| Ok((checked_name(&e.name, &shown)?, Meta::from_attrs(&e.attrs))))
                    .collect()
            }
        }
    }

    pub async fn read_link(&self, path: &Path) -> Result<PathBuf> {
        match self {
            Fs::Local => std::fs::read_link(path).map_err(|e| io_err(e, &self.show(path))),
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

    /// Create directory `path`; an existing directory is fine.
    pub async fn mkdir(&self, path: &Path, mode: u32) -> Result<()> {
        let res = match self {
            Fs::Local => {
                let mut b = std::fs::DirBuilder::new();
                std::os::unix::fs::DirBuilderExt::mode(&mut b, mode);
                b.create(path).map_err(|e| io_err(e, &self.show(path)))
            }
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
        };
        if let Err(e) = res {
            match self.stat(path).await {
                Ok(Some(m)) if m.kind == Kind::Dir => return Ok(()),
                Ok(Some(_)) => bail!("{}: exists and is not a directory", self.show(path)),
                _ => return Err(e),
            }
        }
        Ok(())
    }

    pub async fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        match self {
            Fs::Local => {
                std::os::unix::fs::symlink(target, link).map_err(|e| io_err(e, &self.show(link)))
            }
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.symlink(target, link)
                    .await
                    .map_err(|e| self.remote_err(e, link))
            }
        }
    }

    /// Rename `from` over `to`, replacing it atomically.
    pub async fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        match self {
            Fs::Local => std::fs::rename(from, to).map_err(|e| io_err(e, &self.show(to))),
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.rename(from, to).await.map_err(|e| self.remote_err(e, to))
            }
        }
    }

    pub async fn remove(&self, path: &Path) -> Result<()> {
        match self {
            Fs::Local => std::fs::remove_file(path).map_err(|e| io_err(e, &self.show(path))),
            Fs::Remote(r) => {
                let c = r.client(0).await?;
                c.remove(path).await.map_err(|e| self.remote_err(e, path))
            }
        }
    }

    /// Set permission bits and, when given, (atime, mtime) on `path` (following symlinks).
    pub async fn set_meta(&self, path: &Path, mode: u32, times: Option<(i64, i64)>) -> Result<()> {
        match self {
            Fs::Local => {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io_err(e, &self.show(path)))?;
                if let Some((a, m)) = times {
                    let f = std::fs::File::open(path).map_err(|e| io_err(e, &self.show(path)))?;
                    f.set_times(file_times(a, m))
                        .map_err(|e| io_err(e, &self.show(path)))?;
                }
                Ok(())
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
            Fs::Local => std::fs::canonicalize(path).map_err(|e| io_err(e, &self.show(path))),
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
            Fs::Local => {
                let f = std::fs::File::open(path).map_err(|e| io_err(e, &self.show(path)))?;
                Ok(Reader::Local(Arc::new(f)))
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
            Fs::Local => {
                let mut o = std::fs::OpenOptions::new();
                o.write(true)
                    .create(create)
                    .truncate(create && !keep)
                    .mode(0o600);
                let f = o.open(path).map_err(|e| io_err(e, &self.show(named)))?;
                Ok(Writer::Local(Arc::new(super::handle::LocalFile::new(f))))
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
            Fs::Local => None,
            Fs::Remote(r) => {
                let c = r.client(0).await.ok()?;
                c.free_space(path).await.ok().flatten()
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
