//! Relaying bytes between the client's TLS stream and the backend, both directions, with correct
//! half-close and the testing aids (added one-way delay, idle cut).
//!
//! Delay is a queue, not a rate limit: each chunk is stamped when read and written no earlier
//! than `delay` later, so a bulk transfer keeps its throughput and only its round trips grow.
//! The queue is bounded so a slow reader still pushes back on a fast writer.

use std::io::IoSlice;
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
        // Written buffers come back to the reader: a fresh 64 KiB allocation per chunk made
        // the allocator hand memory back and fault it in again, ~10 % of the bed's CPU.
        let (spent_tx, mut spent_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let reader_activity = activity.clone();
        let reader = tokio::spawn(async move {
            loop {
                // Not zeroed: read_buf only exposes what the read filled.
                let mut buf = spent_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
                buf.clear();
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
        // Chunks that are due together go out in one vectored write: TLS reads often return a
        // record at a time, and one write (one TLS record train, one syscall) per 16 KiB would
        // cost the bed more CPU than the bytes themselves.
        let mut batch: Vec<Vec<u8>> = Vec::new();
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
            let mut size = chunk.len();
            batch.push(chunk);
            let now = Instant::now();
            while size < BATCH {
                match rx.try_recv() {
                    Ok((t, c)) if t + delay <= now => {
                        size += c.len();
                        batch.push(c);
                    }
                    Ok(c) => {
                        held = Some(c);
                        break;
                    }
                    Err(_) => break,
                }
            }
            write_all_vectored(&mut w, &batch).await?;
            w.flush().await?;
            total += size as u64;
            for b in batch.drain(..) {
                // The reader may be gone (EOF); the buffer is then simply freed.
                let _ = spent_tx.send(b);
            }
        }
        reader
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
    }
    w.flush().await?;
    w.shutdown().await?;
    Ok(total)
}

/// Write every byte of `bufs`, in as few vectored writes as the writer allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &[Vec<u8>],
) -> std::io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

// The expect()s below only see in-memory pipes and tasks of the test itself: a failure is
// the test failing, not input from a peer or the disk.
#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bytes that differ at every offset within a chunk, so a reordered, dropped
    /// or repeated piece shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn relay(delay_ms: u64, data: Vec<u8>) -> (Vec<u8>, u64, Duration) {
        let (mut src, src_far) = tokio::io::duplex(256 * 1024);
        let (dst_far, mut dst) = tokio::io::duplex(256 * 1024);
        let started = Instant::now();
        let pump = tokio::spawn(pipe(
            src_far,
            dst_far,
            Duration::from_millis(delay_ms),
            Activity::new(),
            true,
        ));
        let writer = tokio::spawn(async move {
            // Odd-sized writes, so chunk boundaries fall everywhere, in bursts a delay apart,
            // so later bursts are read into buffers the writer has handed back.
            for burst in data.chunks(1024 * 1024) {
                for piece in burst.chunks(12_345) {
                    src.write_all(piece).await?;
                }
                tokio::time::sleep(Duration::from_millis(2 * delay_ms)).await;
            }
            src.shutdown().await
        });
        let mut out = Vec::new();
        // Reading to the end also proves the write side was shut down after the last byte.
        dst.read_to_end(&mut out).await.expect("read relayed bytes");
        let elapsed = started.elapsed();
        writer.await.expect("writer task").expect("write source");
        let moved = pump.await.expect("pump task").expect("pipe");
        (out, moved, elapsed)
    }

    #[tokio::test]
    async fn delayed_relay_keeps_every_byte_in_order_and_delays() {
        let data = pattern(6 * 1024 * 1024 + 4321);
        let (out, moved, elapsed) = relay(15, data.clone()).await;
        assert_eq!(moved, data.len() as u64);
        assert!(out == data, "relayed bytes differ from the source");
        assert!(
            elapsed >= Duration::from_millis(15),
            "no delay: {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn direct_relay_keeps_every_byte_in_order() {
        let data = pattern(3 * 1024 * 1024 + 17);
        let (out, moved, _) = relay(0, data.clone()).await;
        assert_eq!(moved, data.len() as u64);
        assert!(out == data, "relayed bytes differ from the source");
    }
}
