//! File safety shared by cp and sync: metadata types, local handles, atomic temp-and-commit and
//! safe descent beneath a destination root.

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
        _ => e.to_string().to_lowercase(),
    }
}
