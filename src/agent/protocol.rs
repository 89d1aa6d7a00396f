//! The agent's wire protocol: a handshake, then length-prefixed binary frames.
//!
//! The agent speaks first: [`MAGIC`] and its protocol version. The client skips anything before
//! the magic, because a remote login shell may print banners from `.bashrc`. Then the client sends
//! the same magic and version, and requests; each request gets its replies in order, so the
//! client may pipeline. Every field read from the peer is checked (paths become [`RelPath`]s,
//! lengths are bounded by the frame), and a malformed frame is an error, never a panic.
//!
//! Frame: `u32` little-endian length of what follows, a tag byte, the body.
//!
//! Nothing the peer says sizes an allocation before its bytes have arrived (the rustls way):
//! each message kind has its own body limit ([`body_limit`]), checked before the body is read,
//! and every item count is bounded by what the rest of the body can hold. So no message is
//! unbounded in size, a listing is streamed as [`Msg::ListingPart`]s of about
//! [`LISTING_PART`] bytes ended by [`Msg::ListingEnd`], and a client splits long request
//! lists (`Send`, `Apply`) over several frames.

use crate::fs::FileTime;
use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::delta::MAX_PIECE;
use crate::sync::endpoint::{Op, Piece, RecvReport, SendReq, CHUNK};
use crate::sync::listing::{Entry, EntryKind, ListOpts, RelPath};

pub const MAGIC: &[u8; 12] = b"\x00vtun-agent\x00";
/// Bump on any incompatible change; agents of another version are not used.
pub const PROTO: u32 = 4;

/// The largest signature any request or reply carries: a receiver's file whose signature is
/// bigger (a basis of some 400 GiB) is sent whole instead.
pub const MAX_SIG: usize = 64 << 20;
/// A listing part is cut once its body reaches this size.
pub const LISTING_PART: usize = 1 << 20;
/// Requests (`Send`, `Apply`) are split into frames of about this many body bytes.
pub const REQUEST_PART: usize = 1 << 20;
/// And of at most this many items, so that a reply with one result per item stays small.
pub const REQUEST_ITEMS: usize = 4096;
/// Total entries one listing may have: beyond this, a peer is taken to be flooding us.
pub const MAX_ENTRIES: usize = 50_000_000;
/// Largest `Data` body: a whole-file chunk or a delta piece, whichever senders make bigger.
pub const MAX_DATA: usize = if CHUNK > MAX_PIECE { CHUNK } else { MAX_PIECE };

/// The largest body a message with `tag` may have; `None` for a tag we do not know. Generous
/// for what an honest peer sends (room for paths of `PATH_MAX` and for messages), tight
/// enough that a frame cannot make us allocate much more than it is worth.
pub fn body_limit(tag: u8) -> Option<usize> {
    const SMALL: usize = 64 << 10;
    Some(match tag {
        1 | 10 | 13 => SMALL,
        2 => 4 << 20,
        // At most the engine's batch of paths, each up to PATH_MAX.
        3 => 16 << 20,
        // One frame's worth of requests, plus one signature that may be large on its own.
        4 => MAX_SIG + 2 * REQUEST_PART,
        5 | 6 | 103 => 0,
        7 => 2 * REQUEST_PART,
        DATA_TAG => MAX_DATA,
        12 => 32,
        // A part is cut after it reaches LISTING_PART: one more entry (path and link target)
        // fits in the rest.
        101 => LISTING_PART + (64 << 10),
        107 => 1,
        // The signatures of one batch within MAX_SIG, and a byte or nine for each path.
        102 => MAX_SIG + (24 << 20),
        104 | 105 => 32 << 20,
        199 => 1 << 20,
        _ => return None,
    })
}

/// Frames up to this size are read into a buffer allocated once.
const PREALLOC_MAX: usize = 4 << 20;

/// The tag of `Piece::Data`, whose body is the data itself.
const DATA_TAG: u8 = 11;

