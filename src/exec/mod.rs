//! `vtun exec` and `vtun ssh`: one command (or a login shell) on a VM over a fresh session.
//!
//! `exec` quotes each argument for the remote shell (see [`quote`]); `ssh` joins its command with
//! spaces, as ssh does. Both exit with the remote status, 128+N for a remote killed by signal N,
//! 255 when the connection failed or was lost first, 130 after Ctrl-C.

mod drive;
pub mod quote;
mod tty;

use anyhow::{Context, Result};

use crate::cli::{ExecArgs, GlobalArgs, SshArgs};
use crate::settings::Settings;
use crate::ssh::Session;
use crate::target::Host;
use drive::{Pty, Request, Start};
use quote::{parse_env, CommandSpec};

/// `vtun exec VM -- CMD…`
pub fn exec(g: &GlobalArgs, args: &ExecArgs) -> Result<u8> {
    let settings = crate::cmd::settings(g, &args.identity.identity)?;
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
    let raw = args.tty && tty::is_tty(libc::STDIN_FILENO);
    let req = Request {
        start: Start::Command(spec.render()),
        pty: args.tty.then(Pty::from_local),
        follow_resize: raw,
    };
    run(&settings, &host, req, raw)
}

/// `vtun ssh VM [CMD…]`
pub fn ssh(g: &GlobalArgs, args: &SshArgs) -> Result<u8> {
    let settings = crate::cmd::settings(g, &args.identity.identity)?;
    let host = settings.host(&args.vm)?;
    let interactive = args.command.is_empty();
    let stdin_tty = tty::is_tty(libc::STDIN_FILENO);
    let want_pty = !args.no_tty && (args.tty || (interactive && stdin_tty));
    let start = match interactive {
        true => Start::Shell,
        false => Start::Command(args.command.join(" ")),
    };
    let raw = want_pty && stdin_tty;
    let req = Request {
        start,
        pty: want_pty.then(Pty::from_local),
        follow_resize: raw,
    };
    run(&settings, &host, req, raw)
}

fn run(settings: &Settings, host: &Host, req: Request, raw: bool) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = rt.block_on(async {
        let session = Session::connect(settings, host).await?;
        // Raw mode only once connected: passphrase prompts and connection errors stay readable.
        let _raw = match raw {
            true => Some(tty::RawMode::enable().context("cannot set the terminal to raw mode")?),
            false => None,
        };
        drive::drive(&session, req).await
    });
    // Do not wait for anything still blocked (a stdin read on a terminal).
    rt.shutdown_background();
    outcome
}
