//! The seam between everything that works on a VM (exec, ssh, cp, sync, and port forwarding to
//! come) and whatever carries the bytes: a [`Link`] opens, on one VM, SFTP streams, commands as
//! byte streams, full exec channels (pty, env, separate stdin/stdout/stderr, exit status,
//! signals, window changes), streams to TCP ports and Unix sockets as seen from the VM, and
//! listeners on the VM whose connections come back to us (port forwarding).
//!
//! In production the link is an SSH session (see `ssh`), whose channels it multiplexes.
//! [`Subprocess`] runs the same remote programs (OpenSSH's `sftp-server`, `vtun agent`, `sh -c`)
//! as local child processes, so the engines can be exercised and benchmarked without a network.
//!
//! The non-obvious part: nothing here names an SSH type. An [`ExecChannel`] is boxed streams, a
//! status future and a [`Control`] sender, so a link that is not an SSH session in this process
//! (the connection-reuse master behind a Unix socket) can hand out the same thing.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

/// A bidirectional byte stream to a remote program.
pub trait RemoteIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> RemoteIo for T {}

/// Opens streams on one VM. Each call is a new channel, usable in parallel with the others.
pub trait Link: Send + Sync + 'static {
    /// A new SFTP subsystem stream.
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>>;
    /// Run `command` through the remote shell; the stream is its stdin/stdout. Its stderr is
    /// forwarded to our stderr. (What the sync agent and cp's helpers use.)
    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>>;
    /// Start a command or login shell with everything a terminal session needs.
    fn open_exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<ExecChannel>> {
        let _ = req;
        let name = self.name().to_string();
        Box::pin(async move { bail!("{name}: this link cannot open exec channels") })
    }
    /// A TCP stream to `host:port` as seen from the VM (SSH's direct-tcpip).
    fn direct_tcpip(&self, host: &str, port: u16) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let what = format!(
            "{}: this link cannot open tcp streams to {host}:{port}",
            self.name()
        );
        Box::pin(async move { bail!(what) })
    }
    /// A stream to the Unix socket at `path` on the VM (OpenSSH's direct-streamlocal).
    fn direct_streamlocal(&self, path: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let what = format!("{}: this link cannot open streams to {path}", self.name());
        Box::pin(async move { bail!(what) })
    }
    /// Ask the VM to listen at `listen`; each connection made to it there arrives on the
    /// returned listener's `incoming`, which ends when the link does. A refusal by the VM is a
    /// [`Refused`] error.
    fn remote_forward(&self, listen: RemoteListen) -> BoxFuture<'_, Result<RemoteListener>> {
        let what = format!("{}: this link cannot listen on the VM", self.name());
        let _ = listen;
        Box::pin(async move { bail!(what) })
    }
    /// Whether the link is gone for good (its connection was lost or closed): a user of a
    /// long-lived link asks its connector for a new one then.
    fn is_closed(&self) -> bool {
        false
    }
    /// A short name for messages (`a.vm.vers.sh`).
    fn name(&self) -> &str;
}

/// Where the VM should listen for a remote forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteListen {
    /// `address` as OpenSSH sends it: `localhost` (loopback), `` (all addresses) or a name or
    /// address; `port` 0 lets the VM pick one.
    Tcp { address: String, port: u16 },
    /// A Unix socket path on the VM (OpenSSH's streamlocal-forward).
    Unix(String),
}

/// A listener on the VM (see [`Link::remote_forward`]).
pub struct RemoteListener {
    /// The port the VM listens on (the one it picked when 0 was asked for); `None` for a socket.
    pub port: Option<u16>,
    /// One stream per connection made to the listener on the VM.
    pub incoming: mpsc::Receiver<Box<dyn RemoteIo>>,
}

/// The VM said no to one stream or listener while the link itself is fine: its sshd forbids
/// forwarding, it cannot reach the target, the port is taken there.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub why: RefusedWhy,
    pub message: String,
}

/// Why the VM refused (as far as SSH says; it maps onto SOCKS reply codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedWhy {
    /// Administratively prohibited (`AllowTcpForwarding no`, `PermitOpen`).
    Prohibited,
    /// The VM could not connect to the target.
    Unreachable,
    /// Anything else (a listener it could not open, an unknown reason).
    Other,
}

/// What to start on an exec channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A command line for the remote user's shell.
    Command(String),
    /// The user's login shell.
    Shell,
}

/// A pseudo-terminal to request.
#[derive(Debug, Clone)]
pub struct Pty {
    /// TERM on the remote side.
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    /// RFC 4254 terminal modes (opcode, value); empty leaves the server's defaults.
    pub modes: Vec<(u8, u32)>,
}

