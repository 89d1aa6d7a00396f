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
    let hosts = args.fanout.hosts.is_some();
    if let Some(list) = super::fanout::list_operand(&args.paths, hosts)? {
        let opts = options(args);
        return super::fanout::each_vm(
            &settings,
            &args.paths,
            list,
            &args.fanout,
            move |s, paths, conn| {
                let opts = CpOptions {
                    paths,
                    ..opts.clone()
                };
                async move {
                    let mut out = Vec::new();
                    let r = cp(&s, &opts, conn.as_ref(), &mut out).await;
                    (r, out)
                }
            },
        );
    }
    let connector = MuxConnector::new(settings.clone());
    let opts = options(args);
    Runtime::MultiThread.block_on(async {
        let mut out = std::io::stdout();
        cp(&settings, &opts, &connector, &mut out).await
    })
}
