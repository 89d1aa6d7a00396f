//! Open files on either side of a copy, read and written by offset so parallel ranges can
//! share one file. Every call *starts* its I/O before returning (a remote request is on the
//! wire, a local pread/pwrite is queued on the blocking pool) and hands back a future for the
//! result: that is what lets `pipe` keep many requests in flight without spawning tasks.

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use super::fs::io_text;
use crate::sftp::proto::Attrs;
use crate::sftp::{Handle, Sftp};

/// An open source file; reads are positional so ranges can share it.
pub enum Reader {
    Local(Arc<std::fs::File>),
    Remote(Sftp, Handle),
}

impl Reader {
    /// Start reading `len` bytes at `offset` now (a remote request goes on the wire before this
    /// returns); the future yields fewer bytes only at end of file.
    pub fn read_at(&self, offset: u64, len: u32) -> Result<BoxFuture<'static, Result<Bytes>>> {
        match self {
            Reader::Local(f) => {
                let f = f.clone();
                let job = tokio::task::spawn_blocking(move || {
                    read_chunk_at(&f, offset, len as usize)
                        .map(Bytes::from)
                        .map_err(|e| anyhow!("read: {}", io_text(&e)))
                });
                Ok(async move { job.await? }.boxed())
            }
            Reader::Remote(c, h) => Ok(c.read(h, offset, len)?.boxed()),
        }
    }

    pub async fn close(self) -> Result<()> {
        match self {
            Reader::Local(_) => Ok(()),
            Reader::Remote(c, h) => c.close(&h).await,
        }
    }
}

/// Up to `len` bytes of `f` at `offset`, fewer only at end of file. Read straight into fresh
/// capacity with pread(), one call for a whole chunk of a regular file: zeroing a buffer first
/// costs about what the copy does, and `Read::read_to_end` would split the chunk into reads of
/// 8, 16, 32... KiB.
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

/// An open destination file.
pub enum Writer {
    Local(Arc<LocalFile>),
    Remote(Sftp, Handle),
}

/// A local destination and the gate that lets one write into it at a time.
///
/// Buffered writes to one file serialize on its inode lock anyway; a dozen blocking-pool
/// threads queued on that lock spin and switch for nothing (on a download with 8 ranges this
/// was ~3 % of the client's CPU). Waiting here instead costs nothing.
pub struct LocalFile {
    file: std::fs::File,
    gate: Arc<tokio::sync::Semaphore>,
}

impl LocalFile {
    pub fn new(file: std::fs::File) -> LocalFile {
        LocalFile {
            file,
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }
}

impl Writer {
    /// Write `data` at `offset`; the future completes when it is written. A remote write is on
    /// the wire when this returns; a local one starts when polled, after the file's earlier
    /// writes.
    pub fn write_at(&self, offset: u64, data: Bytes) -> Result<BoxFuture<'static, Result<()>>> {
        match self {
            Writer::Local(f) => {
                let f = f.clone();
                Ok(async move {
                    let _turn = f.gate.clone().acquire_owned().await?;
                    tokio::task::spawn_blocking(move || {
                        f.file
                            .write_all_at(&data, offset)
                            .map_err(|e| anyhow!("write: {}", io_text(&e)))
                    })
                    .await?
                }
                .boxed())
            }
            Writer::Remote(c, h) => {
                let p = c.write_start(h, offset, data)?;
                Ok(async move { p.status().await.context("write") }.boxed())
            }
        }
    }

    /// Whether writes may complete out of order (local writes run on a thread pool).
    pub fn is_local(&self) -> bool {
        matches!(self, Writer::Local(_))
    }

    /// Set mode/times on the open file, then close it.
    pub async fn finish(self, mode: Option<u32>, times: Option<(i64, i64)>) -> Result<()> {
        match self {
            Writer::Local(f) => tokio::task::spawn_blocking(move || {
                let f = &f.file;
                if let Some(m) = mode {
                    f.set_permissions(std::fs::Permissions::from_mode(m))?;
                }
                if let Some((a, m)) = times {
                    f.set_times(file_times(a, m))?;
                }
                Ok::<_, std::io::Error>(())
            })
            .await?
            .map_err(|e| anyhow!("{}", io_text(&e))),
            Writer::Remote(c, h) => {
                // Both requests go out together; the server runs them in order.
                let set = async {
                    match mode {
                        Some(m) => c.fsetstat(&h, &attrs_for(m, times)).await,
                        None => Ok(()),
                    }
                };
                let (set, closed) = futures::join!(set, c.close(&h));
                set.and(closed)
            }
        }
    }
}

pub(super) fn attrs_for(mode: u32, times: Option<(i64, i64)>) -> Attrs {
    Attrs {
        perm: Some(mode),
        times: times.map(|(a, m)| {
            (
                a.clamp(0, u32::MAX as i64) as u32,
                m.clamp(0, u32::MAX as i64) as u32,
            )
        }),
        ..Attrs::default()
    }
}

pub(super) fn file_times(atime: i64, mtime: i64) -> std::fs::FileTimes {
    let t = |s: i64| {
        if s >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(s as u64)
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(s.unsigned_abs())
        }
    };
    std::fs::FileTimes::new()
        .set_accessed(t(atime))
        .set_modified(t(mtime))
}
