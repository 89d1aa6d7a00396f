//! One SSH session over one verified TLS stream, tuned for WAN links.
//!
//! The tuning that matters: AES-GCM first (hardware AES on both ends), a 16 MiB channel window
//! (OpenSSH's 2 MiB caps one channel at 2 MiB per round trip), 64 KiB packets, TCP_NODELAY
//! (set by the dialer) and keepalive@openssh.com every 10 s with 6 misses allowed. russh grants
//! window as data arrives rather than as it is consumed, so a channel whose reader stops reading
//! eventually stalls the whole session once its queue (`CHANNEL_QUEUE` packets) is full: every
//! stream handed out by this module must be read promptly.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Result;
use russh::client::{Config, Handle, Msg};
use russh::{cipher, Channel, Preferred};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::forwarded::Forwards;
use super::hostkey::{Client, Pins};
use super::retry::{self, Attempt};
use super::{auth, SshError};
use crate::link::{Refused, RefusedWhy};
use crate::settings::Settings;
use crate::target::Host;
use crate::tls::Dialer;
use crate::vers::VmApi;

/// Channel window we advertise (OpenSSH's sshd uses 2 MiB).
pub const WINDOW: u32 = 16 * 1024 * 1024;
/// Largest channel packet we accept. OpenSSH would take up to its 256 KiB packet limit, but
/// russh treats anything above 65535 as a misconfiguration, and sshd reads from the remote
/// program 32 KiB at a time, so a larger value would never be used.
pub const MAX_PACKET: u32 = 65535;
/// Packets queued per channel before the session pushes back.
const CHANNEL_QUEUE: usize = 512;
/// keepalive@openssh.com interval and misses, as the vers CLI uses.
const KEEPALIVE: Duration = Duration::from_secs(10);
const KEEPALIVE_MAX: usize = 6;

/// An authenticated SSH session to one host. Share it with `Arc`; channels open concurrently.
pub struct Session {
    /// Shared with exec channels' pumps, which ping through it (see [`Session::round_trip`]).
    handle: Arc<Handle<Client>>,
    name: String,
    /// The listeners asked of the server (remote forwards), shared with the handler.
    forwards: Arc<Forwards>,
}

impl Session {
    /// Dial, handshake, pin the host key and authenticate, retrying the boot race for
    /// `settings.wait`. Errors are [`SshError`]s or dial errors: all exit 255.
    #[tracing::instrument(level = "debug", skip_all, fields(host = %host.name))]
    pub async fn connect(settings: &Settings, host: &Host) -> Result<Session> {
        let dialer = Dialer::new(&settings.tls)?;
        let config = Arc::new(config());
        let api = VmApi::for_host(settings, host);
        if let Some(api) = &api {
            api.prefetch(&settings.identities).await?;
        }
        let api = api.as_ref();
        retry::with_boot_wait(settings, host, api, || {
            attempt(settings, host, &dialer, &config, api)
        })
        .await
    }

    /// A new session channel (one round trip).
    pub async fn open_channel(&self) -> Result<Channel<Msg>> {
        self.handle
            .channel_open_session()
            .await
            .map_err(|e| match e {
                // The connection is fine; the server said no (OpenSSH allows `MaxSessions`
                // channels per connection, 10 by default).
                russh::Error::ChannelOpenFailure(why) => SshError::Refused(format!(
                    "{} refused another channel ({why:?}; sshd allows MaxSessions per connection)",
                    self.name
                ))
                .into(),
                e => SshError::ConnectionLost(format!("cannot open a channel: {e}")).into(),
            })
    }

    /// A direct-tcpip channel to `host:port` as seen from the server (one round trip).
    pub async fn open_direct_tcpip(&self, host: &str, port: u16) -> Result<Channel<Msg>> {
        self.handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .map_err(|e| self.open_failure(e, &format!("{host}:{port}")))
    }

    /// A direct-streamlocal@openssh.com channel to the Unix socket `path` on the server.
    pub async fn open_direct_streamlocal(&self, path: &str) -> Result<Channel<Msg>> {
        self.handle
            .channel_open_direct_streamlocal(path)
            .await
            .map_err(|e| self.open_failure(e, path))
    }

