//! The remote side of a sync without an agent (`--no-agent`, or a host that cannot run one):
//! the same [`Endpoint`] over plain SFTP, built on the shared pipelined client in `crate::sftp`.
//!
//! Without code on the far side there are no signatures and no remote hashes, so every changed
//! file is sent whole and `-c` is refused. SFTP v3 carries mtimes in whole seconds: listings say
//! so ([`Listing::mtime_seconds`]) and the plan compares seconds. Writes follow the agent's rules:
//! each parent under the root is `lstat`ed to be a real directory before anything is created,
//! content lands in a `.vtun-tmp.*` file beside its target and is renamed over it (posix-rename)
//! only after its hash checks out, and metadata is never set through a symlink. Listings use
//! cp's walk ([`crate::sftp::walk`]: many directories at once, every cap on what the server may
//! send), so a tree costs round trips by its depth, not by its number of directories.

use crate::fs::FileTime;
use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq, CHUNK};
use super::listing::{Entry, EntryKind, ListOpts, Listing, RelPath};
use super::pattern::Excludes;
use crate::fs::{temp, Kind, Meta};
use crate::link::Link;
use crate::transfer::fs::{Fs, Reader, Writer};
use crate::transfer::RemoteFs;

/// Reads or writes in flight per file: hides the round trip on a long link.
const DEPTH: usize = 16;
/// READLINKs or removals in flight at once.
const IN_FLIGHT: usize = 64;

/// A sync root on a remote host, reached over SFTP only.
pub struct SftpEndpoint {
    opener: Arc<dyn Link>,
    fs: Fs,
    root: PathBuf,
    wire: u64,
}

