//! `vtun proxy HOST`: one relay on a single-threaded runtime (see `proxy` for why).

use anyhow::Result;

use super::Runtime;
use crate::cli::{GlobalArgs, ProxyArgs};

pub fn run(g: &GlobalArgs, args: &ProxyArgs) -> Result<u8> {
    let settings = super::settings(g, &[])?;
    let build = Runtime::CurrentThread.build()?;
    build.block_on(crate::proxy::run(&settings, &args.host))
}
