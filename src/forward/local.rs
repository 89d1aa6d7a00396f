//! The listeners here: `-L` (each connection becomes a stream from the VM to the target) and
//! `-D` (a SOCKS5 handshake first, then the same to wherever the client asked), TCP ports or
//! Unix sockets.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::net::{TcpListener, UnixListener};

use super::spec::{self, Listen, Spec, Target};
use super::{socks, splice, Shared, SOCKS_HANDSHAKE};
use crate::link::{Refused, RefusedWhy, RemoteIo};

/// A local listener: a TCP port or a Unix socket.
pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Bind, and say where (`127.0.0.1:8080`, with the port the system picked for 0).
    pub(super) async fn bind(listen: &Listen) -> Result<(Listener, String)> {
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
pub(super) async fn serve_listener(shared: Arc<Shared>, listener: Listener, spec: Spec) {
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