    /// A refused stream is the VM's answer ([`Refused`]); anything else is the connection.
    fn open_failure(&self, e: russh::Error, to: &str) -> anyhow::Error {
        use russh::ChannelOpenFailure as F;
        match e {
            russh::Error::ChannelOpenFailure(why) => {
                let (why, text) = match why {
                    F::AdministrativelyProhibited => (
                        RefusedWhy::Prohibited,
                        "forbidden by its sshd: AllowTcpForwarding, AllowStreamLocalForwarding, \
                         PermitOpen"
                            .to_string(),
                    ),
                    F::ConnectFailed => (RefusedWhy::Unreachable, "it cannot connect".to_string()),
                    other => (RefusedWhy::Other, format!("{other:?}")),
                };
                Refused {
                    why,
                    message: format!("{} refused a stream to {to} ({text})", self.name),
                }
                .into()
            }
            e => SshError::ConnectionLost(format!("cannot open a channel: {e}")).into(),
        }
    }

    /// Resolves once the server has answered a ping sent when it is first polled, so everything
    /// queued on the session before that has reached the server (or the session is gone).
    pub fn round_trip(&self) -> futures::future::BoxFuture<'static, ()> {
        let handle = self.handle.clone();
        Box::pin(async move {
            let _ = handle.send_ping().await;
        })
    }

    pub(super) fn handle(&self) -> &Handle<Client> {
        &self.handle
    }

    pub(super) fn forwards(&self) -> &Forwards {
        &self.forwards
    }

    /// The host's full name (`a.vm.vers.sh`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Say goodbye to the server (best effort; flushes anything queued before it).
    pub async fn close(&self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// The client configuration; the keepalive interval can be shortened for tests through the
/// hidden `VTUN_KEEPALIVE_SECS`.
fn config() -> Config {
    let keepalive = std::env::var("VTUN_KEEPALIVE_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(KEEPALIVE);
    Config {
        window_size: WINDOW,
        maximum_packet_size: MAX_PACKET,
        channel_buffer_size: CHANNEL_QUEUE,
        preferred: Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                cipher::AES_128_GCM,
                cipher::AES_256_GCM,
                cipher::CHACHA20_POLY1305,
                cipher::AES_256_CTR,
                cipher::AES_128_CTR,
            ]),
            ..Preferred::DEFAULT
        },
        keepalive_interval: Some(keepalive),
        keepalive_max: KEEPALIVE_MAX,
        nodelay: true,
        ..Config::default()
    }
}

/// One try: dial, SSH handshake, authenticate. Says whether a failure is worth retrying.
async fn attempt(
    settings: &Settings,
    host: &Host,
    dialer: &Dialer,
    config: &Arc<Config>,
    api: Option<&VmApi>,
) -> Attempt<Session> {
    let port = settings.port_for(host);
    let tls = match dialer.dial(&host.name, port).await {
        Ok(t) => t,
        Err(e) => {
            let transient = e.is_transient();
            return Attempt::Failed(e.into(), transient);
        }
    };
    let seen = Arc::new(AtomicBool::new(false));
    let stream = Watched {
        inner: tls,
        seen: seen.clone(),
    };
    let pins = Pins::new(
        &settings.known_hosts,
        &host.name,
        port,
        settings.host_key_check,
    );
    let forwards = Forwards::new(&host.name);
    let client = Client {
        pins,
        forwards: forwards.clone(),
    };
    let handshake = russh::client::connect_stream(config.clone(), stream, client);
    let mut handle = match tokio::time::timeout(settings.tls.connect_timeout, handshake).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            if e.downcast_ref::<SshError>().is_some() {
                return Attempt::Failed(e, false);
            }
            if !seen.load(Ordering::Relaxed) {
                // The edge accepted TLS but the VM behind it did not answer: still booting.
                let msg = format!(
                    "{}:{port}: connection closed before the ssh banner",
                    host.name
                );
                return Attempt::Failed(SshError::Protocol(msg).into(), true);
            }
            let msg = format!("{}:{port}: ssh handshake failed: {e:#}", host.name);
            return Attempt::Failed(SshError::Protocol(msg).into(), false);
        }
        Err(_) => {
            let msg = format!(
                "{}:{port}: no ssh handshake within {}s (--connect-timeout)",
                host.name,
                settings.tls.connect_timeout.as_secs_f64()
            );
            return Attempt::Stalled(SshError::Protocol(msg).into());
        }
    };
    let user = settings.user_for(host);
    if let Err(e) = auth::authenticate(
        &mut handle,
        &user,
        host,
        &settings.identities,
        settings.tls.connect_timeout,
        api,
    )
    .await
    {
        return Attempt::Failed(e, false);
    }
    Attempt::Done(Session {
        handle: Arc::new(handle),
        name: host.name.clone(),
        forwards,
    })
}

/// The TLS stream, noting whether the server ever sent a byte: a connection closed before any
/// byte is the boot race (the edge is up, the VM's sshd is not yet), and is retried.
struct Watched<S> {
    inner: S,
    seen: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.seen.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
