//! The client of `vtun agent`: a sync [`Endpoint`] whose every call is a request frame to the
//! agent on the far side (started by `install`), with long requests split over several frames
//! and each reply bounded by the protocol's limits.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::install::{self, FromAgent, ToAgent};
use super::protocol::{
    expect_msg, hello, write_msg, Msg, MAX_ENTRIES, MAX_SIG, REQUEST_ITEMS, REQUEST_PART,
};
use crate::link::{Link, RemoteIo};
use crate::sync::endpoint::{Endpoint, Op, Piece, RecvReport, SendReq};
use crate::sync::listing::{ListOpts, Listing, RelPath};

/// A sync root served by a remote agent.
pub struct AgentEndpoint {
    r: FromAgent,
    w: ToAgent,
    wire: u64,
    /// How to open another connection to the same root (for parallel transfers).
    again: Option<(Arc<dyn Link>, String)>,
}

impl AgentEndpoint {
    /// Start (or upload and start) the agent on `link`'s host and open `root` there.
    pub async fn start(link: &Arc<dyn Link>, root: &str) -> Result<AgentEndpoint> {
        let (r, w) = install::launch(link.as_ref()).await?;
        AgentEndpoint::open(r, w, root, Some((link.clone(), root.to_string()))).await
    }

    /// An endpoint over an already started agent stream (tests, or a stream set up elsewhere).
    pub async fn over(io: Box<dyn RemoteIo>, root: &str) -> Result<AgentEndpoint> {
        let (r, w) = install::attach(io).await?;
        AgentEndpoint::open(r, w, root, None).await
    }

    async fn open(
        r: FromAgent,
        w: ToAgent,
        root: &str,
        again: Option<(Arc<dyn Link>, String)>,
    ) -> Result<AgentEndpoint> {
        let mut ep = AgentEndpoint {
            r,
            w,
            wire: 0,
            again,
        };
        ep.w.write_all(&hello()).await?;
        ep.put(&Msg::Root(root.to_string())).await?;
        Ok(ep)
    }

    async fn put(&mut self, m: &Msg) -> Result<u64> {
        let n = write_msg(&mut self.w, m).await?;
        self.wire += n;
        Ok(n)
    }

    /// Send one request, read its one reply.
    async fn call(&mut self, m: &Msg) -> Result<Msg> {
        self.put(m).await?;
        self.w
            .flush()
            .await
            .context("connection to the agent failed")?;
        self.reply().await
    }

    async fn reply(&mut self) -> Result<Msg> {
        let (m, n) = expect_msg(&mut self.r).await?;
        self.wire += n;
        match m {
            Msg::Error(e) => bail!("agent: {e}"),
            m => Ok(m),
        }
    }
}

