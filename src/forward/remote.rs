//! The listeners on the VM (`-R`): asking for them (again after a reconnect), and serving the
//! connections the VM hands back, to a fixed target here or, for `-R [BIND:]PORT`, wherever a
//! SOCKS5 client on the VM asks.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::mpsc;

use super::spec::Target;
use super::{lock, show_remote_bind, socks, splice, Shared, SOCKS_HANDSHAKE};
use crate::link::{Link, Refused, RemoteIo, RemoteListen};

impl Shared {
    /// Ask the VM for every `-R` listener it does not hold on the current link, and serve those
    /// it grants. `first`: the start, where a refusal is final. Returns how many are live.
    pub(super) async fn request_remotes(self: &Arc<Self>, link: &dyn Link, first: bool) -> usize {
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
