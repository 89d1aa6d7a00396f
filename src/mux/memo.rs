//! What commands remember about a master between runs, in small files beside its socket, so
//! a master that cannot help is not paid for on every command:
//!
//! - `.hung`: the first time (pid, when) a master stopped answering. A master that still does
//!   not answer [`HUNG_GRACE`] later is killed and replaced: two commands [`super::PROBE`]
//!   apart found it silent, which no busy master is.
//! - `.noauth`: a master could not authenticate (an encrypted key with no agent: a master has
//!   no terminal to ask on). Until [`NOAUTH_FOR`] has passed or the agent changes, commands
//!   connect directly without starting another master that would fail the same way.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a master must have been silent, across two probes, before it is replaced.
pub const HUNG_GRACE: Duration = Duration::from_secs(5);
/// A first strike older than this is forgotten (the master answered in between, or nobody
/// asked).
const HUNG_WINDOW: Duration = Duration::from_secs(120);
/// How long a failed authentication keeps commands from starting masters.
pub const NOAUTH_FOR: Duration = Duration::from_secs(600);

fn beside(sock: &Path, ext: &str) -> PathBuf {
    sock.with_extension(ext)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Write `text` to `path`, private to the user (the directory is already 0700).
fn write(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path);
    if let Ok(mut f) = f {
        let _ = f.write_all(text.as_bytes());
    }
}

/// A small file's text, `None` when missing or not UTF-8 (anything bigger than a line is not
/// ours).
fn read(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(256)
        .read_to_string(&mut s)
        .ok()?;
    Some(s)
}

/// What to do about a master (`pid`) that did not answer a probe.
#[derive(Debug, PartialEq, Eq)]
pub enum Hung {
    /// First strike (recorded): connect directly this time.
    Wait,
    /// Silent for at least [`HUNG_GRACE`]: replace it.
    Replace,
}

/// Record that `pid` on `sock` did not answer, and say whether it is time to replace it.
pub fn strike(sock: &Path, pid: u32) -> Hung {
    let path = beside(sock, "hung");
    let t = now();
    let first = read(&path).and_then(|s| {
        let (p, at) = s.trim().split_once(' ')?;
        let (p, at) = (p.parse::<u32>().ok()?, at.parse::<u64>().ok()?);
        (p == pid && at <= t && t - at <= HUNG_WINDOW.as_secs()).then_some(at)
    });
    match first {
        Some(at) if t - at >= HUNG_GRACE.as_secs() => Hung::Replace,
        Some(_) => Hung::Wait,
        None => {
            write(&path, &format!("{pid} {t}\n"));
            Hung::Wait
        }
    }
}

/// The master on `sock` answered (or is gone): forget its strikes.
pub fn answered(sock: &Path) {
    let _ = std::fs::remove_file(beside(sock, "hung"));
}

/// Kill the hung master `pid` serving `sock`, if it still is one of ours for that socket, and
/// wait (bounded) until it is gone, so its lock is free for a new master.
pub async fn kill_hung(sock: &Path, pid: u32) -> bool {
    // A pid is only trusted while its command line names this socket: pids are reused.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = cmdline
        .split(|&b| b == 0)
        .any(|arg| arg == sock.as_os_str().as_encoded_bytes());
    if !ours || pid == std::process::id() {
        return false;
    }
    // SAFETY: kill(2) on a process of this user that serves our socket.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
        && !zombie(pid)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_file(sock);
    answered(sock);
    true
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The agent as a master would see it: its socket and how many keys it holds.
async fn agent_state() -> String {
    let sock = std::env::var("SSH_AUTH_SOCK").unwrap_or_default();
    let keys = crate::ssh::agent_keys().await;
    format!("{sock}\t{keys}")
}

/// A master for `sock` could not authenticate: remember it, with the agent as it is now.
pub async fn auth_failed(sock: &Path) {
    write(
        &beside(sock, "noauth"),
        &format!("{}\n{}\n", now(), agent_state().await),
    );
}

/// Whether a recent master for `sock` failed to authenticate with the agent as it is now: a new
/// one would fail the same way.
pub async fn auth_would_fail(sock: &Path) -> bool {
    let path = beside(sock, "noauth");
    let Some(text) = read(&path) else {
        return false;
    };
    let Some((at, agent)) = text.split_once('\n') else {
        return false;
    };
    let fresh = at
        .parse::<u64>()
        .is_ok_and(|at| at <= now() && now() - at < NOAUTH_FOR.as_secs());
    if fresh && agent.trim_end_matches('\n') == agent_state().await {
        return true;
    }
    let _ = std::fs::remove_file(&path);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_is_replaced_only_after_the_grace_and_only_the_same_pid() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        assert_eq!(strike(&sock, 42), Hung::Wait);
        assert_eq!(strike(&sock, 42), Hung::Wait, "too soon");
        // An older first strike, as if written HUNG_GRACE ago.
        let at = now() - HUNG_GRACE.as_secs();
        write(&sock.with_extension("hung"), &format!("42 {at}\n"));
        assert_eq!(strike(&sock, 43), Hung::Wait, "another pid starts over");
        write(&sock.with_extension("hung"), &format!("42 {at}\n"));
        assert_eq!(strike(&sock, 42), Hung::Replace);
        // Too old: forgotten, a new first strike.
        let old = now() - HUNG_WINDOW.as_secs() - 1;
        write(&sock.with_extension("hung"), &format!("42 {old}\n"));
        assert_eq!(strike(&sock, 42), Hung::Wait);
        answered(&sock);
        assert!(!sock.with_extension("hung").exists());
        // Garbage in the file is a first strike, not a panic.
        write(
            &sock.with_extension("hung"),
            "\u{0}zz 99999999999999999999999\n",
        );
        assert_eq!(strike(&sock, 42), Hung::Wait);
    }

    #[test]
    fn kill_hung_never_kills_a_process_that_does_not_serve_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(!rt.block_on(kill_hung(&sock, child.id())));
        assert!(child.try_wait().unwrap().is_none(), "still running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[tokio::test]
    async fn a_failed_authentication_is_remembered_until_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("m.sock");
        assert!(!auth_would_fail(&sock).await);
        auth_failed(&sock).await;
        assert!(auth_would_fail(&sock).await);
        let stale = now() - NOAUTH_FOR.as_secs();
        let text = read(&sock.with_extension("noauth")).unwrap();
        let (_, agent) = text.split_once('\n').unwrap();
        write(&sock.with_extension("noauth"), &format!("{stale}\n{agent}"));
        assert!(!auth_would_fail(&sock).await, "expired");
        assert!(!sock.with_extension("noauth").exists());
    }
}
