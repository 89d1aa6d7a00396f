//! SFTP version 3 wire format (draft-ietf-secsh-filexfer-02, as OpenSSH speaks it): packet
//! numbers, status codes, file attributes, and a bounds-checked reader for replies.
//!
//! Every field of a reply comes from the peer, so the [`Parser`] never panics: a short or
//! malformed packet is an error naming what was missing.

use anyhow::{bail, Result};
use bytes::{BufMut, Bytes, BytesMut};

pub const INIT: u8 = 1;
pub const VERSION: u8 = 2;
pub const OPEN: u8 = 3;
pub const CLOSE: u8 = 4;
pub const READ: u8 = 5;
pub const WRITE: u8 = 6;
pub const LSTAT: u8 = 7;
pub const FSTAT: u8 = 8;
pub const SETSTAT: u8 = 9;
pub const FSETSTAT: u8 = 10;
pub const OPENDIR: u8 = 11;
pub const READDIR: u8 = 12;
pub const REMOVE: u8 = 13;
pub const MKDIR: u8 = 14;
pub const RMDIR: u8 = 15;
pub const REALPATH: u8 = 16;
pub const STAT: u8 = 17;
pub const RENAME: u8 = 18;
pub const READLINK: u8 = 19;
pub const SYMLINK: u8 = 20;
pub const STATUS: u8 = 101;
pub const HANDLE: u8 = 102;
pub const DATA: u8 = 103;
pub const NAME: u8 = 104;
pub const ATTRS: u8 = 105;
pub const EXTENDED: u8 = 200;
pub const EXTENDED_REPLY: u8 = 201;

pub const FX_OK: u32 = 0;
pub const FX_EOF: u32 = 1;
pub const FX_NO_SUCH_FILE: u32 = 2;
pub const FX_PERMISSION_DENIED: u32 = 3;
pub const FX_FAILURE: u32 = 4;

pub const OPEN_READ: u32 = 0x01;
pub const OPEN_WRITE: u32 = 0x02;
pub const OPEN_CREAT: u32 = 0x08;
pub const OPEN_TRUNC: u32 = 0x10;
pub const OPEN_EXCL: u32 = 0x20;

const ATTR_SIZE: u32 = 0x01;
const ATTR_UIDGID: u32 = 0x02;
const ATTR_PERMISSIONS: u32 = 0x04;
const ATTR_ACMODTIME: u32 = 0x08;
const ATTR_EXTENDED: u32 = 0x8000_0000;

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;

/// File attributes; absent fields are `None` (and are not sent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attrs {
    pub size: Option<u64>,
    pub uid_gid: Option<(u32, u32)>,
    /// Mode bits including the file type (`S_IFMT`).
    pub perm: Option<u32>,
    /// (atime, mtime) in seconds since the epoch.
    pub times: Option<(u32, u32)>,
}

impl Attrs {
    pub fn file_type(&self) -> u32 {
        self.perm.unwrap_or(0) & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == S_IFLNK
    }
    pub fn is_file(&self) -> bool {
        self.file_type() == S_IFREG
    }

    pub fn encode(&self, b: &mut BytesMut) {
        let mut flags = 0;
        if self.size.is_some() {
            flags |= ATTR_SIZE;
        }
        if self.uid_gid.is_some() {
            flags |= ATTR_UIDGID;
        }
        if self.perm.is_some() {
            flags |= ATTR_PERMISSIONS;
        }
        if self.times.is_some() {
            flags |= ATTR_ACMODTIME;
        }
        b.put_u32(flags);
        if let Some(s) = self.size {
            b.put_u64(s);
        }
        if let Some((u, g)) = self.uid_gid {
            b.put_u32(u);
            b.put_u32(g);
        }
        if let Some(p) = self.perm {
            b.put_u32(p);
        }
        if let Some((a, m)) = self.times {
            b.put_u32(a);
            b.put_u32(m);
        }
    }
}

/// Appends SSH `string`s to a packet body.
pub fn put_str(b: &mut BytesMut, s: &[u8]) {
    b.put_u32(s.len() as u32);
    b.put_slice(s);
}

/// Reads fields from a reply body, failing (not panicking) on truncation.
pub struct Parser {
    buf: Bytes,
}

impl Parser {
    pub fn new(buf: Bytes) -> Parser {
        Parser { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub fn u8(&mut self) -> Result<u8> {
        self.need(1)?;
        let v = self.buf[0];
        self.buf = self.buf.slice(1..);
        Ok(v)
    }

    pub fn u32(&mut self) -> Result<u32> {
        self.need(4)?;
        let v = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        self.buf = self.buf.slice(4..);
        Ok(v)
    }

    pub fn u64(&mut self) -> Result<u64> {
        let hi = self.u32()? as u64;
        let lo = self.u32()? as u64;
        Ok(hi << 32 | lo)
    }

    /// An SSH `string`, without copying the bytes.
    pub fn string(&mut self) -> Result<Bytes> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    pub fn attrs(&mut self) -> Result<Attrs> {
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid_gid = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.perm = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            let n = self.u32()?;
            for _ in 0..n {
                self.string()?;
                self.string()?;
            }
        }
        Ok(a)
    }

    fn need(&self, n: usize) -> Result<()> {
        if self.buf.len() < n {
            bail!("malformed SFTP packet: truncated");
        }
        Ok(())
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn attrs_round_trip() {
        let a = Attrs {
            size: Some(1 << 40),
            uid_gid: Some((1, 2)),
            perm: Some(S_IFREG | 0o644),
            times: Some((3, 4)),
        };
        let mut b = BytesMut::new();
        a.encode(&mut b);
        let back = Parser::new(b.freeze()).attrs().unwrap();
        assert_eq!(a, back);
        assert!(back.is_file());
    }

    #[test]
    fn truncated_reply_is_an_error_not_a_panic() {
        let mut p = Parser::new(Bytes::from_static(&[0, 0, 0, 9, b'a']));
        assert!(p.string().is_err());
        let mut p = Parser::new(Bytes::from_static(&[0, 0, 0, ATTR_SIZE as u8, 1]));
        assert!(p.attrs().is_err());
    }
}
