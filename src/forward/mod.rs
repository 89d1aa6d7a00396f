//! Port forwarding over a VM's link: `-L` (listen here, connect from the VM), `-R` (listen on the
//! VM, connect from here) and `-D` (a SOCKS5 proxy here whose connections start on the VM), to TCP
//! ports or Unix sockets on either side, as OpenSSH offers them.
//!
//! The non-obvious part is surviving a lost connection. Local listeners never close; forwarded
//! connections that were open die with the link (their streams fail), and the next connection
//! accepted, or a timer when there are `-R` forwards, asks the connector for a new link (with the
//! usual boot wait) and asks the VM again for the `-R` listeners. One reconnect at a time: the
//! connections that arrive meanwhile wait for it and share its outcome.

pub mod socks;
pub mod spec;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::link::{Connector, Link, Refused, RefusedWhy, RemoteIo, RemoteListen};
use crate::target::Host;
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

    /// Ask the VM for every `-R` listener it does not hold on the current link, and serve those
    /// it grants. `first`: the start, where a refusal is final. Returns how many are live.
    async fn request_remotes(self: &Arc<Self>, link: &dyn Link, first: bool) -> usize {
        let _one_at_a_time = self.asking.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        let mut live = 0;
        for (i, r) in self.remotes.iter().enumerate() {
            let stale = {
                let st = lock(&r.state);
                if st.given_up {
                    continue;
                }
                if st.live_on == Some(generation) {
                    live += 1;
                    continue;
                }
                st.live_on.is_some() && !st.warned
            };
            if let (RemoteListen::Unix(path), true) = (&r.listen, stale) {
                remove_stale_socket(link, path).await;
            }
            match link.remote_forward(r.listen.clone()).await {
                Ok(listener) => {
                    let say = {
                        let mut st = lock(&r.state);
                        let say = first || st.warned || st.port != listener.port;
                        st.live_on = Some(generation);
                        st.port = listener.port;
                        st.warned = false;
                        say
                    };
                    let picked = matches!(r.listen, RemoteListen::Tcp { port: 0, .. });
                    if say && (self.opts.announce || picked || !first) {
                        let at = match (&r.listen, listener.port) {
                            (RemoteListen::Tcp { address, .. }, Some(p)) => {
                                show_remote_bind(address, p)
                            }
                            (RemoteListen::Tcp { address, port }, None) => {
                                show_remote_bind(address, *port)
                            }
                            (RemoteListen::Unix(path), _) => path.clone(),
                        };
                        let to = match &r.target {
                            Some(t) => format!("{t} here"),
                            None => "SOCKS5, connecting from here".to_string(),
                        };
                        self.info(&format!(
                            "{}: {} listening on {at} → {to}",
                            r.spec, self.host.name
                        ));
                    }
                    let task = tokio::spawn(serve_remote(self.clone(), i, listener.incoming));
                    self.keep(task.abort_handle());
                    live += 1;
                }
                Err(e) if e.downcast_ref::<Refused>().is_some() => {
                    let mut st = lock(&r.state);
                    if first {
                        st.given_up = true;
                        self.error(&format!("{}: {e:#}", r.spec));
                    } else if !st.warned {
                        st.warned = true;
                        self.error(&format!("{}: {e:#}; asking again", r.spec));
                    }
                }
                // The link went away meanwhile: the next reconnect asks again.
                Err(e) => {
                    if first {
                        self.error(&format!("{}: {e:#}", r.spec));
                    }
                    tracing::debug!("{}: {e:#}", r.spec);
                }
            }
        }
        live
    }
}

/// sshd leaves the socket of a streamlocal forward behind when its connection dies (unless the
/// VM's sshd has `StreamLocalBindUnlink yes`), and then refuses to listen there again: remove
/// the one our previous connection left, once, before asking on the new connection.
async fn remove_stale_socket(link: &dyn Link, path: &str) {
    use tokio::io::AsyncReadExt;
    let cmd = format!("rm -f -- {}", crate::exec::quote::quote(path));
    match link.exec(&cmd).await {
        Ok(mut io) => {
            let mut out = Vec::new();
            if let Err(e) = io.read_to_end(&mut out).await {
                tracing::debug!("{cmd}: {e}");
            }
        }
        Err(e) => tracing::debug!("{cmd}: {e:#}"),
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

/// A local listener: a TCP port or a Unix socket.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Bind, and say where (`127.0.0.1:8080`, with the port the system picked for 0).
    async fn bind(listen: &Listen) -> Result<(Listener, String)> {
        match listen {
            Listen::Tcp { bind, port } => {
                let addr = spec::local_bind(bind.as_deref());
                let l = TcpListener::bind((addr, *port)).await?;
                let at = l.local_addr()?.to_string();
                Ok((Listener::Tcp(l), at))
            }
            Listen::Unix(path) => {
                let l = UnixListener::bind(path)?;
                // Only this user may connect, as ssh's default StreamLocalBindMask 0177 gives.
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict {path} to this user"))?;
                Ok((Listener::Unix(l), path.clone()))
            }
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn RemoteIo>> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok(Box::new(s))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok(Box::new(s))
            }
        }
    }
}

