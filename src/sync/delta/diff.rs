//! The sender's side: walk the new file once against the receiver's signature and stream the
//! delta out in pieces while walking.
//!
//! At each position the block after the last match is tried first, by strong hash alone: in an
//! unchanged stretch that is one BLAKE3 per block and no rolling. Only after a miss does the
//! walk roll the weak sum byte by byte, looking each value up in the [`Index`], until some block
//! matches again. Consecutive copies are merged into runs, and a run is cut every [`RUN_MAX`]
//! bytes so the receiver gets work while the sender is still hashing.

use anyhow::Result;

use super::signature::{strong, Index, Signature};
use super::weak::Rolling;
use super::{OP_COPY, OP_LITERAL, VERSION};

/// Longest copy run: a piece goes out at least this often while the file is unchanged.
const RUN_MAX: u64 = 8 << 20;
/// Size at which a piece is handed on, and the longest literal op.
const PIECE: usize = 256 << 10;

/// Stream the delta that turns the file behind `sig` into `new` to `emit`, in pieces of about
/// 256 KiB (more often while long copy runs go by).
pub fn diff(
    sig: &Signature,
    new: &[u8],
    emit: &mut dyn FnMut(Vec<u8>) -> Result<()>,
) -> Result<()> {
    let mut w = Walk {
        sig,
        index: Index::new(sig),
        new,
        out: Out {
            buf: Vec::with_capacity(PIECE + 64),
            run: None,
            emit,
        },
        literal_from: 0,
    };
    w.out.buf.push(VERSION);
    w.out.buf.extend_from_slice(&sig.token().to_bytes());
    w.run()
}

struct Walk<'a, 'e> {
    sig: &'a Signature<'a>,
    index: Index,
    new: &'a [u8],
    out: Out<'e>,
    /// Start of the literal bytes not yet emitted; they end where the next match starts.
    literal_from: usize,
}

impl Walk<'_, '_> {
    fn run(mut self) -> Result<()> {
        let new = self.new;
        let mut pos = 0;
        let mut expect = 0;
        while pos < new.len() {
            if expect < self.sig.blocks() {
                let end = pos + self.sig.block_len(expect);
                if end <= new.len() && strong(&new[pos..end]) == self.sig.strong(expect) {
                    self.matched(pos, expect)?;
                    pos = end;
                    expect += 1;
                    continue;
                }
            }
            match self.search(pos)? {
                Some((at, k)) => {
                    self.matched(at, k)?;
                    pos = at + self.sig.block_len(k);
                    expect = k + 1;
                }
                None => break,
            }
        }
        self.out.literal(&new[self.literal_from..])?;
        self.out.finish()
    }

    fn matched(&mut self, at: usize, k: usize) -> Result<()> {
        self.out.literal(&self.new[self.literal_from..at])?;
        let len = self.sig.block_len(k);
        self.out.copy(self.sig.offset(k), len as u64)?;
        self.literal_from = at + len;
        Ok(())
    }

    /// The first position at or after `from` where some block matches, rolling the weak sum.
    /// Literal bytes passed over are emitted as they pile up.
    fn search(&mut self, from: usize) -> Result<Option<(usize, usize)>> {
        let new = self.new;
        let bs = self.sig.block_size();
        if from + bs <= new.len() && !self.index.is_empty() {
            let mut p = from;
            let mut sum = Rolling::new(&new[p..p + bs]);
            loop {
                if let Some(k) = self.lookup(sum.value(), &new[p..p + bs]) {
                    return Ok(Some((p, k)));
                }
                if p + bs == new.len() {
                    break;
                }
                sum.roll(new[p], new[p + bs]);
                p += 1;
                if p - self.literal_from >= PIECE {
                    self.out.literal(&new[self.literal_from..p])?;
                    self.literal_from = p;
                }
            }
        }
        // A short last block can only match at the very end.
        let last = self.sig.blocks().wrapping_sub(1);
        if self.sig.full_blocks() < self.sig.blocks() {
            let len = self.sig.block_len(last);
            if new.len() - from >= len && strong(&new[new.len() - len..]) == self.sig.strong(last) {
                return Ok(Some((new.len() - len, last)));
            }
        }
        Ok(None)
    }

    fn lookup(&self, weak: u32, window: &[u8]) -> Option<usize> {
        let mut hash = None;
        for &k in self.index.candidates(weak) {
            let k = k as usize;
            if self.sig.weak(k) == weak
                && *hash.get_or_insert_with(|| strong(window)) == self.sig.strong(k)
            {
                return Some(k);
            }
        }
        None
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
            let n = bytes.len().min(PIECE);
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
