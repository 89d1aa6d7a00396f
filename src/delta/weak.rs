//! rsync's rolling checksum: two 16-bit sums over a window, cheap to slide by one byte. It only
//! finds candidates; every candidate is confirmed with the strong hash before it is used.

/// The weak sum of a window: `a` is the sum of its bytes, `b` the sum weighted by distance from
/// the window's end (the last byte counts once, the first `n` times). Kept in wrapping `u32`s;
/// only the low 16 bits of each reach [`Rolling::value`].
#[derive(Debug, Clone, Copy)]
pub struct Rolling {
    a: u32,
    b: u32,
    n: u32,
}

impl Rolling {
    pub fn new(window: &[u8]) -> Rolling {
        // b = Σ (n - i)·xᵢ = n·a - Σ i·xᵢ: two sums without a carried dependency. Everything is
        // modulo 2³², so sums may wrap.
        let n = window.len() as u32;
        #[cfg(target_arch = "x86_64")]
        let (a, ix) = if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { sums_avx2(window) }
        } else {
            sums(window, 0)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (a, ix) = sums(window, 0);
        Rolling {
            a,
            b: n.wrapping_mul(a).wrapping_sub(ix),
            n,
        }
    }

    /// Slide the window one byte: `out` leaves at the front, `into` enters at the back.
    #[inline]
    pub fn roll(&mut self, out: u8, into: u8) {
        self.a = self.a.wrapping_sub(out as u32).wrapping_add(into as u32);
        self.b = self
            .b
            .wrapping_sub(self.n.wrapping_mul(out as u32))
            .wrapping_add(self.a);
    }

    #[inline]
    pub fn value(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }
}

/// Σ xᵢ and Σ (start + i)·xᵢ over `w`, whose first byte has index `start`.
fn sums(w: &[u8], start: u32) -> (u32, u32) {
    let (mut a, mut ix) = (0u32, 0u32);
    for (chunk_no, chunk) in w.chunks(64).enumerate() {
        let base = start.wrapping_add((chunk_no * 64) as u32);
        let (mut ca, mut cix) = (0u32, 0u32);
        for (i, &x) in chunk.iter().enumerate() {
            ca += x as u32;
            cix += i as u32 * x as u32;
        }
        a = a.wrapping_add(ca);
        ix = ix.wrapping_add(cix).wrapping_add(base.wrapping_mul(ca));
    }
    (a, ix)
}

/// [`sums`] 32 bytes at a time (a signature sums every byte of the old file, so this is most of
/// what the weak sum costs): per chunk k, `psadbw` gives sₖ = Σ x, `pmaddubsw` with weights
/// 0..31 gives Σ i·x within it, and Σ k·sₖ comes from a running total of earlier chunk sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sums_avx2(w: &[u8]) -> (u32, u32) {
    use std::arch::x86_64::*;
    let chunks = w.chunks_exact(32);
    let tail = chunks.remainder();
    let k = chunks.len() as u32;
    let zero = _mm256_setzero_si256();
    let ones = _mm256_set1_epi16(1);
    let weights = _mm256_setr_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24,
        25, 26, 27, 28, 29, 30, 31,
    );
    let (mut total, mut earlier, mut within) = (zero, zero, zero);
    for c in chunks {
        // SAFETY: `c` is 32 readable bytes; loadu has no alignment requirement.
        let x = unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
        earlier = _mm256_add_epi32(earlier, total);
        // Four 64-bit lanes of at most 8·255: adding them as 32-bit lanes is exact.
        total = _mm256_add_epi32(total, _mm256_sad_epu8(x, zero));
        // Pairs of i·x fit in i16 (at most 31·255 + 30·255).
        within = _mm256_add_epi32(
            within,
            _mm256_madd_epi16(_mm256_maddubs_epi16(x, weights), ones),
        );
    }
    let lanes = |v: __m256i| -> u32 {
        let mut out = [0u32; 8];
        // SAFETY: `out` is 32 writable bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        out.iter().fold(0u32, |s, x| s.wrapping_add(*x))
    };
    let (a, earlier, within) = (lanes(total), lanes(earlier), lanes(within));
    // Σ k·sₖ = (K - 1)·Σ sₖ - Σ (sums of earlier chunks, taken per chunk).
    let ks = k.wrapping_sub(1).wrapping_mul(a).wrapping_sub(earlier);
    let ix = ks.wrapping_mul(32).wrapping_add(within);
    let (ta, tix) = sums(tail, k.wrapping_mul(32));
    (a.wrapping_add(ta), ix.wrapping_add(tix))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, byte by byte.
    fn reference(w: &[u8]) -> u32 {
        let (mut a, mut b) = (0u32, 0u32);
        for &x in w {
            a = a.wrapping_add(x as u32);
            b = b.wrapping_add(a);
        }
        (a & 0xffff) | (b << 16)
    }

    #[test]
    fn all_ways_of_summing_agree() {
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect();
        for n in (0..300).chain([1023, 1024, 4097, 65536, 70_000]) {
            let w = &data[data.len() - n..];
            let (a, ix) = sums(w, 0);
            let scalar = (a & 0xffff) | ((n as u32).wrapping_mul(a).wrapping_sub(ix) << 16);
            assert_eq!(scalar, reference(w), "scalar, n {n}");
            assert_eq!(Rolling::new(w).value(), reference(w), "n {n}");
        }
        let ff = vec![0xffu8; 128 << 10];
        assert_eq!(Rolling::new(&ff).value(), reference(&ff));
    }

    #[test]
    fn rolling_matches_a_fresh_sum_at_every_offset() {
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for n in [1, 7, 64, 65, 1024] {
            let mut r = Rolling::new(&data[..n]);
            assert_eq!(r.value(), reference(&data[..n]), "n {n}");
            for p in 1..data.len() - n {
                r.roll(data[p - 1], data[p - 1 + n]);
                assert_eq!(
                    r.value(),
                    Rolling::new(&data[p..p + n]).value(),
                    "n {n} p {p}"
                );
            }
        }
    }
}
