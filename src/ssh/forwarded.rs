//! Remote forwards on one session: the listeners we asked the server for (tcpip-forward,
//! streamlocal-forward@openssh.com) and the routing of the channels the server opens for each
//! connection made to them back to whoever asked.
//!
//! The non-obvious part: the server may open a channel for a port-0 listener before our task has
//! read the allocated port from the reply, so an entry is registered before the request is sent
//! and a port-0 entry that has no port yet takes a channel for any port no other entry claims.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use russh::client::Msg;
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::mpsc;

use super::channel::ChannelIo;
use super::{Session, SshError};
use crate::link::{Refused, RefusedWhy, RemoteIo, RemoteListen, RemoteListener};

/// Connections queued per listener before the server's channels are refused.
const BACKLOG: usize = 128;

/// The listeners of one session, shared by the session (which adds them) and its handler (which
/// routes channels to them).
pub struct Forwards {
    host: String,
    entries: Mutex<Vec<Entry>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Entry {
    id: u64,
    key: Key,
    tx: mpsc::Sender<Box<dyn RemoteIo>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    Tcp {
        address: String,
        requested: u32,
        allocated: Option<u32>,
    },
    Unix(String),
}

impl Forwards {
    pub fn new(host: &str) -> Arc<Forwards> {
        Arc::new(Forwards {
            host: host.to_string(),
            entries: Mutex::new(Vec::new()),
            next_id: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        // A panic elsewhere cannot leave the list half-updated: each change is one push/retain.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, key: Key, tx: mpsc::Sender<Box<dyn RemoteIo>>) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push(Entry { id, key, tx });
        id
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|e| e.id != id);
    }

    fn set_allocated(&self, id: u64, port: u32) {
        for e in self.lock().iter_mut().filter(|e| e.id == id) {
            if let Key::Tcp { allocated, .. } = &mut e.key {
                *allocated = Some(port);
            }
        }
    }

    /// Who takes a forwarded-tcpip channel for `port` (the server names the listener by the
    /// address we asked for and the port it listens on). Entries whose listener is gone (the
    /// receiver dropped) are skipped.
    pub fn route_tcp(&self, address: &str, port: u32) -> Option<mpsc::Sender<Box<dyn RemoteIo>>> {
        let entries = self.lock();
        let live = || entries.iter().filter(|e| !e.tx.is_closed());
        let port_of = |k: &Key| match k {
            Key::Tcp {
                requested,
                allocated,
                ..
            } => Some(allocated.unwrap_or(*requested)),
            Key::Unix(_) => None,
        };
        let exact = live().find(|e| {
            matches!(&e.key, Key::Tcp { address: a, .. } if a == address)
                && port_of(&e.key) == Some(port)
        });
        let by_port = || live().find(|e| port_of(&e.key) == Some(port));
        let pending = || {
            live().find(|e| {
                matches!(
                    e.key,
                    Key::Tcp {
                        requested: 0,
                        allocated: None,
                        ..
                    }
                )
            })
        };
        exact
            .or_else(by_port)
            .or_else(pending)
            .map(|e| e.tx.clone())
    }

    pub fn route_unix(&self, path: &str) -> Option<mpsc::Sender<Box<dyn RemoteIo>>> {
        self.lock()
            .iter()
            .find(|e| !e.tx.is_closed() && e.key == Key::Unix(path.to_string()))
            .map(|e| e.tx.clone())
    }

    /// A channel the server opened for a connection to one of our listeners: accept it and hand
    /// it over, or refuse it when no listener of ours matches (or its queue is full). Never
    /// waits: this runs inside the session's event loop.
    pub async fn open(
        &self,
        channel: Channel<Msg>,
        to: Option<mpsc::Sender<Box<dyn RemoteIo>>>,
        what: String,
        reply: russh::client::ChannelOpenHandle,
    ) {
        let Some(tx) = to.filter(|tx| tx.capacity() > 0) else {
            tracing::debug!(%what, "refusing a forwarded channel nobody asked for");
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return;
        };
        reply.accept().await;
        let io: Box<dyn RemoteIo> = Box::new(ChannelIo::new(channel, what, &self.host));
        // Dropping the stream on a full queue closes the channel: the connection is refused.
        let _ = tx.try_send(io);
    }
}

impl Session {
    /// Ask the server to listen at `listen` (one round trip); see [`crate::link::Link::remote_forward`].
    pub async fn remote_forward(&self, listen: RemoteListen) -> Result<RemoteListener> {
        let (tx, incoming) = mpsc::channel(BACKLOG);
        let forwards = self.forwards();
        match listen {
            RemoteListen::Tcp { address, port } => {
                let key = Key::Tcp {
                    address: address.clone(),
                    requested: u32::from(port),
                    allocated: None,
                };
                let id = forwards.add(key, tx);
                match self
                    .handle()
                    .tcpip_forward(address.clone(), port.into())
                    .await
                {
                    Ok(got) => {
                        // The reply carries a port only when we asked for 0.
                        let bound = if port == 0 { got } else { u32::from(port) };
                        forwards.set_allocated(id, bound);
                        let port = u16::try_from(bound).map_err(|_| {
                            SshError::Protocol(format!("{} allocated port {bound}", self.name()))
                        })?;
                        Ok(RemoteListener {
                            port: Some(port),
                            incoming,
                        })
                    }
                    Err(e) => {
                        forwards.remove(id);
                        let shown = if address.is_empty() { "*" } else { &address };
                        Err(refusal(e, self.name(), &format!("{shown}:{port}")))
                    }
                }
            }
            RemoteListen::Unix(path) => {
                let id = forwards.add(Key::Unix(path.clone()), tx);
                match self.handle().streamlocal_forward(path.clone()).await {
                    Ok(()) => Ok(RemoteListener {
                        port: None,
                        incoming,
                    }),
                    Err(e) => {
                        forwards.remove(id);
                        Err(refusal(e, self.name(), &path))
                    }
                }
            }
        }
    }
}

/// A failed listen request: a refusal by the server, or the connection going away meanwhile.
fn refusal(e: russh::Error, host: &str, what: &str) -> anyhow::Error {
    match e {
        russh::Error::RequestDenied => Refused {
            why: RefusedWhy::Other,
            message: format!(
                "{host} refused to listen on {what} (taken there, or its sshd forbids \
                 forwarding: AllowTcpForwarding, AllowStreamLocalForwarding)"
            ),
        }
        .into(),
        e => SshError::ConnectionLost(format!("cannot ask {host} to listen on {what}: {e}")).into(),
    }
}

// Tests only: unwrap on values the test itself built, where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tcp(address: &str, requested: u32, allocated: Option<u32>) -> Key {
        Key::Tcp {
            address: address.into(),
            requested,
            allocated,
        }
    }

