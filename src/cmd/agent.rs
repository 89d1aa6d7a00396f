//! `vtun agent`: the VM side of `vtun sync`, serving its protocol on stdin/stdout.

use anyhow::Result;

use super::Runtime;
use crate::agent::serve as agent;

pub fn run() -> Result<u8> {
    if std::env::var_os("VTUN_AGENT_PROBE").is_some() {
        super::print_stdout(&format!("{}\n", agent::probe_line()))?;
        return Ok(0);
    }
    Runtime::CurrentThread.block_on(agent::serve(tokio::io::stdin(), tokio::io::stdout()))?;
    Ok(0)
}
