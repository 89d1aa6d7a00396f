//! `vtun proxy` with a Vers API key: a VM that is not running is looked up, and resumed, without
//! the ssh client noticing more than a delay.
//!
//! The edge accepts TLS for a paused VM and then closes the stream before the VM says anything.
//! By then the ssh client has already written its first bytes to us, so until the server's first
//! byte arrives those bytes are kept. If the stream closes before that byte and the API says the
//! VM was paused, sleeping or booting — nothing behind the edge can have acted on them — the VM
//! is resumed, the stream is dialled again with the usual boot wait, and the kept bytes are sent
//! again. Otherwise (a running VM, an unknown state) nothing is replayed: the proxy ends as it
//! does without an API key. From the server's first byte on, this is the plain relay.

use std::cell::RefCell;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{ready, Poll};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncBufRead, AsyncWrite};

use super::stdio::{self, Stdin};
use super::{dial, pump, send, Tls};
use crate::settings::Settings;
use crate::target::Host;
use crate::tls::Dialer;
use crate::vers::{Verdict, VmApi};

/// The most client bytes kept for a replay (an SSH client sends a few KiB before the server's
/// banner); past this, nothing is replayed.
const KEEP_MAX: usize = 1 << 20;
const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(1);

pub async fn relay(
    settings: &Settings,
    dialer: &Dialer,
    host: &Host,
    port: u16,
    api: &VmApi,
) -> Result<u8> {
    let name = host.name.as_str();
    let (mut stdin, stdout) = stdio::open();
    let mut kept: Option<Vec<u8>> = Some(Vec::new());
    let mut stdin_done = false;
    // Set once the API said the VM was not running: from then on, retry and replay.
    let mut waiting_since: Option<Instant> = None;
    let mut delay = FIRST_DELAY;
    let mut announced = false;
    loop {
        let failure = match dial(dialer, name, port).await {
            Ok(tls) => {
                let tls = RefCell::new(tls);
                let replay = kept.as_deref().unwrap_or_default();
                let replayed = replay.is_empty() || send(&tls, replay).await.is_ok();
                if replayed && until_first_byte(&tls, &mut stdin, &mut kept, &mut stdin_done).await
                {
                    tracing::debug!(name, port, "connected");
                    return pump(&tls, stdin, stdout, name, port).await;
                }
                // Closed before the server said anything: the way a VM that is not running ends.
                None
            }
            Err(e) if e.is_transient() => Some(e),
            Err(e) => return Err(e.into()),
        };
        let since = match waiting_since {
            // The client's bytes could not all be kept: a new stream cannot be made whole.
            Some(_) if kept.is_none() => {
                return Err(crate::error::Failure::connection(format!(
                    "{name}:{port}: connection closed before the server spoke"
                )))
            }
            Some(t) => t,
            None => match api.ensure_running().await? {
                Verdict::Resumed | Verdict::Booting if kept.is_some() => {
                    *waiting_since.insert(Instant::now())
                }
                // A running VM (or one the API could not tell about) that closed on us: the
                // kept bytes may have been read, so nothing is replayed: end as without the API.
                _ => {
                    return match failure {
                        Some(e) => Err(e.into()),
                        None => {
                            stdout.finish().await;
                            Ok(0)
                        }
                    }
                }
            },
        };
        let waited = since.elapsed();
        if waited >= settings.wait {
            let why = match failure {
                Some(e) => e.to_string(),
                None => format!("{name}:{port}: connection closed before the server spoke"),
            };
            return Err(crate::error::Failure::connection(format!(
                "gave up after waiting {:.0}s for {name} (see --wait): {why}",
                waited.as_secs_f64()
            )));
        }
        if !announced && !settings.quiet {
            eprintln!("vtun: waiting for {name} to accept connections…");
            announced = true;
        }
        tokio::time::sleep(delay.min(settings.wait - waited)).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}

/// Relay stdin to the server, keeping a copy, until the server's first byte is readable (true)
/// or the stream ends first (false).
async fn until_first_byte(
    tls: &RefCell<Tls>,
    stdin: &mut Stdin,
    kept: &mut Option<Vec<u8>>,
    stdin_done: &mut bool,
) -> bool {
    let mut buf = vec![0u8; stdio::READ_BUF];
    loop {
        tokio::select! {
            biased;
            spoke = readable(tls) => return spoke,
            n = stdin.read(&mut buf), if !*stdin_done => {
                let n = match n {
                    Ok(0) | Err(_) => {
                        // Half-close as the plain relay does; a replay then cannot repeat it.
                        *stdin_done = true;
                        *kept = None;
                        let _ = poll_fn(|cx| Pin::new(&mut *tls.borrow_mut()).poll_shutdown(cx))
                            .await;
                        continue;
                    }
                    Ok(n) => n,
                };
                if let Some(k) = kept.as_mut() {
                    k.extend_from_slice(&buf[..n]);
                    if k.len() > KEEP_MAX {
                        *kept = None;
                    }
                }
                if send(tls, &buf[..n]).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// Resolves when the server has sent a byte (true) or ended the stream or failed (false); the
/// byte stays buffered for the relay.
async fn readable(tls: &RefCell<Tls>) -> bool {
    poll_fn(|cx| {
        let mut tls = tls.borrow_mut();
        let r = ready!(Pin::new(&mut *tls).poll_fill_buf(cx));
        Poll::Ready(matches!(r, Ok(data) if !data.is_empty()))
    })
    .await
}
