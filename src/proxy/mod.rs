//! `vtun proxy HOST`: a ProxyCommand that relays stdin/stdout over verified TLS.
//!
//! Both directions run on one task of a single-threaded runtime, sharing the TLS stream through
//! a `RefCell` (each borrow lasts one poll, never across an await). Plaintext from the server is
//! written to stdout straight out of rustls' buffer, and consumed only once written, so a slow
//! reader on stdout pushes back on the server. The important property is the shutdown order:
//! stdin EOF half-closes the TLS stream (close_notify, then TCP FIN) and keeps reading; the
//! server ending the stream flushes stdout and exits at once, even if stdin is still open.

mod resume;
mod stdio;

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Poll};

use anyhow::Result;
use tokio::io::{AsyncBufRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use self::stdio::{Stdin, Stdout};
use crate::error::Failure;
use crate::settings::Settings;
use crate::tls::Dialer;
use crate::vers::VmApi;

/// Relay stdin/stdout to `host_arg`. Runs on a current-thread runtime (the command layer builds
/// it): both directions share the TLS stream on one task.
pub async fn run(settings: &Settings, host_arg: &str) -> Result<u8> {
    let host = settings.host(host_arg)?;
    let port = settings.port_for(&host);
    let dialer = Dialer::new(&settings.tls)?;
    match VmApi::for_host(settings, &host) {
        // With a Vers API key: a VM that is not running is looked up, and resumed (resume.rs).
        Some(api) => resume::relay(settings, &dialer, &host, port, &api).await,
        None => relay(&dialer, &host.name, port).await,
    }
}

type Tls = TlsStream<BufReader<TcpStream>>;

async fn dial(dialer: &Dialer, name: &str, port: u16) -> Result<Tls, crate::tls::DialError> {
    dialer
        .dial_over(name, port, |tcp| {
            BufReader::with_capacity(TCP_READ_BUF, tcp)
        })
        .await
}

/// Size of each read from the TCP socket. rustls asks its reader for about 4 KiB at a time, so
/// without a buffer under it every 4 KiB from the server costs a recv(). Measured on downloads
/// (the proxy_throughput bench with VTUN_BENCH_DIRECTION=down): 64 KiB took a quarter off the
/// proxy's CPU time; 128 KiB saved less.
const TCP_READ_BUF: usize = 64 * 1024;

async fn relay(dialer: &Dialer, name: &str, port: u16) -> Result<u8> {
    let tls = RefCell::new(dial(dialer, name, port).await?);
    tracing::debug!(name, port, "connected");
    let (stdin, stdout) = stdio::open();
    pump(&tls, stdin, stdout, name, port).await
}

/// Both directions until the server ends the stream, then the exit status.
async fn pump(
    tls: &RefCell<Tls>,
    mut stdin: Stdin,
    mut stdout: Stdout,
    name: &str,
    port: u16,
) -> Result<u8> {
    let outcome = tokio::select! {
        biased;
        r = downstream(tls, &mut stdout) => r,
        never = upstream(tls, &mut stdin) => match never {},
    };
    // Whatever was read from the server is written before exiting; a stdin thread, if any, is
    // left blocked in read() and ends with the process.
    stdout.finish().await;
    match outcome {
        Ok(()) => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::debug!("server closed without close_notify");
            Ok(0)
        }
        Err(e) => Err(Failure::connection(format!(
            "connection to {name}:{port} lost: {e}"
        ))),
    }
}

/// TLS → stdout until the server ends the stream or stdout goes away (the ssh client exited).
async fn downstream(tls: &RefCell<Tls>, stdout: &mut Stdout) -> io::Result<()> {
    loop {
        let more = match stdout {
            Stdout::Direct(out) => {
                poll_fn(|cx| {
                    // Only this poll borrows the stream (see the module docs).
                    let mut tls = tls.borrow_mut();
                    let mut tls = Pin::new(&mut *tls);
                    let data = ready!(tls.as_mut().poll_fill_buf(cx))?;
                    if data.is_empty() {
                        return Poll::Ready(Ok::<_, io::Error>(false));
                    }
                    match ready!(out.poll_write(cx, data)) {
                        Ok(n) => {
                            tls.consume(n);
                            Poll::Ready(Ok(true))
                        }
                        Err(e) => {
                            tracing::debug!("stdout write failed: {e}");
                            Poll::Ready(Ok(false))
                        }
                    }
                })
                .await?
            }
            Stdout::Thread { tx, .. } => {
                let chunk = poll_fn(|cx| {
                    let mut tls = tls.borrow_mut();
                    let mut tls = Pin::new(&mut *tls);
                    let data = ready!(tls.as_mut().poll_fill_buf(cx))?;
                    let chunk = data.to_vec();
                    tls.consume(chunk.len());
                    Poll::Ready(Ok::<_, io::Error>(chunk))
                })
                .await?;
                // A closed channel: the writer thread hit an error on stdout.
                !chunk.is_empty() && tx.send(chunk).await.is_ok()
            }
        };
        if !more {
            return Ok(());
        }
    }
}

/// stdin → TLS; at stdin EOF, half-close and keep the read side open for the rest of the
/// reply. Never returns: the relay ends when the server ends the stream.
async fn upstream(tls: &RefCell<Tls>, stdin: &mut Stdin) -> Infallible {
    let mut buf = vec![0u8; stdio::READ_BUF];
    loop {
        let n = match stdin.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("stdin read failed: {e}");
                break;
            }
        };
        if let Err(e) = send(tls, &buf[..n]).await {
            tracing::debug!("upstream write failed: {e}");
            return std::future::pending().await;
        }
    }
    let shutdown = poll_fn(|cx| Pin::new(&mut *tls.borrow_mut()).poll_shutdown(cx)).await;
    if let Err(e) = shutdown {
        tracing::debug!("half-close failed: {e}");
    }
    std::future::pending().await
}

/// Encrypt and write all of `data`, then flush: nothing may wait in rustls for more input,
/// since more input may be a keystroke away.
async fn send(tls: &RefCell<Tls>, mut data: &[u8]) -> io::Result<()> {
    poll_fn(|cx| {
        let mut tls = tls.borrow_mut();
        let mut tls = Pin::new(&mut *tls);
        while !data.is_empty() {
            match ready!(tls.as_mut().poll_write(cx, data))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => data = &data[n..],
            }
        }
        tls.poll_flush(cx)
    })
    .await
}
