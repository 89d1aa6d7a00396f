//! `vtun ssh VM [CMD…]`: a login shell (with a PTY when stdin is a terminal) or a command
//! joined with spaces, as ssh does, on an exec channel of the VM's link; with -L/-R/-D, the
//! forwards of `vtun forward` on the same connection while it runs.

use anyhow::Result;

use crate::cli::{GlobalArgs, SshArgs};
use crate::exec::ExecOptions;
use crate::link::{ExecRequest, Start};

pub fn run(g: &GlobalArgs, args: &SshArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    let vm = args.vm.as_deref().unwrap_or(crate::vers::names::HEAD);
    let host = settings.host(vm)?;
    let interactive = args.command.is_empty();
    let stdin_tty = crate::exec::stdin_is_tty();
    let want_pty = !args.no_tty && (args.tty || (interactive && stdin_tty));
    let start = match interactive {
        true => Start::Shell,
        false => Start::Command(args.command.join(" ")),
    };
    let opts = ExecOptions {
        request: ExecRequest {
            start,
            pty: want_pty.then(crate::exec::local_pty),
            env: Vec::new(),
        },
        raw: want_pty && stdin_tty,
    };
    let specs = super::forward::specs(&args.forwards)?;
    let forwards = (!specs.is_empty()).then_some(crate::forward::Options {
        specs,
        // As ssh: quiet about forwards, except the ports the VM picks for -R 0.
        announce: false,
        quiet: settings.quiet,
    });
    super::exec::on_vm(&settings, &host, opts, forwards)
}
