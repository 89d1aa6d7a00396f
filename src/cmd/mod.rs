//! The command layer: the only code that sees clap types and the process's stdio. Each
//! subcommand's file turns its arguments into typed options, builds its runtime here, and calls an
//! engine that takes those options and streams, so one engine can serve one VM or many and tests
//! can drive it with in-memory streams.

mod agent;
pub mod bench;
mod completions;
pub mod cp;
pub mod exec;
mod fanout;
pub mod forward;
mod gateway;
mod master;
mod proxy;
pub mod ssh;
mod ssh_config;
pub mod sync;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::cli::{Cli, Command, GlobalArgs, HostKeyCheck, MasterCommand};
use crate::settings::{default_known_hosts, Settings};
use crate::target::resolve_domain;
use crate::tls::TlsOptions;

pub fn run(cli: Cli) -> Result<u8> {
    init_logging(&cli);
    let g = &cli.global;
    match cli.command {
        Command::Proxy(a) => proxy::run(g, &a),
        Command::Gateway(a) => gateway::run(&a),
        Command::Agent => agent::run(),
        Command::SshConfig(a) => ssh_config::run(g, &a),
        Command::Completions(a) => completions::run(&a),
        Command::Ssh(a) => ssh::run(g, &a),
        Command::Exec(a) => exec::run(g, &a),
        Command::Cp(a) => cp::run(g, &a),
        Command::Sync(a) => sync::run(g, &a),
        Command::Forward(a) => forward::run(g, &a),
        Command::Bench(a) => bench::run(g, &a),
        Command::Master(c) => master::run(g, &c),
    }
}

/// Resolve the global options (flags, environment, defaults) for a connecting subcommand.
pub fn settings(g: &GlobalArgs, identities: &[PathBuf]) -> Result<Settings> {
    let vers_url = std::env::var("VERS_URL").ok();
    let domain = resolve_domain(g.domain.as_deref(), vers_url.as_deref());
    Ok(Settings {
        domain,
        port: g.port,
        tls: TlsOptions {
            ca_files: g.ca_file.clone(),
            insecure: g.insecure,
            connect: g.connect.clone(),
            connect_timeout: seconds(g.connect_timeout, "--connect-timeout")?,
        },
        user: g.user.clone().unwrap_or_else(|| "root".to_string()),
        identities: identities.to_vec(),
        known_hosts: g.known_hosts.clone().unwrap_or_else(default_known_hosts),
        host_key_check: match g.host_key_check {
            HostKeyCheck::AcceptNew => crate::ssh::HostKeyCheck::AcceptNew,
            HostKeyCheck::Yes => crate::ssh::HostKeyCheck::Yes,
            HostKeyCheck::No => crate::ssh::HostKeyCheck::No,
        },
        wait: seconds(g.wait, "--wait")?,
        persist: seconds(g.persist, "--persist")?,
        verbose: g.verbose,
        quiet: g.quiet,
        names: std::sync::Arc::new(crate::vers::names::Names::from_env()),
        vers: crate::vers::api::ApiConfig::from_env(&g.ca_file)?,
        resume: !g.no_resume,
    })
}

/// A flag's number of seconds as a duration (finite and ≥ 0).
pub fn seconds(v: f64, what: &str) -> Result<Duration> {
    if v.is_finite() && v >= 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        anyhow::bail!("{what} must be a number of seconds ≥ 0")
    }
}

/// The runtimes subcommands run on, built in one place.
pub enum Runtime {
    /// One thread: the proxy and the agent, which are a single relay.
    CurrentThread,
    /// Worker threads for the engines that move many streams at once (cp, sync, bench).
    MultiThread,
    /// A fixed, small number of workers: exec and ssh.
    Workers(usize),
}

impl Runtime {
    pub fn build(self) -> Result<tokio::runtime::Runtime> {
        let mut b = match self {
            Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
            Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread(),
            Runtime::Workers(n) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n.max(1));
                b
            }
        };
        b.enable_all()
            .build()
            .context("cannot start the async runtime")
    }

    /// Run `f` to completion on a new runtime of this kind, then drop the runtime without waiting
    /// for background tasks (a stdin read blocked on a terminal, idle channels), so the process
    /// exits as soon as the work is done.
    pub fn block_on<T>(self, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
        let rt = self.build()?;
        let result = rt.block_on(f);
        rt.shutdown_background();
        result
    }
}

/// Write `text` to stdout and flush. A reader that went away shows up as a broken pipe, which
/// the exit-code mapping turns into a quiet exit (`vtun ssh-config | true`), never a panic.
pub fn print_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")
}

/// `tracing` to stderr only (stdout may be a data stream). Default: warnings, and info for the
/// gateway (which logs one line per connection); `-v` raises, `-q` lowers, RUST_LOG overrides.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let base = match (&cli.command, cli.global.quiet) {
        (_, true) => 0,
        (Command::Gateway(_), _) => 2,
        (Command::Master(MasterCommand::Serve(_)), _) => 2,
        _ => 1,
    } + cli.global.verbose as usize;
    let level = ["error", "warn", "info", "debug", "trace"][base.min(4)];
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("vtun={level}")));
    // Colors only on a terminal (and never with NO_COLOR): logs in files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
