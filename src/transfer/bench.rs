//! `vtun bench VM`: measure a real link through the transfer engine.
use anyhow::Result;

use crate::cli::BenchArgs;
use crate::remote::Connector;
use crate::settings::Settings;

/// Run `vtun bench`.
pub async fn bench(
    _settings: &Settings,
    _args: &BenchArgs,
    _connector: &dyn Connector,
) -> Result<u8> {
    anyhow::bail!("bench is not implemented yet")
}
