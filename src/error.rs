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
    /// The remote command ran past its time limit and was stopped (`--timeout`).
    #[error("timed out")]
    TimedOut,
}

/// The status for a run stopped by `--timeout` (as timeout(1)).
pub const EXIT_TIMEOUT: u8 = 124;

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
                    Failure::Connection(_) | Failure::TimedOut => {}
                }
            }
            if is_broken_pipe(&err) && reader_gone(libc::STDOUT_FILENO) {
                // The reader of our stdout went away (`vtun exec … | head`): not our failure.
                // A broken pipe anywhere else (the socket to the edge) is a lost connection.
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
                Failure::TimedOut => EXIT_TIMEOUT,
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
                std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
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

/// Whether `fd` is a pipe or socket whose reading end is closed: poll reports an error or hang-up
/// on it. A terminal, a file or /dev/null never is.
fn reader_gone(fd: std::os::fd::RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout; poll only reads fd and writes revents.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & (libc::POLLERR | libc::POLLHUP) != 0
}

// Tests only: unwrap on a local pipe and /dev/null, where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn broken_pipe() -> anyhow::Error {
        anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("connection to the agent failed")
    }

    #[test]
    fn a_pipe_without_reader_is_gone_and_one_with_a_reader_is_not() {
        let (r, w) = std::io::pipe().unwrap();
        assert!(!reader_gone(w.as_raw_fd()));
        drop(r);
        assert!(reader_gone(w.as_raw_fd()));
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        assert!(!reader_gone(null.as_raw_fd()));
    }

    #[test]
    fn a_broken_pipe_that_is_not_stdout_is_a_lost_connection() {
        assert_eq!(code_for(&broken_pipe()), EXIT_CONNECT);
    }
}