/// Every message, both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    /// Client: the directory every later path is relative to.
    Root(String),
    List(ListOpts),
    Signatures(Vec<RelPath>),
    Send(Vec<SendReq>),
    /// Client: file pieces follow until `RecvEnd`.
    RecvBegin,
    RecvEnd,
    Apply(Vec<Op>),
    Piece(Piece),
    // Agent replies.
    /// Some entries of a listing, in order; more parts or a `ListingEnd` follow.
    ListingPart(Vec<Entry>),
    /// The listing is complete.
    ListingEnd {
        root_exists: bool,
    },
    Sigs(Vec<Option<Vec<u8>>>),
    SendDone,
    RecvDone(RecvReport),
    Applied(Vec<Option<String>>),
    Error(String),
}

#[derive(Default)]
struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A file time: seconds as i64, then nanoseconds as u32.
    fn time(&mut self, t: FileTime) {
        self.u64(t.secs() as u64);
        self.u32(t.nsec());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn path(&mut self, p: &RelPath) {
        self.str(p.as_str());
    }
    fn opt_str(&mut self, s: &Option<String>) {
        match s {
            Some(s) => {
                self.u8(1);
                self.str(s);
            }
            None => self.u8(0),
        }
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            bail!("truncated message");
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn time(&mut self) -> Result<FileTime> {
        let secs = self.u64()? as i64;
        let nsec = self.u32()?;
        if nsec >= FileTime::NANOS {
            bail!("bad file time ({nsec} ns)");
        }
        Ok(FileTime::new(secs, nsec))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bool(&mut self) -> Result<bool> {
        Ok(self.u8()? != 0)
    }
    fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = usize::try_from(self.u64()?).context("length too large")?;
        self.take(n)
    }
    fn str(&mut self) -> Result<String> {
        Ok(std::str::from_utf8(self.bytes()?)
            .context("string is not UTF-8")?
            .to_string())
    }
    fn path(&mut self) -> Result<RelPath> {
        RelPath::parse(&self.str()?)
    }
    fn opt_str(&mut self) -> Result<Option<String>> {
        Ok(if self.bool()? {
            Some(self.str()?)
        } else {
            None
        })
    }
    /// A count of items, each at least `min` bytes: bounded by what is left, so a hostile
    /// count cannot make us allocate more than the frame holds.
    fn count(&mut self, min: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min.max(1)) > self.0.len() {
            bail!("item count {n} exceeds message size");
        }
        Ok(n)
    }
    /// `n` items decoded by `f`, in a vector grown as they decode: its size follows the bytes
    /// that arrived, never the count the peer claimed.
    fn items<T>(&mut self, n: usize, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v)
    }
    fn hash(&mut self) -> Result<[u8; 32]> {
        let mut h = [0u8; 32];
        h.copy_from_slice(self.take(32)?);
        Ok(h)
    }
    fn end(&self) -> Result<()> {
        if !self.0.is_empty() {
            bail!("{} unexpected trailing bytes in message", self.0.len());
        }
        Ok(())
    }
}

fn enc_entry(e: &mut Enc, x: &Entry) {
    e.path(&x.path);
    match &x.kind {
        EntryKind::Dir => e.u8(0),
        EntryKind::File { size } => {
            e.u8(1);
            e.u64(*size);
        }
        EntryKind::Symlink { target } => {
            e.u8(2);
            e.str(target);
        }
    }
    e.u32(x.mode);
    e.time(x.mtime);
    match &x.hash {
        Some(h) => {
            e.u8(1);
            e.0.extend_from_slice(h);
        }
        None => e.u8(0),
    }
}

fn dec_entry(d: &mut Dec) -> Result<Entry> {
    let path = d.path()?;
    let kind = match d.u8()? {
        0 => EntryKind::Dir,
        1 => EntryKind::File { size: d.u64()? },
        2 => EntryKind::Symlink { target: d.str()? },
        k => bail!("unknown entry kind {k}"),
    };
    let mode = d.u32()? & 0o7777;
    let mtime = d.time()?;
    let hash = if d.bool()? { Some(d.hash()?) } else { None };
    Ok(Entry {
        path,
        kind,
        mode,
        mtime,
        hash,
    })
}

