//! The sender's BLAKE3 of the whole new file, built from the chaining values of its blocks.
//!
//! Blocks are power-of-two sized and aligned, so each is a subtree of BLAKE3's tree, and the
//! signature's strong hash of a block is that subtree's chaining value at the block's offset in
//! the old file. Where the walk finds a block unchanged in place, the value it computed to check
//! the match is therefore exactly the new file's value for that block: the file hash costs no
//! second pass over unchanged data. The other blocks are hashed by a helper thread, in
//! parallel with the walk, from copies: the walk reads the file in windows and never holds it
//! whole.

use std::sync::mpsc;
use std::thread::Scope;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};

/// Below this size the missing blocks are hashed on the walking thread.
const THREAD_MIN: usize = 4 << 20;
/// Known values are handed to the helper in batches of this many (a value it has to compute
/// goes at once): one wake-up per block would cost more than merging does.
const BATCH: usize = 256;

/// The chaining value of `block` as the subtree at `offset` (a multiple of its power-of-two
/// size, or the end of the input).
pub fn chaining_value(block: &[u8], offset: u64) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    h.update(block);
    h.finalize_non_root()
}

/// Collects one chaining value per block of the new file, in order, and merges them. It never
/// holds the file: a block whose value the walk did not compute is hashed from the walk's
/// window when the walk passes it (on the helper thread, from a copy).
pub struct FileHash<'s> {
    len: usize,
    bs: usize,
    blocks: usize,
    /// The next block whose value is owed.
    next: usize,
    sink: Sink<'s>,
}

enum Sink<'s> {
    /// One block or none: the hash is BLAKE3 of that block.
    Single(Option<blake3::Hash>),
    Inline(Stack),
    Thread {
        batch: Vec<Block>,
        tx: mpsc::SyncSender<Vec<Block>>,
        handle: std::thread::ScopedJoinHandle<'s, blake3::Hash>,
    },
}

/// A block's value, or its bytes for the helper to hash.
enum Block {
    Known(ChainingValue),
    Bytes(Vec<u8>),
}

impl<'s> FileHash<'s> {
    /// For a file of `len` bytes; `bs` is a power of two, at least BLAKE3's chunk size.
    pub fn new<'e>(len: usize, bs: usize, scope: &'s Scope<'s, 'e>) -> FileHash<'s> {
        let blocks = len.div_ceil(bs);
        let sink = if blocks <= 1 {
            Sink::Single(None)
        } else if len < THREAD_MIN {
            Sink::Inline(Stack::default())
        } else {
            let (tx, rx) = mpsc::sync_channel::<Vec<Block>>(16);
            let handle = scope.spawn(move || {
                let mut stack = Stack::default();
                for (j, b) in rx.into_iter().flatten().enumerate() {
                    stack.push(match b {
                        Block::Known(cv) => cv,
                        Block::Bytes(bytes) => chaining_value(&bytes, (j * bs) as u64),
                    });
                }
                stack.root()
            });
            Sink::Thread {
                batch: Vec::with_capacity(BATCH),
                tx,
                handle,
            }
        };
        FileHash {
            len,
            bs,
            blocks,
            next: 0,
            sink,
        }
    }

    /// Where the first block whose value is still owed starts: the walk keeps the bytes from
    /// there on.
    pub fn owed_from(&self) -> usize {
        (self.next * self.bs).min(self.len)
    }

    /// The walk has passed `pos`: every block ending there or before is settled. `known` is
    /// the chaining value of block `j` when the walk computed it; `window` holds the file's
    /// bytes from `base` on, at least up to `pos` from [`FileHash::owed_from`].
    pub fn passed(
        &mut self,
        pos: usize,
        known: Option<(usize, ChainingValue)>,
        window: &[u8],
        base: usize,
    ) {
        while self.next < self.blocks && ((self.next + 1) * self.bs).min(self.len) <= pos {
            let cv = known.filter(|(j, _)| *j == self.next).map(|(_, cv)| cv);
            let start = self.next * self.bs;
            let end = (start + self.bs).min(self.len);
            let bytes = || &window[start - base..end - base];
            match &mut self.sink {
                Sink::Single(h) => *h = Some(blake3::hash(bytes())),
                Sink::Inline(stack) => {
                    stack.push(cv.unwrap_or_else(|| chaining_value(bytes(), start as u64)))
                }
                Sink::Thread { batch, tx, .. } => {
                    let urgent = cv.is_none();
                    batch.push(match cv {
                        Some(cv) => Block::Known(cv),
                        None => Block::Bytes(bytes().to_vec()),
                    });
                    if urgent || batch.len() >= BATCH {
                        // A helper that has gone (it panicked) is reported by `finish`.
                        drop(tx.send(std::mem::replace(batch, Vec::with_capacity(BATCH))));
                    }
                }
            }
            self.next += 1;
        }
    }

    /// The hash, once the walk is at the end; `window` as for [`FileHash::passed`].
    pub fn finish(mut self, window: &[u8], base: usize) -> Option<[u8; 32]> {
        self.passed(self.len, None, window, base);
        let root = match self.sink {
            Sink::Single(h) => h.unwrap_or_else(|| blake3::hash(&[])),
            Sink::Inline(stack) => stack.root(),
            Sink::Thread { batch, tx, handle } => {
                if !batch.is_empty() {
                    drop(tx.send(batch));
                }
                drop(tx);
                handle.join().ok()?
            }
        };
        Some(*root.as_bytes())
    }
}

