//! Dispatch: turn a parsed command line into a call of the right subcommand.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::settings::Settings;
use crate::ssh::SshConnector;

pub fn run(cli: Cli) -> Result<u8> {
    init_logging(&cli);
    let g = &cli.global;
    match cli.command {
        Command::Proxy(a) => crate::proxy::run(&Settings::from_args(g, &[])?, &a.host),
        Command::Gateway(a) => crate::gateway::run(&a),
        Command::Agent => crate::sync::agent::run_stdio(),
        Command::SshConfig(a) => crate::sshconfig::run(&Settings::from_args(g, &[])?, &a),
        Command::Completions(a) => {
            clap_complete::generate(a.shell, &mut Cli::command(), "vtun", &mut std::io::stdout());
            Ok(0)
        }
        Command::Ssh(a) => crate::cmd::ssh::run(g, &a),
        Command::Exec(a) => crate::cmd::exec::run(g, &a),
        Command::Cp(a) => {
            let settings = Settings::from_args(g, &a.identity.identity)?;
            let (rt, c) = engine(&settings)?;
            finish(rt, |rt| {
                rt.block_on(crate::transfer::cp::cp(&settings, &a, &c))
            })
        }
        Command::Sync(a) => {
            let settings = Settings::from_args(g, &a.identity)?;
            let (rt, c) = engine(&settings)?;
            finish(rt, |rt| rt.block_on(crate::sync::sync(&settings, &a, &c)))
        }
        Command::Bench(a) => {
            let settings = Settings::from_args(g, &a.identity.identity)?;
            let (rt, c) = engine(&settings)?;
            finish(rt, |rt| {
                rt.block_on(crate::transfer::bench::bench(&settings, &a, &c))
            })
        }
    }
}

/// A multi-threaded runtime and an SSH connector that shares one session per host.
fn engine(settings: &Settings) -> Result<(tokio::runtime::Runtime, SshConnector)> {
    Ok((
        tokio::runtime::Runtime::new()?,
        SshConnector::new(settings.clone()),
    ))
}

/// Run on the runtime, then drop it without waiting for background tasks (stdin readers,
/// idle channels) so the process exits as soon as the work is done.
fn finish(
    rt: tokio::runtime::Runtime,
    f: impl FnOnce(&tokio::runtime::Runtime) -> Result<u8>,
) -> Result<u8> {
    let result = f(&rt);
    rt.shutdown_background();
    result
}

/// `tracing` to stderr only (stdout may be a data stream). Default: warnings, and info for the
/// gateway (which logs one line per connection); `-v` raises, `-q` lowers, RUST_LOG overrides.
fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let base = match (&cli.command, cli.global.quiet) {
        (_, true) => 0,
        (Command::Gateway(_), _) => 2,
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
