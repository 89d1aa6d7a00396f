//! The agent's wire protocol: a handshake, then length-prefixed binary frames.
//!
//! The agent speaks first: [`MAGIC`] and its protocol version. The client skips anything before
//! the magic, because a remote login shell may print banners from `.bashrc`. Then the client sends
//! the same magic and version, and requests; each request gets its replies in order, so the
//! client may pipeline. Every field read from the peer is checked (paths become [`RelPath`]s,
//! lengths are bounded by the frame), and a malformed frame is an error, never a panic.
//!
//! Frame: `u32` little-endian length of what follows, a tag byte, the body.

use crate::fs::FileTime;
use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::endpoint::{Op, Piece, RecvReport, SendReq};
use super::tree::{Entry, EntryKind, ListOpts, Listing, RelPath};

pub const MAGIC: &[u8; 12] = b"\x00vtun-agent\x00";
/// Bump on any incompatible change; agents of another version are not used.
pub const PROTO: u32 = 3;
/// Largest frame accepted (a listing of a very large tree is the biggest).
pub const MAX_FRAME: usize = 512 << 20;

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
    Listing(Listing),
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
            Msg::Listing(l) => {
                e.u8(l.root_exists as u8);
                e.u32(l.entries.len() as u32);
                l.entries.iter().for_each(|x| enc_entry(&mut e, x));
                101
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
                let excludes = (0..n).map(|_| d.str()).collect::<Result<_>>()?;
                Msg::List(ListOpts {
                    start,
                    hashes,
                    excludes,
                    clean_temps,
                })
            }
            3 => {
                let n = d.count(8)?;
                Msg::Signatures((0..n).map(|_| d.path()).collect::<Result<_>>()?)
            }
            4 => {
                let n = d.count(9)?;
                let mut reqs = Vec::with_capacity(n);
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
                let mut ops = Vec::with_capacity(n);
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
                let root_exists = d.bool()?;
                let n = d.count(8)?;
                let entries = (0..n).map(|_| dec_entry(&mut d)).collect::<Result<_>>()?;
                Msg::Listing(Listing {
                    root_exists,
                    entries,
                    mtime_seconds: false,
                })
            }
            102 => {
                let n = d.count(1)?;
                let mut sigs = Vec::with_capacity(n);
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
                let mismatched = (0..n).map(|_| d.path()).collect::<Result<_>>()?;
                let n = d.count(16)?;
                let failed = (0..n)
                    .map(|_| Ok((d.path()?, d.str()?)))
                    .collect::<Result<_>>()?;
                Msg::RecvDone(RecvReport {
                    files,
                    bytes,
                    mismatched,
                    failed,
                })
            }
            105 => {
                let n = d.count(1)?;
                Msg::Applied((0..n).map(|_| d.opt_str()).collect::<Result<_>>()?)
            }
            199 => Msg::Error(d.str()?),
            t => bail!("unknown message tag {t}"),
        };
        d.end()?;
        Ok(m)
    }
}

/// Write one message; returns the bytes written. Does not flush.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<u64> {
    // File data, nearly every byte of a sync, is written from where it is, not encoded first.
    if let Msg::Piece(Piece::Data(data)) = m {
        let len = u32::try_from(data.len() + 1).context("message too large")?;
        w.write_all(&len.to_le_bytes()).await?;
        w.write_u8(DATA_TAG).await?;
        w.write_all(data).await?;
        return Ok(4 + len as u64);
    }
    let (tag, body) = m.encode();
    let len = u32::try_from(body.len() + 1).context("message too large")?;
    w.write_all(&len.to_le_bytes()).await?;
    w.write_u8(tag).await?;
    w.write_all(&body).await?;
    Ok(4 + len as u64)
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
    if len == 0 || len > MAX_FRAME {
        bail!("bad frame length {len}");
    }
    let tag = r.read_u8().await.context("truncated frame")?;
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
            Msg::Piece(Piece::Data((0..300_000u32).map(|i| i as u8).collect())),
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
        rt(Msg::Listing(Listing {
            root_exists: true,
            entries: vec![Entry {
                path: p.clone(),
                kind: EntryKind::Symlink { target: "t".into() },
                mode: 0o777,
                mtime: FileTime::from_secs(3),
                hash: Some([1; 32]),
            }],
            mtime_seconds: false,
        }));
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

    #[test]
    fn garbage_is_an_error() {
        assert!(Msg::decode(101, &[1, 255, 255, 255, 255]).is_err());
        assert!(Msg::decode(2, &[]).is_err());
        assert!(Msg::decode(250, &[]).is_err());
        assert!(Msg::decode(103, &[0]).is_err());
    }
}
