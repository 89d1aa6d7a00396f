//! A small blocking client for the Vers API (keys, VM state, resume), called from async code
//! through `spawn_blocking`.
//!
//! TLS is verified with the same roots as the edge (the public web roots plus `--ca-file`), every
//! request has a timeout, and a 5xx or 429 answer is retried once. Failures are told in the
//! user's terms ([`ApiError`]); the API key never appears in a message or a log line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

/// The API the vers CLI uses when VERS_URL is not set.
pub const DEFAULT_URL: &str = "https://api.vers.sh";

/// Bound on one request, connect to last byte.
const TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before the one retry of a 5xx or 429.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// How to reach the API: base URL, key and extra roots. Debug never shows the key.
#[derive(Clone)]
pub struct ApiConfig {
    pub base: String,
    key: String,
    /// Where the key came from, for messages ("VERS_API_KEY" or "~/.versrc").
    pub key_source: &'static str,
    pub ca_files: Vec<PathBuf>,
}

impl std::fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiConfig")
            .field("base", &self.base)
            .field("key", &"<redacted>")
            .field("key_source", &self.key_source)
            .finish()
    }
}

#[derive(Deserialize)]
struct Versrc {
    #[serde(rename = "apiKey")]
    api_key: Option<String>,
}

impl ApiConfig {
    /// The API as the vers CLI finds it: VERS_URL (default api.vers.sh) and the key from
    /// VERS_API_KEY, else `~/.versrc` (`apiKey`). None without a key: vtun then never calls it.
    pub fn from_env(ca_files: &[PathBuf]) -> Result<Option<ApiConfig>> {
        let base = std::env::var("VERS_URL")
            .ok()
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.to_string());
        let (key, key_source) = match std::env::var("VERS_API_KEY") {
            Ok(k) if !k.trim().is_empty() => (k.trim().to_string(), "VERS_API_KEY"),
            _ => match versrc_key()? {
                Some(k) => (k, "~/.versrc"),
                None => return Ok(None),
            },
        };
        Ok(Some(ApiConfig {
            base,
            key,
            key_source,
            ca_files: ca_files.to_vec(),
        }))
    }

    /// A client for this API (builds the TLS configuration).
    pub fn client(&self) -> Result<Client> {
        tracing::debug!(base = %self.base, key = self.key_source, "using the Vers API");
        let tls = crate::tls::client_config(&self.ca_files, false)?;
        let agent = ureq::AgentBuilder::new()
            .timeout(TIMEOUT)
            .tls_config(Arc::new(tls))
            .user_agent(concat!("vtun/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Client {
            config: self.clone(),
            agent,
        })
    }
}

/// `apiKey` from `~/.versrc`, if the file exists and has one.
fn versrc_key() -> Result<Option<String>> {
    let Some(path) = dirs::home_dir().map(|h| h.join(".versrc")) else {
        return Ok(None);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let rc: Versrc = serde_json::from_str(&text)
        .with_context(|| format!("cannot read {}: not JSON with an apiKey", path.display()))?;
    Ok(rc
        .api_key
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty()))
}

/// What went wrong talking to the API, in the user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the key is wrong, expired or missing.
    #[error("the Vers API refused the key (check VERS_API_KEY or ~/.versrc)")]
    Unauthorized,
    /// 404: the account has no such VM.
    #[error("no such VM in this Vers account")]
    NotFound,
    /// 409: the VM is not running (paused or sleeping).
    #[error("the VM is not running ({0})")]
    NotRunning(String),
    /// Anything else: unreachable, timed out, a server error, an answer we cannot read.
    #[error("the Vers API at {base} {what}")]
    Other { base: String, what: String },
}

/// The VM's SSH key as the API hands it out.
#[derive(Deserialize)]
pub struct SshKey {
    pub ssh_private_key: String,
    /// Metadata only: vtun always dials the edge's port.
    #[serde(default)]
    pub ssh_port: Option<u16>,
}

impl std::fmt::Debug for SshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SshKey(<redacted>)")
    }
}

/// A VM's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    Booting,
    Running,
    Paused,
    Sleeping,
    Dead,
    Other(String),
}

impl VmState {
    fn parse(s: &str) -> VmState {
        match s.to_ascii_lowercase().as_str() {
            "booting" => VmState::Booting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "sleeping" => VmState::Sleeping,
            "dead" => VmState::Dead,
            _ => VmState::Other(s.to_string()),
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Booting => "booting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Sleeping => "sleeping",
            VmState::Dead => "dead",
            VmState::Other(s) => s,
        })
    }
}

#[derive(Deserialize)]
struct Status {
    state: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: Option<String>,
}

/// A ready client; cheap to clone.
#[derive(Clone)]
pub struct Client {
    config: ApiConfig,
    agent: ureq::Agent,
}

