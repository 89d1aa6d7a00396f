//! Public-key authentication in a fixed order, stopping at the first key that works: `-i` files,
//! ssh-agent keys, the vers CLI's cached key for the VM and pi-v's copy, then (with a Vers API
//! key, when those are missing or refused) the VM's key fetched from the API into the cache, once
//! per connect (a cached key the VM refuses means the VM was recreated); then ~/.ssh/id_ed25519,
//! id_ecdsa, id_rsa.
//!
//! A key the server refuses costs one round trip (russh asks "would you accept this key?" before
//! signing), the one it accepts two. A key already offered is not offered again: sshd
//! disconnects after MaxAuthTries failures, so duplicates would crowd out keys that might work.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use russh::client::{AuthResult, Handle};
use russh::keys::agent::client::AgentClient;
use russh::keys::agent::AgentIdentity;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey};

use super::hostkey::Client;
use super::keyfile::{self, Loaded};
use super::SshError;

/// The key files tried after the agent, in order (`-i` files come first, separately).
pub fn default_key_files(vm_id: &str) -> Vec<PathBuf> {
    let mut files = vec![
        crate::vers::keys::cache_file(vm_id),
        crate::vers::keys::pi_v_file(vm_id),
    ];
    if let Some(home) = dirs::home_dir() {
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            files.push(home.join(".ssh").join(name));
        }
    }
    files
}

struct Attempts<'a> {
    handle: &'a mut Handle<Client>,
    user: String,
    offered: HashSet<Vec<u8>>,
    tried: Vec<String>,
    rsa_hash: Option<Option<HashAlg>>,
    /// Bound on each exchange with the server (a stalled link must not hang us forever).
    timeout: Duration,
}

/// Authenticate as `user`, or fail with one line listing what was tried.
pub async fn authenticate(
    handle: &mut Handle<Client>,
    user: &str,
    host: &crate::target::Host,
    identities: &[PathBuf],
    timeout: Duration,
    api: Option<&crate::vers::VmApi>,
) -> anyhow::Result<()> {
    let mut a = Attempts {
        handle,
        user: user.to_string(),
        offered: HashSet::new(),
        tried: Vec::new(),
        rsa_hash: None,
        timeout,
    };
    for path in identities {
        if a.try_file(path, true).await? {
            return Ok(());
        }
    }
    if a.try_agent().await? {
        return Ok(());
    }
    let last_cached = crate::vers::keys::pi_v_file(host.vm_id());
    for path in default_key_files(host.vm_id()) {
        if a.try_file(&path, false).await? {
            return Ok(());
        }
        // Right after the cached keys, which were refused or missing: the API's key, before
        // ~/.ssh keys use up sshd's MaxAuthTries.
        if path == last_cached {
            if let Some(api) = api.filter(|api| !api.has_fetched()) {
                match api.fetch_key().await {
                    // The same key as a refused cached one is not offered again (first_offer).
                    Ok(path) => {
                        if a.try_file(&path, false).await? {
                            return Ok(());
                        }
                    }
                    Err(e) => api.note(&e),
                }
            }
        }
    }
    let noted = api.and_then(|api| api.noted());
    let tried = match (a.tried.is_empty(), noted) {
        (true, None) => {
            "no keys found (use -i FILE, ssh-agent, the vers CLI's key cache, or VERS_API_KEY)"
                .to_string()
        }
        (true, Some(why)) => format!("no key from the Vers API: {why}; no other key found"),
        (false, None) => format!("tried {}", a.tried.join(", ")),
        (false, Some(why)) => format!(
            "tried {}; no key from the Vers API: {why}",
            a.tried.join(", ")
        ),
    };
    Err(SshError::Auth(format!(
        "permission denied for {user}@{}: {tried}",
        host.name
    ))
    .into())
}

/// How many public keys the ssh-agent at SSH_AUTH_SOCK holds (0 without a reachable agent).
pub async fn agent_keys() -> usize {
    let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) else {
        return 0;
    };
    let ask = async {
        let mut agent = AgentClient::connect_uds(&sock).await.ok()?;
        agent.request_identities().await.ok()
    };
    match tokio::time::timeout(Duration::from_secs(2), ask).await {
        Ok(Some(ids)) => ids
            .iter()
            .filter(|id| matches!(id, AgentIdentity::PublicKey { .. }))
            .count(),
        _ => 0,
    }
}

