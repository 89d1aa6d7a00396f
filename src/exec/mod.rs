//! The exec engine behind `vtun exec` and `vtun ssh`: one command (or a login shell) on an exec
//! channel of a [`Link`], with typed options and the streams to use for stdio.
//!
//! Exit statuses follow ssh: the remote status, 128+N for a remote killed by signal N, 255 when
//! the connection failed or was lost first, 130 after Ctrl-C. Building the remote command line
//! (quoting each argument for the remote shell) is [`quote`]'s job; the command layer decides
//! which of its rules a subcommand uses.

mod drive;
pub mod quote;
mod stdin;
mod tty;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::link::{ExecRequest, Link, Pty};

/// What to run and how.
pub struct ExecOptions {
    pub request: ExecRequest,
    /// An interactive session at this terminal: stdin in raw mode while connected, and the
    /// remote PTY follows local window-size changes.
    pub raw: bool,
}

/// The local ends of the remote command's streams.
pub struct Stdio {
    pub stdin: Box<dyn AsyncRead + Send + Unpin>,
    pub stdout: Box<dyn AsyncWrite + Send + Unpin>,
    pub stderr: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Stdio {
    /// This process's stdin, stdout and stderr, all async (stdin through a reader thread).
    pub fn process() -> Stdio {
        Stdio {
            stdin: Box::new(stdin::ThreadStdin::default()),
            stdout: Box::new(tokio::io::stdout()),
            stderr: Box::new(tokio::io::stderr()),
        }
    }
}

/// Run `opts` on `link`; the result is the exit status to leave with.
pub async fn run(link: &dyn Link, opts: ExecOptions, io: Stdio) -> Result<u8> {
    // Raw mode only once connected: passphrase prompts and connection errors stay readable.
    let _raw = match opts.raw {
        true => Some(tty::RawMode::enable().context("cannot set the terminal to raw mode")?),
        false => None,
    };
    drive::drive(link, opts.request, opts.raw, io, None).await
}

/// Run a non-interactive command on `link`, stopped at `deadline` (it then fails with
/// [`crate::error::Failure::TimedOut`]): one VM's part of a fan-out.
pub async fn run_until(
    link: &dyn Link,
    request: ExecRequest,
    io: Stdio,
    deadline: Option<tokio::time::Instant>,
) -> Result<u8> {
    drive::drive(link, request, false, io, deadline).await
}

/// Whether our stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    tty::is_tty(libc::STDIN_FILENO)
}

/// A PTY like the local terminal: its TERM and size (xterm, 80×24 without one).
pub fn local_pty() -> Pty {
    let (cols, rows) = tty::size().unwrap_or((80, 24));
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "xterm".into());
    Pty {
        term,
        cols,
        rows,
        modes: Vec::new(),
    }
}
