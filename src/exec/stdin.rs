//! The process's stdin as an async stream, read on a plain thread: a blocked terminal read must
//! never hold up the runtime or the exit (the runtime is shut down without waiting for it).
//!
//! The thread starts on the first read, not before: until the channel is open, the terminal
//! belongs to passphrase prompts, and a reader started early would swallow what the user types.

use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// Chunks read ahead of the channel (64 KiB each).
const QUEUE: usize = 8;

#[derive(Default)]
pub struct ThreadStdin {
    rx: Option<mpsc::Receiver<Vec<u8>>>,
    pending: Vec<u8>,
    at: usize,
}

fn start() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>(QUEUE);
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
    rx
}

impl AsyncRead for ThreadStdin {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at == this.pending.len() {
            let rx = this.rx.get_or_insert_with(start);
            match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                // The thread hung up: EOF (or a read error, which ends stdin as ssh does).
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Ready(Some(chunk)) => {
                    this.pending = chunk;
                    this.at = 0;
                }
            }
        }
        let n = (this.pending.len() - this.at).min(buf.remaining());
        buf.put_slice(&this.pending[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}
