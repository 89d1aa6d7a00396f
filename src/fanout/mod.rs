//! Fan-out: one command, copy or sync on many VMs at once.
//!
//! A VM list is a comma list (`vm1,vm2`), glob patterns over the vers aliases (`'worker-*'`) or a
//! `--hosts` file; [`names`] turns those into the names as the user wrote them, each of which
//! then resolves like any single VM operand. [`run_all`] runs one future per VM with bounded
//! concurrency, and paces new connections so that sshd's MaxStartups (10 unauthenticated
//! connections before it starts dropping some) and the edge are not flooded; a VM that cannot be
//! reached holds up only its own slot.
//!
//! How results become one exit status ([`exit_status`]): 0 when every VM succeeded; 255 when any
//! could not be reached or lost its connection; otherwise 124 when any timed out; otherwise the
//! highest remote status, as `clush -S` and `pdsh -S` do.

pub mod exec;
pub mod output;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::Semaphore;

use crate::error::{EXIT_CONNECT, EXIT_TIMEOUT};
use crate::target::Host;

/// Default number of VMs worked on at once (`-f/--fanout`).
pub const DEFAULT_FANOUT: usize = 32;

/// Connections in their TCP/TLS/SSH handshake at once: below sshd's default MaxStartups (10).
pub const HANDSHAKES: usize = 8;

/// Largest `--hosts` file read: far more names than any fleet, small enough to never matter.
const MAX_HOSTS_FILE: u64 = 16 << 20;

/// Whether a VM operand names several VMs: a comma list or a glob pattern.
pub fn is_list(operand: &str) -> bool {
    operand.contains(',') || operand.contains(['*', '?', '['])
}

/// The VM names in an operand and/or a `--hosts` file, in order, each once. Glob patterns
/// (`*`, `?`, `[…]`) match the names `aliases` returns (the vers CLI's aliases); a pattern that
/// matches nothing is an error rather than silently no VM.
pub fn names(
    operand: Option<&str>,
    hosts_file: Option<&Path>,
    aliases: impl FnOnce() -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    let mut items: Vec<String> = Vec::new();
    if let Some(op) = operand {
        items.extend(
            op.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    if let Some(file) = hosts_file {
        items.extend(read_hosts(file)?);
    }
    // Read on the first pattern only: a plain list never touches the aliases file.
    let mut aliases = Some(aliases);
    let mut known: Vec<String> = Vec::new();
    let mut out: Vec<String> = Vec::new();
    for item in items {
        if item.contains(['*', '?', '[']) {
            if let Some(load) = aliases.take() {
                known = load().context("cannot read the vers aliases to match patterns")?;
            }
            let (user, pattern) = match item.rsplit_once('@') {
                Some((u, p)) => (Some(u), p),
                None => (None, item.as_str()),
            };
            let mut matched: Vec<&String> = known
                .iter()
                .filter(|a| glob(pattern.as_bytes(), a.as_bytes()))
                .collect();
            if matched.is_empty() {
                bail!("no vers alias matches {item:?} (see ~/.vers/aliases.json)");
            }
            matched.sort();
            for m in matched {
                let name = match user {
                    Some(u) => format!("{u}@{m}"),
                    None => m.clone(),
                };
                if !out.contains(&name) {
                    out.push(name);
                }
            }
        } else if !out.contains(&item) {
            out.push(item);
        }
    }
    if out.is_empty() {
        bail!("no VMs to run on (the list is empty)");
    }
    Ok(out)
}

/// One name per line; blank lines and `#` comments skipped; `-` reads stdin.
pub fn read_hosts(file: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let mut text = String::new();
    let what = file.display();
    if file == Path::new("-") {
        std::io::stdin()
            .take(MAX_HOSTS_FILE)
            .read_to_string(&mut text)
            .context("cannot read the VM list from stdin")?;
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot read hosts file {what}"))?
            .take(MAX_HOSTS_FILE)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read hosts file {what}"))?;
    }
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Shell-style glob over a whole name: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') => (0..=s.len()).any(|i| glob(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && glob(&p[1..], &s[1..]),
        Some(b'[') => {
            let Some((&c, rest)) = s.split_first() else {
                return false;
            };
            let Some(end) = p.iter().skip(2).position(|&b| b == b']').map(|i| i + 2) else {
                return c == b'[' && glob(&p[1..], rest);
            };
            let class = &p[1..end];
            let (negate, class) = match class.first() {
                Some(b'!') | Some(b'^') => (true, &class[1..]),
                _ => (false, class),
            };
            let mut hit = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    hit |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    hit |= class[i] == c;
                    i += 1;
                }
            }
            hit != negate && glob(&p[end + 1..], rest)
        }
        Some(&b) => s.first() == Some(&b) && glob(&p[1..], &s[1..]),
    }
}

