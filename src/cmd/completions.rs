//! `vtun completions SHELL`: generated from the clap model, never written by hand.

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::{Cli, CompletionsArgs};

pub fn run(args: &CompletionsArgs) -> Result<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "vtun", &mut buf);
    super::print_stdout(std::str::from_utf8(&buf).context("completions are not UTF-8")?)?;
    Ok(0)
}
