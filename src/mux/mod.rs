//! Connection reuse: a background master per connection identity holds the authenticated SSH
//! connection to a VM, and later commands open their channels through it over a Unix socket,
//! so a command to a VM that was used in the last `--persist` seconds skips TCP, TLS, key
//! exchange and authentication.
//!
//! [`MuxConnector`] is the one place connecting commands get their [`Link`] from: the master's
//! when one answers (starting it first if there is none), a direct SSH session otherwise. The
//! rule that shapes it: a master never breaks a command. A missing, stale or hung master costs
//! at most [`PROBE`] (plus [`START`] when starting one fails) and a debug line, then the command
//! connects directly; only a master that dies while a command is using it fails that command,
//! as the lost connection it is (255).
//!
//! Memory: a master is one `vtun` process per held connection: 12 MiB resident while idle, of
//! which about 1.5 MiB is its own (the rest is the binary, shared); see BENCHMARKS.md.

pub mod client;
pub mod master;
mod memo;
pub mod proto;
pub mod socket;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use tokio::net::UnixStream;

use crate::link::{Connector, Link};
use crate::settings::Settings;
use crate::ssh::SshConnector;
use crate::target::Host;
use client::MasterLink;
use proto::{Info, Reply, Request};

/// How long a master has to accept and answer a hello before it counts as hung.
pub const PROBE: Duration = Duration::from_secs(2);
/// How long a freshly started master has to start answering.
pub const START: Duration = Duration::from_secs(5);

/// Links through masters when `settings.persist` is non-zero, direct SSH sessions otherwise
/// (and whenever a master cannot be used).
pub struct MuxConnector {
    settings: Settings,
    direct: SshConnector,
    links: Mutex<HashMap<LinkKey, Arc<dyn Link>>>,
    /// Use masters that are up, never start one (fan-out: a run over 50 VMs must not leave 50
    /// masters behind).
    reuse_only: bool,
}

/// Which links are the same: user, VM, port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LinkKey(String, String, u16);

impl MuxConnector {
    pub fn new(settings: Settings) -> MuxConnector {
        MuxConnector {
            direct: SshConnector::new(settings.clone()),
            settings,
            links: Mutex::new(HashMap::new()),
            reuse_only: false,
        }
    }

    /// Like [`MuxConnector::new`], but a VM without a master up is connected directly and no
    /// master is started for it.
    pub fn reuse_only(settings: Settings) -> MuxConnector {
        MuxConnector {
            reuse_only: true,
            ..MuxConnector::new(settings)
        }
    }

