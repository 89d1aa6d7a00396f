//! The seam between the engines (transfer, sync) and the SSH layer: an [`Opener`] opens byte
//! streams to one remote host, either the SFTP subsystem or a command's stdin/stdout.
//!
//! In production the opener is an SSH session (see `ssh`), whose channels it multiplexes or
//! spreads over several sessions. [`Subprocess`] runs the same remote programs (OpenSSH's
//! `sftp-server`, `vtun agent`) as local child processes, so the engines can be exercised and
//! benchmarked without a network.

use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};

/// A bidirectional byte stream to a remote program.
pub trait RemoteIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> RemoteIo for T {}

/// Opens streams to one remote host.
pub trait Opener: Send + Sync + 'static {
    /// A new SFTP subsystem stream (each call is a new channel, usable in parallel).
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>>;
    /// Run `command` through the remote shell; the stream is its stdin/stdout. stderr is
    /// forwarded to our stderr.
    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>>;
    /// A short name for messages (`a.vm.vers.sh`).
    fn name(&self) -> &str;
}

/// Runs the remote side as local processes: `sftp-server` for SFTP, `sh -c` for commands.
pub struct Subprocess {
    pub sftp_server: PathBuf,
    pub name: String,
}

impl Subprocess {
    pub fn new() -> Result<Subprocess> {
        let candidates = [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
            "/usr/libexec/sftp-server",
            "/usr/lib/ssh/sftp-server",
        ];
        let sftp_server = candidates
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("OpenSSH sftp-server not found (install openssh-server)")?;
        Ok(Subprocess {
            sftp_server,
            name: "localhost".into(),
        })
    }

    fn spawn(&self, mut cmd: tokio::process::Command) -> Result<Box<dyn RemoteIo>> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start local process")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Reap the child in the background; kill_on_drop is not needed once it exits by itself.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(Box::new(tokio::io::join(stdout, stdin)))
    }
}

impl Opener for Subprocess {
    fn sftp(&self) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        Box::pin(async move { self.spawn(tokio::process::Command::new(&self.sftp_server)) })
    }

    fn exec(&self, command: &str) -> BoxFuture<'_, Result<Box<dyn RemoteIo>>> {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg(command);
        Box::pin(async move { self.spawn(cmd) })
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// Connects to hosts: one [`Opener`] per host, shared by everything that talks to that host.
pub trait Connector: Send + Sync {
    fn connect<'a>(
        &'a self,
        host: &'a crate::target::Host,
    ) -> BoxFuture<'a, Result<std::sync::Arc<dyn Opener>>>;
}

/// Every host is this machine, served by local processes (engine tests and benchmarks).
pub struct LocalConnector;

impl Connector for LocalConnector {
    fn connect<'a>(
        &'a self,
        _host: &'a crate::target::Host,
    ) -> BoxFuture<'a, Result<std::sync::Arc<dyn Opener>>> {
        Box::pin(async move {
            let s: std::sync::Arc<dyn Opener> = std::sync::Arc::new(Subprocess::new()?);
            Ok(s)
        })
    }
}
