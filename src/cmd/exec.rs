//! `vtun exec VM CMD…`: flags to [`ExecOptions`], then one exec channel on the VM's link.
//!
//! Each argument is quoted for the remote shell (see [`crate::exec::quote`]), so the remote
//! command sees the argv the user typed; `--sh` sends one shell line as is.

use anyhow::Result;

use crate::cli::{ExecArgs, GlobalArgs};
use crate::exec::quote::{parse_env, CommandSpec};
use crate::exec::{ExecOptions, Stdio};
use crate::link::{Connector, ExecRequest, Start};
use crate::mux::MuxConnector;
use crate::settings::Settings;
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
    on_vm(&settings, &host, opts)
}

/// Connect to `host` and run `opts` there with this process's stdio (shared with `vtun ssh`).
pub(super) fn on_vm(settings: &Settings, host: &Host, opts: ExecOptions) -> Result<u8> {
    super::Runtime::Workers(2).block_on(async {
        let link = MuxConnector::new(settings.clone()).connect(host).await?;
        crate::exec::run(link.as_ref(), opts, Stdio::process()).await
    })
}
