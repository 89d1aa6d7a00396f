//! Running one command (or a shell) on a channel: stdin streamed in, stdout and stderr kept
//! apart, resizes followed, and the exit status turned into ours.
//!
//! The rule that matters: vtun exits with the remote status only when one arrived. A channel
//! that ends without it (the link died, keepalives went unanswered) is "connection lost", 255,
//! never 0 — a script must not mistake a cut connection for success.

use std::io::{Read, Write};

use anyhow::Result;
use russh::{ChannelMsg, Sig};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::tty;
use crate::error::Failure;
use crate::ssh::{Session, SshError};

/// How long Ctrl-C waits for the server to confirm the channel is closed.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A PTY to request.
pub struct Pty {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

impl Pty {
    /// TERM and the size of the local terminal (80×24 without one).
    pub fn from_local() -> Pty {
        let (cols, rows) = tty::size().unwrap_or((80, 24));
        let term = std::env::var("TERM")
            .ok()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "xterm".into());
        Pty { term, cols, rows }
    }
}

/// What to start on the channel.
pub enum Start {
    /// A command line for the remote shell.
    Command(String),
    /// The user's login shell.
    Shell,
}

pub struct Request {
    pub start: Start,
    pub pty: Option<Pty>,
    /// Follow local window-size changes (SIGWINCH).
    pub follow_resize: bool,
}

/// Run `req` on a new channel of `session`; the result is our exit status.
pub async fn drive(session: &Session, req: Request) -> Result<u8> {
    // Registered before anything is sent, so an early Ctrl-C still reaches the remote command.
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut winch = match req.follow_resize {
        true => Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::window_change(),
        )?),
        false => None,
    };
    let ch = session.open_channel().await?;
    if let Some(p) = &req.pty {
        ch.request_pty(false, &p.term, p.cols, p.rows, 0, 0, &[])
            .await
            .map_err(lost)?;
    }
    match &req.start {
        Start::Command(line) => ch.exec(true, line.as_bytes()).await,
        Start::Shell => ch.request_shell(true).await,
    }
    .map_err(lost)?;

    let writer = ch.make_writer();
    let (mut rd, wr) = ch.split();
    let stdin_task = tokio::spawn(forward_stdin(writer));

    let mut status = None;
    let mut signal = None;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let winched = async {
            match winch.as_mut() {
                Some(w) => w.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rd.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    let _ = stderr.write_all(&data);
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, core_dumped, .. }) => {
                    signal = Some((signal_name, core_dumped));
                }
                Some(ChannelMsg::Failure) if status.is_none() => {
                    stdin_task.abort();
                    return Err(SshError::Protocol(
                        "the server refused to start the command".into(),
                    )
                    .into());
                }
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
            _ = &mut ctrl_c => {
                // End the remote command: SIGINT to it, then close the channel. sshd refuses
                // signals for root logins (no privilege separation); the close still ends a
                // command at its next write, as it would end under ssh.
                let _ = wr.signal(Sig::INT).await;
                let _ = wr.close().await;
                // Wait (briefly) for the server's close, which also proves both went out.
                let closed = async { while rd.wait().await.is_some() {} };
                let _ = tokio::time::timeout(CLOSE_WAIT, closed).await;
                return Err(Failure::Interrupted.into());
            }
            Some(()) = winched => {
                if let Some((cols, rows)) = tty::size() {
                    let _ = wr.window_change(cols, rows, 0, 0).await;
                }
            }
        }
    }
    stdin_task.abort();
    let _ = stdout.flush();
    if let Some(code) = status {
        return Ok((code & 0xff) as u8);
    }
    if let Some((sig, core)) = signal {
        let name = sig_name(&sig);
        let num = sig_number(&name);
        let core = if core { " (core dumped)" } else { "" };
        eprintln!("vtun: remote command killed by signal {name}{core}");
        return Ok(128u8.saturating_add(num));
    }
    Err(SshError::ConnectionLost("the remote command's exit status never arrived".into()).into())
}

/// Stream our stdin into the channel as it comes, then send EOF. Reads happen on a plain
/// thread: a blocked terminal read must never hold up the runtime or the exit.
async fn forward_stdin(mut writer: impl tokio::io::AsyncWrite + Unpin) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut buf = vec![0u8; 64 * 1024];
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(buf).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    while let Some(buf) = rx.recv().await {
        if writer.write_all(&buf).await.is_err() {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

fn lost(e: russh::Error) -> anyhow::Error {
    SshError::ConnectionLost(e.to_string()).into()
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::Custom(name) => name.trim_start_matches("SIG").to_string(),
        other => format!("{other:?}"),
    }
}

/// Linux signal numbers (the remote is a Linux VM).
fn sig_number(name: &str) -> u8 {
    const TABLE: &[(&str, u8)] = &[
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
    TABLE
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_map_to_linux_numbers() {
        assert_eq!(sig_number(&sig_name(&Sig::TERM)), 15);
        assert_eq!(sig_number(&sig_name(&Sig::KILL)), 9);
        assert_eq!(sig_number(&sig_name(&Sig::Custom("USR2".into()))), 12);
        assert_eq!(sig_number("NOPE"), 0);
    }
}
