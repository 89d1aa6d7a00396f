//! The receiver's signature of its old file (the basis), and the sender's view of one: a
//! bounds-checked parse of the peer's bytes and a hash table over the weak sums.
//!
//! Layout (integers little-endian): version `u8`, block size `u32`, basis length `u64`, the
//! basis [`Token`], then per block (the last one may be short) its weak sum `u32` and the first
//! [`STRONG`] bytes of its BLAKE3 chaining value as a subtree at its offset (see `filehash`
//! for why not a plain BLAKE3 of the block).

use std::fs::File;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context, Result};
use blake3::hazmat::ChainingValue;

use super::diff::CHANGED;
use super::filehash::chaining_value;
use super::weak::Rolling;
use super::{Token, VERSION};

/// Bytes of BLAKE3 kept per block.
pub const STRONG: usize = 16;
const ENTRY: usize = 4 + STRONG;
const HEADER: usize = 1 + 4 + 8 + Token::LEN;
const MIN_BLOCK: u32 = 1 << 10;
const MAX_BLOCK: u32 = 128 << 10;

/// Block size for a basis of `len` bytes: 2·√len rounded to a power of two, within 1–128 KiB.
///
/// A signature costs 20 bytes per block and each changed spot costs about a block of literal
/// data, so bigger blocks than rsync's √len pay off with our larger per-block sums: for 1 GiB
/// this gives 16384 blocks of 64 KiB, a 320 KiB signature (rsync: 32768 blocks of 7 bytes).
pub fn block_size(len: u64) -> u32 {
    let exp = (1.0 + (len.max(1) as f64).log2() / 2.0).round() as u32;
    (1u32 << exp.min(31)).clamp(MIN_BLOCK, MAX_BLOCK)
}

/// The strong hash of a block at `offset` in its file, as the signature holds it.
pub fn strong(cv: &ChainingValue) -> &[u8] {
    &cv[..STRONG]
}

/// The signature of the regular file open as `file`, read in windows with `pread` (a mapped
/// file truncated under us would kill the process with SIGBUS). A file that changes while it
/// is read is an error: a signature of a moving basis would only make a delta that fails.
pub fn signature(file: &File) -> Result<Vec<u8>> {
    let token = Token::of(file)?;
    let len = usize::try_from(token.size).context("file too large")?;
    let bs = block_size(len as u64) as usize;
    let mut out = header(len, bs, token);
    // A whole number of blocks, so each window starts on a block.
    let window = WINDOW.max(bs);
    let mut buf = vec![0u8; window.min(len)];
    let mut at = 0;
    while at < len {
        let n = window.min(len - at);
        match file.read_exact_at(&mut buf[..n], at as u64) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => bail!(CHANGED),
            r => r.context("cannot read the old file")?,
        }
        let first = HEADER + at / bs * ENTRY;
        let sums = &mut out[first..first + n.div_ceil(bs) * ENTRY];
        sum_parallel(&buf[..n], at, bs, sums);
        at += n;
    }
    if Token::of(file)? != token {
        bail!(CHANGED);
    }
    Ok(out)
}

/// Bytes of a basis read at a time for its signature.
const WINDOW: usize = 16 << 20;

/// The header, and room for the sums of every block.
fn header(len: usize, bs: usize, token: Token) -> Vec<u8> {
    let blocks = len.div_ceil(bs);
    let mut out = Vec::with_capacity(HEADER + blocks * ENTRY);
    out.push(VERSION);
    out.extend_from_slice(&(bs as u32).to_le_bytes());
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&token.to_bytes());
    out.resize(HEADER + blocks * ENTRY, 0);
    out
}

/// The signature of `data`, which `token` identifies.
#[cfg(test)]
pub fn signature_of(data: &[u8], token: Token) -> Vec<u8> {
    let bs = block_size(data.len() as u64) as usize;
    let mut out = header(data.len(), bs, token);
    sum_parallel(data, 0, bs, &mut out[HEADER..]);
    out
}

/// Sum the blocks of `data`, which starts at `offset` in its file, into `out`. Large runs are
/// summed on several threads, each over its own run of blocks.
fn sum_parallel(data: &[u8], offset: usize, bs: usize, out: &mut [u8]) {
    let blocks = data.len().div_ceil(bs);
    let threads = if data.len() < 16 << 20 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    let per = blocks.div_ceil(threads).max(1);
    let mut runs = out
        .chunks_mut(per * ENTRY)
        .zip(data.chunks(per * bs))
        .enumerate();
    let first = runs.next();
    std::thread::scope(|s| {
        for (i, (sums, src)) in runs {
            s.spawn(move || sum_blocks(src, offset + i * per * bs, bs, sums));
        }
        if let Some((_, (sums, src))) = first {
            sum_blocks(src, offset, bs, sums);
        }
    });
}

