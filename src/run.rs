//! Dispatch: turn a parsed command line into a call of the right subcommand.

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{Cli, Command};
use crate::settings::Settings;

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
        Command::Ssh(a) => crate::exec::ssh(g, &a),
        Command::Exec(a) => crate::exec::exec(g, &a),
        Command::Cp(_) | Command::Sync(_) | Command::Bench(_) => {
            anyhow::bail!("this subcommand is not available in this build yet")
        }
    }
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