impl SftpEndpoint {
    /// Open an SFTP stream to `opener`'s host for `root` (relative paths are from the home
    /// directory, where the SFTP server starts).
    pub async fn open(opener: Arc<dyn Link>, root: &str) -> Result<SftpEndpoint> {
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
                Some(m) if m.kind == Kind::Dir => {
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
            Some(m) => m.kind == Kind::Dir || opts.start.is_root(),
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
        if opts.start.is_root() && meta.kind == Kind::Symlink {
            meta = self
                .fs
                .stat(&top)
                .await?
                .with_context(|| format!("{}: dangling symlink", self.fs.show(&top)))?;
        }
        let top_target = match meta.kind {
            Kind::Symlink => Some(self.fs.read_link(&top).await?),
            _ => None,
        };
        let top_entry = self.entry(&opts.start, &meta, top_target)?;
        let is_dir = top_entry.as_ref().is_some_and(Entry::is_dir);
        listing.entries.extend(top_entry);
        if !is_dir {
            return Ok(listing);
        }
        // The whole subtree in one pipelined walk (many directories listed at once), sorted
        // into the same pre-order as a local walk.
        let Fs::Remote(remote) = &self.fs else {
            bail!("not remote");
        };
        let (mut temps, mut bad) = (Vec::new(), None);
        let found = remote
            .walk(&top, |rel, m| {
                let Some(rel_str) = rel.to_str() else {
                    tracing::warn!("skipping non-UTF-8 name {rel:?} in {}", self.fs.show(&top));
                    return false;
                };
                let name = rel_str.rsplit('/').next().unwrap_or(rel_str);
                if temp::is_temp(name.as_bytes()) {
                    // SFTP cannot tell whether a writer still holds it: only old ones go.
                    let stale = temp::unlocked_is_stale(m.mtime);
                    if opts.clean_temps && m.kind != Kind::Dir && stale {
                        temps.push(top.join(rel));
                    }
                    return false;
                }
                match beneath(&opts.start, rel_str) {
                    Ok(child) => !excludes.is_excluded(child.as_str(), m.kind == Kind::Dir),
                    Err(e) => {
                        bad.get_or_insert(e);
                        false
                    }
                }
            })
            .await?;
        if let Some(e) = bad {
            return Err(e);
        }
        self.remove_temps(temps).await;
        // Symlink targets: one READLINK each, many in flight together.
        let mut reads = Vec::new();
        for (rel, m) in &found {
            let (fs, p, link) = (&self.fs, top.join(rel), m.kind == Kind::Symlink);
            reads.push(async move {
                match link {
                    true => Some(fs.read_link(&p).await),
                    false => None,
                }
            });
        }
        let targets: Vec<Option<Result<PathBuf>>> = futures::stream::iter(reads)
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        for ((rel, m), target) in found.iter().zip(targets) {
            let rel = rel.to_str().context("non-UTF-8 path in the walk")?;
            let rel = beneath(&opts.start, rel)?;
            if let Some(e) = self.entry(&rel, m, target.transpose()?)? {
                listing.entries.push(e);
            }
        }
        Ok(listing)
    }

    /// Remove temporary files an interrupted sync left (a failure is only a warning).
    async fn remove_temps(&self, temps: Vec<PathBuf>) {
        let mut removals = Vec::new();
        for p in temps {
            let fs = &self.fs;
            removals.push(async move {
                if let Err(e) = fs.remove(&p).await {
                    tracing::warn!("cannot remove stale {}: {e:#}", fs.show(&p));
                }
            });
        }
        let _: Vec<()> = futures::stream::iter(removals)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
    }

    /// The listing entry for `rel`; `target` is a symlink's target, read by the caller.
    fn entry(&self, rel: &RelPath, m: &Meta, target: Option<PathBuf>) -> Result<Option<Entry>> {
        let kind = match m.kind {
            Kind::Dir => EntryKind::Dir,
            Kind::File => EntryKind::File { size: m.size },
            Kind::Symlink => {
                let p = self.at(rel);
                let t =
                    target.with_context(|| format!("{}: symlink not read", self.fs.show(&p)))?;
                let Some(target) = t.to_str() else {
                    tracing::warn!(
                        "skipping symlink {} with a non-UTF-8 target",
                        self.fs.show(&p)
                    );
                    return Ok(None);
                };
                EntryKind::Symlink {
                    target: target.to_string(),
                }
            }
            Kind::Other => {
                tracing::warn!("skipping special file {}", self.fs.show(&self.at(rel)));
                return Ok(None);
            }
        };
        Ok(Some(Entry {
            path: rel.clone(),
            kind,
            mode: m.mode,
            mtime: m.mtime,
            hash: None,
        }))
    }

    /// Stream one whole file into `out`; an error before `Start` is reported by the caller.
    /// Stream one whole file into `out`. An error before its `Start` is the caller's to report
    /// as a skip; `started` says whether one was sent (a file's pieces cannot be taken back).
    async fn send_one(
        &mut self,
        req: &SendReq,
        out: &mpsc::Sender<Piece>,
        started: &mut bool,
    ) -> Result<()> {
        let path = self.at(&req.path);
        let meta = self
            .fs
            .lstat(&path)
            .await?
            .ok_or_else(|| anyhow!("no such file"))?;
        if meta.kind != Kind::File {
            bail!("not a regular file");
        }
        let reader = self.fs.open_read(&path, 0).await?;
        let res = self.stream(&reader, &req.path, &meta, out, started).await;
        let closed = reader.close().await;
        res.and(closed).with_context(|| self.fs.show(&path))
    }

    async fn stream(
        &mut self,
        reader: &Reader,
        rel: &RelPath,
        meta: &Meta,
        out: &mpsc::Sender<Piece>,
        started: &mut bool,
    ) -> Result<()> {
        let chunk = self.fs.chunk().await?.min(CHUNK as u32);
        let put = |p: Piece| async { out.send(p).await.ok().context("receiver went away") };
        let mut h = blake3::Hasher::new();
        let mut pending = VecDeque::new();
        let mut next = 0u64;
        loop {
            while pending.len() < DEPTH && next < meta.size {
                let len = (meta.size - next).min(chunk as u64) as u32;
                pending.push_back((len, reader.read_at(next, len)?));
                next += len as u64;
            }
            let read = pending.pop_front();
            // The first read before `Start`: a file that cannot be read at all is skipped.
            let got = match read {
                Some((len, read)) => Some((len, read.await?)),
                None => None,
            };
            if !*started {
                put(Piece::Start {
                    path: rel.clone(),
                    delta: false,
                    size: meta.size,
                    mode: meta.mode,
                    mtime: meta.mtime,
                })
                .await?;
                *started = true;
            }
            let Some((len, data)) = got else {
                break;
            };
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
                    Some(m) if m.kind == Kind::Dir => {}
                    _ => {
                        if let Err(e) = self.fs.mkdir(&p, mode | 0o700).await {
                            // Made meanwhile by another sync into the same directory.
                            match self.fs.lstat(&p).await? {
                                Some(m) if m.kind == Kind::Dir => {}
                                _ => return Err(e),
                            }
                        }
                    }
                }
                known.insert(path.clone());
                // Writable by us until the final metadata pass sets the real mode.
                self.fs.set_meta(&p, mode | 0o700, None).await
            }
            Op::Symlink { path, target } => {
                let p = self.safe_path(path, known).await?;
                let tmp = temp::beside(&p, temp::Hold::Age);
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
                    Some(m) if m.kind != Kind::Dir => self.fs.remove(&p).await,
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
                if m.kind == Kind::Symlink {
                    return Ok(());
                }
                let times = mtime.map(|t| (m.atime, t));
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

    /// Remove a directory tree without following symlinks in it: one bounded walk, the
    /// non-directories removed many at a time, then the directories deepest first.
    async fn remove_tree(&self, dir: &Path) -> Result<()> {
        let Fs::Remote(remote) = &self.fs else {
            bail!("not remote");
        };
        let entries = remote.walk(dir, |_, _| true).await?;
        let mut removals = Vec::new();
        for (rel, m) in &entries {
            if m.kind != Kind::Dir {
                let (fs, p) = (&self.fs, dir.join(rel));
                removals.push(async move { fs.remove(&p).await });
            }
        }
        let removed: Vec<Result<()>> = futures::stream::iter(removals)
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        removed.into_iter().collect::<Result<Vec<()>>>()?;
        // Pre-order reversed: every directory after everything inside it.
        for (rel, m) in entries.iter().rev() {
            if m.kind == Kind::Dir {
                self.rmdir(&dir.join(rel)).await?;
            }
        }
        self.rmdir(dir).await
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
        let temp = temp::beside(&target, temp::Hold::Age);
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
        let times = (FileTime::from_secs(now_secs()), f.mtime);
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

/// `start/rel` as a path from the sync root (`rel` is relative to `start`).
fn beneath(start: &RelPath, rel: &str) -> Result<RelPath> {
    if start.is_root() {
        RelPath::parse(rel)
    } else {
        RelPath::parse(&format!("{}/{rel}", start.as_str()))
    }
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
                let mut started = false;
                if let Err(e) = self.send_one(&req, &out, &mut started).await {
                    if out.is_closed() {
                        bail!("receiver went away");
                    }
                    // Half a file is on its way: the stream cannot skip it any more, so the
                    // send stops here (the receiver drops the partial file).
                    if started {
                        return Err(e);
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
