//! File safety shared by cp and sync, one home for each rule: what an entry is (`meta`, `time`),
//! local file handles read and written by offset (`handle`), temporary names and atomic commit
//! with cleanup that spares live writers (`temp`), and descent beneath a destination root by
//! directory descriptor (`beneath`).
//!
//! The one non-obvious thing: nothing here checks a path and then uses it by name. Writes go
//! through a [`Dir`] reached from a [`Root`] without following symlinks, so a race cannot move
//! them outside the destination; see `beneath` for why a check alone is not enough.

pub mod beneath;
pub mod handle;
pub mod meta;
pub mod temp;
pub mod time;

pub use beneath::{Dir, Root};
pub use handle::{read_chunk_at, LocalReader, LocalWriter};
pub use meta::{Kind, Meta};
pub use time::FileTime;

/// Local errors in the same words as remote ones, so messages read alike.
pub fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EACCES) | Some(libc::EPERM) => "permission denied".into(),
        Some(libc::ENOSPC) => "no space left on device".into(),
        Some(libc::EDQUOT) => "disk quota exceeded".into(),
        Some(libc::ENOTDIR) => "not a directory".into(),
        Some(_) => e.to_string().to_lowercase(),
        // Our own messages: already lowercase, and they may hold a path whose case matters.
        None => e.to_string(),
    }
}
