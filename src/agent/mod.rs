//! `vtun agent`, the VM side of `vtun sync`, and everything that talks to it: `protocol` (the
//! framed wire format, each message kind with its own size limit), `serve` (the agent: a local
//! sync endpoint served over stdin/stdout), `install` (finding or uploading the agent on a host
//! through one exec channel) and `client` (the sync endpoint that speaks to it).
//!
//! The agent is this same binary, so both sides of a sync run the same endpoint code.

pub mod client;
pub mod install;
pub mod protocol;
pub mod serve;

pub use client::AgentEndpoint;