impl Msg {
    /// Tag and body.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut e = Enc::default();
        let tag = match self {
            Msg::Root(p) => {
                e.str(p);
                1
            }
            Msg::List(o) => {
                e.path(&o.start);
                e.u8(o.hashes as u8);
                e.u8(o.clean_temps as u8);
                e.u32(o.excludes.len() as u32);
                o.excludes.iter().for_each(|x| e.str(x));
                2
            }
            Msg::Signatures(ps) => {
                e.u32(ps.len() as u32);
                ps.iter().for_each(|p| e.path(p));
                3
            }
            Msg::Send(reqs) => {
                e.u32(reqs.len() as u32);
                for r in reqs {
                    e.path(&r.path);
                    match &r.signature {
                        Some(s) => {
                            e.u8(1);
                            e.bytes(s);
                        }
                        None => e.u8(0),
                    }
                }
                4
            }
            Msg::RecvBegin => 5,
            Msg::RecvEnd => 6,
            Msg::Apply(ops) => {
                e.u32(ops.len() as u32);
                for op in ops {
                    match op {
                        Op::MkRoot => e.u8(0),
                        Op::Mkdir { path, mode } => {
                            e.u8(1);
                            e.path(path);
                            e.u32(*mode);
                        }
                        Op::Symlink { path, target } => {
                            e.u8(2);
                            e.path(path);
                            e.str(target);
                        }
                        Op::Delete { path, recursive } => {
                            e.u8(3);
                            e.path(path);
                            e.u8(*recursive as u8);
                        }
                        Op::SetMeta { path, mode, mtime } => {
                            e.u8(4);
                            e.path(path);
                            e.u8(mode.is_some() as u8);
                            e.u32(mode.unwrap_or(0));
                            e.u8(mtime.is_some() as u8);
                            e.time(mtime.unwrap_or_default());
                        }
                    }
                }
                7
            }
            Msg::Piece(p) => match p {
                Piece::Start {
                    path,
                    delta,
                    size,
                    mode,
                    mtime,
                } => {
                    e.path(path);
                    e.u8(*delta as u8);
                    e.u64(*size);
                    e.u32(*mode);
                    e.time(*mtime);
                    10
                }
                Piece::Data(b) => {
                    e.0.extend_from_slice(b);
                    DATA_TAG
                }
                Piece::End { hash } => {
                    e.0.extend_from_slice(hash);
                    12
                }
                Piece::Skip { path, reason } => {
                    e.path(path);
                    e.str(reason);
                    13
                }
            },
            Msg::ListingPart(entries) => {
                e.u32(entries.len() as u32);
                entries.iter().for_each(|x| enc_entry(&mut e, x));
                101
            }
            Msg::ListingEnd { root_exists } => {
                e.u8(*root_exists as u8);
                107
            }
            Msg::Sigs(sigs) => {
                e.u32(sigs.len() as u32);
                for s in sigs {
                    match s {
                        Some(s) => {
                            e.u8(1);
                            e.bytes(s);
                        }
                        None => e.u8(0),
                    }
                }
                102
            }
            Msg::SendDone => 103,
            Msg::RecvDone(r) => {
                e.u64(r.files);
                e.u64(r.bytes);
                e.u32(r.mismatched.len() as u32);
                r.mismatched.iter().for_each(|p| e.path(p));
                e.u32(r.failed.len() as u32);
                for (p, m) in &r.failed {
                    e.path(p);
                    e.str(m);
                }
                104
            }
            Msg::Applied(rs) => {
                e.u32(rs.len() as u32);
                rs.iter().for_each(|r| e.opt_str(r));
                105
            }
            Msg::Error(m) => {
                e.str(m);
                199
            }
        };
        (tag, e.0)
    }

    pub fn decode(tag: u8, body: &[u8]) -> Result<Msg> {
        let mut d = Dec(body);
        let m = match tag {
            1 => Msg::Root(d.str()?),
            2 => {
                let start = d.path()?;
                let hashes = d.bool()?;
                let clean_temps = d.bool()?;
                let n = d.count(8)?;
                let excludes = d.items(n, Dec::str)?;
                Msg::List(ListOpts {
                    start,
                    hashes,
                    excludes,
                    clean_temps,
                })
            }
            3 => {
                let n = d.count(8)?;
                Msg::Signatures(d.items(n, Dec::path)?)
            }
            4 => {
                let n = d.count(9)?;
                // Grown as items decode, never sized by the peer's count.
                let mut reqs = Vec::new();
                for _ in 0..n {
                    let path = d.path()?;
                    let signature = if d.bool()? {
                        Some(d.bytes()?.to_vec())
                    } else {
                        None
                    };
                    reqs.push(SendReq { path, signature });
                }
                Msg::Send(reqs)
            }
            5 => Msg::RecvBegin,
            6 => Msg::RecvEnd,
            7 => {
                let n = d.count(1)?;
                let mut ops = Vec::new();
                for _ in 0..n {
                    ops.push(match d.u8()? {
                        0 => Op::MkRoot,
                        1 => Op::Mkdir {
                            path: d.path()?,
                            mode: d.u32()? & 0o7777,
                        },
                        2 => Op::Symlink {
                            path: d.path()?,
                            target: d.str()?,
                        },
                        3 => Op::Delete {
                            path: d.path()?,
                            recursive: d.bool()?,
                        },
                        4 => {
                            let path = d.path()?;
                            let has_mode = d.bool()?;
                            let mode = d.u32()? & 0o7777;
                            let has_time = d.bool()?;
                            let t = d.time()?;
                            Op::SetMeta {
                                path,
                                mode: has_mode.then_some(mode),
                                mtime: has_time.then_some(t),
                            }
                        }
                        k => bail!("unknown op {k}"),
                    });
                }
                Msg::Apply(ops)
            }
            10 => Msg::Piece(Piece::Start {
                path: d.path()?,
                delta: d.bool()?,
                size: d.u64()?,
                mode: d.u32()? & 0o7777,
                mtime: d.time()?,
            }),
            DATA_TAG => {
                let b = d.take(body.len())?.to_vec();
                Msg::Piece(Piece::Data(b))
            }
            12 => Msg::Piece(Piece::End { hash: d.hash()? }),
            13 => Msg::Piece(Piece::Skip {
                path: d.path()?,
                reason: d.str()?,
            }),
            101 => {
                // Path length, kind, mode, mtime, hash flag.
                let n = d.count(8 + 1 + 4 + 12 + 1)?;
                Msg::ListingPart(d.items(n, dec_entry)?)
            }
            107 => Msg::ListingEnd {
                root_exists: d.bool()?,
            },
            102 => {
                let n = d.count(1)?;
                let mut sigs = Vec::new();
                for _ in 0..n {
                    sigs.push(if d.bool()? {
                        Some(d.bytes()?.to_vec())
                    } else {
                        None
                    });
                }
                Msg::Sigs(sigs)
            }
            103 => Msg::SendDone,
            104 => {
                let files = d.u64()?;
                let bytes = d.u64()?;
                let n = d.count(8)?;
                let mismatched = d.items(n, Dec::path)?;
                let n = d.count(16)?;
                let failed = d.items(n, |d| Ok((d.path()?, d.str()?)))?;
                Msg::RecvDone(RecvReport {
                    files,
                    bytes,
                    mismatched,
                    failed,
                })
            }
            105 => {
                let n = d.count(1)?;
                Msg::Applied(d.items(n, Dec::opt_str)?)
            }
            199 => Msg::Error(d.str()?),
            t => bail!("unknown message tag {t}"),
        };
        d.end()?;
        Ok(m)
    }
}

