//! SSH over the TLS stream: connect (with boot-wait retries), authenticate, pin host keys, keep
//! alive. Every subcommand that talks SSH opens its sessions here.
//!
//! One [`Session`] is one TLS connection carrying one SSH transport; it is cheap to share
//! (`Arc<Session>`) and opens any number of channels concurrently, which is how `cp` and `sync`
//! get past OpenSSH's fixed per-channel window. [`SshConnector`] is the production
//! [`crate::remote::Connector`].
//!
//! Round trips, counted from TCP connect to the first output byte of `vtun exec VM true`
//! (measured on the test bed as Δwall / ΔRTT between 0 ms and 20 ms RTT, see
//! `benches/exec_latency.rs`): TCP 1, TLS 1.3 1, SSH version + KEXINIT 1, ECDH 1,
//! NEWKEYS + service request 1, public-key auth 1 (signature sent at once, no probe), channel
//! open 1, exec + first output 1 — 8 in all. OpenSSH through `openssl s_client` needs 3 more
//! (its "none" auth probe, the public-key probe, and the ProxyCommand's own startup).

mod auth;
mod channel;
mod hostkey;
mod keyfile;
mod retry;
mod session;

pub use channel::{ChannelIo, SshConnector};
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
}
