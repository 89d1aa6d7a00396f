//! SSH over the TLS stream: connect (with boot-wait retries), authenticate, pin host keys, keep
//! alive. Every subcommand that talks SSH opens its sessions here.
//!
//! One [`Session`] is one TLS connection carrying one SSH transport; it is cheap to share
//! (`Arc<Session>`) and opens any number of channels concurrently, which is how `cp` and `sync`
//! get past OpenSSH's fixed per-channel window. A session is a [`crate::link::Link`] (byte
//! streams in `channel`, exec channels in `exec`) and [`SshConnector`] is the production
//! [`crate::link::Connector`].
//!
//! Round trips from TCP connect to the first output byte of `vtun exec VM true`: 9, read off a
//! `RUST_LOG=russh=debug` trace on the test bed at 20 ms RTT. TCP 1; TLS 1.3 1; SSH version and
//! KEXINIT 1 (sshd sends its KEXINIT with its banner); ECDH + NEWKEYS 1; `ssh-userauth` service
//! request 1; public-key probe 1 and signed request 1 (russh always probes first); channel open
//! 1; exec request → output 1. OpenSSH's ssh through `openssl s_client` takes one more by its
//! protocol (a "none" auth request before the probe). The remaining easy saving is russh's probe (1 RTT), which would
//! need a change in russh.

mod auth;
mod channel;
mod exec;
mod forwarded;
mod hostkey;
mod keyfile;
mod retry;
mod session;

pub use auth::agent_keys;
pub use channel::{ChannelIo, SshConnector};
pub use hostkey::HostKeyCheck;
pub use session::Session;

/// Failures of the SSH layer that decide exit codes and messages.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    HostKey(String),
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    #[error("{0}")]
    Protocol(String),
    /// The server would not open another session channel on this connection (MaxSessions);
    /// the connection itself is fine.
    #[error("{0}")]
    Refused(String),
}