/// Write one message; returns the bytes written. Does not flush. A message bigger than its
/// kind's limit is refused here, where the error names it, rather than by the peer.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<u64> {
    // File data, nearly every byte of a sync, is written from where it is, not encoded first.
    if let Msg::Piece(Piece::Data(data)) = m {
        return write_frame(w, DATA_TAG, data).await;
    }
    let (tag, body) = m.encode();
    write_frame(w, tag, &body).await
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, tag: u8, body: &[u8]) -> Result<u64> {
    let limit = body_limit(tag).unwrap_or(0);
    if body.len() > limit {
        bail!(
            "message {tag} of {} bytes exceeds its limit of {limit}",
            body.len()
        );
    }
    // In range: every limit is far below u32::MAX.
    let len = (body.len() + 1) as u32;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_u8(tag).await?;
    w.write_all(body).await?;
    Ok(4 + len as u64)
}

/// Write `entries` as listing parts of about [`LISTING_PART`] bytes each, then the end marker;
/// returns the bytes written. Encoded part by part, so the wire form of a huge listing is never
/// in memory at once.
pub async fn write_listing<W: AsyncWrite + Unpin>(
    w: &mut W,
    entries: &[Entry],
    root_exists: bool,
) -> Result<u64> {
    let mut total = 0;
    let mut rest = entries;
    while !rest.is_empty() {
        let mut e = Enc::default();
        e.u32(0);
        let mut n = 0;
        while n < rest.len() && e.0.len() < LISTING_PART {
            enc_entry(&mut e, &rest[n]);
            n += 1;
        }
        e.0[..4].copy_from_slice(&(n as u32).to_le_bytes());
        total += write_frame(w, 101, &e.0).await?;
        rest = &rest[n..];
    }
    Ok(total + write_msg(w, &Msg::ListingEnd { root_exists }).await?)
}

