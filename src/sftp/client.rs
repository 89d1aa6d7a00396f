//! A pipelined SFTP v3 client over any [`RemoteIo`] stream (an SSH channel, or a local
//! `sftp-server` in tests).
//!
//! Why not russh-sftp: throughput over a high-latency link comes from keeping dozens of
//! 256 KiB requests in flight per channel. Here a request is *sent* the moment it is started
//! (`read_start`/`write_start` are synchronous), and its reply is awaited later; a reader task
//! routes replies to waiters by request id. Because the server executes requests in the order it
//! receives them, writes started in offset order land in offset order, which is what `--resume`
//! relies on. DATA replies are slices of the received packet, never copied again.
//!
//! What the server controls is bounded here ([`super::caps`]): the size of any reply, the
//! entries and names of a listing, and how many replies one short read may take.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, oneshot};

use super::caps;
use super::proto::{self, put_str, Attrs, Parser};
use crate::link::RemoteIo;

/// Requests are this large when the server does not announce `limits@openssh.com`.
const DEFAULT_CHUNK: u32 = 32 * 1024;
/// Never ask for more than this per request even if the server allows it.
const MAX_CHUNK: u32 = 256 * 1024;

/// An SFTP failure as the server reported it, or the stream ending.
#[derive(Debug, thiserror::Error)]
pub enum SftpError {
    #[error("{}", status_text(*.code, .message))]
    Status { code: u32, message: String },
    #[error("connection lost ({0})")]
    Closed(String),
}

fn status_text(code: u32, message: &str) -> String {
    match code {
        proto::FX_EOF => "end of file".into(),
        proto::FX_NO_SUCH_FILE => "no such file or directory".into(),
        proto::FX_PERMISSION_DENIED => "permission denied".into(),
        proto::FX_FAILURE if message.is_empty() || message.eq_ignore_ascii_case("failure") => {
            "operation failed on the remote side".into()
        }
        _ if message.is_empty() => format!("SFTP error {code}"),
        _ => message.to_lowercase(),
    }
}

impl SftpError {
    pub fn code(&self) -> Option<u32> {
        match self {
            SftpError::Status { code, .. } => Some(*code),
            SftpError::Closed(_) => None,
        }
    }
}

/// The SFTP status code anywhere in an error's chain (for branching on "no such file").
pub fn status_of(err: &anyhow::Error) -> Option<u32> {
    err.chain()
        .find_map(|c| c.downcast_ref::<SftpError>())
        .and_then(SftpError::code)
}

/// True when the error chain contains a lost SFTP stream.
pub fn is_closed(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|c| matches!(c.downcast_ref::<SftpError>(), Some(SftpError::Closed(_))))
}

/// An open remote file or directory.
pub type Handle = Bytes;

/// One entry of a directory listing, exactly as the server sent it (names are unvalidated).
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Bytes,
    pub attrs: Attrs,
}

type ReplyResult = std::result::Result<(u8, Parser), SftpError>;

struct Pending {
    waiters: HashMap<u32, oneshot::Sender<ReplyResult>>,
    closed: Option<String>,
}

struct Inner {
    tx: mpsc::UnboundedSender<Vec<Bytes>>,
    pending: Mutex<Pending>,
    next_id: AtomicU32,
    extensions: HashSet<String>,
    /// `(max read, max write)`, settled by the first [`Sftp::limits`] call.
    limits: tokio::sync::OnceCell<(u32, u32)>,
    /// The `limits@openssh.com` request, sent during the handshake and awaited only when a
    /// transfer needs its answer, so it shares a round trip with the first stat or open.
    limits_reply: Mutex<Option<PendingReply>>,
}

/// A pipelined SFTP session; cheap to clone, usable from many tasks at once.
#[derive(Clone)]
pub struct Sftp {
    inner: Arc<Inner>,
}

/// A request on the wire whose reply has not been awaited yet.
pub struct PendingReply(oneshot::Receiver<ReplyResult>);

