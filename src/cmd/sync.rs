//! `vtun sync`: flags into `sync::SyncOptions`; changes (`-i`, `-n`) and `--json` go to stdout.

use anyhow::Result;

use super::Runtime;
use crate::cli::{GlobalArgs, SyncArgs};
use crate::mux::MuxConnector;
use crate::sync::{run_sync, Partial, SyncOptions};

pub fn options(args: &SyncArgs) -> SyncOptions {
    SyncOptions {
        src: args.src.clone(),
        dst: args.dst.clone(),
        dry_run: args.dry_run,
        delete: args.delete,
        delete_excluded: args.delete_excluded,
        exclude: args.exclude.clone(),
        exclude_from: args.exclude_from.clone(),
        checksum: args.checksum,
        size_only: args.size_only,
        itemize: args.itemize,
        no_agent: args.no_agent,
        parallel: args.parallel,
        json: args.json,
    }
}

pub fn run(g: &GlobalArgs, args: &SyncArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity)?;
    let operands = [args.src.clone(), args.dst.clone()];
    if let Some(list) = super::fanout::list_operand(&operands, args.fanout.hosts.is_some())? {
        let opts = options(args);
        return super::fanout::each_vm(
            &settings,
            &operands,
            list,
            &args.fanout,
            move |s, paths, conn| {
                let opts = SyncOptions {
                    src: paths[0].clone(),
                    dst: paths[1].clone(),
                    ..opts.clone()
                };
                async move {
                    let mut out = Vec::new();
                    let r = run_sync(&s, &opts, conn.as_ref(), &mut out)
                        .await
                        .map(|_| 0);
                    (r, out)
                }
            },
        );
    }
    let connector = MuxConnector::new(settings.clone());
    let opts = options(args);
    Runtime::MultiThread.block_on(async {
        let mut out = std::io::stdout();
        match run_sync(&settings, &opts, &connector, &mut out).await {
            Ok(_) => Ok(0),
            // A partial run exits with its own status, as rsync's 23 and 24.
            Err(e) => match e.downcast_ref::<Partial>() {
                Some(p) => {
                    for line in p.lines() {
                        eprintln!("vtun: {line}");
                    }
                    Ok(p.code)
                }
                None => Err(e),
            },
        }
    })
}
