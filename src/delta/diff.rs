//! The sender's side: walk the new file once against the receiver's signature and stream the
//! delta out in pieces while walking.
//!
//! At each position the block after the last match is tried first, by strong hash alone: in an
//! unchanged stretch that is one BLAKE3 per block and no rolling. Only after a miss does the
//! walk roll the weak sum byte by byte, looking each value up in the [`Index`], until some block
//! matches again. Consecutive copies are merged into runs, and a run is cut every [`RUN_MAX`]
//! bytes so the receiver gets work while the sender is still hashing. The walk also yields the
//! new file's BLAKE3, mostly from values it computed anyway (see `filehash`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use blake3::hazmat::ChainingValue;

use super::filehash::{chaining_value, FileHash};
use super::signature::{strong, Index, Signature};
use super::weak::Rolling;
use super::{OP_COPY, OP_LITERAL, VERSION};

/// Longest copy run: a piece goes out at least this often while the file is unchanged.
const RUN_MAX: u64 = 8 << 20;
/// Size at which a piece is handed on, and the longest literal op.
const PIECE: usize = 256 << 10;
/// No piece is bigger than this: a piece is handed on as soon as it reaches [`PIECE`], and the
/// most one op can add to an almost full piece is a copy op (17 bytes); the first piece also
/// holds the header.
pub const MAX_PIECE: usize = PIECE + 64;
/// Candidates with the right weak sum checked per position: more only happens when many blocks
/// share a weak sum but not their content, which takes a crafted signature.
const MAX_CANDIDATES: usize = 8;