impl PendingReply {
    async fn get(self) -> Result<(u8, Parser)> {
        match self.0.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(SftpError::Closed("reply dropped".into()).into()),
        }
    }

    /// Await a STATUS reply; OK is success, anything else an [`SftpError`].
    pub async fn status(self) -> Result<()> {
        let (kind, mut p) = self.get().await?;
        expect_ok(kind, &mut p)
    }

    /// Await a READ reply: `None` at end of file.
    pub async fn data(self) -> Result<Option<Bytes>> {
        let (kind, mut p) = self.get().await?;
        match kind {
            proto::DATA => Ok(Some(p.string()?)),
            proto::STATUS => match status(&mut p)? {
                (proto::FX_EOF, _) => Ok(None),
                (code, message) => Err(SftpError::Status { code, message }.into()),
            },
            k => bail!("unexpected SFTP reply {k} to READ"),
        }
    }
}

fn status(p: &mut Parser) -> Result<(u32, String)> {
    let code = p.u32()?;
    // Older servers may omit the message; treat it as empty.
    let message = if p.remaining() >= 4 {
        String::from_utf8_lossy(&p.string()?).into_owned()
    } else {
        String::new()
    };
    Ok((code, message))
}

fn expect_ok(kind: u8, p: &mut Parser) -> Result<()> {
    if kind != proto::STATUS {
        bail!("unexpected SFTP reply {kind} (wanted STATUS)");
    }
    match status(p)? {
        (proto::FX_OK, _) => Ok(()),
        (code, message) => Err(SftpError::Status { code, message }.into()),
    }
}

fn expect(kind: u8, want: u8, p: &mut Parser) -> Result<()> {
    if kind == want {
        return Ok(());
    }
    if kind == proto::STATUS {
        let (code, message) = status(p)?;
        return Err(SftpError::Status { code, message }.into());
    }
    bail!("unexpected SFTP reply {kind} (wanted {want})")
}

/// A DATA reply may be shorter than asked, never longer.
fn check_data_len(got: usize, asked: u32) -> Result<()> {
    if got > asked as usize {
        bail!("sftp server sent {got} bytes for a {asked}-byte read");
    }
    Ok(())
}

/// A listing name must name one entry inside the directory listed (the rule in
/// `crate::fs::beneath`, which local writes use too), and be no longer than a name can be.
fn check_name(name: &[u8]) -> Result<()> {
    if let Err(why) = crate::fs::beneath::check_name(name) {
        bail!(
            "refusing unsafe name {:?} ({why}: it would escape the destination)",
            String::from_utf8_lossy(name)
        );
    }
    if name.len() > caps::NAME_LEN {
        bail!(
            "refusing a {}-byte name {:?}… (names are at most {} bytes)",
            name.len(),
            String::from_utf8_lossy(&name[..32]),
            caps::NAME_LEN
        );
    }
    Ok(())
}

fn path_bytes(p: &Path) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    let b = p.as_os_str().as_bytes();
    // The empty path means the login directory, as in scp's `vm:`.
    if b.is_empty() {
        b"."
    } else {
        b
    }
}

