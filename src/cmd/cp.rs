//! `vtun cp`: flags into `transfer::cp::CpOptions`, one multi-threaded runtime, stdout for the
//! `--json` summary.

use anyhow::Result;

use super::Runtime;
use crate::cli::{CpArgs, GlobalArgs};
use crate::mux::MuxConnector;
use crate::transfer::cp::{cp, CpOptions};

pub fn options(args: &CpArgs) -> CpOptions {
    CpOptions {
        paths: args.paths.clone(),
        recursive: args.recursive,
        preserve: args.preserve,
        resume: args.resume,
        parallel: args.parallel,
        json: args.json,
    }
}

pub fn run(g: &GlobalArgs, args: &CpArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    let connector = MuxConnector::new(settings.clone());
    let opts = options(args);
    Runtime::MultiThread.block_on(async {
        let mut out = std::io::stdout();
        cp(&settings, &opts, &connector, &mut out).await
    })
}
