//! The framed protocol between a client and its master, one Unix connection per channel.
//!
//! A frame is a kind byte, a big-endian u32 payload length and the payload. Every kind has its
//! own size limit, checked before a byte of the payload is read, so a peer can never make us
//! allocate more than [`MAX_DATA`] for one frame. Control-plane payloads (requests, replies,
//! statuses) are small JSON documents; data frames carry raw bytes.
//!
//! The conversation: the client sends one [`Request`]; the master answers with one [`Reply`]
//! (`Opened` once the channel is open on its SSH session). Then stdin flows one way and
//! stdout, stderr and the end status the other, until either side sends [`Kind::Close`] or the
//! connection ends. A connection that ends before the status frame is a lost connection.

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped whenever frames or messages change; part of the socket name, so a client never
/// talks to a master of another version.
pub const VERSION: u32 = 1;

/// Largest data frame (stdin, stdout, stderr). Readers split their reads to fit.
pub const MAX_DATA: usize = 256 * 1024;
/// Largest request, reply or status document.
const MAX_DOC: usize = 64 * 1024;
/// Largest control message (signal, resize).
const MAX_CONTROL: usize = 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client → master: the [`Request`] (first frame of a connection).
    Request = 1,
    /// Client → master: bytes for the channel's stdin.
    Stdin = 2,
    /// Client → master: end of stdin.
    StdinEof = 3,
    /// Client → master: a [`ControlFrame`].
    Control = 4,
    /// Either way: this side is done with the channel; the master closes it.
    Close = 5,
    /// Master → client: the [`Reply`] to the request.
    Reply = 16,
    Stdout = 17,
    Stderr = 18,
    StdoutEof = 19,
    StderrEof = 20,
    /// Master → client: the channel's [`EndStatus`]; nothing follows it.
    Status = 21,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Request,
            2 => Kind::Stdin,
            3 => Kind::StdinEof,
            4 => Kind::Control,
            5 => Kind::Close,
            16 => Kind::Reply,
            17 => Kind::Stdout,
            18 => Kind::Stderr,
            19 => Kind::StdoutEof,
            20 => Kind::StderrEof,
            21 => Kind::Status,
            _ => return None,
        })
    }

    /// The most a peer may put in one frame of this kind.
    fn limit(self) -> usize {
        match self {
            Kind::Stdin | Kind::Stdout | Kind::Stderr => MAX_DATA,
            Kind::Request | Kind::Reply | Kind::Status => MAX_DOC,
            Kind::Control => MAX_CONTROL,
            Kind::StdinEof | Kind::Close | Kind::StdoutEof | Kind::StderrEof => 0,
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(kind: Kind, payload: Bytes) -> Frame {
        Frame { kind, payload }
    }

    pub fn empty(kind: Kind) -> Frame {
        Frame::new(kind, Bytes::new())
    }

    /// A frame whose payload is `doc` as JSON.
    pub fn doc<T: Serialize>(kind: Kind, doc: &T) -> Result<Frame> {
        let payload = serde_json::to_vec(doc).context("cannot encode a master message")?;
        if payload.len() > kind.limit() {
            bail!("a {kind:?} message is too large ({} bytes)", payload.len());
        }
        Ok(Frame::new(kind, payload.into()))
    }

    /// The payload as a JSON document of type `T`.
    pub fn parse<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        serde_json::from_slice(&self.payload)
            .with_context(|| format!("malformed {:?} message from the peer", self.kind))
    }
}

/// Read one frame; `Ok(None)` at a clean end of the stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        let n = r
            .read(&mut head[got..])
            .await
            .context("cannot read from the master connection")?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("the peer ended the connection inside a frame header");
        }
        got += n;
    }
    let Some(kind) = Kind::from_u8(head[0]) else {
        bail!("unknown frame kind {} from the peer", head[0]);
    };
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > kind.limit() {
        bail!(
            "a {kind:?} frame of {len} bytes is over its limit of {}",
            kind.limit()
        );
    }
    // The length is bounded by the kind's limit just above.
    let mut payload = BytesMut::zeroed(len);
    r.read_exact(&mut payload)
        .await
        .context("the peer ended the connection inside a frame")?;
    Ok(Some(Frame {
        kind,
        payload: payload.freeze(),
    }))
}

/// Write one frame (header and payload in one vectored write where possible).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    use bytes::Buf;
    debug_assert!(frame.payload.len() <= frame.kind.limit());
    let mut head = [0u8; 5];
    head[0] = frame.kind as u8;
    // Payloads are at most MAX_DATA (checked by every constructor's caller), far below u32::MAX.
    head[1..].copy_from_slice(&(frame.payload.len() as u32).to_be_bytes());
    let mut buf = Buf::chain(&head[..], frame.payload.clone());
    w.write_all_buf(&mut buf).await
}

