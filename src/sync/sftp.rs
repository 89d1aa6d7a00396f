//! The remote side of a sync without an agent (`--no-agent`, or a host that cannot run one):
//! the same [`Endpoint`] over plain SFTP, built on the transfer module's client.
//!
//! Without code on the far side there are no signatures and no remote hashes, so every changed
//! file is sent whole and `-c` is refused. SFTP v3 carries mtimes in whole seconds: listings say
//! so ([`Listing::mtime_seconds`]) and the plan compares seconds. Writes follow the agent's rules:
//! each parent under the root is `lstat`ed to be a real directory before anything is created,
//! content lands in a `.vtun-tmp.*` file beside its target and is renamed over it (posix-rename)
//! only after its hash checks out, and metadata is never set through a symlink.

use crate::fs::FileTime;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq, CHUNK};
use super::pattern::Excludes;
use super::tree::{is_temp_name, Entry, Kind, ListOpts, Listing, RelPath};
use crate::link::Link as Opener;
use crate::transfer::fs::{Fs, Kind as FsKind, Meta, Reader, Writer};
use crate::transfer::RemoteFs;

/// Reads or writes in flight per file: hides the round trip on a long link.
const DEPTH: usize = 16;

/// A sync root on a remote host, reached over SFTP only.
pub struct SftpEndpoint {
    opener: Arc<dyn Opener>,
    fs: Fs,
    root: PathBuf,
    wire: u64,
}

impl SftpEndpoint {
    /// Open an SFTP stream to `opener`'s host for `root` (relative paths are from the home
    /// directory, where the SFTP server starts).
    pub async fn open(opener: Arc<dyn Opener>, root: &str) -> Result<SftpEndpoint> {
        let remote = Arc::new(RemoteFs::new(opener.clone(), 1));
        remote.client(0).await?;
        Ok(SftpEndpoint {
            opener,
            fs: Fs::Remote(remote),
            root: PathBuf::from(root),
            wire: 0,
        })
    }

    fn host(&self) -> &str {
        self.opener.name()
    }

    fn at(&self, rel: &RelPath) -> PathBuf {
        rel.under(&self.root)
    }