impl Sftp {
    /// Run the version handshake (and `limits@openssh.com` when offered) on `io`.
    pub async fn connect(io: Box<dyn RemoteIo>) -> Result<Sftp> {
        let (rd, wr) = tokio::io::split(io);
        // Small buffers on purpose: tokio's BufReader/BufWriter bypass the buffer for transfers
        // larger than it, so 256 KiB DATA bodies and WRITE payloads move without an extra copy
        // while small packets still share syscalls.
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let mut wr = BufWriter::with_capacity(64 * 1024, wr);
        let mut init = BytesMut::new();
        init.put_u32(5);
        init.put_u8(proto::INIT);
        init.put_u32(3);
        wr.write_all(&init).await.context("SFTP handshake")?;
        wr.flush().await.context("SFTP handshake")?;
        let (kind, mut p) = read_packet(&mut rd).await.context(
            "SFTP handshake: the server closed the stream (is the SFTP subsystem enabled?)",
        )?;
        if kind != proto::VERSION {
            bail!("SFTP handshake: unexpected packet {kind}");
        }
        let version = p.u32()?;
        if version < 3 {
            bail!("SFTP server speaks version {version}; 3 is needed");
        }
        let mut extensions = HashSet::new();
        while p.remaining() > 0 {
            let name = p.string()?;
            let _data = p.string()?;
            extensions.insert(String::from_utf8_lossy(&name).into_owned());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            tx,
            pending: Mutex::new(Pending {
                waiters: HashMap::new(),
                closed: None,
            }),
            next_id: AtomicU32::new(1),
            extensions,
            limits: tokio::sync::OnceCell::new(),
            limits_reply: Mutex::new(None),
        });
        tokio::spawn(writer(wr, rx, Arc::downgrade(&inner)));
        tokio::spawn(reader(rd, Arc::downgrade(&inner)));
        let sftp = Sftp { inner };
        if sftp.has("limits@openssh.com") {
            let pending =
                sftp.send(proto::EXTENDED, |b| put_str(b, b"limits@openssh.com"), None)?;
            if let Ok(mut slot) = sftp.inner.limits_reply.lock() {
                *slot = Some(pending);
            }
        }
        Ok(sftp)
    }

    /// Whether `other` is this very session (handles are only valid within one).
    pub fn same_session(&self, other: &Sftp) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether the server announced extension `name` (e.g. `posix-rename@openssh.com`).
    pub fn has(&self, name: &str) -> bool {
        self.inner.extensions.contains(name)
    }

    /// `(largest READ answered in full, largest WRITE accepted)`: what `limits@openssh.com`
    /// announced (at most 256 KiB), else 32 KiB. The first call waits for the reply.
    pub async fn limits(&self) -> Result<(u32, u32)> {
        let limits = self
            .inner
            .limits
            .get_or_try_init(|| async {
                let pending = self
                    .inner
                    .limits_reply
                    .lock()
                    .map_err(|_| SftpError::Closed("poisoned".into()))?
                    .take();
                let Some(pending) = pending else {
                    return Ok::<_, anyhow::Error>((DEFAULT_CHUNK, DEFAULT_CHUNK));
                };
                let (kind, mut p) = pending.get().await?;
                expect(kind, proto::EXTENDED_REPLY, &mut p)?;
                let _max_packet = p.u64()?;
                let clamp = |v: u64| {
                    if v == 0 {
                        DEFAULT_CHUNK
                    } else {
                        v.min(MAX_CHUNK as u64) as u32
                    }
                };
                let read = clamp(p.u64()?);
                Ok((read, clamp(p.u64()?)))
            })
            .await?;
        Ok(*limits)
    }

    /// Put a request on the wire now; `payload` is appended without copying (WRITE data).
    fn send(
        &self,
        kind: u8,
        fields: impl FnOnce(&mut BytesMut),
        payload: Option<Bytes>,
    ) -> Result<PendingReply> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut b = BytesMut::with_capacity(64);
        b.put_u32(0);
        b.put_u8(kind);
        b.put_u32(id);
        fields(&mut b);
        let extra = payload.as_ref().map_or(0, |p| p.len());
        let len = (b.len() - 4 + extra) as u32;
        b[..4].copy_from_slice(&len.to_be_bytes());
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self
                .inner
                .pending
                .lock()
                .map_err(|_| SftpError::Closed("poisoned".into()))?;
            if let Some(why) = &pending.closed {
                return Err(SftpError::Closed(why.clone()).into());
            }
            pending.waiters.insert(id, tx);
        }
        let mut frame = vec![b.freeze()];
        frame.extend(payload);
        if self.inner.tx.send(frame).is_err() {
            return Err(SftpError::Closed("writer stopped".into()).into());
        }
        Ok(PendingReply(rx))
    }

    async fn call(&self, kind: u8, fields: impl FnOnce(&mut BytesMut)) -> Result<(u8, Parser)> {
        self.send(kind, fields, None)?.get().await
    }

    async fn path_status(&self, kind: u8, path: &Path) -> Result<()> {
        let (k, mut p) = self.call(kind, |b| put_str(b, path_bytes(path))).await?;
        expect_ok(k, &mut p)
    }

    async fn path_attrs(&self, kind: u8, path: &Path) -> Result<Attrs> {
        let (k, mut p) = self.call(kind, |b| put_str(b, path_bytes(path))).await?;
        expect(k, proto::ATTRS, &mut p)?;
        p.attrs()
    }

    /// Open `path` with `OPEN_*` flags; `attrs` apply when the file is created.
    pub async fn open(&self, path: &Path, flags: u32, attrs: &Attrs) -> Result<Handle> {
        let (k, mut p) = self
            .call(proto::OPEN, |b| {
                put_str(b, path_bytes(path));
                b.put_u32(flags);
                attrs.encode(b);
            })
            .await?;
        expect(k, proto::HANDLE, &mut p)?;
        p.string()
    }

    pub async fn close(&self, handle: &Handle) -> Result<()> {
        let (k, mut p) = self.call(proto::CLOSE, |b| put_str(b, handle)).await?;
        expect_ok(k, &mut p)
    }

    /// Send a READ now; await [`PendingReply::data`] later.
    pub fn read_start(&self, handle: &Handle, offset: u64, len: u32) -> Result<PendingReply> {
        self.send(
            proto::READ,
            |b| {
                put_str(b, handle);
                b.put_u64(offset);
                b.put_u32(len);
            },
            None,
        )
    }

    /// Send a WRITE now; await [`PendingReply::status`] later.
    pub fn write_start(&self, handle: &Handle, offset: u64, data: Bytes) -> Result<PendingReply> {
        let len = data.len() as u32;
        self.send(
            proto::WRITE,
            |b| {
                put_str(b, handle);
                b.put_u64(offset);
                b.put_u32(len);
            },
            Some(data),
        )
    }

    pub async fn stat(&self, path: &Path) -> Result<Attrs> {
        self.path_attrs(proto::STAT, path).await
    }

    pub async fn lstat(&self, path: &Path) -> Result<Attrs> {
        self.path_attrs(proto::LSTAT, path).await
    }

    pub async fn fstat(&self, handle: &Handle) -> Result<Attrs> {
        let (k, mut p) = self.call(proto::FSTAT, |b| put_str(b, handle)).await?;
        expect(k, proto::ATTRS, &mut p)?;
        p.attrs()
    }

    pub async fn setstat(&self, path: &Path, attrs: &Attrs) -> Result<()> {
        let (k, mut p) = self
            .call(proto::SETSTAT, |b| {
                put_str(b, path_bytes(path));
                attrs.encode(b);
            })
            .await?;
        expect_ok(k, &mut p)
    }

    pub async fn fsetstat(&self, handle: &Handle, attrs: &Attrs) -> Result<()> {
        let (k, mut p) = self
            .call(proto::FSETSTAT, |b| {
                put_str(b, handle);
                attrs.encode(b);
            })
            .await?;
        expect_ok(k, &mut p)
    }

    /// Every entry of directory `path` except `.` and `..`, each name one plain component
    /// (non-empty, no `/` or NUL, at most [`caps::NAME_LEN`] bytes). Two READDIRs are kept in
    /// flight and the CLOSE is not waited for, so a small directory costs two round trips
    /// (OPENDIR, then READDIR), not four. Bounded by [`caps::DIR_ENTRIES`] and
    /// [`caps::EMPTY_REPLIES`]: a server cannot make one listing endless.
    pub async fn read_dir(&self, path: &Path) -> Result<Vec<DirEntry>> {
        let (k, mut p) = self
            .call(proto::OPENDIR, |b| put_str(b, path_bytes(path)))
            .await?;
        expect(k, proto::HANDLE, &mut p)?;
        let handle = p.string()?;
        let mut out = Vec::new();
        let result = self.read_dir_entries(&handle, &mut out).await;
        // Nothing depends on the CLOSE: its reply is dropped when it arrives.
        let closed = self.send(proto::CLOSE, |b| put_str(b, &handle), None);
        result.and(closed.map(drop))?;
        Ok(out)
    }

    async fn read_dir_entries(&self, handle: &Handle, out: &mut Vec<DirEntry>) -> Result<()> {
        let readdir = || self.send(proto::READDIR, |b| put_str(b, handle), None);
        let mut next = readdir()?;
        let mut empty = 0;
        loop {
            let (k, mut p) = std::mem::replace(&mut next, readdir()?).get().await?;
            if k == proto::STATUS {
                return match status(&mut p)? {
                    (proto::FX_EOF, _) => Ok(()),
                    (code, message) => Err(SftpError::Status { code, message }.into()),
                };
            }
            expect(k, proto::NAME, &mut p)?;
            let count = p.u32()? as usize;
            // Each entry takes at least 12 bytes (two empty strings and the attribute flags).
            if count > p.remaining() / 12 {
                bail!(
                    "malformed SFTP listing: {count} entries in {} bytes",
                    p.remaining()
                );
            }
            if count == 0 {
                empty += 1;
                if empty > caps::EMPTY_REPLIES {
                    bail!(
                        "sftp server sends empty directory listings without end; refusing to \
                         continue"
                    );
                }
            }
            for _ in 0..count {
                let name = p.string()?;
                let _long = p.string()?;
                let attrs = p.attrs()?;
                if &name[..] == b"." || &name[..] == b".." {
                    continue;
                }
                check_name(&name)?;
                if out.len() >= caps::DIR_ENTRIES {
                    bail!(
                        "sftp server lists more than {} entries in one directory; refusing to \
                         continue",
                        caps::DIR_ENTRIES
                    );
                }
                out.push(DirEntry { name, attrs });
            }
        }
    }

    /// Read `len` bytes at `offset`: the READ is on the wire when this returns, and the future
    /// yields fewer bytes only at end of file. A full first reply is returned as it arrived (a
    /// slice of the packet, no copy). A short one is legal, so the rest is asked for, but only
    /// [`caps::follow_ups`] times: a server that answers a few bytes per reply is refused
    /// rather than allowed to cost a round trip per few bytes.
    pub fn read(
        &self,
        handle: &Handle,
        offset: u64,
        len: u32,
    ) -> Result<impl std::future::Future<Output = Result<Bytes>> + Send + 'static> {
        let first = self.read_start(handle, offset, len)?;
        let (c, h) = (self.clone(), handle.clone());
        Ok(async move {
            let Some(data) = first.data().await? else {
                return Ok(Bytes::new());
            };
            check_data_len(data.len(), len)?;
            if data.len() == len as usize {
                return Ok(data);
            }
            let mut buf = BytesMut::from(&data[..]);
            let mut replies = 1u32;
            while buf.len() < len as usize {
                if replies > caps::follow_ups(len) {
                    bail!(
                        "sftp server returns {}-byte reads (asked for {len}); refusing to continue",
                        buf.len() as u32 / replies
                    );
                }
                let want = len - buf.len() as u32;
                let more = c.read_start(&h, offset + buf.len() as u64, want)?;
                replies += 1;
                match more.data().await? {
                    Some(more) if !more.is_empty() => {
                        check_data_len(more.len(), want)?;
                        buf.extend_from_slice(&more);
                    }
                    _ => break,
                }
            }
            Ok(buf.freeze())
        })
    }

    pub async fn mkdir(&self, path: &Path, attrs: &Attrs) -> Result<()> {
        let (k, mut p) = self
            .call(proto::MKDIR, |b| {
                put_str(b, path_bytes(path));
                attrs.encode(b);
            })
            .await?;
        expect_ok(k, &mut p)
    }

    pub async fn rmdir(&self, path: &Path) -> Result<()> {
        self.path_status(proto::RMDIR, path).await
    }

    pub async fn remove(&self, path: &Path) -> Result<()> {
        self.path_status(proto::REMOVE, path).await
    }

    /// The server's canonical absolute form of `path`.
    pub async fn realpath(&self, path: &Path) -> Result<Bytes> {
        self.one_name(proto::REALPATH, path).await
    }

    pub async fn readlink(&self, path: &Path) -> Result<Bytes> {
        self.one_name(proto::READLINK, path).await
    }

    async fn one_name(&self, kind: u8, path: &Path) -> Result<Bytes> {
        let (k, mut p) = self.call(kind, |b| put_str(b, path_bytes(path))).await?;
        expect(k, proto::NAME, &mut p)?;
        if p.u32()? < 1 {
            bail!("SFTP server returned no name");
        }
        p.string()
    }

    /// Create symlink `link` pointing at `target`. OpenSSH swaps the two arguments relative to
    /// the draft (target first), and every deployed server follows OpenSSH.
    pub async fn symlink(&self, target: &Path, link: &Path) -> Result<()> {
        let (k, mut p) = self
            .call(proto::SYMLINK, |b| {
                put_str(b, path_bytes(target));
                put_str(b, path_bytes(link));
            })
            .await?;
        expect_ok(k, &mut p)
    }

    /// Rename, replacing `to` if it exists (`posix-rename@openssh.com`); plain RENAME, which
    /// fails on an existing target, only when the extension is missing.
    pub async fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        let posix = self.has("posix-rename@openssh.com");
        let (k, mut p) = if posix {
            self.call(proto::EXTENDED, |b| {
                put_str(b, b"posix-rename@openssh.com");
                put_str(b, path_bytes(from));
                put_str(b, path_bytes(to));
            })
            .await?
        } else {
            self.call(proto::RENAME, |b| {
                put_str(b, path_bytes(from));
                put_str(b, path_bytes(to));
            })
            .await?
        };
        expect_ok(k, &mut p)
    }

    /// Server-side copy (`copy-data`, OpenSSH ≥ 9.0): `len` bytes from `from` at `from_off` to
    /// `to` at `to_off`, without the data crossing the link. Both handles belong to this session.
    pub async fn copy_data(
        &self,
        (from, from_off): (&Handle, u64),
        len: u64,
        (to, to_off): (&Handle, u64),
    ) -> Result<()> {
        let (k, mut p) = self
            .call(proto::EXTENDED, |b| {
                put_str(b, b"copy-data");
                put_str(b, from);
                b.put_u64(from_off);
                b.put_u64(len);
                put_str(b, to);
                b.put_u64(to_off);
            })
            .await?;
        expect_ok(k, &mut p)
    }

    /// Free bytes for unprivileged users on the filesystem holding `path`
    /// (`statvfs@openssh.com`), to tell "disk full" from other write failures.
    pub async fn free_space(&self, path: &Path) -> Result<Option<u64>> {
        if !self.has("statvfs@openssh.com") {
            return Ok(None);
        }
        let (k, mut p) = self
            .call(proto::EXTENDED, |b| {
                put_str(b, b"statvfs@openssh.com");
                put_str(b, path_bytes(path));
            })
            .await?;
        expect(k, proto::EXTENDED_REPLY, &mut p)?;
        let _bsize = p.u64()?;
        let frsize = p.u64()?;
        let _blocks = p.u64()?;
        let _bfree = p.u64()?;
        let bavail = p.u64()?;
        Ok(Some(bavail.saturating_mul(frsize)))
    }
}

