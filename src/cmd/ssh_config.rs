//! `vtun ssh-config`: print the ssh_config block (see `sshconfig`) for the current settings.

use anyhow::{Context, Result};

use crate::cli::{GlobalArgs, SshConfigArgs};

pub fn run(g: &GlobalArgs, args: &SshConfigArgs) -> Result<u8> {
    let settings = super::settings(g, &[])?;
    let exe = std::env::current_exe().context("cannot find the path of this vtun binary")?;
    let host = args
        .host
        .clone()
        .unwrap_or_else(|| format!("*.{}", settings.domain));
    let text = crate::sshconfig::block(&host, &exe.display().to_string(), &settings);
    super::print_stdout(&text)?;
    Ok(0)
}