/// Accept connections on a `-L` or `-D` listener for as long as the forwarding runs.
async fn serve_listener(shared: Arc<Shared>, listener: Listener, spec: Spec) {
    loop {
        let local = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, typically: wait for some to be freed, keep the listener.
                tracing::warn!("{spec}: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let spec = spec.clone();
        tokio::spawn(async move {
            let done = match &spec.target {
                Some(target) => forward_local(&shared, local, target).await,
                None => forward_socks(&shared, local).await,
            };
            if let Err(e) = done {
                shared.error(&format!("{spec}: {e:#}"));
            }
        });
    }
}

async fn forward_local(shared: &Arc<Shared>, local: Box<dyn RemoteIo>, to: &Target) -> Result<()> {
    let remote = shared.open(to).await?;
    splice(local, remote).await;
    Ok(())
}

async fn forward_socks(shared: &Arc<Shared>, mut local: Box<dyn RemoteIo>) -> Result<()> {
    let req = tokio::time::timeout(SOCKS_HANDSHAKE, socks::accept(&mut local))
        .await
        .map_err(|_| anyhow!("a SOCKS5 client said nothing for {SOCKS_HANDSHAKE:?}"))??;
    let target = Target::Tcp {
        host: req.host,
        port: req.port,
    };
    match shared.open(&target).await {
        Ok(remote) => {
            socks::reply(&mut local, socks::Reply::Succeeded).await?;
            splice(local, remote).await;
            Ok(())
        }
        Err(e) => {
            let code = match e.downcast_ref::<Refused>().map(|r| r.why) {
                Some(RefusedWhy::Prohibited) => socks::Reply::NotAllowed,
                Some(RefusedWhy::Unreachable) => socks::Reply::HostUnreachable,
                _ => socks::Reply::GeneralFailure,
            };
            let _ = socks::reply(&mut local, code).await;
            Err(e)
        }
    }
}

/// Serve the connections the VM hands us for the `i`th `-R` forward until its link goes.
async fn serve_remote(
    shared: Arc<Shared>,
    i: usize,
    mut incoming: mpsc::Receiver<Box<dyn RemoteIo>>,
) {
    while let Some(remote) = incoming.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let Some(r) = shared.remotes.get(i) else {
                return;
            };
            let done = match &r.target {
                Some(t) => match connect_here(t).await {
                    Ok(local) => {
                        splice(local, remote).await;
                        Ok(())
                    }
                    Err(e) => Err(anyhow!("cannot connect to {t} here: {e}")),
                },
                None => socks_here(remote).await,
            };
            if let Err(e) = done {
                shared.error(&format!("{}: {e:#}", r.spec));
            }
        });
    }
}

/// A SOCKS5 client on the VM (`-R [BIND:]PORT`): connect where it asks, from here.
async fn socks_here(mut remote: Box<dyn RemoteIo>) -> Result<()> {
    let req = tokio::time::timeout(SOCKS_HANDSHAKE, socks::accept(&mut remote))
        .await
        .map_err(|_| anyhow!("a SOCKS5 client said nothing for {SOCKS_HANDSHAKE:?}"))??;
    let target = Target::Tcp {
        host: req.host,
        port: req.port,
    };
    match connect_here(&target).await {
        Ok(local) => {
            socks::reply(&mut remote, socks::Reply::Succeeded).await?;
            splice(local, remote).await;
            Ok(())
        }
        Err(e) => {
            let code = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => socks::Reply::ConnectionRefused,
                _ => socks::Reply::HostUnreachable,
            };
            let _ = socks::reply(&mut remote, code).await;
            Err(anyhow!("cannot connect to {target} here: {e}"))
        }
    }
}

async fn connect_here(target: &Target) -> std::io::Result<Box<dyn RemoteIo>> {
    match target {
        Target::Tcp { host, port } => {
            let s = TcpStream::connect((host.as_str(), *port)).await?;
            let _ = s.set_nodelay(true);
            Ok(Box::new(s))
        }
        Target::Unix(path) => Ok(Box::new(UnixStream::connect(path).await?)),
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
