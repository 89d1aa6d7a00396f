//! The endpoint for a directory on this machine. The agent serves exactly this over its protocol,
//! so local and remote sides behave the same. Reading and sending live here; everything that
//! writes (and must not be tricked into writing elsewhere) is in `write`.

use crate::fs::{io_text, FileTime, Root};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq, CHUNK, VANISHED};
use super::listing::{self, ListOpts, Listing, RelPath};
use super::write;
use crate::delta;
use crate::fs::read_chunk_at;

/// A sync root on the local file system.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    root: PathBuf,
}

impl LocalEndpoint {
    pub fn new(root: impl Into<PathBuf>) -> LocalEndpoint {
        LocalEndpoint { root: root.into() }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("worker thread failed")?
}

impl Endpoint for LocalEndpoint {
    fn list(&mut self, opts: ListOpts) -> BoxFuture<'_, Result<Listing>> {
        let root = self.root.clone();
        Box::pin(blocking(move || listing::walk(&root, &opts)))
    }

    fn signatures(&mut self, paths: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            let Ok(root) = Root::open(&root) else {
                return Ok(vec![None; paths.len()]);
            };
            Ok(paths
                .iter()
                .map(|p| {
                    open_regular(&root, p)
                        .and_then(|f| delta::signature(&f))
                        .ok()
                })
                .collect())
        }))
    }

    fn send(&mut self, reqs: Vec<SendReq>, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>> {
        let root = self.root.clone();
        Box::pin(blocking(move || {
            let root = Root::open(&root)
                .map_err(|e| anyhow!("cannot open {}: {}", root.display(), io_text(&e)));
            for req in reqs {
                let sent = match &root {
                    Ok(root) => send_one(root, &req, &out),
                    Err(e) => Err(anyhow!("{e}")),
                };
                if let Err(e) = sent {
                    if out.is_closed() {
                        bail!("receiver went away");
                    }
                    let skip = Piece::Skip {
                        path: req.path.clone(),
                        reason: format!("{e:#}"),
                    };
                    out.blocking_send(skip).ok().context("receiver went away")?;
                }
            }
            Ok(())
        }))
    }

    fn receive(&mut self, input: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>> {
        let root = self.root.clone();
        Box::pin(blocking(move || Ok(write::receive_all(&root, input))))
    }

    fn fork(&self) -> BoxFuture<'_, Result<Option<Box<dyn Endpoint>>>> {
        let me: Box<dyn Endpoint> = Box::new(self.clone());
        Box::pin(async move { Ok(Some(me)) })
    }

    fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>> {
        let root = self.root.clone();
        Box::pin(blocking(move || Ok(write::apply_all(&root, &ops))))
    }
}

/// Open a regular file beneath `root`, never through a symlink.
fn open_regular(root: &Root, rel: &RelPath) -> Result<std::fs::File> {
    let (dir, name) = rel.open_parent(root)?;
    let shown = dir.show(name);
    let f = dir
        .open_file(name)
        .with_context(|| format!("cannot open {}", shown.display()))?;
    if !f.metadata()?.is_file() {
        bail!("{} is not a regular file", shown.display());
    }
    Ok(f)
}

fn send_one(root: &Root, req: &SendReq, out: &mpsc::Sender<Piece>) -> Result<()> {
    let f = match open_regular(root, &req.path) {
        Err(e) if vanished(&e) => bail!(VANISHED),
        r => r?,
    };
    let path = req.path.under(root.path());
    let m = f.metadata()?;
    let token = delta::Token::of(&f)?;
    let put = |p: Piece| out.blocking_send(p).ok().context("receiver went away");
    let sent = send_content(&f, &m, req, &path, &put);
    // Whatever the read ran into, a file that moved under it is reported as just that; the
    // receiver drops what it has of it.
    if delta::Token::of(&f).map_or(true, |t| t != token) {
        bail!(delta::CHANGED);
    }
    put(Piece::End { hash: sent? })
}

fn vanished(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

/// Start and data pieces of one file, read with `pread` (never mapped: a mapped file that
/// another process truncates kills the reader with SIGBUS); returns the content's BLAKE3.
fn send_content(
    f: &std::fs::File,
    m: &std::fs::Metadata,
    req: &SendReq,
    path: &Path,
    put: &dyn Fn(Piece) -> Result<()>,
) -> Result<[u8; 32]> {
    let start = |delta: bool| Piece::Start {
        path: req.path.clone(),
        delta,
        size: m.len(),
        mode: m.permissions().mode() & 0o7777,
        mtime: FileTime::mtime_of(m),
    };
    if let Some(sig) = &req.signature {
        // Always a delta: one that is all literals costs about what the file does.
        let sig = delta::Signature::parse(sig).context("bad signature from the receiver")?;
        put(start(true))?;
        return delta::diff_file(&sig, f, m.len(), &mut |chunk| put(Piece::Data(chunk)))
            .with_context(|| format!("cannot read {}", path.display()));
    }
    put(start(false))?;
    let mut h = blake3::Hasher::new();
    let mut at = 0u64;
    // No further than the size announced: growth shows as a change, not as extra bytes.
    while at < m.len() {
        let want = (m.len() - at).min(CHUNK as u64) as usize;
        let buf = read_chunk_at(f, at, want)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if buf.len() < want {
            bail!(delta::CHANGED);
        }
        at += buf.len() as u64;
        h.update(&buf);
        put(Piece::Data(buf))?;
    }
    Ok(*h.finalize().as_bytes())
}
