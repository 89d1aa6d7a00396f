//! Moving one byte range from a [`Reader`] to a [`Writer`] with many requests in flight.
//!
//! Reads complete in offset order (a `FuturesOrdered`), and each write is started as soon as its
//! read completes, so writes also go out in offset order. A remote server executes them in
//! that order, which keeps the destination a contiguous prefix if the copy is cut — the property
//! `--resume` needs. Local writes run on a thread pool and could finish out of order, so when
//! order matters only one is in flight per range (a memory copy into the page cache: cheap).
//!
//! Memory is bounded across every concurrent range by a shared semaphore of chunk permits.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::Semaphore;

use super::fs::{Reader, Writer};

/// Shared limits for everything in flight in one transfer.
pub struct Budget {
    /// One permit per chunk buffered or in flight.
    pub chunks: Arc<Semaphore>,
    /// Requests in flight per range.
    pub depth: usize,
    /// Writes must land in offset order (for `--resume`).
    pub ordered: bool,
}

impl Budget {
    pub fn new(max_chunks: usize, depth: usize, ordered: bool) -> Budget {
        Budget {
            chunks: Arc::new(Semaphore::new(max_chunks.max(1))),
            depth: depth.max(1),
            ordered,
        }
    }
}

/// Copy bytes `start..end` at the same offsets, reporting each chunk written to `on_bytes`;
/// fails if the source ends early.
pub async fn copy_range(
    src: &Reader,
    dst: &Writer,
    (start, end): (u64, u64),
    chunk: u32,
    budget: &Budget,
    on_bytes: &(dyn Fn(u64) + Sync),
    (src_name, dst_name): &(String, String),
) -> Result<()> {
    let max_writes = if dst.is_local() && budget.ordered {
        1
    } else {
        budget.depth
    };
    let mut reads = FuturesOrdered::new();
    let mut writes = FuturesOrdered::new();
    let mut next = start;
    loop {
        while next < end && reads.len() + writes.len() < budget.depth {
            let permit = match budget.chunks.clone().try_acquire_owned() {
                Ok(p) => p,
                // Holding nothing, waiting cannot deadlock; holding something, make progress.
                Err(_) if reads.is_empty() && writes.is_empty() => {
                    budget.chunks.clone().acquire_owned().await?
                }
                Err(_) => break,
            };
            let len = (end - next).min(chunk as u64) as u32;
            let off = next;
            let fut = src.read_at(off, len)?;
            reads.push_back(async move { (off, len, fut.await, permit) });
            next += len as u64;
        }
        if reads.is_empty() && writes.is_empty() {
            return Ok(());
        }
        tokio::select! {
            Some((off, len, data, permit)) = reads.next(), if writes.len() < max_writes => {
                let data = data.with_context(|| src_name.clone())?;
                if data.len() != len as usize {
                    bail!("{src_name}: ended at {} bytes: it changed during the copy", off + data.len() as u64);
                }
                let w = dst.write_at(off, data)?;
                writes.push_back(async move {
                    let r = w.await;
                    drop(permit);
                    r.map(|_| len)
                });
            }
            Some(done) = writes.next(), if !writes.is_empty() => {
                on_bytes(done.with_context(|| dst_name.clone())? as u64);
            }
        }
    }
}
