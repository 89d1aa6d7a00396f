//! The master: one process per connection identity, holding authenticated SSH sessions to one
//! VM and serving channels on them to clients on a Unix socket.
//!
//! It binds first and connects second, so the client that started it can queue its first
//! request at once; a failed connect is answered to every waiting request and ends the master.
//! It exits after `persist` without channels, when its first SSH connection dies, or on
//! `Stop`. When sshd refuses another channel (MaxSessions) it opens one more connection to the
//! VM and carries on there. An exclusive lock beside the socket makes sure two masters started
//! at once for the same identity end up as one.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::BytesMut;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Notify};

use super::proto::{
    read_frame, write_frame, write_queued, ControlFrame, EndStatus, Fail, Frame, Info, Kind, Reply,
    Request, IO_BUFFER, MAX_DATA,
};
use super::socket;
use crate::link::{Control, ExecChannel, ExecRequest, ExitStatus, Link, Pty, RemoteIo, Start};
use crate::settings::Settings;
use crate::ssh::{Session, SshError};
use crate::target::Host;

/// How long a new client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards one client.
const OUT_QUEUE: usize = 16;
/// How long extra connections (see [`State::shed_extra`]) are kept without any channel.
const EXTRA_IDLE: Duration = Duration::from_secs(10);

/// Whether `serve` ran, or found another master already holding the identity.
pub enum Served {
    Done,
    AnotherMaster,
}

/// What every connection handler shares.
struct State {
    settings: Settings,
    host: Host,
    /// The SSH connections, the first one first; more are added when sshd refuses channels.
    pool: Mutex<Vec<Arc<Session>>>,
    /// One connection is added at a time.
    grow: tokio::sync::Mutex<()>,
    /// `None` while the first connection is being made.
    ready: watch::Receiver<Option<Result<(), Fail>>>,
    channels: AtomicUsize,
    idle_since: Mutex<Instant>,
    stop: Notify,
}

/// Serve `host` on `path` until idle for `settings.persist`, the connection dies, or a stop.
pub async fn serve(settings: Settings, host: Host, path: &Path) -> Result<Served> {
    let lock_path = path.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    // SAFETY: flock on a file descriptor we own; non-blocking.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        tracing::info!("another master holds {}", lock_path.display());
        return Ok(Served::AnotherMaster);
    }
    // We hold the lock, so a socket left here belongs to a master that is gone.
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    socket::make_private(path)?;
    let persist = settings.persist;
    tracing::info!(
        pid = std::process::id(),
        host = %host.name,
        socket = %path.display(),
        persist = persist.as_secs_f64(),
        "master listening"
    );

    let (ready_tx, ready) = watch::channel(None);
    let state = Arc::new(State {
        settings,
        host,
        pool: Mutex::new(Vec::new()),
        grow: tokio::sync::Mutex::new(()),
        ready,
        channels: AtomicUsize::new(0),
        idle_since: Mutex::new(Instant::now()),
        stop: Notify::new(),
    });
    {
        let state = state.clone();
        tokio::spawn(async move {
            let result = match Session::connect(&state.settings, &state.host).await {
                Ok(s) => {
                    tracing::info!("connected to {}", state.host.name);
                    state.pool().push(Arc::new(s));
                    Ok(())
                }
                Err(e) => {
                    tracing::warn!("cannot connect to {}: {e:#}", state.host.name);
                    Err(fail_of(&e))
                }
            };
            let _ = ready_tx.send(Some(result));
        });
    }

    let me = socket::euid();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    // Whether memory was handed back since the last channel closed.
    let mut trimmed = true;
    let why = loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((stream, _)) => match socket::peer_uid(&stream) {
                    Ok(uid) if uid == me => {
                        let state = state.clone();
                        tokio::spawn(async move {
                            if let Err(e) = handle(&state, stream).await {
                                tracing::debug!("client: {e:#}");
                            }
                        });
                    }
                    Ok(uid) => tracing::warn!("refused a client with uid {uid} (this master serves uid {me})"),
                    Err(e) => tracing::warn!("refused a client: {e:#}"),
                },
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = state.stop.notified() => break "stopped",
            _ = tick.tick() => {
                if let Some(why) = state.reason_to_exit() {
                    break why;
                }
                for s in state.shed_extra() {
                    tracing::info!("closing an extra connection to {}: no channels", state.host.name);
                    tokio::spawn(async move { s.close().await });
                }
                let busy = state.channels.load(Ordering::SeqCst) > 0;
                if busy {
                    trimmed = false;
                } else if !trimmed {
                    // An idle master should be small: return the buffers a large copy left
                    // in the allocator (tens of MiB after cp) to the system.
                    trim_heap();
                    trimmed = true;
                }
            }
        }
    };
    tracing::info!("master exits: {why}");
    let _ = std::fs::remove_file(path);
    drop(listener);
    let sessions: Vec<_> = state.pool().drain(..).collect();
    for s in sessions {
        s.close().await;
    }
    drop(lock);
    Ok(Served::Done)
}

