//! Resolved global options: what every connecting subcommand needs, computed once from flags,
//! environment and defaults by the command layer (`cmd::settings`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::ssh::HostKeyCheck;
use crate::target::{Host, Location};
use crate::tls::TlsOptions;
use crate::vers::api::ApiConfig;
use crate::vers::names::Names;

#[derive(Debug, Clone)]
pub struct Settings {
    pub domain: String,
    /// Edge port when the host does not name one.
    pub port: u16,
    pub tls: TlsOptions,
    /// Login name when the operand has no `user@`.
    pub user: String,
    /// `-i` files, tried first, in order.
    pub identities: Vec<PathBuf>,
    pub known_hosts: PathBuf,
    pub host_key_check: HostKeyCheck,
    /// How long to keep retrying a VM that refuses or resets connections (boot race).
    pub wait: Duration,
    /// How long a background master keeps an idle connection for reuse; zero: no master.
    pub persist: Duration,
    pub verbose: u8,
    pub quiet: bool,
    /// Aliases and HEAD, resolved before the domain is appended.
    pub names: Arc<Names>,
    /// The Vers API, when an API key is configured (keys, VM state, resume).
    pub vers: Option<ApiConfig>,
    /// Resume a paused or sleeping VM (off with --no-resume).
    pub resume: bool,
}

impl Settings {
    /// Parse a VM operand: alias or HEAD resolved, then this domain appended.
    pub fn host(&self, s: &str) -> anyhow::Result<Host> {
        Host::resolve(s, &self.domain, &self.names)
    }

    /// Parse a `cp`/`sync` operand (a remote one's VM resolved as in [`Settings::host`]).
    pub fn location(&self, s: &str) -> anyhow::Result<Location> {
        Location::resolve(s, &self.domain, &self.names)
    }

    /// The port to dial for `host`.
    pub fn port_for(&self, host: &Host) -> u16 {
        host.port.unwrap_or(self.port)
    }

    /// The login name for `host`.
    pub fn user_for(&self, host: &Host) -> String {
        host.user.clone().unwrap_or_else(|| self.user.clone())
    }
}

/// `<config dir>/vtun/known_hosts` (e.g. ~/.config/vtun/known_hosts).
pub fn default_known_hosts() -> PathBuf {
    dirs::config_dir()
        .or_else(|| dirs::home_dir().map(|h| h.join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("vtun")
        .join("known_hosts")
}
