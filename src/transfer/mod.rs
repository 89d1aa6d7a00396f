//! Moving file contents: pipelined SFTP, parallel channels, atomic writes. Used by cp and sync.
//!
//! Layers, bottom up, over the pipelined client in `crate::sftp`: `fs` (local disk and remote
//! hosts behind one interface, listings validated), `handle` (open files, positional I/O started
//! eagerly; the local half is `crate::fs`'s), `pipe` (one byte range with many requests in
//! flight), `engine` (atomic whole-file copies,
//! parallel ranges, scp placement rules), `tree` (recursive copies), `cp` and `bench` (commands).
//! The one non-obvious choice: speed on a long link comes from many outstanding 256 KiB
//! requests on several SSH channels at once, so every layer is built to start work before the
//! previous piece has finished.

pub mod bench;
pub mod cp;
pub mod engine;
pub mod fs;
pub mod handle;
pub mod pipe;
pub mod tree;

pub use bench::bench;
pub use cp::cp;
pub use engine::{Engine, Options};
pub use fs::{Fs, RemoteFs};