    /// The remote path of `rel` after checking that every directory between the root and it is
    /// a real directory, not a symlink. `known` caches directories already checked in this batch.
    async fn safe_path(&self, rel: &RelPath, known: &mut HashSet<RelPath>) -> Result<PathBuf> {
        let mut dir = RelPath::root();
        let comps: Vec<&str> = rel.components().collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            dir = dir.join(c)?;
            if known.contains(&dir) {
                continue;
            }
            let p = self.at(&dir);
            match self.fs.lstat(&p).await? {
                Some(m) if m.kind == FsKind::Dir => {
                    known.insert(dir.clone());
                }
                _ => bail!(
                    "{} is not a directory (symlinks are not followed)",
                    self.fs.show(&p)
                ),
            }
        }
        Ok(self.at(rel))
    }

    async fn walk(&self, opts: &ListOpts) -> Result<Listing> {
        if opts.hashes {
            bail!(
                "-c/--checksum needs the sync agent on {}: over plain SFTP it would mean \
                 downloading every file",
                self.host()
            );
        }
        let excludes = Excludes::new(&opts.excludes)?;
        let mut listing = Listing {
            mtime_seconds: true,
            ..Listing::default()
        };
        listing.root_exists = match self.fs.stat(&self.root).await? {
            Some(m) => m.kind == FsKind::Dir || opts.start.is_root(),
            None => false,
        };
        if !listing.root_exists {
            return Ok(listing);
        }
        let top = self.at(&opts.start);
        let Some(mut meta) = self.fs.lstat(&top).await? else {
            return Ok(listing);
        };
        // The root itself may be a symlink the user named; its target is what they mean.
        if opts.start.is_root() && meta.kind == FsKind::Symlink {
            meta = self
                .fs
                .stat(&top)
                .await?
                .with_context(|| format!("{}: dangling symlink", self.fs.show(&top)))?;
        }
        // Depth first with children sorted: the same pre-order as a local walk.
        let mut stack = vec![(opts.start.clone(), meta)];
        while let Some((rel, meta)) = stack.pop() {
            let Some(entry) = self.entry(&rel, &meta).await? else {
                continue;
            };
            let is_dir = entry.is_dir();
            listing.entries.push(entry);
            if !is_dir {
                continue;
            }
            let dir = self.at(&rel);
            let mut children = Vec::new();
            for (name, m) in self.fs.read_dir(&dir).await? {
                let Some(name) = name.to_str() else {
                    tracing::warn!("skipping non-UTF-8 name {name:?} in {}", self.fs.show(&dir));
                    continue;
                };
                if is_temp_name(name) {
                    if opts.clean_temps && m.kind != FsKind::Dir {
                        let p = dir.join(name);
                        if let Err(e) = self.fs.remove(&p).await {
                            tracing::warn!("cannot remove stale {}: {e:#}", self.fs.show(&p));
                        }
                    }
                    continue;
                }
                let child = rel.join(name)?;
                if excludes.is_excluded(child.as_str(), m.kind == FsKind::Dir) {
                    continue;
                }
                children.push((child, m));
            }
            children.sort_by(|a, b| b.0.cmp(&a.0));
            stack.extend(children);
        }
        Ok(listing)
    }

    async fn entry(&self, rel: &RelPath, m: &Meta) -> Result<Option<Entry>> {
        let kind = match m.kind {
            FsKind::Dir => Kind::Dir,
            FsKind::File => Kind::File { size: m.size },
            FsKind::Symlink => {
                let p = self.at(rel);
                let t = self.fs.read_link(&p).await?;
                let Some(target) = t.to_str() else {
                    tracing::warn!(
                        "skipping symlink {} with a non-UTF-8 target",
                        self.fs.show(&p)
                    );
                    return Ok(None);
                };
                Kind::Symlink {
                    target: target.to_string(),
                }
            }
            FsKind::Other => {
                tracing::warn!("skipping special file {}", self.fs.show(&self.at(rel)));
                return Ok(None);
            }
        };
        Ok(Some(Entry {
            path: rel.clone(),
            kind,
            mode: m.mode,
            mtime: FileTime::from_secs(m.mtime),
            hash: None,
        }))
    }

    /// Stream one whole file into `out`; an error before `Start` is reported by the caller.
    async fn send_one(&mut self, req: &SendReq, out: &mpsc::Sender<Piece>) -> Result<()> {
        let path = self.at(&req.path);
        let meta = self
            .fs
            .lstat(&path)
            .await?
            .ok_or_else(|| anyhow!("no such file"))?;
        if meta.kind != FsKind::File {
            bail!("not a regular file");
        }
        let reader = self.fs.open_read(&path, 0).await?;
        let res = self.stream(&reader, &req.path, &meta, out).await;
        let closed = reader.close().await;
        res.and(closed)
    }

    async fn stream(
        &mut self,
        reader: &Reader,
        rel: &RelPath,
        meta: &Meta,
        out: &mpsc::Sender<Piece>,
    ) -> Result<()> {
        let chunk = self.fs.chunk().await?.min(CHUNK as u32);
        let put = |p: Piece| async { out.send(p).await.ok().context("receiver went away") };
        put(Piece::Start {
            path: rel.clone(),
            delta: false,
            size: meta.size,
            mode: meta.mode,
            mtime: FileTime::from_secs(meta.mtime),
        })
        .await?;
        let mut h = blake3::Hasher::new();
        let mut pending = VecDeque::new();
        let mut next = 0u64;
        loop {
            while pending.len() < DEPTH && next < meta.size {
                let len = (meta.size - next).min(chunk as u64) as u32;
                pending.push_back((len, reader.read_at(next, len)?));
                next += len as u64;
            }
            let Some((len, read)) = pending.pop_front() else {
                break;
            };
            let data = read.await?;
            let short = data.len() < len as usize;
            h.update(&data);
            self.wire += data.len() as u64;
            if !data.is_empty() {
                put(Piece::Data(data.to_vec())).await?;
            }
            // The file shrank while we read it: send what there was, consistently hashed.
            if short {
                break;
            }
        }
        put(Piece::End {
            hash: *h.finalize().as_bytes(),
        })
        .await
    }

    async fn apply_one(&self, op: &Op, known: &mut HashSet<RelPath>) -> Result<()> {
        match op {
            Op::MkRoot => self.fs.mkdir(&self.root, 0o755).await,
            Op::Mkdir { path, mode } => {
                let p = self.safe_path(path, known).await?;
                match self.fs.lstat(&p).await? {
                    Some(m) if m.kind == FsKind::Dir => {}
                    _ => self.fs.mkdir(&p, mode | 0o700).await?,
                }
                known.insert(path.clone());
                // Writable by us until the final metadata pass sets the real mode.
                self.fs.set_meta(&p, mode | 0o700, None).await
            }
            Op::Symlink { path, target } => {
                let p = self.safe_path(path, known).await?;
                let tmp = temp_beside(&p, path);
                self.fs.symlink(Path::new(target), &tmp).await?;
                if let Err(e) = self.fs.rename(&tmp, &p).await {
                    let _ = self.fs.remove(&tmp).await;
                    return Err(e);
                }
                Ok(())
            }
            Op::Delete { path, recursive } => {
                if path.is_root() {
                    bail!("refusing to delete the root");
                }
                let p = self.safe_path(path, known).await?;
                known.retain(|k| !k.starts_with(path));
                match self.fs.lstat(&p).await? {
                    None => Ok(()),
                    Some(m) if m.kind != FsKind::Dir => self.fs.remove(&p).await,
                    Some(_) if *recursive => self.remove_tree(&p).await,
                    Some(_) => match self.rmdir(&p).await {
                        // It still holds excluded entries, which --delete keeps (as rsync does).
                        Err(_) if !self.fs.read_dir(&p).await?.is_empty() => {
                            tracing::info!("keeping non-empty directory {}", self.fs.show(&p));
                            Ok(())
                        }
                        r => r,
                    },
                }
            }
            Op::SetMeta { path, mode, mtime } => {
                let p = if path.is_root() {
                    self.root.clone()
                } else {
                    self.safe_path(path, known).await?
                };
                let m = self
                    .fs
                    .lstat(&p)
                    .await?
                    .ok_or_else(|| anyhow!("{}: no such file", self.fs.show(&p)))?;
                // SFTP v3 sets attributes through symlinks: a link keeps the time it was made.
                if m.kind == FsKind::Symlink {
                    return Ok(());
                }
                let times = mtime.map(|t| (m.atime, t.secs()));
                self.fs.set_meta(&p, mode.unwrap_or(m.mode), times).await
            }
        }
    }

    async fn rmdir(&self, p: &Path) -> Result<()> {
        let Fs::Remote(r) = &self.fs else {
            bail!("not remote");
        };
        r.client(0)
            .await?
            .rmdir(p)
            .await
            .with_context(|| self.fs.show(p))
    }

    /// Remove a directory tree without following symlinks in it.
    async fn remove_tree(&self, dir: &Path) -> Result<()> {
        let mut stack = vec![(dir.to_path_buf(), false)];
        while let Some((d, listed)) = stack.pop() {
            if listed {
                self.rmdir(&d).await?;
                continue;
            }
            stack.push((d.clone(), true));
            for (name, m) in self.fs.read_dir(&d).await? {
                let p = d.join(name);
                if m.kind == FsKind::Dir {
                    stack.push((p, false));
                } else {
                    self.fs.remove(&p).await?;
                }
            }
        }
        Ok(())
    }

    async fn receive_all(&mut self, mut input: mpsc::Receiver<Piece>) -> RecvReport {
        let mut report = RecvReport::default();
        let mut known = HashSet::new();
        let mut cur: Option<Incoming> = None;
        // After a failure, the rest of that file's pieces are dropped.
        let mut skipping = false;
        while let Some(piece) = input.recv().await {
            match piece {
                Piece::Start {
                    path,
                    delta,
                    size: _,
                    mode,
                    mtime,
                } => {
                    if let Some(old) = cur.take() {
                        self.abandon(old, "incomplete stream", &mut report).await;
                    }
                    skipping = false;
                    match self.begin(&path, delta, mode, mtime, &mut known).await {
                        Ok(f) => cur = Some(f),
                        Err(e) => {
                            report.failed.push((path, format!("{e:#}")));
                            skipping = true;
                        }
                    }
                }
                Piece::Data(bytes) => {
                    let Some(f) = cur.as_mut() else {
                        if !skipping {
                            report
                                .failed
                                .push((RelPath::root(), "data outside a file".into()));
                            skipping = true;
                        }
                        continue;
                    };
                    self.wire += bytes.len() as u64;
                    if let Err(e) = f.write(Bytes::from(bytes)).await {
                        if let Some(f) = cur.take() {
                            self.abandon(f, &format!("{e:#}"), &mut report).await;
                        }
                        skipping = true;
                    }
                }
                Piece::End { hash } => {
                    let Some(f) = cur.take() else { continue };
                    let rel = f.rel.clone();
                    match self.finish(f, &hash).await {
                        Ok(n) => {
                            report.files += 1;
                            report.bytes += n;
                        }
                        Err(e) => report.failed.push((rel, format!("{e:#}"))),
                    }
                }
                Piece::Skip { path, reason } => {
                    if let Some(f) = cur.take() {
                        self.discard(f).await;
                    }
                    report.failed.push((path, reason));
                }
            }
        }
        if let Some(f) = cur {
            self.abandon(f, "stream ended mid-file", &mut report).await;
        }
        report
    }

    async fn begin(
        &self,
        rel: &RelPath,
        delta: bool,
        mode: u32,
        mtime: FileTime,
        known: &mut HashSet<RelPath>,
    ) -> Result<Incoming> {
        if delta {
            bail!("a delta arrived, but over SFTP only whole files can be written");
        }
        if rel.is_root() {
            bail!("refusing to write a file over the root");
        }
        let target = self.safe_path(rel, known).await?;
        let temp = temp_beside(&target, rel);
        let writer = self.fs.open_write((&temp, &target), 0, true, false).await?;
        let chunk = self.fs.chunk().await? as usize;
        Ok(Incoming {
            rel: rel.clone(),
            target,
            temp,
            writer,
            chunk,
            offset: 0,
            pending: VecDeque::new(),
            hasher: blake3::Hasher::new(),
            mode,
            mtime,
        })
    }

    /// Wait for the writes, check the hash, set metadata and rename into place.
    async fn finish(&self, mut f: Incoming, hash: &[u8; 32]) -> Result<u64> {
        let written = f.drain().await;
        let ok = written.is_ok() && f.hasher.finalize().as_bytes() == hash;
        let times = (now_secs(), f.mtime.secs());
        let mode = f.mode & 0o7777;
        let finished = if ok {
            f.writer.finish(Some(mode), Some(times)).await
        } else {
            f.writer.finish(None, None).await
        };
        let res = match (written, ok) {
            (Err(e), _) => Err(e),
            (Ok(()), false) => Err(anyhow!("content hash mismatch")),
            (Ok(()), true) => match finished {
                Ok(()) => self.fs.rename(&f.temp, &f.target).await,
                Err(e) => Err(e),
            },
        };
        if res.is_err() {
            let _ = self.fs.remove(&f.temp).await;
        }
        res.map(|()| f.offset)
    }

    async fn abandon(&self, f: Incoming, why: &str, report: &mut RecvReport) {
        report.failed.push((f.rel.clone(), why.to_string()));
        self.discard(f).await;
    }

    async fn discard(&self, mut f: Incoming) {
        let _ = f.drain().await;
        let _ = f.writer.finish(None, None).await;
        if let Err(e) = self.fs.remove(&f.temp).await {
            tracing::warn!("left {} behind: {e:#}", self.fs.show(&f.temp));
        }
    }
}

