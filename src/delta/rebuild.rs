//! Rebuilding a file from a delta straight into the receiver's temporary file: copy runs go
//! from the basis with `copy_file_range(2)`, so unchanged data stays in the kernel, literals
//! are written as they arrive. The BLAKE3 of the result, which the sender's must match before
//! the file is renamed into place, is computed (on another thread for big files, overlapping
//! the kernel's copies) from the literal bytes and the basis read again with `pread`: never
//! from a map of it, which another process truncating the basis would turn into SIGBUS.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Result;

use super::apply::{invalid, ApplyError, Ops, Parser};
use super::Token;

/// Below this size the result is hashed inline: a thread costs more than it saves.
const THREAD_MIN: u64 = 4 << 20;

pub struct Rebuild {
    parser: Parser,
    out: Output,
}

struct Output {
    basis: File,
    token: Token,
    hash: Hashing,
    /// `copy_file_range` does not work between these files: copy through a buffer.
    buffered: bool,
}

enum Hashing {
    /// With a buffer for reading the basis.
    Inline(Box<blake3::Hasher>, Vec<u8>),
    Thread(mpsc::SyncSender<Job>, JoinHandle<Option<[u8; 32]>>),
}

/// Basis bytes read at a time while hashing.
const READ: usize = 1 << 20;

/// Hash `len` bytes of `basis` at `offset`; `false` if the basis is shorter than that now.
fn hash_basis(
    basis: &File,
    mut offset: u64,
    mut len: u64,
    buf: &mut Vec<u8>,
    h: &mut blake3::Hasher,
) -> bool {
    buf.resize(READ, 0);
    while len > 0 {
        let n = len.min(READ as u64) as usize;
        if basis.read_exact_at(&mut buf[..n], offset).is_err() {
            return false;
        }
        h.update(&buf[..n]);
        offset += n as u64;
        len -= n as u64;
    }
    true
}

enum Job {
    Basis(u64, u64),
    Bytes(Vec<u8>),
}

impl Rebuild {
    /// Rebuild a file of `size` bytes from `basis`, the receiver's current file.
    pub fn new(basis: File, size: u64) -> Result<Rebuild> {
        let token = Token::of(&basis)?;
        let parser = Parser::new(size, token.size);
        let hash = if size < THREAD_MIN {
            Hashing::Inline(Box::default(), Vec::new())
        } else {
            let reader = basis.try_clone()?;
            let (tx, rx) = mpsc::sync_channel(16);
            let handle = std::thread::spawn(move || hash_jobs(&reader, rx));
            Hashing::Thread(tx, handle)
        };
        Ok(Rebuild {
            parser,
            out: Output {
                basis,
                token,
                hash,
                buffered: false,
            },
        })
    }

    /// Apply the next piece of the delta, writing to `out` at its current position.
    pub fn feed(&mut self, piece: &[u8], out: &File) -> Result<(), ApplyError> {
        self.parser.feed(
            piece,
            &mut Sink {
                w: &mut self.out,
                out,
            },
        )
    }

    /// The BLAKE3 of what was written, once the delta is complete and the basis is checked
    /// not to have changed while it was read; and the basis, still open.
    pub fn finish(self) -> Result<([u8; 32], File), ApplyError> {
        self.parser.finish()?;
        let Output {
            basis, token, hash, ..
        } = self.out;
        let hash = match hash {
            Hashing::Inline(h, _) => Some(*h.finalize().as_bytes()),
            Hashing::Thread(tx, handle) => {
                drop(tx);
                handle.join().ok().flatten()
            }
        };
        let hash = hash.ok_or_else(|| invalid("cannot hash the rebuilt file"))?;
        if Token::of(&basis).ok() != Some(token) {
            return Err(invalid("the old file changed while the delta was applied"));
        }
        Ok((hash, basis))
    }
}

fn hash_jobs(basis: &File, rx: mpsc::Receiver<Job>) -> Option<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::new();
    for job in rx {
        match job {
            Job::Basis(offset, len) => {
                if !hash_basis(basis, offset, len, &mut buf, &mut h) {
                    return None;
                }
            }
            Job::Bytes(b) => {
                h.update(&b);
            }
        }
    }
    Some(*h.finalize().as_bytes())
}

struct Sink<'a> {
    w: &'a mut Output,
    out: &'a File,
}

impl Ops for Sink<'_> {
    fn basis(&mut self, token: Token) -> Result<(), ApplyError> {
        if token != self.w.token {
            return Err(invalid(
                "the old file changed since its signature was taken",
            ));
        }
        Ok(())
    }

    fn copy(&mut self, offset: u64, len: u64) -> Result<(), ApplyError> {
        match &mut self.w.hash {
            Hashing::Inline(h, buf) => {
                if !hash_basis(&self.w.basis, offset, len, buf, h) {
                    return Err(invalid("the old file changed while the delta was applied"));
                }
            }
            Hashing::Thread(tx, _) => {
                tx.send(Job::Basis(offset, len))
                    .map_err(|_| invalid("hash thread failed"))?;
            }
        }
        if !self.w.buffered {
            match copy_range(&self.w.basis, offset, len, self.out) {
                Ok(()) => return Ok(()),
                Err(Copy::Unsupported(done)) => {
                    self.w.buffered = true;
                    return copy_buffered(&self.w.basis, offset + done, len - done, self.out);
                }
                Err(Copy::Failed(e)) => return Err(e),
            }
        }
        copy_buffered(&self.w.basis, offset, len, self.out)
    }

    fn literal(&mut self, bytes: &[u8]) -> Result<(), ApplyError> {
        match &mut self.w.hash {
            Hashing::Inline(h, _) => {
                h.update(bytes);
            }
            Hashing::Thread(tx, _) => {
                tx.send(Job::Bytes(bytes.to_vec()))
                    .map_err(|_| invalid("hash thread failed"))?;
            }
        }
        let mut out = self.out;
        out.write_all(bytes).map_err(ApplyError::Write)
    }
}

enum Copy {
    /// Not possible between these files, after this many bytes were copied.
    Unsupported(u64),
    Failed(ApplyError),
}

/// Copy with `copy_file_range(2)` to `out`'s current position.
#[cfg(target_os = "linux")]
fn copy_range(basis: &File, offset: u64, len: u64, out: &File) -> Result<(), Copy> {
    use std::os::fd::AsRawFd;
    let mut off_in =
        i64::try_from(offset).map_err(|_| Copy::Failed(invalid("offset too large")))?;
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call; `off_in` is a valid
        // `loff_t` we own, and a null `off_out` means "use and advance the file position".
        let n = unsafe {
            libc::copy_file_range(
                basis.as_raw_fd(),
                &mut off_in,
                out.as_raw_fd(),
                std::ptr::null_mut(),
                want,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Across file systems on older kernels, or a file system that cannot.
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => {
                    return Err(Copy::Unsupported(done))
                }
                _ => return Err(Copy::Failed(ApplyError::Write(e))),
            }
        }
        if n == 0 {
            return Err(Copy::Failed(invalid(
                "the old file is shorter than its signature",
            )));
        }
        done += n as u64;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn copy_range(_: &File, _: u64, _: u64, _: &File) -> Result<(), Copy> {
    Err(Copy::Unsupported(0))
}

fn copy_buffered(basis: &File, offset: u64, len: u64, out: &File) -> Result<(), ApplyError> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut out = out;
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        basis
            .read_exact_at(&mut buf[..n], offset + done)
            .map_err(|e| invalid(format!("cannot read the old file: {e}")))?;
        out.write_all(&buf[..n]).map_err(ApplyError::Write)?;
        done += n as u64;
    }
    Ok(())
}
