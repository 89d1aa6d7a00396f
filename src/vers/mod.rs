//! Vers-native behaviour: the vers CLI's files (aliases, HEAD, API key, key cache) and the Vers
//! API, used while connecting to a VM.
//!
//! Nothing here runs on the fast path: a connect whose cached key is accepted makes no API
//! request. The API is asked only when a key is missing or refused ([`VmApi::fetch_key`]) or a
//! connection fails the way a VM that is not running fails ([`VmApi::ensure_running`]), and only
//! when an API key is configured and the host is a VM under the Vers domain.

pub mod api;
pub mod keys;
pub mod names;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::Result;

use self::api::{blocking, ApiConfig, ApiError, Client, VmState};
use crate::error::Failure;
use crate::settings::Settings;
use crate::target::Host;

/// The API as seen from one connect to one VM.
pub struct VmApi {
    config: ApiConfig,
    client: OnceLock<Result<Client, String>>,
    /// The VM id (the first label of its name).
    pub id: String,
    /// The name the user typed (alias, HEAD or id), for messages.
    pub shown: String,
    resume: bool,
    quiet: bool,
    /// A key was asked for during this connect (ask at most once, plus once after a resume).
    fetched: AtomicBool,
    /// The state was asked for during this connect (ask at most once).
    checked: AtomicBool,
    /// Why the API could not give us a key, for the final "permission denied" line.
    note: Mutex<Option<String>>,
}

/// What [`VmApi::ensure_running`] found out.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The VM was asked to resume: wait for it afresh.
    Resumed,
    /// The VM is booting: keep waiting.
    Booting,
    /// Running (or the API could not say): keep waiting as usual.
    Wait,
}

/// Most agent keys offered before the API's key when no key is cached: with sshd's default
/// MaxAuthTries of 6, room is left for the API's key after them.
const AGENT_FIRST: usize = 3;

impl VmApi {
    /// The API for `host`, when an API key is configured and the host is a VM under the
    /// domain (`<id>.<domain>`); None means "behave as without the vers CLI".
    pub fn for_host(settings: &Settings, host: &Host) -> Option<VmApi> {
        let config = settings.vers.as_ref()?;
        let id = host.name.strip_suffix(&format!(".{}", settings.domain))?;
        if id.is_empty() || id.contains('.') {
            return None;
        }
        Some(VmApi {
            config: config.clone(),
            client: OnceLock::new(),
            id: id.to_string(),
            shown: host.shown().to_string(),
            resume: settings.resume,
            quiet: settings.quiet,
            fetched: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            note: Mutex::new(None),
        })
    }

    fn client(&self) -> Result<Client, ApiError> {
        self.client
            .get_or_init(|| self.config.client().map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|what| ApiError::Other {
                base: self.config.base.clone(),
                what: format!("cannot be used: {what}"),
            })
    }

    /// Whether a key was already asked for during this connect.
    pub fn has_fetched(&self) -> bool {
        self.fetched.load(Ordering::SeqCst)
    }

    /// Fetch the VM's key and write it to the shared cache; returns the cache file.
    pub async fn fetch_key(&self) -> Result<PathBuf, ApiError> {
        self.fetched.store(true, Ordering::SeqCst);
        let client = self.client()?;
        let id = self.id.clone();
        let key = blocking(move || client.ssh_key(&id)).await?;
        tracing::debug!(vm = %self.id, "fetched the VM's key from the Vers API");
        let path = keys::store(&self.id, &key.ssh_private_key).map_err(|e| ApiError::Other {
            base: self.config.base.clone(),
            what: format!("gave a key vtun could not cache: {e:#}"),
        })?;
        Ok(path)
    }