/// Sum the blocks of `data`, which starts at `offset` in its file.
fn sum_blocks(data: &[u8], offset: usize, bs: usize, out: &mut [u8]) {
    for (i, (block, entry)) in data.chunks(bs).zip(out.chunks_mut(ENTRY)).enumerate() {
        let cv = chaining_value(block, (offset + i * bs) as u64);
        entry[..4].copy_from_slice(&Rolling::new(block).value().to_le_bytes());
        entry[4..].copy_from_slice(strong(&cv));
    }
}

/// A peer's signature, checked to be well formed; borrows the bytes it was parsed from.
pub struct Signature<'a> {
    block: usize,
    len: u64,
    token: Token,
    entries: &'a [u8],
}

impl<'a> Signature<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Signature<'a>> {
        let (head, entries) = bytes
            .split_at_checked(HEADER)
            .context("signature too short")?;
        if head[0] != VERSION {
            bail!("unknown signature version {}", head[0]);
        }
        let block = u32::from_le_bytes(head[1..5].try_into()?);
        // A power of two, so blocks are subtrees of BLAKE3's tree.
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&block) || !block.is_power_of_two() {
            bail!("bad signature block size {block}");
        }
        let len = u64::from_le_bytes(head[5..13].try_into()?);
        let token = Token::from_bytes(&head[13..])?;
        let blocks = len.div_ceil(block as u64);
        if blocks.checked_mul(ENTRY as u64) != Some(entries.len() as u64) {
            bail!("signature length does not match its header");
        }
        Ok(Signature {
            block: block as usize,
            len,
            token,
            entries,
        })
    }

    pub fn token(&self) -> Token {
        self.token
    }

    pub fn block_size(&self) -> usize {
        self.block
    }

    pub fn blocks(&self) -> usize {
        self.entries.len() / ENTRY
    }

    /// Blocks of the full block size (all but a short last one).
    pub fn full_blocks(&self) -> usize {
        (self.len / self.block as u64) as usize
    }

    pub fn block_len(&self, k: usize) -> usize {
        let rest = self.len - (k * self.block) as u64;
        rest.min(self.block as u64) as usize
    }

    pub fn offset(&self, k: usize) -> u64 {
        (k * self.block) as u64
    }

    pub fn weak(&self, k: usize) -> u32 {
        let e = &self.entries[k * ENTRY..];
        u32::from_le_bytes([e[0], e[1], e[2], e[3]])
    }

    pub fn strong(&self, k: usize) -> &[u8] {
        &self.entries[k * ENTRY + 4..(k + 1) * ENTRY]
    }
}

/// The full blocks of a signature by weak sum: buckets laid out flat (`starts` indexes
/// `slots`), about two buckets per block, so a miss, the common answer while rolling, costs
/// one multiply and two adjacent loads. Within a bucket, blocks are in file order.
pub struct Index {
    shift: u32,
    starts: Vec<u32>,
    slots: Vec<u32>,
}

impl Index {
    pub fn new(sig: &Signature) -> Index {
        let ks = 0..sig.full_blocks() as u32;
        let bits = (usize::BITS - ks.len().leading_zeros()).clamp(4, 24);
        let shift = 32 - bits;
        let mut starts = vec![0u32; (1 << bits) + 1];
        let bucket = |w: u32| (w.wrapping_mul(0x9e37_79b1) >> shift) as usize;
        for k in ks.clone() {
            starts[bucket(sig.weak(k as usize)) + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut fill = starts.clone();
        let mut slots = vec![0u32; ks.len()];
        for k in ks {
            let b = bucket(sig.weak(k as usize));
            slots[fill[b] as usize] = k;
            fill[b] += 1;
        }
        Index {
            shift,
            starts,
            slots,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Blocks whose weak sum may be `weak` (a superset: callers compare).
    #[inline]
    pub fn candidates(&self, weak: u32) -> &[u32] {
        let b = (weak.wrapping_mul(0x9e37_79b1) >> self.shift) as usize;
        &self.slots[self.starts[b] as usize..self.starts[b + 1] as usize]
    }
}
