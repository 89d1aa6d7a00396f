//! `vtun sync`: rsync-style sync with delta transfer.
//!
//! The pieces: `pattern` (exclude rules), `tree` (listings), `plan` (what to change), `delta`
//! (signatures and deltas), `endpoint` (one interface for both sides), `local` (a directory on
//! this machine), `protocol`/`agent` (the same endpoint served over stdin/stdout by
//! `vtun agent`), `remote` (finding or uploading the agent and talking to it), `engine` (runs a
//! plan between two endpoints).

pub mod delta;
pub mod endpoint;
pub mod local;
pub mod pattern;
pub mod plan;
pub mod tree;
