//! `vtun gateway`: the server half, a TLS edge like the Vers one. It reads the ClientHello,
//! picks a backend by SNI (unknown names are closed before any handshake), completes TLS and
//! relays bytes to the backend's TCP port, half-closing each direction on its own.
//!
//! It powers the test bed and benchmarks; `--delay-ms` and `--idle-timeout` are testing aids.

pub mod certs;
pub mod pump;
pub mod route;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::server::Acceptor;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use crate::cli::GatewayArgs;
pub use route::{Pattern, Route};

/// Everything a running gateway needs.
pub struct Gateway {
    pub routes: Vec<Route>,
    pub tls: Arc<ServerConfig>,
    /// One-way delay added in each direction.
    pub delay: Duration,
    pub idle_timeout: Option<Duration>,
}

impl Gateway {
    /// Validate the arguments and load or create the certificate.
    pub fn from_args(args: &GatewayArgs) -> Result<Gateway> {
        let routes = args
            .routes
            .iter()
            .map(|r| Route::parse(r))
            .collect::<Result<Vec<_>>>()?;
        let (cert, key) = match (&args.cert, &args.key, &args.self_signed) {
            (Some(c), Some(k), _) => (
                std::fs::read_to_string(c)
                    .with_context(|| format!("cannot read {}", c.display()))?,
                std::fs::read_to_string(k)
                    .with_context(|| format!("cannot read {}", k.display()))?,
            ),
            (_, _, Some(dir)) => {
                let mut names: Vec<String> = routes.iter().map(|r| r.pattern.cert_name()).collect();
                names.push("localhost".into());
                let pair = certs::self_signed(dir, &names)?;
                eprintln!(
                    "vtun gateway: serving a self-signed certificate; clients trust it with --ca-file {}",
                    dir.join("ca.pem").display()
                );
                pair
            }
            _ => anyhow::bail!("give --cert and --key, or --self-signed DIR"),
        };
        let idle_timeout = match args.idle_timeout {
            Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
            Some(_) => anyhow::bail!("--idle-timeout must be a positive number of seconds"),
            None => None,
        };
        Ok(Gateway {
            routes,
            tls: certs::server_config(&cert, &key)?,
            delay: Duration::from_millis(args.delay_ms),
            idle_timeout,
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
            let _ = sock.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                if let Err(e) = gw.handle(sock).await {
                    tracing::info!(%peer, "connection ended: {e:#}");
                }
            });
        }
    }

    async fn handle(&self, sock: TcpStream) -> Result<()> {
        let peer = sock.peer_addr()?;
        let start = LazyConfigAcceptor::new(Acceptor::default(), sock)
            .await
            .context("TLS ClientHello")?;
        let sni = start.client_hello().server_name().map(str::to_owned);
        let Some(route) = sni.as_deref().and_then(|n| route::lookup(&self.routes, n)) else {
            tracing::warn!(%peer, "unknown server name {:?}: closed", sni.unwrap_or_default());
            return Ok(());
        };
        let sni = sni.unwrap_or_default();
        let tls = start
            .into_stream(self.tls.clone())
            .await
            .context("TLS handshake")?;
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
        let both = async {
            let (u, d) = tokio::join!(up, down);
            u.context("client → backend")?;
            d.context("backend → client")?;
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

/// `vtun gateway`: bind, print the address if asked, serve.
pub fn run(args: &GatewayArgs) -> Result<u8> {
    let gw = Arc::new(Gateway::from_args(args)?);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        if args.print_addr {
            println!("{addr}");
        }
        tracing::info!(%addr, routes = gw.routes.len(), "listening");
        gw.serve(listener).await
    })?;
    Ok(0)
}