async fn read_packet<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Result<(u8, Parser)> {
    let len = rd.read_u32().await? as usize;
    if len == 0 {
        bail!("malformed SFTP packet length 0");
    }
    if len > caps::PACKET {
        bail!(
            "sftp server sent a {len}-byte reply (at most {} are accepted); refusing it",
            caps::PACKET
        );
    }
    let mut body = BytesMut::with_capacity(len);
    // read_buf fills uninitialised capacity: no zeroing of 256 KiB bodies.
    while body.len() < len {
        let want = len - body.len();
        let mut limited = (&mut body).limit(want);
        if rd.read_buf(&mut limited).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    let mut p = Parser::new(body.freeze());
    let kind = p.u8()?;
    Ok((kind, p))
}

fn shut_down(inner: &std::sync::Weak<Inner>, why: String) {
    if let Some(inner) = inner.upgrade() {
        if let Ok(mut pending) = inner.pending.lock() {
            pending.closed.get_or_insert(why.clone());
            for (_, w) in pending.waiters.drain() {
                let _ = w.send(Err(SftpError::Closed(why.clone())));
            }
        }
    }
}

async fn reader<R: tokio::io::AsyncRead + Unpin>(mut rd: R, inner: std::sync::Weak<Inner>) {
    let why = loop {
        let (kind, mut p) = match read_packet(&mut rd).await {
            Ok(x) => x,
            Err(e) => break format!("{e:#}"),
        };
        let id = match p.u32() {
            Ok(id) => id,
            Err(e) => break format!("{e:#}"),
        };
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let waiter = match strong.pending.lock() {
            Ok(mut pending) => pending.waiters.remove(&id),
            Err(_) => break "poisoned".into(),
        };
        match waiter {
            Some(w) => {
                let _ = w.send(Ok((kind, p)));
            }
            None => break format!("SFTP reply for unknown request {id}"),
        }
    };
    let why = if why.contains("early eof") {
        "the server closed the stream".to_string()
    } else {
        why
    };
    shut_down(&inner, why);
}

async fn writer<W: tokio::io::AsyncWrite + Unpin>(
    mut wr: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Vec<Bytes>>,
    inner: std::sync::Weak<Inner>,
) {
    let why = 'outer: loop {
        let Some(frame) = rx.recv().await else {
            let _ = wr.shutdown().await;
            return;
        };
        let mut next = Some(frame);
        // Write everything queued, then flush once: small requests share a syscall.
        while let Some(frame) = next {
            for part in frame {
                if let Err(e) = wr.write_all(&part).await {
                    break 'outer e.to_string();
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = wr.flush().await {
            break e.to_string();
        }
    };
    shut_down(&inner, why);
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// Answer INIT, then collect `n` READ requests and answer them in reverse order, each with
    /// its own id as data; then send `tail` raw bytes.
    async fn reversing_server(mut io: DuplexStream, n: usize, tail: Vec<u8>) {
        let len = io.read_u32().await.unwrap();
        let mut init = vec![0; len as usize];
        io.read_exact(&mut init).await.unwrap();
        let mut version = BytesMut::new();
        version.put_u32(5);
        version.put_u8(proto::VERSION);
        version.put_u32(3);
        io.write_all(&version).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..n {
            let len = io.read_u32().await.unwrap();
            let mut body = vec![0; len as usize];
            io.read_exact(&mut body).await.unwrap();
            ids.push(u32::from_be_bytes([body[1], body[2], body[3], body[4]]));
        }
        for id in ids.into_iter().rev() {
            let mut b = BytesMut::new();
            b.put_u32(1 + 4 + 4 + 4);
            b.put_u8(proto::DATA);
            b.put_u32(id);
            put_str(&mut b, &id.to_be_bytes());
            io.write_all(&b).await.unwrap();
        }
        io.write_all(&tail).await.unwrap();
        // Keep the stream open until the client is done.
        let _ = io.read_u8().await;
    }

    #[tokio::test]
    async fn replies_in_any_order_reach_their_requests() {
        let (client, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(reversing_server(server, 20, Vec::new()));
        let sftp = Sftp::connect(Box::new(client)).await.unwrap();
        // The in-test server never announces limits: the fallback, and no error to unwrap.
        assert_eq!(sftp.limits().await.unwrap(), (DEFAULT_CHUNK, DEFAULT_CHUNK));
        let h = Bytes::from_static(b"h");
        let pending: Vec<_> = (0..20)
            .map(|i| sftp.read_start(&h, i * 10, 10).unwrap())
            .collect();
        let mut seen = Vec::new();
        for p in pending {
            let data = p.data().await.unwrap().unwrap();
            seen.push(u32::from_be_bytes([data[0], data[1], data[2], data[3]]));
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "each reply went to the request with its id");
    }

    #[tokio::test]
    async fn a_malformed_reply_fails_every_waiter_without_panicking() {
        let (client, server) = tokio::io::duplex(1 << 16);
        // A reply for an id nobody asked for, then a truncated packet.
        let mut tail = BytesMut::new();
        tail.put_u32(9);
        tail.put_u8(proto::STATUS);
        tail.put_u32(999_999);
        tail.put_u32(0);
        tokio::spawn(reversing_server(server, 0, tail.to_vec()));
        let sftp = Sftp::connect(Box::new(client)).await.unwrap();
        let err = sftp.stat(Path::new("/x")).await.unwrap_err();
        assert!(is_closed(&err), "{err:#}");
        // Later requests fail at once instead of hanging.
        let err = sftp.stat(Path::new("/y")).await.unwrap_err();
        assert!(is_closed(&err), "{err:#}");
    }

    /// Answer INIT, then every READ with `reply_len(asked)` bytes (EOF at `size`).
    async fn reading_server(mut io: DuplexStream, size: u64, reply_len: fn(u32) -> u32) {
        let len = io.read_u32().await.unwrap();
        let mut init = vec![0; len as usize];
        io.read_exact(&mut init).await.unwrap();
        let mut version = BytesMut::new();
        version.put_u32(5);
        version.put_u8(proto::VERSION);
        version.put_u32(3);
        io.write_all(&version).await.unwrap();
        while let Ok(len) = io.read_u32().await {
            let mut body = vec![0; len as usize];
            io.read_exact(&mut body).await.unwrap();
            let mut p = Parser::new(Bytes::from(body));
            assert_eq!(p.u8().unwrap(), proto::READ);
            let id = p.u32().unwrap();
            let _handle = p.string().unwrap();
            let offset = p.u64().unwrap();
            let asked = p.u32().unwrap();
            let mut b = BytesMut::new();
            if offset >= size {
                b.put_u32(1 + 4 + 4);
                b.put_u8(proto::STATUS);
                b.put_u32(id);
                b.put_u32(proto::FX_EOF);
            } else {
                let n = reply_len(asked).min((size - offset) as u32);
                b.put_u32(1 + 4 + 4 + n);
                b.put_u8(proto::DATA);
                b.put_u32(id);
                put_str(&mut b, &vec![b'x'; n as usize]);
            }
            io.write_all(&b).await.unwrap();
        }
    }

    async fn read_from(size: u64, reply_len: fn(u32) -> u32, len: u32) -> Result<Bytes> {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(reading_server(server, size, reply_len));
        let sftp = Sftp::connect(Box::new(client)).await.unwrap();
        sftp.read(&Bytes::from_static(b"h"), 0, len)?.await
    }

    #[tokio::test]
    async fn short_reads_are_completed_but_one_byte_reads_are_refused() {
        // Half a request per reply (a server with a smaller limit): filled in, no error.
        let data = read_from(1 << 20, |asked| asked.div_ceil(2), 256 * 1024).await;
        assert_eq!(data.unwrap().len(), 256 * 1024);
        // A short reply at end of file is the file's end.
        assert_eq!(read_from(100, |a| a, 4096).await.unwrap().len(), 100);
        let err = read_from(1 << 20, |_| 1, 256 * 1024).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "sftp server returns 1-byte reads (asked for 262144); refusing to continue"
        );
        let err = read_from(1 << 20, |a| a + 1, 4096).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "sftp server sent 4097 bytes for a 4096-byte read"
        );
    }

    #[test]
    fn a_one_byte_server_costs_at_most_65_replies_per_256_kib() {
        assert_eq!(caps::follow_ups(256 * 1024), 64);
        assert_eq!(caps::follow_ups(100), 4);
    }

    #[test]
    fn listing_names_must_be_one_plain_component() {
        check_name(b"ok \xff name").unwrap();
        check_name(&[b'n'; 255]).unwrap();
        for bad in [&b""[..], b"a/b", b"/abs", b"nul\0"] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("refusing unsafe name"), "{err}");
        }
        let err = check_name(&[b'n'; 256]).unwrap_err().to_string();
        assert!(err.contains("256-byte name"), "{err}");
    }

    #[tokio::test]
    async fn an_oversized_reply_is_refused_before_it_is_read() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut tail = BytesMut::new();
        tail.put_u32(64 * 1024 * 1024);
        tokio::spawn(reversing_server(server, 0, tail.to_vec()));
        let sftp = Sftp::connect(Box::new(client)).await.unwrap();
        let err = sftp.stat(Path::new("/x")).await.unwrap_err();
        assert!(is_closed(&err), "{err:#}");
        assert!(
            format!("{err:#}").contains("67108864-byte reply"),
            "{err:#}"
        );
    }

    #[test]
    fn status_codes_read_as_clear_words() {
        let e = SftpError::Status {
            code: proto::FX_NO_SUCH_FILE,
            message: "No such file".into(),
        };
        assert_eq!(e.to_string(), "no such file or directory");
        let e = SftpError::Status {
            code: proto::FX_PERMISSION_DENIED,
            message: String::new(),
        };
        assert_eq!(e.to_string(), "permission denied");
        let e = SftpError::Status {
            code: proto::FX_FAILURE,
            message: "Failure".into(),
        };
        assert_eq!(e.to_string(), "operation failed on the remote side");
    }
}
