//! The command side of fan-out: VM lists to targets, one runtime, the closing summary, the
//! `--failed` file and the exit status (see [`crate::fanout`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cli::FanoutArgs;
use crate::fanout::exec::{exec_all, FanoutExec, Show};
use crate::fanout::output::Lines;
use crate::fanout::{self, Target, VmResult};
use crate::link::{Connector, ExecRequest};
use crate::settings::Settings;
use crate::ssh::SshConnector;

/// The VMs an operand (and `--hosts`) names, each resolved as a single VM operand would be.
pub fn targets(
    settings: &Settings,
    operand: Option<&str>,
    hosts: Option<&Path>,
) -> Result<Vec<Target>> {
    let names = fanout::names(operand, hosts, || anyhow::bail!("VERS-MERGE-PENDING"))?;
    names
        .into_iter()
        .map(|label| {
            let host = settings.host(&label)?;
            Ok(Target { label, host })
        })
        .collect()
}

/// The fan-out settings from the flags.
pub fn limits(fa: &FanoutArgs) -> Result<(usize, Option<std::time::Duration>)> {
    if fa.fanout == 0 {
        anyhow::bail!("--fanout must be at least 1");
    }
    let timeout = fa
        .timeout
        .map(|t| super::seconds(t, "--timeout"))
        .transpose()?;
    Ok((fa.fanout, timeout))
}

/// `vtun exec LIST -- CMD`.
pub fn exec(
    settings: &Settings,
    operand: Option<&str>,
    fa: &FanoutArgs,
    request: ExecRequest,
    show: Show,
    broadcast_stdin: bool,
) -> Result<u8> {
    let targets = targets(settings, operand, fa.hosts.as_deref())?;
    let (fanout, timeout) = limits(fa)?;
    let stdin = if broadcast_stdin {
        if fa.hosts.as_deref() == Some(Path::new("-")) {
            anyhow::bail!("--stdin cannot be used with --hosts - (stdin is the VM list)");
        }
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("cannot read stdin")?;
        Some(bytes::Bytes::from(buf))
    } else {
        None
    };
    fanout::raise_fd_limit();
    let started = Instant::now();
    let connector: Arc<dyn Connector> = Arc::new(SshConnector::new(settings.clone()));
    let results = super::Runtime::MultiThread.block_on(async move {
        let (lines, writer) = Lines::start(tokio::io::stdout(), tokio::io::stderr());
        let opts = FanoutExec {
            request,
            fanout,
            timeout,
            show,
            stdin,
        };
        let results = exec_all(connector, targets, opts, lines).await;
        let _ = writer.await;
        Ok(results)
    })?;
    if show == Show::Gather {
        let (out, err) = fanout::output::gather(&results);
        eprint!("{err}");
        super::print_stdout(&out)?;
    }
    finish(&results, fa, started, settings.quiet)
}

/// The summary (with more than one VM), the `--failed` file and the exit status.
pub fn finish(results: &[VmResult], fa: &FanoutArgs, started: Instant, quiet: bool) -> Result<u8> {
    if let Some(file) = &fa.failed {
        fanout::write_failed(file, results)?;
    }
    let status = fanout::exit_status(results);
    if results.len() > 1 && !(quiet && status == 0) {
        eprintln!(
            "{}",
            fanout::summary(results, started.elapsed().as_secs_f64())
        );
    }
    Ok(status)
}