/// Buffer size for each direction of a master connection: headers and small frames are read
/// and written in batches, large data frames pass straight through.
pub const IO_BUFFER: usize = 256 * 1024;

/// Write `first` and whatever else is already queued, then flush: one system call for a burst
/// of small frames.
pub async fn write_queued<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: Frame,
    queue: &mut tokio::sync::mpsc::Receiver<Frame>,
) -> std::io::Result<()> {
    write_frame(w, &first).await?;
    while let Ok(f) = queue.try_recv() {
        write_frame(w, &f).await?;
    }
    w.flush().await
}

/// What a client asks for on a new connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Who are you: answered with [`Reply::Info`] at once, even while the master connects.
    Hello,
    /// Like `Hello`, without counting as use (what `vtun master list` asks).
    Info,
    /// Answered with [`Reply::Info`] once the master's SSH connection is up, or with the
    /// reason it could not connect.
    Ready,
    /// An SFTP subsystem stream.
    Sftp,
    /// A command as a byte stream; its stderr comes back as stderr frames.
    Exec { command: String },
    /// A full exec channel.
    OpenExec(ExecSpec),
    /// A TCP stream to host:port as seen from the VM.
    DirectTcpip { host: String, port: u16 },
    /// End the master (answered with [`Reply::Info`] first).
    Stop,
}

/// [`crate::link::ExecRequest`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecSpec {
    /// The command line; `None` for the login shell.
    pub command: Option<String>,
    pub pty: Option<PtySpec>,
    pub env: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PtySpec {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub modes: Vec<(u8, u32)>,
}

/// The master's answer to a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Opened,
    Info(Info),
    Failed(Fail),
}

/// What `vtun master list` shows about one master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Info {
    /// The VM's full name.
    pub host: String,
    pub user: String,
    pub port: u16,
    pub pid: u32,
    /// Seconds since the last channel closed (0 while channels are open).
    pub idle_secs: u64,
    /// Channels open through the master now.
    pub channels: usize,
    /// SSH connections it holds (more than one once sshd refused more channels on the first).
    pub connections: usize,
    /// How long it stays up without channels.
    pub persist_secs: u64,
}

/// How a channel ended, or why it could not open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EndStatus {
    /// The remote command exited with this code.
    Exited(u32),
    /// Killed by a signal (named without `SIG`).
    Killed { name: String, core_dumped: bool },
    /// The channel ended for this reason (no status).
    Failed(Fail),
}

/// An error carried across the socket, with the kind the exit code depends on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fail {
    /// True when it is the connection that failed (exit 255), not the request.
    pub connection: bool,
    /// True when authentication failed: a master has no terminal to ask for a passphrase,
    /// so the client tries once itself.
    #[serde(default)]
    pub auth: bool,
    pub message: String,
}

/// A control request for an exec channel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ControlFrame {
    Signal(String),
    Resize { cols: u32, rows: u32 },
}

// Tests only: unwrap on in-memory buffers the test built.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn decode(bytes: &[u8]) -> Result<Option<Frame>> {
        let mut r = bytes;
        read_frame(&mut r).await
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        let f = Frame::new(Kind::Stdout, Bytes::from_static(b"hello"));
        write_frame(&mut buf, &f).await.unwrap();
        let req = Frame::doc(
            Kind::Request,
            &Request::Exec {
                command: "ls".into(),
            },
        )
        .unwrap();
        write_frame(&mut buf, &req).await.unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap(), f);
        let back = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(
            back.parse::<Request>().unwrap(),
            Request::Exec {
                command: "ls".into()
            }
        );
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    /// A hostile length is refused from the header alone, before any allocation.
    #[tokio::test]
    async fn oversized_and_unknown_frames_are_refused() {
        let mut head = vec![Kind::Stdout as u8];
        head.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&head).await.is_err());
        let mut head = vec![Kind::Control as u8];
        head.extend_from_slice(&(MAX_CONTROL as u32 + 1).to_be_bytes());
        assert!(decode(&head).await.is_err());
        let mut head = vec![Kind::Close as u8];
        head.extend_from_slice(&1u32.to_be_bytes());
        assert!(decode(&head).await.is_err());
        assert!(decode(&[99, 0, 0, 0, 0]).await.is_err());
    }

    #[tokio::test]
    async fn truncated_frames_are_errors_not_ends() {
        assert!(decode(&[Kind::Stdout as u8, 0]).await.is_err());
        assert!(decode(&[Kind::Stdout as u8, 0, 0, 0, 4, b'a'])
            .await
            .is_err());
        assert!(decode(&[]).await.unwrap().is_none());
    }

    #[test]
    fn garbage_documents_are_errors() {
        let f = Frame::new(Kind::Request, Bytes::from_static(b"{\"exec\":"));
        assert!(f.parse::<Request>().is_err());
    }
}
