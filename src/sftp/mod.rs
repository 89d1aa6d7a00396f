//! SFTP: the version 3 wire format (`proto`) and a pipelined client over one stream (`client`),
//! shared by cp (`transfer`) and sync's agentless fallback.
//!
//! Everything a server sends is hostile until checked: replies are parsed without panics, and
//! listings, walks and reads are bounded (`caps`) so that a server cannot make us list forever,
//! hold unbounded entries in memory, or spend a round trip per byte.

pub mod caps;
pub mod client;
pub mod proto;
pub mod walk;

pub use client::{is_closed, status_of, DirEntry, Handle, PendingReply, Sftp, SftpError};
pub use walk::walk;