impl State {
    fn pool(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Session>>> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_since(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.idle_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reason_to_exit(&self) -> Option<&'static str> {
        match &*self.ready.borrow() {
            None => return None,
            Some(Err(_)) => return Some("could not connect"),
            Some(Ok(())) => {}
        }
        {
            let mut pool = self.pool();
            if pool.first().is_none_or(|s| s.is_closed()) {
                return Some("the ssh connection is gone");
            }
            pool.retain(|s| !s.is_closed());
        }
        let idle = self.channels.load(Ordering::SeqCst) == 0
            && self.idle_since().elapsed() >= self.settings.persist;
        idle.then_some("idle")
    }

    /// The connections beyond the first (opened when sshd refused more channels), once no
    /// channel has been open for [`EXTRA_IDLE`]: a burst of commands leaves one connection
    /// held, not one per ten channels. A channel is counted before its open takes the pool,
    /// and the count is read under the pool's lock, so no open can be under way on what this
    /// returns.
    fn shed_extra(&self) -> Vec<Arc<Session>> {
        let quiet = self.idle_since().elapsed() >= EXTRA_IDLE;
        let mut pool = self.pool();
        if !quiet || pool.len() < 2 || self.channels.load(Ordering::SeqCst) > 0 {
            return Vec::new();
        }
        pool.drain(1..).collect()
    }

    /// Connected once, and that first connection is gone.
    fn dying(&self) -> bool {
        matches!(&*self.ready.borrow(), Some(Ok(())))
            && self.pool().first().is_none_or(|s| s.is_closed())
    }

    fn info(&self) -> Info {
        let channels = self.channels.load(Ordering::SeqCst);
        Info {
            host: self.host.name.clone(),
            user: self.settings.user_for(&self.host),
            port: self.settings.port_for(&self.host),
            pid: std::process::id(),
            idle_secs: match channels {
                0 => self.idle_since().elapsed().as_secs(),
                _ => 0,
            },
            channels,
            connections: self.pool().len(),
            persist_secs: self.settings.persist.as_secs(),
        }
    }

    /// Wait for the first connection; its failure is every request's failure.
    async fn connected(&self) -> Result<(), Fail> {
        let mut ready = self.ready.clone();
        let r = ready.wait_for(|r| r.is_some()).await;
        match r.as_deref() {
            Ok(Some(r)) => r.clone(),
            _ => Err(Fail {
                connection: true,
                auth: false,
                message: "the master's connection attempt vanished".into(),
            }),
        }
    }

    /// Run `open` on the first connection that takes another channel, adding a connection
    /// when every one refuses.
    async fn open<T>(
        &self,
        open: impl Fn(Arc<Session>) -> BoxFuture<'static, Result<T>>,
    ) -> Result<T> {
        let tried: Vec<Arc<Session>> = self.pool().clone();
        for s in &tried {
            match open(s.clone()).await {
                Err(e) if refused(&e) => continue,
                other => return other,
            }
        }
        let _one_at_a_time = self.grow.lock().await;
        // Another request may have added a connection while this one waited.
        let added: Vec<Arc<Session>> = self
            .pool()
            .iter()
            .filter(|s| !tried.iter().any(|t| Arc::ptr_eq(t, s)))
            .cloned()
            .collect();
        for s in added {
            match open(s).await {
                Err(e) if refused(&e) => continue,
                other => return other,
            }
        }
        tracing::info!(
            "{} refused another channel: opening connection {}",
            self.host.name,
            self.pool().len() + 1
        );
        let s = Arc::new(Session::connect(&self.settings, &self.host).await?);
        self.pool().push(s.clone());
        open(s).await
    }
}

fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap; no pointers of ours are involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn refused(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| matches!(c.downcast_ref::<SshError>(), Some(SshError::Refused(_))))
}

