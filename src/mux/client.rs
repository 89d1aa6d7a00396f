//! The client half: [`MasterLink`] is a [`Link`] whose every channel is a new connection to
//! the master's socket, turned back into the same streams, statuses and controls a direct SSH
//! session hands out.
//!
//! The non-obvious part is the end of a channel. The master's half-close or our dropping a
//! stream must not pass for "done": a channel is released (a `Close` frame) only once every
//! part the caller holds — stdin, stdout, stderr, status, control — is dropped, and a
//! connection that ends before its `StdoutEof` or status frame is reported as a lost
//! connection on whatever is still being read.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::proto::{
    read_frame, write_frame, write_queued, ControlFrame, EndStatus, ExecSpec, Fail, Frame, Info,
    Kind, PtySpec, Reply, Request, IO_BUFFER, MAX_DATA,
};
use super::socket;
use crate::error::Failure;
use crate::link::{
    Control, ControlMsg, ExecChannel, ExecRequest, ExitStatus, Link, RemoteIo, Start,
};

/// Frames queued from a channel's stdin and control towards the master.
const IN_QUEUE: usize = 16;
/// Chunks queued per output stream between the socket and its reader.
const OUT_QUEUE: usize = 16;

/// A VM reached through its master.
pub struct MasterLink {
    pub path: PathBuf,
    pub name: String,
    /// How long to wait for the master to answer a channel request (it may be connecting).
    pub open_timeout: Duration,
}

impl MasterLink {
    async fn open(&self, req: Request) -> Result<UnixStream> {
        let opening = async {
            let mut stream = connect(&self.path).await?;
            write_frame(&mut stream, &Frame::doc(Kind::Request, &req)?)
                .await
                .context("cannot send to the master")?;
            let reply = read_frame(&mut stream)
                .await?
                .filter(|f| f.kind == Kind::Reply)
                .context("the master closed the connection")?;
            match reply.parse::<Reply>()? {
                Reply::Opened => Ok(stream),
                Reply::Failed(f) => Err(error_of(f)),
                Reply::Info(_) => bail!("the master answered with the wrong message"),
            }
        };
        match tokio::time::timeout(self.open_timeout, opening).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) if e.downcast_ref::<Failure>().is_some() => Err(e),
            Ok(Err(e)) => Err(Failure::connection(format!(
                "{}: the connection master failed: {e:#}",
                self.name
            ))),
            Err(_) => Err(Failure::connection(format!(
                "{}: the connection master did not open a channel within {}s",
                self.name,
                self.open_timeout.as_secs()
            ))),
        }
    }

    async fn stream(&self, req: Request, stderr: bool) -> Result<Box<dyn RemoteIo>> {
        let parts = Parts::new(self.open(req).await?, &self.name);
        if stderr {
            let mut err = parts.stderr;
            // Detached: the stderr copy must not keep the channel alive once the stream is
            // dropped.
            err.alive = None;
            tokio::spawn(async move {
                let mut out = tokio::io::stderr();
                let _ = tokio::io::copy(&mut err, &mut out).await;
            });
        }
        let io: Box<dyn RemoteIo> = Box::new(tokio::io::join(parts.stdout, parts.stdin));
        Ok(io)
    }
}

/// Connect to a socket and make sure the other end is our own user's process.
pub async fn connect(path: &std::path::Path) -> Result<UnixStream> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))?;
    let uid = socket::peer_uid(&stream)?;
    if uid != socket::euid() {
        bail!("{} is served by uid {uid}, not us", path.display());
    }
    Ok(stream)
}

