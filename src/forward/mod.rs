//! Port forwarding over a VM's link: `-L` (listen here, connect from the VM), `-R` (listen on the
//! VM, connect from here) and `-D` (a SOCKS5 proxy here whose connections start on the VM), to TCP
//! ports or Unix sockets on either side, as OpenSSH offers them.
//!
//! The non-obvious part is surviving a lost connection. Local listeners never close; forwarded
//! connections that were open die with the link (their streams fail), and the next connection
//! accepted, or a timer when there are `-R` forwards, asks the connector for a new link (with the
//! usual boot wait) and asks the VM again for the `-R` listeners. One reconnect at a time: the
//! connections that arrive meanwhile wait for it and share its outcome.
//!
//! Here: setting up, the shared link and its reconnects; `local` serves the listeners here
//! (`-L`, `-D`), `remote` those on the VM (`-R`), `spec` parses the operands, `socks` is SOCKS5.

mod local;
mod remote;
pub mod socks;
pub mod spec;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::task::AbortHandle;

use crate::link::{Connector, Link, Refused, RemoteIo, RemoteListen};
use crate::target::Host;
use local::{serve_listener, Listener};
use spec::{Kind, Listen, Spec, Target};

/// Copy buffer per direction of a forwarded connection: a few SSH packets, so a fast link is
/// not held to many small writes.
const SPLICE_BUF: usize = 256 * 1024;
/// How long a SOCKS5 client may take to say where it wants to go.
const SOCKS_HANDSHAKE: Duration = Duration::from_secs(30);
/// How often, with `-R` forwards, the link is checked (and reconnected) and refused `-R`
/// requests after a reconnect are asked again.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What to forward and what to say about it.
#[derive(Debug, Clone)]
pub struct Options {
    pub specs: Vec<Spec>,
    /// One stderr line per forward saying what listens where (ports the VM picked for `-R` 0
    /// are always said, unless `quiet`).
    pub announce: bool,
    /// Only errors on stderr.
    pub quiet: bool,
}

