//! `vtun master list|stop|serve`: the background masters that hold connections for reuse
//! (see `mux`). `serve` is what connecting commands start; it is hidden from --help.

use anyhow::{bail, Result};

use super::Runtime;
use crate::cli::{GlobalArgs, MasterCommand, MasterListArgs, MasterServeArgs, MasterStopArgs};
use crate::mux;

pub fn run(g: &GlobalArgs, cmd: &MasterCommand) -> Result<u8> {
    match cmd {
        MasterCommand::List(a) => list(a),
        MasterCommand::Stop(a) => stop(g, a),
        MasterCommand::Serve(a) => serve(g, a),
    }
}

fn list(args: &MasterListArgs) -> Result<u8> {
    let masters = Runtime::CurrentThread.block_on(async { Ok(mux::list().await) })?;
    let infos: Vec<_> = masters.into_iter().map(|(_, i)| i).collect();
    if args.json {
        return super::print_stdout(&format!("{}\n", serde_json::to_string(&infos)?)).map(|()| 0);
    }
    let mut text = format!(
        "{:<40} {:>8} {:>6} {:>8} {:>5}\n",
        "VM", "PID", "IDLE", "CHANNELS", "CONNS"
    );
    for i in &infos {
        let vm = format!("{}@{}", i.user, i.host);
        text.push_str(&format!(
            "{vm:<40} {:>8} {:>5}s {:>8} {:>5}\n",
            i.pid, i.idle_secs, i.channels, i.connections
        ));
    }
    super::print_stdout(&text).map(|()| 0)
}

fn stop(g: &GlobalArgs, args: &MasterStopArgs) -> Result<u8> {
    let want = match &args.vm {
        Some(vm) => Some(super::settings(g, &[])?.host(vm)?),
        None => None,
    };
    Runtime::CurrentThread.block_on(async {
        let mut stopped = 0;
        for (path, info) in mux::list().await {
            if let Some(h) = &want {
                let user_matches = h.user.as_ref().is_none_or(|u| *u == info.user);
                if h.name != info.host || !user_matches {
                    continue;
                }
            }
            match mux::stop(&path).await {
                Ok(_) => stopped += 1,
                Err(e) => eprintln!("vtun: cannot stop the master for {}: {e:#}", info.host),
            }
        }
        if let (Some(h), 0) = (&want, stopped) {
            tracing::info!("no master for {}", h.name);
        }
        Ok(0)
    })
}

fn serve(g: &GlobalArgs, args: &MasterServeArgs) -> Result<u8> {
    let settings = super::settings(g, &args.identity.identity)?;
    let host = settings.host(&args.vm)?;
    if settings.persist.is_zero() {
        bail!("a master needs --persist above 0");
    }
    Runtime::MultiThread.block_on(async {
        match mux::master::serve(settings, host, &args.socket).await? {
            mux::master::Served::Done | mux::master::Served::AnotherMaster => Ok(0),
        }
    })
}
