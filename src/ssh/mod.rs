//! SSH over the TLS stream: connect (with boot-wait retries), authenticate, pin host keys, keep
//! alive. Every subcommand that talks SSH opens its sessions here.

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
