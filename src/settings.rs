//! Resolved global options: what every connecting subcommand needs, computed once from flags,
//! environment and defaults.

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{GlobalArgs, HostKeyCheck};
use crate::target::{resolve_domain, Host};
use crate::tls::TlsOptions;

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
    pub verbose: u8,
    pub quiet: bool,
}

impl Settings {
    pub fn from_args(g: &GlobalArgs, identities: &[PathBuf]) -> anyhow::Result<Settings> {
        let vers_url = std::env::var("VERS_URL").ok();
        let domain = resolve_domain(g.domain.as_deref(), vers_url.as_deref());
        let secs = |v: f64, what: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(anyhow::anyhow!("{what} must be a number of seconds ≥ 0"))
            }
        };
        Ok(Settings {
            domain,
            port: g.port,
            tls: TlsOptions {
                ca_files: g.ca_file.clone(),
                insecure: g.insecure,
                connect: g.connect.clone(),
                connect_timeout: secs(g.connect_timeout, "--connect-timeout")?,
            },
            user: g.user.clone().unwrap_or_else(|| "root".to_string()),
            identities: identities.to_vec(),
            known_hosts: g.known_hosts.clone().unwrap_or_else(default_known_hosts),
            host_key_check: g.host_key_check,
            wait: secs(g.wait, "--wait")?,
            verbose: g.verbose,
            quiet: g.quiet,
        })
    }

    /// Parse a VM operand with this domain.
    pub fn host(&self, s: &str) -> anyhow::Result<Host> {
        Host::parse(s, &self.domain)
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