/// Ask a master on `stream` who it is (`Hello` also restarts its idle time), within `limit`.
pub async fn ask(stream: UnixStream, req: Request, limit: Duration) -> Result<Info> {
    match ask_reply(stream, req, limit).await? {
        Reply::Info(i) => Ok(i),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// Send `req` on `stream` and read the reply, within `limit`.
pub async fn ask_reply(mut stream: UnixStream, req: Request, limit: Duration) -> Result<Reply> {
    let asking = async {
        write_frame(&mut stream, &Frame::doc(Kind::Request, &req)?).await?;
        let reply = read_frame(&mut stream)
            .await?
            .filter(|f| f.kind == Kind::Reply)
            .context("the master closed the connection")?;
        reply.parse::<Reply>()
    };
    tokio::time::timeout(limit, asking)
        .await
        .with_context(|| format!("no answer within {limit:?}"))?
}

/// A failure the master reported, as the error a direct connection would have given.
pub fn error_of(f: Fail) -> anyhow::Error {
    match f.connection {
        true => Failure::connection(f.message),
        false => anyhow::anyhow!(f.message),
    }
}

impl Link for MasterLink {
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        Box::pin(self.stream(Request::Sftp, false))
    }

    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let req = Request::Exec {
            command: command.to_string(),
        };
        Box::pin(self.stream(req, true))
    }

    fn open_exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<ExecChannel>> {
        Box::pin(async move {
            let spec = ExecSpec {
                command: match req.start {
                    Start::Command(c) => Some(c),
                    Start::Shell => None,
                },
                pty: req.pty.map(|p| PtySpec {
                    term: p.term,
                    cols: p.cols,
                    rows: p.rows,
                    modes: p.modes,
                }),
                env: req.env,
            };
            let parts = Parts::new(self.open(Request::OpenExec(spec)).await?, &self.name);
            Ok(ExecChannel {
                stdin: Box::new(parts.stdin),
                stdout: Box::new(parts.stdout),
                stderr: Box::new(parts.stderr),
                status: parts.status,
                control: parts.control,
            })
        })
    }

    fn direct_tcpip(&self, host: &str, port: u16) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let req = Request::DirectTcpip {
            host: host.to_string(),
            port,
        };
        Box::pin(self.stream(req, false))
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Dropped with the last part of a channel the caller holds: tells the writer to release it.
struct Alive(Mutex<Option<oneshot::Sender<()>>>);

impl Drop for Alive {
    fn drop(&mut self) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

/// One open channel's parts, each keeping the channel alive.
struct Parts {
    stdin: FrameWriter,
    stdout: ChunkReader,
    stderr: ChunkReader,
    status: BoxFuture<'static, Result<ExitStatus>>,
    control: Control,
}

impl Parts {
    fn new(stream: UnixStream, host: &str) -> Parts {
        let (rd, wr) = stream.into_split();
        let (gone_tx, gone_rx) = oneshot::channel();
        let alive = Arc::new(Alive(Mutex::new(Some(gone_tx))));
        let (frames_tx, frames_rx) = mpsc::channel(IN_QUEUE);
        let (finished_tx, finished_rx) = watch::channel(false);
        tokio::spawn(writer(wr, frames_rx, gone_rx));

        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (err_tx, err_rx) = mpsc::channel(OUT_QUEUE);
        let (status_tx, status_rx) = oneshot::channel();
        let out_end = Arc::new(OnceLock::new());
        let err_end = Arc::new(OnceLock::new());
        tokio::spawn(reader(
            rd,
            Output {
                tx: Some(out_tx),
                end: out_end.clone(),
            },
            Output {
                tx: Some(err_tx),
                end: err_end.clone(),
            },
            status_tx,
            finished_tx,
            host.to_string(),
        ));

        let (control, requests) = Control::new();
        tokio::spawn(control_task(
            requests,
            frames_tx.clone(),
            finished_rx,
            alive.clone(),
        ));
        let status_alive = alive.clone();
        let lost_host = host.to_string();
        Parts {
            stdin: FrameWriter {
                tx: frames_tx,
                pending: None,
                shut: false,
                host: host.to_string(),
                _alive: alive.clone(),
            },
            stdout: ChunkReader::new(out_rx, out_end, Some(alive.clone())),
            stderr: ChunkReader::new(err_rx, err_end, Some(alive)),
            status: Box::pin(async move {
                let _alive = status_alive;
                status_rx.await.unwrap_or_else(|_| {
                    Err(Failure::connection(format!(
                        "connection to {lost_host} lost (the master went away)"
                    )))
                })
            }),
            control,
        }
    }
}

/// Frames to the master until every part is dropped; then `Close`.
async fn writer(
    wr: OwnedWriteHalf,
    mut frames: mpsc::Receiver<Frame>,
    mut gone: oneshot::Receiver<()>,
) {
    let mut wr = tokio::io::BufWriter::with_capacity(IO_BUFFER, wr);
    let mut open = true;
    loop {
        tokio::select! {
            // Frames queued before the last part was dropped still go out (a final EOF).
            biased;
            f = frames.recv(), if open => match f {
                Some(f) => {
                    if write_queued(&mut wr, f, &mut frames).await.is_err() {
                        return;
                    }
                }
                None => open = false,
            },
            _ = &mut gone => break,
        }
    }
    let _ = write_frame(&mut wr, &Frame::empty(Kind::Close)).await;
    let _ = tokio::io::AsyncWriteExt::flush(&mut wr).await;
}

/// One output stream's sending end: `end` says how it ended when it did not end cleanly.
struct Output {
    tx: Option<mpsc::Sender<Bytes>>,
    end: Arc<OnceLock<(std::io::ErrorKind, String)>>,
}

impl Output {
    async fn send(&mut self, data: Bytes) {
        if let Some(tx) = &self.tx {
            if tx.send(data).await.is_err() {
                // Its reader is gone: discard from now on.
                self.tx = None;
            }
        }
    }

    fn fail(&mut self, kind: std::io::ErrorKind, message: &str) {
        // The reason is set before the sender drops, so the reader never sees a clean end.
        if let Some(tx) = self.tx.take() {
            let _ = self.end.set((kind, message.to_string()));
            drop(tx);
        }
    }
}

/// Frames from the master into the output streams and the status.
async fn reader(
    rd: OwnedReadHalf,
    mut out: Output,
    mut err: Output,
    status: oneshot::Sender<Result<ExitStatus>>,
    finished: watch::Sender<bool>,
    host: String,
) {
    let mut rd = tokio::io::BufReader::with_capacity(IO_BUFFER, rd);
    let mut status = Some(status);
    loop {
        let frame = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!("master: {e:#}");
                break;
            }
        };
        match frame.kind {
            Kind::Stdout => out.send(frame.payload).await,
            Kind::Stderr => err.send(frame.payload).await,
            Kind::StdoutEof => out.tx = None,
            Kind::StderrEof => err.tx = None,
            Kind::Status => {
                let result = match frame.parse::<EndStatus>() {
                    Ok(EndStatus::Exited(c)) => Ok(ExitStatus::Code(c)),
                    Ok(EndStatus::Killed { name, core_dumped }) => {
                        Ok(ExitStatus::Signal { name, core_dumped })
                    }
                    Ok(EndStatus::Failed(f)) => {
                        let kind = match f.connection {
                            true => std::io::ErrorKind::ConnectionAborted,
                            false => std::io::ErrorKind::Other,
                        };
                        out.fail(kind, &f.message);
                        err.fail(kind, &f.message);
                        Err(error_of(f))
                    }
                    Err(e) => Err(Failure::connection(format!("{host}: {e:#}"))),
                };
                if let Some(tx) = status.take() {
                    let _ = tx.send(result);
                }
                break;
            }
            other => {
                tracing::debug!("master sent a {other:?} frame");
                break;
            }
        }
    }
    let lost = format!("connection to {host} lost (the connection master went away)");
    out.fail(std::io::ErrorKind::ConnectionAborted, &lost);
    err.fail(std::io::ErrorKind::ConnectionAborted, &lost);
    if let Some(tx) = status.take() {
        let _ = tx.send(Err(Failure::connection(lost)));
    }
    let _ = finished.send(true);
}

