//! `vtun exec VM CMD…`: flags to [`ExecOptions`], then one exec channel on the VM's link.
//!
//! Each argument is quoted for the remote shell (see [`crate::exec::quote`]), so the remote
//! command sees the argv the user typed; `--sh` sends one shell line as is.

use std::sync::Arc;

use anyhow::Result;

use crate::cli::{ExecArgs, GlobalArgs};
use crate::exec::quote::{parse_env, CommandSpec};
use crate::exec::{ExecOptions, Stdio};
use crate::fanout::{self, exec::Show};
use crate::link::{Connector, ExecRequest, Start};
use crate::mux::MuxConnector;
use crate::settings::Settings;
use crate::ssh::SshConnector;
use crate::target::Host;

pub fn run(g: &GlobalArgs, args: &ExecArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    // With --hosts every operand is the command's.
    let (vm, argv) = match (&args.fanout.hosts, &args.vm) {
        (Some(_), Some(first)) => (None, [vec![first.clone()], args.command.clone()].concat()),
        (_, vm) => (vm.clone(), args.command.clone()),
    };
    if argv.is_empty() {
        anyhow::bail!("no command given (vtun exec VM CMD…)");
    }
    let env = args
        .env
        .iter()
        .map(|s| parse_env(s))
        .collect::<Result<Vec<_>>>()?;
    let spec = CommandSpec {
        argv,
        shell_line: args.sh,
        env,
        cd: args.cd.clone(),
    };
    let request = ExecRequest {
        start: Start::Command(spec.render()),
        pty: args.tty.then(crate::exec::local_pty),
        env: Vec::new(),
    };
    let many = args.fanout.hosts.is_some() || vm.as_deref().is_some_and(fanout::is_list);
    if many {
        let show = match (args.gather, args.json) {
            (true, _) => Show::Gather,
            (_, true) => Show::Json,
            _ => Show::Lines,
        };
        return super::fanout::exec(
            &settings,
            vm.as_deref(),
            &args.fanout,
            request,
            show,
            args.stdin,
        );
    }
    let Some(vm) = vm else {
        anyhow::bail!("no VM given");
    };
    let host = settings.host(&vm)?;
    let opts = ExecOptions {
        raw: args.tty && crate::exec::stdin_is_tty(),
        request,
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
        let Some(forwards) = forwards else {
            let link = MuxConnector::new(settings.clone()).connect(host).await?;
            return crate::exec::run(link.as_ref(), opts, Stdio::process()).await;
        };
        // Forwards need their own connection (a master does not relay remote forwards), and
        // the command shares it.
        let connector = Arc::new(SshConnector::new(settings.clone()));
        let forwarding = crate::forward::start(connector.clone(), host.clone(), forwards).await?;
        let link = connector.connect(host).await?;
        let code = crate::exec::run(link.as_ref(), opts, Stdio::process()).await;
        drop(forwarding);
        code
    })
}
