//! SSH channels behind the [`Link`] seam: [`Session`] implements [`Link`] (each stream or exec
//! channel is a new channel on the same session, usable in parallel) and [`SshConnector`]
//! implements [`Connector`]. Byte streams live here, exec channels in `exec`.
//!
//! Each channel gets its own pump task that moves the channel's messages into streams: stdout to
//! the reader, stderr to our stderr, the server's refusal of the request as a read error. Requests are sent with
//! want-reply but not awaited, so opening a stream costs one round trip (the channel open), not
//! two. Pumps never block a runtime worker: every write they make is async, so a stalled reader
//! holds up only its own channel (and, through russh's queues, at worst its own session).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::Result;
use bytes::Bytes;
use futures::future::BoxFuture;
use russh::client::Msg;
use russh::{Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, OnceCell};

use super::{Session, SshError};
use crate::link::{
    Connector, ExecChannel, ExecRequest, Link, RemoteIo, RemoteListen, RemoteListener, Start,
};
use crate::settings::Settings;
use crate::target::Host;

/// Chunks buffered between a channel's pump and each of its readers.
const READ_QUEUE: usize = 64;

/// A channel's stdin/stdout as one stream; dropping it closes the channel.
pub struct ChannelIo {
    incoming: Incoming,
    outgoing: Outgoing,
}

/// The read side of a channel stream: chunks from the pump. An empty chunk or the pump hanging
/// up is EOF.
struct Incoming {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    pending: Bytes,
    eof: bool,
}

/// The write side: the channel's data, guarded so a dead channel fails instead of hanging.
pub(super) struct Outgoing {
    pub(super) writer: Pin<Box<dyn AsyncWrite + Send>>,
    pub(super) closed: Arc<Closed>,
}

/// Set by the pump when the channel or the whole session is gone. russh's writer would wait
/// forever for window space that can no longer arrive, so writes check this first and a
/// pending write is woken when it flips.
pub(super) struct Closed {
    flag: std::sync::atomic::AtomicBool,
    waker: futures::task::AtomicWaker,
    /// The host, so the error names it.
    host: String,
}

impl Closed {
    pub(super) fn new(host: &str) -> Closed {
        Closed {
            flag: Default::default(),
            waker: Default::default(),
            host: host.to_string(),
        }
    }

    fn lost(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!("connection to {} lost", self.host),
        )
    }

    pub(super) fn set(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
    }

    fn is_set(&self) -> bool {
        self.flag.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl ChannelIo {
    /// Wrap `channel` on which `what` (e.g. "subsystem sftp") was just requested.
    pub fn new(channel: Channel<Msg>, what: String, host: &str) -> ChannelIo {
        let writer = Box::pin(channel.make_writer());
        let (rd, wr) = channel.split();
        let (tx, rx) = mpsc::channel(READ_QUEUE);
        let closed = Arc::new(Closed::new(host));
        tokio::spawn(pump(rd, wr, tx, what, closed.clone()));
        ChannelIo {
            incoming: Incoming::new(rx),
            outgoing: Outgoing { writer, closed },
        }
    }
}

/// Moves one channel's messages into its stream until the server closes the channel or the
/// stream is dropped (then it closes the channel). An empty chunk tells the reader "EOF".
async fn pump(
    mut rd: ChannelReadHalf,
    wr: ChannelWriteHalf<Msg>,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    what: String,
    closed: Arc<Closed>,
) {
    let mut ended = false;
    let mut stderr = tokio::io::stderr();
    loop {
        let msg = tokio::select! {
            m = rd.wait() => m,
            _ = tx.closed() => break,
        };
        match msg {
            Some(ChannelMsg::Data { data }) if !ended && !data.is_empty() => {
                if tx.send(Ok(data)).await.is_err() {
                    break;
                }
            }
            // Async: a stalled reader of our stderr holds up this channel, never a worker.
            Some(ChannelMsg::ExtendedData { data, .. }) => {
                let _ = stderr.write_all(&data).await;
            }
            Some(ChannelMsg::Failure) if !ended => {
                ended = true;
                let e = std::io::Error::other(format!("the server refused {what}"));
                let _ = tx.send(Err(e)).await;
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => {
                tracing::debug!(%what, exit_status, "remote exited");
            }
            // Remote stdout is done; keep the channel for our writes until the server closes.
            Some(ChannelMsg::Eof) if !ended => {
                ended = true;
                let _ = tx.send(Ok(Bytes::new())).await;
            }
            Some(ChannelMsg::Close) => break,
            // The session ended without closing this channel: the connection is gone. The
            // reader must see an error, not a clean EOF that would pass for a finished reply.
            None => {
                if !ended {
                    ended = true;
                    let _ = tx.try_send(Err(closed.lost()));
                }
                break;
            }
            Some(_) => {}
        }
    }
    let _ = stderr.flush().await;
    closed.set();
    if !ended {
        let _ = tx.try_send(Ok(Bytes::new()));
    }
    drop(tx);
    let _ = wr.close().await;
}

impl Incoming {
    fn new(rx: mpsc::Receiver<std::io::Result<Bytes>>) -> Incoming {
        Incoming {
            rx,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

impl AsyncRead for Incoming {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.pending.is_empty() {
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(b))) if b.is_empty() => self.eof = true,
                Poll::Ready(Some(Ok(b))) => self.pending = b,
                Poll::Ready(Some(Err(e))) => {
                    self.eof = true;
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(None) => self.eof = true,
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Outgoing {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let closed = self.closed.clone();
        guard(&closed, cx, |cx| self.writer.as_mut().poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let closed = self.closed.clone();
        guard(&closed, cx, |cx| self.writer.as_mut().poll_flush(cx))
    }

    /// Sends EOF: the remote program sees the end of its stdin.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let closed = self.closed.clone();
        guard(&closed, cx, |cx| self.writer.as_mut().poll_shutdown(cx))
    }
}

impl AsyncRead for ChannelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.incoming).poll_read(cx, buf)
    }
}

impl AsyncWrite for ChannelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.outgoing).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.outgoing).poll_shutdown(cx)
    }
}