/// Forwards being served. Dropping it stops the listeners (connections already forwarded run
/// on until they end or the runtime does) and removes the Unix sockets it created here.
pub struct Forwarding {
    shared: Arc<Shared>,
    _sockets: Sockets,
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

/// The Unix sockets bound here, removed when dropped (also when setting up fails half-way).
#[derive(Default)]
struct Sockets(Vec<PathBuf>);

impl Drop for Sockets {
    fn drop(&mut self) {
        for s in &self.0 {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Bind every local listener (a port in use fails here, before any connection is made), connect
/// through `connector`, ask the VM for the `-R` listeners, and serve them all in the background.
/// A `-R` the VM refuses is reported on stderr and left out; it is an error only when nothing at
/// all could be set up.
pub async fn start(connector: Arc<dyn Connector>, host: Host, opts: Options) -> Result<Forwarding> {
    let mut listeners = Vec::new();
    let mut sockets = Sockets::default();
    for s in opts.specs.iter().filter(|s| s.kind != Kind::Remote) {
        let (listener, at) = Listener::bind(&s.listen)
            .await
            .with_context(|| format!("{s}: cannot listen on {}", show_listen(&s.listen)))?;
        if let Listen::Unix(p) = &s.listen {
            sockets.0.push(PathBuf::from(p));
        }
        listeners.push((listener, at, s.clone()));
    }
    let link = connector.connect(&host).await?;
    let remotes = opts
        .specs
        .iter()
        .filter(|s| s.kind == Kind::Remote)
        .map(|s| {
            let listen = match &s.listen {
                Listen::Tcp { bind, port } => RemoteListen::Tcp {
                    address: spec::remote_bind(bind.as_deref()).to_string(),
                    port: *port,
                },
                Listen::Unix(p) => RemoteListen::Unix(p.clone()),
            };
            Remote {
                spec: s.clone(),
                listen,
                target: s.target.clone(),
                state: Mutex::default(),
            }
        })
        .collect();
    let shared = Arc::new(Shared {
        connector,
        host,
        link: Mutex::new(link.clone()),
        reconnect: tokio::sync::Mutex::new(()),
        last_failure: Mutex::new(None),
        generation: AtomicU64::new(0),
        remotes,
        asking: tokio::sync::Mutex::new(()),
        opts,
        tasks: Mutex::new(Vec::new()),
    });
    let mut serving = 0;
    for (listener, at, s) in listeners {
        let picked = matches!(s.listen, Listen::Tcp { port: 0, .. });
        let line = match (&s.kind, &s.target) {
            (Kind::Dynamic, _) => format!(
                "{s}: SOCKS5 listening on {at} → connections from {}",
                shared.host.name
            ),
            (_, Some(t)) => format!("{s}: listening on {at} → {t} on {}", shared.host.name),
            (_, None) => format!("{s}: listening on {at}"),
        };
        if shared.opts.announce || picked {
            shared.info(&line);
        }
        let task = tokio::spawn(serve_listener(shared.clone(), listener, s));
        shared.keep(task.abort_handle());
        serving += 1;
    }
    serving += shared.request_remotes(link.as_ref(), true).await;
    if serving == 0 {
        bail!("no forward could be set up");
    }
    if !shared.remotes.is_empty() {
        let task = tokio::spawn(watch(shared.clone()));
        shared.keep(task.abort_handle());
    }
    Ok(Forwarding {
        shared,
        _sockets: sockets,
    })
}

/// What every task shares: the current link and how to replace it.
struct Shared {
    connector: Arc<dyn Connector>,
    host: Host,
    link: Mutex<Arc<dyn Link>>,
    /// Held while reconnecting, so there is one reconnect at a time.
    reconnect: tokio::sync::Mutex<()>,
    /// When the last reconnect failed, and why: those who waited for it fail with it.
    last_failure: Mutex<Option<(Instant, String)>>,
    /// Bumped on every reconnect; an `-R` listener is live on one generation.
    generation: AtomicU64,
    remotes: Vec<Remote>,
    /// Held while asking the VM for `-R` listeners: the watch and a reconnect must not both ask
    /// for the same one.
    asking: tokio::sync::Mutex<()>,
    opts: Options,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// One `-R` forward and where it stands.
struct Remote {
    spec: Spec,
    listen: RemoteListen,
    /// `None`: a SOCKS proxy on the VM, connecting from here.
    target: Option<Target>,
    state: Mutex<RemoteState>,
}

#[derive(Default)]
struct RemoteState {
    /// The generation of the link the VM listens on for us.
    live_on: Option<u64>,
    /// The port it listens on (the one it picked, for 0).
    port: Option<u16>,
    /// Refused at start: never asked again.
    given_up: bool,
    /// Refused after a reconnect, and said so: asked again on every watch, said once.
    warned: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain read or assignment: a panic cannot leave the
    // value half-changed.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn info(&self, line: &str) {
        if !self.opts.quiet {
            eprintln!("vtun: {line}");
        }
    }

    fn error(&self, line: &str) {
        eprintln!("vtun: {line}");
    }

    fn keep(&self, task: AbortHandle) {
        lock(&self.tasks).push(task);
    }

    fn current(&self) -> Arc<dyn Link> {
        lock(&self.link).clone()
    }

    /// The link, reconnected first if it was lost.
    async fn link(self: &Arc<Self>) -> Result<Arc<dyn Link>> {
        let asked = Instant::now();
        let link = self.current();
        if !link.is_closed() {
            return Ok(link);
        }
        let _one_at_a_time = self.reconnect.lock().await;
        let link = self.current();
        if !link.is_closed() {
            return Ok(link);
        }
        if let Some((at, why)) = &*lock(&self.last_failure) {
            if *at > asked {
                bail!("{why}");
            }
        }
        match self.connector.connect(&self.host).await {
            Ok(new) => {
                *lock(&self.link) = new.clone();
                *lock(&self.last_failure) = None;
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.info(&format!(
                    "reconnected to {} (the connection was lost)",
                    self.host.name
                ));
                self.request_remotes(new.as_ref(), false).await;
                Ok(new)
            }
            Err(e) => {
                let why = format!("cannot reconnect to {}: {e:#}", self.host.name);
                *lock(&self.last_failure) = Some((Instant::now(), why.clone()));
                Err(anyhow!(why))
            }
        }
    }

    /// A stream to `target` from the VM. A link found dead on the way is replaced and the
    /// stream asked for once more.
    async fn open(self: &Arc<Self>, target: &Target) -> Result<Box<dyn RemoteIo>> {
        let link = self.link().await?;
        match open_on(link.as_ref(), target).await {
            Err(e) if e.downcast_ref::<Refused>().is_none() && link.is_closed() => {
                let link = self.link().await?;
                open_on(link.as_ref(), target).await
            }
            other => other,
        }
    }
}

/// `localhost:8080`, `*:8080` (all addresses), `[::1]:8080`.
fn show_remote_bind(address: &str, port: u16) -> String {
    match address {
        "" => format!("*:{port}"),
        a if a.contains(':') => format!("[{a}]:{port}"),
        a => format!("{a}:{port}"),
    }
}

fn show_listen(l: &Listen) -> String {
    match l {
        Listen::Tcp { bind, port } => {
            let b = spec::local_bind(bind.as_deref());
            show_remote_bind(b, *port)
        }
        Listen::Unix(p) => p.clone(),
    }
}

/// Keep the link fresh while there are `-R` forwards (nobody else would notice it died): every
/// [`WATCH_EVERY`], reconnect if it was lost and ask again for refused listeners.
async fn watch(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tick.tick().await;
        match shared.link().await {
            Ok(link) => {
                warned = false;
                shared.request_remotes(link.as_ref(), false).await;
            }
            Err(e) if !warned => {
                warned = true;
                shared.error(&format!("{e:#}; trying again"));
            }
            Err(e) => tracing::debug!("{e:#}"),
        }
    }
}

async fn open_on(link: &dyn Link, target: &Target) -> Result<Box<dyn RemoteIo>> {
    match target {
        Target::Tcp { host, port } => link.direct_tcpip(host, *port).await,
        Target::Unix(path) => link.direct_streamlocal(path).await,
    }
}

/// Copy both ways until both sides are done (each EOF passed on as a half-close) or either
/// fails, which closes both: a lost link ends the local connection too.
async fn splice(mut a: Box<dyn RemoteIo>, mut b: Box<dyn RemoteIo>) {
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, SPLICE_BUF, SPLICE_BUF).await
    {
        tracing::debug!("forwarded connection ended: {e}");
    }
}
