//! The receiver's side: parse a delta as its pieces arrive (an op may straddle two pieces) and
//! check every op against the announced size and the basis before anything acts on it, so a
//! hostile delta is an error, never a panic, and cannot make the output grow past its size.

use super::{Token, OP_COPY, OP_LITERAL, VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The delta is malformed or does not fit the basis: sending the file whole fixes it.
    #[error("{0}")]
    Invalid(String),
    #[error("cannot write: {0}")]
    Write(#[source] std::io::Error),
}

pub fn invalid(msg: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(msg.into())
}

/// What a parsed delta does, op by op, each already checked.
pub trait Ops {
    /// The identity of the basis the signature was made from.
    fn basis(&mut self, token: Token) -> Result<(), ApplyError>;
    /// Copy `len` bytes at `offset` of the basis (within the basis) to the output.
    fn copy(&mut self, offset: u64, len: u64) -> Result<(), ApplyError>;
    fn literal(&mut self, bytes: &[u8]) -> Result<(), ApplyError>;
}

const HEADER: usize = 1 + Token::LEN;

/// A streaming delta parser.
pub struct Parser {
    size: u64,
    basis_len: u64,
    written: u64,
    header_done: bool,
    /// Bytes of literal data still to come in the current op.
    literal_left: u64,
    /// An incomplete header or op header carried over from the previous piece.
    pending: [u8; HEADER],
    pending_len: usize,
}

impl Parser {
    /// A parser for a delta building `size` bytes from a basis of `basis_len` bytes.
    pub fn new(size: u64, basis_len: u64) -> Parser {
        Parser {
            size,
            basis_len,
            written: 0,
            header_done: false,
            literal_left: 0,
            pending: [0; HEADER],
            pending_len: 0,
        }
    }

    pub fn feed(&mut self, mut data: &[u8], ops: &mut impl Ops) -> Result<(), ApplyError> {
        while !data.is_empty() {
            if self.literal_left > 0 {
                let n = data
                    .len()
                    .min(usize::try_from(self.literal_left).unwrap_or(usize::MAX));
                ops.literal(&data[..n])?;
                self.literal_left -= n as u64;
                data = &data[n..];
                continue;
            }
            let need = self.need()?;
            let take = (need - self.pending_len).min(data.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&data[..take]);
            self.pending_len += take;
            data = &data[take..];
            if self.pending_len == self.need()? {
                self.pending_len = 0;
                self.op(ops)?;
            }
        }
        Ok(())
    }

    /// Length of the header or op header being collected (known once its tag byte is in).
    fn need(&self) -> Result<usize, ApplyError> {
        if !self.header_done {
            return Ok(HEADER);
        }
        if self.pending_len == 0 {
            return Ok(1);
        }
        match self.pending[0] {
            OP_COPY => Ok(1 + 8 + 8),
            OP_LITERAL => Ok(1 + 4),
            t => Err(invalid(format!("unknown delta op {t}"))),
        }
    }

    fn op(&mut self, ops: &mut impl Ops) -> Result<(), ApplyError> {
        let p = &self.pending;
        let u64_at = |i: usize| {
            u64::from_le_bytes([
                p[i],
                p[i + 1],
                p[i + 2],
                p[i + 3],
                p[i + 4],
                p[i + 5],
                p[i + 6],
                p[i + 7],
            ])
        };
        if !self.header_done {
            if p[0] != VERSION {
                return Err(invalid(format!("unknown delta version {}", p[0])));
            }
            self.header_done = true;
            let token = Token::from_bytes(&p[1..HEADER]).map_err(|e| invalid(format!("{e:#}")))?;
            return ops.basis(token);
        }
        let len = match p[0] {
            OP_COPY => u64_at(9),
            _ => u32::from_le_bytes([p[1], p[2], p[3], p[4]]) as u64,
        };
        if len == 0 {
            return Err(invalid("empty delta op"));
        }
        if self
            .written
            .checked_add(len)
            .is_none_or(|end| end > self.size)
        {
            return Err(invalid("delta makes the file longer than announced"));
        }
        self.written += len;
        if p[0] == OP_LITERAL {
            self.literal_left = len;
            return Ok(());
        }
        let offset = u64_at(1);
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.basis_len)
        {
            return Err(invalid("delta copies from beyond the end of the basis"));
        }
        ops.copy(offset, len)
    }

    /// Check that the delta ended cleanly and built exactly the announced size.
    pub fn finish(&self) -> Result<(), ApplyError> {
        if !self.header_done || self.pending_len > 0 || self.literal_left > 0 {
            return Err(invalid("delta ends mid-op"));
        }
        if self.written != self.size {
            return Err(invalid(format!(
                "delta built {} bytes, expected {}",
                self.written, self.size
            )));
        }
        Ok(())
    }
}