impl Attempts<'_> {
    async fn try_file(&mut self, path: &Path, explicit: bool) -> anyhow::Result<bool> {
        let shown = path.display().to_string();
        let key = match keyfile::load(path) {
            Loaded::Key(k) => k,
            Loaded::Missing if explicit => {
                self.tried.push(format!("{shown} (not found)"));
                return Ok(false);
            }
            Loaded::Missing => return Ok(false),
            Loaded::Skipped(why) => {
                self.tried.push(format!("{shown} ({why})"));
                return Ok(false);
            }
        };
        if !self.first_offer(key.public_key()) {
            return Ok(false);
        }
        let ok = self.with_private_key(key).await?;
        self.tried
            .push(format!("{shown}{}", if ok { "" } else { " (refused)" }));
        Ok(ok)
    }

    async fn with_private_key(&mut self, key: Arc<PrivateKey>) -> anyhow::Result<bool> {
        let hash = if key.algorithm().is_rsa() {
            self.rsa_hash().await?
        } else {
            None
        };
        let res = self
            .handle
            .authenticate_publickey(&self.user, PrivateKeyWithHashAlg::new(key, hash));
        let res = bounded(self.timeout, res).await?.map_err(lost)?;
        Ok(matches!(res, AuthResult::Success))
    }

    async fn try_agent(&mut self) -> anyhow::Result<bool> {
        let Some(sock) = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty()) else {
            return Ok(false);
        };
        let mut agent = match AgentClient::connect_uds(&sock).await {
            Ok(a) => a,
            Err(e) => {
                self.tried.push(format!("ssh-agent (unreachable: {e})"));
                return Ok(false);
            }
        };
        let ids = match agent.request_identities().await {
            Ok(ids) => ids,
            Err(e) => {
                self.tried.push(format!("ssh-agent ({e})"));
                return Ok(false);
            }
        };
        let mut offered = 0;
        for id in ids {
            let AgentIdentity::PublicKey { key, .. } = id else {
                continue;
            };
            if !self.first_offer(&key) {
                continue;
            }
            offered += 1;
            let hash = if key.algorithm().is_rsa() {
                self.rsa_hash().await?
            } else {
                None
            };
            let res = self
                .handle
                .authenticate_publickey_with(&self.user, key, hash, &mut agent);
            match bounded(self.timeout, res).await? {
                Ok(AuthResult::Success) => return Ok(true),
                Ok(AuthResult::Failure { .. }) => {}
                Err(e) => {
                    if self.handle.is_closed() {
                        return Err(lost(e));
                    }
                    tracing::debug!("agent could not sign: {e}");
                }
            }
        }
        self.tried.push(match offered {
            0 => "ssh-agent (no keys)".to_string(),
            n => format!(
                "ssh-agent ({n} key{} refused)",
                if n == 1 { "" } else { "s" }
            ),
        });
        Ok(false)
    }

    /// False if this public key was already offered.
    fn first_offer(&mut self, key: &PublicKey) -> bool {
        let blob = key.to_bytes().unwrap_or_default();
        self.offered.insert(blob)
    }

    /// rsa-sha2-512/256 as the server allows (asked once; SHA-256 if it does not say).
    async fn rsa_hash(&mut self) -> anyhow::Result<Option<HashAlg>> {
        if let Some(h) = self.rsa_hash {
            return Ok(h);
        }
        let asked = bounded(self.timeout, self.handle.best_supported_rsa_hash()).await?;
        let h = match asked.map_err(lost)? {
            Some(Some(h)) => Some(h),
            _ => Some(HashAlg::Sha256),
        };
        self.rsa_hash = Some(h);
        Ok(h)
    }
}

/// `work`, or "connection lost" when the server does not answer within `limit`.
async fn bounded<T>(
    limit: Duration,
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, work)
        .await
        .map_err(|_| lost(format!("no answer within {}s", limit.as_secs_f64())))
}

fn lost(e: impl std::fmt::Display) -> anyhow::Error {
    SshError::ConnectionLost(format!("during authentication: {e}")).into()
}