/// An error as it crosses the socket.
pub fn fail_of(e: &anyhow::Error) -> Fail {
    Fail {
        connection: crate::error::code_for(e) == crate::error::EXIT_CONNECT,
        auth: e
            .chain()
            .any(|c| matches!(c.downcast_ref::<SshError>(), Some(SshError::Auth(_)))),
        message: format!("{e:#}"),
    }
}

/// Counts a channel as open while it lives; the master is idle from when the last one ends.
struct Open<'a>(&'a State);

impl<'a> Open<'a> {
    fn new(state: &'a State) -> Open<'a> {
        state.channels.fetch_add(1, Ordering::SeqCst);
        Open(state)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        *self.0.idle_since() = Instant::now();
        self.0.channels.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a request opened.
enum Opened {
    /// A byte stream: SFTP or a TCP stream.
    Stream(Box<dyn RemoteIo>),
    /// An exec channel; `true` for `Exec`, the byte-stream flavour (its stderr comes along).
    Exec(ExecChannel, bool),
}

async fn handle(state: &State, stream: UnixStream) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(IO_BUFFER, rd);
    let first = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut rd))
        .await
        .context("no request in time")??;
    let Some(first) = first.filter(|f| f.kind == Kind::Request) else {
        anyhow::bail!("the first frame was not a request");
    };
    let request: Request = first.parse()?;
    tracing::debug!(?request, "request");
    if state.dying() {
        // Our connection is gone and we are about to exit: say nothing, so a new command
        // passes us by (and connects itself) instead of failing on a dead session.
        anyhow::bail!("the ssh connection is gone; not serving {request:?}");
    }
    let reply = |r: Reply| Frame::doc(Kind::Reply, &r);
    let req = match request {
        Request::Hello => {
            // A client about to open channels: give it the full idle time.
            *state.idle_since() = Instant::now();
            write_frame(&mut wr, &reply(Reply::Info(state.info()))?).await?;
            return Ok(());
        }
        Request::Ready => {
            let r = match state.connected().await {
                Ok(()) => Reply::Info(state.info()),
                Err(f) => Reply::Failed(f),
            };
            write_frame(&mut wr, &reply(r)?).await?;
            return Ok(());
        }
        Request::Info => {
            write_frame(&mut wr, &reply(Reply::Info(state.info()))?).await?;
            return Ok(());
        }
        Request::Stop => {
            write_frame(&mut wr, &reply(Reply::Info(state.info()))?).await?;
            state.stop.notify_one();
            return Ok(());
        }
        other => other,
    };
    let _open = Open::new(state);
    let opened = match state.connected().await {
        Ok(()) => open(state, req).await,
        Err(f) => Err(anyhow::Error::new(crate::error::Failure::Connection(
            f.message,
        ))),
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) => {
            write_frame(&mut wr, &reply(Reply::Failed(fail_of(&e)))?).await?;
            return Ok(());
        }
    };
    write_frame(&mut wr, &reply(Reply::Opened)?).await?;

    let (ch, stream) = match opened {
        // One producer: frames go straight to the socket, no writer task in between.
        Opened::Stream(io) => {
            serve_stream(io, rd, wr).await;
            return Ok(());
        }
        Opened::Exec(ch, stream) => (ch, stream),
    };
    let (tx, mut rx) = mpsc::channel::<Frame>(OUT_QUEUE);
    let writer = tokio::spawn(async move {
        let mut wr = tokio::io::BufWriter::with_capacity(IO_BUFFER, wr);
        while let Some(f) = rx.recv().await {
            if write_queued(&mut wr, f, &mut rx).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    serve_exec(ch, stream, rd, tx).await;
    let _ = writer.await;
    Ok(())
}

async fn open(state: &State, req: Request) -> Result<Opened> {
    Ok(match req {
        Request::Sftp => Opened::Stream(
            state
                .open(|s| Box::pin(async move { s.sftp().await }))
                .await?,
        ),
        Request::DirectTcpip { host, port } => {
            let io = state
                .open(move |s| {
                    let host = host.clone();
                    Box::pin(async move { s.direct_tcpip(&host, port).await })
                })
                .await?;
            Opened::Stream(io)
        }
        Request::Exec { command } => Opened::Exec(
            state
                .open(move |s| {
                    let req = ExecRequest {
                        start: Start::Command(command.clone()),
                        pty: None,
                        env: Vec::new(),
                    };
                    Box::pin(async move { s.open_exec(req).await })
                })
                .await?,
            true,
        ),
        Request::OpenExec(spec) => {
            let req = ExecRequest {
                start: match spec.command {
                    Some(c) => Start::Command(c),
                    None => Start::Shell,
                },
                pty: spec.pty.map(|p| Pty {
                    term: p.term,
                    cols: p.cols,
                    rows: p.rows,
                    modes: p.modes,
                }),
                env: spec.env,
            };
            Opened::Exec(
                state
                    .open(move |s| {
                        let req = req.clone();
                        Box::pin(async move { s.open_exec(req).await })
                    })
                    .await?,
                false,
            )
        }
        Request::Hello | Request::Info | Request::Ready | Request::Stop => {
            anyhow::bail!("not a channel request")
        }
    })
}

/// Moves `r` into frames of `kind`, then `eof` if given; a read error is returned (the channel
/// died).
async fn forward(
    mut r: impl AsyncRead + Unpin,
    kind: Kind,
    eof: Option<Kind>,
    send: &mut Sink<'_>,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_DATA);
        // `take` keeps one read within a frame's limit.
        let n = (&mut r).take(MAX_DATA as u64).read_buf(&mut buf).await?;
        let mut ended = n == 0;
        // Coalesce what has already arrived (SSH packets are 32-64 KiB) into one frame.
        while !ended && buf.len() < MAX_DATA / 2 {
            let room = (MAX_DATA - buf.len()) as u64;
            match futures::FutureExt::now_or_never((&mut r).take(room).read_buf(&mut buf)) {
                Some(Ok(0)) => ended = true,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        if !buf.is_empty() && !send.send(Frame::new(kind, buf.split().freeze())).await {
            // The client is gone; the caller closes the channel.
            return Ok(());
        }
        if ended {
            if let Some(eof) = eof {
                send.send(Frame::empty(eof)).await;
            }
            return Ok(());
        }
    }
}

/// Where [`forward`] puts its frames: the queue of a writer shared with other producers, or the
/// socket itself when it is the only one (no task in between).
enum Sink<'a> {
    Queue(&'a mpsc::Sender<Frame>),
    Socket(&'a mut tokio::io::BufWriter<tokio::net::unix::OwnedWriteHalf>),
}

impl Sink<'_> {
    /// False once the client is gone.
    async fn send(&mut self, f: Frame) -> bool {
        match self {
            Sink::Queue(tx) => tx.send(f).await.is_ok(),
            Sink::Socket(w) => write_frame(w, &f).await.is_ok() && w.flush().await.is_ok(),
        }
    }
}

/// Frames from the client into the channel, until the client closes or goes away.
async fn from_client(
    rd: &mut BufReader<OwnedReadHalf>,
    stdin: &mut (dyn tokio::io::AsyncWrite + Send + Unpin),
    control: Option<&Control>,
) {
    // Once a write fails (the remote closed its stdin), later stdin is dropped: the outputs
    // and the status say how the channel ended.
    let mut stdin_ok = true;
    loop {
        let frame = match read_frame(rd).await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("client: {e:#}");
                return;
            }
        };
        match frame.kind {
            Kind::Stdin if stdin_ok => stdin_ok = stdin.write_all(&frame.payload).await.is_ok(),
            Kind::Stdin => {}
            Kind::StdinEof => {
                if stdin_ok {
                    let _ = stdin.shutdown().await;
                }
                stdin_ok = false;
            }
            Kind::Control => match (frame.parse::<ControlFrame>(), control) {
                (Ok(ControlFrame::Signal(name)), Some(c)) => c.signal(&name).await,
                (Ok(ControlFrame::Resize { cols, rows }), Some(c)) => c.resize(cols, rows).await,
                (Ok(_), None) => {}
                (Err(e), _) => {
                    tracing::debug!("client: {e:#}");
                    return;
                }
            },
            Kind::Close => return,
            other => {
                tracing::debug!("client sent a {other:?} frame");
                return;
            }
        }
    }
}

async fn serve_stream(
    io: Box<dyn RemoteIo>,
    mut rd: BufReader<OwnedReadHalf>,
    wr: tokio::net::unix::OwnedWriteHalf,
) {
    let (r, mut w) = tokio::io::split(io);
    let out = async move {
        let mut wr = tokio::io::BufWriter::with_capacity(IO_BUFFER, wr);
        let mut send = Sink::Socket(&mut wr);
        let result = forward(r, Kind::Stdout, Some(Kind::StdoutEof), &mut send).await;
        if let Err(e) = result {
            let fail = Fail {
                connection: true,
                auth: false,
                message: e.to_string(),
            };
            if let Ok(f) = Frame::doc(Kind::Status, &EndStatus::Failed(fail)) {
                send.send(f).await;
            }
        }
        // The stream stays open for the client's writes until it closes.
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = from_client(&mut rd, &mut w, None) => {}
        _ = out => {}
    }
}

/// An exec channel's outputs and status to the client, its stdin and controls from it. For the
/// byte-stream flavour the ends of stdout and stderr wait for the status: a channel that dies
/// must reach the reader as an error, as a direct channel's does, not as a clean end.
async fn serve_exec(
    ch: ExecChannel,
    stream: bool,
    mut rd: BufReader<OwnedReadHalf>,
    tx: mpsc::Sender<Frame>,
) {
    let ExecChannel {
        mut stdin,
        stdout,
        stderr,
        status,
        control,
    } = ch;
    let out = async {
        let eof = |k| (!stream).then_some(k);
        let (mut out_send, mut err_send) = (Sink::Queue(&tx), Sink::Queue(&tx));
        let _ = tokio::join!(
            forward(stdout, Kind::Stdout, eof(Kind::StdoutEof), &mut out_send),
            forward(stderr, Kind::Stderr, eof(Kind::StderrEof), &mut err_send),
        );
        let end = match status.await {
            Ok(ExitStatus::Code(c)) => EndStatus::Exited(c),
            Ok(ExitStatus::Signal { name, core_dumped }) => EndStatus::Killed { name, core_dumped },
            Err(e) => EndStatus::Failed(fail_of(&e)),
        };
        if stream && !matches!(end, EndStatus::Failed(_)) {
            let _ = tx.send(Frame::empty(Kind::StdoutEof)).await;
            let _ = tx.send(Frame::empty(Kind::StderrEof)).await;
        }
        if let Ok(f) = Frame::doc(Kind::Status, &end) {
            let _ = tx.send(f).await;
        }
    };
    let client_gone = tokio::select! {
        _ = from_client(&mut rd, &mut stdin, Some(&control)) => true,
        _ = out => false,
    };
    if client_gone {
        control.close().await;
    }
}

/// The master's log, beside its socket (the client that starts it points its stderr there).
pub fn socket_log(path: &Path) -> PathBuf {
    path.with_extension("log")
}
