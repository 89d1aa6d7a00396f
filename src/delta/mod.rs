//! Delta transfer in vtun's own streaming format: the receiver sends a signature of its old
//! file (the basis), the sender walks its new file once and streams copy and literal ops while
//! it walks, and the receiver writes them straight into the temporary file as they arrive. For
//! a big file with a small change the three overlap, so the time is close to the kernel copying
//! the unchanged data into the new file.
//!
//! Nothing in a delta is trusted: the sender's whole-file BLAKE3 is checked before the file is
//! renamed into place, and the delta names the basis it was made against (size, mtime, inode,
//! ctime), so one applied to a file that has changed since is refused; the engine then resends
//! the file whole.
//!
//! Files are read with `pread` in windows of a few MiB, never mapped: a mapped file that
//! another process truncates kills the reader with SIGBUS, while a short read is just an error
//! ([`CHANGED`]) that costs that one file.
//!
//! Delta layout (integers little-endian): version `u8`, basis [`Token`], then ops: [`OP_COPY`]
//! (basis offset `u64`, length `u64`) or [`OP_LITERAL`] (length `u32`, the bytes). The
//! signature's layout is in `signature`.

mod apply;
mod diff;
mod filehash;
mod rebuild;
mod signature;
mod weak;

use std::os::unix::fs::MetadataExt;

use anyhow::{Context, Result};

pub use apply::ApplyError;
pub use diff::{diff, diff_file, CHANGED, MAX_PIECE};
pub use rebuild::Rebuild;
pub use signature::{block_size, signature, Signature};

/// Version of the signature and delta formats.
const VERSION: u8 = 2;
const OP_COPY: u8 = 1;
const OP_LITERAL: u8 = 2;

/// What identifies one state of a file: if any of it differs, the file may have changed
/// since its signature was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    size: u64,
    mtime: Stamp,
    ino: u64,
    ctime: Stamp,
}

/// A file time as the kernel gives it: seconds and nanoseconds (one i64 of nanoseconds would
/// overflow past 2262). Only ever compared for equality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    secs: i64,
    nsec: u32,
}

impl Stamp {
    fn new(secs: i64, nsec: i64) -> Stamp {
        Stamp {
            secs,
            nsec: nsec.clamp(0, 999_999_999) as u32,
        }
    }
}

impl Token {
    const LEN: usize = 40;

    pub fn of(file: &std::fs::File) -> Result<Token> {
        let m = file.metadata().context("cannot stat the old file")?;
        Ok(Token {
            size: m.size(),
            mtime: Stamp::new(m.mtime(), m.mtime_nsec()),
            ino: m.ino(),
            ctime: Stamp::new(m.ctime(), m.ctime_nsec()),
        })
    }

