//! The `vtun` binary: parse, run, and turn the outcome into an exit code in one place.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = vtun::cli::parse();
    vtun::error::exit_code(vtun::cmd::run(cli))
}
