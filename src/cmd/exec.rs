//! `vtun exec VM CMD…`: flags to [`ExecOptions`], then one exec channel on the VM's link.
//!
//! Each argument is quoted for the remote shell (see [`crate::exec::quote`]), so the remote
//! command sees the argv the user typed; `--sh` sends one shell line as is.

use std::sync::Arc;

use anyhow::Result;

use crate::cli::{ExecArgs, GlobalArgs};
use crate::exec::quote::{parse_env, CommandSpec};
use crate::exec::{ExecOptions, Stdio};
use crate::link::{Connector, ExecRequest, Start};
use crate::settings::Settings;
use crate::ssh::SshConnector;
use crate::target::Host;

pub fn run(g: &GlobalArgs, args: &ExecArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    let host = settings.host(&args.vm)?;
    let env = args
        .env
        .iter()
        .map(|s| parse_env(s))
        .collect::<Result<Vec<_>>>()?;
    let spec = CommandSpec {
        argv: args.command.clone(),
        shell_line: args.sh,
        env,
        cd: args.cd.clone(),
    };
    let opts = ExecOptions {
        request: ExecRequest {
            start: Start::Command(spec.render()),
            pty: args.tty.then(crate::exec::local_pty),
            env: Vec::new(),
        },
        raw: args.tty && crate::exec::stdin_is_tty(),
    };
    on_vm(&settings, &host, opts, None)
}

/// Connect to `host` and run `opts` there with this process's stdio (shared with `vtun ssh`),
/// serving `forwards` on the same connection for as long as the command runs.
pub(super) fn on_vm(
    settings: &Settings,
    host: &Host,
    opts: ExecOptions,
    forwards: Option<crate::forward::Options>,
) -> Result<u8> {
    super::Runtime::Workers(2).block_on(async {
        let connector = Arc::new(SshConnector::new(settings.clone()));
        let forwarding = match forwards {
            Some(f) => Some(crate::forward::start(connector.clone(), host.clone(), f).await?),
            None => None,
        };
        let link = connector.connect(host).await?;
        let code = crate::exec::run(link.as_ref(), opts, Stdio::process()).await;
        drop(forwarding);
        code
    })
}