/// Stream the delta that turns the file behind `sig` into `new` to `emit`, in pieces of about
/// 256 KiB (more often while long copy runs go by). Returns the BLAKE3 of `new`.
pub fn diff(
    sig: &Signature,
    new: &[u8],
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<[u8; 32]> {
    walk(sig, &new, new.len(), WINDOW, emit)
}

/// [`diff`] for the first `len` bytes of an open file, read in windows with `pread`. If the
/// file is shorter than `len` by the time a window is read, the error says it changed.
pub fn diff_file(
    sig: &Signature,
    file: &File,
    len: u64,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<[u8; 32]> {
    let len = usize::try_from(len).context("file too large")?;
    walk(sig, file, len, WINDOW, emit)
}

/// The walk over `len` bytes of `src`, reading `window` bytes at a time.
pub(super) fn walk(
    sig: &Signature,
    src: &dyn Source,
    len: usize,
    window: usize,
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<[u8; 32]> {
    std::thread::scope(|scope| {
        let mut w = Walk {
            sig,
            index: Index::new(sig),
            win: Window {
                src,
                len,
                size: window,
                base: 0,
                buf: Vec::new(),
            },
            out: Out {
                buf: Vec::with_capacity(PIECE + 64),
                run: None,
                emit,
            },
            literal_from: 0,
            hash: FileHash::new(len, sig.block_size(), scope),
        };
        w.out.buf.push(VERSION);
        w.out.buf.extend_from_slice(&sig.token().to_bytes());
        w.run()
    })
}

/// Where the new file's bytes come from.
pub(super) trait Source {
    /// Append the `len` bytes at `offset` to `buf`.
    fn append(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> Result<()>;
}

impl Source for &[u8] {
    fn append(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> Result<()> {
        let at = offset as usize;
        buf.extend_from_slice(&self[at..at + len]);
        Ok(())
    }
}

impl Source for File {
    fn append(&self, buf: &mut Vec<u8>, offset: u64, len: usize) -> Result<()> {
        // Straight into the window's own (reused) buffer: a fresh multi-MiB allocation per
        // window would be page-faulted in anew each time, then copied.
        let start = buf.len();
        buf.resize(start + len, 0);
        match self.read_exact_at(&mut buf[start..], offset) {
            Ok(()) => Ok(()),
            Err(e) => {
                buf.truncate(start);
                match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => bail!(CHANGED),
                    _ => Err(e).context("cannot read the file"),
                }
            }
        }
    }
}

/// What a short read means: the file was truncated under us.
pub const CHANGED: &str = "changed while being read";

/// The part of the new file in memory: `buf` holds bytes `base..base + buf.len()`. The walk
/// only looks back as far as the literal bytes it has not emitted and the blocks whose hash
/// is still owed, a few hundred KiB at most, so a window of a few MiB is read at a time and
/// the file is never mapped (a mapped file truncated by another process kills us with SIGBUS).
struct Window<'s> {
    src: &'s dyn Source,
    len: usize,
    size: usize,
    base: usize,
    buf: Vec<u8>,
}

impl Window<'_> {
    fn end(&self) -> usize {
        self.base + self.buf.len()
    }

    /// Make `keep..to` available, dropping what is before `keep` (never before `base`: both
    /// only grow) and reading ahead a window's worth.
    fn need(&mut self, keep: usize, to: usize) -> Result<()> {
        if to <= self.end() {
            return Ok(());
        }
        let keep = keep.clamp(self.base, self.end());
        self.buf.drain(..keep - self.base);
        self.base = keep;
        let want = (keep + self.size).max(to).min(self.len);
        let end = self.end();
        self.src.append(&mut self.buf, end as u64, want - end)
    }

    #[inline]
    fn get(&self, from: usize, to: usize) -> &[u8] {
        &self.buf[from - self.base..to - self.base]
    }

    #[inline]
    fn byte(&self, at: usize) -> u8 {
        self.buf[at - self.base]
    }
}

/// Bytes of the new file read at a time.
const WINDOW: usize = 8 << 20;

/// A block of the signature found in the new file, with the chaining value computed to check
/// it (as a subtree at the block's old offset).
struct Match {
    at: usize,
    block: usize,
    cv: ChainingValue,
}

struct Walk<'a, 'e, 's> {
    sig: &'a Signature<'a>,
    index: Index,
    win: Window<'a>,
    out: Out<'e>,
    /// Start of the literal bytes not yet emitted; they end where the next match starts.
    literal_from: usize,
    hash: FileHash<'s>,
}

impl Walk<'_, '_, '_> {
    /// Bytes up to `to` in the window, keeping what is still needed.
    fn need(&mut self, to: usize) -> Result<()> {
        let keep = self.literal_from.min(self.hash.owed_from());
        self.win.need(keep, to)
    }

    fn passed(&mut self, pos: usize, known: Option<(usize, ChainingValue)>) {
        self.hash.passed(pos, known, &self.win.buf, self.win.base);
    }

    fn run(mut self) -> Result<[u8; 32]> {
        let len = self.win.len;
        let mut pos = 0;
        let mut expect = 0;
        while pos < len {
            if expect < self.sig.blocks() {
                let end = pos + self.sig.block_len(expect);
                if end <= len {
                    self.need(end)?;
                    let cv = chaining_value(self.win.get(pos, end), self.sig.offset(expect));
                    if strong(&cv) == self.sig.strong(expect) {
                        self.matched(Match {
                            at: pos,
                            block: expect,
                            cv,
                        })?;
                        pos = end;
                        expect += 1;
                        continue;
                    }
                }
            }
            match self.search(pos)? {
                Some(m) => {
                    pos = m.at + self.sig.block_len(m.block);
                    expect = m.block + 1;
                    self.matched(m)?;
                }
                None => break,
            }
        }
        self.literal_to(len)?;
        self.need(len)?;
        self.out.finish()?;
        self.hash
            .finish(&self.win.buf, self.win.base)
            .context("cannot hash the file")
    }

    /// Emit the literal bytes from `literal_from` to `end`, a piece at a time.
    fn literal_to(&mut self, end: usize) -> Result<()> {
        while self.literal_from < end {
            let to = end.min(self.literal_from + PIECE);
            self.need(to)?;
            self.out.literal(self.win.get(self.literal_from, to))?;
            self.literal_from = to;
            self.passed(to, None);
        }
        Ok(())
    }

    fn matched(&mut self, m: Match) -> Result<()> {
        self.literal_to(m.at)?;
        let len = self.sig.block_len(m.block);
        let offset = self.sig.offset(m.block);
        self.out.copy(offset, len as u64)?;
        let end = m.at + len;
        self.literal_from = end;
        // Unchanged in place, and all of the new file's block there (not a short old last block
        // matching the start of a longer new one): its value is the new file's.
        let bs = self.sig.block_size();
        let in_place = m.at as u64 == offset && end == (m.at + bs).min(self.win.len);
        self.passed(end, in_place.then_some((m.at / bs, m.cv)));
        Ok(())
    }

    /// The first position at or after `from` where some block matches, rolling the weak sum.
    /// Literal bytes passed over are emitted as they pile up.
    fn search(&mut self, from: usize) -> Result<Option<Match>> {
        let len = self.win.len;
        let bs = self.sig.block_size();
        if from + bs <= len && !self.index.is_empty() {
            let mut p = from;
            self.need(p + bs)?;
            let mut sum = Rolling::new(self.win.get(p, p + bs));
            loop {
                if let Some((block, cv)) = self.lookup(sum.value(), p) {
                    return Ok(Some(Match { at: p, block, cv }));
                }
                if p + bs == len {
                    break;
                }
                if p + bs >= self.win.end() {
                    self.need(p + bs + 1)?;
                }
                sum.roll(self.win.byte(p), self.win.byte(p + bs));
                p += 1;
                if p - self.literal_from >= PIECE {
                    self.out.literal(self.win.get(self.literal_from, p))?;
                    self.literal_from = p;
                    self.passed(p, None);
                }
            }
        }
        // A short last block can only match at the very end.
        let last = self.sig.blocks().wrapping_sub(1);
        if self.sig.full_blocks() < self.sig.blocks() {
            let n = self.sig.block_len(last);
            if len - from >= n {
                let at = len - n;
                // Literal either way; emitted first, so the window need not hold it.
                self.literal_to(at)?;
                self.need(len)?;
                let cv = chaining_value(self.win.get(at, len), self.sig.offset(last));
                if strong(&cv) == self.sig.strong(last) {
                    return Ok(Some(Match {
                        at,
                        block: last,
                        cv,
                    }));
                }
            }
        }
        Ok(None)
    }

    /// A block whose weak sum is `weak` and whose content is the window at `at`. The strong
    /// hash depends on the block's offset, so it is computed per candidate; blocks with equal
    /// content (runs of zeros) share a weak sum, and the first of them already matches.
    fn lookup(&self, weak: u32, at: usize) -> Option<(usize, ChainingValue)> {
        let window = self.win.get(at, at + self.sig.block_size());
        self.index
            .candidates(weak)
            .iter()
            .map(|&k| k as usize)
            .filter(|&k| self.sig.weak(k) == weak)
            .take(MAX_CANDIDATES)
            .find_map(|k| {
                let cv = chaining_value(window, self.sig.offset(k));
                (strong(&cv) == self.sig.strong(k)).then_some((k, cv))
            })
    }
}

