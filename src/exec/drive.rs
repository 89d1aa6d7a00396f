//! Driving one exec channel: stdin streamed in, stdout and stderr copied out apart, resizes
//! followed, Ctrl-C passed on, and the exit status turned into ours.
//!
//! The rules that matter: vtun exits with the remote status only when one arrived (a channel
//! that ends without it is "connection lost", 255, never 0), and no write here blocks a runtime
//! worker: stdout and stderr are copied by separate async tasks, so a reader that stalls one of
//! them never holds up the other, Ctrl-C, resizes or keepalives.

use anyhow::Result;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{tty, Stdio};
use crate::error::Failure;
use crate::link::{signal_number, ExecRequest, ExitStatus, Link};

/// How long Ctrl-C waits for the server to confirm the channel is closed.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Run `req` on a new exec channel of `link`; the result is our exit status. At `deadline` the
/// remote command is stopped as for Ctrl-C and the run fails with [`Failure::TimedOut`].
pub async fn drive(
    link: &dyn Link,
    req: ExecRequest,
    follow_resize: bool,
    io: Stdio,
    deadline: Option<tokio::time::Instant>,
) -> Result<u8> {
    // Registered before anything is sent, so an early Ctrl-C still reaches the remote command.
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let mut winch = match follow_resize {
        true => Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::window_change(),
        )?),
        false => None,
    };
    let channel = link.open_exec(req).await?;
    let control = channel.control;
    let stdin_task = tokio::spawn(forward_stdin(io.stdin, channel.stdin));
    let (mut stdout, mut stderr) = (io.stdout, io.stderr);

    let expired = async {
        match deadline {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    let outcome = {
        let out = copy_out(channel.stdout, &mut stdout);
        let err = copy_err(channel.stderr, &mut stderr);
        let work = async { tokio::try_join!(out, err, channel.status) };
        tokio::pin!(work);
        loop {
            let winched = async {
                match winch.as_mut() {
                    Some(w) => w.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut work => break Ok(r),
                _ = &mut ctrl_c => break Err(Failure::Interrupted),
                _ = &mut expired => break Err(Failure::TimedOut),
                Some(()) = winched => {
                    if let Some((cols, rows)) = tty::size() {
                        control.resize(cols, rows).await;
                    }
                }
            }
        }
        // Leaving the block drops the output readers, so a stalled one cannot hold up the
        // channel's close below.
    };
    stdin_task.abort();
    let status = match outcome {
        Ok(r) => r?.2,
        Err(why) => {
            // End the remote command: SIGINT to it, then close the channel. sshd refuses
            // signals for root logins (no privilege separation); the close still ends a
            // command at its next write, as it would end under ssh. Waiting (briefly) for the
            // close to be confirmed proves both went out before we exit.
            let signal = match why {
                Failure::TimedOut => "TERM",
                _ => "INT",
            };
            control.signal(signal).await;
            let _ = tokio::time::timeout(CLOSE_WAIT, control.close()).await;
            return Err(why.into());
        }
    };
    match status {
        ExitStatus::Code(code) => Ok((code & 0xff) as u8),
        ExitStatus::Signal { name, core_dumped } => {
            let core = if core_dumped { " (core dumped)" } else { "" };
            let line = format!("vtun: remote command killed by signal {name}{core}\n");
            let _ = stderr.write_all(line.as_bytes()).await;
            let _ = stderr.flush().await;
            Ok(128u8.saturating_add(signal_number(&name).unwrap_or(0)))
        }
    }
}

/// The remote stdout to ours. A failed write (our reader went away) ends the run.
async fn copy_out(
    mut from: impl AsyncRead + Unpin,
    to: &mut (impl AsyncWrite + Unpin),
) -> Result<()> {
    tokio::io::copy(&mut from, to).await?;
    to.flush().await?;
    Ok(())
}

/// The remote stderr to ours. Write errors are ignored but the stream is still drained, so a
/// closed stderr never stalls the channel.
async fn copy_err(
    mut from: impl AsyncRead + Unpin,
    to: &mut (impl AsyncWrite + Unpin),
) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if open && to.write_all(&buf[..n]).await.is_err() {
            open = false;
        }
    }
    if open {
        let _ = to.flush().await;
    }
    Ok(())
}

/// Stream our stdin into the channel as it comes, then send EOF.
async fn forward_stdin(
    mut from: Box<dyn AsyncRead + Send + Unpin>,
    mut to: Box<dyn AsyncWrite + Send + Unpin>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}
