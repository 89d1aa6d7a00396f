//! `vtun forward VM -L/-R/-D …`: parse the operands into [`Spec`]s, start the forwarding engine
//! on the VM's link, and run until Ctrl-C or SIGTERM.

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::cli::{ForwardArgs, ForwardFlags, GlobalArgs};
use crate::forward::spec::{Kind, Spec};
use crate::forward::{self, Options};
use crate::link::Connector;
use crate::ssh::SshConnector;

pub fn run(g: &GlobalArgs, args: &ForwardArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    let host = settings.host(&args.vm)?;
    let opts = Options {
        specs: specs(&args.forwards)?,
        announce: true,
        quiet: settings.quiet,
    };
    super::Runtime::MultiThread.block_on(async {
        let connector: Arc<dyn Connector> = Arc::new(SshConnector::new(settings.clone()));
        let running = forward::start(connector, host, opts).await?;
        stopped().await?;
        drop(running);
        Ok(0)
    })
}

/// The forwards the flags ask for, in the order -L, -R, -D.
pub(super) fn specs(f: &ForwardFlags) -> Result<Vec<Spec>> {
    let kinds = [
        (Kind::Local, &f.local),
        (Kind::Remote, &f.remote),
        (Kind::Dynamic, &f.dynamic),
    ];
    kinds
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |s| Spec::parse(*k, s)))
        .collect()
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stopped() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot watch for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