/// The encoder: ops into a buffer, the buffer to `emit` once it is a piece's worth.
struct Out<'e> {
    buf: Vec<u8>,
    /// A copy run still growing: basis offset and length.
    run: Option<(u64, u64)>,
    emit: &'e mut dyn FnMut(Vec<u8>) -> Result<()>,
}

impl Out<'_> {
    fn copy(&mut self, offset: u64, len: u64) -> Result<()> {
        match &mut self.run {
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.end_run();
                self.run = Some((offset, len));
            }
        }
        if self.run.is_some_and(|(_, l)| l >= RUN_MAX) {
            self.end_run();
            self.flush()?;
        } else if self.buf.len() >= PIECE {
            // Blocks matched out of order: each is an op, and they add up.
            self.flush()?;
        }
        Ok(())
    }

    fn end_run(&mut self) {
        if let Some((offset, len)) = self.run.take() {
            self.buf.push(OP_COPY);
            self.buf.extend_from_slice(&offset.to_le_bytes());
            self.buf.extend_from_slice(&len.to_le_bytes());
        }
    }

    fn literal(&mut self, mut bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.end_run();
        while !bytes.is_empty() {
            if self.buf.len() + 5 >= PIECE {
                self.flush()?;
            }
            // Only what fits the piece, so no piece grows past PIECE (plus a copy op).
            let n = bytes.len().min(PIECE - 5 - self.buf.len().min(PIECE - 5));
            self.buf.push(OP_LITERAL);
            self.buf.extend_from_slice(&(n as u32).to_le_bytes());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() >= PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE + 64));
        (self.emit)(piece)
    }

    fn finish(mut self) -> Result<()> {
        self.end_run();
        self.flush()
    }
}