/// Fail a write on a closed channel instead of waiting for window space forever. russh's writer
/// fails only when the channel or the session is gone, with a bare "channel closed" (a
/// BrokenPipe, which must not pass for our stdout closing): that is reported as the lost
/// connection it is.
fn guard<T>(
    closed: &Closed,
    cx: &mut Context<'_>,
    op: impl FnOnce(&mut Context<'_>) -> Poll<std::io::Result<T>>,
) -> Poll<std::io::Result<T>> {
    if closed.is_set() {
        return Poll::Ready(Err(closed.lost()));
    }
    closed.waker.register(cx.waker());
    match op(cx) {
        Poll::Pending if closed.is_set() => Poll::Ready(Err(closed.lost())),
        Poll::Ready(Err(e)) => {
            tracing::debug!("channel write failed: {e}");
            Poll::Ready(Err(closed.lost()))
        }
        other => other,
    }
}

impl Link for Session {
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        Box::pin(async move {
            let ch = self.open_channel().await?;
            ch.request_subsystem(true, "sftp").await.map_err(lost)?;
            let io: Box<dyn RemoteIo> =
                Box::new(ChannelIo::new(ch, "the sftp subsystem".into(), self.name()));
            Ok(io)
        })
    }

    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let command = command.to_string();
        Box::pin(async move {
            let ch = self.open_channel().await?;
            ch.exec(true, command.as_bytes()).await.map_err(lost)?;
            let what = format!("to run {command:?}");
            let io: Box<dyn RemoteIo> = Box::new(ChannelIo::new(ch, what, self.name()));
            Ok(io)
        })
    }

    fn open_exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<ExecChannel>> {
        Box::pin(async move {
            let ch = self.open_channel().await?;
            // Only the start asks for a reply: a refused env or pty is not fatal under ssh
            // either, and the start's reply is the one the pump turns into a failed status.
            for (k, v) in &req.env {
                ch.set_env(false, k, v).await.map_err(lost)?;
            }
            if let Some(p) = &req.pty {
                let modes: Vec<(russh::Pty, u32)> = p
                    .modes
                    .iter()
                    .filter_map(|&(op, v)| russh::Pty::from_u8(op).map(|m| (m, v)))
                    .collect();
                ch.request_pty(false, &p.term, p.cols, p.rows, 0, 0, &modes)
                    .await
                    .map_err(lost)?;
            }
            match &req.start {
                Start::Command(line) => ch.exec(true, line.as_bytes()).await,
                Start::Shell => ch.request_shell(true).await,
            }
            .map_err(lost)?;
            Ok(super::exec::channel(ch, self.name(), self.round_trip()))
        })
    }

    fn direct_tcpip(&self, host: &str, port: u16) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let host = host.to_string();
        Box::pin(async move {
            let ch = self.open_direct_tcpip(&host, port).await?;
            let what = format!("a tcp stream to {host}:{port}");
            let io: Box<dyn RemoteIo> = Box::new(ChannelIo::new(ch, what, self.name()));
            Ok(io)
        })
    }

    fn direct_streamlocal(&self, path: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let path = path.to_string();
        Box::pin(async move {
            let ch = self.open_direct_streamlocal(&path).await?;
            let what = format!("a stream to {path}");
            let io: Box<dyn RemoteIo> = Box::new(ChannelIo::new(ch, what, self.name()));
            Ok(io)
        })
    }

    fn remote_forward(&self, listen: RemoteListen) -> BoxFuture<'_, Result<RemoteListener>> {
        Box::pin(Session::remote_forward(self, listen))
    }

    fn is_closed(&self) -> bool {
        Session::is_closed(self)
    }

    fn name(&self) -> &str {
        Session::name(self)
    }
}

fn lost(e: russh::Error) -> anyhow::Error {
    SshError::ConnectionLost(e.to_string()).into()
}

/// Connects over SSH through the edge. As the [`Connector`] contract asks, one session per
/// host (user, name, port) is shared by every caller; a closed one is replaced on the next call.
/// Callers that want more TCP connections to one host call [`Session::connect`] themselves.
pub struct SshConnector {
    pub settings: Settings,
    sessions: Mutex<HashMap<SessionKey, Arc<OnceCell<Arc<Session>>>>>,
}

type SessionKey = (String, String, u16);

impl SshConnector {
    pub fn new(settings: Settings) -> SshConnector {
        SshConnector {
            settings,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The shared session to `host`, connecting (once, even when asked concurrently) if needed.
    pub async fn session(&self, host: &Host) -> Result<Arc<Session>> {
        let key = (
            self.settings.user_for(host),
            host.name.clone(),
            self.settings.port_for(host),
        );
        let cell = {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let cell = map.entry(key.clone()).or_default();
            if cell.get().is_some_and(|s| s.is_closed()) {
                *cell = Arc::default();
            }
            cell.clone()
        };
        let session = cell
            .get_or_try_init(|| async {
                Session::connect(&self.settings, host).await.map(Arc::new)
            })
            .await?;
        Ok(session.clone())
    }
}

impl Connector for SshConnector {
    fn connect<'a>(&'a self, host: &'a Host) -> BoxFuture<'a, Result<Arc<dyn Link>>> {
        Box::pin(async move {
            let s: Arc<dyn Link> = self.session(host).await?;
            Ok(s)
        })
    }
}