/// Everything an exec channel starts with.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub start: Start,
    pub pty: Option<Pty>,
    /// Environment variables to ask for (sshd drops those its `AcceptEnv` does not list).
    pub env: Vec<(String, String)>,
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    /// Killed by a signal, named without `SIG` (`TERM`).
    Signal {
        name: String,
        core_dumped: bool,
    },
}

/// A running remote command. The output streams end when the channel does; `status` resolves
/// after that, with an error when the link was lost or the server refused to start the command.
/// Read stdout and stderr promptly and concurrently: on an SSH link one stalled stream holds up
/// the other, and in the end the whole session (window is granted as data arrives).
pub struct ExecChannel {
    /// The command's stdin; shutting it down sends EOF.
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    pub stderr: Box<dyn AsyncRead + Send + Unpin>,
    pub status: BoxFuture<'static, Result<ExitStatus>>,
    pub control: Control,
}

/// Requests to a running exec channel, in the order they were sent.
#[derive(Debug)]
pub enum ControlMsg {
    /// Deliver a signal (named without `SIG`) to the remote command.
    Signal(String),
    /// The terminal is now this size.
    Resize { cols: u32, rows: u32 },
    /// Close the channel; the sender is answered once the close has reached the other end (or
    /// the link is gone). Nothing more arrives on the channel's streams after that.
    Close(oneshot::Sender<()>),
}

/// Sends [`ControlMsg`]s to an exec channel. Cheap to clone; fails silently once the channel is
/// gone, since there is nothing left to signal or resize then.
#[derive(Debug, Clone)]
pub struct Control(mpsc::Sender<ControlMsg>);

impl Control {
    /// A control handle and the receiving end a link implementation serves.
    pub fn new() -> (Control, mpsc::Receiver<ControlMsg>) {
        let (tx, rx) = mpsc::channel(16);
        (Control(tx), rx)
    }

    pub async fn signal(&self, name: &str) {
        let _ = self.0.send(ControlMsg::Signal(name.to_string())).await;
    }

    pub async fn resize(&self, cols: u32, rows: u32) {
        let _ = self.0.send(ControlMsg::Resize { cols, rows }).await;
    }

    /// Close the channel and wait until the other end has the close.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(ControlMsg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Linux signal numbers (the remote is a Linux VM), by name without `SIG`.
const SIGNALS: &[(&str, u8)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// The Linux number of a signal named without `SIG` (`TERM` → 15).
pub fn signal_number(name: &str) -> Option<u8> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// The name (without `SIG`) of a Linux signal number.
pub fn signal_name(number: i32) -> Option<&'static str> {
    SIGNALS
        .iter()
        .find(|(_, v)| i32::from(*v) == number)
        .map(|(n, _)| *n)
}

/// Runs the remote side as local processes: `sftp-server` for SFTP, `sh -c` for commands, and
/// plain TCP connections for direct-tcpip. It has no PTYs.
pub struct Subprocess {
    pub sftp_server: PathBuf,
    pub name: String,
}

impl Subprocess {
    pub fn new() -> Result<Subprocess> {
        let candidates = [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
            "/usr/libexec/sftp-server",
            "/usr/lib/ssh/sftp-server",
        ];
        let sftp_server = candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("OpenSSH sftp-server not found (install openssh-server)")?;
        Ok(Subprocess {
            sftp_server,
            name: "localhost".into(),
        })
    }

    fn spawn(&self, mut cmd: tokio::process::Command) -> Result<Box<dyn RemoteIo>> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start local process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Reap the child in the background; kill_on_drop is not needed once it exits by itself.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(Box::new(tokio::io::join(stdout, stdin)))
    }

    fn spawn_exec(&self, req: ExecRequest) -> Result<ExecChannel> {
        if req.pty.is_some() {
            bail!("{}: local processes get no pty", self.name);
        }
        let mut cmd = tokio::process::Command::new("sh");
        match &req.start {
            Start::Command(line) => cmd.arg("-c").arg(line),
            Start::Shell => cmd.arg("-l"),
        };
        let mut child = cmd
            .envs(req.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start local process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (control, mut requests) = Control::new();
        let (status_tx, status_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut closed = Vec::new();
            let status = loop {
                tokio::select! {
                    st = child.wait() => break st,
                    Some(msg) = requests.recv() => match msg {
                        ControlMsg::Signal(name) => {
                            if let (Some(pid), Some(sig)) = (child.id(), signal_number(&name)) {
                                // SAFETY: kill(2) with our own child's pid and a valid signal.
                                unsafe { libc::kill(pid as libc::pid_t, i32::from(sig)) };
                            }
                        }
                        ControlMsg::Resize { .. } => {}
                        ControlMsg::Close(done) => {
                            let _ = child.start_kill();
                            closed.push(done);
                        }
                    },
                }
            };
            let status = status.context("cannot wait for a local process").map(|st| {
                use std::os::unix::process::ExitStatusExt;
                match (st.code(), st.signal()) {
                    (Some(code), _) => ExitStatus::Code(code as u32),
                    (None, Some(sig)) => ExitStatus::Signal {
                        name: signal_name(sig).map_or_else(|| sig.to_string(), String::from),
                        core_dumped: st.core_dumped(),
                    },
                    (None, None) => ExitStatus::Code(255),
                }
            });
            let _ = status_tx.send(status);
            for done in closed {
                let _ = done.send(());
            }
        });
        Ok(ExecChannel {
            stdin: Box::new(ClosingStdin(Some(stdin))),
            stdout: Box::new(stdout),
            stderr: Box::new(stderr),
            status: Box::pin(async move {
                status_rx
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a local process vanished")))
            }),
            control,
        })
    }
}

