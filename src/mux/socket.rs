//! Where masters listen and who may talk to them.
//!
//! Sockets live in one per-user directory (`$XDG_RUNTIME_DIR/vtun`, else `~/.cache/vtun`),
//! kept at 0700 and refused when another user owns it; each socket is 0600 and both ends check
//! the other's uid (SO_PEERCRED), so a master only ever serves its own user and a client never
//! hands its traffic to someone else's process. A socket is named after a hash of everything
//! that makes two connections interchangeable: user, VM, port, dial address, trust settings,
//! identities, and the protocol version.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::settings::Settings;
use crate::target::Host;

/// Where the per-user directory is (`$XDG_RUNTIME_DIR/vtun`, else `~/.cache/vtun`).
fn location() -> Result<PathBuf> {
    Ok(
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("vtun"),
            None => dirs::home_dir()
                .context("no home directory for the master sockets")?
                .join(".cache")
                .join("vtun"),
        },
    )
}

/// The per-user directory for sockets, created 0700 if missing.
pub fn dir() -> Result<PathBuf> {
    let dir = location()?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let meta = std::fs::symlink_metadata(&dir)
        .with_context(|| format!("cannot inspect {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != euid() {
        bail!(
            "{} is not a directory of this user: not using connection masters",
            dir.display()
        );
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", dir.display()))?;
    }
    Ok(dir)
}

/// The directory when it exists, checked as [`dir`] does, without creating it (for `vtun master
/// list`).
pub fn existing_dir() -> Option<PathBuf> {
    location().ok()?.is_dir().then(dir)?.ok()
}

/// The socket for connections to `host` with `settings`.
pub fn path(dir: &Path, settings: &Settings, host: &Host) -> PathBuf {
    dir.join(format!("{}.sock", identity(settings, host)))
}

/// A short hash naming the connection identity.
pub fn identity(settings: &Settings, host: &Host) -> String {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &[u8]| {
        // Length-prefixed so no two field lists hash alike.
        h.update((name.len() as u64).to_be_bytes());
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_be_bytes());
        h.update(value);
    };
    field("version", &super::proto::VERSION.to_be_bytes());
    field("vtun", env!("CARGO_PKG_VERSION").as_bytes());
    field("user", settings.user_for(host).as_bytes());
    field("host", host.name.as_bytes());
    field("port", &settings.port_for(host).to_be_bytes());
    field(
        "connect",
        settings.tls.connect.as_deref().unwrap_or("").as_bytes(),
    );
    for ca in &settings.tls.ca_files {
        field("ca", ca.as_os_str().as_encoded_bytes());
    }
    field("insecure", &[u8::from(settings.tls.insecure)]);
    field(
        "known_hosts",
        settings.known_hosts.as_os_str().as_encoded_bytes(),
    );
    field(
        "host_key_check",
        format!("{:?}", settings.host_key_check).as_bytes(),
    );
    for id in &settings.identities {
        field("identity", id.as_os_str().as_encoded_bytes());
    }
    let digest = h.finalize();
    digest[..10].iter().map(|b| format!("{b:02x}")).collect()
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of a Unix stream.
pub fn peer_uid(stream: &tokio::net::UnixStream) -> Result<u32> {
    Ok(stream
        .peer_cred()
        .context("cannot read the peer's credentials")?
        .uid())
}

/// Make a freshly bound socket readable and writable by its owner only.
pub fn make_private(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

// Tests only: unwrap on values the test built.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::tls::TlsOptions;
    use std::time::Duration;

    fn settings() -> Settings {
        Settings {
            domain: "vm.test".into(),
            port: 443,
            tls: TlsOptions {
                ca_files: vec![],
                insecure: false,
                connect: None,
                connect_timeout: Duration::from_secs(30),
            },
            user: "root".into(),
            identities: vec![],
            known_hosts: "/k".into(),
            host_key_check: crate::ssh::HostKeyCheck::AcceptNew,
            wait: Duration::from_secs(30),
            persist: Duration::from_secs(60),
            verbose: 0,
            quiet: false,
            names: std::sync::Arc::new(crate::vers::names::Names::at(
                None,
                "/nonexistent/HEAD".into(),
            )),
            vers: None,
            resume: true,
        }
    }

    /// Anything that changes who we are or whom we trust gets its own master.
    #[test]
    fn identity_separates_what_must_not_share_a_connection() {
        let s = settings();
        let a = s.host("a").unwrap();
        let base = identity(&s, &a);
        assert_eq!(base, identity(&s, &a));
        assert_ne!(base, identity(&s, &s.host("b").unwrap()));
        assert_ne!(base, identity(&s, &s.host("bob@a").unwrap()));
        assert_ne!(base, identity(&s, &s.host("a:444").unwrap()));
        let mut t = settings();
        t.tls.insecure = true;
        assert_ne!(base, identity(&t, &a));
        let mut t = settings();
        t.identities = vec!["/id".into()];
        assert_ne!(base, identity(&t, &a));
        let mut t = settings();
        t.tls.connect = Some("127.0.0.1:1".into());
        assert_ne!(base, identity(&t, &a));
        // Not identity: how long to wait or persist.
        let mut t = settings();
        t.wait = Duration::ZERO;
        t.persist = Duration::ZERO;
        assert_eq!(base, identity(&t, &a));
    }
}
