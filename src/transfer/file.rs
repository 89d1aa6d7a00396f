//! One file at a time: moved atomically, large ones split into ranges over several SFTP
//! streams. `tree` builds recursive copies on it and `place` decides, by scp's rules, where each
//! source lands; nothing here looks at either.
//!
//! Atomicity: a file is written under a temporary name in its destination directory and renamed
//! over the final name only when complete, so a cut copy never leaves a truncated file there and
//! never destroys the previous version. Without `--resume` the temporary name is random and
//! removed on failure (names come from `crate::fs::temp`); with it the name is fixed (`.NAME.vtun.part`) and kept, and a later
//! `--resume` run continues from its size. A resumable copy is written as one ordered range (see
//! `pipe`), because parallel ranges would leave holes that a size cannot describe.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, Context, Result};
use futures::future::try_join_all;

use super::fs::{Fs, Reader, Writer};
use super::pipe::{copy_range, Budget};
use crate::fs::temp::{self, Guard};
use crate::fs::{Kind, Meta};
use crate::progress::Progress;
use crate::sftp;
use crate::sftp::proto;

/// Files at least this large are split into parallel ranges.
const SPLIT_MIN: u64 = 8 * 1024 * 1024;
/// No range is smaller than this.
const RANGE_MIN: u64 = 4 * 1024 * 1024;
/// Requests in flight per range.
const DEPTH: usize = 32;
/// Chunks buffered or in flight across the whole transfer (256 × 256 KiB = 64 MiB).
const MAX_CHUNKS: usize = 256;

/// How a transfer behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Copy directories recursively.
    pub recursive: bool,
    /// Keep access and modification times (modes are always kept).
    pub preserve: bool,
    /// Keep and continue partial files.
    pub resume: bool,
    /// SFTP streams per host; also ranges per large file.
    pub parallel: usize,
}

/// A configured transfer: options, memory budget and progress.
pub struct Engine {
    pub opts: Options,
    pub(crate) budget: Budget,
    pub progress: Progress,
}

impl Engine {
    pub fn new(opts: Options, progress: Progress) -> Engine {
        Engine {
            budget: Budget::new(MAX_CHUNKS, DEPTH, opts.resume),
            opts,
            progress,
        }
    }

    /// Copy one regular file atomically to `dst_path` (replacing what is there), using SFTP
    /// stream `slot` (and the following ones for parallel ranges).
    pub async fn copy_file(
        &self,
        src: &Fs,
        src_path: &Path,
        meta: &Meta,
        dst: &Fs,
        dst_path: &Path,
        slot: usize,
    ) -> Result<()> {
        let hold = match (self.opts.resume, dst.is_remote()) {
            (true, _) => temp::Hold::Resume,
            // Over SFTP nobody can hold a lock on it.
            (false, true) => temp::Hold::Age,
            (false, false) => temp::Hold::Lock,
        };
        let temp = temp::beside(dst_path, hold);
        let mut start = 0;
        if self.opts.resume {
            if let Ok(Some(m)) = dst.lstat(&temp).await {
                if m.kind == Kind::File && m.size <= meta.size {
                    start = m.size;
                    tracing::info!(file = %dst.show(dst_path), offset = start, "resuming");
                }
            }
        }
        let moved = AtomicU64::new(0);
        let on_bytes = |n: u64| {
            moved.fetch_add(n, Ordering::Relaxed);
            self.progress.add_bytes(n);
        };
        let guard = (!self.opts.resume).then(|| abandoned(dst, &temp));
        let result = self
            .fill(
                src, src_path, meta, dst, dst_path, &temp, start, slot, &on_bytes,
            )
            .await;
        if let Some(g) = guard {
            g.disarm();
        }
        match result {
            Ok(()) => {
                self.progress.file_done();
                tracing::info!(from = %src.show(src_path), to = %dst.show(dst_path), bytes = meta.size, "copied");
                Ok(())
            }
            Err(e) => {
                self.progress.sub_bytes(moved.load(Ordering::Relaxed));
                let e = self.diagnose(e, dst, dst_path, meta.size - start).await;
                if !self.opts.resume {
                    if let Err(rm) = dst.remove(&temp).await {
                        if !matches!(dst.lstat(&temp).await, Ok(None)) {
                            tracing::warn!("left {} behind: {rm:#}", dst.show(&temp));
                        }
                    }
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        src: &Fs,
        src_path: &Path,
        meta: &Meta,
        dst: &Fs,
        dst_path: &Path,
        temp: &Path,
        start: u64,
        slot: usize,
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<()> {
        let chunk = src.chunk().await?.min(dst.chunk().await?);
        // Open both ends at once: one round trip, not two, per small file.
        let (w, r) = futures::join!(
            dst.open_write((temp, dst_path), slot, true, start > 0),
            src.open_read(src_path, slot)
        );
        let (first, reader0) = pair(w, r).await?;
        on_bytes(start);
        if let Some(copied) = server_side(&reader0, &first, start, meta.size, on_bytes).await {
            let times = self.opts.preserve.then_some((meta.atime, meta.mtime));
            let (closed, finished) =
                futures::join!(reader0.close(), first.finish(Some(meta.mode), times));
            copied.with_context(|| dst.show(dst_path))?;
            finished.with_context(|| dst.show(dst_path))?;
            closed.with_context(|| src.show(src_path))?;
            return dst.rename(temp, dst_path).await;
        }
        let ranges = split(
            start,
            meta.size,
            if self.opts.resume {
                1
            } else {
                self.opts.parallel
            },
        );
        let labels = (src.show(src_path), dst.show(dst_path));
        let (from0, to0) = ranges[0];
        let more = ranges[1..].iter().enumerate().map(|(i, &(from, to))| {
            let labels = &labels;
            let slot = slot + i + 1;
            async move {
                let (w, r) = futures::join!(
                    dst.open_write((temp, dst_path), slot, false, false),
                    src.open_read(src_path, slot)
                );
                let (w, reader) = pair(w, r).await?;
                let res = self
                    .range((&reader, &w), (from, to), chunk, labels, on_bytes)
                    .await;
                let (closed, finished) = futures::join!(reader.close(), w.finish(None, None));
                res.and(closed).and(finished)
            }
        });
        let filled = futures::future::try_join(
            self.range((&reader0, &first), (from0, to0), chunk, &labels, on_bytes),
            try_join_all(more),
        )
        .await;
        let times = self.opts.preserve.then_some((meta.atime, meta.mtime));
        let (closed, finished) =
            futures::join!(reader0.close(), first.finish(Some(meta.mode), times));
        filled?;
        finished.with_context(|| dst.show(dst_path))?;
        closed.with_context(|| src.show(src_path))?;
        dst.rename(temp, dst_path).await
    }

    async fn range(
        &self,
        (reader, writer): (&Reader, &Writer),
        span: (u64, u64),
        chunk: u32,
        labels: &(String, String),
        on_bytes: &(dyn Fn(u64) + Sync),
    ) -> Result<()> {
        let t = std::time::Instant::now();
        let r = copy_range(reader, writer, span, chunk, &self.budget, on_bytes, labels).await;
        tracing::debug!(
            from = span.0,
            to = span.1,
            secs = t.elapsed().as_secs_f64(),
            "range done"
        );
        r
    }

    /// Turn a bare remote "failure" during a write into "no space left" when the far side
    /// reports too little free space for what remained.
    async fn diagnose(
        &self,
        e: anyhow::Error,
        dst: &Fs,
        dst_path: &Path,
        remaining: u64,
    ) -> anyhow::Error {
        if !dst.is_remote() || sftp::status_of(&e) != Some(proto::FX_FAILURE) {
            return e;
        }
        let dir = dst_path.parent().unwrap_or(Path::new("."));
        match dst.free_space(dir).await {
            Some(free) if free < remaining => anyhow!(
                "{}: no space left on device ({free} bytes free); the partial file was {}",
                dst.show(dst_path),
                if self.opts.resume {
                    "kept for --resume"
                } else {
                    "removed"
                }
            ),
            _ => e,
        }
    }
}

/// Removes a temporary file when its copy is abandoned mid-way (the future dropped, as on
/// Ctrl-C); finished or failed copies disarm it and clean up themselves.
fn abandoned(fs: &Fs, path: &Path) -> Guard<impl FnOnce()> {
    let (fs, path) = (fs.clone(), path.to_path_buf());
    Guard::new(move || match fs {
        // Beneath a root too: the temporary name was made there, and removing by name can only
        // remove that name.
        Fs::Local | Fs::Beneath(_) => {
            let _ = std::fs::remove_file(&path);
        }
        Fs::Remote(r) => {
            // Best effort: runs only if the runtime lives on long enough.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Ok(c) = r.client(0).await {
                        let _ = c.remove(&path).await;
                    }
                });
            }
        }
    })
}