/// A child's stdin whose shutdown closes the pipe: tokio's does nothing on shutdown, and the
/// child would never see EOF while the channel is alive.
struct ClosingStdin(Option<tokio::process::ChildStdin>);

impl AsyncWrite for ClosingStdin {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.0.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_write(cx, buf),
            None => std::task::Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.0.as_mut() {
            Some(w) => std::pin::Pin::new(w).poll_flush(cx),
            None => std::task::Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0 = None;
        std::task::Poll::Ready(Ok(()))
    }
}

impl Link for Subprocess {
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        Box::pin(async move { self.spawn(tokio::process::Command::new(&self.sftp_server)) })
    }

    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(command);
        Box::pin(async move { self.spawn(cmd) })
    }

    fn open_exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<ExecChannel>> {
        Box::pin(async move { self.spawn_exec(req) })
    }

    fn direct_tcpip(&self, host: &str, port: u16) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let host = host.to_string();
        Box::pin(async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .with_context(|| format!("cannot connect to {host}:{port}"))?;
            let io: Box<dyn RemoteIo> = Box::new(tcp);
            Ok(io)
        })
    }

    fn direct_streamlocal(&self, path: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let path = path.to_string();
        Box::pin(async move {
            let unix = tokio::net::UnixStream::connect(&path)
                .await
                .with_context(|| format!("cannot connect to {path}"))?;
            let io: Box<dyn RemoteIo> = Box::new(unix);
            Ok(io)
        })
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Connects to hosts: one [`Link`] per host, shared by everything that talks to that host.
pub trait Connector: Send + Sync {
    fn connect<'a>(&'a self, host: &'a crate::target::Host)
        -> BoxFuture<'a, Result<Arc<dyn Link>>>;
}

/// Every host is this machine, served by local processes (engine tests and benchmarks).
pub struct LocalConnector;

impl Connector for LocalConnector {
    fn connect<'a>(
        &'a self,
        _host: &'a crate::target::Host,
    ) -> BoxFuture<'a, Result<Arc<dyn Link>>> {
        Box::pin(async move {
            let s: Arc<dyn Link> = Arc::new(Subprocess::new()?);
            Ok(s)
        })
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn signal_names_and_numbers_agree() {
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("USR2"), Some(12));
        assert_eq!(signal_number("NOPE"), None);
        assert_eq!(signal_name(9), Some("KILL"));
        assert_eq!(signal_name(99), None);
    }

    /// The local link keeps the streams apart and reports codes and signals as an SSH link does.
    #[tokio::test]
    async fn subprocess_exec_channels_report_streams_and_status() {
        // No sftp-server needed: exec channels are plain `sh -c`.
        let link = Subprocess {
            sftp_server: PathBuf::new(),
            name: "localhost".into(),
        };
        let req = |line: &str| ExecRequest {
            start: Start::Command(line.into()),
            pty: None,
            env: vec![("VTUN_LINK_TEST".into(), "v w".into())],
        };
        let mut ch = link
            .open_exec(req("cat; echo \"$VTUN_LINK_TEST\" >&2; exit 3"))
            .await
            .unwrap();
        ch.stdin.write_all(b"in").await.unwrap();
        ch.stdin.shutdown().await.unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        ch.stdout.read_to_end(&mut out).await.unwrap();
        ch.stderr.read_to_end(&mut err).await.unwrap();
        assert_eq!(out, b"in");
        assert_eq!(err, b"v w\n");
        assert_eq!(ch.status.await.unwrap(), ExitStatus::Code(3));

        let ch = link.open_exec(req("sleep 30")).await.unwrap();
        ch.control.signal("TERM").await;
        let want = ExitStatus::Signal {
            name: "TERM".into(),
            core_dumped: false,
        };
        assert_eq!(ch.status.await.unwrap(), want);
    }
}
