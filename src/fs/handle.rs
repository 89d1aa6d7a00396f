//! Open local files, read and written by offset so parallel ranges can share one file. cp's
//! transfer handles wrap these for the local side; sync's sender reads with [`read_chunk_at`].
//!
//! The one non-obvious thing: each chunk is one pread() straight into fresh capacity, never a
//! zeroed buffer or `read_to_end` (zeroing costs about what the copy does, and `read_to_end`
//! splits a chunk into reads of 8, 16, 32... KiB).

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::{io_text, FileTime};

/// A local source file, shared by the ranges that read it.
#[derive(Clone)]
pub struct LocalReader(Arc<std::fs::File>);

impl LocalReader {
    pub fn new(file: std::fs::File) -> LocalReader {
        LocalReader(Arc::new(file))
    }

    /// Read `len` bytes at `offset` on the blocking pool (queued before this returns); fewer
    /// only at end of file.
    pub fn read_at(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Bytes>> {
        let f = self.0.clone();
        let job = tokio::task::spawn_blocking(move || {
            read_chunk_at(&f, offset, len as usize)
                .map(Bytes::from)
                .map_err(|e| anyhow!("read: {}", io_text(&e)))
        });
        async move { job.await? }.boxed()
    }
}

/// Up to `len` bytes of `f` at `offset`, fewer only at end of file, one pread() per chunk of a
/// regular file.
pub fn read_chunk_at(f: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        match pread_append(f, &mut buf, at) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// pread() into the spare capacity of `buf` at `offset`, growing its length by what was read.
fn pread_append(f: &std::fs::File, buf: &mut Vec<u8>, offset: u64) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: the kernel writes at most spare.len() bytes into memory we own exclusively; only
    // the bytes it reports written are then counted as initialized.
    let n = unsafe {
        libc::pread(
            f.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            offset as libc::off_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: n <= spare.len() bytes past the old length were just initialized by pread.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// A local destination file and the gate that lets one write into it at a time.
///
/// Buffered writes to one file serialize on its inode lock anyway; a dozen blocking-pool
/// threads queued on that lock spin and switch for nothing (on a download with 8 ranges this
/// was ~3 % of the client's CPU). Waiting here instead costs nothing.
#[derive(Clone)]
pub struct LocalWriter(Arc<Gated>);

struct Gated {
    file: std::fs::File,
    gate: Arc<tokio::sync::Semaphore>,
}

impl LocalWriter {
    pub fn new(file: std::fs::File) -> LocalWriter {
        LocalWriter(Arc::new(Gated {
            file,
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
        }))
    }

    /// Write `data` at `offset`; starts when polled, after the file's earlier writes.
    pub fn write_at(&self, offset: u64, data: Bytes) -> BoxFuture<'static, Result<()>> {
        let f = self.0.clone();
        async move {
            let _turn = f.gate.clone().acquire_owned().await?;
            tokio::task::spawn_blocking(move || {
                f.file
                    .write_all_at(&data, offset)
                    .map_err(|e| anyhow!("write: {}", io_text(&e)))
            })
            .await?
        }
        .boxed()
    }

    /// Set mode and (atime, mtime) on the open file; the file closes with its last clone.
    pub async fn finish(
        self,
        mode: Option<u32>,
        times: Option<(FileTime, FileTime)>,
    ) -> Result<()> {
        tokio::task::spawn_blocking(move || {
            let f = &self.0.file;
            if let Some(m) = mode {
                f.set_permissions(std::fs::Permissions::from_mode(m))?;
            }
            if let Some((a, m)) = times {
                f.set_times(file_times(a, m))?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await?
        .map_err(|e| anyhow!("{}", io_text(&e)))
    }
}

/// (atime, mtime) as std's `FileTimes`, before the epoch as well as after.
pub fn file_times(atime: FileTime, mtime: FileTime) -> std::fs::FileTimes {
    let t = |f: FileTime| {
        let whole = std::time::Duration::from_secs(f.secs().unsigned_abs());
        let nanos = std::time::Duration::from_nanos(f.nsec() as u64);
        if f.secs() >= 0 {
            std::time::UNIX_EPOCH + whole + nanos
        } else {
            std::time::UNIX_EPOCH - whole + nanos
        }
    };
    std::fs::FileTimes::new()
        .set_accessed(t(atime))
        .set_modified(t(mtime))
}

// Tests only: unwrap on local temp files.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunks_read_whole_and_short_only_at_the_end() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        assert_eq!(
            read_chunk_at(&f, 1000, 262_144).unwrap(),
            data[1000..263_144]
        );
        assert_eq!(
            read_chunk_at(&f, 290_000, 262_144).unwrap(),
            data[290_000..]
        );
        assert!(read_chunk_at(&f, 400_000, 10).unwrap().is_empty());
    }

    #[test]
    fn times_before_the_epoch_and_with_nanoseconds_are_set_exactly() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        for t in [FileTime::new(-10, 250), FileTime::new(10_413_792_000, 7)] {
            f.set_times(file_times(t, t)).unwrap();
            assert_eq!(FileTime::mtime_of(&std::fs::metadata(&p).unwrap()), t);
        }
    }
}