    fn to_bytes(self) -> [u8; Token::LEN] {
        let mut b = [0; Token::LEN];
        b[..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..16].copy_from_slice(&self.mtime.secs.to_le_bytes());
        b[16..20].copy_from_slice(&self.mtime.nsec.to_le_bytes());
        b[20..28].copy_from_slice(&self.ino.to_le_bytes());
        b[28..36].copy_from_slice(&self.ctime.secs.to_le_bytes());
        b[36..].copy_from_slice(&self.ctime.nsec.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Result<Token> {
        fn field<const N: usize>(b: &[u8], i: usize) -> Result<[u8; N]> {
            b.get(i..i + N)
                .and_then(|s| s.try_into().ok())
                .context("basis token too short")
        }
        let time = |i: usize| -> Result<Stamp> {
            Ok(Stamp {
                secs: i64::from_le_bytes(field(b, i)?),
                nsec: u32::from_le_bytes(field(b, i + 8)?),
            })
        };
        Ok(Token {
            size: u64::from_le_bytes(field(b, 0)?),
            mtime: time(8)?,
            ino: u64::from_le_bytes(field(b, 20)?),
            ctime: time(28)?,
        })
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::apply::{Ops, Parser};
    use super::*;

    /// xorshift: deterministic, no extra crates.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    const TOKEN: Token = Token {
        size: 1,
        mtime: Stamp {
            secs: 10_413_792_000,
            nsec: 0,
        },
        ino: 3,
        ctime: Stamp { secs: -4, nsec: 5 },
    };

    fn sig(old: &[u8]) -> Vec<u8> {
        signature::signature_of(old, TOKEN)
    }

    /// The delta as one buffer, and the number of pieces it came in.
    fn delta(sig: &[u8], new: &[u8]) -> anyhow::Result<(Vec<u8>, usize)> {
        let sig = Signature::parse(sig)?;
        let (mut all, mut pieces) = (Vec::new(), 0);
        let hash = diff(&sig, new, &mut |p| {
            all.extend_from_slice(&p);
            pieces += 1;
            Ok(())
        })?;
        assert_eq!(hash, *blake3::hash(new).as_bytes(), "file hash");
        Ok((all, pieces))
    }

    struct VecOps<'a> {
        base: &'a [u8],
        out: Vec<u8>,
    }

    impl Ops for VecOps<'_> {
        fn basis(&mut self, token: Token) -> Result<(), ApplyError> {
            assert_eq!(token, TOKEN);
            Ok(())
        }
        fn copy(&mut self, offset: u64, len: u64) -> Result<(), ApplyError> {
            let r = offset as usize..(offset + len) as usize;
            self.out.extend_from_slice(&self.base[r]);
            Ok(())
        }
        fn literal(&mut self, bytes: &[u8]) -> Result<(), ApplyError> {
            self.out.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// Apply `delta` fed in pieces of `step` bytes, so ops straddle piece boundaries.
    fn apply(base: &[u8], delta: &[u8], size: u64, step: usize) -> Result<Vec<u8>, ApplyError> {
        let mut p = Parser::new(size, base.len() as u64);
        let mut ops = VecOps {
            base,
            out: Vec::new(),
        };
        for piece in delta.chunks(step.max(1)) {
            p.feed(piece, &mut ops)?;
        }
        p.finish()?;
        Ok(ops.out)
    }

    #[test]
    fn block_size_is_clamped() {
        assert_eq!(block_size(0), 1024);
        assert_eq!(block_size(1 << 20), 2048);
        assert_eq!(block_size(16 << 20), 8192);
        assert_eq!(block_size(1 << 30), 64 << 10);
        assert_eq!(block_size(1 << 40), 128 << 10);
    }

    #[test]
    fn random_edits_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..150 {
            let len = [0, 1, 100, 1023, 5000, 70_000, 300_000][round % 7];
            let old = rng.bytes(len);
            let mut new = old.clone();
            for _ in 0..1 + rng.below(4) {
                // Where: start, middle or end; what: insert, delete, overwrite, or truncate or
                // extend the file.
                let at = match rng.below(3) {
                    0 => 0,
                    1 => new.len() / 2,
                    _ => new.len(),
                }
                .min(new.len());
                let n = 1 + rng.below(3000);
                match rng.below(5) {
                    0 => {
                        let ins = rng.bytes(n);
                        new.splice(at..at, ins);
                    }
                    1 => {
                        let start = at.saturating_sub(n / 2);
                        let end = (start + n).min(new.len());
                        new.drain(start..end);
                    }
                    2 => {
                        let start = at.saturating_sub(n).min(new.len());
                        let end = (start + n).min(new.len());
                        let patch = rng.bytes(end - start);
                        new[start..end].copy_from_slice(&patch);
                    }
                    3 => new.truncate(new.len().saturating_sub(n)),
                    _ => new.extend(rng.bytes(n)),
                }
            }
            let (d, _) = delta(&sig(&old), &new).unwrap();
            // Read in tiny windows, the walk makes the same delta: windows only decide reads.
            let old_sig = sig(&old);
            let parsed = Signature::parse(&old_sig).unwrap();
            let mut small = Vec::new();
            let window = [1, 3000, 70_000][round % 3];
            diff::walk(&parsed, &&new[..], new.len(), window, &mut |p| {
                small.extend_from_slice(&p);
                Ok(())
            })
            .unwrap();
            assert_eq!(small, d, "round {round}: window {window}");
            for step in [1, 7, 4096, usize::MAX] {
                let got = apply(&old, &d, new.len() as u64, step).unwrap();
                assert_eq!(
                    blake3::hash(&got),
                    blake3::hash(&new),
                    "round {round} (len {len}, step {step})"
                );
            }
        }
    }

    #[test]
    fn unchanged_and_shifted_files_are_all_copies() {
        let mut rng = Rng(11);
        let old = rng.bytes(200_000);
        let (d, _) = delta(&sig(&old), &old).unwrap();
        // Header and one copy run.
        assert_eq!(d.len(), 1 + Token::LEN + 17, "unchanged");
        let mut shifted = b"prefix".to_vec();
        shifted.extend_from_slice(&old);
        let (d, _) = delta(&sig(&old), &shifted).unwrap();
        assert!(d.len() < 100, "shifted: {} bytes", d.len());
        assert_eq!(apply(&old, &d, shifted.len() as u64, 5).unwrap(), shifted);

        // A disk image: mostly zeros, so hundreds of blocks share a weak sum; shifted by one
        // byte, every zero block still matches at once.
        let mut image = vec![0u8; 3 << 20];
        image[1 << 20..(1 << 20) + 1000].copy_from_slice(&rng.bytes(1000));
        let mut shifted = vec![7u8];
        shifted.extend_from_slice(&image);
        let (d, _) = delta(&sig(&image), &shifted).unwrap();
        assert!(d.len() < 20_000, "zeros shifted: {} bytes", d.len());
        assert_eq!(
            apply(&image, &d, shifted.len() as u64, 4096).unwrap(),
            shifted
        );
    }

    #[test]
    fn small_edit_in_large_file_gives_small_delta_in_many_pieces() {
        let mut rng = Rng(7);
        let old = rng.bytes(24 << 20);
        let mut new = old.clone();
        new[12 << 20..(12 << 20) + 8].copy_from_slice(b"CHANGED!");
        let s = sig(&old);
        let bs = block_size(old.len() as u64) as usize;
        assert_eq!(s.len(), 1 + 4 + 8 + 40 + old.len() / bs * 20);
        let (d, pieces) = delta(&s, &new).unwrap();
        assert!(d.len() <= bs + 200, "delta is {} bytes", d.len());
        // Copy runs are cut so the receiver can start before the sender is done.
        assert!(pieces >= 3, "{pieces} pieces");
        assert_eq!(apply(&old, &d, new.len() as u64, 1000).unwrap(), new);
    }

    #[test]
    fn signature_on_several_threads_matches_one() {
        let mut rng = Rng(3);
        let data = rng.bytes((16 << 20) + 12345);
        let s = sig(&data);
        let parsed = Signature::parse(&s).unwrap();
        let bs = parsed.block_size();
        for (k, block) in data.chunks(bs).enumerate() {
            let cv = filehash::chaining_value(block, (k * bs) as u64);
            assert_eq!(parsed.weak(k), weak::Rolling::new(block).value());
            assert_eq!(parsed.strong(k), signature::strong(&cv));
        }
        assert_eq!(parsed.blocks(), data.len().div_ceil(bs));
    }

    #[test]
    fn a_file_diffs_as_its_bytes_do() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        let old = Rng(8).bytes(16 << 20);
        let mut new = old.clone();
        new[8 << 20..(8 << 20) + 8].copy_from_slice(b"CHANGED!");
        std::fs::write(&path, &new).unwrap();
        let s = sig(&old);
        let (want, _) = delta(&s, &new).unwrap();
        let sig = Signature::parse(&s).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut got = Vec::new();
        diff_file(&sig, &f, new.len() as u64, &mut |p| {
            got.extend_from_slice(&p);
            Ok(())
        })
        .unwrap();
        assert!(got.len() < 20_000, "{} bytes", got.len());
        assert_eq!(got, want);
    }