/// Signals, resizes and closes as frames.
async fn control_task(
    mut requests: mpsc::Receiver<ControlMsg>,
    frames: mpsc::Sender<Frame>,
    mut finished: watch::Receiver<bool>,
    _alive: Arc<Alive>,
) {
    while let Some(msg) = requests.recv().await {
        let frame = match msg {
            ControlMsg::Signal(name) => Frame::doc(Kind::Control, &ControlFrame::Signal(name)),
            ControlMsg::Resize { cols, rows } => {
                Frame::doc(Kind::Control, &ControlFrame::Resize { cols, rows })
            }
            ControlMsg::Close(ack) => {
                let _ = frames.send(Frame::empty(Kind::Close)).await;
                // The master closes the channel, then the connection.
                let _ = finished.wait_for(|f| *f).await;
                let _ = ack.send(());
                continue;
            }
        };
        if let Ok(f) = frame {
            if frames.send(f).await.is_err() {
                break;
            }
        }
    }
}

/// A channel's stdin as frames; shutdown sends `StdinEof`.
struct FrameWriter {
    tx: mpsc::Sender<Frame>,
    pending:
        Option<BoxFuture<'static, Result<mpsc::OwnedPermit<Frame>, mpsc::error::SendError<()>>>>,
    shut: bool,
    host: String,
    _alive: Arc<Alive>,
}

impl FrameWriter {
    fn lost(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            format!(
                "connection to {} lost (the connection master went away)",
                self.host
            ),
        )
    }

    fn poll_permit(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<mpsc::OwnedPermit<Frame>>> {
        let tx = self.tx.clone();
        let fut = self
            .pending
            .get_or_insert_with(|| tx.reserve_owned().boxed());
        match fut.poll_unpin(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                Poll::Ready(r.map_err(|_| self.lost()))
            }
        }
    }
}

impl AsyncWrite for FrameWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let permit = match self.poll_permit(cx) {
            Poll::Ready(Ok(p)) => p,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let n = buf.len().min(MAX_DATA);
        permit.send(Frame::new(Kind::Stdin, Bytes::copy_from_slice(&buf[..n])));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.shut {
            return Poll::Ready(Ok(()));
        }
        let permit = match self.poll_permit(cx) {
            Poll::Ready(Ok(p)) => p,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        permit.send(Frame::empty(Kind::StdinEof));
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}

/// An output stream: chunks from the reader task, then EOF, or the error it ended with.
struct ChunkReader {
    rx: mpsc::Receiver<Bytes>,
    end: Arc<OnceLock<(std::io::ErrorKind, String)>>,
    pending: Bytes,
    alive: Option<Arc<Alive>>,
    done: bool,
}

impl ChunkReader {
    fn new(
        rx: mpsc::Receiver<Bytes>,
        end: Arc<OnceLock<(std::io::ErrorKind, String)>>,
        alive: Option<Arc<Alive>>,
    ) -> ChunkReader {
        ChunkReader {
            rx,
            end,
            pending: Bytes::new(),
            alive,
            done: false,
        }
    }
}

impl AsyncRead for ChunkReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.pending.is_empty() {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(b)) => self.pending = b,
                Poll::Ready(None) => {
                    self.done = true;
                    if let Some((kind, msg)) = self.end.get() {
                        return Poll::Ready(Err(std::io::Error::new(*kind, msg.clone())));
                    }
                }
            }
        }
        let n = self.pending.len().min(buf.remaining());
        let chunk = self.pending.split_to(n);
        buf.put_slice(&chunk);
        Poll::Ready(Ok(()))
    }
}