/// Read one message; `None` at a clean end of stream. Returns the bytes read too.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Msg, u64)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("connection to the agent failed"),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        bail!("bad frame length 0");
    }
    let tag = r.read_u8().await.context("truncated frame")?;
    let Some(limit) = body_limit(tag) else {
        bail!("unknown message tag {tag}");
    };
    if len - 1 > limit {
        bail!(
            "message {tag} of {} bytes exceeds its limit of {limit}",
            len - 1
        );
    }
    // Sized up front, so the body is read in place rather than regrown and copied; capped, so
    // a length alone cannot make us allocate much.
    let mut body = Vec::with_capacity((len - 1).min(PREALLOC_MAX));
    (&mut *r)
        .take(len as u64 - 1)
        .read_to_end(&mut body)
        .await
        .context("truncated frame")?;
    if body.len() != len - 1 {
        bail!("truncated frame");
    }
    if tag == DATA_TAG {
        // The body is the data: moved, not copied.
        return Ok(Some((Msg::Piece(Piece::Data(body)), 4 + len as u64)));
    }
    Ok(Some((Msg::decode(tag, &body)?, 4 + len as u64)))
}

/// Read one message, treating the end of the stream as an error.
pub async fn expect_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Msg, u64)> {
    read_msg(r)
        .await?
        .context("the agent closed the connection")
}