/// One VM of a fan-out.
#[derive(Debug, Clone)]
pub struct Target {
    /// The name as the user wrote it: the output prefix, the summary's and `--failed`'s name,
    /// and the directory a pull writes into.
    pub label: String,
    pub host: Host,
}

/// How one VM's part ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// The remote command (or the copy) failed with this status.
    Failed(u8),
    /// Could not connect or authenticate.
    Unreachable(String),
    /// The connection was lost before the command finished.
    Lost(String),
    /// Stopped by `--timeout`.
    TimedOut,
}

impl Outcome {
    /// The outcome of a VM whose run returned `r` (connected already).
    pub fn of(r: &Result<u8>) -> Outcome {
        match r {
            Ok(0) => Outcome::Ok,
            Ok(c) => Outcome::Failed(*c),
            Err(e) => match crate::error::code_for(e) {
                EXIT_TIMEOUT if is_timeout(e) => Outcome::TimedOut,
                EXIT_CONNECT => Outcome::Lost(format!("{e:#}")),
                c => Outcome::Failed(c),
            },
        }
    }

    /// The status this VM would have exited with alone.
    pub fn code(&self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Failed(c) => *c,
            Outcome::Unreachable(_) | Outcome::Lost(_) => EXIT_CONNECT,
            Outcome::TimedOut => EXIT_TIMEOUT,
        }
    }

    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Unreachable(e) | Outcome::Lost(e) => Some(e),
            Outcome::TimedOut => Some("timed out"),
            _ => None,
        }
    }
}

fn is_timeout(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<crate::error::Failure>(),
            Some(crate::error::Failure::TimedOut)
        )
    })
}

/// What one VM did.
#[derive(Debug, Clone)]
pub struct VmResult {
    pub label: String,
    pub outcome: Outcome,
    pub seconds: f64,
    /// Output kept for `--gather`/`--json` (empty when it was streamed).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run `work` for each target, at most `fanout` at once, each task on the runtime's workers.
/// Results come back in the targets' order. `work` gets the target and the [`Pacer`] to hold
/// while it connects.
pub async fn run_all<F, Fut>(targets: Vec<Target>, fanout: usize, work: F) -> Vec<VmResult>
where
    F: Fn(Target, Pacer) -> Fut,
    Fut: Future<Output = VmResult> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(fanout.max(1)));
    let pacer = Pacer(Arc::new(Semaphore::new(HANDSHAKES)));
    let mut tasks = Vec::with_capacity(targets.len());
    for t in targets {
        let label = t.label.clone();
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let fut = work(t, pacer.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let r = fut.await;
            drop(slot);
            r
        });
        tasks.push((label, started, task));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for (label, started, task) in tasks {
        out.push(match task.await {
            Ok(r) => r,
            // A panic in one VM's task is that VM's failure, not the run's.
            Err(e) => VmResult {
                label,
                outcome: Outcome::Failed(1),
                seconds: started.elapsed().as_secs_f64(),
                stdout: Vec::new(),
                stderr: format!("vtun: internal error: {e}\n").into_bytes(),
            },
        });
    }
    out
}

/// Bounds the connections in their handshake at once, across all VMs of a run.
#[derive(Clone)]
pub struct Pacer(Arc<Semaphore>);

impl Pacer {
    /// Run `connect` while holding a handshake slot.
    pub async fn connect<T>(&self, connect: impl Future<Output = T>) -> T {
        let _slot = self.0.acquire().await;
        connect.await
    }
}

/// The one exit status for a fan-out (see the module docs).
pub fn exit_status(results: &[VmResult]) -> u8 {
    let any = |f: fn(&Outcome) -> bool| results.iter().any(|r| f(&r.outcome));
    if any(|o| matches!(o, Outcome::Unreachable(_) | Outcome::Lost(_))) {
        EXIT_CONNECT
    } else if any(|o| matches!(o, Outcome::TimedOut)) {
        EXIT_TIMEOUT
    } else {
        results.iter().map(|r| r.outcome.code()).max().unwrap_or(0)
    }
}