    #[test]
    fn pieces_never_exceed_max_piece() {
        // Blocks matched out of order (each its own copy op) and long literals.
        let mut rng = Rng(21);
        let old = rng.bytes(8 << 20);
        let bs = block_size(old.len() as u64) as usize;
        let mut new = Vec::new();
        for k in (0..old.len() / bs).rev() {
            new.extend_from_slice(&old[k * bs..(k + 1) * bs]);
            new.extend_from_slice(&rng.bytes(k % 7));
        }
        new.extend(rng.bytes(3 << 20));
        let s = sig(&old);
        let sig = Signature::parse(&s).unwrap();
        let mut biggest = 0;
        diff(&sig, &new, &mut |p| {
            biggest = biggest.max(p.len());
            Ok(())
        })
        .unwrap();
        assert!(biggest <= MAX_PIECE, "a piece of {biggest} bytes");
    }

    /// A file truncated by someone else while its delta is made: with a map this was SIGBUS
    /// and the process died; read with pread it is an error that says what happened.
    #[test]
    fn file_truncated_while_diffed_is_an_error_not_sigbus() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("f");
        let data = Rng(4).bytes(24 << 20);
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let s = signature(&f).unwrap();
        let sig = Signature::parse(&s).unwrap();
        let mut first = true;
        let err = diff_file(&sig, &f, data.len() as u64, &mut |_| {
            if first {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .unwrap()
                    .set_len(4096)
                    .unwrap();
                first = false;
            }
            Ok(())
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains(CHANGED), "{err:#}");
        // And its signature says so too.
        let f = std::fs::File::open(&path).unwrap();
        assert!(signature(&f).is_ok());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        // Signatures: garbage, truncated, a header claiming more blocks than follow.
        assert!(delta(b"garbage", b"data").is_err());
        let good = sig(&Rng(5).bytes(10_000));
        for cut in [0, 1, 12, 44, 45, good.len() - 1] {
            assert!(Signature::parse(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = good.clone();
        huge[5..13].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Signature::parse(&huge).is_err());
        // Block sizes out of range or not a power of two (BLAKE3 subtrees could not be
        // aligned), with as many entries as the header asks for; 2048 shows the rest is right.
        for (block, ok) in [
            (2048u32, true),
            (3072, false),
            (512, false),
            (1 << 18, false),
        ] {
            let len = 10_000u64;
            let mut s = vec![VERSION];
            s.extend_from_slice(&block.to_le_bytes());
            s.extend_from_slice(&len.to_le_bytes());
            s.extend_from_slice(&TOKEN.to_bytes());
            s.resize(s.len() + len.div_ceil(block as u64) as usize * 20, 0);
            assert_eq!(Signature::parse(&s).is_ok(), ok, "block size {block}");
        }

        // Deltas: unknown op, copies past the basis, output past the size, truncation.
        let base = b"0123456789";
        let head: Vec<u8> = [&[VERSION][..], &TOKEN.to_bytes()].concat();
        let with = |ops: &[u8]| [&head[..], ops].concat();
        let copy =
            |off: u64, len: u64| [&[OP_COPY][..], &off.to_le_bytes(), &len.to_le_bytes()].concat();
        assert!(apply(base, &with(&[9]), 10, 1).is_err());
        assert!(apply(base, &with(&copy(5, 6)), 6, 3).is_err());
        assert!(apply(base, &with(&copy(u64::MAX, 2)), 2, 3).is_err());
        assert!(apply(base, &with(&copy(0, 10)), 5, 3).is_err());
        assert!(apply(base, &with(&[OP_LITERAL, 255, 255, 255, 255, 1]), 10, 2).is_err());
        assert!(apply(base, &with(&[OP_LITERAL, 3, 0, 0, 0, 1]), 3, 2).is_err());
        assert!(apply(base, &head[..10], 0, 2).is_err());
        assert!(apply(base, &with(&copy(0, 4)), 5, 2).is_err());
        assert_eq!(apply(base, &with(&copy(2, 4)), 4, 2).unwrap(), b"2345");
        let mut rng = Rng(9);
        for _ in 0..2000 {
            let n = rng.below(64);
            let junk = rng.bytes(n);
            let _ = apply(base, &with(&junk), rng.below(20) as u64, 1 + rng.below(8));
        }
    }
}
