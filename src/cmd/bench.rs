//! `vtun bench`: flags into `transfer::bench::BenchOptions`; the report goes to stdout.

use anyhow::{bail, Result};

use super::Runtime;
use crate::cli::{BenchArgs, GlobalArgs};
use crate::mux::MuxConnector;
use crate::transfer::bench::{bench, parse_size, BenchOptions};

pub fn run(g: &GlobalArgs, args: &BenchArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    if args.parallel == 0 {
        bail!("--parallel must be at least 1");
    }
    let opts = BenchOptions {
        vm: args.vm.clone(),
        size: parse_size(&args.size)?,
        parallel: args.parallel,
        json: args.json,
    };
    let connector = MuxConnector::new(settings.clone());
    Runtime::MultiThread.block_on(async {
        let mut out = std::io::stdout();
        bench(&settings, &opts, &connector, &mut out).await
    })
}