/// Subtrees merged as BLAKE3's own hasher merges chunks: after `n` blocks the stack holds one
/// value per set bit of `n`, and the last merge, done only once the input is known to be
/// complete, is the root.
#[derive(Default)]
struct Stack {
    cvs: Vec<ChainingValue>,
    count: u64,
}

impl Stack {
    fn push(&mut self, cv: ChainingValue) {
        while self.cvs.len() > self.count.count_ones() as usize {
            self.merge_top();
        }
        self.cvs.push(cv);
        self.count += 1;
    }

    fn merge_top(&mut self) {
        // Only called with two or more values on the stack.
        if let (Some(right), Some(left)) = (self.cvs.pop(), self.cvs.pop()) {
            self.cvs
                .push(merge_subtrees_non_root(&left, &right, Mode::Hash));
        }
    }

    /// The root of two or more blocks.
    fn root(mut self) -> blake3::Hash {
        while self.cvs.len() > 2 {
            self.merge_top();
        }
        match self.cvs[..] {
            [left, right] => merge_subtrees_root(&left, &right, Mode::Hash),
            // Not reached: `FileHash` uses a stack only for two or more blocks.
            _ => blake3::hash(&[]),
        }
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block_cv(data: &[u8], bs: usize, j: usize) -> ChainingValue {
        let end = ((j + 1) * bs).min(data.len());
        chaining_value(&data[j * bs..end], (j * bs) as u64)
    }

    #[test]
    fn merged_blocks_give_blake3_of_the_whole() {
        let data: Vec<u8> = (0..(5u32 << 20) + 77)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        for len in [
            0,
            1,
            1024,
            1025,
            2048,
            3000,
            4096 * 5 + 1,
            1 << 20,
            data.len(),
        ] {
            for bs in [1024, 4096, 65536] {
                let d = &data[..len];
                let got = std::thread::scope(|s| {
                    let mut h = FileHash::new(len, bs, s);
                    // Hand over every third block's value as known, the rest computed.
                    for j in 0..len.div_ceil(bs) {
                        let known = (j % 3 == 0).then(|| (j, block_cv(d, bs, j)));
                        // Only what is still owed, as a walk's window would hold it.
                        let from = h.owed_from();
                        h.passed(((j + 1) * bs).min(len), known, &d[from..], from);
                    }
                    h.finish(d, 0).unwrap()
                });
                assert_eq!(got, *blake3::hash(d).as_bytes(), "len {len} bs {bs}");
            }
        }
    }
}
