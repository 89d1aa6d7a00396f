//! Error kinds the code branches on, and the one place that maps outcomes to exit codes.
//!
//! Exit codes follow ssh: a remote command's own status when there is one, 255 when vtun could not
//! connect, authenticate, or lost the connection before a status arrived. Everything else that
//! fails locally (bad arguments, a missing file) is 1, like scp and rsync's generic failure.

use std::process::ExitCode;

/// The status vtun exits with when the connection itself failed (as ssh does).
pub const EXIT_CONNECT: u8 = 255;

/// A failure that decides the exit code rather than just being reported.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Could not reach, verify, authenticate to, or keep the connection to the host.
    #[error("{0}")]
    Connection(String),
    /// The remote command finished with this status; nothing more to print.
    #[error("remote exited with status {0}")]
    Remote(u8),
    /// Interrupted by the user (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

impl Failure {
    pub fn connection(msg: impl Into<String>) -> anyhow::Error {
        Failure::Connection(msg.into()).into()
    }
}

/// Status of a finished run: `Ok(code)` is exited with as is.
pub fn exit_code(outcome: anyhow::Result<u8>) -> ExitCode {
    match outcome {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            if let Some(f) = err.downcast_ref::<Failure>() {
                match f {
                    Failure::Remote(code) => return ExitCode::from(*code),
                    Failure::Interrupted => return ExitCode::from(130),
                    Failure::Connection(_) => {}
                }
            }
            if is_broken_pipe(&err) {
                // The reader went away (`vtun exec … | head`): not our failure.
                return ExitCode::SUCCESS;
            }
            eprintln!("vtun: {err:#}");
            ExitCode::from(code_for(&err))
        }
    }
}

/// The exit code an error maps to, without printing it.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if let Some(f) = cause.downcast_ref::<Failure>() {
            return match f {
                Failure::Connection(_) => EXIT_CONNECT,
                Failure::Remote(c) => *c,
                Failure::Interrupted => 130,
            };
        }
        if cause.downcast_ref::<crate::tls::DialError>().is_some() {
            return EXIT_CONNECT;
        }
        if cause.downcast_ref::<crate::ssh::SshError>().is_some() {
            return EXIT_CONNECT;
        }
        // A channel whose session died (see ssh::channel): the connection, not the data.
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
            ) {
                return EXIT_CONNECT;
            }
        }
    }
    1
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