/// The 16 bytes each side sends first.
pub fn hello() -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..12].copy_from_slice(MAGIC);
    h[12..].copy_from_slice(&PROTO.to_le_bytes());
    h
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rt(m: Msg) {
        let (tag, body) = m.encode();
        assert_eq!(Msg::decode(tag, &body).unwrap(), m);
    }

    /// Frames as written by write_msg, whose data path skips encode(), and read back. The
    /// unwraps are on an in-memory buffer the test itself wrote: failing is the test failing.
    #[tokio::test]
    async fn frames_match_encode_and_read_back() {
        let msgs = [
            Msg::Piece(Piece::Data((0..MAX_DATA as u32).map(|i| i as u8).collect())),
            Msg::Piece(Piece::Data(vec![7])),
            Msg::Piece(Piece::End { hash: [9; 32] }),
            Msg::RecvBegin,
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            write_msg(&mut wire, m).await.unwrap();
        }
        let mut want = Vec::new();
        for m in &msgs {
            let (tag, body) = m.encode();
            want.extend_from_slice(&(body.len() as u32 + 1).to_le_bytes());
            want.push(tag);
            want.extend_from_slice(&body);
        }
        assert_eq!(wire, want);
        let mut r = &wire[..];
        for m in msgs {
            assert_eq!(read_msg(&mut r).await.unwrap().unwrap().0, m);
        }
        assert!(read_msg(&mut r).await.unwrap().is_none());
    }

    #[test]
    fn messages_round_trip() {
        let p = RelPath::parse("a/b").unwrap();
        rt(Msg::Root("/x".into()));
        rt(Msg::List(ListOpts {
            start: p.clone(),
            hashes: true,
            excludes: vec!["*.o".into()],
            clean_temps: true,
        }));
        rt(Msg::Signatures(vec![p.clone(), RelPath::root()]));
        rt(Msg::Send(vec![SendReq {
            path: p.clone(),
            signature: Some(vec![1, 2]),
        }]));
        rt(Msg::Apply(vec![
            Op::MkRoot,
            Op::Mkdir {
                path: p.clone(),
                mode: 0o755,
            },
            Op::Symlink {
                path: p.clone(),
                target: "../t".into(),
            },
            Op::Delete {
                path: p.clone(),
                recursive: true,
            },
            Op::SetMeta {
                path: p.clone(),
                mode: None,
                mtime: Some(FileTime::new(-5, 7)),
            },
        ]));
        rt(Msg::Piece(Piece::Start {
            path: p.clone(),
            delta: true,
            size: 9,
            mode: 0o600,
            mtime: FileTime::new(10_413_792_000, 123_456_789),
        }));
        rt(Msg::Piece(Piece::Data(vec![0; 1000])));
        rt(Msg::Piece(Piece::End { hash: [7; 32] }));
        rt(Msg::ListingPart(vec![Entry {
            path: p.clone(),
            kind: EntryKind::Symlink { target: "t".into() },
            mode: 0o777,
            mtime: FileTime::from_secs(3),
            hash: Some([1; 32]),
        }]));
        rt(Msg::ListingEnd { root_exists: true });
        rt(Msg::Sigs(vec![None, Some(vec![3; 40])]));
        rt(Msg::RecvDone(RecvReport {
            files: 2,
            bytes: 3,
            mismatched: vec![p.clone()],
            failed: vec![(p, "no".into())],
        }));
        rt(Msg::Applied(vec![None, Some("x".into())]));
        rt(Msg::Error("boom".into()));
    }

    #[test]
    fn escaping_paths_are_refused() {
        let (tag, mut body) = Msg::Signatures(vec![RelPath::parse("ab").unwrap()]).encode();
        let at = body.len() - 2;
        body[at..].copy_from_slice(b"..");
        assert!(Msg::decode(tag, &body).is_err());
    }

    /// A frame as the peer would send it: length, tag, body.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = (body.len() as u32 + 1).to_le_bytes().to_vec();
        f.push(tag);
        f.extend_from_slice(body);
        f
    }

    async fn read_err(wire: &[u8]) -> String {
        let mut r = wire;
        format!("{:#}", read_msg(&mut r).await.unwrap_err())
    }

    #[tokio::test]
    async fn huge_item_counts_are_refused_before_anything_is_allocated() {
        // Sigs, Send, Apply, listing parts, Signatures, Applied: a count of 4 billion in a
        // frame of a few bytes, which `with_capacity` would have turned into gigabytes.
        for tag in [102, 4, 7, 101, 3, 105] {
            let mut body = u32::MAX.to_le_bytes().to_vec();
            body.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
            let e = read_err(&frame(tag, &body)).await;
            assert!(e.contains("exceeds message size"), "tag {tag}: {e}");
        }
        // A count that fits the body only if items were smaller than they can be.
        let e = format!(
            "{:#}",
            Msg::decode(102, &[9, 0, 0, 0, 1, 2, 3, 4, 5]).unwrap_err()
        );
        assert!(e.contains("exceeds message size"), "{e}");
    }

    #[tokio::test]
    async fn each_kind_has_its_own_frame_limit() {
        // Only the header is on the wire: a reader that believed the length would report a
        // truncated frame (after allocating for it) instead of the limit.
        for (tag, limit) in [
            (DATA_TAG, MAX_DATA),
            (101, LISTING_PART + (64 << 10)),
            (7, 2 * REQUEST_PART),
            (12, 32),
            (103, 0),
            (102, MAX_SIG + (24 << 20)),
        ] {
            let mut wire = (limit as u32 + 2).to_le_bytes().to_vec();
            wire.push(tag);
            let e = read_err(&wire).await;
            assert!(e.contains("exceeds its limit"), "tag {tag}: {e}");
        }
        // The 512 MiB frame that used to be accepted for any kind.
        let mut wire = (512u32 << 20).to_le_bytes().to_vec();
        wire.push(4);
        assert!(read_err(&wire).await.contains("exceeds its limit"));
        let mut wire = 10u32.to_le_bytes().to_vec();
        wire.push(77);
        assert!(read_err(&wire).await.contains("unknown message tag 77"));
        // Data a sender makes is within the limit; one byte more is refused on writing too.
        let ok = Msg::Piece(Piece::Data(vec![1; MAX_DATA]));
        write_msg(&mut Vec::new(), &ok).await.unwrap();
        let big = Msg::Piece(Piece::Data(vec![1; MAX_DATA + 1]));
        assert!(write_msg(&mut Vec::new(), &big).await.is_err());
    }

    #[tokio::test]
    async fn truncated_bodies_are_errors() {
        let whole = frame(4, &Msg::Send(vec![]).encode().1);
        let mut cut = frame(10, &[0; 30]);
        cut.truncate(20);
        assert!(read_err(&cut).await.contains("truncated frame"));
        // A body that ends inside an item.
        let (tag, body) = Msg::Signatures(vec![RelPath::parse("abc").unwrap()]).encode();
        for n in 0..body.len() {
            assert!(Msg::decode(tag, &body[..n]).is_err(), "cut at {n}");
        }
        assert!(read_msg(&mut &whole[..]).await.is_ok());
    }

    #[tokio::test]
    async fn listings_stream_in_bounded_parts_and_read_back_whole() {
        let entries: Vec<Entry> = (0..40_000)
            .map(|i| Entry {
                path: RelPath::parse(&format!("dir{}/file-with-a-longish-name-{i}", i % 97))
                    .unwrap(),
                kind: EntryKind::File { size: i },
                mode: 0o644,
                mtime: FileTime::new(i as i64, 5),
                hash: None,
            })
            .collect();
        let mut wire = Vec::new();
        write_listing(&mut wire, &entries, true).await.unwrap();
        let mut r = &wire[..];
        let (mut got, mut parts) = (Vec::new(), 0);
        loop {
            let before = r.len();
            match read_msg(&mut r).await.unwrap().unwrap().0 {
                Msg::ListingPart(p) => {
                    assert!(before - r.len() <= LISTING_PART + 4096);
                    parts += 1;
                    got.extend(p);
                }
                Msg::ListingEnd { root_exists } => {
                    assert!(root_exists);
                    break;
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        assert!(parts >= 2, "{parts} parts");
        assert_eq!(got, entries);
        // An empty listing is just the end marker.
        let mut wire = Vec::new();
        write_listing(&mut wire, &[], false).await.unwrap();
        let m = read_msg(&mut &wire[..]).await.unwrap().unwrap().0;
        assert_eq!(m, Msg::ListingEnd { root_exists: false });
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(Msg::decode(101, &[1, 255, 255, 255, 255]).is_err());
        assert!(Msg::decode(2, &[]).is_err());
        assert!(Msg::decode(250, &[]).is_err());
        assert!(Msg::decode(103, &[0]).is_err());
    }
}