    /// Before dialing: with no `-i` file and no cached key, fetch the key (one request now
    /// rather than a failed authentication later). A VM the API does not know fails at once; one
    /// that is not running (409) is looked at, and resumed, here.
    ///
    /// An ssh-agent with a few keys gets its turn first (the key is then fetched during
    /// authentication, only if the agent's keys are refused); one with more keys than sshd's
    /// MaxAuthTries (6) leaves room for does not, so the API's key is not locked out.
    pub async fn prefetch(&self, identities: &[PathBuf]) -> Result<()> {
        if !identities.is_empty() || keys::cache_file(&self.id).exists() {
            return Ok(());
        }
        if (1..=AGENT_FIRST).contains(&crate::ssh::agent_keys().await) {
            return Ok(());
        }
        match self.fetch_key().await {
            Ok(_) => Ok(()),
            Err(ApiError::NotFound) => Err(self.not_found()),
            Err(ApiError::NotRunning(_)) => {
                match self.ensure_running().await? {
                    Verdict::Resumed => match self.fetch_key().await {
                        Ok(_) => {}
                        // Still starting: ask again once connected (see auth).
                        Err(ApiError::NotRunning(_)) => self.fetched.store(false, Ordering::SeqCst),
                        Err(e) => self.note(&e),
                    },
                    // Ask again once it is up and has let us connect.
                    Verdict::Booting => self.fetched.store(false, Ordering::SeqCst),
                    Verdict::Wait => {}
                }
                Ok(())
            }
            Err(e) => {
                self.note(&e);
                Ok(())
            }
        }
    }

    fn not_found(&self) -> anyhow::Error {
        Failure::connection(format!(
            "no VM {} ({}) in this Vers account",
            self.shown, self.id
        ))
    }

    /// Remember why no key came from the API (shown if authentication fails).
    pub fn note(&self, e: &ApiError) {
        let mut n = self.note.lock().unwrap_or_else(|p| p.into_inner());
        *n = Some(e.to_string());
    }

    pub fn noted(&self) -> Option<String> {
        self.note.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Ask for the VM's state after a connect failed the way a stopped VM fails. An unknown or
    /// dead VM, or a paused one with resuming turned off, is an error (exit 255 at once); a
    /// paused or sleeping one is resumed. An API that cannot answer is reported in one line and
    /// the usual boot wait goes on.
    pub async fn ensure_running(&self) -> Result<Verdict> {
        if self.checked.swap(true, Ordering::SeqCst) {
            return Ok(Verdict::Wait);
        }
        let (id, shown) = (self.id.as_str(), self.shown.as_str());
        let state = match self.state().await {
            Ok(s) => s,
            Err(ApiError::NotFound) => return Err(self.not_found()),
            Err(e) => {
                if !self.quiet {
                    eprintln!("vtun: cannot ask the Vers API about {shown}: {e}");
                }
                return Ok(Verdict::Wait);
            }
        };
        tracing::debug!(vm = id, %state, "state from the Vers API");
        match state {
            VmState::Paused | VmState::Sleeping if !self.resume => {
                Err(Failure::connection(format!(
                    "{shown} ({id}) is {state}: resume it with `vers resume {shown}` \
                     (or drop --no-resume / VTUN_NO_RESUME and vtun will)"
                )))
            }
            VmState::Paused | VmState::Sleeping => {
                if !self.quiet {
                    eprintln!("vtun: {shown} is {state}; resuming it…");
                }
                let client = self.client()?;
                let vm = id.to_string();
                match blocking(move || client.resume(&vm)).await {
                    Ok(()) => Ok(Verdict::Resumed),
                    Err(ApiError::NotFound) => Err(self.not_found()),
                    Err(e) => Err(Failure::connection(format!("cannot resume {shown}: {e}"))),
                }
            }
            VmState::Dead => Err(Failure::connection(format!(
                "{shown} ({id}) is dead: it cannot be resumed (start or branch another VM)"
            ))),
            VmState::Booting => Ok(Verdict::Booting),
            VmState::Running | VmState::Other(_) => Ok(Verdict::Wait),
        }
    }

    async fn state(&self) -> Result<VmState, ApiError> {
        let client = self.client()?;
        let id = self.id.clone();
        blocking(move || client.state(&id)).await
    }
}