/// Bytes per server-side copy request (one request per step, so progress moves).
const SERVER_COPY_STEP: u64 = 64 * 1024 * 1024;

/// Copy on the server when both handles live in one session that offers `copy-data` (VM→VM on
/// the same VM): the data never crosses the link. `None` when that is not possible.
async fn server_side(
    reader: &Reader,
    writer: &Writer,
    start: u64,
    end: u64,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Option<Result<()>> {
    let (Reader::Remote(a, from), Writer::Remote(b, to)) = (reader, writer) else {
        return None;
    };
    if !a.same_session(b) || !a.has("copy-data") {
        return None;
    }
    let mut off = start;
    while off < end {
        let len = (end - off).min(SERVER_COPY_STEP);
        if let Err(e) = a.copy_data((from, off), len, (to, off)).await {
            return Some(Err(e));
        }
        on_bytes(len);
        off += len;
    }
    Some(Ok(()))
}

/// Both ends opened, or neither left open.
async fn pair(w: Result<Writer>, r: Result<Reader>) -> Result<(Writer, Reader)> {
    match (w, r) {
        (Ok(w), Ok(r)) => Ok((w, r)),
        (Ok(w), Err(e)) => {
            let _ = w.finish(None, None).await;
            Err(e)
        }
        (Err(e), Ok(r)) => {
            let _ = r.close().await;
            Err(e)
        }
        (Err(e), Err(_)) => Err(e),
    }
}

/// Split `start..end` into up to `n` ranges of at least `RANGE_MIN` (one if small).
pub fn split(start: u64, end: u64, n: usize) -> Vec<(u64, u64)> {
    let len = end.saturating_sub(start);
    let n = if len < SPLIT_MIN {
        1
    } else {
        (n.max(1) as u64).min(len / RANGE_MIN).max(1)
    };
    // n ≤ len / RANGE_MIN, so every range is non-empty.
    let step = len.div_ceil(n);
    (0..n)
        .map(|i| (start + i * step, (start + (i + 1) * step).min(end)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_file_exactly() {
        assert_eq!(split(0, 0, 4), vec![(0, 0)]);
        assert_eq!(split(0, 100, 4), vec![(0, 100)]);
        let r = split(0, 24 << 20, 4);
        assert_eq!(r.len(), 4);
        assert_eq!(r[0].0, 0);
        assert_eq!(r[3].1, 24 << 20);
        for w in r.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        assert_eq!(split(0, 9 << 20, 8).len(), 2);
        assert_eq!(split(5, 9 << 20, 1), vec![(5, 9 << 20)]);
    }
}
