//! `vtun proxy HOST`: a ProxyCommand that relays stdin/stdout over verified TLS.
//!
//! stdin and stdout are served by two plain threads doing blocking I/O with large buffers: they
//! may be pipes, sockets, files or a terminal, and blocking reads work on all of them without
//! changing the flags of descriptors shared with the parent. The TLS stream lives on a
//! single-threaded runtime. The important property is the shutdown order: stdin EOF half-closes
//! the TLS stream (close_notify, then TCP FIN) and keeps reading; the server ending the stream
//! flushes stdout and exits at once, even if stdin is still open.

use std::io::{Read, Write};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::error::Failure;
use crate::settings::Settings;
use crate::tls::Dialer;

/// Size of each read from stdin and from the TLS stream.
const BUF: usize = 256 * 1024;

pub fn run(settings: &Settings, host_arg: &str) -> Result<u8> {
    let host = settings.host(host_arg)?;
    let port = settings.port_for(&host);
    let dialer = Dialer::new(&settings.tls)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(relay(&dialer, &host.name, port))
}

async fn relay(dialer: &Dialer, name: &str, port: u16) -> Result<u8> {
    let tls = dialer.dial(name, port).await?;
    tracing::debug!(name, port, "connected");
    let (mut rd, mut wr) = tokio::io::split(tls);

    // stdin → TLS
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(4);
    std::thread::spawn(move || stdin_reader(in_tx));
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = in_rx.recv().await {
            if let Err(e) = wr.write_all(&chunk).await {
                tracing::debug!("upstream write failed: {e}");
                return;
            }
        }
        // stdin ended: half-close, keep the read side open for the rest of the reply.
        if let Err(e) = wr.shutdown().await {
            tracing::debug!("half-close failed: {e}");
        }
        // Keep `wr` alive until the process ends: dropping the write half is harmless, but
        // holding it makes the intent obvious.
        std::future::pending::<()>().await;
    });

    // TLS → stdout
    let (out_tx, out_rx) = mpsc::channel::<Vec<u8>>(4);
    let writer = std::thread::spawn(move || stdout_writer(out_rx));
    let mut outcome = Ok(0);
    // One reused read buffer; each chunk is copied out at its real size (a TLS record is at
    // most 16 KiB, so zeroing a fresh 256 KiB buffer per read would cost more than the copy).
    let mut buf = vec![0u8; BUF];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                if out_tx.send(buf[..n].to_vec()).await.is_err() {
                    break; // stdout is gone (the ssh client exited)
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::debug!("server closed without close_notify");
                break;
            }
            Err(e) => {
                outcome = Err(Failure::connection(format!(
                    "connection to {name}:{port} lost: {e}"
                )));
                break;
            }
        }
    }
    drop(out_tx);
    upstream.abort();
    // Flush everything already read before exiting; the stdin thread is left blocked in read()
    // and ends with the process.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    outcome
}

fn stdin_reader(tx: mpsc::Sender<Vec<u8>>) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = vec![0u8; BUF];
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tx.blocking_send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::debug!("stdin read failed: {e}");
                return;
            }
        }
    }
}

fn stdout_writer(mut rx: mpsc::Receiver<Vec<u8>>) {
    // Raw fd 1, unbuffered: std's stdout is line-buffered and would scan every chunk for '\n'.
    // ManuallyDrop: the descriptor belongs to the process, not to this File.
    use std::os::fd::FromRawFd;
    // SAFETY: fd 1 is open for the life of the process and nothing else closes it.
    let mut stdout = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(1) });
    while let Some(chunk) = rx.blocking_recv() {
        if stdout.write_all(&chunk).is_err() {
            return;
        }
        // Flush per chunk: interactive sessions need each byte promptly, and with 256 KiB
        // reads bulk transfers still write in large pieces.
        if stdout.flush().is_err() {
            return;
        }
    }
}
