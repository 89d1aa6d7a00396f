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
        // b = Σ (n - i)·xᵢ = n·a - Σ i·xᵢ: written this way the loop has no carried dependency
        // but two sums, which the compiler vectorizes.
        let n = window.len() as u32;
        let (mut a, mut ix) = (0u32, 0u32);
        for (chunk_no, chunk) in window.chunks(64).enumerate() {
            let base = (chunk_no * 64) as u32;
            let (mut ca, mut cix) = (0u32, 0u32);
            for (i, &x) in chunk.iter().enumerate() {
                ca += x as u32;
                cix += i as u32 * x as u32;
            }
            a = a.wrapping_add(ca);
            ix = ix.wrapping_add(cix).wrapping_add(base.wrapping_mul(ca));
        }
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