    async fn link(&self, host: &Host) -> Result<Arc<dyn Link>> {
        let key = LinkKey(
            self.settings.user_for(host),
            host.name.clone(),
            self.settings.port_for(host),
        );
        if let Some(l) = self
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(l.clone());
        }
        let link: Arc<dyn Link> = match self.through_master(host).await? {
            Some(m) => Arc::new(m),
            None => self.direct.connect(host).await?,
        };
        self.links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, link.clone());
        Ok(link)
    }

    /// The master's link for `host`, starting the master if there is none; `None` when the
    /// command should connect directly; an error when the master could not connect (the
    /// error a direct connection would have given, without paying for it twice).
    async fn through_master(&self, host: &Host) -> Result<Option<MasterLink>> {
        if self.settings.persist.is_zero() || !can_start_masters() {
            return Ok(None);
        }
        let dir = match socket::dir() {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!("no connection master: {e:#}");
                return Ok(None);
            }
        };
        let path = socket::path(&dir, &self.settings, host);
        let link = MasterLink {
            path: path.clone(),
            name: host.name.clone(),
            open_timeout: self.settings.tls.connect_timeout
                + self.settings.wait
                + Duration::from_secs(10),
        };
        let must_start = match probe(&path).await {
            Probe::Up(info) if info.connections > 0 => {
                memo::answered(&path);
                return Ok(Some(link));
            }
            Probe::Up(_) => false,
            Probe::Absent | Probe::Stale if self.reuse_only => return Ok(None),
            Probe::Absent => true,
            Probe::Stale => {
                tracing::debug!("removing the stale master socket {}", path.display());
                let _ = std::fs::remove_file(&path);
                true
            }
            Probe::Hung(pid) => {
                let replace = match pid {
                    Some(pid) if !self.reuse_only => {
                        memo::strike(&path, pid) == memo::Hung::Replace
                    }
                    _ => false,
                };
                if !replace || !memo::kill_hung(&path, pid.unwrap_or(0)).await {
                    tracing::debug!(
                        "master at {} does not answer (pid {pid:?}); connecting directly",
                        path.display()
                    );
                    return Ok(None);
                }
                tracing::debug!(
                    "replaced the master at {} (pid {pid:?}), silent for {}s or more",
                    path.display(),
                    memo::HUNG_GRACE.as_secs()
                );
                true
            }
            Probe::Unusable(why) => {
                tracing::debug!(
                    "master at {} unusable ({why}); connecting directly",
                    path.display()
                );
                return Ok(None);
            }
        };
        // Where the master's notices for this command start in its log: taken before a new
        // master is started, which may print its first "waiting" line at once.
        let log = master::socket_log(&path);
        let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if must_start {
            if memo::auth_would_fail(&path).await {
                tracing::debug!(
                    "a master for {} could not authenticate less than {}s ago; connecting directly",
                    host.name,
                    memo::NOAUTH_FOR.as_secs()
                );
                return Ok(None);
            }
            if let Err(e) = start(&self.settings, host, &path).await {
                tracing::debug!("no connection master ({e:#}); connecting directly");
                return Ok(None);
            }
        }
        // The master is connecting (we just started it, or another command did). What it says
        // meanwhile (waiting for a booting VM, resuming a paused one) goes to its log; this
        // command shows those lines, as a direct connection would have printed them.
        let ask = async {
            match client::connect(&path).await {
                Ok(s) => client::ask_reply(s, Request::Ready, link.open_timeout).await,
                Err(e) => Err(e),
            }
        };
        let ready = if self.settings.quiet {
            ask.await
        } else {
            let echo = echo_notices(&log, from);
            tokio::pin!(echo);
            tokio::select! {
                r = ask => r,
                () = &mut echo => unreachable!("echo_notices never ends"),
            }
        };
        match ready {
            Ok(Reply::Info(_)) => Ok(Some(link)),
            Ok(Reply::Failed(f)) if f.auth => {
                // A master has no terminal: an encrypted key's passphrase is asked for here.
                memo::auth_failed(&path).await;
                tracing::debug!(
                    "the master could not authenticate ({}); connecting directly",
                    f.message
                );
                Ok(None)
            }
            Ok(Reply::Failed(f)) => Err(client::error_of(f)),
            Ok(Reply::Opened) | Err(_) => {
                tracing::debug!("the master did not get ready; connecting directly");
                Ok(None)
            }
        }
    }
}

impl Connector for MuxConnector {
    fn connect<'a>(&'a self, host: &'a Host) -> BoxFuture<'a, Result<Arc<dyn Link>>> {
        Box::pin(self.link(host))
    }
}

/// Print the `vtun: ` lines a master appends to its log after byte `from`, as they come (every
/// 100 ms), until dropped. Only whole lines, and only notices meant for the user.
async fn echo_notices(log: &Path, mut from: u64) {
    use std::io::{Read, Seek, SeekFrom};
    let mut partial: Vec<u8> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut f) = std::fs::File::open(log) else {
            continue;
        };
        let mut buf = Vec::new();
        // A log is small; bound a read anyway so a runaway one costs nothing here.
        if f.seek(SeekFrom::Start(from)).is_err() || f.take(1 << 20).read_to_end(&mut buf).is_err()
        {
            continue;
        }
        from += buf.len() as u64;
        partial.extend_from_slice(&buf);
        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=i).collect();
            if line.starts_with(b"vtun: ") {
                eprint!("{}", String::from_utf8_lossy(&line));
            }
        }
    }
}

/// Masters re-execute this binary: only `vtun` itself starts them (never a test harness or a
/// program that links the library).
fn can_start_masters() -> bool {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n == "vtun"))
        .unwrap_or(false)
}

/// What is at a socket path.
pub enum Probe {
    Up(Info),
    /// No socket.
    Absent,
    /// A socket nobody listens on (the master died).
    Stale,
    /// Our own user's master (this pid, when known) accepted but did not answer in time.
    Hung(Option<u32>),
    /// Something that does not answer as a master of ours should.
    Unusable(String),
}

/// Look at `path` within [`PROBE`].
pub async fn probe(path: &Path) -> Probe {
    probe_with(path, Request::Hello, PROBE).await
}

