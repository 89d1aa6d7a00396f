//! `vtun cp` and `vtun bench`: moving files over pipelined SFTP on parallel channels, atomically
//! (sync's SFTP fallback uses `fs` and `handle` too).
//!
//! Layers, bottom up, over the pipelined client in `crate::sftp` and the file-safety rules in
//! `crate::fs`: `fs` (local disk and remote hosts behind one interface, listings validated),
//! `handle` (open files, positional I/O started eagerly; the local half is `crate::fs`'s),
//! `pipe` (one byte range with many requests in flight), `file` (one file, atomically, split
//! into parallel ranges), `tree` (recursive copies, on `file`), `place` (scp's rules for where
//! each source lands, on `tree` and `file`), `cp` and `bench` (the commands). Dependencies run
//! one way, in that order.
//!
//! The one non-obvious choice: speed on a long link comes from many outstanding 256 KiB
//! requests on several SSH channels at once, so every layer is built to start work before the
//! previous piece has finished.

pub mod bench;
pub mod cp;
pub mod file;
pub mod fs;
pub mod handle;
pub mod pipe;
pub mod place;
pub mod tree;

pub use bench::bench;
pub use cp::cp;
pub use file::{Engine, Options};
pub use fs::{Fs, RemoteFs};
