//! Open files on either side of a copy, read and written by offset so parallel ranges can
//! share one file. Every call *starts* its I/O before returning (a remote request is on the
//! wire, a local pread/pwrite is queued on the blocking pool) and hands back a future for the
//! result: that is what lets `pipe` keep many requests in flight without spawning tasks. The
//! local side is `crate::fs`'s; this file adds the SFTP side and picks between them.

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;

use crate::fs::{FileTime, LocalReader, LocalWriter};
use crate::sftp::proto::Attrs;
use crate::sftp::{Handle, Sftp};

/// An open source file; reads are positional so ranges can share it.
pub enum Reader {
    Local(LocalReader),
    Remote(Sftp, Handle),
}

impl Reader {
    /// Start reading `len` bytes at `offset` now (a remote request goes on the wire before this
    /// returns); the future yields fewer bytes only at end of file.
    pub fn read_at(&self, offset: u64, len: u32) -> Result<BoxFuture<'static, Result<Bytes>>> {
        match self {
            Reader::Local(f) => Ok(f.read_at(offset, len)),
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

/// An open destination file.
pub enum Writer {
    Local(LocalWriter),
    Remote(Sftp, Handle),
}

impl Writer {
    /// Write `data` at `offset`; the future completes when it is written. A remote write is on
    /// the wire when this returns; a local one starts when polled, after the file's earlier
    /// writes.
    pub fn write_at(&self, offset: u64, data: Bytes) -> Result<BoxFuture<'static, Result<()>>> {
        match self {
            Writer::Local(f) => Ok(f.write_at(offset, data)),
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
    pub async fn finish(
        self,
        mode: Option<u32>,
        times: Option<(FileTime, FileTime)>,
    ) -> Result<()> {
        match self {
            Writer::Local(f) => f.finish(mode, times).await,
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

/// SFTP attributes for a mode and (atime, mtime): SFTP v3 carries whole seconds, unsigned.
pub(super) fn attrs_for(mode: u32, times: Option<(FileTime, FileTime)>) -> Attrs {
    let secs = |t: FileTime| t.secs().clamp(0, u32::MAX as i64) as u32;
    Attrs {
        perm: Some(mode),
        times: times.map(|(a, m)| (secs(a), secs(m))),
        ..Attrs::default()
    }
}
