//! Delta transfer: the receiver sends block signatures of its old file, the sender answers with a
//! delta (copy-block / literal instructions, fast_rsync's librsync-compatible format), and the
//! receiver rebuilds the new file.
//!
//! fast_rsync's strong hash is truncated MD4, so a delta is never trusted on its own: the sender
//! also sends the new file's BLAKE3 and the receiver checks it before the file is renamed into
//! place (a mismatch is retried as a whole-file copy).

use anyhow::{bail, Context, Result};
use fast_rsync::{Signature, SignatureOptions};

/// Block size for a file of `len` bytes: about √len, as rsync does, clamped so small files still
/// get useful blocks and huge ones do not produce huge signatures.
pub fn block_size(len: u64) -> u32 {
    let root = (len as f64).sqrt() as u64;
    // Round to a multiple of 64 to keep block reads aligned.
    let bs = root.clamp(512, 128 * 1024) / 64 * 64;
    bs as u32
}

/// The serialized signature of `base`.
pub fn signature(base: &[u8]) -> Vec<u8> {
    Signature::calculate(
        base,
        SignatureOptions {
            block_size: block_size(base.len() as u64),
            crypto_hash_size: 8,
        },
    )
    .into_serialized()
}

/// A delta turning the file behind `signature` (untrusted bytes from the peer) into `new`.
pub fn diff(signature: &[u8], new: &[u8]) -> Result<Vec<u8>> {
    let sig = Signature::deserialize(signature.to_vec())
        .map_err(|e| anyhow::anyhow!("bad signature from peer: {e}"))?;
    let mut out = Vec::new();
    fast_rsync::diff(&sig.index(), new, &mut out).context("cannot compute delta")?;
    Ok(out)
}

/// Apply `delta` to `base`; the result may not exceed `expected_len` bytes.
pub fn apply(base: &[u8], delta: &[u8], expected_len: u64) -> Result<Vec<u8>> {
    let limit = usize::try_from(expected_len).context("file too large")?;
    // `expected_len` comes from the peer: reserve no more than the base and the delta can
    // plausibly produce, so a lying peer cannot make us allocate without bound, while the usual
    // case (a few changed bytes) allocates once instead of doubling its way up.
    let plausible = base.len().saturating_add(delta.len());
    let mut out = Vec::with_capacity(limit.min(plausible));
    fast_rsync::apply_limited(base, delta, &mut out, limit).context("cannot apply delta")?;
    if out.len() as u64 != expected_len {
        bail!(
            "delta produced {} bytes, expected {expected_len}",
            out.len()
        );
    }
    Ok(out)
}

/// A read-only map of a regular file: deltas need the whole file at once, and mapping it from
/// the page cache avoids copying it into (and faulting in) a heap buffer of the same size.
pub struct Mapped(Option<memmap2::Mmap>);

impl Mapped {
    pub fn new(file: &std::fs::File) -> Result<Mapped> {
        if file.metadata()?.len() == 0 {
            // Mapping an empty file fails on Linux; an empty slice is what callers want.
            return Ok(Mapped(None));
        }
        // SAFETY: the map is read-only and private to this process. A file changed by another
        // process while mapped can change the bytes we see, as with read(): the whole-file
        // BLAKE3 check on the receiving side catches the result either way.
        let map = unsafe { memmap2::Mmap::map(file) }.context("cannot map file")?;
        Ok(Mapped(Some(map)))
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

/// Whether sending `delta_len` bytes instead of a `file_len`-byte file is worth it.
pub fn pays(delta_len: usize, file_len: u64) -> bool {
    (delta_len as u64) < file_len.saturating_mul(9) / 10
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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

    #[test]
    fn block_size_is_clamped() {
        assert_eq!(block_size(0), 512);
        assert_eq!(block_size(1 << 20), 1024);
        assert_eq!(block_size(1 << 40), 128 * 1024);
    }

    #[test]
    fn random_edits_round_trip() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..120 {
            let len = [0, 1, 100, 5000, 70_000, 300_000][round % 6];
            let old = rng.bytes(len);
            let mut new = old.clone();
            for _ in 0..1 + rng.below(4) {
                // Where: start, middle or end; what: insert, delete or overwrite.
                let at = match rng.below(3) {
                    0 => 0,
                    1 => new.len() / 2,
                    _ => new.len(),
                }
                .min(new.len());
                let n = 1 + rng.below(2000);
                match rng.below(3) {
                    0 => {
                        let ins = rng.bytes(n);
                        new.splice(at..at, ins);
                    }
                    1 => {
                        let start = at.saturating_sub(n / 2);
                        let end = (start + n).min(new.len());
                        new.drain(start..end);
                    }
                    _ => {
                        let start = at.saturating_sub(n).min(new.len());
                        let end = (start + n).min(new.len());
                        let patch = rng.bytes(end - start);
                        new[start..end].copy_from_slice(&patch);
                    }
                }
            }
            let d = diff(&signature(&old), &new).unwrap();
            let got = apply(&old, &d, new.len() as u64).unwrap();
            assert_eq!(
                blake3::hash(&got),
                blake3::hash(&new),
                "round {round} (len {len})"
            );
        }
    }

    #[test]
    fn small_edit_in_large_file_gives_small_delta() {
        let mut rng = Rng(7);
        let old = rng.bytes(1 << 20);
        let mut new = old.clone();
        new[500_000..500_008].copy_from_slice(b"CHANGED!");
        let d = diff(&signature(&old), &new).unwrap();
        assert!(d.len() < 4096, "delta is {} bytes", d.len());
        assert!(pays(d.len(), new.len() as u64));
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert!(diff(b"garbage", b"data").is_err());
        assert!(apply(b"base", b"\x72\x73\x02\x36\xff\xff", 10).is_err());
        let d = diff(&signature(b""), b"0123456789").unwrap();
        assert!(apply(b"", &d, 5).is_err());
    }
}
