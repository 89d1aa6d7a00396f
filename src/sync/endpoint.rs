//! One side of a sync, local or remote, behind one interface, so every direction (local→remote,
//! remote→local, remote→remote, even local→local) runs the same engine.
//!
//! Every call is a batch (a whole listing, all signatures, all files, all metadata changes), so a
//! remote endpoint costs a round trip per phase, not per file. File contents flow as a stream of
//! [`Piece`]s through a bounded channel from the sender's `send` to the receiver's `receive`;
//! for remote→remote the client only relays them. The SFTP-backed endpoint (`--no-agent`, see
//! `sftp`) implements the same trait, answering `signatures` with `None` so everything is sent
//! whole.

use crate::fs::FileTime;
use anyhow::Result;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::listing::{ListOpts, Listing, RelPath};

/// Ask the sender for one file: as a delta against `signature` (the receiver's old copy), or whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReq {
    pub path: RelPath,
    pub signature: Option<Vec<u8>>,
}

/// A piece of the file stream: `Start`, any number of `Data`, `End` (or one `Skip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Start {
        path: RelPath,
        /// `Data` is a delta against the receiver's current file, not the content.
        delta: bool,
        /// Size of the new content.
        size: u64,
        mode: u32,
        mtime: FileTime,
    },
    Data(Vec<u8>),
    /// BLAKE3 of the whole new content: checked before the file is renamed into place.
    End {
        hash: [u8; 32],
    },
    /// The sender could not read this file (vanished, permission denied): instead of its
    /// `Start`, or after it and some `Data` when the file changed while it was read, which
    /// makes the receiver drop what it has of it.
    Skip {
        path: RelPath,
        reason: String,
    },
}

/// A change to the receiving tree other than file content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the root directory itself (its parent must exist).
    MkRoot,
    Mkdir {
        path: RelPath,
        mode: u32,
    },
    Symlink {
        path: RelPath,
        target: String,
    },
    /// Remove an entry; `recursive` only when a directory is replaced by something else.
    Delete {
        path: RelPath,
        recursive: bool,
    },
    SetMeta {
        path: RelPath,
        mode: Option<u32>,
        mtime: Option<FileTime>,
    },
}

/// What a receiver did with a file stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecvReport {
    pub files: u64,
    /// Content bytes of the files written.
    pub bytes: u64,
    /// Files whose delta did not rebuild to the sender's hash: retry them whole.
    pub mismatched: Vec<RelPath>,
    pub failed: Vec<(RelPath, String)>,
}

/// One side of a sync.
pub trait Endpoint: Send {
    /// List `opts.start` and below, one round trip.
    fn list(&mut self, opts: ListOpts) -> BoxFuture<'_, Result<Listing>>;
    /// Block signatures of existing regular files (`None` where there is none).
    fn signatures(&mut self, paths: Vec<RelPath>) -> BoxFuture<'_, Result<Vec<Option<Vec<u8>>>>>;
    /// Stream the requested files into `out`, in order.
    fn send(&mut self, reqs: Vec<SendReq>, out: mpsc::Sender<Piece>) -> BoxFuture<'_, Result<()>>;
    /// Write files from `input`, each via a temporary file and a rename.
    fn receive(&mut self, input: mpsc::Receiver<Piece>) -> BoxFuture<'_, Result<RecvReport>>;
    /// Apply changes in order; one result per op (`Some(message)` when it failed).
    fn apply(&mut self, ops: Vec<Op>) -> BoxFuture<'_, Result<Vec<Option<String>>>>;
    /// Another endpoint on the same root with its own connection, for parallel transfers
    /// (`None` when this endpoint cannot open one).
    fn fork(&self) -> BoxFuture<'_, Result<Option<Box<dyn Endpoint>>>> {
        Box::pin(async { Ok(None) })
    }
    /// Bytes this endpoint moved over its connection (0 for a local one).
    fn wire_bytes(&self) -> u64 {
        0
    }
}

/// The `Skip` reason for a file that was gone when the sender came to read it (rsync's
/// "vanished"); counted apart, because only these make a run exit with status 24.
pub const VANISHED: &str = "vanished";

/// Largest `Data` piece: big enough to keep pipes busy, small enough to bound memory.
pub const CHUNK: usize = 256 * 1024;