/// Split `items` into runs of at most [`REQUEST_ITEMS`] items and about [`REQUEST_PART`]
/// bytes (by `size`), each one request frame.
fn parts<T>(items: Vec<T>, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0;
    for it in items {
        if !cur.is_empty() && (cur.len() >= REQUEST_ITEMS || bytes >= REQUEST_PART) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += size(&it);
        cur.push(it);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn op_size(op: &Op) -> usize {
    match op {
        Op::MkRoot => 1,
        Op::Mkdir { path, .. } | Op::Delete { path, .. } | Op::SetMeta { path, .. } => {
            path.as_str().len() + 32
        }
        Op::Symlink { path, target } => path.as_str().len() + target.len() + 32,
    }
}

fn unexpected<T>(m: Msg) -> Result<T> {
    bail!("unexpected reply from agent: {}", short(&m))
}

fn short(m: &Msg) -> String {
    let s = format!("{m:?}");
    s.chars().take(80).collect()
}

impl Endpoint for AgentEndpoint {
    fn list(&mut self, opts: ListOpts) -> BoxFuture<'_, Result<Listing>> {
        Box::pin(async move {
            self.put(&Msg::List(opts)).await?;
            self.w
                .flush()
                .await
                .context("connection to the agent failed")?;
            let mut entries = Vec::new();
            loop {
                match self.reply().await? {
                    Msg::ListingPart(part) => {
                        if entries.len() + part.len() > MAX_ENTRIES {
                            bail!("the agent's listing has more than {MAX_ENTRIES} entries");
                        }
                        entries.extend(part);
                    }
                    Msg::ListingEnd { root_exists } => {
                        return Ok(Listing {
                            root_exists,
                            entries,
                            mtime_seconds: false,
                        })
                    }
                    m => return unexpected(m),
                }
            }
        })
    }

    fn signatures(&mut self, paths: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>> {
        Box::pin(async move {
            let n = paths.len();
            match self.call(&Msg::Signatures(paths)).await? {
                Msg::Sigs(s) if s.len() == n => Ok(s),
                m => unexpected(m),
            }
        })
    }

    fn send(&mut self, reqs: Vec<SendReq>, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            // A signature too big for a frame only costs sending that file whole.
            let reqs = reqs
                .into_iter()
                .map(|mut r| {
                    if r.signature.as_ref().is_some_and(|s| s.len() > MAX_SIG) {
                        r.signature = None;
                    }
                    r
                })
                .collect();
            let frames = parts(reqs, |r: &SendReq| {
                r.path.as_str().len() + r.signature.as_ref().map_or(0, Vec::len) + 16
            });
            let n = frames.len();
            // Written while the replies are read: the agent answers each frame with a stream
            // of pieces, and neither side may wait for the other to stop.
            let (r, w) = (&mut self.r, &mut self.w);
            let write = async move {
                let mut wire = 0;
                for f in frames {
                    wire += write_msg(w, &Msg::Send(f)).await?;
                    w.flush().await.context("connection to the agent failed")?;
                }
                anyhow::Ok(wire)
            };
            let read = async move {
                let mut wire = 0;
                let mut done = 0;
                while done < n {
                    let (m, k) = expect_msg(r).await?;
                    wire += k;
                    match m {
                        Msg::Piece(p) => out.send(p).await.ok().context("receiver went away")?,
                        Msg::SendDone => done += 1,
                        Msg::Error(e) => bail!("agent: {e}"),
                        m => return unexpected(m),
                    }
                }
                anyhow::Ok(wire)
            };
            let (written, read) = tokio::join!(write, read);
            let (written, read) = (written?, read?);
            self.wire += written + read;
            Ok(())
        })
    }

    fn receive(&mut self, mut input: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>> {
        Box::pin(async move {
            self.put(&Msg::RecvBegin).await?;
            while let Some(p) = input.recv().await {
                self.put(&Msg::Piece(p)).await?;
            }
            match self.call(&Msg::RecvEnd).await? {
                Msg::RecvDone(r) => Ok(r),
                m => unexpected(m),
            }
        })
    }

    fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>> {
        Box::pin(async move {
            let frames = parts(ops, op_size);
            let sizes: Vec<usize> = frames.iter().map(Vec::len).collect();
            let (r, w) = (&mut self.r, &mut self.w);
            // Pipelined: all frames go out while the replies come back.
            let write = async move {
                let mut wire = 0;
                for f in frames {
                    wire += write_msg(w, &Msg::Apply(f)).await?;
                }
                w.flush().await.context("connection to the agent failed")?;
                anyhow::Ok(wire)
            };
            let read = async move {
                let mut wire = 0;
                let mut results = Vec::new();
                for n in sizes {
                    let (m, k) = expect_msg(r).await?;
                    wire += k;
                    match m {
                        Msg::Applied(part) if part.len() == n => results.extend(part),
                        Msg::Error(e) => bail!("agent: {e}"),
                        m => return unexpected(m),
                    }
                }
                anyhow::Ok((wire, results))
            };
            let (written, read) = tokio::join!(write, read);
            let (written, (read, results)) = (written?, read?);
            self.wire += written + read;
            Ok(results)
        })
    }

    fn fork(&self) -> BoxFuture<'_, Result<Option<Box<dyn Endpoint>>>> {
        // Clone first: the future must not hold `&self`, whose stream is not `Sync`.
        let again = self.again.clone();
        Box::pin(async move {
            let Some((opener, root)) = again else {
                return Ok(None);
            };
            let ep: Box<dyn Endpoint> = Box::new(AgentEndpoint::start(&opener, &root).await?);
            Ok(Some(ep))
        })
    }

    fn wire_bytes(&self) -> u64 {
        self.wire
    }
}