    /// Channels go to the listener they were made for; a port-0 request still waiting for its
    /// reply takes a channel for a port nobody else claims.
    #[test]
    fn channels_are_routed_to_their_listener() {
        let f = Forwards::new("h");
        let (a_tx, mut a_rx) = mpsc::channel(1);
        let (b_tx, mut b_rx) = mpsc::channel(1);
        let (c_tx, mut c_rx) = mpsc::channel(1);
        f.add(tcp("localhost", 8080, None), a_tx);
        let b = f.add(tcp("", 0, None), b_tx);
        f.add(Key::Unix("/run/s.sock".into()), c_tx);

        let probe = |tx: Option<mpsc::Sender<Box<dyn RemoteIo>>>| {
            let io: Box<dyn RemoteIo> = Box::new(tokio::io::duplex(1).0);
            tx.unwrap().try_send(io).unwrap();
        };
        probe(f.route_tcp("localhost", 8080));
        assert!(a_rx.try_recv().is_ok());
        probe(f.route_tcp("", 41000));
        assert!(b_rx.try_recv().is_ok(), "pending port-0 entry takes it");
        f.set_allocated(b, 41000);
        assert!(
            f.route_tcp("", 42000).is_none(),
            "no claimant once allocated"
        );
        probe(f.route_tcp("0.0.0.0", 41000));
        assert!(b_rx.try_recv().is_ok(), "matched by port");
        probe(f.route_unix("/run/s.sock"));
        assert!(c_rx.try_recv().is_ok());
        assert!(f.route_unix("/other").is_none());

        drop(a_rx);
        assert!(f.route_tcp("localhost", 8080).is_none(), "listener gone");
    }
}
