//! Host-key pinning: trust on first use into vtun's own known_hosts (OpenSSH format), refuse a
//! changed key with both fingerprints and the line to remove.
//!
//! Entries are written as `[name]:port` (OpenSSH's form for a non-22 port), so pins for the edge
//! at 443 never collide with what plain `ssh` recorded for port 22 of the same name, and the file
//! can be fed to OpenSSH (`UserKnownHostsFile`) as is.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use russh::keys::{HashAlg, PublicKey, PublicKeyOrCertificate};

use super::SshError;

/// What to do with a server's host key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// Pin on first use, refuse a changed key.
    AcceptNew,
    /// Refuse unknown and changed keys.
    Yes,
    /// Accept any key (no protection against a man in the middle).
    No,
}

/// What to check the server's key against.
#[derive(Debug, Clone)]
pub struct Pins {
    pub file: PathBuf,
    /// `[name]:port`, or `name` for port 22.
    pub label: String,
    pub policy: HostKeyCheck,
}

/// What the known_hosts file says about a key.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Known,
    Unknown,
    /// The host is pinned to another key at this 1-based line.
    Changed {
        line: usize,
        pinned: String,
    },
}

impl Pins {
    pub fn new(file: &Path, name: &str, port: u16, policy: HostKeyCheck) -> Pins {
        let label = if port == 22 {
            name.to_string()
        } else {
            format!("[{name}]:{port}")
        };
        Pins {
            file: file.to_path_buf(),
            label,
            policy,
        }
    }

    /// Accept, pin, or refuse `key` (the error is an [`SshError::HostKey`]).
    pub fn check(&self, key: &PublicKey) -> anyhow::Result<()> {
        if self.policy == HostKeyCheck::No {
            return Ok(());
        }
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.file.display()))
            }
        };
        let got = fingerprint(key);
        match lookup(&text, &self.label, key) {
            Verdict::Known => Ok(()),
            Verdict::Changed { line, pinned } => Err(SshError::HostKey(format!(
                "host key for {} has changed (pinned {pinned}, now {got}): if the VM was \
                 rebuilt, remove line {line} of {} and retry; otherwise someone may be \
                 intercepting the connection",
                self.label,
                self.file.display()
            ))
            .into()),
            Verdict::Unknown if self.policy == HostKeyCheck::Yes => {
                Err(SshError::HostKey(format!(
                    "host key for {} ({got}) is not in {} and --host-key-check is yes",
                    self.label,
                    self.file.display()
                ))
                .into())
            }
            Verdict::Unknown => {
                self.append(key)?;
                tracing::info!(host = %self.label, fingerprint = %got, "pinned new host key");
                Ok(())
            }
        }
    }

    fn append(&self, key: &PublicKey) -> anyhow::Result<()> {
        let openssh = key
            .to_openssh()
            .context("cannot encode the server's host key")?;
        // Drop the comment: known_hosts lines are `host keytype base64`.
        let mut parts = openssh.split_whitespace();
        let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
            anyhow::bail!("cannot encode the server's host key");
        };
        if let Some(dir) = self.file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        // One write with O_APPEND, so parallel sessions pinning at once do not interleave.
        let line = format!("{} {kind} {b64}\n", self.label);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("cannot write {}", self.file.display()))
    }
}

/// `SHA256:…`, as OpenSSH prints it.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn lookup(text: &str, label: &str, key: &PublicKey) -> Verdict {
    let mut changed = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_kind), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !hosts.split(',').any(|h| h == label) {
            continue;
        }
        match russh::keys::parse_public_key_base64(b64) {
            Ok(pinned) if pinned.key_data() == key.key_data() => return Verdict::Known,
            Ok(pinned) => {
                changed.get_or_insert(Verdict::Changed {
                    line: i + 1,
                    pinned: fingerprint(&pinned),
                });
            }
            Err(_) => {
                changed.get_or_insert(Verdict::Changed {
                    line: i + 1,
                    pinned: "an unreadable key".into(),
                });
            }
        }
    }
    changed.unwrap_or(Verdict::Unknown)
}

/// The russh client handler: checks the host key and hands channels the server opens for our
/// remote forwards to their listeners (see `forwarded`); everything else is handled per channel.
pub struct Client {
    pub pins: Pins,
    pub forwards: std::sync::Arc<super::forwarded::Forwards>,
}

impl russh::client::Handler for Client {
    type Error = anyhow::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.pins.check(key)?;
                Ok(true)
            }
            PublicKeyOrCertificate::Certificate(_) => Err(SshError::HostKey(format!(
                "{} presented a host certificate; vtun pins plain host keys only",
                self.pins.label
            ))
            .into()),
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let to = self.forwards.route_tcp(connected_address, connected_port);
        let what = format!(
            "a connection to {connected_address}:{connected_port} from \
             {originator_address}:{originator_port}"
        );
        self.forwards.open(channel, to, what, reply).await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: russh::Channel<russh::client::Msg>,
        socket_path: &str,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let to = self.forwards.route_unix(socket_path);
        let what = format!("a connection to {socket_path}");
        self.forwards.open(channel, to, what, reply).await;
        Ok(())
    }
}

// Tests only: unwrap on values the test itself built (in-memory data, temp files, local
// processes), where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const K1: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const K2: &str = "AAAAC3NzaC1lZDI1NTE5AAAAINI2qqu1KjBTVSoSWUeRH7VTV2GimXNPd3KrRoAVyivM";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    #[test]
    fn label_uses_brackets_except_port_22() {
        let p = Pins::new(Path::new("/x"), "a.vm.test", 443, HostKeyCheck::AcceptNew);
        assert_eq!(p.label, "[a.vm.test]:443");
        let p = Pins::new(Path::new("/x"), "h", 22, HostKeyCheck::AcceptNew);
        assert_eq!(p.label, "h");
    }

    #[test]
    fn lookup_finds_known_unknown_and_changed() {
        let text = format!(
            "# comment\n[b.vm.test]:443 ssh-ed25519 {K2}\n[a.vm.test]:443 ssh-ed25519 {K1}\n"
        );
        assert_eq!(lookup(&text, "[a.vm.test]:443", &key(K1)), Verdict::Known);
        assert_eq!(lookup(&text, "[c.vm.test]:443", &key(K1)), Verdict::Unknown);
        match lookup(&text, "[a.vm.test]:443", &key(K2)) {
            Verdict::Changed { line, .. } => assert_eq!(line, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tofu_pins_then_refuses_a_changed_key() {
        let dir = std::env::temp_dir().join(format!("vtun-pins-{}", std::process::id()));
        let file = dir.join("sub").join("known_hosts");
        let p = Pins::new(&file, "a.vm.test", 443, HostKeyCheck::AcceptNew);
        p.check(&key(K1)).unwrap();
        p.check(&key(K1)).unwrap();
        let err = p.check(&key(K2)).unwrap_err().to_string();
        assert!(err.contains("line 1 of"), "{err}");
        assert!(err.contains(&fingerprint(&key(K1))), "{err}");
        assert!(err.contains(&fingerprint(&key(K2))), "{err}");
        let strict = Pins::new(&file, "b.vm.test", 443, HostKeyCheck::Yes);
        assert!(strict.check(&key(K1)).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