/// The closing stderr line: counts, and the names of every VM that did not succeed.
pub fn summary(results: &[VmResult], seconds: f64) -> String {
    let pick = |f: fn(&Outcome) -> bool| -> Vec<&str> {
        results
            .iter()
            .filter(|r| f(&r.outcome))
            .map(|r| r.label.as_str())
            .collect()
    };
    let ok = pick(|o| matches!(o, Outcome::Ok));
    let mut line = format!(
        "vtun: {} VMs in {seconds:.1} s: {} ok",
        results.len(),
        ok.len()
    );
    if !ok.is_empty() {
        line.push_str(&format!(" ({})", ok.join(" ")));
    }
    for (what, names) in [
        ("failed", pick(|o| matches!(o, Outcome::Failed(_)))),
        (
            "unreachable",
            pick(|o| matches!(o, Outcome::Unreachable(_) | Outcome::Lost(_))),
        ),
        ("timed out", pick(|o| matches!(o, Outcome::TimedOut))),
    ] {
        if !names.is_empty() {
            line.push_str(&format!(", {} {what} ({})", names.len(), names.join(" ")));
        }
    }
    line
}

/// Write the names of the VMs that did not succeed, one per line (empty when all did), for a
/// rerun with `--hosts FILE`. Written beside and renamed into place, so a rerun reading the
/// same file never sees half of it.
pub fn write_failed(file: &Path, results: &[VmResult]) -> Result<()> {
    let mut text = String::new();
    for r in results.iter().filter(|r| r.outcome != Outcome::Ok) {
        text.push_str(&r.label);
        text.push('\n');
    }
    let tmp = file.with_file_name(format!(
        ".{}.vtun-tmp",
        file.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, file))
        .with_context(|| format!("cannot write {}", file.display()))
}

/// Raise the soft open-file limit to the hard one: each VM holds a socket, and a fan-out to
/// hundreds of VMs passes the common default of 1024 descriptors.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("cannot raise the open-file limit");
            }
        }
    }
}

/// A per-VM time limit as a deadline from now.
pub fn deadline(timeout: Option<Duration>) -> Option<tokio::time::Instant> {
    timeout.map(|t| tokio::time::Instant::now() + t)
}

// Tests only: unwrap on values the test itself built.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(label: &str, outcome: Outcome) -> VmResult {
        VmResult {
            label: label.into(),
            outcome,
            seconds: 0.0,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    #[test]
    fn lists_globs_and_files_expand_in_order_once() {
        let aliases = || Ok(vec!["worker-2".into(), "worker-1".into(), "db".into()]);
        let got = names(Some("db,worker-*,db"), None, aliases).unwrap();
        assert_eq!(got, ["db", "worker-1", "worker-2"]);
        let got = names(Some("me@worker-[12]"), None, aliases).unwrap();
        assert_eq!(got, ["me@worker-1", "me@worker-2"]);
        let err = names(Some("web-*"), None, aliases).unwrap_err();
        assert!(
            err.to_string().contains("no vers alias matches \"web-*\""),
            "{err}"
        );
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("hosts");
        std::fs::write(&f, "# fleet\nvm1\n\n  vm2  # the second\nvm1\n").unwrap();
        let got = names(None, Some(&f), || unreachable!("no pattern")).unwrap();
        assert_eq!(got, ["vm1", "vm2"]);
        std::fs::write(&f, "# nothing\n").unwrap();
        assert!(names(None, Some(&f), aliases).is_err());
    }

    #[test]
    fn glob_classes_and_stars() {
        assert!(glob(b"w-[a-c]?", b"w-b1"));
        assert!(!glob(b"w-[!a-c]*", b"w-b1"));
        assert!(glob(b"*", b""));
        assert!(!glob(b"a*b", b"ab-"));
    }

    #[test]
    fn exit_status_ranks_connection_then_timeout_then_highest_status() {
        let ok = || r("a", Outcome::Ok);
        assert_eq!(exit_status(&[ok(), ok()]), 0);
        assert_eq!(
            exit_status(&[ok(), r("b", Outcome::Failed(3)), r("c", Outcome::Failed(2))]),
            3
        );
        assert_eq!(
            exit_status(&[r("b", Outcome::Failed(3)), r("t", Outcome::TimedOut)]),
            124
        );
        assert_eq!(
            exit_status(&[
                r("t", Outcome::TimedOut),
                r("u", Outcome::Unreachable("x".into()))
            ]),
            255
        );
        let s = summary(
            &[
                ok(),
                r("b", Outcome::Failed(3)),
                r("u", Outcome::Lost("x".into())),
            ],
            1.0,
        );
        assert_eq!(
            s,
            "vtun: 3 VMs in 1.0 s: 1 ok (a), 1 failed (b), 1 unreachable (u)"
        );
    }
}