/// A file being received: writes go out as data arrives, a few in flight.
struct Incoming {
    rel: RelPath,
    target: PathBuf,
    temp: PathBuf,
    writer: Writer,
    chunk: usize,
    offset: u64,
    pending: VecDeque<BoxFuture<'static, Result<()>>>,
    hasher: blake3::Hasher,
    mode: u32,
    mtime: FileTime,
}

impl Incoming {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        self.hasher.update(&data);
        let mut rest = data;
        while !rest.is_empty() {
            let part = rest.split_to(rest.len().min(self.chunk.max(1)));
            let n = part.len() as u64;
            self.pending
                .push_back(self.writer.write_at(self.offset, part)?);
            self.offset += n;
            while self.pending.len() > DEPTH {
                if let Some(w) = self.pending.pop_front() {
                    w.await?;
                }
            }
        }
        Ok(())
    }

    async fn drain(&mut self) -> Result<()> {
        let mut first = Ok(());
        while let Some(w) = self.pending.pop_front() {
            if let (Err(e), true) = (w.await, first.is_ok()) {
                first = Err(e);
            }
        }
        first
    }
}

/// A `.vtun-tmp.*` name beside `target` (never listed, cleaned up by the next sync).
fn temp_beside(target: &Path, rel: &RelPath) -> PathBuf {
    let dir = target.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".vtun-tmp.{}.{:016x}",
        rel.name(),
        rand::random::<u64>()
    ))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Endpoint for SftpEndpoint {
    fn list(&mut self, opts: ListOpts) -> BoxFuture<'_, Result<Listing>> {
        Box::pin(async move { self.walk(&opts).await })
    }

    fn signatures(&mut self, paths: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>> {
        // No code runs on the far side to compute them: every file goes whole.
        Box::pin(async move { Ok(vec![None; paths.len()]) })
    }

    fn send(&mut self, reqs: Vec<SendReq>, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            for req in reqs {
                if let Err(e) = self.send_one(&req, &out).await {
                    if out.is_closed() {
                        bail!("receiver went away");
                    }
                    let skip = Piece::Skip {
                        path: req.path.clone(),
                        reason: format!("{e:#}"),
                    };
                    out.send(skip).await.ok().context("receiver went away")?;
                }
            }
            Ok(())
        })
    }

    fn receive(&mut self, input: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>> {
        Box::pin(async move { Ok(self.receive_all(input).await) })
    }

    fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>> {
        Box::pin(async move {
            let mut known = HashSet::new();
            let mut out = Vec::with_capacity(ops.len());
            for op in &ops {
                let r = self.apply_one(op, &mut known).await;
                out.push(r.err().map(|e| format!("{e:#}")));
            }
            Ok(out)
        })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Option<Box<dyn Endpoint>>>> {
        let (opener, root) = (self.opener.clone(), self.root.clone());
        Box::pin(async move {
            let root = root.to_str().context("non-UTF-8 root")?.to_string();
            let ep: Box<dyn Endpoint> = Box::new(SftpEndpoint::open(opener, &root).await?);
            Ok(Some(ep))
        })
    }

    fn wire_bytes(&self) -> u64 {
        self.wire
    }
}