impl Client {
    /// `GET /api/v1/vm/{id}/ssh_key`.
    pub fn ssh_key(&self, id: &str) -> Result<SshKey, ApiError> {
        let body = self.call("GET", &format!("vm/{id}/ssh_key"), None)?;
        serde_json::from_str(&body).map_err(|_| self.other("sent a key we cannot read"))
    }

    /// `GET /api/v1/vm/{id}/status` → the VM's state.
    pub fn state(&self, id: &str) -> Result<VmState, ApiError> {
        let body = self.call("GET", &format!("vm/{id}/status"), None)?;
        let s: Status =
            serde_json::from_str(&body).map_err(|_| self.other("sent a status we cannot read"))?;
        Ok(VmState::parse(&s.state))
    }

    /// `PATCH /api/v1/vm/{id}/state` `{"state":"Running"}` (the API waits for a booting VM).
    pub fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.call(
            "PATCH",
            &format!("vm/{id}/state"),
            Some(r#"{"state":"Running"}"#),
        )
        .map(|_| ())
    }

    fn other(&self, what: &str) -> ApiError {
        ApiError::Other {
            base: self.config.base.clone(),
            what: what.to_string(),
        }
    }

    /// One request, retried once on 5xx or 429; the body of a 2xx answer.
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, ApiError> {
        let url = format!("{}/api/v1/{path}", self.config.base);
        let mut retried = false;
        loop {
            let req = self
                .agent
                .request(method, &url)
                .set("Authorization", &format!("Bearer {}", self.config.key))
                .set("Accept", "application/json");
            tracing::debug!(method, url, "vers api request");
            let res = match body {
                Some(b) => req.set("Content-Type", "application/json").send_string(b),
                None => req.call(),
            };
            match res {
                Ok(r) => {
                    return r
                        .into_string()
                        .map_err(|e| self.other(&format!("answer was cut short ({e})")))
                }
                Err(ureq::Error::Status(code, r)) => {
                    let message = r
                        .into_string()
                        .ok()
                        .and_then(|t| serde_json::from_str::<ErrorBody>(&t).ok())
                        .and_then(|b| b.error)
                        .unwrap_or_default();
                    tracing::debug!(code, message, "vers api answer");
                    match code {
                        401 | 403 => return Err(ApiError::Unauthorized),
                        404 => return Err(ApiError::NotFound),
                        409 => return Err(ApiError::NotRunning(message)),
                        429 | 500..=599 if !retried => {
                            retried = true;
                            std::thread::sleep(RETRY_PAUSE);
                        }
                        _ => {
                            let why = if message.is_empty() {
                                format!("failed (HTTP {code})")
                            } else {
                                format!("failed (HTTP {code}: {message})")
                            };
                            return Err(self.other(&why));
                        }
                    }
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(self.other(&format!("cannot be reached: {}", transport(&t))));
                }
            }
        }
    }
}

/// A transport failure in one line without the URL (the message names the base already):
/// "connection refused", "invalid peer certificate: UnknownIssuer (see --ca-file)".
fn transport(t: &ureq::Transport) -> String {
    let mut why = match t.message() {
        Some(m) => m.to_string(),
        None => t.kind().to_string(),
    };
    let mut cause = std::error::Error::source(t);
    while let Some(c) = cause {
        why = format!("{why}: {c}");
        cause = c.source();
    }
    if why.contains("certificate") {
        why.push_str(" (see --ca-file)");
    }
    why
}

/// Run a blocking API call off the async runtime's workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::Other {
            base: String::new(),
            what: format!("call failed: {e}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_keys() {
        let c = ApiConfig {
            base: DEFAULT_URL.into(),
            key: "sekrit-api-key".into(),
            key_source: "VERS_API_KEY",
            ca_files: Vec::new(),
        };
        assert!(!format!("{c:?}").contains("sekrit"));
        let k: SshKey =
            serde_json::from_str(r#"{"ssh_private_key": "-----BEGIN sekrit", "ssh_port": 22}"#)
                .unwrap();
        assert!(!format!("{k:?}").contains("sekrit"));
        assert_eq!(k.ssh_port, Some(22));
    }

    #[test]
    fn states_parse_and_unknown_ones_are_kept() {
        assert_eq!(VmState::parse("paused"), VmState::Paused);
        assert_eq!(VmState::parse("Running"), VmState::Running);
        assert_eq!(VmState::parse("sleeping").to_string(), "sleeping");
        assert_eq!(VmState::parse("odd"), VmState::Other("odd".into()));
    }

    #[test]
    fn the_wrong_key_message_is_in_user_terms() {
        assert_eq!(
            ApiError::Unauthorized.to_string(),
            "the Vers API refused the key (check VERS_API_KEY or ~/.versrc)"
        );
    }
}
