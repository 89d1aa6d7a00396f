//! `vtun gateway`: the server half, a TLS edge like the Vers one. It reads the ClientHello,
//! picks a backend by SNI (unknown names are closed before any handshake), completes TLS and
//! relays bytes to the backend's TCP port, half-closing each direction on its own.
//!
//! It powers the test bed and benchmarks; `--delay-ms` and `--idle-timeout` are testing aids.
//! Connections that do not finish the TLS handshake within the handshake timeout are closed, and
//! at most `max_connections` are served at once (more are closed on accept), so a client that
//! connects and sends nothing cannot hold a slot or a task forever.

pub mod certs;
pub mod pump;
pub mod route;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;

pub use route::{Pattern, Route};

/// Where the gateway's certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// A certificate chain and its key, both PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// A CA and a certificate for the route names, created once in this directory.
    SelfSigned(PathBuf),
}

/// What `vtun gateway` was asked to do, validated.
#[derive(Debug, Clone)]
pub struct Options {
    pub routes: Vec<Route>,
    pub cert: CertSource,
    /// One-way delay added in each direction.
    pub delay: Duration,
    pub idle_timeout: Option<Duration>,
    /// Time from accept to a completed TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

/// Everything a running gateway needs.
pub struct Gateway {
    pub routes: Vec<Route>,
    pub tls: Arc<ServerConfig>,
    /// One-way delay added in each direction.
    pub delay: Duration,
    pub idle_timeout: Option<Duration>,
    pub handshake_timeout: Duration,
    slots: Arc<Semaphore>,
    max_connections: usize,
}

impl Gateway {
    /// Load or create the certificate.
    pub fn new(opts: Options) -> Result<Gateway> {
        let (cert, key) = match &opts.cert {
            CertSource::Files { cert, key } => (
                std::fs::read_to_string(cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?,
                std::fs::read_to_string(key)
                    .with_context(|| format!("cannot read {}", key.display()))?,
            ),
            CertSource::SelfSigned(dir) => {
                let mut names: Vec<String> =
                    opts.routes.iter().map(|r| r.pattern.cert_name()).collect();
                names.push("localhost".into());
                let pair = certs::self_signed(dir, &names)?;
                eprintln!(
                    "vtun gateway: serving a self-signed certificate; clients trust it with --ca-file {}",
                    dir.join("ca.pem").display()
                );
                pair
            }
        };
        if opts.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        Ok(Gateway {
            routes: opts.routes,
            tls: certs::server_config(&cert, &key)?,
            delay: opts.delay,
            idle_timeout: opts.idle_timeout,
            handshake_timeout: opts.handshake_timeout,
            slots: Arc::new(Semaphore::new(opts.max_connections)),
            max_connections: opts.max_connections,
        })
    }

    /// Accept connections forever.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> Result<()> {
        loop {
            let (sock, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                tracing::warn!(%peer, max = self.max_connections, "connection limit reached: closed");
                drop(sock);
                continue;
            };
            let _ = sock.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                if let Err(e) = gw.handle(sock).await {
                    tracing::info!(%peer, "connection ended: {e:#}");
                }
                drop(slot);
            });
        }
    }

    async fn handle(&self, sock: TcpStream) -> Result<()> {
        let peer = sock.peer_addr()?;
        let limit = self.handshake_timeout;
        let Ok(accepted) = tokio::time::timeout(limit, self.accept_tls(sock)).await else {
            tracing::info!(%peer, "no TLS handshake within {limit:?}: closed");
            return Ok(());
        };
        let Some((tls, route, sni)) = accepted? else {
            return Ok(());
        };
        let backend = match TcpStream::connect(&route.backend).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%peer, name = %sni, backend = %route.backend, "backend unavailable: {e}");
                let mut tls = tls;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                return Ok(());
            }
        };
        let _ = backend.set_nodelay(true);
        tracing::info!(%peer, name = %sni, backend = %route.backend, "connected");
        self.relay(tls, backend).await
    }

    /// Read the ClientHello, pick the route by SNI and finish the handshake; `None` when the name
    /// has no route (the connection is closed before any handshake).
    async fn accept_tls(
        &self,
        sock: TcpStream,
    ) -> Result<Option<(tokio_rustls::server::TlsStream<TcpStream>, &Route, String)>> {
        let peer = sock.peer_addr()?;
        let start = LazyConfigAcceptor::new(Acceptor::default(), sock)
            .await
            .context("TLS ClientHello")?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let Some(route) = sni.as_deref().and_then(|n| route::lookup(&self.routes, n)) else {
            tracing::warn!(%peer, "unknown server name {:?}: closed", sni.unwrap_or_default());
            return Ok(None);
        };
        let tls = start
            .into_stream(self.tls.clone())
            .await
            .context("TLS handshake")?;
        Ok(Some((tls, route, sni.unwrap_or_default())))
    }

    async fn relay(
        &self,
        tls: tokio_rustls::server::TlsStream<TcpStream>,
        backend: TcpStream,
    ) -> Result<()> {
        let activity = pump::Activity::new();
        let (tls_r, tls_w) = tokio::io::split(tls);
        let (be_r, be_w) = backend.into_split();
        let up = pump::pipe(tls_r, be_w, self.delay, activity.clone(), true);
        let down = pump::pipe(be_r, tls_w, self.delay, activity.clone(), false);
        // A direction that fails ends both: a backend that resets (a VM closing a connection
        // with the client's banner unread) must close the client's connection too, not leave
        // it waiting on the other direction until the client gives up.
        let both = async {
            tokio::try_join!(async { up.await.context("client → backend") }, async {
                down.await.context("backend → client")
            },)?;
            Ok::<_, anyhow::Error>(())
        };
        let result = self.relay_until_idle(both, &activity).await;
        // Bytes on the wire per connection, however it ended: the benchmarks read these lines.
        let up = activity.up.load(std::sync::atomic::Ordering::Relaxed);
        let down = activity.down.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(up, down, "closed");
        result
    }

    async fn relay_until_idle(
        &self,
        both: impl std::future::Future<Output = Result<()>>,
        activity: &pump::Activity,
    ) -> Result<()> {
        match self.idle_timeout {
            None => both.await,
            Some(limit) => {
                let watchdog = async {
                    loop {
                        tokio::time::sleep(limit / 4).await;
                        if activity.idle_for() >= limit {
                            return;
                        }
                    }
                };
                tokio::select! {
                    r = both => r,
                    _ = watchdog => {
                        tracing::info!("idle for {limit:?}: cut");
                        Ok(())
                    }
                }
            }
        }
    }
}
