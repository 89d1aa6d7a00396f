//! Relaying bytes between the client's TLS stream and the backend, both directions, with correct
//! half-close and the testing aids (added one-way delay, idle cut).
//!
//! Delay is a queue, not a rate limit: each chunk is stamped when read and written no earlier
//! than `delay` later, so a bulk transfer keeps its throughput and only its round trips grow.
//! The queue is bounded so a slow reader still pushes back on a fast writer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction when delaying (at most 64 MiB).
const QUEUE: usize = 1024;
/// Largest single write when delaying.
const BATCH: usize = 256 * 1024;

/// Last time any byte moved, in milliseconds since `start`, and how many bytes were read in
/// each direction so far (kept up to date so a connection that ends in an error still reports).
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    pub up: AtomicU64,
    pub down: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        })
    }

    /// Bytes read so far in one direction.
    pub fn counter(&self, upstream: bool) -> &AtomicU64 {
        if upstream {
            &self.up
        } else {
            &self.down
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Copy `r` to `w` until EOF, then shut down `w`'s write side. Returns the bytes moved.
pub async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    delay: Duration,
    activity: Arc<Activity>,
    upstream: bool,
) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin,
{
    let mut total = 0u64;
    if delay.is_zero() {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e),
            };
            if n == 0 {
                break;
            }
            activity.touch();
            activity
                .counter(upstream)
                .fetch_add(n as u64, Ordering::Relaxed);
            w.write_all(&buf[..n]).await?;
            // A TLS writer accepts bytes it could not send yet (the socket was full) and keeps
            // them until the next write or flush; with nothing more to read that may be never,
            // and the peer waits for bytes already relayed. Push them out now.
            w.flush().await?;
            total += n as u64;
        }
    } else {
        let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
        let reader_activity = activity.clone();
        let reader = tokio::spawn(async move {
            loop {
                // Not zeroed: read_buf only exposes what the read filled.
                let mut buf = Vec::with_capacity(CHUNK);
                let n = match r.read_buf(&mut buf).await {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    return Ok(());
                }
                reader_activity.touch();
                reader_activity
                    .counter(upstream)
                    .fetch_add(n as u64, Ordering::Relaxed);
                if tx.send((Instant::now(), buf)).await.is_err() {
                    return Ok(());
                }
            }
        });
        // Chunks that are due together go out in one write: TLS reads often return a record
        // at a time, and one write (one TLS record train, one syscall) per 16 KiB would cost
        // the bed more CPU than the bytes themselves.
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH);
        let mut held: Option<(Instant, Vec<u8>)> = None;
        loop {
            let (stamp, chunk) = match held.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => break,
                },
            };
            tokio::time::sleep_until((stamp + delay).into()).await;
            batch.clear();
            batch.extend_from_slice(&chunk);
            let now = Instant::now();
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok((t, c)) if t + delay <= now => batch.extend_from_slice(&c),
                    Ok(c) => {
                        held = Some(c);
                        break;
                    }
                    Err(_) => break,
                }
            }
            w.write_all(&batch).await?;
            w.flush().await?;
            total += batch.len() as u64;
        }
        reader
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    w.flush().await?;
    w.shutdown().await?;
    Ok(total)
}
