//! The boot race: a VM that was just started or resumed refuses or resets connections (or the
//! edge closes them before sshd says hello) for a few seconds. Those failures are retried with
//! backoff for `--wait`; authentication, host-key and certificate failures never are.
//!
//! With the Vers API at hand, the first such failure also asks for the VM's state: an unknown
//! VM then fails at once instead of after `--wait`, and a paused one is resumed (and the wait
//! starts afresh from the resume).

use std::future::Future;
use std::time::{Duration, Instant};

use crate::settings::Settings;
use crate::target::Host;
use crate::vers::{Verdict, VmApi};

/// The outcome of one connection attempt.
pub enum Attempt<T> {
    Done(T),
    /// The error, and whether the VM may simply not be up yet.
    Failed(anyhow::Error, bool),
    /// No SSH banner within the connect timeout: not retried (it already took that long), but
    /// the way a VM that is not running may fail, so worth asking the Vers API about.
    Stalled(anyhow::Error),
}

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Run `attempt` until it succeeds, fails for good, or `settings.wait` has passed.
pub async fn with_boot_wait<T, F, Fut>(
    settings: &Settings,
    host: &Host,
    api: Option<&VmApi>,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let mut start = Instant::now();
    let mut delay = FIRST_DELAY;
    let mut announced = false;
    loop {
        let (err, mut transient, ask) = match attempt().await {
            Attempt::Done(v) => return Ok(v),
            Attempt::Failed(e, t) => (e, t, t),
            Attempt::Stalled(e) => (e, false, true),
        };
        if let (true, Some(api)) = (ask, api) {
            tracing::debug!("asking the Vers API about the VM after: {err:#}");
            if api.ensure_running().await? == Verdict::Resumed {
                start = Instant::now();
                delay = FIRST_DELAY;
                transient = true;
            }
        }
        let waited = start.elapsed();
        if !transient || waited >= settings.wait {
            if transient && !settings.wait.is_zero() {
                return Err(err.context(format!(
                    "gave up after waiting {:.0}s for {} (see --wait)",
                    waited.as_secs_f64(),
                    host.name
                )));
            }
            return Err(err);
        }
        if !announced && !settings.quiet {
            eprintln!("vtun: waiting for {} to accept connections…", host.name);
            announced = true;
        }
        tracing::debug!("retrying in {delay:?}: {err:#}");
        tokio::time::sleep(delay.min(settings.wait - waited)).await;
        delay = (delay * 2).min(MAX_DELAY);
    }
}