/// Connect and ask, all within `limit`.
async fn probe_with(path: &Path, req: Request, limit: Duration) -> Probe {
    let deadline = tokio::time::Instant::now() + limit;
    let connect = tokio::time::timeout_at(deadline, UnixStream::connect(path));
    let stream = match connect.await {
        Err(_) => return Probe::Hung(None),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Probe::Absent,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Probe::Stale,
        Ok(Err(e)) => return Probe::Unusable(e.to_string()),
        Ok(Ok(s)) => s,
    };
    let pid = match stream.peer_cred() {
        Ok(c) if c.uid() == socket::euid() => c.pid().and_then(|p| u32::try_from(p).ok()),
        Ok(c) => return Probe::Unusable(format!("served by uid {}", c.uid())),
        Err(e) => return Probe::Unusable(format!("cannot read the peer's credentials: {e}")),
    };
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    // The outer bound is the one that fires: silence is `Hung`, anything else `Unusable`.
    let ask = client::ask(stream, req, left + Duration::from_secs(1));
    match tokio::time::timeout(left, ask).await {
        Ok(Ok(info)) => Probe::Up(info),
        Ok(Err(e)) => Probe::Unusable(format!("{e:#}")),
        Err(_) => Probe::Hung(pid),
    }
}

/// Start a master for `host` on `path` and wait until it answers.
async fn start(settings: &Settings, host: &Host, path: &Path) -> Result<()> {
    let mut child = spawn(settings, host, path)?;
    let deadline = Instant::now() + START;
    let mut pause = Duration::from_millis(2);
    loop {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
        if let Probe::Up(_) = probe(path).await {
            break;
        }
        // Exit 0: another master won the race for this identity; keep waiting for it.
        if let Ok(Some(st)) = child.try_wait() {
            if !st.success() {
                anyhow::bail!(
                    "the master exited with {st}; see {}",
                    master::socket_log(path).display()
                );
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("the master did not answer within {}s", START.as_secs());
        }
    }
    // Reap it if it ends while this command still runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// `vtun master serve` for `host`, detached: own session, stdio on /dev/null, stderr to the
/// log beside the socket.
fn spawn(settings: &Settings, host: &Host, path: &Path) -> Result<std::process::Child> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find this program to start a master")?;
    let log_path = master::socket_log(path);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(serve_args(settings, host, path))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().context("cannot start a connection master")
}

/// The command line that makes a master with exactly these settings.
pub fn serve_args(settings: &Settings, host: &Host, path: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |k: &str, v: &std::ffi::OsStr| {
        a.push(k.into());
        a.push(v.to_owned());
    };
    push("--port", settings.port.to_string().as_ref());
    if let Some(c) = &settings.tls.connect {
        push("--connect", c.as_ref());
    }
    for ca in &settings.tls.ca_files {
        push("--ca-file", ca.as_os_str());
    }
    push("--known-hosts", settings.known_hosts.as_os_str());
    let check = match settings.host_key_check {
        crate::ssh::HostKeyCheck::AcceptNew => "accept-new",
        crate::ssh::HostKeyCheck::Yes => "yes",
        crate::ssh::HostKeyCheck::No => "no",
    };
    push("--host-key-check", check.as_ref());
    let secs = |d: Duration| d.as_secs_f64().to_string();
    push(
        "--connect-timeout",
        secs(settings.tls.connect_timeout).as_ref(),
    );
    push("--wait", secs(settings.wait).as_ref());
    push("--persist", secs(settings.persist).as_ref());
    push("--user", settings.user.as_ref());
    if settings.tls.insecure {
        a.push("--insecure".into());
    }
    a.extend(["master".into(), "serve".into(), "--socket".into()]);
    a.push(path.as_os_str().to_owned());
    for id in &settings.identities {
        a.push("--identity".into());
        a.push(id.as_os_str().to_owned());
    }
    a.push("--".into());
    a.push(
        format!(
            "{}@{}:{}",
            settings.user_for(host),
            host.name,
            settings.port_for(host)
        )
        .into(),
    );
    a
}

/// Every master of this user that answers: (socket, what it says). Stale sockets are removed.
pub async fn list() -> Vec<(PathBuf, Info)> {
    let Some(dir) = socket::existing_dir() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    paths.sort();
    let mut found = Vec::new();
    for p in paths {
        // Not on a command's path: a busy master gets more time to answer.
        match probe_with(&p, Request::Info, START).await {
            Probe::Up(info) => found.push((p, info)),
            Probe::Stale => {
                let _ = std::fs::remove_file(&p);
            }
            Probe::Absent => {}
            Probe::Hung(pid) => tracing::debug!("{}: pid {pid:?} does not answer", p.display()),
            Probe::Unusable(why) => tracing::debug!("{}: {why}", p.display()),
        }
    }
    found
}

/// Ask the master on `path` to exit, and wait (bounded) until its socket is gone.
pub async fn stop(path: &Path) -> Result<Info> {
    let stream = client::connect(path).await?;
    let info = client::ask(stream, Request::Stop, PROBE).await?;
    let deadline = Instant::now() + START;
    while path.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(info)
}
