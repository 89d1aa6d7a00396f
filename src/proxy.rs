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

    // stdin → TLS: read on this task when stdin is a pipe or socket (the ProxyCommand case),
    // else on a thread.
    let mut stdin = Stdin::open();
    let upstream = tokio::spawn(async move {
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Err(e) = wr.write_all(&buf[..n]).await {
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

/// stdin as an async reader. Pipes and sockets are read directly on the TLS task (non-blocking,
/// through the reactor): no thread hand-off and no extra copy per chunk. Terminals and files,
/// whose descriptors may be shared with the shell, are read by a blocking thread instead.
enum Stdin {
    Direct(tokio::io::unix::AsyncFd<RawStdin>),
    Thread(mpsc::Receiver<Vec<u8>>),
}

struct RawStdin;

impl std::os::fd::AsRawFd for RawStdin {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        libc::STDIN_FILENO
    }
}

impl Stdin {
    fn open() -> Stdin {
        if let Some(fd) = direct_stdin() {
            return Stdin::Direct(fd);
        }
        let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
        std::thread::spawn(move || stdin_reader(tx));
        Stdin::Thread(rx)
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stdin::Direct(fd) => loop {
                let mut guard = fd.readable().await?;
                let r = guard.try_io(|_| {
                    // SAFETY: reading into a valid, exclusively borrowed buffer of buf.len() bytes.
                    let n = unsafe {
                        libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                });
                match r {
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Ok(result) => return result,
                    Err(_would_block) => continue,
                }
            },
            Stdin::Thread(rx) => match rx.recv().await {
                Some(chunk) => {
                    // The thread reads at most BUF bytes, the size of `buf`.
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    Ok(n)
                }
                None => Ok(0),
            },
        }
    }
}

/// stdin registered with the reactor if it is a pipe or a socket. Setting O_NONBLOCK changes
/// only our end's open file description (the other end belongs to the ssh client).
fn direct_stdin() -> Option<tokio::io::unix::AsyncFd<RawStdin>> {
    // SAFETY: fstat and fcntl on fd 0 with a valid out-pointer; no memory is shared.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(libc::STDIN_FILENO, &mut st) != 0 {
            return None;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFIFO && kind != libc::S_IFSOCK {
            return None;
        }
        let flags = libc::fcntl(libc::STDIN_FILENO, libc::F_GETFL);
        if flags < 0 || libc::fcntl(libc::STDIN_FILENO, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return None;
        }
    }
    // SAFETY: fd 0 stays open, on the same file description, for the life of the process, and
    // RawStdin always returns it.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(RawStdin, tokio::io::Interest::READABLE)
    }
    .ok()
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
